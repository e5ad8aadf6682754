#!/usr/bin/env bash
# The main job on embedded defaults: set everything up, then run snapback's tour.
# Extra arguments go to `snapback tour` (e.g. --format json, --keep).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$here/scripts/bootstrap.sh"
exec "$here/.venv/bin/snapback" tour "$@"   # --pool rbd: on a throwaway Ceph cluster
