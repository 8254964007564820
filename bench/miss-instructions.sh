#!/usr/bin/env bash
# Counts the user-space instructions dnsd spends per UDP cache miss (or hit: WORKLOAD=hit),
# under valgrind's callgrind, for two dnsd binaries in one run, and prints the ratio.
# Instruction counts do not move with other load on the machine, so a change of a few percent
# shows, where qps on this shared 2-core box moves by 10-15 % between identical runs
# (bench/dnsd.sh measures the qps).
#
# Usage: bench/miss-instructions.sh [BASE_DNSD [NEW_DNSD]]   (run as root: network namespace)
#   BASE_DNSD defaults to target/release/dnsd; with no NEW_DNSD only BASE is counted.
# What runs (127.0.0.1 inside a private namespace, nothing else touched):
#   nsd on 5300 answering *.w.bench.test A 192.0.2.1 (RRL off); dnsd on 5322 under callgrind
#   (threads = 1, upstream udp://nsd, no authorization: never_authorize = everything, cache of
#   2,000 entries so that every insert also evicts, as under a long miss run). dnsperf sends
#   WARM warm-up misses, the counters are zeroed, then N unique names (each a miss) at QPS
#   queries per second, one query per wake-up; the counters are dumped after the last answer.
#   WORKLOAD=hit counts cache hits instead: the warm-up asks 1,000 names once, and the measured
#   N queries ask the same names over and over (every one a hit, answered without a task).
#   AUTH=1 runs fwd (local mode, its ruleset in the namespace) and lets dnsd authorize: every
#   answer names 192.0.2.1, which the warm-up grants, so a measured miss is released from
#   dnsd's memory of fwd's grants, as in bench/dnsd.sh's "miss" row (fwd is not counted).
# Knobs (env): N (10000) QPS (400) WARM (3000) OUT (keep the callgrind files in this directory)
#   WORKLOAD (miss | hit) AUTH (0 | 1) FWD (fwd binary for AUTH=1: BASE's directory's fwd)
# Needs: valgrind, nsd, dnsperf, dig, python3.
set -euo pipefail
cd "$(dirname "$0")/.."
BASE=${1:-${CARGO_TARGET_DIR:-target}/release/dnsd}
NEW=${2:-}
N=${N:-10000}; QPS=${QPS:-400}; WARM=${WARM:-3000}; WORKLOAD=${WORKLOAD:-miss}; AUTH=${AUTH:-0}
FWD=${FWD:-$(dirname "$BASE")/fwd}
case $WORKLOAD in
  miss) ;;
  hit)
    WARM=1000   # the hit names (WARM is not a knob here)
    # Every measured query must find its name cached: the zone's TTL is 300 s.
    python3 -c "import sys; sys.exit(0 if int(sys.argv[1]) / int(sys.argv[2]) <= 250 else 1)" "$N" "$QPS" ||
      { echo "WORKLOAD=hit needs N/QPS <= 250 s (the answers' TTL is 300 s)" >&2; exit 2; }
    ;;
  *) echo "WORKLOAD must be miss or hit" >&2; exit 2 ;;
esac
[ "$(id -u)" = 0 ] || { echo "bench/miss-instructions.sh must run as root (network namespace)" >&2; exit 1; }
for c in valgrind callgrind_control nsd dnsperf dig python3; do
  command -v "$c" >/dev/null || { echo "missing $c (apt-get install valgrind nsd dnsperf bind9-dnsutils python3)" >&2; exit 1; }
done
[ "$AUTH" = 0 ] || [ "$AUTH" = 1 ] || { echo "AUTH must be 0 or 1" >&2; exit 2; }
for b in "$BASE" ${NEW:+"$NEW"} $([ "$AUTH" = 0 ] || echo "$FWD"); do [ -x "$b" ] || { echo "no executable at $b" >&2; exit 1; }; done

NS="guard-miss-ir-$$"
W=$(mktemp -d /tmp/guard-miss-ir.XXXXXX)
PIDS=()
cleanup() {
  local p
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do while kill -0 "$p" 2>/dev/null; do sleep 0.1; done; done
  ip netns del "$NS" 2>/dev/null || true
  rm -rf "$W"
}
trap cleanup EXIT
ip netns add "$NS"
ip netns exec "$NS" ip link set lo up

python3 - "$W" "$N" "$WARM" <<'PY'
import sys
w, n, warm = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
open(f"{w}/zone", "w").write("$ORIGIN bench.test.\n$TTL 300\n@ SOA ns hostmaster 1 3600 600 86400 300\n"
                             "@ NS ns\nns A 127.0.0.1\nready A 127.0.0.2\n*.w A 192.0.2.1\n")
open(f"{w}/warm", "w").write("".join(f"warm{i}.w.bench.test A\n" for i in range(warm)))
PY
cat >"$W/nsd.conf" <<EOF
server:
  ip-address: 127.0.0.1@5300
  server-count: 1
  username: ""
  chroot: ""
  zonesdir: $W
  database: ""
  zonelistfile: $W/zonelist
  xfrdfile: $W/xfrd
  xfrdir: $W
  pidfile: $W/nsd.pid
  logfile: $W/nsd.log
  rrl-ratelimit: 0
  verbosity: 0
remote-control:
  control-enable: no
zone:
  name: bench.test
  zonefile: zone
