#!/usr/bin/env bash
# Checks the operations files with the real tools: Prometheus rules and their unit
# tests (promtool), the systemd unit (systemd-analyze verify + security) and its
# sysusers.d file, and the Grafana dashboard.
#
#   tests/ops/check.sh            # from anywhere: it changes to the repository root
#   PROMTOOL=/opt/prometheus/promtool tests/ops/check.sh
#
# Needs: promtool (Debian package `prometheus`, or PROMTOOL=path), systemd-analyze and
# systemd-sysusers (package `systemd`; PID 1 need not be systemd), python3.
# Neither the connwatch binary nor a running systemd is needed: `verify` refuses a unit
# whose ExecStart= binary does not exist, so the unit is checked as a copy in a temporary
# directory whose ExecStart= points at a stub executable; nothing else is changed.
#
# Prints one line per check and exits non-zero if any check failed.

set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."

# Tools from the environment (a path or a command name), else from PATH.
PROMTOOL="$(command -v "${PROMTOOL:-promtool}" || true)"
SYSTEMD_ANALYZE="$(command -v "${SYSTEMD_ANALYZE:-systemd-analyze}" || true)"
SYSTEMD_SYSUSERS="$(command -v "${SYSTEMD_SYSUSERS:-systemd-sysusers}" || true)"
PYTHON="${PYTHON:-python3}"

RULES=alerts/connwatch.rules.yml
RULE_TESTS=alerts/connwatch.rules.test.yml
UNIT=systemd/connwatch.service
SYSUSERS=systemd/connwatch.sysusers
DASHBOARD=grafana/connwatch.json
# systemd-analyze security reports exposure on a 0-10 scale; --threshold takes 0-100
# and fails when exposure*10 is above it (checked on systemd 252: a 1.2 unit passes
# --threshold=12 and fails --threshold=11). 15 means "at most 1.5".
MAX_EXPOSURE=1.5
THRESHOLD=15

# The daemon's metric contract (DESIGN.md 4.5 plus the outbox/relay gauges). Rules and
# dashboard may use these, their histogram series, and `up`.
CONTRACT_METRICS="
connwatch_connections
connwatch_probes_total
connwatch_probe_duration_seconds
connwatch_probe_duration_seconds_bucket
connwatch_probe_duration_seconds_sum
connwatch_probe_duration_seconds_count
connwatch_scheduler_last_tick_timestamp_seconds
connwatch_build_info
connwatch_webhooks_received_total
connwatch_connections_quiet
connwatch_polls_total
connwatch_changes_recovered_total
connwatch_relay_total
connwatch_relay_outbox_pending
connwatch_emails_total
connwatch_email_outbox_pending
connwatch_email_outbox_oldest_pending_age_seconds
"

work="$(mktemp -d)"
trap 'rm -rf -- "$work"' EXIT

failures=0
pass() { printf 'ok    %s\n' "$1"; }
fail() {
    printf 'FAIL  %s\n' "$1"
    if [[ -n "${2:-}" && -s "$2" ]]; then sed 's/^/      | /' "$2"; fi
    failures=$((failures + 1))
}
need() {
    if [[ -z "$2" || ! -x "$2" ]]; then
        fail "$1 not found (install it or set ${3})"
        return 1
    fi
}

# --- Prometheus ---------------------------------------------------------------------
if need promtool "$PROMTOOL" PROMTOOL; then
    if "$PROMTOOL" check rules "$RULES" >"$work/out" 2>&1; then
        pass "promtool check rules $RULES"
    else
        fail "promtool check rules $RULES" "$work/out"
    fi

    if "$PROMTOOL" test rules "$RULE_TESTS" >"$work/out" 2>&1; then
        pass "promtool test rules $RULE_TESTS"
    else
        fail "promtool test rules $RULE_TESTS" "$work/out"
    fi

    # Every alert in the rules is tested both firing and not firing.
    cat >"$work/alerts_tested.py" <<'EOF'
import re, sys
rules = re.findall(r"^\s*-\s*alert:\s*(\S+)", open(sys.argv[1]).read(), re.M)
firing, quiet, current = set(), set(), None
for line in open(sys.argv[2]):
    m = re.match(r"\s*(?:-\s*)?alertname:\s*(\S+)", line)
    if m:
        current = m.group(1)
        continue
    m = re.match(r"\s*exp_alerts:\s*(.*?)\s*$", line)
    if m and current:
        (quiet if m.group(1) == "[]" else firing).add(current)
        current = None
