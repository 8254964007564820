#!/usr/bin/env bash
# Benchmarks dnsd end to end (dnsperf -> dnsd -> nsd, with the real fwd authorizing every A/AAAA
# answer) against unbound, dnsdist, kresd and stubby measured in the same run, in a private
# network namespace (ip netns, loopback only; the host ruleset is never touched).
#
# Usage: bench/dnsd.sh [--quick]      (run as root; --quick is a smoke run of about 2 minutes,
#                                      the full run takes about 15-20 minutes, build included)
#        bench/dnsd.sh --report DIR   (re-render the report of a previous run from DIR/runs.csv)
#
# What runs (all on 127.0.0.1 inside the namespace):
#   5300 / 8530  nsd 4.6 backend (plain / DNS over TLS), zone bench.test.: 100,000 names, each with
#                an A in 198.18.0.0/15 (RFC 2544 benchmarking range) and an AAAA in 2001:db8::/32,
#                all distinct, so that every first sight of a name makes fwd add a new set element;
#                and, as in peers.sh, the wildcard *.w.bench.test A 192.0.2.1 (unique names, one
#                address). RRL off (nsd's default rate limit would drop the benchmark's answers).
#   5309         nsd "direct" on the measured core (the load generator's ceiling)
#   5320 / 5321  dnsd, upstream udp://nsd:5300 / tls://nsd:8530 (CA verified), fwd's socket for
#                authorization; fwd (local mode, ttl.min 1h) runs on the same core as dnsd.
#   5322 / 5323  the same dnsd without authorization (never_authorize = 0.0.0.0/0, ::/0): what the
#                forwarder itself costs, fwd never called
#   5301 / 5311  unbound (forwarder, plain / forward-tls-upstream)
#   5302 / 5312  dnsdist (packet cache / backend with tls="openssl")
#   5304 / 5314  kresd (policy.FORWARD / policy.TLS_FORWARD)
#   5318         stubby (DoT only, it has no cache)
# Workloads (dnsperf, UDP from dnsperf to the system under test):
#   hit   1,000 names (A) repeated, cache warmed by one pass first: CPU per query, qps.
#   miss  peers.sh's miss workload: unique names u<N>.w.bench.test A (never repeated in a run), all
#         answered by the wildcard with the same address; each run starts cold (system restarted;
#         for dnsd fwd also restarted empty, so the first answer is a first-sight authorization of
#         192.0.2.1 and every later one asks fwd about an address it already holds). This is
#         the forwarder's own cost, comparable with the peers' figures.
#   first 200,000 distinct queries (100k names x A/AAAA, shuffled), every answer a *different*
#         address: each is a first-sight authorization (fwd: SQLite + netlink commit). dnsd only;
#         this measures the authorization path (fwd), not the forwarder.
#   dot   = miss, with the upstream reached over DNS over TLS. "TCP connects" counts every TCP
#         connection opened in the namespace from the system's start through the saturation run
#         (= TLS handshakes to nsd:8530).
#   Each workload: a saturation run (dnsperf -c 4 -q 100, at most DUR s; miss/first/dot: one pass
#   over the file at most) for qps and CPU, and a fixed-rate run (-Q LAT_QPS, LAT_DUR s, -v) for
#   p50/p99 latency (from the per-query latencies dnsperf -v prints, as peers.sh does).
#   The miss and dot workloads restart their system for every run; the hit workload restarts
#   and re-warms it for every rep. The systems take turns rep by rep (rep 1 of each, then rep 2
#   of each, ...), so that the box's drift over the minutes a workload takes falls on every
#   system alike (its bursts of millisecond stalls set everyone's p99); first sights (dnsd
#   only) run variant by variant.
#   First-sight authorization cost ("first" names, fixed rates LAT_QPS and LOW_QPS = 1000, the
#   latter far from saturation so that queueing does not hide the per-query cost):
#     dnsd          every answer names a new address (fwd: SQLite + netlink commit)
#     dnsd-granted  the same names after a first pass (dnsd restarted: cold cache, but fwd already
#                   holds every address; fwd ttl.margin 10m so no grant is due for extension)
#     dnsd-extend   the same with fwd ttl.margin 2s, run > 1 s after the grants: every sight is an
#                   extension (as it is 15 s = ttl.margin/2 after a grant with the default margin)
#     dnsd-noauth   authorize.never_authorize = 0.0.0.0/0, ::/0: fwd is never called
# fwd's ruleset stays loaded in the namespace for the whole run (conntrack on loopback), so every
#   system, peers included, pays the same netfilter cost.
# Pinning (2-core box): the system under test (and fwd) on SUT_CPU (1), dnsperf and the nsd
#   backend on GEN_CPU (0); dnsd runs one tokio worker; the peers are configured single-threaded.
# Noise: the box is shared (other people build and test on it). Every process the benchmark starts
#   runs at nice NICE (-15), and the session's autogroup gets the same nice for the duration (with
#   sched_autogroup, nice alone only ranks processes within one session). Before every run the
#   script records the 1-minute load (and waits at most QUIET_WAIT s for a quiet box); after the
#   run it computes "foreign" CPU (busy time not spent by our processes) and the measured
#   process's run-queue wait (/proc/PID/task/*/schedstat: how much other load actually delayed
#   it). Runs with more than FOREIGN_MAX % of a core foreign can be redone (RETRIES > 1) until
#   the run has lasted BUDGET s. CPU per query comes from /proc/PID/stat (utime+stime) deltas,
#   which foreign load disturbs much less than qps. Tables show medians of REPS runs.
# Output: a markdown report on stdout and in $OUT/report.md, raw rows in $OUT/runs.csv, dnsperf
#   outputs of the last run of each kind in $OUT/last-*.txt, guardctl status in $OUT/dnsd-status.txt,
#   the daemons' logs in $OUT/logs/.
# Knobs (env): REPS DUR LAT_DUR LAT_QPS LOW_QPS SUT_CPU GEN_CPU NICE QUIET_MAX QUIET_WAIT
#   FOREIGN_MAX RETRIES BUDGET DNSPERF_OPTS ("-c 4 -q 100 -t 2") OUT (/tmp/guard-dnsd-bench-results)
#   BUILD_PROFILE (dist: the shipped build, fat LTO; release builds faster) SKIP_BUILD=1 (use the
#   BUILD_PROFILE binaries as they are; CARGO_TARGET_DIR is honoured, default ./target) ONLY="dnsd unbound ..." (restrict the systems)
#   WORKLOADS="hit miss first dot" (restrict the workloads; e.g. WORKLOADS=hit REPS=8 for many
#   turns of the hit systems alone)
#   PROFILE=1 (perf record, DWARF call graphs, of dnsd (and fwd) during the first saturation run
#   of each dnsd variant and workload; $OUT/perf-SYSTEM-WORKLOAD.txt and .data; PROFILE_KIND=lat or
#   low profiles that fixed-rate run instead, PROFILE_HZ sets the sampling rate, default 499)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
QUICK=0
LAT_QPS=${LAT_QPS:-5000}
LOW_QPS=${LOW_QPS:-1000}   # a second fixed rate for the first-sight cost, far from saturation

