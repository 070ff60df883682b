"""Which Talos can be installed over which, and which Kubernetes each Talos runs: Talos's own tables.

Transcribed from siderolabs/talos v1.11.5 pkg/machinery/compatibility/talos1*/talos1*.go (MinimumHostUpgradeVersion,
MaximumHostDowngradeVersion, MinimumKubernetesVersion, MaximumKubernetesVersion) and applied as
compatibility/talos_version.go TalosVersion.UpgradeableFrom and kubernetes_version.go SupportedWith apply them.
The installer runs UpgradeableFrom as its pre-flight check (cmd/installer/pkg/install/preflight.go) — that is,
after Talos has already cordoned the node and stopped its services; the new Talos checks its Kubernetes version
when it validates the machine config at boot. So both are checked here, at plan time, before anything changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import semver

from homelab.versions import parse_version


@dataclass(frozen=True)
class TalosMinor:
    min_host: tuple[int, int, int]  # the oldest Talos this minor's installer accepts
    max_downgrade: tuple[int, int, int]  # exclusive: a host at or above it cannot go down to this minor
    k8s_min: tuple[int, int, int]
    k8s_max: tuple[int, int, int]  # exclusive, written as "1.34.99": every 1.34 patch is below it


TALOS_COMPAT: dict[tuple[int, int], TalosMinor] = {
    (1, 2): TalosMinor((1, 0, 0), (1, 3, 0), (1, 23, 0), (1, 25, 99)),
    (1, 3): TalosMinor((1, 0, 0), (1, 5, 0), (1, 24, 0), (1, 26, 99)),
    (1, 4): TalosMinor((1, 0, 0), (1, 6, 0), (1, 25, 0), (1, 27, 99)),
    (1, 5): TalosMinor((1, 2, 0), (1, 7, 0), (1, 26, 0), (1, 28, 99)),
    (1, 6): TalosMinor((1, 3, 0), (1, 8, 0), (1, 24, 0), (1, 29, 99)),
    (1, 7): TalosMinor((1, 4, 0), (1, 9, 0), (1, 25, 0), (1, 30, 99)),
    (1, 8): TalosMinor((1, 5, 0), (1, 10, 0), (1, 26, 0), (1, 31, 99)),
    (1, 9): TalosMinor((1, 8, 0), (1, 11, 0), (1, 27, 0), (1, 32, 99)),
    (1, 10): TalosMinor((1, 8, 0), (1, 12, 0), (1, 28, 0), (1, 33, 99)),
    (1, 11): TalosMinor((1, 9, 0), (1, 13, 0), (1, 29, 0), (1, 34, 99)),
    (1, 12): TalosMinor((1, 10, 0), (1, 14, 0), (1, 30, 0), (1, 35, 99)),
}


def _core(v: semver.Version) -> tuple[int, int, int]:
    return (v.major, v.minor, v.patch)


def _known() -> str:
    low, high = min(TALOS_COMPAT), max(TALOS_COMPAT)
    return f"v{low[0]}.{low[1]}–v{high[0]}.{high[1]}"


def upgrade_refusal(host: str, target: str) -> str | None:
    """Why the target Talos's installer would refuse this host (UpgradeableFrom's words), or None."""
    h, t = parse_version(host), parse_version(target)
    row = TALOS_COMPAT.get((t.major, t.minor))
    if row is None:
        return f"upgrades to Talos v{t} are not supported (the compatibility table knows {_known()})"
    if _core(h) < row.min_host:
        return (f"host version {h} is too old to upgrade to Talos {t}: its installer accepts hosts from "
                f"v{'.'.join(map(str, row.min_host))} on; upgrade to that first")
    if _core(h) >= row.max_downgrade:
        return f"host version {h} is too new to downgrade to Talos {t}"
    return None


def kubernetes_refusal(kubernetes: str, talos: str) -> str | None:
    """Why this Kubernetes cannot run on this Talos (SupportedWith's words), or None."""
    k, t = parse_version(kubernetes), parse_version(talos)
    row = TALOS_COMPAT.get((t.major, t.minor))
    if row is None:
        return f"compatibility with Talos v{t} is not known (the table knows {_known()})"
    if _core(k) < row.k8s_min:
        return f"version of Kubernetes {k} is too old to be used with Talos {t}"
    if _core(k) >= row.k8s_max:
        return f"version of Kubernetes {k} is too new to be used with Talos {t}"
    return None


def kubernetes_range(talos: str) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """(lowest, highest) Kubernetes minor this Talos runs."""
    t = parse_version(talos)
    row = TALOS_COMPAT.get((t.major, t.minor))
    return None if row is None else (row.k8s_min[:2], row.k8s_max[:2])
