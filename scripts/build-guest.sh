#!/usr/bin/env bash
# Build a tiny Linux test guest (kernel + busybox initramfs) for libvirt/QEMU tests.
#
#   scripts/build-guest.sh [OUTDIR]        (default OUTDIR: /var/lib/snapback/guest)
#
# OUTDIR gets vmlinuz and initrd.gz (mode 644, folder 755) and a stamp; when the
# stamp matches this script, a second run does nothing and prints nothing.
# Set SNAPBACK_GUEST_FORCE=1 to rebuild anyway.
#
# How: `apt-get download` Debian 12's current linux-image-<ver>-amd64 (the package
# the linux-image-amd64 metapackage depends on; no kernel is installed, so no
# initramfs hooks run), busybox-static and qemu-guest-agent, unpack them with
# `dpkg-deb -x`, copy the kernel and the virtio modules (virtio_pci, virtio_blk,
# virtio_console and their dependencies, in dependency order, decompressed if
# .ko.xz/.ko.zst/.ko.gz) into an initramfs with busybox, the /init below, and
# usr/sbin/qemu-ga with the shared libraries `ldd` finds for it on this host
# (same Debian 12; a missing one is an error naming the packages to install)
# plus the dynamic loader at its own path (/lib64/ld-linux-x86-64.so.2).
#
# Boot: -kernel vmlinuz -initrd initrd.gz -append "console=ttyS0 quiet panic=-1"
# (libvirt: <kernel>, <initrd>, <cmdline>). Extra kernel command-line options:
#   snapback.workload=on|off   off: no disk writes, heartbeats only   (default on)
#   snapback.records=K         slots per disk, clamped to the disk size (default 256)
#   snapback.disks=vda,vdb     disks to write                   (default every /dev/vdX)
#   snapback.delay_ms=MS       pause after each record                 (default 0)
#   snapback.hb_ms=MS          heartbeat interval                    (default 100)
#   snapback.agent=on|off      off: no guest agent                     (default on)
#
# Console (ttyS0, lines end in \r\n):
#   SNAPBACK-GUEST kernel=<release> disks=<vda,...> ports=<virtio-serial names> records=<K>
#     workload=<on|off> agent=<on|off>
#   SNAPBACK-GUEST-AGENT on /dev/vportNpM   qemu-ga serves the guest agent channel
#   SNAPBACK-GUEST-READY             modules loaded, disks present, agent up (unless off/WARN)
#   START <disk> <first-seq> <K>     a writer starts on <disk>
#   REC <disk> <N>                   record N is on <disk> and fsynced (dd conv=fsync)
#   HB <n> <uptime-seconds>          heartbeat, from /proc/uptime
#   FSFREEZE                         every writer is paused between two records
#   FSTHAW                           writers may go on
#   SNAPBACK-GUEST-WARN <text>       something went wrong (insmod failed, no agent port, ...)
#
# Guest agent: with agent=on, /init starts `qemu-ga -m virtio-serial` (daemon;
# pid file, state and log in /run and /tmp) on the port named
# org.qemu.guest_agent.0 (libvirt's <channel type='unix'><target type='virtio'
# name='org.qemu.guest_agent.0'/>; found by its /sys/class/virtio-ports/vportNpM/name,
# as there is no udev for /dev/virtio-ports/ links) and waits (at most 5 s) until
# it holds the port open, before SNAPBACK-GUEST-READY; with no such port it warns
# and goes on. A channel nobody opens in the guest: libvirt says the agent is not
# connected. qemu-ga runs /etc/qemu/fsfreeze-hook around guest-fsfreeze-freeze/thaw:
#   freeze: create /tmp/freeze; each writer checks it before every record and
#           waits while it exists, after touching /tmp/paused.<disk> (so every
#           REC line is printed before); the hook waits (at most 5 s) for every
#           started writer's /tmp/paused.<disk>, then prints FSFREEZE. A writer
#           that does not pause in time: WARN, /tmp/freeze removed, hook exit 1
#           (the freeze fails; qemu-ga does not freeze).
#   thaw:   print FSTHAW, then remove /tmp/freeze.
# So no record is written between FSFREEZE and FSTHAW. The heartbeat does not
# check /tmp/freeze: HB lines go on while frozen. qemu-ga freezes no filesystem
# here (rootfs, tmpfs, proc, ... are skipped or do not support FIFREEZE): the
# hook is what quiesces the disks; `virsh domfsfreeze` says "Froze 0
# filesystem(s)" and guest-fsfreeze-status stays "thawed" while paused.
#
# Record format (tests/guestrecords.py reads it on the host):
#   - one record = 4096 bytes; record N lives in slot N % K, at byte offset
#     (N % K) * 4096 of the whole disk (no partition table); old records are
#     overwritten when the sequence wraps.
#   - bytes 0..4031 ("body"): the ASCII header line
#       SNAPREC1 disk=<name> seq=<N> slot=<N % K> slots=<K> boot=<8 hex>\n
#     then NUL bytes up to 4032 bytes. boot= is the start of the guest's
#     /proc/sys/kernel/random/boot_id (tells boots apart).
#   - bytes 4032..4095: sha256 of the body as 64 lowercase hex ASCII characters.
#   A record is intact when it starts with "SNAPREC1 " and its sha256 matches.
#   Sequence numbers start at 0 on a blank disk; on a disk that already holds
#   records the writer goes on from the highest seq found in its slots + 1, so
#   seqs stay increasing across guest reboots (e.g. after a snapshot revert).
set -euo pipefail
umask 022

