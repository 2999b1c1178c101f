#!/usr/bin/env bash
# API fuzzing against openapi.json: a real `connwatch run` (SQLite in a temporary folder,
# its platform unreachable, so probes fail as outages) is fed what Schemathesis generates
# from the document; it must answer no 5xx and nothing the document does not describe.
#
#   tests/api/schemathesis.sh              # from anywhere; EXAMPLES=200 for a longer run
#
# Needs: python3 (a venv with Schemathesis is made in .ci/.venv), cargo. Stops only the
# daemon it started (by pid); binds loopback only.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

venv=.ci/.venv
version=4.32.5
if ! "$venv/bin/schemathesis" --version 2>/dev/null | grep -q "$version"; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "schemathesis==$version"
fi
cargo build -q --bin connwatch

work=$(mktemp -d)
daemon=""
cleanup() {
  if [ -n "$daemon" ]; then kill "$daemon" 2>/dev/null || true; wait "$daemon" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
for id in acme bugfree; do printf 'tok_%s\n' "$id" > "$work/$id.token"; done
cat > "$work/connwatch.toml" <<TOML
[store]
url = "sqlite://$work/connwatch.db"
[server]
admin = "127.0.0.1:$port"
[probe]
interval = "1h"
timeout = "1s"
[platforms.makini]
base_url = "http://127.0.0.1:1"
probe = { path = "/v1/connection" }
[[connections]]
id = "acme"
name = "ACME Pest Control"
platform = "makini"
token = { file = "$work/acme.token" }
[[connections]]
id = "bugfree"
name = "Bugfree Lawns"
platform = "makini"
token = { file = "$work/bugfree.token" }
TOML

target/debug/connwatch run --config "$work/connwatch.toml" > "$work/daemon.log" 2>&1 &
daemon=$!
for _ in $(seq 100); do
  curl -fsS "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && break
  sleep 0.1
done
curl -fsS "http://127.0.0.1:$port/readyz" >/dev/null || { cat "$work/daemon.log"; exit 1; }

status=0
"$venv/bin/schemathesis" run openapi.json \
  --url "http://127.0.0.1:$port" \
  --checks all \
  --max-examples "${EXAMPLES:-50}" \
  --seed 1 \
  --no-color || status=$?
if grep -Eq 'panicked|tok_(acme|bugfree)' "$work/daemon.log"; then
  echo "the daemon's log shows a panic or a token:"; cat "$work/daemon.log"; status=1
fi
exit "$status"
