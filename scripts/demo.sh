#!/usr/bin/env bash
# guard demo: the real system in throwaway network namespaces. A fake internet ("net") runs
# unbound as a DNS-over-TLS resolver (certificate from a CA made here with openssl) and an HTTP
# server; the guarded host runs fwd (local mode, default deny) and dnsd (DoT upstream, pinned).
# Shows an address refused, a name resolved, the same address then reachable, an unanswered
# neighbour still refused, fail-closed when fwd dies, and guardctl's view.
# Never touches the host's own ruleset; removes every namespace, process and file it created.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "the demo needs root (network namespaces, nftables)"; exit 1; }
BIN=${GUARD_BIN_DIR:-target/release}
for b in fwd dnsd guardctl; do
  [ -x "$BIN/$b" ] || { echo "missing $BIN/$b: run 'make release' (or 'make demo')"; exit 1; }
done
for t in ip nft unbound unbound-checkconf openssl dig curl python3 ss; do
  command -v "$t" >/dev/null || { echo "missing '$t': run 'make deps' (Debian packages)"; exit 1; }
done

HOST="guard-demo-host-$$"; NET="guard-demo-net-$$"
DIR=$(mktemp -d /tmp/guard-demo.XXXXXX); chmod 755 "$DIR"
PIDS=()
cleanup() {
  local p
  for p in "${PIDS[@]:-}"; do
    [ -n "$p" ] || continue
    kill "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
  done
  ip netns del "$HOST" 2>/dev/null || true
  ip netns del "$NET" 2>/dev/null || true
  rm -rf "$DIR"
}
trap cleanup EXIT
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
in_host() { ip netns exec "$HOST" "$@"; }
in_net() { ip netns exec "$NET" "$@"; }
# wait_for WHAT PID COMMAND...: poll COMMAND (10 times a second, 30 s at most) until it
# succeeds; fail early, with the log, if PID died.
wait_for() {
  local what=$1 pid=$2 log=$3; shift 3
  for _ in $(seq 300); do
    "$@" >/dev/null 2>&1 && return 0
    kill -0 "$pid" 2>/dev/null || { echo "$what died:"; cat "$log"; exit 1; }
    sleep 0.1
  done
  echo "$what not ready after 30 s:"; cat "$log"; exit 1
}
# Expect a refusal: curl must fail (fwd rejects with a TCP reset, so at once).
refused() {
  if in_host curl -sS -m 5 "$1"; then echo "UNEXPECTED: $1 reachable"; exit 1; fi
}
ctl() {
  echo "\$ guardctl $*"
  "$BIN/guardctl" --socket "$DIR/fwd.sock" --dnsd-socket "$DIR/dnsd.sock" "$@"
}

say "network: $HOST (guarded, 192.0.2.1) <-veth-> $NET (fake internet)"
echo "   $NET: 192.0.2.2 = unbound (DoT :853 as dns.test), 192.0.2.80 and .81 = HTTP"
ip netns add "$HOST"; ip netns add "$NET"
ip link add gd-h-$$ netns "$HOST" type veth peer name gd-n-$$ netns "$NET"
in_host ip link set lo up; in_host ip link set gd-h-$$ up
in_host ip addr add 192.0.2.1/24 dev gd-h-$$
in_net ip link set lo up; in_net ip link set gd-n-$$ up
for a in 192.0.2.2 192.0.2.80 192.0.2.81; do in_net ip addr add $a/24 dev gd-n-$$; done
mkdir "$DIR/www"; echo "hello from the fake internet" > "$DIR/www/index.html"
# Daemons are started with `ip netns exec` directly (not through a shell function), so that
# $! is the daemon's own PID (ip execs it) and cleanup kills the daemon itself.
ip netns exec "$NET" python3 -m http.server 80 --bind 0.0.0.0 --directory "$DIR/www" \
  >"$DIR/http.log" 2>&1 &
PIDS+=($!)
wait_for "the HTTP server" "${PIDS[-1]}" "$DIR/http.log" \
  bash -c "ip netns exec '$NET' ss -Hltn 'sport = :80' | grep -q LISTEN"

say "a test CA and a certificate for dns.test (openssl), and its SPKI pin"
(
  cd "$DIR"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 \
    -subj "/CN=guard demo CA" -addext basicConstraints=critical,CA:TRUE \
    -addext keyUsage=critical,keyCertSign,cRLSign -keyout ca.key -out ca.pem 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=dns.test" \
    -keyout dns.key -out dns.csr 2>/dev/null
  printf 'subjectAltName=DNS:dns.test\nextendedKeyUsage=serverAuth\n' > dns.ext
  openssl x509 -req -in dns.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 1 \
    -extfile dns.ext -out dns.pem 2>/dev/null
)
PIN=$(openssl x509 -in "$DIR/dns.pem" -pubkey -noout | openssl pkey -pubin -outform der \
  | openssl dgst -sha256 -binary | base64)