out=${1:-/var/lib/snapback/guest}
self=$(readlink -f "${BASH_SOURCE[0]}")
stamp="$out/.build-guest.stamp"
want_stamp="build-guest $(sha256sum "$self" | cut -d' ' -f1)"

is_built() {
  [[ ${SNAPBACK_GUEST_FORCE:-0} != 1 && -f $out/vmlinuz && -f $out/initrd.gz && -f $stamp ]] &&
    [[ $(<"$stamp") == "$want_stamp" ]]
}
is_built && exit 0

die() { echo "build-guest: $*" >&2; exit 1; }

mkdir -p "$out"
chmod 755 "$out"
exec 9>"$out/.build-guest.lock"
flock 9
is_built && exit 0          # another run finished it while we waited

start=$SECONDS
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
log=$tmp/log
: >"$log"

# --- the kernel package name --------------------------------------------------
kernel_pkg() {
  apt-cache depends linux-image-amd64 2>>"$log" |
    awk '$1 == "Depends:" && $2 ~ /^linux-image-.*-amd64$/ { print $2; exit }'
}
apt_updated=0
apt_update() {
  ((apt_updated)) && return 0
  apt_updated=1
  apt-get update -qq >>"$log" 2>&1 || { cat "$log" >&2; die "apt-get update failed"; }
}
kpkg=$(kernel_pkg || true)
if [[ -z $kpkg ]]; then
  apt_update
  kpkg=$(kernel_pkg || true)
  [[ -n $kpkg ]] || { cat "$log" >&2; die "cannot resolve linux-image-amd64's kernel package"; }
fi
echo "build-guest: building the test guest in $out ($kpkg)" >&2

# --- download and unpack ------------------------------------------------------
mkdir "$tmp/debs" "$tmp/kernel" "$tmp/busybox" "$tmp/qga" "$tmp/root"
download() {
  (cd "$tmp/debs" &&
    apt-get download -qq -o APT::Sandbox::User=root "$kpkg" busybox-static qemu-guest-agent) \
    >>"$log" 2>&1
}
if ! download; then
  apt_update
  download || { cat "$log" >&2; die "apt-get download failed"; }
fi
dpkg-deb -x "$tmp"/debs/"$kpkg"_*.deb "$tmp/kernel"
dpkg-deb -x "$tmp"/debs/busybox-static_*.deb "$tmp/busybox"
dpkg-deb -x "$tmp"/debs/qemu-guest-agent_*.deb "$tmp/qga"
# qemu-guest-agent's dependencies, without versions: named when a library is missing
qga_deps=$(dpkg-deb -f "$tmp"/debs/qemu-guest-agent_*.deb Depends |
  tr ',|' '\n\n' | sed 's/(.*)//; s/:any//' | awk 'NF { print $1 }' | sort -u | tr '\n' ' ')
rm -rf "$tmp/debs"

bb=$tmp/busybox/bin/busybox
[[ -x $bb ]] || die "busybox-static has no bin/busybox"
kvers=("$tmp"/kernel/lib/modules/*)
((${#kvers[@]} == 1)) || die "expected one kernel version in $kpkg, found ${#kvers[@]}"
moddir=${kvers[0]}
kver=${moddir##*/}
vmlinuz=$tmp/kernel/boot/vmlinuz-$kver
[[ -f $vmlinuz ]] || die "no boot/vmlinuz-$kver in $kpkg"