# ---------------------------------------------------------------- report
# report DIR: the markdown report from DIR/runs.csv (medians), on stdout and in DIR/report.md
report() {
python3 - "$1" "$(cat "$1/cmdline" 2>/dev/null || echo bench/dnsd.sh)" "$LAT_QPS" "$LOW_QPS" <<'PY' | tee "$1/report.md"
import csv, sys, statistics as st
out, cmdline, lat_qps, low_qps = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
rows = list(csv.DictReader(open(f"{out}/runs.csv")))
env = open(f"{out}/env.txt").read().strip().splitlines()
skipped = [l.strip().split(",")[:2] for l in open(f"{out}/skipped.csv") if l.strip()]

def sel(sys_, wl, kind):
    rs = [r for r in rows if r["system"] == sys_ and r["workload"] == wl and r["kind"] == kind]
    good = [r for r in rs if r["ok"] == "1"]
    # the last attempt of each rep (a flagged one only when no clean attempt exists)
    byrep = {}
    for r in rs:
        cur = byrep.get(r["rep"])
        if cur is None or (r["ok"] == "1" and cur["ok"] != "1"):
            byrep[r["rep"]] = r
    return list(byrep.values()), len(rs), len(good)

def med(rs, k):
    v = [float(r[k]) for r in rs if r.get(k) not in ("", None)]
    return st.median(v) if v else None

def f(v, fmt="{:,.0f}"):
    return "-" if v is None else fmt.format(v)

SYSTEMS = {
    "hit": ["nsd-direct", "dnsd", "unbound", "dnsdist", "kresd"],
    "miss": ["dnsd", "dnsd-noauth", "unbound", "dnsdist", "kresd"],
    "first": ["dnsd"],
    "dot": ["dnsd-dot", "dnsd-dot-noauth", "unbound-dot", "dnsdist-dot", "kresd-dot", "stubby-dot"],
}
DNSD = {"hit": "dnsd", "miss": "dnsd", "first": "dnsd", "dot": "dnsd-dot"}
L = []
L.append("| workload | system | qps, 1 core (dnsd/peer) | CPU µs/query (dnsd/peer) | fwd µs/query | p50 / p99 ms @ %d qps | lost | TCP connects | load1 | foreign CPU %% | run-queue wait %% (sat / lat) |" % lat_qps)
L.append("|---|---|---:|---:|---:|---|---:|---:|---|---:|---|")
summary = {}
for wl, systems in SYSTEMS.items():
    d_sat, _, _ = sel(DNSD[wl], wl, "sat")
    d_qps, d_us = med(d_sat, "qps"), med(d_sat, "us_per_q")
    for s in systems:
        sat, n_s, g_s = sel(s, wl, "sat"); lat, n_l, g_l = sel(s, wl, "lat")
        if not sat and not lat:
            continue
        qps, us, fus = med(sat, "qps"), med(sat, "us_per_q"), med(sat, "fwd_us_per_q")
        p50, p99 = med(lat, "p50_ms"), med(lat, "p99_ms")
        summary[(s, wl)] = dict(qps=qps, us=us, fus=fus, p50=p50, p99=p99, opens=med(sat, "tcp_opens"),
                                lat_qps=med(lat, "qps"))
        ratio_q = f" ({d_qps / qps:.2f})" if s != DNSD[wl] and qps and d_qps else ""
        ratio_u = f" ({d_us / us:.2f})" if s != DNSD[wl] and us and d_us else ""
        sent = sum(int(r["completed"] or 0) + int(r["lost"] or 0) for r in sat + lat)
        lost = sum(int(r["lost"] or 0) for r in sat + lat)
        loads = [float(r["load1"]) for r in sat + lat if r["load1"]]
        sat_note = ""
        lq = med(lat, "qps")
        if lq is not None and lq < 0.95 * lat_qps:
            sat_note = " (saturated)"
        fus_s = f(fus, "{:.1f}") if s in ("dnsd", "dnsd-dot") else ""
        L.append(f"| {wl} | {s} | {f(qps)}{ratio_q} | {f(us, '{:.1f}')}{ratio_u} | {fus_s} | "
                 f"{f(p50, '{:.3f}')} / {f(p99, '{:.3f}')}{sat_note} | {100 * lost / max(sent, 1):.2f}% | "
                 f"{f(med(sat, 'tcp_opens')) if wl == 'dot' else ''} | "
                 f"{f(min(loads), '{:.1f}') if loads else '-'}–{f(max(loads), '{:.1f}') if loads else '-'} | "
                 f"{f(med(sat + lat, 'foreign_pct'))} | {f(med(sat, 'runq_wait_pct'), '{:.1f}')} / {f(med(lat, 'runq_wait_pct'), '{:.1f}')} |")

# first-sight authorization (fixed rates, "first" names: a new address each)
A = []
base = {}
for s in ["dnsd", "dnsd-granted", "dnsd-extend", "dnsd-noauth"]:
    lat, n, g = sel(s, "first", "lat"); low, n2, g2 = sel(s, "first", "low")
    if lat or low:
        base[s] = dict(p50=med(lat, "p50_ms"), p99=med(lat, "p99_ms"), lp50=med(low, "p50_ms"), lp99=med(low, "p99_ms"),
                       us=med(lat or low, "us_per_q"), fus=med(lat or low, "fwd_us_per_q"), runs=f"{g + g2}/{n + n2}")
def added(s, ref, k):
    a, b = base.get(s, {}).get(k), base.get(ref, {}).get(k)
    return None if a is None or b is None or s == ref else (a - b) * 1000
if base:
    A.append(f"| dnsd cache miss | p50 / p99 ms @ {lat_qps:.0f} qps | p50 / p99 ms @ {low_qps:.0f} qps | p50 added vs already granted @ {lat_qps:.0f} / {low_qps:.0f} | p50 added vs no authorization @ {lat_qps:.0f} / {low_qps:.0f} | dnsd + fwd CPU µs/query (@ {lat_qps:.0f}, else @ {low_qps:.0f}) | clean runs |")
    A.append("|---|---:|---:|---:|---:|---:|---|")
    desc = {"dnsd": "new address each (first sight)", "dnsd-granted": "addresses already granted (kernel unchanged)",
            "dnsd-extend": "addresses granted > ttl.margin/2 ago (fwd extends)", "dnsd-noauth": "no authorization (never_authorize = all)"}
    us_ = lambda v: "" if v is None else f"{v:+.0f} µs"
    for s, b in base.items():
        A.append(f"| {desc[s]} | {f(b['p50'], '{:.3f}')} / {f(b['p99'], '{:.3f}')} | {f(b['lp50'], '{:.3f}')} / {f(b['lp99'], '{:.3f}')} | "
                 f"{us_(added(s, 'dnsd-granted', 'p50'))} / {us_(added(s, 'dnsd-granted', 'lp50'))} | "
                 f"{us_(added(s, 'dnsd-noauth', 'p50'))} / {us_(added(s, 'dnsd-noauth', 'lp50'))} | "
                 f"{f(b['us'], '{:.0f}')} + {f(b['fus'], '{:.0f}')} | {b['runs']} |")

# targets
T = ["| target | dnsd | peer | ratio | met |", "|---|---:|---:|---:|---|"]
def tgt(name, dv, pv, fmt, better):
    if dv is None or pv is None:
        T.append(f"| {name} | {f(dv, fmt)} | {f(pv, fmt)} | - | not measured |"); return
    ok = dv <= pv if better == "low" else dv >= pv
    T.append(f"| {name} | {f(dv, fmt)} | {f(pv, fmt)} | {dv / pv:.2f} | {'yes' if ok else '**no**'} |")
g = lambda s, wl, k: summary.get((s, wl), {}).get(k)
tgt("cache hit CPU µs/query ≤ unbound's", g("dnsd", "hit", "us"), g("unbound", "hit", "us"), "{:.1f}", "low")
tgt("cache miss qps over UDP ≥ dnsdist's", g("dnsd", "miss", "qps"), g("dnsdist", "miss", "qps"), "{:,.0f}", "high")
tgt("cache miss qps over UDP without authorization ≥ dnsdist's", g("dnsd-noauth", "miss", "qps"), g("dnsdist", "miss", "qps"), "{:,.0f}", "high")
tgt("cache miss qps over DoT ≥ kresd's", g("dnsd-dot", "dot", "qps"), g("kresd-dot", "dot", "qps"), "{:,.0f}", "high")
tgt("cache miss qps over DoT without authorization ≥ kresd's", g("dnsd-dot-noauth", "dot", "qps"), g("kresd-dot", "dot", "qps"), "{:,.0f}", "high")
for wl, peers in (("hit", ["unbound", "dnsdist", "kresd"]), ("miss", ["unbound", "dnsdist", "kresd"]),
                  ("dot", ["unbound-dot", "dnsdist-dot", "kresd-dot", "stubby-dot"])):
    pv = [(g(p, wl, "p99"), p) for p in peers if g(p, wl, "p99") is not None]
    best = min(pv) if pv else (None, "-")
    tgt(f"p99 at {lat_qps:.0f} qps, {wl} ≤ best peer's ({best[1]})", g(DNSD[wl], wl, "p99"), best[0], "{:.3f} ms", "low")
for ref, what in (("dnsd-granted", "vs the same names already granted"), ("dnsd-noauth", "vs no authorization")):
    for k, rate in (("p50", lat_qps), ("lp50", low_qps)):
        a = added("dnsd", ref, k)
        if a is not None:
            T.append(f"| first-sight authorization adds ≤ 250 µs at p50 ({rate:.0f} qps; {what}) | {a:+.0f} µs | | | {'yes' if a <= 250 else '**no**'} |")
opens = g('dnsd-dot', 'dot', 'opens')
T.append(f"| a handful of TLS handshakes: connections opened to nsd:8530, from start through a DoT saturation run | {f(opens)} | kresd {f(g('kresd-dot', 'dot', 'opens'))} | | {'not measured' if opens is None else 'yes' if opens <= 5 else '**no**'} |")

print(f"Command: `{cmdline}` (as root)  ")
print("Machine: " + "; ".join(l for l in env if not l.startswith(("dnsd:", "nsd ", "unbound ", "dnsdist ", "knot", "stubby ", "dnsperf "))) + "  ")
print("Versions: " + "; ".join(l for l in env if l.startswith(("dnsd:", "nsd ", "unbound ", "dnsdist ", "knot", "stubby ", "dnsperf "))))
if skipped:
    print("\nSkipped (not installed): " + ", ".join(f"{s} ({w})" for s, w in skipped))
print("\n### Targets\n")
print("\n".join(T))
print("\n### All systems (medians)\n")
print("\n".join(L))
if A:
    print("\n### First-sight authorization cost\n")
    print("\n".join(A))
print("\nqps: saturation run (dnsperf -c 4 -q 100, one pass at most), system pinned to one core; ratios in parentheses are dnsd/peer. "
      "CPU µs/query: the system's own utime+stime per completed query (dnsd: dnsd only; fwd's share in its own column). "
      "p50/p99: fixed-rate run with dnsperf -v. TCP connects: TCP connections opened in the namespace from the system's start through its DoT saturation run (each one a TLS handshake to nsd:8530). "
      "foreign CPU: busy time on the two CPUs not spent by the measured processes, nsd or dnsperf (other people's builds), in % of one CPU. "
      "Run-queue wait: time the measured process's threads were runnable but waited for the CPU (/proc/PID/task/*/schedstat), in % of the run: "
      "how much other load actually delayed it (for dnsd this includes waiting for fwd, which shares its core).")
PY
}

