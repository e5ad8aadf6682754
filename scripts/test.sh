#!/usr/bin/env bash
# Set everything up, then run the whole test suite (real qemu-img, qemu-nbd, libnbd).
# Extra arguments go to pytest.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$here/scripts/bootstrap.sh"
cd "$here"
marker=$(mktemp)
rc=0
# Unbuffered: progress reaches a CI log at once, also when the run is cut off.
# --capture=sys: what C libraries write to stderr in the test process itself (a
# librbd assertion before an abort) reaches the log instead of a lost capture file.
PYTHONUNBUFFERED=1 "$here/.venv/bin/python" -m pytest -q --durations=15 -p no:cacheprovider \
  --capture=sys "$@" || rc=$?
# A test process that died (an abort) never ran its fixtures' teardown: stop the
# throwaway Ceph clusters this run started.
for dir in /var/tmp/snapback-ceph-*; do
  if [[ -e $dir/.snapback-ceph && $dir -nt $marker ]]; then
    "$here/scripts/ceph.sh" stop "$dir" || true
  fi
done
rm -f "$marker"
exit "$rc"
