#!/usr/bin/env bash
# Set up everything snapback needs on a Debian 12 machine (run as root).
# Idempotent: when everything is already in place it prints nothing.
#   - Debian packages (QEMU, libvirt, Ceph, libnbd and the Python bindings
#     that exist only for Debian's /usr/bin/python3)
#   - .venv made from /usr/bin/python3 with --system-site-packages
#   - the project installed (editable) with its pinned dependencies
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$here"

packages=(
  qemu-utils qemu-system-x86 qemu-block-extra
  libvirt-daemon-system libvirt-clients python3-libvirt
  ceph-mon ceph-osd ceph-common radosgw python3-rados python3-rbd
  python3-libnbd libnbd-bin
  syslinux mtools dosfstools
  python3-venv python3-pip
)

missing=()
for p in "${packages[@]}"; do
  status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
  [[ "$status" == "install ok installed" ]] || missing+=("$p")
done

if ((${#missing[@]})); then
  echo "bootstrap: installing Debian packages: ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  # No systemd on these machines: keep package scripts from starting daemons.
  printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
  chmod 755 /usr/sbin/policy-rc.d
  trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  log=$(mktemp)
  if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}"; } \
      >"$log" 2>&1; then
    cat "$log" >&2
    echo "bootstrap: apt-get failed" >&2
    exit 1
  fi
  rm -f "$log"
fi

venv="$here/.venv"
if [[ ! -x "$venv/bin/python" ]]; then
  echo "bootstrap: creating $venv" >&2
  /usr/bin/python3 -m venv --system-site-packages "$venv"
fi

stamp="$venv/.snapback-installed"
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
  echo "bootstrap: installing snapback into $venv" >&2
  log=$(mktemp)
  if ! "$venv/bin/python" -m pip install -q -e ".[dev]" >"$log" 2>&1; then
    cat "$log" >&2
    echo "bootstrap: pip install failed" >&2
    exit 1
  fi
  rm -f "$log"
  echo "$want" >"$stamp"
fi
# The package is installed editable, so nothing compiled src/; with
# PYTHONDONTWRITEBYTECODE set (as on these machines) every command would compile
# its ~60 modules again (about 60 ms a command). Stale files are recompiled.
"$venv/bin/python" -m compileall -q src >/dev/null