case "${1:-}" in
  --quick) QUICK=1 ;;
  --report) [ -f "${2:-}/runs.csv" ] || { echo "usage: $0 --report DIR (a previous run's OUT)" >&2; exit 2; }; report "$2"; exit 0 ;;
  "") ;;
  *) sed -n '2,9p' "$0"; exit 2 ;;
esac
if [ "$QUICK" = 1 ]; then
  REPS=${REPS:-1}; DUR=${DUR:-2}; LAT_DUR=${LAT_DUR:-2}; QUIET_WAIT=${QUIET_WAIT:-0}; RETRIES=${RETRIES:-1}; BUDGET=${BUDGET:-60}
else
  REPS=${REPS:-3}; DUR=${DUR:-8}; LAT_DUR=${LAT_DUR:-6}; QUIET_WAIT=${QUIET_WAIT:-0}; RETRIES=${RETRIES:-1}; BUDGET=${BUDGET:-900}
fi
SUT_CPU=${SUT_CPU:-1}
GEN_CPU=${GEN_CPU:-0}
QUIET_MAX=${QUIET_MAX:-20}
# Everything the benchmark runs gets this nice value (and so does the session's autogroup): on a
# box shared with builds, the measured processes then get the CPU when they want it (the builds
# only lose what the benchmark uses).
NICE=${NICE:--15}
FOREIGN_MAX=${FOREIGN_MAX:-15}
read -r -a PERF_OPTS <<<"${DNSPERF_OPTS:--c 4 -q 100 -t 2}"   # dnsperf load options (peers.sh: -c 4 -q 100)
OUT=${OUT:-/tmp/guard-dnsd-bench-results}
ONLY=${ONLY:-}
WORKLOADS=${WORKLOADS:-hit miss first dot}
for w in $WORKLOADS; do
  case $w in hit|miss|first|dot) ;; *) echo "WORKLOADS: unknown workload '$w' (hit, miss, first, dot)" >&2; exit 64 ;; esac
done
CMDLINE="bench/dnsd.sh${1:+ $1}"

[ "$(id -u)" = 0 ] || { echo "bench/dnsd.sh must run as root (network namespaces, nftables)" >&2; exit 1; }
[ "$(nproc)" -ge 2 ] || { echo "needs 2 CPUs (SUT on one, load generator on the other)" >&2; exit 1; }
for c in nsd dnsperf dig openssl python3 taskset ip /usr/bin/time; do
  command -v "$c" >/dev/null || { echo "missing $c (apt-get install nsd dnsperf bind9-dnsutils openssl python3 util-linux iproute2 time; peers: unbound dnsdist knot-resolver stubby)" >&2; exit 1; }
done

log() { printf '%s %s\n' "$(date +%T)" "$*" >&2; }
T_START=$(date +%s)

BUILD_PROFILE=${BUILD_PROFILE:-dist}
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  log "building (cargo build --profile $BUILD_PROFILE -p dnsd -p fwd -p guardctl)"
  cargo build --profile "$BUILD_PROFILE" -q -p dnsd -p fwd -p guardctl
