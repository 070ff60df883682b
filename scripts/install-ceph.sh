#!/usr/bin/env bash
# Installs the Ceph daemons the real-Ceph tests and `--ceph real` need (Debian packages
# ceph-mon ceph-mgr ceph-osd; ceph-common comes with them). Idempotent and quiet: a no-op when
# they are present; as root it installs them; otherwise it says how to and exits 0, so a test
# command that runs it first goes on (the real-Ceph tests then skip, or fail under CI=true).
set -euo pipefail

PKGS=(ceph-mon ceph-mgr ceph-osd)
missing=()
for exe in ceph-mon ceph-mgr ceph-osd ceph rados ceph-authtool monmaptool; do
  command -v "$exe" >/dev/null 2>&1 || missing+=("$exe")
done
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