problems = [f"{a}: no test where it fires" for a in rules if a not in firing]
problems += [f"{a}: no test where it does not fire" for a in rules if a not in quiet]
if not rules:
    problems.append("no alerts found")
print("\n".join(problems))
sys.exit(1 if problems else 0)
EOF
    if "$PYTHON" "$work/alerts_tested.py" "$RULES" "$RULE_TESTS" >"$work/out" 2>&1; then
        pass "every alert is tested firing and not firing"
    else
        fail "every alert is tested firing and not firing" "$work/out"
    fi
fi

# Rules and dashboard use only contract metric names.
cat >"$work/metric_names.py" <<'EOF'
import re, sys
allowed = set(sys.argv[1].split())
bad = False
for path in sys.argv[2:]:
    names = set(re.findall(r"\bconnwatch_[a-z0-9_]+", open(path).read()))
    unknown = sorted(names - allowed)
    if unknown:
        print(f"{path}: not in the metric contract: {', '.join(unknown)}")
        bad = True
sys.exit(1 if bad else 0)
EOF
if "$PYTHON" "$work/metric_names.py" "$CONTRACT_METRICS" "$RULES" "$DASHBOARD" >"$work/out" 2>&1; then
    pass "rules and dashboard use only contract metric names"
else
    fail "rules and dashboard use only contract metric names" "$work/out"
fi

# --- systemd ------------------------------------------------------------------------
if need systemd-analyze "$SYSTEMD_ANALYZE" SYSTEMD_ANALYZE; then
    mkdir -p "$work/bin" "$work/unit"
    printf '#!/bin/sh\nexit 0\n' >"$work/bin/connwatch"
    chmod 0755 "$work/bin/connwatch"
    sed "s#^ExecStart=/usr/local/bin/connwatch #ExecStart=$work/bin/connwatch #" \
        "$UNIT" >"$work/unit/connwatch.service"
    if ! grep -q "^ExecStart=$work/bin/connwatch " "$work/unit/connwatch.service"; then
        echo "ExecStart=/usr/local/bin/connwatch … not found in $UNIT" >"$work/out"
        fail "systemd-analyze verify $UNIT (stub ExecStart)" "$work/out"
    else
        # `verify` exits 0 on an unknown key or bad value and only warns on stderr: any
        # output at all is a failure.
        rc=0
        "$SYSTEMD_ANALYZE" verify "$work/unit/connwatch.service" >"$work/out" 2>&1 || rc=$?
        if [[ $rc -eq 0 && ! -s "$work/out" ]]; then
            pass "systemd-analyze verify $UNIT (silent)"
        else
            echo "(exit status $rc)" >>"$work/out"
            fail "systemd-analyze verify $UNIT (must exit 0 and print nothing)" "$work/out"
        fi

        rc=0
        "$SYSTEMD_ANALYZE" security --offline=true --threshold="$THRESHOLD" \
            "$work/unit/connwatch.service" >"$work/security" 2>"$work/err" || rc=$?
        exposure="$(sed -n 's/.*Overall exposure level for connwatch\.service: \([0-9][0-9.]*\).*/\1/p' "$work/security")"
        if [[ $rc -eq 0 && -n "$exposure" && ! -s "$work/err" ]] &&
            awk -v e="$exposure" -v m="$MAX_EXPOSURE" 'BEGIN { exit !(e <= m) }'; then
            pass "systemd-analyze security --offline=true: exposure $exposure <= $MAX_EXPOSURE"
        else
            { grep -E '^✗|Overall' "$work/security" || cat "$work/security"; cat "$work/err"
              echo "(exit status $rc, exposure ${exposure:-unknown})"; } >"$work/out"
            fail "systemd-analyze security --offline=true: exposure must be <= $MAX_EXPOSURE" "$work/out"
        fi
    fi
fi

if need systemd-sysusers "$SYSTEMD_SYSUSERS" SYSTEMD_SYSUSERS; then
    mkdir -p "$work/root/etc"
    rc=0
    "$SYSTEMD_SYSUSERS" --root="$work/root" "$PWD/$SYSUSERS" >"$work/out" 2>&1 || rc=$?
    if [[ $rc -eq 0 ]] && ! grep -qiE 'ignoring|invalid|failed' "$work/out" &&
        grep -q '^connwatch:x:[0-9]*:[0-9]*:.*:/var/lib/connwatch:/usr/sbin/nologin$' "$work/root/etc/passwd" &&
        grep -q '^connwatch:x:' "$work/root/etc/group"; then
        pass "systemd-sysusers $SYSUSERS creates user and group connwatch"
    else
        echo "(exit status $rc)" >>"$work/out"
        fail "systemd-sysusers $SYSUSERS creates user and group connwatch" "$work/out"
    fi