fi
# Cargo's dev profile builds into target/debug; every other profile into target/<profile>.
REL=${CARGO_TARGET_DIR:-$ROOT/target}/$([ "$BUILD_PROFILE" = dev ] && echo debug || echo "$BUILD_PROFILE")
for b in dnsd fwd guardctl; do [ -x "$REL/$b" ] || { echo "missing $REL/$b" >&2; exit 1; }; done

NS="guard-dnsd-bench-$$"
W=$(mktemp -d /tmp/guard-dnsd-bench.XXXXXX)
mkdir -p "$W"/{pids,log,run,conf,out,kresd,kresd-dot,stubby,bin} "$OUT"
# A snapshot of the binaries: others may rebuild them while the benchmark runs.
cp -p "$REL"/{dnsd,fwd,guardctl} "$W/bin/"
BIN=$W/bin
INNS=(ip netns exec "$NS")
inns() { "${INNS[@]}" "$@"; }

# ---------------------------------------------------------------- process bookkeeping (by PID only)
pstat() { sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null || true; }  # drop "pid (comm) ": comm may hold spaces
starttime() { pstat "$1" | awk '{print $20}'; }
descendants() { local p c; for p in "$@"; do for c in $(cat /proc/"$p"/task/*/children 2>/dev/null); do echo "$c"; descendants "$c"; done; done; }
record() { # name pid: the PID and its descendants, with start times (a reused PID is never killed)
  local p; : >"$W/pids/$1"
  for p in "$2" $(descendants "$2"); do echo "$p $(starttime "$p")" >>"$W/pids/$1"; done
}
alive_same() { [ -n "${2:-}" ] && [ "$(starttime "$1")" = "$2" ]; }
pids_of() { local f="$W/pids/$1" p st; [ -f "$f" ] || return 0; while read -r p st; do alive_same "$p" "$st" && echo "$p"; done <"$f"; return 0; }
stop() { # name: TERM, wait up to 5 s, then KILL
  local f="$W/pids/$1" p st i any
  [ -f "$f" ] || return 0
  while read -r p st; do alive_same "$p" "$st" && kill -TERM "$p" 2>/dev/null || true; done <"$f"
  for i in $(seq 50); do
    any=0; while read -r p st; do alive_same "$p" "$st" && any=1 || true; done <"$f"
    [ $any = 0 ] && break; sleep 0.1
  done
  if [ "$any" = 1 ]; then
    log "$1 still running 5 s after SIGTERM; SIGKILL"
    while read -r p st; do alive_same "$p" "$st" && kill -KILL "$p" 2>/dev/null || true; done <"$f"
  fi
  rm -f "$f"
}
cleanup() {
  local f p
  [ -n "${AUTOGROUP_NICE0:-}" ] && echo "$AUTOGROUP_NICE0" >/proc/self/autogroup 2>/dev/null
  for f in "$W"/pids/*; do [ -e "$f" ] && stop "$(basename "$f")"; done
  # Anything still in our namespace was started by this script (it is private to this run).
  for p in $(ip netns pids "$NS" 2>/dev/null); do kill -KILL "$p" 2>/dev/null || true; done
  ip netns del "$NS" 2>/dev/null || true
  # The daemons' logs outlive the run, for the report's anomalies (SERVFAILs, failed starts).
  [ -n "${OUT:-}" ] && [ -d "$W/log" ] && mkdir -p "$OUT" && cp -r "$W/log" "$OUT/logs" 2>/dev/null
  rm -rf "$W"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

ip netns add "$NS"
inns ip link set lo up
# With sched_autogroup (the default), nice only ranks processes inside one session; CPU is first
# shared between sessions. So the session's autogroup gets NICE too, for the duration of the run.
if [ -w /proc/self/autogroup ]; then
  AUTOGROUP_NICE0=$(awk '{print $NF}' /proc/self/autogroup)
  echo "$NICE" >/proc/self/autogroup 2>/dev/null || AUTOGROUP_NICE0=""
fi

# ---------------------------------------------------------------- zone, certificate, query files
log "generating zone (100k names), certificate, query files in $W"
python3 - "$W" <<'PY'
import sys, random
w = sys.argv[1]
N = 100000
with open(f"{w}/bench.test.zone", "w") as f:
    f.write("$ORIGIN bench.test.\n$TTL 300\n@ SOA ns hostmaster 1 3600 600 86400 300\n@ NS ns\nns A 127.0.0.1\n")
    # readiness probes use a name outside the query files whose address dnsd never authorizes
    f.write("ready A 127.0.0.2\n")
    for i in range(N):
        f.write(f"name{i} A 198.{18 + (i >> 16)}.{(i >> 8) & 255}.{i & 255}\n")
        f.write(f"name{i} AAAA 2001:db8::{i >> 16:x}:{i & 0xffff:x}\n")
    # peers.sh's miss workload: unlimited unique names, one address
    f.write("*.w A 192.0.2.1\n")
r = random.Random(42)
hit = [f"name{i}.bench.test A" for i in range(1000)]
r.shuffle(hit)
open(f"{w}/q-hit.txt", "w").write("\n".join(hit) + "\n")
first = [f"name{i}.bench.test {t}" for i in range(N) for t in ("A", "AAAA")]
r.shuffle(first)
open(f"{w}/q-first.txt", "w").write("\n".join(first) + "\n")
# unique names (as peers.sh): enough for a saturation run at the load generator's ceiling
open(f"{w}/q-miss.txt", "w").write("".join(f"u{i}.w.bench.test A\n" for i in range(1200000)))
PY
# fixed-rate runs use the first names (q-*-lat) or the next ones (q-first-low); "granted" runs
# pre-pass both
NLAT=$((LAT_QPS * (LAT_DUR + 1))); NLOW=$((LOW_QPS * (LAT_DUR + 1)))
head -n "$NLAT" "$W/q-miss.txt" >"$W/q-miss-lat.txt"
head -n "$NLAT" "$W/q-first.txt" >"$W/q-first-lat.txt"
sed -n "$((NLAT + 1)),$((NLAT + NLOW))p" "$W/q-first.txt" >"$W/q-first-low.txt"
cat "$W/q-first-lat.txt" "$W/q-first-low.txt" >"$W/q-pre.txt"
# A throw-away CA and a leaf for dot.bench.test (webpki rejects a CA:TRUE certificate as a leaf).
openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj /CN=bench-test-ca -keyout "$W/ca.key" -out "$W/ca.pem" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj /CN=dot.bench.test -keyout "$W/key.pem" -out "$W/leaf.csr" 2>/dev/null
printf 'subjectAltName=DNS:dot.bench.test,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' >"$W/leaf.ext"
openssl x509 -req -in "$W/leaf.csr" -CA "$W/ca.pem" -CAkey "$W/ca.key" -CAcreateserial -days 30 \
  -extfile "$W/leaf.ext" -out "$W/cert.pem" 2>/dev/null

# ---------------------------------------------------------------- configurations
nsd_conf() { # name plainport tlsport
  cat >"$W/conf/$1.conf" <<EOF
server:
  ip-address: 127.0.0.1@$2
  ip-address: 127.0.0.1@$3
  tls-service-key: $W/key.pem
  tls-service-pem: $W/cert.pem
  tls-port: $3
  server-count: 1
  username: ""
  chroot: ""
  zonesdir: $W
  database: ""
  zonelistfile: $W/run/$1.zonelist
  xfrdfile: $W/run/$1.xfrd
  xfrdir: $W/run
  pidfile: $W/run/$1.pid
  logfile: $W/log/$1.daemon.log
  tcp-count: 1000
  tcp-query-count: 0
  tcp-timeout: 60
  rrl-ratelimit: 0
  rrl-whitelist-ratelimit: 0
  verbosity: 0
remote-control:
  control-enable: no
zone:
  name: bench.test
  zonefile: bench.test.zone
EOF
}
nsd_conf nsd-backend 5300 8530
nsd_conf nsd-direct 5309 8539

unbound_conf() { # name port forward-addr tls(yes|no)
  cat >"$W/conf/$1.conf" <<EOF
server:
  interface: 127.0.0.1@$2
  port: $2
  num-threads: 1
  do-daemonize: no
  username: ""
  chroot: ""
  directory: "$W/run"
  pidfile: "$W/run/$1.pid"
  use-syslog: no
  logfile: ""
  verbosity: 0
  do-ip6: no
  access-control: 127.0.0.0/8 allow
  module-config: "iterator"
  qname-minimisation: no
  do-not-query-localhost: no
  local-zone: "test." nodefault
  msg-cache-size: 64m
  rrset-cache-size: 128m
  num-queries-per-thread: 4096
  outgoing-range: 8192
  tls-cert-bundle: "$W/ca.pem"
remote-control:
  control-enable: no
forward-zone:
  name: "."
  forward-tls-upstream: $4
  forward-addr: $3
EOF
}
unbound_conf unbound 5301 "127.0.0.1@5300" no
unbound_conf unbound-dot 5311 "127.0.0.1@8530#dot.bench.test" yes

dnsdist_conf() { # name port backend-spec
  cat >"$W/conf/$1.lua" <<EOF
setSecurityPollSuffix("")
setLocal("127.0.0.1:$2")
setMaxUDPOutstanding(65535)
newServer({$3, checkName="ready.bench.test.", checkType="A", mustResolve=true})
pc = newPacketCache(200000, {maxTTL=86400, minTTL=0})
getPool(""):setCache(pc)
EOF
}
dnsdist_conf dnsdist 5302 'address="127.0.0.1:5300", name="nsd"'
dnsdist_conf dnsdist-dot 5312 "address=\"127.0.0.1:8530\", name=\"nsd-dot\", tls=\"openssl\", subjectName=\"dot.bench.test\", caStore=\"$W/ca.pem\", validateCertificates=true"

kresd_conf() { # name port policy
  cat >"$W/conf/$1.lua" <<EOF
net.listen('127.0.0.1', $2, { kind = 'dns' })
for _, m in ipairs({'priming', 'detect_time_skew', 'detect_time_jump', 'ta_signal_query', 'ta_sentinel'}) do
  pcall(modules.unload, m)
end
trust_anchors.remove('.')
cache.size = 256 * MB
policy.add(policy.all($3))
EOF
}
kresd_conf kresd 5304 "policy.FORWARD({'127.0.0.1@5300'})"
kresd_conf kresd-dot 5314 "policy.TLS_FORWARD({{'127.0.0.1@8530', hostname='dot.bench.test', ca_file='$W/ca.pem'}})"

cat >"$W/conf/stubby.yml" <<EOF
resolution_type: GETDNS_RESOLUTION_STUB
dns_transport_list: [ GETDNS_TRANSPORT_TLS ]
tls_authentication: GETDNS_AUTHENTICATION_REQUIRED
tls_query_padding_blocksize: 128
edns_client_subnet_private: 0
round_robin_upstreams: 0
idle_timeout: 10000
limit_outstanding_queries: 0
appdata_dir: "$W/stubby"
tls_ca_file: "$W/ca.pem"
listen_addresses: [ 127.0.0.1@5318 ]
upstream_recursive_servers:
  - address_data: 127.0.0.1
    tls_port: 8530
    tls_auth_name: "dot.bench.test"
EOF

fwd_conf() { # margin
  cat >"$W/conf/fwd.toml" <<EOF
mode = "local"
socket = "$W/run/fwd.sock"
database = "$W/run/fwd.db"
[ttl]
# grants do not churn during the benchmark
min = "1h"
margin = "$1"
[access]
authorizer_uids = [0]
[allow]
# loopback is always allowed anyway
cidrs = ["127.0.0.0/8"]
[expiry]
sweep_interval = "30s"
EOF
}
fwd_conf 30s

dnsd_conf() { # name port upstream [never_authorize-toml]
  cat >"$W/conf/$1.toml" <<EOF
threads = 1
[listen]
udp = ["127.0.0.1:$2"]
tcp = ["127.0.0.1:$2"]
[upstream]
servers = ["$3"]
ca_file = "$W/ca.pem"
[authorize]
socket = "$W/run/fwd.sock"
${4:-}
[control]
socket = "$W/run/$1.sock"
EOF
}
dnsd_conf dnsd 5320 "udp://127.0.0.1:5300"
dnsd_conf dnsd-dot 5321 "tls://127.0.0.1:8530#dot.bench.test"
dnsd_conf dnsd-noauth 5322 "udp://127.0.0.1:5300" 'never_authorize = ["0.0.0.0/0", "::/0"]'
dnsd_conf dnsd-dot-noauth 5323 "tls://127.0.0.1:8530#dot.bench.test" 'never_authorize = ["0.0.0.0/0", "::/0"]'
for c in dnsd dnsd-dot dnsd-noauth dnsd-dot-noauth; do
  "$BIN/dnsd" --validate --config "$W/conf/$c.toml" >/dev/null || { echo "dnsd config $c invalid" >&2; exit 1; }
done
"$BIN/fwd" --validate --config "$W/conf/fwd.toml" >/dev/null

# ---------------------------------------------------------------- systems
port_of() {
  case $1 in
    nsd-direct) echo 5309 ;; unbound) echo 5301 ;; dnsdist) echo 5302 ;; kresd) echo 5304 ;;
    unbound-dot) echo 5311 ;; dnsdist-dot) echo 5312 ;; kresd-dot) echo 5314 ;; stubby-dot) echo 5318 ;;
    dnsd|dnsd-granted|dnsd-extend) echo 5320 ;; dnsd-dot) echo 5321 ;; dnsd-noauth) echo 5322 ;; dnsd-dot-noauth) echo 5323 ;;
  esac
}
proc_of() { case $1 in dnsd-granted|dnsd-extend) echo dnsd ;; *) echo "$1" ;; esac; }  # which process is measured
cmd_of() {
  case $1 in
    nsd-backend|nsd-direct) echo "nsd -d -c $W/conf/$1.conf" ;;
    unbound|unbound-dot) echo "unbound -d -c $W/conf/$1.conf" ;;
    dnsdist|dnsdist-dot) echo "dnsdist --supervised --disable-syslog -C $W/conf/$1.lua" ;;
    kresd|kresd-dot) echo "kresd -n -q -c $W/conf/$1.lua $W/$1" ;;
    stubby-dot) echo "stubby -C $W/conf/stubby.yml" ;;
    dnsd|dnsd-dot|dnsd-noauth|dnsd-dot-noauth) echo "$BIN/dnsd --config $W/conf/$1.toml" ;;
    fwd) echo "$BIN/fwd --config $W/conf/fwd.toml" ;;
  esac
}
have() { local c; c=$(cmd_of "$(proc_of "$1")"); command -v "${c%% *}" >/dev/null; }
want() { [ -z "$ONLY" ] || [[ " $ONLY " == *" $1 "* ]] || [[ " $ONLY " == *" ${1%-dot} "* ]]; }

wait_dns() { # port [tls]
  local i a tls=()
  [ "${2:-}" = tls ] && tls=(+tls +tls-ca="$W/ca.pem" +tls-hostname=dot.bench.test)
  for i in $(seq 150); do
    # not "dig | grep -q": with pipefail, dig killed by SIGPIPE fails the pipeline
    a=$(inns dig "${tls[@]}" @127.0.0.1 -p "$1" ready.bench.test A +time=1 +tries=1 2>/dev/null || true)
    [[ $a == *"status: NOERROR"* ]] && return 0
    sleep 0.1
  done
  return 1
}
wait_log() { # file pattern pid
  local i
  for i in $(seq 300); do
    grep -q "$2" "$1" 2>/dev/null && return 0
    kill -0 "$3" 2>/dev/null || return 1
    sleep 0.05
  done
  return 1
}

start() { # name cpu
  local name=$1 cpu=$2 cmd pid ok=0
  stop "$name"
  case $name in kresd|kresd-dot) rm -rf "${W:?}/$name"; mkdir -p "$W/$name" ;; esac  # cold on-disk cache
  cmd=$(cmd_of "$name")
  # Each start gets a fresh log (readiness is read from it); earlier starts' logs are kept in
  # NAME.earlier.log, so that an anomaly in any run can be traced (OUT/logs after the run).
  if [ -s "$W/log/$name.log" ]; then
    { echo "=== an earlier start of $name, logged until $(date +%T) ==="; cat "$W/log/$name.log"; } >>"$W/log/$name.earlier.log"
  fi
  # shellcheck disable=SC2086  # ip netns exec, taskset and env all exec: $! is the daemon
  "${INNS[@]}" nice -n "$NICE" taskset -c "$cpu" env TOKIO_WORKER_THREADS=1 RUST_LOG="${BENCH_RUST_LOG:-info}" SSL_CERT_FILE="$W/ca.pem" \
    $cmd >"$W/log/$name.log" 2>&1 </dev/null &
  pid=$!
  echo "$pid $(starttime "$pid")" >"$W/pids/$name"
  case $name in
    nsd-backend) wait_dns 5300 && wait_dns 8530 tls && ok=1 ;;
    fwd) wait_log "$W/log/fwd.log" "fwd ready" "$pid" && ok=1 ;;
    dnsd|dnsd-*) wait_log "$W/log/$name.log" "dnsd ready" "$pid" && wait_dns "$(port_of "$name")" && ok=1 ;;
    *) wait_dns "$(port_of "$name")" && ok=1 ;;
  esac
  if [ $ok != 1 ]; then
    log "start of $name failed; log:"; tail -5 "$W/log/$name.log" >&2
    inns dig @127.0.0.1 -p "$(port_of "$name")" ready.bench.test A +time=1 +tries=1 >&2 || true
    stop "$name"; return 1
  fi
  record "$name" "$pid"
}
fresh_fwd() { # [ttl.margin]: stop fwd, remove its table and database, start it (every address is new again)
  stop fwd
  fwd_conf "${1:-30s}"
  inns "$BIN/fwd" --remove-table --config "$W/conf/fwd.toml" >/dev/null 2>&1 || true
  rm -f "$W"/run/fwd.db*
  start fwd "$SUT_CPU"
}

# ---------------------------------------------------------------- measurement
ticks() { local s=0 p t; for p in "$@"; do t=$(pstat "$p" | awk '{print $12+$13}'); s=$((s + ${t:-0})); done; echo $s; }
# ns the threads of these processes spent runnable but waiting for a CPU (schedstat field 2):
# how much other load actually delayed them
rqwait() { local p; for p in "$@"; do cat /proc/"$p"/task/*/schedstat 2>/dev/null; done | awk '{s+=$2} END{printf "%d\n", s}'; }
cpu_busy() { awk -v c="cpu$1" '$1==c{print $2+$3+$4+$7+$8+$9, $2+$3+$4+$5+$6+$7+$8+$9}' /proc/stat; }
tcp_opens() { inns awk '/^Tcp:/{n++; if(n==1){for(i=1;i<=NF;i++) if($i=="ActiveOpens") c=i} else print $c}' /proc/net/snmp; }
# Waiting for quiet and redoing noisy runs stop once the run has lasted BUDGET seconds, so that a
# box that never gets quiet still finishes in time (the noise is then reported, not avoided).
over_budget() { [ $(( $(date +%s) - T_START )) -ge "$BUDGET" ]; }
wait_quiet() {
  local waited=0 a0 a1 b0 b1 busy
  while :; do
    read -r a0 b0 < <(awk '$1=="cpu"{print $2+$3+$4+$7+$8+$9, $2+$3+$4+$5+$6+$7+$8+$9}' /proc/stat)
    sleep 0.5
    read -r a1 b1 < <(awk '$1=="cpu"{print $2+$3+$4+$7+$8+$9, $2+$3+$4+$5+$6+$7+$8+$9}' /proc/stat)
    busy=$(( (a1 - a0) * 100 / ((b1 - b0) > 0 ? (b1 - b0) : 1) ))
    [ "$busy" -le "$QUIET_MAX" ] && return 0
    [ "$waited" -ge "$QUIET_WAIT" ] && return 0
    over_budget && return 0
    [ $((waited % 15)) = 0 ] && log "machine ${busy}% busy (someone else's build?); waiting up to ${QUIET_WAIT}s"
    sleep 2.5; waited=$((waited + 3))
  done
}

echo "system,workload,kind,rep,attempt,ok,qps,completed,lost,avg_ms,p50_ms,p99_ms,sut_cpu_s,fwd_cpu_s,us_per_q,fwd_us_per_q,backend_cpu_pct,dnsperf_cpu_pct,foreign_pct,load1,tcp_opens,elapsed_s,runq_wait_pct,rcodes" >"$OUT/runs.csv"

# One dnsperf run against $sys; appends a row; fails when foreign load contaminated it.
run_dnsperf() { # system workload kind rep attempt file
  local sys=$1 wl=$2 kind=$3 rep=$4 att=$5 file=$6 port extra out pids fpids bpids
  port=$(port_of "$sys")
  # miss/first/dot: one pass at most (every query distinct); hit: the 1,000 names over and over
  local once=(-n 1); [ "$wl" = hit ] && once=()
  case $kind in
    sat) extra=("${once[@]}" -l "$DUR" "${PERF_OPTS[@]}") ;;
    lat) extra=("${once[@]}" -l "$LAT_DUR" -Q "$LAT_QPS" -v "${PERF_OPTS[@]}") ;;
    low) extra=("${once[@]}" -l "$LAT_DUR" -Q "$LOW_QPS" -v "${PERF_OPTS[@]}") ;;
  esac
  out="$W/out/$sys.$wl.$kind.$rep.$att.txt"
  pids=$(pids_of "$(proc_of "$sys")"); bpids=$(pids_of nsd-backend)
  fpids=""; case $sys in dnsd|dnsd-granted|dnsd-extend|dnsd-dot) fpids=$(pids_of fwd) ;; esac
  local load t0 t1 f0 f1 k0 k1 c0 g0 c1 g1 e0 h0 e1 h1 s0 s1 o0 o1 q0 q1 perfpid=""
  local obase=${OPENS_BASE:-}; OPENS_BASE=""
  load=$(cut -d' ' -f1 /proc/loadavg)
  if [ "${PROFILE:-0}" = 1 ] && [[ " dnsd dnsd-noauth dnsd-granted dnsd-dot dnsd-dot-noauth " == *" $sys "* ]] && [ "$kind" = "${PROFILE_KIND:-sat}" ] && [ "$rep" = 1 ] && [ "$att" = 1 ] && command -v perf >/dev/null; then
    # DWARF call graphs: the release profile keeps line tables (debug = 1) but no frame pointers
    # shellcheck disable=SC2086
    perf record -F "${PROFILE_HZ:-499}" --call-graph dwarf,16384 -o "$OUT/perf-$sys-$wl.data" -p "$(echo $pids $fpids | tr ' ' ,)" >/dev/null 2>&1 &
    perfpid=$!; sleep 0.3
  fi
  # shellcheck disable=SC2086
  { t0=$(ticks $pids); f0=$(ticks $fpids); k0=$(ticks $bpids); o0=${obase:-$(tcp_opens)}; q0=$(rqwait $pids); }
  read -r c0 g0 < <(cpu_busy "$SUT_CPU"); read -r e0 h0 < <(cpu_busy "$GEN_CPU"); s0=$(date +%s.%N)
  inns nice -n "$NICE" taskset -c "$GEN_CPU" /usr/bin/time -f '%U %S' -o "$out.time" \
    dnsperf -s 127.0.0.1 -p "$port" -d "$file" "${extra[@]}" >"$out" 2>&1 || true
  s1=$(date +%s.%N); read -r c1 g1 < <(cpu_busy "$SUT_CPU"); read -r e1 h1 < <(cpu_busy "$GEN_CPU")
  # shellcheck disable=SC2086
  { t1=$(ticks $pids); f1=$(ticks $fpids); k1=$(ticks $bpids); o1=$(tcp_opens); q1=$(rqwait $pids); }
  if [ -n "$perfpid" ]; then
    kill -INT "$perfpid" 2>/dev/null || true; wait "$perfpid" 2>/dev/null || true
    # self time by process and library, then the inclusive (children) view by symbol
    perf report -i "$OUT/perf-$sys-$wl.data" --no-children --stdio --sort comm,dso -g none 2>/dev/null | grep -v '^#' | grep -v '^$' | head -30 >"$OUT/perf-$sys-$wl.txt" || true
    perf report -i "$OUT/perf-$sys-$wl.data" --children --stdio --sort pid,sym --percent-limit 2 -g none 2>/dev/null | grep -v '^#' | grep -v '^$' \
      | grep -v -E 'tokio::runtime|std::panic|catch_unwind|LocalKey|thread_start|clone3|start_thread|call_once|spawn_unchecked|unsafe_cell|coop::' | cut -c1-200 | head -150 >>"$OUT/perf-$sys-$wl.txt" || true
  fi
  cp "$out" "$OUT/last-$sys-$wl-$kind.txt" 2>/dev/null || true
  python3 - "$out" "$sys" "$wl" "$kind" "$rep" "$att" "$s0" "$s1" "$t0" "$t1" "$f0" "$f1" "$k0" "$k1" \
    "$c0" "$c1" "$e0" "$e1" "$load" "$o0" "$o1" "$(getconf CLK_TCK)" "$FOREIGN_MAX" "$q0" "$q1" >>"$OUT/runs.csv" <<'PY'
