#!/usr/bin/env bash
# Benchmarks fwd's Authorize path end to end (gRPC + SQLite + netlink) in a private network
# namespace, against the peers' way (one `nft` exec per grant) measured in the same run.
# Usage: bench/fwd.sh [--quick]    (run as root; never touches the host ruleset)
set -euo pipefail
cd "$(dirname "$0")/.."
QUICK=${1:-}
LAT_CALLS=5000; TP_TOTAL=200000; LIVE=1000000; NFT_CALLS=300
if [ "$QUICK" = "--quick" ]; then LAT_CALLS=500; TP_TOTAL=20000; LIVE=100000; NFT_CALLS=50; fi
# The bulk fill tops the grants up to LIVE in total (the nft-exec baseline's elements are not
# fwd's and are removed as strangers only below the dump limit, so they are not counted).
FILL=$(( LIVE - (LAT_CALLS + 100) - 4 * TP_TOTAL ))

[ "$(id -u)" = 0 ] || { echo "bench/fwd.sh must run as root (network namespaces, nftables)"; exit 1; }
cargo build --release -q -p fwd -p guard-bench -p guardctl
BIN=${CARGO_TARGET_DIR:-target}/release
NS="guard-bench-$$"
DIR=$(mktemp -d /tmp/guard-bench.XXXXXX)
FWD_PID=""
cleanup() {
  [ -n "$FWD_PID" ] && kill -9 "$FWD_PID" 2>/dev/null || true
  ip netns del "$NS" 2>/dev/null || true
  rm -rf "$DIR"
}
trap cleanup EXIT
ip netns add "$NS"
ip netns exec "$NS" ip link set lo up
cat > "$DIR/fwd.toml" <<TOML
socket = "$DIR/fwd.sock"
database = "$DIR/fwd.db"
[ttl]
min = "1h"
[limits]
max_batch = 1024
[access]
authorizer_uids = [0]
[expiry]
sweep_interval = "30s"
TOML

start_fwd() {
  : > "$DIR/fwd.log"
  local t0; t0=$(date +%s%N)
  ip netns exec "$NS" "$BIN/fwd" --config "$DIR/fwd.toml" --log-format json >"$DIR/fwd.log" 2>&1 &
  FWD_PID=$!
  for _ in $(seq 1 600); do
    grep -q '"fwd ready"' "$DIR/fwd.log" && break
    kill -0 "$FWD_PID" 2>/dev/null || { cat "$DIR/fwd.log"; exit 1; }
    sleep 0.05
  done
  grep -q '"fwd ready"' "$DIR/fwd.log" || { echo "fwd never became ready"; cat "$DIR/fwd.log"; exit 1; }
  READY_MS=$(( ($(date +%s%N) - t0) / 1000000 ))
}
rss_mb() { awk '/VmRSS/ {printf "%.1f", $2/1024}' "/proc/$FWD_PID/status"; }
fb() { ip netns exec "$NS" "$BIN/fwd-bench" --socket "$DIR/fwd.sock" "$@"; }

start_fwd
LAT=$(fb --seed 1 latency --calls "$LAT_CALLS")
TP1=$(fb --seed 2 throughput --callers 32 --total "$TP_TOTAL" --batch 1)
TP8=$(fb --seed 3 throughput --callers 32 --total "$TP_TOTAL" --batch 8)
# dnsd's way: each call is one AuthorizeMany of 16 requests (one per coalesced answer).
M1=$(fb --seed 6 throughput --callers 32 --total "$TP_TOTAL" --batch 1 --many 16)
M2=$(fb --seed 7 throughput --callers 32 --total "$TP_TOTAL" --batch 2 --many 16)
NFT=$(fb --seed 4 nft-exec --calls "$NFT_CALLS")
FILLR=$(fb --seed 5 throughput --callers 32 --total "$FILL" --batch 256)
# Counted through fwd: `nft list set` would pay the kernel's quadratic set dump at this size.
grants() { "$BIN/guardctl" --socket "$DIR/fwd.sock" --json status | python3 -c 'import json,sys; d=json.load(sys.stdin)["fwd"]; print(d["grants_v4"] + d["grants_v6"])'; }
GRANTS=$(grants)
RSS_FULL=$(rss_mb)
kill -9 "$FWD_PID"; wait "$FWD_PID" 2>/dev/null || true
start_fwd
RSS_RESTART=$(rss_mb)
RECONCILE=$(grep -o '"message":"reconciled[^"]*"' "$DIR/fwd.log" || true)
RECONCILE_TOOK=$(python3 - "$DIR/fwd.log" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    try: d = json.loads(line)
    except ValueError: continue
    r = d.get("fields", {}).get("report", "")
    if "took" in r:
        print(r.split("took: ")[1].rstrip(" }")); break
PY
)
AFTER=$(grants)
# Where the restart's reconcile spent its time (the engine logs each step's elapsed ms).
python3 - "$DIR/fwd.log" >&2 <<'PY'
import json, sys
for line in open(sys.argv[1]):
    try: d = json.loads(line)
    except ValueError: continue
    f = d.get("fields", {})
    if str(f.get("message", "")).startswith("reconcile:"):
        print("restart", f["message"], {k: v for k, v in f.items() if k != "message"})
PY

python3 - "$LAT" "$TP1" "$TP8" "$NFT" "$FILLR" "$M1" "$M2" "$GRANTS" "$RSS_FULL" "$RSS_RESTART" "$READY_MS" "$RECONCILE_TOOK" "$AFTER" <<'PY'
import json, sys, platform, os
lat, tp1, tp8, nft, fill, m1, m2 = (json.loads(a) for a in sys.argv[1:8])
grants, rss_full, rss_restart, ready_ms, took, after = sys.argv[8:14]
print("| measure | guard fwd | nft exec per grant (peers' way) | ratio |")
print("|---|---:|---:|---:|")
print(f"| Authorize, 1 new IP, p50 | {lat['p50_us']} µs | {nft['p50_us']} µs | {nft['p50_us']/max(lat['p50_us'],1):.0f}x faster |")
print(f"| Authorize, 1 new IP, p99 | {lat['p99_us']} µs | {nft['p99_us']} µs | {nft['p99_us']/max(lat['p99_us'],1):.0f}x faster |")
print(f"| new IPs/s, 32 callers, 1 IP per call | {tp1['ips_per_s']:,.0f} | {nft['ips_per_s']:,.0f} | {tp1['ips_per_s']/max(nft['ips_per_s'],1):.0f}x |")
print(f"| new IPs/s, 32 callers, 8 IPs per call | {tp8['ips_per_s']:,.0f} | | |")
print(f"| new IPs/s, 32 callers, AuthorizeMany 16 requests x 1 IP | {m1['ips_per_s']:,.0f} | | |")
print(f"| new IPs/s, 32 callers, AuthorizeMany 16 requests x 2 IPs | {m2['ips_per_s']:,.0f} | | |")
print(f"| new IPs/s, bulk fill, 256 IPs per call | {fill['ips_per_s']:,.0f} | | |")
print()
print(f"| live grants | fwd RSS full | kill -9, restart to READY | reconcile (inside that) | RSS after restart | grants after restart |")
print("|---:|---:|---:|---:|---:|---:|")
print(f"| {int(grants):,} | {rss_full} MB | {ready_ms} ms | {took} | {rss_restart} MB | {int(after):,} |")
print()
print(f"latency detail: {lat}")
print(f"machine: {platform.node()} {os.cpu_count()} cpus, kernel {platform.release()}, load average at end {os.getloadavg()}")
PY
