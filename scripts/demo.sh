#!/usr/bin/env bash
# guard demo: the real fwd (local mode) in a throwaway network namespace, with a fake internet
# next door. Shows a connection refused, a grant, the same connection succeeding, the audit.
# Never touches the host's own ruleset; cleans up namespaces and processes it started.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "the demo needs root (network namespaces, nftables)"; exit 1; }
BIN=${GUARD_BIN_DIR:-target/release}
for b in fwd guardctl guard-test-client; do
  [ -x "$BIN/$b" ] || { echo "missing $BIN/$b: run 'make release' (or 'make demo')"; exit 1; }
done
HOST="guard-demo-host-$$"; NET="guard-demo-net-$$"
DIR=$(mktemp -d /tmp/guard-demo.XXXXXX); chmod 755 "$DIR"
PIDS=()
cleanup() {
  for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
  ip netns del "$HOST" 2>/dev/null || true
  ip netns del "$NET" 2>/dev/null || true
  rm -rf "$DIR"
}
trap cleanup EXIT
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
in_host() { ip netns exec "$HOST" "$@"; }

say "network: $HOST (guarded, 192.0.2.1) <-veth-> $NET (fake internet, 192.0.2.80 serves HTTP)"
ip netns add "$HOST"; ip netns add "$NET"
ip link add gd-h-$$ netns "$HOST" type veth peer name gd-n-$$ netns "$NET"
in_host ip link set lo up; in_host ip link set gd-h-$$ up
in_host ip addr add 192.0.2.1/24 dev gd-h-$$
ip netns exec "$NET" ip link set lo up; ip netns exec "$NET" ip link set gd-n-$$ up
ip netns exec "$NET" ip addr add 192.0.2.80/24 dev gd-n-$$
ip netns exec "$NET" ip addr add 192.0.2.81/24 dev gd-n-$$
echo "hello from the fake internet" > "$DIR/index.html"
ip netns exec "$NET" python3 -m http.server 80 --bind 0.0.0.0 --directory "$DIR" >/dev/null 2>&1 &
PIDS+=($!)
until ip netns exec "$NET" ss -ltn | grep -q ':80 '; do sleep 0.1; done

say "starting fwd (local mode, default deny) in $HOST"
cat > "$DIR/fwd.toml" <<TOML
socket = "$DIR/fwd.sock"
database = "$DIR/fwd.db"
[access]
authorizer_uids = [0]
TOML
in_host "$BIN/fwd" --config "$DIR/fwd.toml" >"$DIR/fwd.log" 2>&1 &
PIDS+=($!)
until grep -q "fwd ready" "$DIR/fwd.log"; do
  kill -0 "${PIDS[-1]}" 2>/dev/null || { cat "$DIR/fwd.log"; exit 1; }
  sleep 0.1
done
ctl() { echo "\$ guardctl $*"; "$BIN/guardctl" --socket "$DIR/fwd.sock" "$@"; }

say "curl http://192.0.2.80/ before any grant: refused at once by the kernel"
in_host curl -sS -m 5 http://192.0.2.80/ && { echo "UNEXPECTED: reachable"; exit 1; } || true

say "a trusted DNS answer names 192.0.2.80 (Authorize, as dnsd does for every A/AAAA answer)"
in_host "$BIN/guard-test-client" --socket "$DIR/fwd.sock" --ip 192.0.2.80 --ttl 300 --qname www.example.test

say "the same curl now succeeds"
in_host curl -sS -m 5 http://192.0.2.80/

say "192.0.2.81 was never answered: still refused"
in_host curl -sS -m 5 http://192.0.2.81/ && { echo "UNEXPECTED: reachable"; exit 1; } || true

say "what fwd holds and why"
ctl list
ctl history --limit 10
ctl status

say "the kernel set, as nft sees it"
in_host nft list set inet guard auth4

say "revoke: new connections fail again at once"
ctl revoke 192.0.2.80
in_host curl -sS -m 5 http://192.0.2.80/ && { echo "UNEXPECTED: reachable"; exit 1; } || true
say "demo done; cleaning up"