# --- modules, in dependency order --------------------------------------------
declare -A modpath=() seen=()
while IFS= read -r f; do
  name=${f##*/}
  name=${name%%.ko*}
  modpath[${name//-/_}]=$f
done < <(find "$moddir/kernel" -name '*.ko' -o -name '*.ko.xz' -o -name '*.ko.zst' -o -name '*.ko.gz')

mkdir -p "$tmp/root/lib/modules"
order=()
add_module() {
  local m=${1//-/_} f dst deps dep
  [[ -n ${seen[$m]:-} ]] && return 0
  seen[$m]=1
  f=${modpath[$m]:-}
  if [[ -z $f ]]; then
    # built into this kernel: nothing to load
    grep -Eq "/${m//_/[-_]}\.ko$" "$moddir/modules.builtin" 2>/dev/null && return 0
    die "module $m not found in $kpkg"
  fi
  dst=$tmp/root/lib/modules/$m.ko
  case $f in
    *.ko) cp "$f" "$dst" ;;
    *.ko.xz) command -v xz >/dev/null || die "need xz (apt-get install xz-utils)"; xz -dc "$f" >"$dst" ;;
    *.ko.zst) command -v zstd >/dev/null || die "need zstd (apt-get install zstd)"; zstd -qdc "$f" >"$dst" ;;
    *.ko.gz) gzip -dc "$f" >"$dst" ;;
  esac
  # depends= from the module's .modinfo section (busybox insmod does not resolve deps)
  deps=$(tr '\0' '\n' <"$dst" | sed -n 's/^depends=//p')
  deps=${deps%%$'\n'*}
  for dep in ${deps//,/ }; do add_module "$dep"; done
  order+=("$m")
}
for m in virtio_pci virtio_blk virtio_console; do add_module "$m"; done
printf '%s\n' "${order[@]}" >"$tmp/root/lib/modules/order"

# --- busybox and the initramfs tree ------------------------------------------
r=$tmp/root
mkdir -p "$r"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,run,etc}
cp "$bb" "$r/bin/busybox"
while IFS= read -r applet; do
  [[ $applet == */* && $applet != bin/busybox && ! -e $r/$applet ]] || continue
  ln -s /bin/busybox "$r/$applet"
done < <("$bb" --list-full)
echo "$kver" >"$r/etc/snapback-guest-kernel"

# --- qemu-ga, its shared libraries and the dynamic loader ---------------------
qga=$tmp/qga/usr/sbin/qemu-ga
[[ -x $qga ]] || die "qemu-guest-agent has no usr/sbin/qemu-ga"
cp "$qga" "$r/usr/sbin/qemu-ga"
# ldd on this host (same Debian 12): "soname => /path (addr)", "/loader (addr)",
# "linux-vdso.so.1 (addr)" (in the kernel), "soname => not found"
libs=$(ldd "$qga" 2>&1) || true
missing=$(awk '$2 == "=>" && $3 == "not" { print $1 }' <<<"$libs")
[[ -z $missing ]] || die "qemu-ga needs $(echo $missing), missing on this host" \
  "(apt-get install ${qga_deps% })"
# the libraries go to /lib/x86_64-linux-gnu, a built-in search path of Debian's
# loader (the initramfs has no /etc/ld.so.cache)
mkdir -p "$r/lib/x86_64-linux-gnu"
loader=
while read -r name arrow path _; do
  if [[ $arrow == "=>" && $path == /* ]]; then
    cp -L "$path" "$r/lib/x86_64-linux-gnu/$name"
  elif [[ $name == /* && $arrow == "("* ]]; then
    loader=$name
    mkdir -p "$r${loader%/*}"
    cp -L "$loader" "$r$loader"
  fi
done <<<"$libs"
[[ -n $loader ]] || die "ldd usr/sbin/qemu-ga names no dynamic loader: $libs"
chmod 755 "$r/usr/sbin/qemu-ga" "$r$loader"
mkdir -p "$r/etc/qemu"
cat >"$r/etc/qemu/fsfreeze-hook" <<'HOOK'
#!/bin/sh
# qemu-ga's fsfreeze hook in the snapback test guest (see scripts/build-guest.sh).
#   freeze: ask every disk writer to pause between two records (/tmp/freeze),
#           wait (at most 5 s) until each started one (/tmp/writer.<disk>) says
#           so (/tmp/paused.<disk>), print FSFREEZE
#   thaw:   print FSTHAW, then let the writers go on
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
hook() {
  con=$(cat /run/snapback-console 2>/dev/null) || con=
  [ -n "$con" ] || con=/dev/console
  exec </dev/null >"$con" 2>&1
  case $1 in
    freeze)
      : >/tmp/freeze
      i=0
      while :; do
        waiting=
        for w in /tmp/writer.*; do
          [ -e "$w" ] || continue
          d=${w#/tmp/writer.}
          [ -e "/tmp/paused.$d" ] || waiting="$waiting $d"
        done
        [ -z "$waiting" ] && break
        if [ $i -ge 100 ]; then
          rm -f /tmp/freeze
          echo "SNAPBACK-GUEST-WARN fsfreeze: not paused within 5 s:$waiting"
          return 1
        fi
        usleep 50000
        i=$((i + 1))
      done
      echo FSFREEZE
      ;;
    thaw)
      echo FSTHAW
      rm -f /tmp/freeze
      ;;
    *)
      echo "SNAPBACK-GUEST-WARN fsfreeze-hook: unknown argument '$1'"
      return 2
      ;;
  esac
}
# qemu-ga runs the hook in a new session (setsid). A session leader that opens
# a tty nobody controls for reading makes it its controlling tty, and when it
# exits the kernel hangs that tty up: the console goes dead for everyone (seen
# with `1<>/dev/ttyS0`; a write-only open is safe). So the work runs in a
# subshell, a child that is no session leader, whatever it opens.
(hook "$@")
exit $?
HOOK
chmod 755 "$r/etc/qemu/fsfreeze-hook"

cat >"$r/init" <<'INIT'
#!/bin/sh
# /init of the snapback test guest; see scripts/build-guest.sh for the console
# lines and the record format.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
if [ -c /dev/ttyS0 ] && (: >/dev/ttyS0) 2>/dev/null; then con=/dev/ttyS0; else con=/dev/console; fi
exec </dev/null >"$con" 2>&1
echo "$con" >/run/snapback-console  # for /etc/qemu/fsfreeze-hook

num() { case $1 in '' | *[!0-9]*) echo "$2" ;; *) echo "$1" ;; esac; }
records=256 workload=on disks= delay_ms=0 hb_ms=100 agent=on
for w in $(cat /proc/cmdline); do
  case $w in
    snapback.records=*) records=$(num "${w#*=}" 256) ;;
    snapback.workload=*) workload=${w#*=} ;;
    snapback.disks=*) disks=$(echo "${w#*=}" | tr , ' ') ;;
    snapback.delay_ms=*) delay_ms=$(num "${w#*=}" 0) ;;
    snapback.hb_ms=*) hb_ms=$(num "${w#*=}" 100) ;;
    snapback.agent=*) agent=${w#*=} ;;
  esac
done
[ "$agent" = off ] || agent=on

while read -r m; do
  insmod "/lib/modules/$m.ko" 2>/dev/null || echo "SNAPBACK-GUEST-WARN insmod $m failed"
done </lib/modules/order

# wait (at most 5 s) until every virtio block device has its /sys/block/vdX
want=0
for d in /sys/bus/virtio/devices/*; do
  [ "$(cat "$d/device" 2>/dev/null)" = 0x0002 ] && want=$((want + 1))
done
i=0
while [ "$(ls -d /sys/block/vd* 2>/dev/null | wc -l)" -lt "$want" ] && [ $i -lt 50 ]; do
  usleep 100000
  i=$((i + 1))
done
[ -z "$disks" ] && for d in /sys/block/vd*; do [ -e "$d" ] && disks="$disks ${d##*/}"; done
disks=$(echo $disks)

# the guest agent's virtio-serial port: no udev, so no /dev/virtio-ports/<name>
# links; find the vportNpM whose name it is (the name shows up once the host has
# sent it: wait at most 3 s when there is a virtio console device at all)
agent_port=
if [ "$agent" = on ]; then
  serial=0
  for d in /sys/bus/virtio/devices/*; do
    [ "$(cat "$d/device" 2>/dev/null)" = 0x0003 ] && serial=1
  done
  i=0
  while :; do
    for p in /sys/class/virtio-ports/vport*; do
      [ "$(cat "$p/name" 2>/dev/null)" = org.qemu.guest_agent.0 ] && agent_port=/dev/${p##*/}
    done
    if [ -n "$agent_port" ] || [ $serial = 0 ] || [ $i -ge 30 ]; then break; fi
    usleep 100000
    i=$((i + 1))
  done
