"""Flow `git-push`: a push to the branch Flux follows → reconcile exactly what it touched.

Started by the deployment trigger on the webhook's `homelab.git.push` event. The changed paths come
from the repository itself (before..after), the sender's list only when git cannot tell. Version
changes in a talconfig.yaml start the upgrade deployment with approval required (both versions at once:
cluster-upgrade, Talos first, then Kubernetes); a cluster.yaml change starts provision in plan mode. A
markdown artifact says what was done and why.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Annotated, Any, cast

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.client.schemas.objects import FlowRun
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import Field

from blocks import load_homelab
from flows._names import run_name
from flows._runtime import FlowFailed
from flows.flux_reconcile import MAX_PARALLEL, NOT_STARTED, reconcile_selection
from homelab import git_push as gp
from homelab import safeyaml
from homelab.config import load_talconfig, load_tree
from homelab.problems import ConfigError, Problem
from tasks import flux
from tasks import git as gitrepo
from tasks.kube import KubeError

COMPLETED, FAILED, IGNORED = "completed", "failed", "ignored"


class GitPushFailed(FlowFailed):
    def __init__(self, message: str, result: dict[str, Any] | None = None):
        super().__init__(message, result or {"status": FAILED})


def _versions(repo: gitrepo.Repo, commit: str, tree_path: str, cluster: str) -> tuple[str, str] | None:
    """(talosVersion, kubernetesVersion) of the cluster's talconfig.yaml at a commit (talenv.yaml applied)."""
    if gitrepo.is_zero(commit):
        return None
    tal, env = gp.talconfig_paths(tree_path, cluster)
    text = _read_capped(repo, commit, tal)
    if text is None:
        return None
    with tempfile.TemporaryDirectory(prefix="homelab-talconfig-") as tmp:
        path = Path(tmp) / "talconfig.yaml"
        path.write_text(text)
        env_text = _read_capped(repo, commit, env)
        if env_text is not None:
            (Path(tmp) / "talenv.yaml").write_text(env_text)
        cfg = load_talconfig(path, f"{tal}@{commit[:12]}")
    return cfg.talos_version, cfg.kubernetes_version


def _read_capped(repo: gitrepo.Repo, commit: str, path: str) -> str | None:
    """A file of the pushed history, refused unread when larger than a tree file may be (a push can
    commit any size; `git show` would hold it whole in this process)."""
    size = repo.git("cat-file", "-s", f"{commit}:{path}", what=f"size of {path}", ok=(0, 128))
    if size.returncode != 0:
        return None
    if int(size.stdout.strip() or 0) > safeyaml.MAX_FILE_BYTES:
        raise ConfigError([Problem(f"{path}@{commit[:12]}", "(file)",
                                   safeyaml.too_large(int(size.stdout.strip()), safeyaml.MAX_FILE_BYTES))])
    return repo.read_at(commit, path)


def _kustomization_texts(root: Path, files: list[str]) -> dict[str, str]:
    """The kustomization files of the exported tree; one too large or not UTF-8 counts as unreadable
    (its whole directory is then treated as applied, see homelab.git_push.coverage)."""
    out = {}
    for f in files:
        p = Path(f)
        if p.name in gp.KUSTOMIZATION_FILES:
            try:
                text = safeyaml.read_text(root / f)
            except safeyaml.YamlRefused:
                text = "{unreadable"
            out[str(p.parent) if str(p.parent) != "." else ""] = text
    return out


def _start(start: gp.DeploymentStart) -> dict[str, Any]:
    """run_deployment without waiting; a deployment that is not there is reported, not fatal."""
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    row = {"deployment": start.deployment, "parameters": start.parameters, "reason": start.reason}
    try:
        # called from a sync flow: run_deployment returns the FlowRun, not a coroutine
        run = cast(FlowRun, run_deployment(start.deployment, parameters=start.parameters, timeout=0, as_subflow=False))
    except ObjectNotFound:
        return {**row, "outcome": "not started: deployment missing"}
    return {**row, "outcome": f"started flow run {run.id}", "flow_run_id": str(run.id)}


@flow(name="git-push", flow_run_name=run_name("git-push", where="repository", everywhere="unknown-repository"), task_runner=ThreadPoolTaskRunner(max_workers=MAX_PARALLEL),  # type: ignore[arg-type]  # Prefect 3.9 types the runner generically
      validate_parameters=True)
