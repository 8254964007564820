#!/usr/bin/env bash
# guard package: builds the binaries, generates guardctl's completions and man page and
# the packaged configurations, and runs `cargo deb` (installed once if missing). Prints the path
# of the .deb on the last line of stdout. Extra arguments go to `cargo deb` (e.g. --fast).
# GUARD_PROFILE picks the Cargo profile (default `dist`: fat LTO, the build the benchmarks
# measure; the packaging test uses `release`, which it has built already).
#
# Man pages: guardctl(1) from `guardctl man`, fwd(8) and dnsd(8) from their hidden `--man` flag
# (all clap_mangen).
set -euo pipefail
cd "$(dirname "$0")/.."
CARGO=${CARGO:-cargo}
log() { printf 'package: %s\n' "$*" >&2; }

PROFILE=${GUARD_PROFILE:-dist}

# 1. The binaries. Incremental: an up-to-date build costs nothing.
log "building $PROFILE binaries (fwd, dnsd, guardctl)"
"$CARGO" build --profile "$PROFILE" --locked -p fwd -p dnsd -p guardctl --bins >&2

# cargo-deb maps `target/release/...` assets onto the real target directory of the profile;
# write there too.
TARGET_DIR=${CARGO_TARGET_DIR:-$("$CARGO" metadata --format-version 1 --no-deps \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')}
# Cargo's dev profile builds into target/debug; every other profile into target/<profile>.
REL="$TARGET_DIR/$([ "$PROFILE" = dev ] && echo debug || echo "$PROFILE")"
OUT="$REL/guard-package"
rm -rf "$OUT"
mkdir -p "$OUT"

# 2. guardctl's completions and man page.
log "generating completions and guardctl(1) into $OUT"
"$REL/guardctl" completions bash >"$OUT/guardctl.bash"
"$REL/guardctl" completions zsh >"$OUT/_guardctl"
"$REL/guardctl" completions fish >"$OUT/guardctl.fish"
"$REL/guardctl" man | gzip -9n >"$OUT/guardctl.1.gz"
"$REL/fwd" --man | gzip -9n >"$OUT/fwd.8.gz"
"$REL/dnsd" --man | gzip -9n >"$OUT/dnsd.8.gz"

# 3. The packaged configurations: the examples, adapted to the units in systemd/. Each edit
# must apply exactly once, so a changed example fails here instead of shipping unadapted.
# replace FILE KEY-LINE NEW-LINE: swap the whole line KEY-LINE for NEW-LINE, exactly once.
replace() {
  local file=$1 old=$2 new=$3 n
  n=$(grep -cxF -- "$old" "$file" || true)
  [ "$n" = 1 ] || { log "$file: expected the line '$old' exactly once, found it $n times"; exit 1; }
  OLD="$old" NEW="$new" python3 - "$file" <<'PY'
import os, sys
p = sys.argv[1]
lines = open(p).read().split("\n")
open(p, "w").write("\n".join(os.environ["NEW"] if l == os.environ["OLD"] else l for l in lines))
PY
}

{
  cat <<'EOF'
# /etc/guard/fwd.toml, installed by the guard package (a conffile: your edits survive upgrades).
# It is fwd.example.toml adapted to the packaged units: fwd runs as guard-fwd with
# CAP_NET_ADMIN from systemd (user stays empty), its socket belongs to group guard, and
# dnsd (user guard-dnsd) may call Authorize.
#
# Before `systemctl enable --now guard-fwd.service guard-dnsd.socket`:
#   - put dnsd's upstream resolvers (dnsd.toml [upstream] servers) in [allow] upstreams,
#     unless they are on loopback;
#   - on a host you reach over SSH, add your management network to [allow] cidrs, or start
#     with policy = "audit";
#   - check: fwd --validate --config /etc/guard/fwd.toml
#
EOF
  cat fwd/fwd.example.toml
} >"$OUT/fwd.toml"
replace "$OUT/fwd.toml" 'socket_group = ""' 'socket_group = "guard"'
replace "$OUT/fwd.toml" 'authorizer_users = []' 'authorizer_users = ["guard-dnsd"]'

{
  cat <<'EOF'
# /etc/guard/dnsd.toml, installed by the guard package (a conffile: your edits survive
# upgrades). It is dnsd.example.toml; under the packaged units dnsd gets its sockets from
# guard-dnsd.socket (127.0.0.1:53 and [::1]:53), so [listen] udp/tcp are ignored: change the
# addresses with `systemctl edit guard-dnsd.socket`.
#
# Before enabling: set [upstream] servers (and the same addresses in fwd.toml
# [allow] upstreams), then check: dnsd --validate --config /etc/guard/dnsd.toml
#
EOF
  cat dnsd/dnsd.example.toml
} >"$OUT/dnsd.toml"

# 4. The package.
if ! "$CARGO" deb --version >/dev/null 2>&1; then
  log "installing cargo-deb (once; takes a few minutes)"
  "$CARGO" install cargo-deb --locked >&2
fi
log "running cargo deb"
deb=$("$CARGO" deb -p fwd --profile "$PROFILE" --no-build --strip "$@" | tail -n 1)
[ -f "$deb" ] || { log "cargo deb did not print a package path (got '$deb')"; exit 1; }
log "built $deb"
echo "$deb"