fi

# --- Grafana ------------------------------------------------------------------------
if "$PYTHON" -m json.tool "$DASHBOARD" >/dev/null 2>"$work/out"; then
    pass "$DASHBOARD is valid JSON"
else
    fail "$DASHBOARD is valid JSON" "$work/out"
fi

cat >"$work/dashboard.py" <<'EOF'
import json, sys
path, rules_out = sys.argv[1], sys.argv[2]
with open(path) as f:
    d = json.load(f)
problems = []
DS = {"type": "prometheus", "uid": "${datasource}"}
if d.get("uid") != "connwatch-overview":
    problems.append(f'uid is {d.get("uid")!r}, want "connwatch-overview"')
if not isinstance(d.get("schemaVersion"), int) or d["schemaVersion"] < 36:
    problems.append(f'schemaVersion {d.get("schemaVersion")!r} is too old')
variables = {v.get("name"): v for v in d.get("templating", {}).get("list", [])}
v = variables.get("datasource")
if not v or v.get("type") != "datasource" or v.get("query") != "prometheus":
    problems.append("templating variable `datasource` of type datasource/prometheus missing")

def walk(node, where):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "datasource" and (isinstance(value, (int, float)) and not isinstance(value, bool)
                                        or isinstance(value, str) and value.strip().isdigit()):
                problems.append(f"{where}: numeric datasource {value!r}")
            if key == "datasource" and isinstance(value, dict) and isinstance(value.get("id"), int):
                problems.append(f"{where}: datasource with numeric id")
            walk(value, f"{where}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            walk(value, f"{where}[{i}]")
walk(d, "$")

exprs = []
def panels(ps):
    for p in ps:
        yield p
        yield from panels(p.get("panels", []))
for p in panels(d.get("panels", [])):
    name = f'panel {p.get("id")} "{p.get("title")}"'
    if p.get("datasource") != DS:
        problems.append(f"{name}: datasource {p.get('datasource')!r}, want {DS}")
    if p.get("type") != "row" and not p.get("targets"):
        problems.append(f"{name}: no targets")
    for t in p.get("targets", []):
        if t.get("datasource") != DS:
            problems.append(f"{name} target {t.get('refId')}: datasource {t.get('datasource')!r}")
        exprs.append((name, t.get("expr", "")))
for name, v in variables.items():
    if v.get("type") == "query" and v.get("datasource") != DS:
        problems.append(f"variable {name}: datasource {v.get('datasource')!r}")

# Every query as a recording rule, with Grafana's variables filled in, for promtool.
with open(rules_out, "w") as f:
    f.write("groups:\n  - name: dashboard\n    rules:\n")
    for i, (name, expr) in enumerate(exprs):
        expr = (expr.replace("$__rate_interval", "5m").replace("$__interval", "1m")
                    .replace("$job", "connwatch.*"))
        f.write(f"      - record: dashboard_query_{i}\n        expr: {json.dumps(expr)}\n")
if not exprs:
    problems.append("no queries found")
for p in problems:
    print(p)
sys.exit(1 if problems else 0)
EOF
if "$PYTHON" "$work/dashboard.py" "$DASHBOARD" "$work/dashboard.rules.yml" >"$work/out" 2>&1; then
    pass "$DASHBOARD: uid connwatch-overview, \${datasource} everywhere, no numeric datasource ids"
else
    fail "$DASHBOARD: uid, datasource variable, datasource references" "$work/out"
fi

if [[ -n "$PROMTOOL" && -x "$PROMTOOL" && -s "$work/dashboard.rules.yml" ]]; then
    if "$PROMTOOL" check rules "$work/dashboard.rules.yml" >"$work/out" 2>&1; then
        pass "$DASHBOARD: every query parses as PromQL"
    else
        fail "$DASHBOARD: every query parses as PromQL" "$work/out"
    fi
fi

if [[ $failures -gt 0 ]]; then
    printf '%d check(s) failed\n' "$failures"
    exit 1
fi
echo "all ops checks passed"
