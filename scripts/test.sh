#!/usr/bin/env bash
# Set everything up, then run the whole test suite (real qemu-img, qemu-nbd, libnbd).
# Extra arguments go to pytest.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$here/scripts/bootstrap.sh"
cd "$here"
# Unbuffered: progress reaches a CI log at once, also when the run is cut off.
PYTHONUNBUFFERED=1 exec "$here/.venv/bin/python" -m pytest -q --durations=15 -p no:cacheprovider "$@"
