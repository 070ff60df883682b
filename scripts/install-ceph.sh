#!/bin/sh
# Installs the Ceph daemons the real-Ceph tests need (Debian: ceph-mon ceph-mgr ceph-osd),
# when running as root and they are missing. A no-op when they are there.
set -eu
if command -v ceph-mon >/dev/null 2>&1 && command -v ceph-mgr >/dev/null 2>&1 && command -v ceph-osd >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "install-ceph: the Ceph daemons are missing; as root run: apt-get install --no-install-recommends ceph-mon ceph-mgr ceph-osd" >&2
  echo "install-ceph: without them the real-Ceph tests skip (and fail under CI=true)" >&2
  exit 0
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends ceph-mon ceph-mgr ceph-osd >/dev/null