import sys, re
(out, sys_, wl, kind, rep, att, s0, s1, t0, t1, f0, f1, k0, k1, c0, c1, e0, e1, load, o0, o1, hz, fmax, q0, q1) = sys.argv[1:]
txt = open(out, errors="replace").read()
def g(pat, d=""):
    m = re.search(pat, txt); return m.group(1) if m else d
qps = float(g(r"Queries per second:\s+([\d.]+)", "0"))
completed = int(g(r"Queries completed:\s+(\d+)", "0"))
lost = int(g(r"Queries lost:\s+(\d+)", "0"))
avg = g(r"Average Latency \(s\):\s+([\d.]+)", "")
rc = g(r"Response codes:\s+(.*)", "").replace(",", ";")
try: du, ds = map(float, open(out + ".time").read().split()[-2:])
except Exception: du = ds = 0.0
hz = float(hz); el = float(s1) - float(s0)
sut = (int(t1) - int(t0)) / hz; fw = (int(f1) - int(f0)) / hz; back = (int(k1) - int(k0)) / hz; gen = du + ds
busy = (float(c1) - float(c0) + float(e1) - float(e0)) / hz
foreign = max(0.0, busy - sut - fw - back - gen) / el * 100
def lat(l):
    try: return float(l.split()[-1])
    except ValueError: return None
