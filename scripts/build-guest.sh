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
# initramfs hooks run) and busybox-static, unpack them with `dpkg-deb -x`, copy
# the kernel and the virtio modules (virtio_pci, virtio_blk, virtio_console and
# their dependencies, in dependency order, decompressed if .ko.xz/.ko.zst/.ko.gz)
# into an initramfs with busybox and the /init below.
#
# Boot: -kernel vmlinuz -initrd initrd.gz -append "console=ttyS0 quiet panic=-1"
# (libvirt: <kernel>, <initrd>, <cmdline>). Extra kernel command-line options:
#   snapback.workload=on|off   off: no disk writes, heartbeats only   (default on)
#   snapback.records=K         slots per disk, clamped to the disk size (default 256)
#   snapback.disks=vda,vdb     disks to write                   (default every /dev/vdX)
#   snapback.delay_ms=MS       pause after each record                 (default 0)
#   snapback.hb_ms=MS          heartbeat interval                    (default 100)
#
# Console (ttyS0, lines end in \r\n):
#   SNAPBACK-GUEST kernel=<release> disks=<vda,...> ports=<virtio-serial names> records=<K>
#     workload=<on|off>
#   SNAPBACK-GUEST-READY             modules loaded, disks present
#   START <disk> <first-seq> <K>     a writer starts on <disk>
#   REC <disk> <N>                   record N is on <disk> and fsynced (dd conv=fsync)
#   HB <n> <uptime-seconds>          heartbeat, from /proc/uptime
#   SNAPBACK-GUEST-WARN <text>       something went wrong (insmod failed, ...)
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
mkdir "$tmp/debs" "$tmp/kernel" "$tmp/busybox" "$tmp/root"
download() {
  (cd "$tmp/debs" && apt-get download -qq -o APT::Sandbox::User=root "$kpkg" busybox-static) \
    >>"$log" 2>&1
}
if ! download; then
  apt_update
  download || { cat "$log" >&2; die "apt-get download failed"; }
fi
dpkg-deb -x "$tmp"/debs/"$kpkg"_*.deb "$tmp/kernel"
dpkg-deb -x "$tmp"/debs/busybox-static_*.deb "$tmp/busybox"
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

num() { case $1 in '' | *[!0-9]*) echo "$2" ;; *) echo "$1" ;; esac; }
records=256 workload=on disks= delay_ms=0 hb_ms=100
for w in $(cat /proc/cmdline); do
  case $w in
    snapback.records=*) records=$(num "${w#*=}" 256) ;;
    snapback.workload=*) workload=${w#*=} ;;
    snapback.disks=*) disks=$(echo "${w#*=}" | tr , ' ') ;;
    snapback.delay_ms=*) delay_ms=$(num "${w#*=}" 0) ;;
    snapback.hb_ms=*) hb_ms=$(num "${w#*=}" 100) ;;
  esac
done

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

read -r boot </proc/sys/kernel/random/boot_id
boot=$(echo "$boot" | tr -d - | cut -c1-8)
ports=
for p in /sys/class/virtio-ports/*/name; do [ -f "$p" ] && ports="$ports,$(cat "$p")"; done
echo  # the firmware's last line may lack its line end
echo "SNAPBACK-GUEST kernel=$(uname -r) disks=$(echo $disks | tr ' ' ,) ports=${ports#,} records=$records workload=$workload"
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
  body=/tmp/rec.$d.body rec=/tmp/rec.$d
  while :; do
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