openssl x509 -in "$DIR/dns.pem" -noout -subject -issuer -ext subjectAltName | sed 's/^/   /'
echo "   pin-sha256: $PIN"

say "unbound in $NET: zone demo.test over DNS-over-TLS on 192.0.2.2:853"
cat > "$DIR/demo.zone" <<'ZONE'
$ORIGIN demo.test.
$TTL 300
@    IN SOA ns hostmaster 1 3600 600 86400 60
@    IN NS  ns
ns   IN A   192.0.2.2
www  IN A   192.0.2.80
shop IN CNAME www
ZONE
cat > "$DIR/unbound.conf" <<CONF
server:
  username: ""
  chroot: ""
  directory: "$DIR"
  pidfile: "$DIR/unbound.pid"
  do-daemonize: no
  use-syslog: no
  logfile: ""
  interface-automatic: no
  interface: 192.0.2.2@53
  interface: 192.0.2.2@853
  tls-port: 853
  tls-service-key: "$DIR/dns.key"
  tls-service-pem: "$DIR/dns.pem"
  access-control: 0.0.0.0/0 allow
  module-config: "iterator"
  local-zone: "test." nodefault
auth-zone:
  name: "demo.test."
  zonefile: "$DIR/demo.zone"
  for-downstream: yes
  for-upstream: yes
  fallback-enabled: no
remote-control:
  control-enable: no
CONF
unbound-checkconf "$DIR/unbound.conf" >/dev/null
ip netns exec "$NET" unbound -d -c "$DIR/unbound.conf" >"$DIR/unbound.log" 2>&1 &
PIDS+=($!)
wait_for "unbound" "${PIDS[-1]}" "$DIR/unbound.log" \
  bash -c "ip netns exec '$NET' dig +tries=1 +time=1 @192.0.2.2 ns.demo.test | grep -q NOERROR"

say "fwd in $HOST: local mode, default deny; only dnsd's upstream 192.0.2.2:853 is allowed"
cat > "$DIR/fwd.toml" <<TOML
socket = "$DIR/fwd.sock"
database = "$DIR/fwd.db"
[access]
authorizer_uids = [0]   # dnsd runs as root in this demo; in production it is unprivileged
[allow]
upstreams = ["192.0.2.2:853"]
TOML
start_fwd() {
  ip netns exec "$HOST" "$BIN/fwd" --config "$DIR/fwd.toml" >"$DIR/fwd.log" 2>&1 &
  FWD_PID=$!; PIDS+=($FWD_PID)
  wait_for "fwd" "$FWD_PID" "$DIR/fwd.log" grep -q "fwd ready" "$DIR/fwd.log"
}
start_fwd

say "dnsd in $HOST on 127.0.0.1:53: upstream tls://192.0.2.2:853#dns.test, test CA, pinned key"
cat > "$DIR/dnsd.toml" <<TOML
[listen]
udp = ["127.0.0.1:53"]
tcp = ["127.0.0.1:53"]
[upstream]
servers = ["tls://192.0.2.2:853#dns.test"]
ca_file = "$DIR/ca.pem"
spki_pins = ["$PIN"]
[authorize]
socket = "$DIR/fwd.sock"
[control]
socket = "$DIR/dnsd.sock"
TOML
in_host "$BIN/dnsd" --validate --config "$DIR/dnsd.toml"
ip netns exec "$HOST" "$BIN/dnsd" --config "$DIR/dnsd.toml" >"$DIR/dnsd.log" 2>&1 &
PIDS+=($!)
wait_for "dnsd" "${PIDS[-1]}" "$DIR/dnsd.log" grep -q "dnsd ready" "$DIR/dnsd.log"

say "curl http://192.0.2.80/ before any DNS answer: refused at once by the kernel"
refused http://192.0.2.80/

say "dig www.demo.test: dnsd asks unbound over TLS, fwd commits the grant, then dnsd answers"
in_host dig @127.0.0.1 +noall +answer www.demo.test A

say "the same curl now succeeds"
in_host curl -sS -m 5 http://192.0.2.80/

say "192.0.2.81 was never answered: still refused"
refused http://192.0.2.81/

say "fail closed: with fwd killed (-9), a new A answer cannot be authorized, so SERVFAIL"
kill -9 "$FWD_PID"; wait "$FWD_PID" 2>/dev/null || true
in_host dig @127.0.0.1 +tries=1 shop.demo.test A | grep -E 'status:|[[:space:]]IN[[:space:]]'
echo "   (the grant already in the kernel still works while fwd is down:)"
in_host curl -sS -m 5 http://192.0.2.80/
start_fwd
echo "fwd restarted; the same query now gets its answer (a CNAME chain: only its target is opened):"
in_host dig @127.0.0.1 +noall +answer shop.demo.test A

say "what fwd holds and why, and dnsd's view"
ctl list
ctl history --limit 10
ctl status
ctl upstreams

say "the kernel set, as nft sees it"
in_host nft list set inet guard auth4

say "demo done; cleaning up"
