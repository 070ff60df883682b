"""A real local git repository holding the k8s/ tree: the Flux GitRepository's artifact is its HEAD."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

BRANCH = "main"


class GitError(RuntimeError):
    pass


class GitRepo:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @property
    def tree(self) -> Path:
        return self.path / "k8s"

    def git(self, *args: str) -> str:
        env = {**os.environ, "GIT_CONFIG_NOSYSTEM": "1", "GIT_TERMINAL_PROMPT": "0",
               "GIT_AUTHOR_NAME": "homelab twin", "GIT_AUTHOR_EMAIL": "twin@localhost",
               "GIT_COMMITTER_NAME": "homelab twin", "GIT_COMMITTER_EMAIL": "twin@localhost"}
        proc = subprocess.run(["git", "-C", str(self.path), *args], capture_output=True, text=True,
                              env=env, timeout=30, check=False)
        if proc.returncode != 0:
            raise GitError(f"git {' '.join(args)} in {self.path} exited {proc.returncode}: {proc.stderr.strip()[-300:]}")
        return proc.stdout

    def init(self, source_tree: Path) -> str:
        """A fresh repository with source_tree copied to k8s/ in one commit on main; the commit's sha."""
        self.path.mkdir(parents=True, exist_ok=True)
        if self.tree.exists():
            shutil.rmtree(self.tree)
        shutil.copytree(source_tree, self.tree, ignore=shutil.ignore_patterns(".git", "__pycache__"))
        self.git("init", "-q", "-b", BRANCH)
        self.git("add", "-A")
        self.git("-c", "commit.gpgsign=false", "commit", "-q", "-m", "k8s: GitOps tree of the homelab")
        return self.head()

    def head(self) -> str:
        return self.git("rev-parse", "HEAD").strip()

    def commit_all(self, message: str) -> str:
        """Commit every change in the checkout (tests use it to move HEAD); the new sha."""
        self.git("add", "-A")
        self.git("-c", "commit.gpgsign=false", "commit", "-q", "--allow-empty", "-m", message)
        return self.head()

    def revision(self) -> str:
        return f"{BRANCH}@sha1:{self.head()}"