lats = sorted(x for x in (lat(l) for l in txt.splitlines() if l.startswith("> ")) if x is not None)
p50 = p99 = ""
if lats:
    p50 = f"{lats[len(lats) // 2] * 1000:.3f}"; p99 = f"{lats[min(len(lats) - 1, int(len(lats) * 0.99))] * 1000:.3f}"
usq = f"{sut * 1e6 / completed:.2f}" if completed else ""
fusq = f"{fw * 1e6 / completed:.2f}" if completed else ""
ok = int(foreign <= float(fmax))
print(f"{sys_},{wl},{kind},{rep},{att},{ok},{qps:.0f},{completed},{lost},{float(avg) * 1000 if avg else 0:.3f},{p50},{p99},"
      f"{sut:.2f},{fw:.2f},{usq},{fusq},{back / el * 100:.0f},{gen / el * 100:.0f},{foreign:.0f},{load},{int(o1) - int(o0)},{el:.1f},"
      f"{(int(q1) - int(q0)) / 1e7 / el:.1f},{rc}")
PY
  tail -1 "$OUT/runs.csv" >&2
  [ "$(tail -1 "$OUT/runs.csv" | cut -d, -f6)" = 1 ]
}

# Prepares $sys for one measurement (cold where the workload needs it) then measures, retrying
# when the run was contaminated by foreign load.
measure() { # system workload kind rep
  local sys=$1 wl=$2 kind=$3 rep=$4 att file
  case $wl in hit) file=$W/q-hit.txt ;; first) file=$W/q-first.txt ;; *) file=$W/q-miss.txt ;; esac
  [ "$kind" = lat ] && [ "$wl" != hit ] && { [ "$wl" = first ] && file=$W/q-first-lat.txt || file=$W/q-miss-lat.txt; }
  [ "$kind" = low ] && file=$W/q-first-low.txt
  for att in $(seq "$RETRIES"); do
    case $sys in
      dnsd-granted|dnsd-extend)
        if [ "$PREPARED" != "$sys.$rep" ]; then
          # one pass over every name the fixed-rate runs will ask: fwd commits every address
          # (granted: ttl.margin 10m, so its "unchanged" fast path holds for 5 min; extend:
          # ttl.margin 2s, so a second sight 1 s later is an extension, as it is 15 s later with
          # the default 30s margin)
          stop dnsd   # first: fwd's graceful shutdown waits for dnsd's open channel to close
          if [ "$sys" = dnsd-granted ]; then fresh_fwd 10m || return 1; else fresh_fwd 2s || return 1; fi
          start dnsd "$SUT_CPU" || return 1
          inns nice -n "$NICE" taskset -c "$GEN_CPU" dnsperf -s 127.0.0.1 -p 5320 -d "$W/q-pre.txt" -n 1 "${PERF_OPTS[@]}" >/dev/null 2>&1 || true
          PREPARED=$sys.$rep
        fi
        start dnsd "$SUT_CPU" || return 1   # cold cache, fwd keeps its grants
        sleep 1.2
        wait_quiet
        ;;
      *)
        if [ "$wl" != hit ]; then   # cold cache (and, for dnsd, a fwd that has never seen the addresses)
          case $sys in dnsd|dnsd-dot) stop "$sys"; fresh_fwd || return 1 ;; esac
          # connections the system opens from its start on (a pool may connect at start-up)
          OPENS_BASE=$(tcp_opens)
          start "$sys" "$SUT_CPU" || return 1
        fi
        wait_quiet
        ;;
    esac
    run_dnsperf "$sys" "$wl" "$kind" "$rep" "$att" "$file" && return 0
    over_budget && return 0
    [ "$att" -lt "$RETRIES" ] && log "run contaminated by foreign CPU load; redoing it"
  done
  return 0
}
PREPARED=""

