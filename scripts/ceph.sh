#!/usr/bin/env bash
# A throwaway single-node Ceph cluster on 127.0.0.1 (one mon, one memstore OSD,
# optionally radosgw) with all its state in one folder. See docs/ceph.md.
#   scripts/ceph.sh start DIR [--rgw]   start (or find running) and print its env
#   scripts/ceph.sh stop DIR            stop the daemons and remove DIR
#   scripts/ceph.sh status DIR          exit 0 when the cluster in DIR answers
# --rgw on a cluster already running from DIR starts just the gateway.
# Every step is time-bounded. A failed start prints the tail of the relevant
# log, stops what it started and exits non-zero; DIR stays for its logs until
# `stop DIR`. SNAPBACK_CEPH_MEMSTORE_BYTES sets the OSD's RAM store (default 4 GiB).
set -euo pipefail

usage() {
  echo "usage: $0 start DIR [--rgw] | stop DIR | status DIR" >&2
  exit 2
}

(($# >= 2)) || usage
cmd=$1
dir=$2
shift 2
want_rgw=0
for a in "$@"; do
  case "$a" in
    --rgw) want_rgw=1 ;;
    *) usage ;;
  esac
done
[[ "$cmd" == start || "$cmd" == stop || "$cmd" == status ]] || usage
[[ "$dir" == /* ]] || dir="$PWD/$dir"
dir=${dir%/}
[[ -n "$dir" ]] || usage

conf="$dir/ceph.conf"
marker="$dir/.snapback-ceph"
run="$dir/run"
logs="$dir/log"
S3_ACCESS_KEY=snapbacktestaccess
S3_SECRET_KEY=snapbacktestsecret0000000000000000000000
unset CEPH_ARGS CEPH_CONF

pidfile() { echo "$run/$1.pid"; }

# PID $1 runs (a zombie does not count) and was started with our ceph.conf: a
# stale pid file must never make us signal an unrelated process.
ours() {
  local state
  state=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1) || return 1
  [[ -n "$state" && "$state" != Z ]] || return 1
  tr '\0' '\n' 2>/dev/null <"/proc/$1/cmdline" | grep -qxF -- "$conf"
}

pid_of() {
  local pid
  pid=$(cat "$(pidfile "$1")" 2>/dev/null) && [[ "$pid" =~ ^[0-9]+$ ]] && echo "$pid"
}

alive() {
  local pid
  pid=$(pid_of "$1") && ours "$pid"
}

# PIDs of processes started with our ceph.conf (daemons and clients): the net
# for anything a half-way start left without a pid file.
our_pids() {
  local f p
  grep -lsF -- "$conf" /proc/[0-9]*/cmdline | while read -r f; do
    p=${f#/proc/}
    p=${p%/cmdline}
    if [[ "$p" != "$$" ]] && ours "$p"; then echo "$p"; fi
  done || true
}

# SIGTERM, then SIGKILL when it is not gone within $2 s.
stop_pid() {
  local pid=$1 bound=$2 i
  ours "$pid" || return 0
  kill -TERM "$pid" 2>/dev/null || return 0
  for ((i = 0; i < bound * 20; i++)); do
    ours "$pid" || return 0
    sleep 0.05
  done
  kill -KILL "$pid" 2>/dev/null || true
  for ((i = 0; i < 100; i++)); do
    ours "$pid" || return 0
    sleep 0.05
  done
  echo "ceph.sh: pid $pid survived SIGKILL" >&2
  return 1
}

stop_daemon() {
  local pid
  if pid=$(pid_of "$1"); then stop_pid "$pid" "$2"; fi
  rm -f "$(pidfile "$1")"
}

# One at a time: gateway, OSD, mon. Each exits within ~0.3 s of SIGTERM here;
# the bounds are for the odd hang (the folder goes next, so SIGKILL loses
# nothing). Without its mon an OSD waits 5 s to report itself down: 1 s then.
stop_all() {
  local p osd_bound=5
  alive mon.a || osd_bound=1
  stop_daemon client.rgw.x 2
  stop_daemon osd.0 "$osd_bound"
  stop_daemon mon.a 5
  for p in $(our_pids); do stop_pid "$p" 5; done
}

mon_answers() {
  timeout -k 2 15 ceph -c "$conf" --connect-timeout 10 health >/dev/null 2>&1
}

cluster_up() {
  alive mon.a && alive osd.0 || return 1
  # Once the gateway was started it is part of "up".
  if [[ -f "$(pidfile client.rgw.x)" ]]; then alive client.rgw.x || return 1; fi
  mon_answers
}

rgw_port() { sed -n 's/^rgw_frontends = beast endpoint=127\.0\.0\.1:\([0-9]*\).*$/\1/p' "$conf"; }

write_env() {
  {
    echo "CEPH_CONF=$conf"
    echo "CEPH_MON_PORT=$(sed -n 's/^mon_host = v2:127\.0\.0\.1:\([0-9]*\)$/\1/p' "$conf")"
    if alive client.rgw.x; then
      echo "S3_ENDPOINT=http://127.0.0.1:$(rgw_port)"
      echo "S3_ACCESS_KEY=$S3_ACCESS_KEY"
      echo "S3_SECRET_KEY=$S3_SECRET_KEY"
    fi
  } >"$dir/env.tmp"
  mv "$dir/env.tmp" "$dir/env"
  cat "$dir/env"
}

# --- stop / status ---------------------------------------------------------

if [[ "$cmd" == stop ]]; then
  [[ -d "$dir" ]] || exit 0
  if [[ ! -e "$marker" ]] && [[ -n "$(ls -A "$dir")" ]]; then
    echo "ceph.sh: $dir is not a ceph.sh folder; not touching it" >&2
    exit 1
  fi
  stop_all
  rm -rf "$dir"
  exit 0
fi

if [[ "$cmd" == status ]]; then
  [[ -e "$marker" ]] || { echo "ceph.sh: no cluster in $dir" >&2; exit 1; }
  cluster_up || { echo "ceph.sh: cluster in $dir is not up" >&2; exit 1; }
  exit 0
fi

# --- start -----------------------------------------------------------------

mkdir -p "$dir"
# One start at a time per folder (daemons must not inherit this descriptor).
exec 9<"$dir"
flock -w 300 9 || { echo "ceph.sh: $dir is locked by another ceph.sh" >&2; exit 1; }

stage=""     # the daemon whose log explains a failure
cmdlog="$logs/cmd.out"
failing=1
rgw_only=0   # adding the gateway to a running cluster: a failure stops only it
on_exit() {
  local rc=$? f
  ((failing)) || return 0
  echo "ceph.sh: start failed${stage:+ at $stage} (exit $rc)" >&2
  for f in "$cmdlog" ${stage:+"$logs/$stage.out" "$logs/$stage.log"}; do
    if [[ -s "$f" ]]; then
      echo "--- tail of $f" >&2
      tail -n 25 "$f" >&2
    fi
  done
  if ((rgw_only)); then stop_daemon client.rgw.x 2 >&2 || true; else stop_all >&2 || true; fi
  exit "$rc"
}
fail() {
  echo "ceph.sh: $*" >&2
  exit 1
}

# A client command; its output stays in cmd.out for on_exit when it fails.
run_cmd() {
  local rc=0
  "$@" >"$cmdlog" 2>&1 || rc=$?
  if ((rc == 124)); then echo "timed out: $*" >>"$cmdlog"; fi
  ((rc == 0)) || return "$rc"
  : >"$cmdlog"
}

# A daemon in the foreground of its own session: we know its PID at once, and
# it outlives this script.
launch() {
  local name=$1
  shift
  setsid "$@" -f -c "$conf" </dev/null >>"$logs/$name.out" 2>&1 9<&- &
  echo $! >"$(pidfile "$name")"
}

# Cluster set-up through one librados client each (a `ceph` CLI call costs
# ~0.25 s). Fails at once when a daemon in $WATCH (name=pid ...) dies.
#   py_setup BOUND mon MON_PORT OSD_UUID   wait for the mon, register osd.0
#   py_setup BOUND pools                   wait for osd.0 up, create the pools,
#                                          round-trip an object through each
py_setup() {
  local bound=$1
  shift
  timeout -k 2 "$bound" /usr/bin/python3 - "$conf" "$@" <<'EOF'
import json, os, socket, sys, threading, time
import rados

conf, step, *args = sys.argv[1:]
watch = dict(w.split("=") for w in os.environ["WATCH"].split())  # name=pid

def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False

def watcher():
    while all(alive(p) for p in watch.values()):
        time.sleep(0.1)
    dead = [name for name, p in watch.items() if not alive(p)]
    print(f"{', '.join(dead)} exited", file=sys.stderr, flush=True)
    os._exit(1)

threading.Thread(target=watcher, daemon=True).start()

if step == "mon":
    # librados retries a refused connection only after ~3 s: wait for the port.
    while True:
        try:
            socket.create_connection(("127.0.0.1", int(args[0])), timeout=1).close()
            break
        except OSError:
            time.sleep(0.02)

r = rados.Rados(conffile=conf, conf={"rados_osd_op_timeout": "5", "rados_mon_op_timeout": "20"})
r.connect(timeout=20)

def cmd(**kw):
    ret, out, err = r.mon_command(json.dumps(kw), b"")
    if ret != 0:
        sys.exit(f"{kw}: error {ret}: {err}")
    return out

if step == "mon":
    cmd(prefix="osd new", uuid=args[1], id=0)
else:
    # Pools made before the OSD is up get their PGs ~5 s late (next mon tick).
    while json.loads(cmd(prefix="osd stat", format="json"))["num_up_osds"] < 1:
        time.sleep(0.05)
    for pool in ("rbd", "images"):
        cmd(prefix="osd pool create", pool=pool, pg_num=8, pgp_num=8)
        cmd(prefix="osd pool application enable", pool=pool, app="rbd")
    for pool in ("rbd", "images"):
        with r.open_ioctx(pool) as io:
            while True:
                try:
                    io.write_full("_probe", b"probe")
                    break
                except rados.TimedOut:
                    pass
            assert io.read("_probe") == b"probe", "probe object did not round-trip"
            io.remove_object("_probe")
r.shutdown()
EOF
}

rgw_answers() {
  /usr/bin/python3 - "$1" <<'EOF'
import sys, urllib.request
with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/", timeout=2) as r:
    sys.exit(0 if r.status == 200 else 1)
EOF
}

free_port() {
  /usr/bin/python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Where a daemon's admin socket, pid file and log go (ceph expands $name).
daemon_paths() {
  printf 'admin_socket = %s\npid_file = %s\nlog_file = %s\n' \
    "$run/\$name.asok" "$run/\$name.pid" "$logs/\$name.log"
}

start_rgw() {
  stage=client.rgw.x
  local port i
  port=$(free_port)
  # The gateway's section is the last one; replace it with this port.
  sed -i '/^\[client\.rgw\.x\]$/,$d' "$conf"
  cat >>"$conf" <<EOF
[client.rgw.x]
rgw_frontends = beast endpoint=127.0.0.1:$port tcp_nodelay=1
# its default "secure" mode needs cephx: with auth none it hangs for 300 s
ms_mon_client_mode = crc
rgw_thread_pool_size = 32
# the lifecycle thread makes SIGTERM take 4-5 s (once 95 s); no test needs it
rgw_enable_lc_threads = false
rgw_data = $dir/rgw
$(daemon_paths)
EOF
  mkdir -p "$dir/rgw"
  local admin=(timeout -k 2 30 radosgw-admin -c "$conf" --client-mount-timeout 10)
  if ! "${admin[@]}" user info --uid=test >/dev/null 2>&1; then
    run_cmd "${admin[@]}" user create --uid=test --display-name=test \
      --access-key="$S3_ACCESS_KEY" --secret-key="$S3_SECRET_KEY"
  fi
  launch client.rgw.x radosgw -n client.rgw.x
  for ((i = 0; i < 300; i++)); do   # ~0.2 s usually; 30 s at most
    alive client.rgw.x || fail "radosgw exited"
    if rgw_answers "$port" >"$cmdlog" 2>&1; then
      : >"$cmdlog"
      return 0
    fi
    sleep 0.1
  done
  fail "radosgw did not answer on port $port within 30 s"
}

if [[ -e "$marker" ]] && alive mon.a && alive osd.0 && mon_answers; then
  # Already running from this folder.
  if ((want_rgw)) && ! alive client.rgw.x; then
    rgw_only=1
    trap on_exit EXIT
    start_rgw
    failing=0
  fi
  write_env
  exit 0
fi

# Leftovers of a failed or killed cluster: clear them first.
if [[ -e "$marker" ]]; then
  stop_all
  find "$dir" -mindepth 1 -delete
elif [[ -n "$(ls -A "$dir")" ]]; then
  fail "$dir is not empty and not a ceph.sh folder"
fi

touch "$marker"
chmod 0755 "$dir"   # the qemu user may need to read ceph.conf
mkdir -p "$run" "$logs" "$dir/mon" "$dir/osd" "$dir/crash"
trap on_exit EXIT

fsid=$(cat /proc/sys/kernel/random/uuid)
osd_uuid=$(cat /proc/sys/kernel/random/uuid)
mon_port=$(free_port)

cat >"$conf" <<EOF
# Written by scripts/ceph.sh: a throwaway one-node cluster; see docs/ceph.md.
[global]
fsid = $fsid
mon_host = v2:127.0.0.1:$mon_port
public_network = 127.0.0.1/32
auth_cluster_required = none
auth_service_required = none
auth_client_required = none
run_dir = $run
mon_cluster_log_file = $logs/cluster.log
crash_dir = $dir/crash
mon_data = $dir/mon
osd_data = $dir/osd
osd_objectstore = memstore
memstore_device_bytes = ${SNAPBACK_CEPH_MEMSTORE_BYTES:-4294967296}
osd_pool_default_size = 1
osd_pool_default_min_size = 1
osd_pool_default_pg_num = 8
osd_pool_default_pgp_num = 8
mon_allow_pool_delete = true
mon_data_avail_crit = 0
mon_data_avail_warn = 1
mon_warn_on_pool_no_redundancy = false
mon_warn_on_insecure_global_id_reclaim_allowed = false
mon_mgr_mkfs_grace = 86400

# Daemons only: clients (ceph, rados, librbd in tests) would all fight over
# one client.admin socket and log file.
[mon]
$(daemon_paths)
paxos_propose_interval = 0.01
paxos_min_wait = 0.01

[osd]
$(daemon_paths)

EOF

stage=mon.a
run_cmd timeout 10 monmaptool --create --fsid "$fsid" --addv a "[v2:127.0.0.1:$mon_port]" \
  "$run/monmap"
run_cmd timeout 30 ceph-mon -c "$conf" --mkfs -i a --monmap "$run/monmap"
launch mon.a ceph-mon -i a
WATCH="mon.a=$(pid_of mon.a)" run_cmd py_setup 30 mon "$mon_port" "$osd_uuid"

stage=osd.0
run_cmd timeout 60 ceph-osd -c "$conf" -i 0 --mkfs --osd-uuid "$osd_uuid"
launch osd.0 ceph-osd -i 0
WATCH="mon.a=$(pid_of mon.a) osd.0=$(pid_of osd.0)" run_cmd py_setup 60 pools

((want_rgw)) && start_rgw

failing=0
write_env