def git_push(
    repository: Annotated[str, Field(description="The pushed repository, owner/name.")],
    ref: Annotated[str, Field(description="The pushed ref, e.g. refs/heads/main.")],
    before: Annotated[str, Field(description="The ref's commit before the push (all zeros: the ref is new).")],
    after: Annotated[str, Field(description="The ref's commit after the push (all zeros: the ref was deleted).")],
    changed_paths: Annotated[list[str] | str | None, Field(
        description="Paths the sender says changed: shown beside git's own list when they differ, never "
                    "used (the paths come from the repository at `after`).")] = None,
    homelab: Annotated[str, Field(description="The Homelab block to act on.")] = "default",
    timeout_seconds: Annotated[float, Field(gt=0, description="Deadline of all reconciles of this push.")] = 600.0,
) -> dict[str, Any]:
    """Reconcile the Kustomizations a push touched (and their dependents); start upgrades (approval
    required) and provision plans when the cluster definitions changed."""
    logger = get_run_logger()
    deadline = time.monotonic() + timeout_seconds
    block = load_homelab(homelab)
    result: dict[str, Any] = {"status": IGNORED, "repository": repository, "ref": ref, "before": before,
                              "after": after, "changed_paths": [], "reconcile": {}, "deployments": [], "notes": []}
    notes: list[str] = result["notes"]
    reason = gp.ignore_reason(ref, block.git.branch, after)
    if reason:
        result["reason"] = reason
        create_markdown_artifact(f"## git push {repository} {ref}: ignored\n\n{reason}", key="git-push",
                                 description=f"git push {ref}: ignored")
        logger.info("ignored: %s", reason)
        return result
    refusal = gp.repository_refusal(repository, block.git.allowed_repositories())
    if refusal:
        # An event of another repository came past the receiver (or was posted to Prefect directly):
        # failing, not ignoring, makes it visible to the failure notifications.
        raise GitPushFailed(refusal, {**result, "status": FAILED, "error": refusal})
    after = gitrepo.check_sha(after, "after")
    before = before if gitrepo.is_zero(before) else gitrepo.check_sha(before, "before")
    tree_path = block.git.tree_path.strip("/")
    repo = gitrepo.Repo.from_url(block.git.url)
    # The changed paths and the tree come only from this clone of the allowed repository, at `after`:
    # never from the event, whose list a sender writes.
    try:
        repo.ensure_commits(*(s for s in (before, after) if not gitrepo.is_zero(s)))
        head = repo.branch_head(block.git.branch)
        if not repo.is_ancestor(after, head):
            reason = (f"{after[:12]} is not on {block.git.branch} (whose head is {head[:12]}): a force push since, "
                      f"or a commit of another branch; the push of {head[:12]} reconciles what Flux applies")
            result.update(status=IGNORED, reason=reason)
            create_markdown_artifact(f"## git push {repository} {ref}: ignored\n\n{reason}", key="git-push",
                                     description=f"git push {ref}: ignored")
            logger.info("ignored: %s", reason)
            return result
        changed = repo.changed_paths(before, after)
        if gitrepo.is_zero(before):
            notes.append(f"{ref} is new (before is all zeros): every file of {after[:12]} counts as changed")
        elif not repo.is_ancestor(before, after):
            notes.append(f"force push: {before[:12]} is not an ancestor of {after[:12]}; the two trees are compared")
    except gitrepo.UnknownCommit as e:
        raise GitPushFailed(str(e), {**result, "status": FAILED, "error": str(e)}) from None
    result["changed_paths"] = changed
    sender_paths = gp.parse_changed_paths(changed_paths)
    if sender_paths is not None and sorted(sender_paths) != sorted(changed):
        notes.append(f"the event listed {len(sender_paths)} changed path(s), git {len(changed)}: git's list is used")

    with tempfile.TemporaryDirectory(prefix="homelab-push-") as tmp:
        root = Path(tmp)
        repo.export(after, tree_path, root)
        all_files = repo.files_at(after, tree_path)
        try:
            tree = load_tree(root / tree_path if tree_path else root, tree_path or ".")
        except ConfigError as e:  # a tree too broken to map; the problem lines say where
            raise GitPushFailed(f"the tree at {after[:12]} does not load: {e}",
                                {**result, "status": FAILED, "error": str(e)}) from None
        if tree.problems:  # what does not load is left out of the mapping; the report says what and where
            shown = "; ".join(str(p) for p in tree.problems[:5])
            notes.append(f"{len(tree.problems)} problem(s) in the tree at {after[:12]} (`homelab validate` lists "
                         f"them): {shown}")
        plan = gp.map_paths({c: cl.flux for c, cl in tree.clusters.items()}, changed,
                            _kustomization_texts(root, all_files), all_files)

    for cluster in sorted(tree.clusters):
        tal, env = gp.talconfig_paths(tree_path, cluster)
        if tal in changed or env in changed:
            plan.deployments += gp.version_starts(cluster, _versions(repo, before, tree_path, cluster),
                                                  _versions(repo, after, tree_path, cluster), tal)
        cy = gp.cluster_yaml_path(tree_path, cluster)
        if cy in changed:
            plan.deployments.append(gp.provision_start(cluster, cy))
    started = [_start(d) for d in plan.deployments]
    result["deployments"] = started

    results: dict[str, list[dict[str, Any]]] = {}
    ok = True
    for cluster, why in sorted(plan.reconcile.items()):
        ftree = tree.clusters[cluster].flux
        try:
            with flux.kube_client(block, cluster) as kube:
                source_rows, rows = reconcile_selection(kube, ftree, set(why), True, deadline)
        except KubeError as e:
            source_rows, rows = [], [{"name": k[1], "namespace": k[0], "ready": False, "revision": None,
                                      "seconds": None, "status": NOT_STARTED,
                                      "message": f"cluster {cluster} unreachable: {e}"} for k in sorted(why)]
        for r in rows:
            r["reason"] = why.get((r["namespace"], r["name"]), "")
        results[cluster] = source_rows + rows
        ok = ok and all(r["ready"] for r in source_rows + rows)
    result["reconcile"] = results
    result["status"] = COMPLETED if ok else FAILED
    create_markdown_artifact(gp.markdown(repository, ref, before, after, plan, notes, started, results,
                                         result["status"]),
                             key="git-push", description=f"git push {ref} {after[:12]}: {result['status']}")
    if not ok:
        failures = [r["message"] for rows in results.values() for r in rows
                    if not r["ready"] and r.get("status") != NOT_STARTED] or ["a reconcile did not end Ready"]
        raise GitPushFailed("; ".join(failures), result)
    return result


__all__ = ["GitPushFailed", "git_push"]