bench() { # system workload kinds...
  local sys=$1 wl=$2 r k; shift 2
  want "$sys" || return 0
  have "$sys" || { log "skip $sys: not installed"; echo "$sys,$wl,skipped" >>"$OUT/skipped.csv"; return 0; }
  log "== $sys $wl"
  if [ "$wl" = hit ]; then warm_hits "$sys" || return 0; fi
  for r in $(seq "$REPS"); do for k in "$@"; do measure "$sys" "$wl" "$k" "$r" || { log "$sys failed"; return 0; }; done; done
  finish_system "$sys" "$wl"
}

warm_hits() { # system: (re)start it, and fill its cache with the hit workload's names
  case $1 in dnsd) stop dnsd; fresh_fwd || return 1 ;; esac
  start "$1" "$SUT_CPU" || return 1
  inns nice -n "$NICE" taskset -c "$GEN_CPU" dnsperf -s 127.0.0.1 -p "$(port_of "$1")" -d "$W/q-hit.txt" -n 2 -q 20 >/dev/null 2>&1 || true
}

finish_system() { # system workload: dnsd's status into the report's files, then stop it
  if [ "$1" = dnsd ] || [ "$1" = dnsd-dot ]; then
    { echo "== $1 $2"; inns "$BIN/guardctl" --dnsd-socket "$W/run/$(proc_of "$1").sock" --socket "$W/run/fwd.sock" status 2>&1
      inns "$BIN/guardctl" --dnsd-socket "$W/run/$(proc_of "$1").sock" upstreams 2>&1; } >>"$OUT/dnsd-status.txt" || true
  fi
  stop "$(proc_of "$1")"
}

