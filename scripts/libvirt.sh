#!/usr/bin/env bash
# Start virtlogd and libvirtd when they are not running (no systemd on these
# machines), then wait until qemu:///system answers. Quiet when already up.
#   scripts/libvirt.sh         start if needed
#   scripts/libvirt.sh stop    stop both (by pid file)
set -euo pipefail

uri=qemu:///system
pidfile_libvirtd=/run/libvirtd.pid
pidfile_virtlogd=/run/virtlogd.pid

running() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

if [[ "${1:-start}" == "stop" ]]; then
  for f in "$pidfile_libvirtd" "$pidfile_virtlogd"; do
    if running "$f"; then kill "$(cat "$f")"; fi
  done
  exit 0
fi

# Without udev, /dev/kvm stays root-only. libvirt's capability probe still sees
# KVM, then finds the device inaccessible to the qemu user, declares its cache
# outdated and re-probes QEMU on every connection (~4 s each). Giving the kvm
# group access, as Debian's udev rule does, keeps the cache valid (~20 ms).
# Guests still run under TCG (domain type='qemu'): KVM does not work here.
if [[ -c /dev/kvm ]] && getent group kvm >/dev/null; then
  chgrp kvm /dev/kvm && chmod 0660 /dev/kvm
fi

if ! running "$pidfile_virtlogd" && ! pgrep -x virtlogd >/dev/null; then
  virtlogd -d -p "$pidfile_virtlogd"
fi
if ! running "$pidfile_libvirtd" && ! pgrep -x libvirtd >/dev/null; then
  libvirtd -d -p "$pidfile_libvirtd"
fi
for _ in $(seq 1 100); do
  if virsh -q -c "$uri" version >/dev/null 2>&1; then exit 0; fi
  sleep 0.1
done
echo "libvirt.sh: libvirtd did not answer on $uri within 10 s" >&2
exit 1
