#!/usr/bin/env bash
# Installs the Debian packages the suite and the commands need beyond Python: the Ceph daemons of
# the real-Ceph tests and `--ceph real` (ceph-mon ceph-mgr ceph-osd; ceph-common comes with them),
# redis-server, which `homelab server` runs to keep concurrency leases across restarts, and postgresql,
# the database the PostgreSQL-backed server tests start on loopback (as the chart's server has one),
# and Prometheus and Alertmanager (prometheus prometheus-alertmanager), which the monitoring-gate tests
# and `--monitoring real` start on loopback with a configuration of their own.
# Idempotent and quiet: a no-op when they are present; as root it installs them; otherwise it says
# how to and exits 0, so a test command that runs it first goes on (the tests that need them then
# skip, or fail under CI=true).
set -euo pipefail

PKGS=(ceph-mon ceph-mgr ceph-osd redis-server postgresql prometheus prometheus-alertmanager)
missing=()
for exe in ceph-mon ceph-mgr ceph-osd ceph rados ceph-authtool monmaptool redis-server prometheus \
           prometheus-alertmanager; do
  command -v "$exe" >/dev/null 2>&1 || missing+=("$exe")
done
# Debian keeps PostgreSQL's server programs off PATH, in /usr/lib/postgresql/<major>/bin.
compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || command -v initdb >/dev/null 2>&1 || missing+=(initdb)
((${#missing[@]} == 0)) && exit 0

if [[ $(id -u) != 0 ]]; then
  echo "missing: ${missing[*]}; install them as root with:" >&2
  echo "  sudo $0   # or: sudo apt-get install --no-install-recommends ${PKGS[*]}" >&2
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "missing: ${missing[*]}; no apt-get here: install ${PKGS[*]} with this system's package manager" >&2
  exit 0
fi
echo "installing ${PKGS[*]} (missing: ${missing[*]})" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${PKGS[@]}" >/dev/null