# The workloads compared with peers (hit, miss, dot) take turns: rep 1 of every system, then rep
# 2 of every system, and so on. The machine's drift over the minutes a workload takes then falls
# on every system alike, instead of on whichever ran last. A hit turn starts its system afresh
# and warms its cache first; miss and dot measurements restart their system anyway.
bench_turns() { # "systems" workload kinds...
  local systems=$1 wl=$2 r s k ok; shift 2
  local turn=()
  for s in $systems; do
    want "$s" || continue
    have "$s" || { log "skip $s: not installed"; echo "$s,$wl,skipped" >>"$OUT/skipped.csv"; continue; }
    turn+=("$s")
  done
  for r in $(seq "$REPS"); do
    local next=()
    for s in "${turn[@]}"; do
      log "== $s $wl (rep $r of $REPS)"
      ok=1
      if [ "$wl" = hit ]; then warm_hits "$s" || { log "$s failed to start"; echo "$s,$wl,failed to start" >>"$OUT/skipped.csv"; continue; }; fi
      for k in "$@"; do measure "$s" "$wl" "$k" "$r" || { log "$s failed"; ok=0; break; }; done
      if [ "$ok" = 1 ] && [ "$r" -lt "$REPS" ]; then next+=("$s"); stop "$(proc_of "$s")"; else finish_system "$s" "$wl"; fi
    done
    turn=("${next[@]}")
  done
}

: >"$OUT/skipped.csv"; : >"$OUT/dnsd-status.txt"
{
  echo "date: $(date -Is)"; echo "kernel: $(uname -r)"; echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-)"
  echo "nproc: $(nproc)"; echo "load at start: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "settings: WORKLOADS=\"$WORKLOADS\"${ONLY:+ ONLY=\"$ONLY\"} NICE=$NICE REPS=$REPS DUR=$DUR LAT_DUR=$LAT_DUR LAT_QPS=$LAT_QPS LOW_QPS=$LOW_QPS SUT_CPU=$SUT_CPU GEN_CPU=$GEN_CPU dnsperf ${PERF_OPTS[*]}"
  echo "dnsd: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null)$(git -C "$ROOT" diff --quiet HEAD -- dnsd fwd 2>/dev/null || echo ' (+ uncommitted changes)'), binary built $(date -r "$BIN/dnsd" -Is)"
  for p in nsd unbound dnsdist knot-resolver stubby dnsperf; do dpkg-query -W -f '${Package} ${Version}\n' "$p" 2>/dev/null || echo "$p not installed"; done
} >"$OUT/env.txt"

log "starting nsd backend and fwd"
start nsd-backend "$GEN_CPU"
# fwd's ruleset (hooks with conntrack) stays loaded in the namespace for the whole run, so every
# system, peers included, pays the same netfilter cost on its loopback packets.
fresh_fwd

wanted_wl() { [[ " $WORKLOADS " == *" $1 "* ]]; }
if wanted_wl hit; then
  if [ "$QUICK" = 0 ]; then REPS=1 bench nsd-direct hit sat; fi
  bench_turns "dnsd unbound dnsdist kresd" hit sat lat
fi
if wanted_wl miss; then bench_turns "dnsd dnsd-noauth unbound dnsdist kresd" miss sat lat; fi
# first-sight authorization: every answer a new address (the authorization path, dnsd only)
if wanted_wl first; then
  bench dnsd first sat lat low
  bench dnsd-noauth first lat low
  bench dnsd-granted first lat low
  if [ "$QUICK" = 0 ]; then bench dnsd-extend first low; fi
fi
if wanted_wl dot; then bench_turns "dnsd-dot dnsd-dot-noauth unbound-dot dnsdist-dot kresd-dot stubby-dot" dot sat lat; fi
stop fwd
echo "load at end: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$OUT/env.txt"
echo "duration: $(( $(date +%s) - T_START )) s" >>"$OUT/env.txt"

echo "$CMDLINE" >"$OUT/cmdline"
report "$OUT"