fi

read -r boot </proc/sys/kernel/random/boot_id
boot=$(echo "$boot" | tr -d - | cut -c1-8)
ports=
for p in /sys/class/virtio-ports/*/name; do [ -f "$p" ] && ports="$ports,$(cat "$p")"; done
echo  # the firmware's last line may lack its line end
echo "SNAPBACK-GUEST kernel=$(uname -r) disks=$(echo $disks | tr ' ' ,) ports=${ports#,} records=$records workload=$workload agent=$agent"

# qemu-ga -d returns at once: wait (at most 5 s) until the daemon holds the port
start_agent() {
  [ -n "$agent_port" ] || { echo "SNAPBACK-GUEST-WARN agent: no virtio-serial port org.qemu.guest_agent.0"; return; }
  [ -c "$agent_port" ] || { echo "SNAPBACK-GUEST-WARN agent: no $agent_port"; return; }
  if ! qemu-ga -m virtio-serial -p "$agent_port" -d -f /run/qga.pid -t /run -l /tmp/qga.log \
    -F/etc/qemu/fsfreeze-hook; then
    echo "SNAPBACK-GUEST-WARN agent: qemu-ga failed: $(tail -n 1 /tmp/qga.log 2>/dev/null)"
    return
  fi
  i=0
  while [ $i -lt 50 ]; do
    pid=$(cat /run/qga.pid 2>/dev/null)
    if [ -n "$pid" ]; then
      for f in /proc/$pid/fd/*; do
        [ "$(readlink "$f" 2>/dev/null)" = "$agent_port" ] && { echo "SNAPBACK-GUEST-AGENT on $agent_port"; return; }
      done
      [ -d "/proc/$pid" ] || break
    fi
    usleep 100000
    i=$((i + 1))
  done
  echo "SNAPBACK-GUEST-WARN agent: qemu-ga does not serve $agent_port: $(tail -n 1 /tmp/qga.log 2>/dev/null)"
}
[ "$agent" = on ] && start_agent
echo "SNAPBACK-GUEST-READY"

heartbeat() {
  n=0
  while :; do
    read -r up _ </proc/uptime
    echo "HB $n $up"
    n=$((n + 1))
    usleep $((hb_ms * 1000))
  done
}

writer() {
  d=$1
  [ -b "/dev/$d" ] || { echo "SNAPBACK-GUEST-WARN no /dev/$d"; return; }
  k=$(($(cat "/sys/block/$d/size") / 8))
  [ "$k" -gt "$records" ] && k=$records
  [ "$k" -ge 1 ] || { echo "SNAPBACK-GUEST-WARN /dev/$d too small"; return; }
  last=$(dd if="/dev/$d" bs=4096 count="$k" 2>/dev/null | strings -n 9 |
    sed -n 's/.*SNAPREC1 disk=[^ ]* seq=\([0-9][0-9]*\) .*/\1/p' | sort -n | tail -n 1)
  seq=$((${last:--1} + 1))
  echo "START $d $seq $k"
  : >"/tmp/writer.$d"  # the fsfreeze hook waits for every started writer
  body=/tmp/rec.$d.body rec=/tmp/rec.$d
  while :; do
    # fsfreeze: between two records (the last REC line is out), say so with
    # /tmp/paused.<disk> and wait while /tmp/freeze exists; check again after
    # removing it, as a new freeze may have come meanwhile
    while [ -e /tmp/freeze ]; do
      : >"/tmp/paused.$d"
      while [ -e /tmp/freeze ]; do usleep 20000; done
      rm -f "/tmp/paused.$d"
    done
    slot=$((seq % k))
    hdr="SNAPREC1 disk=$d seq=$seq slot=$slot slots=$k boot=$boot"
    { echo "$hdr"; head -c $((4031 - ${#hdr})) /dev/zero; } >"$body"
    sum=$(sha256sum <"$body")
    { cat "$body"; printf %s "${sum%% *}"; } >"$rec"
    if dd if="$rec" of="/dev/$d" bs=4096 seek="$slot" count=1 conv=fsync,notrunc 2>/dev/null; then
      echo "REC $d $seq"
    else
      echo "SNAPBACK-GUEST-WARN write $d $seq failed"
      sleep 1
    fi
    seq=$((seq + 1))
    [ "$delay_ms" -gt 0 ] && usleep $((delay_ms * 1000))
  done
}

heartbeat &
if [ "$workload" != off ]; then
  for d in $disks; do writer "$d" & done
fi
while :; do wait; sleep 3600; done
INIT
chmod 755 "$r/init"

(cd "$r" && find . | "$bb" cpio -o -H newc -R 0:0 2>/dev/null | gzip -9n) >"$tmp/initrd.gz"

# --- install ------------------------------------------------------------------
install -m 644 "$vmlinuz" "$out/.vmlinuz.new"
install -m 644 "$tmp/initrd.gz" "$out/.initrd.gz.new"
mv -f "$out/.vmlinuz.new" "$out/vmlinuz"
mv -f "$out/.initrd.gz.new" "$out/initrd.gz"
echo "$want_stamp" >"$stamp"
chmod 644 "$stamp" "$out/.build-guest.lock"
echo "build-guest: done in $((SECONDS - start)) s; modules: ${order[*]}" >&2