EOF
cat >"$W/dnsd.toml" <<EOF
threads = 1
[listen]
udp = ["127.0.0.1:5322"]
[upstream]
servers = ["udp://127.0.0.1:5300"]
timeout = "5s"
[cache]
size = 2000
[authorize]
socket = "$W/fwd.sock"
$([ "$AUTH" = 1 ] || echo 'never_authorize = ["0.0.0.0/0", "::/0"]')
[control]
socket = "$W/dnsd.sock"
EOF
ip netns exec "$NS" nsd -d -c "$W/nsd.conf" &
PIDS+=($!)
if [ "$AUTH" = 1 ]; then
  cat >"$W/fwd.toml" <<EOF
mode = "local"
socket = "$W/fwd.sock"
database = "$W/fwd.db"
[ttl]
# the grant outlives the run, so every measured answer is released from dnsd's memory
min = "1h"
[access]
authorizer_uids = [0]
[allow]
cidrs = ["127.0.0.0/8"]
EOF
  "$FWD" --validate --config "$W/fwd.toml" >/dev/null
  ip netns exec "$NS" env RUST_LOG=info "$FWD" --config "$W/fwd.toml" >"$W/fwd.log" 2>&1 &
  PIDS+=($!)
  # fwd logs "fwd ready" once its ruleset is loaded and its socket listens
  for i in $(seq 300); do
    grep -q "fwd ready" "$W/fwd.log" && break
    kill -0 "${PIDS[-1]}" 2>/dev/null || { echo "fwd exited: $(tail -3 "$W/fwd.log")" >&2; exit 1; }
    sleep 0.1
  done
  grep -q "fwd ready" "$W/fwd.log" || { echo "fwd not ready after 30 s: $(tail -3 "$W/fwd.log")" >&2; exit 1; }
fi

# no_loss DNSPERF_OUTPUT WHAT: exits unless dnsperf lost no query.
no_loss() {
  grep -q "Queries lost:         0 " "$1" || { echo "$2: queries lost: $(grep 'Queries lost' "$1")" >&2; exit 1; }
}

# count BINARY TAG: sets IR to the instructions per query. It runs in this shell, not in $(...),
# so that the PID it records reaches the cleanup.
count() {
  local bin=$1 tag=$2 pid i out
  "$bin" --validate --config "$W/dnsd.toml" >/dev/null
  if [ "$WORKLOAD" = hit ]; then
    python3 -c "import sys; names = open(sys.argv[1]).read().splitlines(); print(''.join(names[i % len(names)] + '\n' for i in range(int(sys.argv[2]))), end='')" \
      "$W/warm" "$N" >"$W/q"
  else
    python3 -c "import sys; print(''.join(f'{sys.argv[1]}u{i}.w.bench.test A\n' for i in range(int(sys.argv[2]))), end='')" \
      "$tag" "$N" >"$W/q"
  fi
  ip netns exec "$NS" valgrind --tool=callgrind --callgrind-out-file="$W/cg-$tag.%p" \
    "$bin" --config "$W/dnsd.toml" >"$W/dnsd-$tag.log" 2>&1 &
  pid=$!
  PIDS+=("$pid")
  for i in $(seq 300); do
    ip netns exec "$NS" dig +time=1 +tries=1 @127.0.0.1 -p 5322 ready.bench.test A 2>/dev/null | grep -q NOERROR && break
    kill -0 "$pid" 2>/dev/null || { echo "dnsd ($tag) exited: $(tail -3 "$W/dnsd-$tag.log")" >&2; exit 1; }
    sleep 0.2
  done
  ip netns exec "$NS" dnsperf -s 127.0.0.1 -p 5322 -d "$W/warm" -n 1 -Q "$QPS" -t 5 >"$W/warm-$tag.txt" 2>&1
  # A warm-up query lost would leave its name uncached, and a hit run would count a miss.
  no_loss "$W/warm-$tag.txt" "$tag: warm-up"
  callgrind_control -z "$pid" >/dev/null 2>&1
  ip netns exec "$NS" dnsperf -s 127.0.0.1 -p 5322 -d "$W/q" -n 1 -Q "$QPS" -t 5 >"$W/perf-$tag.txt"
  callgrind_control -d "$pid" >/dev/null 2>&1
  kill "$pid"
  while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
  no_loss "$W/perf-$tag.txt" "$tag"
  # The first dump file after the zeroing is the measured one (the exit writes another).
  out=$(ls "$W"/cg-"$tag".*.1 2>/dev/null || ls -tr "$W"/cg-"$tag".* | head -1)
  if [ -n "${OUT:-}" ]; then mkdir -p "$OUT" && cp "$out" "$OUT/callgrind-$tag.out"; fi
  IR=$(awk -v n="$N" '/^(summary|totals):/ {printf "%.0f\n", $2 / n; exit}' "$out")
}

echo "instructions per UDP cache $WORKLOAD$([ "$AUTH" = 1 ] && echo ', authorized from memory') (user space, callgrind; $N queries at $QPS qps; machine: $(nproc) CPUs, $(uname -r))"
count "$BASE" base
b=$IR
echo "base $BASE: $b"
if [ -n "$NEW" ]; then
  count "$NEW" new
  n=$IR
  echo "new  $NEW: $n"
  python3 -c "import sys; b, n = map(int, sys.argv[1:]); print(f'new/base: {n / b:.3f}')" "$b" "$n"
fi
