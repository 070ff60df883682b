"""git, the external system: the repository holding the GitOps tree, read through the git CLI.

Every command is an argv list; commit ids from a push event are checked to be hex before they reach
git, so an event can never smuggle in an option. A repository given as a clone URL is mirrored into a
local cache (HOMELAB_GIT_CACHE, default ~/.cache/homelab-flows/git) and fetched when a commit is missing.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import subprocess
import tarfile
from pathlib import Path

GIT_TIMEOUT_S = 120.0
_SHA_RE = re.compile(r"^(?:[0-9a-f]{40}|[0-9a-f]{64})$")


class GitError(Exception):
    """A git command failed; the message names the repository, the command and git's own words."""


class UnknownCommit(GitError):
    """A commit of the push is not in the repository, even after fetching."""

    def __init__(self, message: str, sha: str):
        self.sha = sha
        super().__init__(message)


def check_sha(sha: str, what: str) -> str:
    value = (sha or "").strip().lower()
    if not _SHA_RE.match(value):
        raise GitError(f"{what}: expected a 40- or 64-digit hex commit id, got {sha[:80]!r}")
    return value


def is_zero(sha: str | None) -> bool:
    return not sha or set(sha) == {"0"}


class Repo:
    """One local git repository (a checkout or a bare mirror)."""

    def __init__(self, path: Path, timeout_s: float = GIT_TIMEOUT_S, *, mirror: bool = False):
        self.path = Path(path)
        self.timeout_s = timeout_s
        # A mirror stands in for a remote repository: its refs are only as current as its last fetch.
        self.mirror = mirror

    @classmethod
    def from_url(cls, url: str, cache: Path | None = None) -> Repo:
        """A local path as is; a clone URL as a bare mirror in the cache (cloned on first use)."""
        local = Path(url.removeprefix("file://")).expanduser()
        if local.is_dir():
            return cls(local)
        root = cache or Path(os.environ.get("HOMELAB_GIT_CACHE", "~/.cache/homelab-flows/git")).expanduser()
        mirror = root / hashlib.sha256(url.encode()).hexdigest()[:16]
        repo = cls(mirror, mirror=True)
        if not (mirror / "HEAD").exists():
            root.mkdir(parents=True, exist_ok=True)
            repo._run(["git", "clone", "--quiet", "--mirror", "--", url, str(mirror)], what=f"clone of {url}")
        return repo

    def _run(self, argv: list[str], what: str, input_text: str | None = None, ok: tuple[int, ...] = (0,)
             ) -> subprocess.CompletedProcess[bytes]:
        env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_CONFIG_NOSYSTEM": "1", "LC_ALL": "C"}
        try:
            proc = subprocess.run(argv, input=input_text.encode() if input_text is not None else None,
                                  capture_output=True, env=env, timeout=self.timeout_s, check=False)
        except subprocess.TimeoutExpired:
            raise GitError(f"{self.path}: {what} (git {argv[1] if len(argv) > 1 else ''}) did not finish within "
                           f"{self.timeout_s:.0f}s") from None
        except FileNotFoundError:
            raise GitError("the git executable is not on PATH; install git on the worker") from None
        if proc.returncode not in ok:
            err = proc.stderr.decode(errors="replace").strip()[-300:]
            raise GitError(f"{self.path}: {what} failed (exit {proc.returncode}): {err}")
        return proc

    def git(self, *args: str, what: str = "", input_text: str | None = None, ok: tuple[int, ...] = (0,)
            ) -> subprocess.CompletedProcess[bytes]:
        return self._run(["git", "-C", str(self.path), *args], what or f"git {args[0]}", input_text, ok)

    # -- commits --

    def branch_head(self, branch: str) -> str:
        """The commit at refs/heads/<branch>; a mirror is fetched first, so it is the remote's current head."""
        if self.mirror:
            self.git("fetch", "--quiet", "--prune", what="git fetch")
        proc = self.git("rev-parse", "--verify", "--quiet", f"refs/heads/{branch}^{{commit}}",
                        what=f"resolve branch {branch}", ok=(0, 1, 128))
        if proc.returncode != 0:
            raise GitError(f"{self.path}: has no branch {branch!r} (refs/heads/{branch}); check the branch "
                           "in the Homelab block's git part")
        return proc.stdout.decode().strip()

    def has_commit(self, sha: str) -> bool:
        sha = check_sha(sha, "commit")
        return self.git("cat-file", "-e", f"{sha}^{{commit}}", what=f"look up {sha}", ok=(0, 1, 128)).returncode == 0

    def has_remote(self) -> bool:
        return bool(self.git("remote", what="list remotes").stdout.strip())

    def ensure_commits(self, *shas: str) -> None:
        """Every sha present, fetching once when the repository has a remote; else UnknownCommit."""
        missing = [s for s in shas if not self.has_commit(s)]
        if missing and self.has_remote():
            self.git("fetch", "--quiet", "--all", "--prune", what="git fetch")
            missing = [s for s in missing if not self.has_commit(s)]
        if missing:
            how = "after git fetch" if self.has_remote() else "and the repository has no remote to fetch from"
            raise UnknownCommit(f"commit {missing[0]} is not in the repository {self.path} ({how}); was the push "
                                f"to another repository, or was the commit rewritten since? Next step: check "
                                f"the Homelab block's git url and run flux-reconcile by hand", missing[0])

    def is_ancestor(self, older: str, newer: str) -> bool:
        older, newer = check_sha(older, "before"), check_sha(newer, "after")
        return self.git("merge-base", "--is-ancestor", older, newer, what="merge-base", ok=(0, 1)).returncode == 0

    def empty_tree(self) -> str:
        return self.git("hash-object", "-t", "tree", "--stdin", what="hash the empty tree",
                        input_text="").stdout.decode().strip()

    def changed_paths(self, before: str, after: str) -> list[str]:
        """Paths that differ between two commits (renames as delete + add); an all-zero ``before``
        (a new branch) diffs against the empty tree. Works for force pushes: it compares the trees."""
        after = check_sha(after, "after")
        base = self.empty_tree() if is_zero(before) else check_sha(before, "before")
        out = self.git("diff", "--name-only", "--no-renames", "-z", base, after, "--",
                       what=f"diff {base[:12]}..{after[:12]}").stdout
        return sorted({p for p in out.decode(errors="surrogateescape").split("\0") if p})

    # -- content --

    def files_at(self, commit: str, prefix: str = "") -> list[str]:
        commit = check_sha(commit, "commit")
        args = ["ls-tree", "-r", "-z", "--name-only", commit]
        if prefix:
            args += ["--", prefix]
        out = self.git(*args, what=f"list files of {commit[:12]}").stdout
        return [p for p in out.decode(errors="surrogateescape").split("\0") if p]

    def read_at(self, commit: str, path: str) -> str | None:
        """A file's text at a commit; None when it does not exist there."""
        commit = check_sha(commit, "commit")
        proc = self.git("show", f"{commit}:{path}", what=f"read {path} at {commit[:12]}", ok=(0, 128))
        return proc.stdout.decode(errors="replace") if proc.returncode == 0 else None

    def export(self, commit: str, prefix: str, dest: Path) -> Path:
        """The files below ``prefix`` at ``commit`` written under ``dest``; dest/prefix."""
        commit = check_sha(commit, "commit")
        args = ["archive", "--format=tar", commit]
        if prefix:
            args += ["--", prefix]
        data = self.git(*args, what=f"export {prefix or 'the tree'} at {commit[:12]}").stdout
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            tar.extractall(dest, filter="data")
        return dest / prefix if prefix else dest
