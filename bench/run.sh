#!/usr/bin/env bash
# bench/run.sh - connwatch benchmarks (issue 6), loopback only, with the reference measured
# in the same run beside every figure. See bench/README.md for what each number means.
#   1. burst:     N (100,000) connections always due, probed as fast as connwatch can, every
#                 result checked in SQLite; beside it blackbox_exporter driven by wrk (64, 256)
#   2. scheduled: SCHED_N (100,000) connections at a 5-minute interval for DURATION s on
#                 SQLite: lateness p50/p99, CPU %, RSS, database growth
#   3. webhook:   64 senders POSTing signed ~1 KiB Standard Webhooks deliveries, on SQLite and
#                 PostgreSQL; beside it nginx answering the same POST (wrk, 64 connections)
#   4. replicas:  3 `connwatch run` on one fresh PostgreSQL database sharing REPL_N (30,000)
#                 connections at a 1-minute interval: each replica's share (its own counter),
#                 duplicate probes (nginx log, one token per connection; must be 0), CPU, RSS
# Every load is bounded in time and count; every process started here is stopped on exit.
# Knobs (environment): QUICK=1 (smoke run: 1 rep, short durations), REPS (3), BENCHES
# ("burst scheduled webhook replicas"), N (100000), SCHED_N (100000), DURATION (600; QUICK 120),
# SCHED_REPS (1), BURST_DUR (20), WARMUP (5), BB_DUR (10), BB_CONCS ("64 256"), WH_DUR (15),
# WH_CONC (64), WH_THREADS (1), BURST_CONC (1024), QUIET_WAIT (60), BG_MAX (10), REPL_N (30000),
# REPL_DUR (180; QUICK 90), REPL_WARM (65),
# PG (postgres://postgres@127.0.0.1:5432), OUT (results folder), SKIP_BUILD=1.
set -euo pipefail
cd "$(dirname "$0")"; BENCH=$PWD; ROOT=$(cd .. && pwd)

QUICK=${QUICK:-0}
if [[ $QUICK == 1 ]]; then
  REPS=${REPS:-1} DURATION=${DURATION:-120} BURST_DUR=${BURST_DUR:-8} WARMUP=${WARMUP:-3}
  BB_DUR=${BB_DUR:-5} WH_DUR=${WH_DUR:-5} QUIET_WAIT=${QUIET_WAIT:-10} REPL_DUR=${REPL_DUR:-90}
else
  REPS=${REPS:-3} DURATION=${DURATION:-600} BURST_DUR=${BURST_DUR:-20} WARMUP=${WARMUP:-5}
  BB_DUR=${BB_DUR:-10} WH_DUR=${WH_DUR:-15} QUIET_WAIT=${QUIET_WAIT:-60} REPL_DUR=${REPL_DUR:-180}
fi
SCHED_REPS=${SCHED_REPS:-1}
BENCHES=${BENCHES:-"burst scheduled webhook replicas"} N=${N:-100000} SCHED_N=${SCHED_N:-100000}
BB_CONCS=${BB_CONCS:-"64 256"} BURST_CONC=${BURST_CONC:-1024} BG_MAX=${BG_MAX:-10}
WH_CONC=${WH_CONC:-64} WH_THREADS=${WH_THREADS:-1} WH_CONNS=${WH_CONNS:-16}
PG=${PG:-postgres://postgres@127.0.0.1:5432}
REPL_N=${REPL_N:-30000} REPL_WARM=${REPL_WARM:-65} REPL_INTERVAL=60   # replicas: interval "1m"
REPL_NGX_PORT=18081 REPL_ADMIN0=19465 REPL_WH0=18091   # replica i: admin REPL_ADMIN0+i, webhooks REPL_WH0+i
HZ=$(getconf CLK_TCK) NCPU=$(nproc)
export PGOPTIONS='-c client_min_messages=warning' 
NGX_PORT=18080 BB_PORT=9115 ADMIN_PORT=19464 WH_PORT=18090
TARGET=http://127.0.0.1:$NGX_PORT/v1/connection
PROBE="http://127.0.0.1:$BB_PORT/probe?module=api_bearer&target=$TARGET"
BIN=$ROOT/target/release/connwatch LOADGEN=$ROOT/target/release/examples/webhook_load
WHSEC=whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw
has() { [[ " $BENCHES " == *" $1 "* ]]; }

# --- what we need: Debian packages (only if missing), the release binaries -------------
need=()
command -v nginx >/dev/null || need+=(nginx-light)
command -v wrk >/dev/null || need+=(wrk)
command -v curl >/dev/null || need+=(curl)
command -v sqlite3 >/dev/null || need+=(sqlite3)
has burst && ! command -v prometheus-blackbox-exporter >/dev/null && need+=(prometheus-blackbox-exporter)
{ has webhook || has replicas; } && ! command -v psql >/dev/null && need+=(postgresql-client)
if ((${#need[@]})); then
  echo "== installing ${need[*]}"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}"
fi
binaries_ok() { [[ -x $BIN ]] && { ! has webhook || [[ -x $LOADGEN ]]; }; }   # the load generator: webhook only
if [[ ${SKIP_BUILD:-0} != 1 ]]; then
  echo "== cargo build --release --bin connwatch --examples"
  if ! (cd "$ROOT" && cargo build --release --bin connwatch --examples >"${TMPDIR:-/tmp}/connwatch-bench-build.log" 2>&1); then
    tail -20 "${TMPDIR:-/tmp}/connwatch-bench-build.log" >&2
    binaries_ok || { echo "build failed" >&2; exit 1; }
    echo "warning: build failed (see above); benchmarking the binaries already built" >&2
  fi
fi
binaries_ok || { echo "missing $BIN or $LOADGEN" >&2; exit 1; }
ports=($NGX_PORT $BB_PORT $ADMIN_PORT $WH_PORT)
has replicas && ports+=($REPL_NGX_PORT $((REPL_ADMIN0)) $((REPL_ADMIN0 + 1)) $((REPL_ADMIN0 + 2)) $((REPL_WH0)) $((REPL_WH0 + 1)) $((REPL_WH0 + 2)))
for port in "${ports[@]}"; do   # e.g. Debian's own exporter on :9115
  ! ss -Hltn "sport = :$port" | grep -q . || { echo "port $port busy; stop its owner first" >&2; exit 1; }
done

RUN=$(mktemp -d -t connwatch-bench.XXXXXX)
OUT=${OUT:-/tmp/connwatch-bench-$(date -u +%Y%m%dT%H%M%SZ)}; mkdir -p "$OUT"
RAW=$OUT/raw.tsv; : >"$RAW"
PIDS=() PGDBS=()
cleanup() {
  local p; set +e
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null; done
  for p in "${PGDBS[@]}"; do psql "$PG/postgres" -qAtc "DROP DATABASE IF EXISTS $p WITH (FORCE)" >/dev/null 2>&1; done
  rm -rf "$RUN"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- helpers ----------------------------------------------------------------------------
now()   { date +%s.%N; }
ticks() { sed 's/^.*) //' "/proc/$1/stat" | awk '{print $12+$13}'; }     # utime+stime
cpu()   { awk '/^cpu /{print $2+$3+$4+$7+$8, $9}' /proc/stat; }  # all cores: busy steal
kib()   { awk -v k="$2:" '$1 == k {print $2}' "/proc/$1/status"; }       # VmRSS, VmHWM
load1() { cut -d' ' -f1 /proc/loadavg; }
pg_ticks() { local p s=0 t; for p in $(pgrep -x postgres); do t=$(ticks "$p" 2>/dev/null) && s=$((s + t)); done; echo $s; }  # PostgreSQL server, all processes
metrics() { curl -sf --max-time 10 "http://127.0.0.1:$ADMIN_PORT/metrics" || true; }
msum()  { awk -v m="$1" 'index($0, m "{") == 1 || $1 == m {s += $NF} END {printf "%.0f\n", s}' "${2:--}"; }
calc()  { awk "BEGIN {printf \"%.${2:-2}f\n\", ($1)}"; }
log()   { echo "[$(date -u +%H:%M:%S)] $*"; }
rec()   { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$RAW"; }   # test rep metric value
dbsize() { local s=0 f; for f in "$1" "$1-wal"; do [[ -f $f ]] && s=$((s + $(stat -c %s "$f"))); done; echo $s; }
wait_for() { local secs=$1 i; shift; for i in $(seq $((secs * 10))); do "$@" && return 0; sleep 0.1; done; return 1; }
ready()  { curl -sf -o /dev/null --max-time 2 "http://127.0.0.1:$ADMIN_PORT/metrics"; }
wait_quiet() {   # other jobs may share this box: wait (<= QUIET_WAIT s) until < BG_MAX % busy
  local i a b; for i in $(seq "$QUIET_WAIT"); do a=($(cpu)); sleep 1; b=($(cpu))
    (( (b[0] + b[1] - a[0] - a[1]) * 100 < HZ * NCPU * BG_MAX )) && return 0; done
  log "warning: machine still busy after ${QUIET_WAIT}s (other jobs); measuring anyway"; }
# other% of the machine used by processes not measured here, over a window: m0 m1 ours secs
other_pct() { awk -v a="$1" -v b="$2" -v ours="$3" -v s="$4" -v hz="$HZ" -v n="$NCPU" 'BEGIN {
  split(a, u, " "); split(b, v, " "); printf "%.1f\n", (v[1] - u[1] - ours) * 100 / (hz * s * n) }'; }
forget() { local p keep=(); for p in "${PIDS[@]}"; do if [[ $p != "$1" ]]; then keep+=("$p"); fi; done; PIDS=("${keep[@]}"); }
stop_pid() {   # SIGTERM, then SIGKILL after 20 s; sets STOP_S to the seconds it took
  local pid=$1 t0 i; t0=$(now); kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 200); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then log "warning: pid $pid ignored SIGTERM for 20 s; SIGKILL" >&2; kill -KILL "$pid"; fi
  wait "$pid" 2>/dev/null || true; forget "$pid"; STOP_S=$(calc "$(now) - $t0"); }
# wrk output -> "requests rps p50ms p99ms errors"
stats_wrk() { awk 'function ms(x) { return x ~ /us$/ ? x / 1000 : x ~ /ms$/ ? x + 0 : x * 1000 }
    $1 == "50%" { p50 = ms($2) }  $1 == "99%" { p99 = ms($2) }
    / requests in / { n = $1 }    /^Requests\/sec/ { rps = $2 }
    /Socket errors/ { gsub(",", ""); e += $4 + $6 + $8 + $10 }  /Non-2xx/ { e += $NF }
    END { print n + 0, rps + 0, p50 + 0, p99 + 0, e + 0 }' "$1"; }
# Quantile q of a Prometheus histogram (cumulative buckets), linear inside the bucket;
# with a second file, of the observations made between the two snapshots.
hist_q() {   # q metric file [earlier-file]
  awk -v q="$1" -v m="$2_bucket" '
    function le(s) { match(s, /le="[^"]*"/); return substr(s, RSTART + 4, RLENGTH - 5) }
    index($0, m "{") == 1 { v = le($0); if (FILENAME == ARGV[1]) base[v] = $NF; else { k++; l[k] = v; c[k] = $NF } }
    END { tot = c[k] - base[l[k]]; if (tot <= 0) { print "nan"; exit }
      r = q * tot; pc = 0; pl = 0
      for (i = 1; i <= k; i++) { x = c[i] - base[l[i]]
        if (x >= r) { if (l[i] == "+Inf") { print pl; exit }   # beyond the last bound
          printf "%.3f\n", pl + (l[i] - pl) * (x > pc ? (r - pc) / (x - pc) : 0); exit }
        pc = x; pl = l[i] } }' "${4:-/dev/null}" "$3"; }

# connwatch config: gen_config FILE N STORE_URL INTERVAL TIMEOUT CONCURRENCY [webhooks]
gen_config() {
  local f=$1 n=$2 url=$3 interval=$4 timeout=$5 conc=$6 wh=${7:-}
  {
    printf '[store]\nurl = "%s"\n\n[server]\nadmin = "127.0.0.1:%s"\n' "$url" "$ADMIN_PORT"
    [[ -n $wh ]] && printf 'webhooks = "127.0.0.1:%s"\n' "$WH_PORT"
    printf '\n[probe]\ninterval = "%s"\ntimeout = "%s"\nconcurrency = %s\n\n' "$interval" "$timeout" "$conc"
    printf '[platforms.mock]\nbase_url = "http://127.0.0.1:%s"\n' "$NGX_PORT"
    printf 'probe = { method = "GET", path = "/v1/connection" }\n'
    printf 'auth = { header = "Authorization", scheme = "Bearer" }\n'
    [[ -n $wh ]] && printf '\n[platforms.mock.webhooks]\nsecrets = [{ file = "%s" }]\n%s\n%s\n%s\n%s\n' \
      "$RUN/whsec" 'connection_pointer = "/connectionId"' 'type_pointer = "/type"' \
      'change_id_pointer = "/data/id"' 'change_updated_pointer = "/data/_updatedAt"'
    awk -v n="$n" -v tok="$RUN/token" 'BEGIN { for (i = 1; i <= n; i++)
      printf "\n[[connections]]\nid = \"c%06d\"\nplatform = \"mock\"\nremote_id = \"conn_%d\"\ntoken = { file = \"%s\" }\n", i, i, tok }'
  } >"$f"
}
start_cw() {   # start_cw CONFIG LOG -> sets CW (pid) and CW_T0 (launch time)
  CW_T0=$(now); "$BIN" run --config "$1" >"$2" 2>&1 & CW=$!; PIDS+=("$CW")
  wait_for 600 ready || { echo "connwatch did not answer /metrics within 600 s; log:" >&2; tail -20 "$2" >&2; exit 1; }
}
log_problems() {   # log lines at WARN/ERROR level and panics: count, and the first few shown
  local n; n=$(grep -cE '(WARN|ERROR|panicked)' "$1" || true); echo "${n:-0}"
  ((n > 0)) && grep -E '(WARN|ERROR|panicked)' "$1" | head -3 | cut -c1-300 >&2 || true; }
panics() { local n; n=$(grep -c 'panicked' "$1" || true); echo "${n:-0}"; }

# --- the fake platform (nginx) and the exporter -----------------------------------------
echo good >"$RUN/token"; echo "$WHSEC" >"$RUN/whsec"; chmod 600 "$RUN/token" "$RUN/whsec"
mkdir -p "$RUN/nginx"
nginx -p "$RUN/nginx" -e "$RUN/nginx/error.log" -c "$BENCH/mock-upstream.conf" -g 'daemon off;' & NGX=$!; PIDS+=("$NGX")
wait_for 10 curl -sf -o /dev/null -H 'Authorization: Bearer good' "$TARGET" || { echo "nginx did not start" >&2; exit 1; }
NGXW=$(pgrep -P "$NGX")
if has burst; then
  prometheus-blackbox-exporter --config.file="$BENCH/blackbox.yml" --log.level=warn \
    --web.listen-address=127.0.0.1:$BB_PORT >"$RUN/bb.log" 2>&1 & BB=$!; PIDS+=("$BB")
  wait_for 10 curl -sf -o /dev/null "http://127.0.0.1:$BB_PORT/metrics" || { echo "blackbox did not start" >&2; exit 1; }
  [[ $(curl -s "$PROBE" | awk '$1 == "probe_success" {print $2}') == 1 ]] || { echo "blackbox probe fails" >&2; exit 1; }
fi
cat >"$RUN/post.lua" <<'EOF'
wrk.method = "POST"; wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"type":"connection.updated","connectionId":"conn_1","data":"' .. string.rep("x", 960) .. '"}'
EOF

commit=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo "?")
dirty=$(git -C "$ROOT" status --porcelain -- src Cargo.toml migrations 2>/dev/null | wc -l)
{ echo "connwatch bench: $(date -u +%FT%TZ), commit $commit$( ((dirty)) && echo " + $dirty uncommitted src file(s)")," \
       "binary built $(date -u -r "$BIN" +%FT%TZ)"
  echo "machine: $NCPU cores ($(awk -F': ' '/model name/{print $2; exit}' /proc/cpuinfo)), $(free -g | awk '/Mem:/{print $2}') GiB," \
       "kernel $(uname -r), loadavg $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "settings: QUICK=$QUICK REPS=$REPS BENCHES='$BENCHES' N=$N SCHED_N=$SCHED_N DURATION=$DURATION" \
       "SCHED_REPS=$SCHED_REPS BURST_DUR=$BURST_DUR BB_DUR=$BB_DUR WH_DUR=$WH_DUR WH_CONC=$WH_CONC" \
       "REPL_N=$REPL_N REPL_DUR=$REPL_DUR REPL_WARM=$REPL_WARM"
} | tee "$OUT/header.txt"

# --- 1. burst ---------------------------------------------------------------------------
bench_burst() {   # rep
  local r=$1 d=$RUN/burst$r; mkdir -p "$d"
  gen_config "$d/cw.toml" "$N" "sqlite://$d/cw.db" 1s 900ms "$BURST_CONC"
  wait_quiet; rec burst "$r" load1 "$(load1)"
  start_cw "$d/cw.toml" "$d/cw.log"
  local startup; startup=$(calc "$(now) - $CW_T0")
  # first full round from a cold start: launch until N probes are counted
  local i p=0; for i in $(seq 1200); do p=$(metrics | msum connwatch_probes_total); ((p >= N)) && break; sleep 0.1; done
  local round1 round1_cpu; round1=$(calc "$(now) - $CW_T0"); round1_cpu=$(calc "$(ticks "$CW") / $HZ")
  sleep "$WARMUP"
  local p0 c0 n0 m0 s0 t0 p1 c1 n1 m1 s1 t1
  p0=$(metrics | msum connwatch_probes_total) c0=$(ticks "$CW") n0=$(ticks "$NGXW") m0=$(cpu)
  s0=$(curl -s "http://127.0.0.1:$NGX_PORT/stub_status" | awk 'NR==3{print $1}') t0=$(now)
  sleep "$BURST_DUR"
  metrics >"$d/metrics.txt"; p1=$(msum connwatch_probes_total <"$d/metrics.txt")
  c1=$(ticks "$CW") n1=$(ticks "$NGXW") m1=$(cpu) t1=$(now)
  s1=$(curl -s "http://127.0.0.1:$NGX_PORT/stub_status" | awk 'NR==3{print $1}')
  local hwm rss; hwm=$(kib "$CW" VmHWM) rss=$(kib "$CW" VmRSS)
  stop_pid "$CW"; local down=$STOP_S
  local secs probes rate cpu_us; secs=$(calc "$t1 - $t0" 3); probes=$((p1 - p0))
  rate=$(calc "$probes / $secs" 0); cpu_us=$(calc "($c1 - $c0) / $HZ * 1e6 / $probes" 1)
  local okp; okp=$(awk '/^connwatch_probes_total\{/ { t += $NF; if (/outcome="ok"/) o += $NF } END { printf "%.2f", t ? o * 100 / t : 0 }' "$d/metrics.txt")
  local recorded okrows; recorded=$(sqlite3 "$d/cw.db" "SELECT count(*) FROM connections WHERE last_probe_at IS NOT NULL")
  okrows=$(sqlite3 "$d/cw.db" "SELECT count(*) FROM connections WHERE last_outcome = 'ok'")
  rec burst "$r" probes_per_s "$rate"; rec burst "$r" cpu_us_per_probe "$cpu_us"
  rec burst "$r" peak_rss_mib "$(calc "$hwm / 1024" 1)"; rec burst "$r" rss_end_mib "$(calc "$rss / 1024" 1)"
  rec burst "$r" ngx_us_per_probe "$(calc "($n1 - $n0) / $HZ * 1e6 / $probes" 1)"
  rec burst "$r" tcp_conns_per_probe "$(calc "($s1 - $s0 - 1) / $probes" 4)"
  rec burst "$r" round_wall_s "$(calc "$N / $rate" 2)"; rec burst "$r" round_cpu_s "$(calc "$N * $cpu_us / 1e6" 2)"
  rec burst "$r" first_round_wall_s "$round1"; rec burst "$r" first_round_cpu_s "$round1_cpu"
  rec burst "$r" startup_s "$startup"; rec burst "$r" shutdown_s "$down"
  rec burst "$r" ok_pct "$okp"; rec burst "$r" recorded "$recorded"; rec burst "$r" recorded_ok "$okrows"
  rec burst "$r" other_pct "$(other_pct "$m0" "$m1" $((c1 - c0 + n1 - n0)) "$secs")"
  rec burst "$r" log_problems "$(log_problems "$d/cw.log")"; rec burst "$r" panics "$(panics "$d/cw.log")"
  log "burst rep $r: $rate probes/s, $cpu_us us CPU/probe, peak RSS $(calc "$hwm / 1024" 1) MiB," \
      "recorded $recorded/$N (ok $okrows), first round ${round1}s, ok $okp %"
  cp "$d/cw.log" "$OUT/burst$r.log"; rm -rf "$d"
}
bench_wrk() {   # test rep conc url [wrk args]: blackbox (pid $BB measured) or nginx alone
  local t=$1 r=$2 c=$3 url=$4; shift 4
  wait_quiet; rec "$t" "$r" load1 "$(load1)"
  local b0=0 b1=0 n0 n1 m0 m1 t0 t1 tm
  [[ $t == blackbox* ]] && b0=$(ticks "$BB"); n0=$(ticks "$NGXW") m0=$(cpu) t0=$(now)
  { TIMEFORMAT='%U %S'; time timeout $((BB_DUR + 30)) wrk -t1 -c"$c" -d"${BB_DUR}s" --latency "$@" "$url" >"$RUN/wrk.out" 2>&1; } 2>"$RUN/time.out"
  t1=$(now) m1=$(cpu) n1=$(ticks "$NGXW"); [[ $t == blackbox* ]] && b1=$(ticks "$BB")
  tm=$(awk -v hz="$HZ" '{printf "%.0f", ($1 + $2) * hz}' "$RUN/time.out")
  local st; st=($(stats_wrk "$RUN/wrk.out"))
  rec "$t" "$r" rps "${st[1]}"; rec "$t" "$r" p50_ms "${st[2]}"; rec "$t" "$r" p99_ms "${st[3]}"; rec "$t" "$r" errors "${st[4]}"
  [[ $t == blackbox* ]] && rec "$t" "$r" cpu_us_per_probe "$(calc "($b1 - $b0) / $HZ * 1e6 / ${st[0]}" 1)"
  rec "$t" "$r" ngx_us_per_req "$(calc "($n1 - $n0) / $HZ * 1e6 / ${st[0]}" 1)"
  rec "$t" "$r" other_pct "$(other_pct "$m0" "$m1" $((b1 - b0 + n1 - n0 + tm)) "$(calc "$t1 - $t0")")"
  log "$t c=$c rep $r: ${st[1]} req/s, p99 ${st[3]} ms, errors ${st[4]}"
}

# --- 2. scheduled -----------------------------------------------------------------------
bench_scheduled() {   # rep
  local r=$1 d=$RUN/sched$r; mkdir -p "$d"
  gen_config "$d/cw.toml" "$SCHED_N" "sqlite://$d/cw.db" 5m 10s 256
  log "scheduled rep $r: $SCHED_N connections at 5m for ${DURATION}s (config $(du -h "$d/cw.toml" | cut -f1))"
  wait_quiet; rec scheduled "$r" load1 "$(load1)"
  local m0; m0=$(cpu)
  start_cw "$d/cw.toml" "$d/cw.log"
  local startup; startup=$(calc "$(now) - $CW_T0")
  wait_for 300 curl -sf -o /dev/null --max-time 2 "http://127.0.0.1:$ADMIN_PORT/readyz" || true
  local ready_s; ready_s=$(calc "$(now) - $CW_T0")
  rec scheduled "$r" startup_s "$startup"; rec scheduled "$r" ready_s "$ready_s"
  local startup_cpu; startup_cpu=$(calc "$(ticks "$CW") / $HZ")
  log "  /metrics after ${startup}s, /readyz after ${ready_s}s, start-up CPU ${startup_cpu}s, RSS $(calc "$(kib "$CW" VmRSS) / 1024" 1) MiB"
  printf 't\tcpu_ticks\trss_kib\thwm_kib\tdb_bytes\tprobes\tload1\n' >"$d/samples.tsv"
  local t el next=0 snap30="" snap300="" line
  while :; do
    t=$(now); el=$(calc "$t - $CW_T0" 1)
    metrics >"$d/m.txt" || true
    line="$el\t$(ticks "$CW")\t$(kib "$CW" VmRSS)\t$(kib "$CW" VmHWM)\t$(dbsize "$d/cw.db")\t$(msum connwatch_probes_total <"$d/m.txt")\t$(load1)"
    echo -e "$line" >>"$d/samples.tsv"
    if [[ -z $snap30 ]] && (( $(calc "$el >= 30" 0) )); then snap30=$line; cp "$d/m.txt" "$d/m30.txt"; fi
    if [[ -z $snap300 ]] && (( $(calc "$el >= 300" 0) )); then snap300=$line; cp "$d/m.txt" "$d/m300.txt"
      log "  at ${el}s: $(echo -e "$line" | awk -F'\t' '{printf "probes %d, RSS %.1f MiB, db %.1f MiB", $6, $3/1024, $5/1048576}')"; fi
    (( $(calc "$el >= $DURATION" 0) )) && break
    sleep "$(calc "10 - ($(now) - $t)" 3 | awk '{print ($1 > 0) ? $1 : 0}')"
  done
  local m1; m1=$(cpu)
  cp "$d/m.txt" "$d/m_end.txt"
  stop_pid "$CW"; local down=$STOP_S
  local end=$line; [[ -n $snap30 ]] || snap30=$(sed -n 2p "$d/samples.tsv")
  # CPU % of one core after the first 30 s; RSS; probe rate
  rec scheduled "$r" cpu_pct "$(awk -F'\t' -v a="$snap30" -v b="$end" -v hz="$HZ" 'BEGIN { split(a, x, "\t"); split(b, y, "\t");
      printf "%.2f", (y[2] - x[2]) / hz / (y[1] - x[1]) * 100 }')"
  [[ -n $snap300 ]] && rec scheduled "$r" cpu_pct_after_300s "$(awk -F'\t' -v a="$snap300" -v b="$end" -v hz="$HZ" 'BEGIN { split(a, x, "\t"); split(b, y, "\t");
      printf "%.2f", (y[1] > x[1]) ? (y[2] - x[2]) / hz / (y[1] - x[1]) * 100 : 0 }')"
  rec scheduled "$r" rss_at_30s_mib "$(echo -e "$snap30" | awk -F'\t' '{printf "%.1f", $3 / 1024}')"
  rec scheduled "$r" startup_cpu_s "$startup_cpu"
  rec scheduled "$r" rss_end_mib "$(echo -e "$end" | awk -F'\t' '{printf "%.1f", $3 / 1024}')"
  rec scheduled "$r" peak_rss_mib "$(echo -e "$end" | awk -F'\t' '{printf "%.1f", $4 / 1024}')"
  rec scheduled "$r" probes_per_s "$(awk -F'\t' -v a="$snap30" -v b="$end" 'BEGIN { split(a, x, "\t"); split(b, y, "\t");
      printf "%.1f", (y[6] - x[6]) / (y[1] - x[1]) }')"
  rec scheduled "$r" probes_total "$(echo -e "$end" | cut -f6)"
  # lateness: whole run, and after the first interval
  rec scheduled "$r" lateness_p50_s "$(hist_q 0.5 connwatch_probe_lateness_seconds "$d/m_end.txt")"
  rec scheduled "$r" lateness_p99_s "$(hist_q 0.99 connwatch_probe_lateness_seconds "$d/m_end.txt")"
  rec scheduled "$r" lateness_max_bucket "$(awk '/^connwatch_probe_lateness_seconds_bucket/ { match($0, /le="[^"]*"/); le = substr($0, RSTART + 4, RLENGTH - 5)
      if ($NF > prev) top = le; prev = $NF } END { print top }' "$d/m_end.txt")"
  if [[ -n $snap300 ]]; then
    rec scheduled "$r" lateness_p99_after_300s_s "$(hist_q 0.99 connwatch_probe_lateness_seconds "$d/m_end.txt" "$d/m300.txt")"
  fi
  # database growth (.db + -wal): per hour after the first interval, else per minute after 30 s
  if [[ -n $snap300 ]] && (( $(echo -e "$end" | awk -F'\t' -v a="$snap300" 'BEGIN { split(a, x, "\t") } { print ($1 - x[1] >= 60) }') )); then
    rec scheduled "$r" db_growth_mib_per_h "$(awk -F'\t' -v a="$snap300" -v b="$end" 'BEGIN { split(a, x, "\t"); split(b, y, "\t");
        printf "%.2f", (y[5] - x[5]) / 1048576 / (y[1] - x[1]) * 3600 }')"
    rec scheduled "$r" db_mib_at_300s "$(echo -e "$snap300" | awk -F'\t' '{printf "%.1f", $5 / 1048576}')"
  fi
  rec scheduled "$r" db_growth_mib_per_min_after_30s "$(awk -F'\t' -v a="$snap30" -v b="$end" 'BEGIN { split(a, x, "\t"); split(b, y, "\t");
      printf "%.2f", (y[5] - x[5]) / 1048576 / (y[1] - x[1]) * 60 }')"
  rec scheduled "$r" db_mib_end "$(echo -e "$end" | awk -F'\t' '{printf "%.1f", $5 / 1048576}')"
  rec scheduled "$r" shutdown_s "$down"
  rec scheduled "$r" recorded "$(sqlite3 "$d/cw.db" "SELECT count(*) FROM connections WHERE last_probe_at IS NOT NULL")"
  rec scheduled "$r" probe_result_rows "$(sqlite3 "$d/cw.db" "SELECT count(*) FROM probe_results")"
  rec scheduled "$r" other_pct "$(other_pct "$m0" "$m1" "$(echo -e "$end" | cut -f2)" "$(echo -e "$end" | cut -f1)")"
  rec scheduled "$r" log_problems "$(log_problems "$d/cw.log")"; rec scheduled "$r" panics "$(panics "$d/cw.log")"
  cp "$d/samples.tsv" "$OUT/sched$r.samples.tsv"; cp "$d/cw.log" "$OUT/sched$r.log"; cp "$d/m_end.txt" "$OUT/sched$r.metrics.txt"
  log "scheduled rep $r: $(awk -F'\t' -v r="$r" '$1 == "scheduled" && $2 == r {printf "%s=%s ", $3, $4}' "$RAW")"
  rm -rf "$d"
}

# --- 3. webhook ingest ------------------------------------------------------------------
bench_webhook() {   # rep backend(sqlite|postgres)
  local r=$1 be=$2 d=$RUN/wh$r$2 url; mkdir -p "$d"
  local ids; ids=$(seq -s, -f 'conn_%g' 1 "$WH_CONNS")
  if [[ $be == sqlite ]]; then url="sqlite://$d/cw.db"
  else local db=connwatch_bench_$$_$r; PGDBS+=("$db")
    psql "$PG/postgres" -qAtc "DROP DATABASE IF EXISTS $db WITH (FORCE)" -c "CREATE DATABASE $db" >/dev/null; url="$PG/$db"; fi
  gen_config "$d/cw.toml" "$WH_CONNS" "$url" 5m 10s 16 webhooks
  wait_quiet; rec "webhook-$be" "$r" load1 "$(load1)"
  start_cw "$d/cw.toml" "$d/cw.log"
  local whurl=http://127.0.0.1:$WH_PORT/webhooks/mock
  timeout 60 "$LOADGEN" "$whurl" "$RUN/whsec" 2 "$WH_CONC" "$ids" 1024 200000 "$WH_THREADS" >"$d/warm.out"   # warm-up
  local c0 m0 t0 c1 m1 t1 out g0=0 g1=0; [[ $be == postgres ]] && g0=$(pg_ticks); c0=$(ticks "$CW") m0=$(cpu) t0=$(now)
  timeout $((WH_DUR + 60)) "$LOADGEN" "$whurl" "$RUN/whsec" "$WH_DUR" "$WH_CONC" "$ids" 1024 5000000 "$WH_THREADS" >"$d/load.out" 2>"$d/load.err" || true
  t1=$(now) m1=$(cpu) c1=$(ticks "$CW"); [[ $be == postgres ]] && g1=$(pg_ticks)
  metrics >"$d/metrics.txt"
  stop_pid "$CW"; local down=$STOP_S
  out=$(cat "$d/load.out"); [[ -n $out ]] || { echo "load generator failed: $(head -3 "$d/load.err")" >&2; out="sent 0"; }
  kv() { awk -v k="$1" '{ for (i = 1; i < NF; i++) if ($i == k) { v = $(i + 1); sub(/\/s$/, "", v); print v; f = 1; exit } } END { if (!f) print 0 }' <<<"$out"; }
  local ok sent acc; ok=$(kv ok) sent=$(kv sent) acc=$(( $(kv accepted) + $(awk '{for (i = 1; i < NF; i++) if ($i == "accepted") a = $(i + 1)} END {print a + 0}' "$d/warm.out") ))
  local stored
  if [[ $be == sqlite ]]; then stored=$(sqlite3 "$d/cw.db" "SELECT count(*) FROM webhook_events")
  else stored=$(psql "$url" -qAtc "SELECT count(*) FROM webhook_events"); psql "$PG/postgres" -qAtc "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null; fi
  rec "webhook-$be" "$r" accepted_per_s "$(kv rate)"; rec "webhook-$be" "$r" p50_ms "$(kv p50)"
  rec "webhook-$be" "$r" p99_ms "$(kv p99)"; rec "webhook-$be" "$r" max_ms "$(kv max)"
  rec "webhook-$be" "$r" non200 "$(kv other)"; rec "webhook-$be" "$r" stored_minus_accepted "$((stored - acc))"
  rec "webhook-$be" "$r" cpu_us_per_req "$(calc "($c1 - $c0) / $HZ * 1e6 / ($sent + 0.001)" 1)"
  rec "webhook-$be" "$r" gen_cpu_us_per_req "$(kv cpu_us_per_req)"
  [[ $be == postgres ]] && rec "webhook-$be" "$r" pg_cpu_us_per_req "$(calc "($g1 - $g0) / $HZ * 1e6 / ($sent + 0.001)" 1)"
  rec "webhook-$be" "$r" other_pct "$(other_pct "$m0" "$m1" "$(calc "$c1 - $c0 + $g1 - $g0 + $(kv cpu_us_per_req) * $sent * $HZ / 1e6" 0)" "$(calc "$t1 - $t0")")"
  rec "webhook-$be" "$r" log_problems "$(log_problems "$d/cw.log")"; rec "webhook-$be" "$r" panics "$(panics "$d/cw.log")"
  log "webhook $be rep $r: $out; stored $stored (accepted $acc)"
  [[ -s $d/load.err ]] && log "  load generator: $(head -3 "$d/load.err" | tr '\n' ' ' | cut -c1-300)"
  cp "$d/cw.log" "$OUT/webhook-$be$r.log"; cp "$d/load.err" "$OUT/webhook-$be$r.load.err"; rm -rf "$d"
}

# --- 4. replicas ------------------------------------------------------------------------
repl_metrics() { curl -sf --max-time 10 "http://127.0.0.1:$((REPL_ADMIN0 + $1))/metrics" || true; }   # replica index
repl_fail() {   # message: keep the replicas' logs in OUT, show their tails, stop the run
  local f; echo "replicas: $1; logs kept in $OUT" >&2
  for f in "$RUN"/repl*/cw?.log "$RUN"/repl*/migrate.log; do [[ -f $f ]] || continue
    cp "$f" "$OUT/failed-${f##*/}"; echo "== ${f##*/}" >&2; tail -n 5 "$f" | cut -c1-300 >&2; done
  exit 1; }
repl_up() { local i; for i in 0 1 2; do curl -sf -o /dev/null --max-time 2 "http://127.0.0.1:$((REPL_ADMIN0 + i))/metrics" || return 1; done; }
hist_merge() {   # metric files... -> the histogram's buckets summed over the files (replicas), for hist_q
  awk -v m="$1_bucket" 'index($0, m "{") == 1 { k = $0; sub(/ [^ ]*$/, "", k); if (!(k in s)) o[++n] = k; s[k] += $NF }
    END { for (i = 1; i <= n; i++) printf "%s %.0f\n", o[i], s[o[i]] }' "${@:2}"; }
# config of replica i: repl_config FILE I DB_URL CONNECTIONS_FILE (the [[connections]] part, shared)
repl_config() {
  { printf '[store]\nurl = "%s"\n\n[server]\nadmin = "127.0.0.1:%s"\nwebhooks = "127.0.0.1:%s"\n\n' \
      "$3" $((REPL_ADMIN0 + $2)) $((REPL_WH0 + $2))
    printf '[probe]\ninterval = "1m"\n\n[platforms.mock]\nbase_url = "http://127.0.0.1:%s"\n' "$REPL_NGX_PORT"
    printf 'probe = { method = "GET", path = "/v1/connection" }\nauth = { header = "Authorization", scheme = "Bearer" }\n'
    cat "$4"; } >"$1"
}
bench_replicas() {   # rep
  local r=$1 d=$RUN/repl$r i; mkdir -p "$d/tokens" "$d/nginx"
  local db=connwatch_bench_$$_repl$r url; PGDBS+=("$db"); url="$PG/$db"
  psql "$PG/postgres" -qAtc "DROP DATABASE IF EXISTS $db WITH (FORCE)" -c "CREATE DATABASE $db" >/dev/null
  # one fake token per connection (tokens/cN = good-N), so nginx's log names the connection
  awk -v dir="$d/tokens" -v n="$REPL_N" -v f="$d/conns.toml" 'BEGIN { for (i = 1; i <= n; i++) { t = dir "/c" i
      print "good-" i >t; close(t)
      printf "\n[[connections]]\nid = \"c%06d\"\nplatform = \"mock\"\nremote_id = \"conn_%d\"\ntoken = { file = \"%s\" }\n", i, i, t >f } }'
  chmod -R go-rwx "$d/tokens"
  for i in 0 1 2; do repl_config "$d/cw$i.toml" "$i" "$url" "$d/conns.toml"; done
  log "replicas rep $r: 3 replicas, $REPL_N connections at 1m, PostgreSQL $db; warm-up ${REPL_WARM}s, measured ${REPL_DUR}s"
  nginx -p "$d/nginx" -e "$d/nginx/error.log" -c "$BENCH/mock-replicas.conf" -g 'daemon off;' & local rngx=$!; PIDS+=("$rngx")
  wait_for 10 curl -sf -o /dev/null -H 'Authorization: Bearer good-0' "http://127.0.0.1:$REPL_NGX_PORT/v1/connection" || { echo "nginx (replicas) did not start" >&2; exit 1; }
  [[ $(curl -s -o /dev/null -w '%{http_code}' -H 'Authorization: Bearer good' "http://127.0.0.1:$REPL_NGX_PORT/v1/connection") == 401 ]] || { echo "nginx (replicas): bad token not refused" >&2; exit 1; }
  timeout 300 "$BIN" migrate --config "$d/cw0.toml" >"$d/migrate.log" 2>&1 || repl_fail "connwatch migrate failed"
  wait_quiet; rec replicas "$r" load1 "$(load1)"
  local pids=() tl; tl=$(now)
  for i in 0 1 2; do "$BIN" run --config "$d/cw$i.toml" >"$d/cw$i.log" 2>&1 & pids[i]=$!; PIDS+=("${pids[i]}"); done
  # until all three answer /metrics (<= 600 s); a replica that exits meanwhile (e.g. its sync of
  # the connections failed) is counted and started again, at most 3 times in all
  local k rc exits=0; for k in $(seq 6000); do
    for i in 0 1 2; do kill -0 "${pids[i]}" 2>/dev/null && continue
      rc=0; wait "${pids[i]}" 2>/dev/null || rc=$?; forget "${pids[i]}"; exits=$((exits + 1))
      log "  replica $i exited during start-up (status $rc): $(tail -n 1 "$d/cw$i.log" | cut -c1-200)"
      ((exits <= 3)) || repl_fail "replicas exited during start-up $exits times"
      echo "--- bench: replica exited (status $rc); started again" >>"$d/cw$i.log"
      "$BIN" run --config "$d/cw$i.toml" >>"$d/cw$i.log" 2>&1 & pids[i]=$!; PIDS+=("${pids[i]}"); done
    repl_up && break
    ((k < 6000)) || repl_fail "not all three answered /metrics within 600 s"
    sleep 0.1; done
  rec replicas "$r" startup_exits "$exits"
  local startup; startup=$(calc "$(now) - $tl"); rec replicas "$r" startup_s "$startup"
  log "  all 3 answer /metrics after ${startup}s; warm-up ${REPL_WARM}s (first probes of every connection)"
  sleep "$REPL_WARM"
  for i in 0 1 2; do kill -0 "${pids[i]}" 2>/dev/null || repl_fail "replica $i exited"; done
  local p0=() p1=() c0=() c1=() g0 g1 m0 m1 t0 t1
  g0=$(pg_ticks) m0=$(cpu) t0=$(now)
  for i in 0 1 2; do repl_metrics "$i" >"$d/m0_$i.txt"; p0[i]=$(msum connwatch_probes_total <"$d/m0_$i.txt"); c0[i]=$(ticks "${pids[i]}"); done
  sleep "$REPL_DUR"
  for i in 0 1 2; do kill -0 "${pids[i]}" 2>/dev/null || repl_fail "replica $i exited during the window"; done
  for i in 0 1 2; do repl_metrics "$i" >"$d/m1_$i.txt"; p1[i]=$(msum connwatch_probes_total <"$d/m1_$i.txt"); c1[i]=$(ticks "${pids[i]}"); done
  t1=$(now) m1=$(cpu) g1=$(pg_ticks)
  local rss=() hwm=() leaders; for i in 0 1 2; do rss[i]=$(kib "${pids[i]}" VmRSS) hwm[i]=$(kib "${pids[i]}" VmHWM); done
  leaders=$(cat "$d"/m1_*.txt | msum connwatch_leader)
  for i in 0 1 2; do stop_pid "${pids[i]}"; done
  sleep 2; kill -USR1 "$rngx" 2>/dev/null || true; sleep 1   # nginx: flush the buffered probe log
  # shares from each replica's own counter over the window
  local secs tot=0 ours=0 shares; secs=$(calc "$t1 - $t0" 3)
  for i in 0 1 2; do tot=$((tot + p1[i] - p0[i])); ours=$((ours + c1[i] - c0[i])); done
  shares=$(for i in 0 1 2; do calc "($((p1[i] - p0[i]))) * 3 / ($tot + 0.000001)" 3; done | tr '\n' ' ')
  for i in 0 1 2; do local sh; sh=$(calc "($((p1[i] - p0[i]))) * 3 / ($tot + 0.000001)" 3)
    rec replicas "$r" "share_of_even_$i" "$sh"
    rec replicas "$r" "cpu_pct_$i" "$(calc "(${c1[i]} - ${c0[i]}) / $HZ / $secs * 100" 1)"
    rec replicas "$r" "rss_end_mib_$i" "$(calc "${rss[i]} / 1024" 1)"; rec replicas "$r" "peak_rss_mib_$i" "$(calc "${hwm[i]} / 1024" 1)"; done
  rec replicas "$r" share_min_of_even "$(tr ' ' '\n' <<<"$shares" | grep . | sort -g | head -1)"
  rec replicas "$r" share_max_of_even "$(tr ' ' '\n' <<<"$shares" | grep . | sort -g | tail -1)"
  rec replicas "$r" probes_counted "$tot"; rec replicas "$r" probes_per_s "$(calc "$tot / $secs" 1)"
  rec replicas "$r" expected_per_s "$(calc "$REPL_N / $REPL_INTERVAL" 1)"
  rec replicas "$r" rate_vs_expected "$(calc "$tot / ($REPL_N * $secs / $REPL_INTERVAL)" 3)"
  rec replicas "$r" cpu_us_per_probe "$(calc "$ours / $HZ * 1e6 / ($tot + 0.000001)" 1)"
  rec replicas "$r" cpu_pct_all "$(calc "$ours / $HZ / $secs * 100" 1)"
  rec replicas "$r" pg_cpu_pct "$(calc "($g1 - $g0) / $HZ / $secs * 100" 1)"
  rec replicas "$r" pg_cpu_us_per_probe "$(calc "($g1 - $g0) / $HZ * 1e6 / ($tot + 0.000001)" 1)"
  rec replicas "$r" leaders "$leaders"
  hist_merge connwatch_probe_lateness_seconds "$d"/m0_*.txt >"$d/h0.txt"; hist_merge connwatch_probe_lateness_seconds "$d"/m1_*.txt >"$d/h1.txt"
  rec replicas "$r" lateness_p50_s "$(hist_q 0.5 connwatch_probe_lateness_seconds "$d/h1.txt" "$d/h0.txt")"
  rec replicas "$r" lateness_p99_s "$(hist_q 0.99 connwatch_probe_lateness_seconds "$d/h1.txt" "$d/h0.txt")"
  # duplicates from nginx's log ("msec Bearer good-N status"): a probe in the window less than
  # 0.75 x interval after the previous probe of the same connection, also in the window
  local nx; nx=($(awk -v t0="$t0" -v t1="$t1" -v gap="$(calc "0.75 * $REPL_INTERVAL" 3)" -v n="$REPL_N" '
    $1 >= t0 && $1 <= t1 { req++; if ($4 != 200) bad++; c = $3
      if (c in last) { g = $1 - last[c]; if (g < gap) dup++; if (!ng++ || g < lo) lo = g; if (g > hi) hi = g }
      else seen++
      last[c] = $1 }
    END { printf "%d %d %d %d %.1f %.1f %d\n", dup, req, seen, n - seen, lo, hi, bad }' "$d/nginx/probes.log"))
  rec replicas "$r" duplicates "${nx[0]}"; rec replicas "$r" nginx_requests "${nx[1]}"; rec replicas "$r" nginx_per_s "$(calc "${nx[1]} / $secs" 1)"
  rec replicas "$r" conns_probed "${nx[2]}"; rec replicas "$r" conns_missed "${nx[3]}"
  rec replicas "$r" min_gap_s "${nx[4]}"; rec replicas "$r" max_gap_s "${nx[5]}"; rec replicas "$r" non200 "${nx[6]}"
  rec replicas "$r" recorded "$(psql "$url" -qAtc "SELECT count(*) FROM connections WHERE last_probe_at IS NOT NULL" || echo -)"
  psql "$PG/postgres" -qAtc "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null || true
  stop_pid "$rngx"
  rec replicas "$r" other_pct "$(other_pct "$m0" "$m1" $((ours + g1 - g0)) "$secs")"
  local lp=0 pn=0; for i in 0 1 2; do lp=$((lp + $(log_problems "$d/cw$i.log"))); pn=$((pn + $(panics "$d/cw$i.log"))); done
  rec replicas "$r" log_problems "$lp"; rec replicas "$r" panics "$pn"
  # whole run, start-up included: store retries (e.g. deadlocks between replicas) and batches given up
  rec replicas "$r" store_retries "$(cat "$d"/cw?.log | grep -c 'cannot store probe results; retrying' || true)"
  rec replicas "$r" deadlocks "$(cat "$d"/cw?.log | grep -c 'deadlock detected' || true)"
  rec replicas "$r" results_lost "$(cat "$d"/cw?.log | grep -c 'probe results lost' || true)"
  log "replicas rep $r: ${secs}s: probes counted $tot ($(for i in 0 1 2; do printf '%d ' $((p1[i] - p0[i])); done| sed 's/ $//'))," \
      "share of even: $shares| expected $(calc "$REPL_N * $secs / $REPL_INTERVAL" 0)"
  log "  nginx: ${nx[1]} probes, duplicates (< $(calc "0.75 * $REPL_INTERVAL" 0) s apart) ${nx[0]}, connections probed ${nx[2]}/$REPL_N," \
      "gap min ${nx[4]}s max ${nx[5]}s, non-200 ${nx[6]}"
  log "  $(awk -F'\t' -v r="$r" '$1 == "replicas" && $2 == r && $3 ~ /^(cpu_pct|rss_end|peak_rss|lateness|pg_cpu|leaders|recorded|startup_exits|log_problems|panics|store_retries|deadlocks|results_lost)/ {printf "%s=%s ", $3, $4}' "$RAW")"
  for i in 0 1 2; do cp "$d/cw$i.log" "$OUT/replicas$r-$i.log"; cp "$d/m1_$i.txt" "$OUT/replicas$r-$i.metrics.txt"; done
  gzip -c "$d/nginx/probes.log" >"$OUT/replicas$r.probes.log.gz"; rm -rf "$d"
}

# --- run: reps interleaved so drift hits every test alike --------------------------------
if { has webhook || has replicas; } && ! pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
  log "PostgreSQL is not answering on 127.0.0.1:5432; trying to start it"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start 2>/dev/null || true
  wait_for 30 pg_isready -q -h 127.0.0.1 -p 5432 || log "warning: no PostgreSQL; webhook-postgres and replicas are skipped"
fi
if has burst; then
  log "warm-up (not recorded)"; timeout 20 wrk -t1 -c64 -d3s "$PROBE" >/dev/null
  for r in $(seq "$REPS"); do
    bench_burst "$r"
    for c in $BB_CONCS; do bench_wrk "blackbox-c$c" "$r" "$c" "$PROBE"; done
    bench_wrk nginx-get-keepalive-c64 "$r" 64 "$TARGET" -H 'Authorization: Bearer good'
  done
  rec blackbox-all 1 peak_rss_mib "$(calc "$(kib "$BB" VmHWM) / 1024" 1)"
fi
if has webhook; then
  for r in $(seq "$REPS"); do
    bench_webhook "$r" sqlite
    pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null && bench_webhook "$r" postgres
    bench_wrk nginx-post1k-c64 "$r" 64 "http://127.0.0.1:$NGX_PORT/webhook" -s "$RUN/post.lua"
  done
fi
if has scheduled; then
  for r in $(seq "$SCHED_REPS"); do bench_scheduled "$r"; done
fi
if has replicas; then
  if pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
    for r in $(seq "$REPS"); do bench_replicas "$r"; done
  fi
fi

# --- summary: medians over reps ---------------------------------------------------------
med() {   # test metric -> median over reps ("-" when not measured)
  awk -F'\t' -v t="$1" -v m="$2" '$1 == t && $3 == m && $4 != "nan" {print $4}' "$RAW" | sort -g |
    awk '{a[NR] = $1} END { if (!NR) print "-"; else print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
spread() {  # test metric -> "median (min-max)" when reps differ
  local m; m=$(med "$1" "$2")
  awk -F'\t' -v t="$1" -v k="$2" -v m="$m" '$1 == t && $3 == k && $4 != "nan" { if (!n++ || $4 < lo) lo = $4; if (n == 1 || $4 > hi) hi = $4 }
    END { if (n > 1 && lo != hi) printf "%s (%s-%s)\n", m, lo, hi; else print m }' "$RAW"; }
best() {   # "max"|"min" metric over tests... -> the best reference value
  local how=$1 m=$2 v; shift 2
  for t in "$@"; do v=$(med "$t" "$m"); [[ $v != - ]] && echo "$v"; done | sort -g | { [[ $how == max ]] && tail -1 || head -1; }; }
worst() { awk -F'\t' -v t="$1" -v m="$2" '$1 == t && $3 == m { if (!n++ || $4 > w) w = $4 } END { print n ? w : "-" }' "$RAW"; }   # max over reps
verdict() { awk -v v="$1" -v op="$2" -v lim="$3" 'BEGIN { if (v == "-" || v == "" || lim == "" || lim == "-") { print "n/a"; exit }
  ok = (op == "<") ? v + 0 < lim + 0 : (op == "<=") ? v + 0 <= lim + 0 : (op == ">=") ? v + 0 >= lim + 0 : v + 0 > lim + 0
  print ok ? "MET" : "MISSED" }'; }

S=$OUT/summary.tsv
{
  printf 'benchmark\tmetric\tconnwatch (median)\treference (same run)\ttarget\tverdict\n'
  if has burst; then
    bbs=(); for c in $BB_CONCS; do bbs+=("blackbox-c$c"); done
    bbr=$(best max rps "${bbs[@]}") bbc=$(best min cpu_us_per_probe "${bbs[@]}")
    cwr=$(med burst probes_per_s) cwc=$(med burst cpu_us_per_probe)
    printf 'burst N=%s\tprobes/s\t%s\tblackbox peak %s (%s)\t>= 10x = %s\t%s\n' "$N" "$(spread burst probes_per_s)" "$bbr" \
      "$(for t in "${bbs[@]}"; do printf '%s %s; ' "${t#blackbox-}" "$(med "$t" rps)"; done)" "$(calc "$bbr * 10" 0)" "$(verdict "$cwr" '>=' "$(calc "$bbr * 10" 0)")"
    printf 'burst\tratio probes/s vs blackbox\t%sx\t\t>= 10x\t\n' "$(calc "$cwr / $bbr" 1)"
    printf 'burst\tCPU us/probe (own)\t%s\tblackbox best %s (%s)\t<= 0.1x = %s\t%s\n' "$(spread burst cpu_us_per_probe)" "$bbc" \
      "$(for t in "${bbs[@]}"; do printf '%s %s; ' "${t#blackbox-}" "$(med "$t" cpu_us_per_probe)"; done)" "$(calc "$bbc / 10" 1)" "$(verdict "$cwc" '<=' "$(calc "$bbc / 10" 3)")"
    printf 'burst\tratio CPU/probe vs blackbox\t%sx\t\t<= 0.1x\t\n' "$(calc "$cwc / $bbc" 3)"
    printf 'burst\tpeak RSS MiB (VmHWM)\t%s\tblackbox %s\t\t\n' "$(spread burst peak_rss_mib)" "$(med blackbox-all peak_rss_mib)"
    printf 'burst\tnginx TCP connections per probe\t%s\tblackbox 1 per probe\t\t\n' "$(med burst tcp_conns_per_probe)"
    printf 'burst\tnginx CPU us per probe\t%s\tblackbox c64 %s\t\t\n' "$(med burst ngx_us_per_probe)" "$(med blackbox-c64 ngx_us_per_req)"
    printf 'burst\tround of %s: wall s (N / rate)\t%s\tblackbox %s\t\t\n' "$N" "$(med burst round_wall_s)" "$(calc "$N / $bbr" 2)"
    printf 'burst\tround of %s: CPU s (N x CPU/probe)\t%s\tblackbox %s\t\t\n' "$N" "$(med burst round_cpu_s)" "$(calc "$N * $bbc / 1e6" 2)"
    printf 'burst\tfirst round from cold start: wall s\t%s\t(launch to N probes; includes start-up)\t\t\n' "$(spread burst first_round_wall_s)"
    printf 'burst\tfirst round from cold start: CPU s\t%s\t\t\t\n' "$(spread burst first_round_cpu_s)"
    printf 'burst\tstart-up s (launch to /metrics)\t%s\t\t\t\n' "$(spread burst startup_s)"
    printf 'burst\trecorded in SQLite (last_probe_at set)\t%s\tof %s\t= N\t%s\n' "$(med burst recorded)" "$N" "$(verdict "$(med burst recorded)" '>=' "$N")"
    printf 'burst\tprobe outcomes ok %%\t%s\t\t100\t\n' "$(med burst ok_pct)"
    printf 'burst\tworst rep: WARN/ERROR/panic log lines; panics\t%s; %s\t\t\t\n' "$(worst burst log_problems)" "$(worst burst panics)"
    printf 'burst\tnginx GET keep-alive c64 req/s\t\t%s (the ceiling)\t\t\n' "$(med nginx-get-keepalive-c64 rps)"
    printf 'burst\tloadavg / other%% (connwatch; blackbox c64)\t%s / %s\t%s / %s\t\t\n' "$(med burst load1)" "$(med burst other_pct)" "$(med blackbox-c64 load1)" "$(med blackbox-c64 other_pct)"
  fi
  if has webhook; then
    ngr=$(med nginx-post1k-c64 rps) ngp=$(med nginx-post1k-c64 p99_ms)
    for be in sqlite postgres; do
      [[ $(med "webhook-$be" accepted_per_s) == - ]] && continue
      tgt='-'; tgp='-'; [[ $be == sqlite ]] && tgt=10000 tgp=25
      printf 'webhook %s c%s\taccepted/s (200)\t%s\tnginx POST 204: %s\t%s\t%s\n' "$be" "$WH_CONC" "$(spread "webhook-$be" accepted_per_s)" "$ngr" \
        "$([[ $tgt != - ]] && echo ">= $tgt")" "$(verdict "$(med "webhook-$be" accepted_per_s)" '>=' "$tgt")"
      printf 'webhook %s\tp50 ms\t%s\tnginx %s\t\t\n' "$be" "$(spread "webhook-$be" p50_ms)" "$(med nginx-post1k-c64 p50_ms)"
      printf 'webhook %s\tp99 ms\t%s\tnginx %s\t%s\t%s\n' "$be" "$(spread "webhook-$be" p99_ms)" "$ngp" \
        "$([[ $tgp != - ]] && echo "< $tgp")" "$(verdict "$(med "webhook-$be" p99_ms)" '<' "$tgp")"
      printf 'webhook %s\tconnwatch CPU us/webhook\t%s\tnginx %s\t\t\n' "$be" "$(med "webhook-$be" cpu_us_per_req)" "$(med nginx-post1k-c64 ngx_us_per_req)"
      [[ $be == postgres ]] && printf 'webhook %s\tPostgreSQL server CPU us/webhook\t%s\t\t\t\n' "$be" "$(med "webhook-$be" pg_cpu_us_per_req)"
      printf 'webhook %s\tload generator CPU us/req\t%s\t\t\t\n' "$be" "$(med "webhook-$be" gen_cpu_us_per_req)"
      printf 'webhook %s\tworst rep: non-200 answers; stored - accepted; panics\t%s; %s; %s\t\t0; 0; 0\t%s\n' "$be" "$(worst "webhook-$be" non200)" \
        "$(worst "webhook-$be" stored_minus_accepted)" "$(worst "webhook-$be" panics)" "$(verdict "$(worst "webhook-$be" non200)" '<=' 0)"
      printf 'webhook %s\tloadavg / other%%\t%s / %s\t\t\t\n' "$be" "$(med "webhook-$be" load1)" "$(med "webhook-$be" other_pct)"
    done
  fi
  if has scheduled; then
    s=scheduled
    printf 'scheduled %s @5m %ss\tlateness p50 s\t%s\t\t\t\n' "$SCHED_N" "$DURATION" "$(spread $s lateness_p50_s)"
    printf 'scheduled\tlateness p99 s (whole run)\t%s\t\t< 5\t%s\n' "$(spread $s lateness_p99_s)" "$(verdict "$(med $s lateness_p99_s)" '<' 5)"
    printf 'scheduled\tlateness p99 s (after 300 s)\t%s\t\t< 5\t%s\n' "$(spread $s lateness_p99_after_300s_s)" "$(verdict "$(med $s lateness_p99_after_300s_s)" '<' 5)"
    printf 'scheduled\tlateness: highest non-empty bucket (le)\t%s\t\t\t\n' "$(med $s lateness_max_bucket)"
    printf 'scheduled\tCPU %% of one core (after 30 s)\t%s\t\t< 10\t%s\n' "$(spread $s cpu_pct)" "$(verdict "$(med $s cpu_pct)" '<' 10)"
    printf 'scheduled\tCPU %% of one core (after 300 s)\t%s\t\t< 10\t%s\n' "$(spread $s cpu_pct_after_300s)" "$(verdict "$(med $s cpu_pct_after_300s)" '<' 10)"
    printf 'scheduled\tRSS MiB at 30 s (VmRSS)\t%s\t\t< 150\t%s\n' "$(spread $s rss_at_30s_mib)" "$(verdict "$(med $s rss_at_30s_mib)" '<' 150)"
    printf 'scheduled\tRSS MiB at end (VmRSS)\t%s\t\t< 150\t%s\n' "$(spread $s rss_end_mib)" "$(verdict "$(med $s rss_end_mib)" '<' 150)"
    printf 'scheduled\tpeak RSS MiB (VmHWM)\t%s\t\t< 150\t%s\n' "$(spread $s peak_rss_mib)" "$(verdict "$(med $s peak_rss_mib)" '<' 150)"
    printf 'scheduled\tDB growth MiB/h after 300 s (.db+-wal)\t%s\t\t< 10\t%s\n' "$(spread $s db_growth_mib_per_h)" "$(verdict "$(med $s db_growth_mib_per_h)" '<' 10)"
    printf 'scheduled\tDB growth MiB/min after 30 s\t%s\t\t\t\n' "$(spread $s db_growth_mib_per_min_after_30s)"
    printf 'scheduled\tDB MiB at 300 s / at end\t%s / %s\t\t\t\n' "$(med $s db_mib_at_300s)" "$(med $s db_mib_end)"
    printf 'scheduled\tprobes/s after 30 s\t%s\texpected %s (N / 300 s)\t\t\n' "$(spread $s probes_per_s)" "$(calc "$SCHED_N / 300" 1)"
    printf 'scheduled\tconnections probed at least once\t%s\tof %s\t\t\n' "$(med $s recorded)" "$SCHED_N"
    printf 'scheduled\tstart-up s (to /metrics; to /readyz); its CPU s\t%s; %s; %s\t\t\t\n' "$(med $s startup_s)" "$(med $s ready_s)" "$(med $s startup_cpu_s)"
    printf 'scheduled\tworst rep: WARN/ERROR/panic log lines; panics; shutdown s\t%s; %s; %s\t\t\t\n' "$(worst $s log_problems)" "$(worst $s panics)" "$(med $s shutdown_s)"
    printf 'scheduled\tloadavg before / other%%\t%s / %s\t\t\t\n' "$(med $s load1)" "$(med $s other_pct)"
  fi
  if has replicas && [[ $(med replicas probes_per_s) != - ]]; then
    s=replicas
    shv=$(awk -v a="$(med $s share_min_of_even)" -v b="$(med $s share_max_of_even)" 'BEGIN { print (a >= 0.8 && b <= 1.2) ? "MET" : "MISSED" }')
    printf '3 replicas N=%s @1m %ss\tduplicate probes, nginx log (worst rep)\t%s\t-\t0\t%s\n' "$REPL_N" "$REPL_DUR" "$(worst $s duplicates)" "$(verdict "$(worst $s duplicates)" '<=' 0)"
    printf '3 replicas\tsmallest / largest share of even\t%s / %s\t-\t0.8 - 1.2\t%s\n' "$(spread $s share_min_of_even)" "$(spread $s share_max_of_even)" "$shv"
    printf '3 replicas\tshare of even per replica (0; 1; 2)\t%s; %s; %s\t\t\t\n' "$(med $s share_of_even_0)" "$(med $s share_of_even_1)" "$(med $s share_of_even_2)"
    printf '3 replicas\tprobes/s total (counters) vs expected\t%s\t-\texpected %s (N / 60 s)\t\n' "$(spread $s probes_per_s)" "$(calc "$REPL_N / $REPL_INTERVAL" 1)"
    printf '3 replicas\tprobes/s seen by nginx; non-200\t%s; %s\t\t\t\n' "$(med $s nginx_per_s)" "$(worst $s non200)"
    printf '3 replicas\tconnections not probed in the window (worst rep)\t%s\t\t0\t%s\n' "$(worst $s conns_missed)" "$(verdict "$(worst $s conns_missed)" '<=' 0)"
    printf '3 replicas\tconnections with a stored result at the end\t%s\tof %s\t\t\n' "$(med $s recorded)" "$REPL_N"
    printf '3 replicas\tgap between probes of a connection s: min / max\t%s / %s\t\t\t\n' "$(med $s min_gap_s)" "$(med $s max_gap_s)"
    printf '3 replicas\tlateness p50 / p99 s (all replicas, window)\t%s / %s\t\t\t\n' "$(spread $s lateness_p50_s)" "$(spread $s lateness_p99_s)"
    printf '3 replicas\tCPU %% of one core per replica (0; 1; 2)\t%s; %s; %s\t\t\t\n' "$(med $s cpu_pct_0)" "$(med $s cpu_pct_1)" "$(med $s cpu_pct_2)"
    printf '3 replicas\tCPU us/probe (3 replicas together)\t%s\t\t\t\n' "$(spread $s cpu_us_per_probe)"
    printf '3 replicas\tPostgreSQL server CPU %% of one core; us/probe\t%s; %s\t\t\t\n' "$(med $s pg_cpu_pct)" "$(med $s pg_cpu_us_per_probe)"
    printf '3 replicas\tRSS MiB at end per replica (0; 1; 2); peak\t%s; %s; %s; %s\t\t\t\n' "$(med $s rss_end_mib_0)" "$(med $s rss_end_mib_1)" "$(med $s rss_end_mib_2)" \
      "$(awk -F'\t' '$1 == "replicas" && $3 ~ /^peak_rss_mib_/ && $4 > m {m = $4} END {print m + 0}' "$RAW")"
    printf '3 replicas\tstart-up s (launch to all /metrics)\t%s\t\t\t\n' "$(spread $s startup_s)"
    printf '3 replicas\treplicas that exited during start-up (worst rep; restarted)\t%s\t\t0\t%s\n' "$(worst $s startup_exits)" "$(verdict "$(worst $s startup_exits)" '<=' 0)"
    printf '3 replicas\tleaders (connwatch_leader summed, worst rep)\t%s\t\t1\t\n' "$(worst $s leaders)"
    printf '3 replicas\tworst rep: WARN/ERROR/panic log lines; panics\t%s; %s\t\t\t\n' "$(worst $s log_problems)" "$(worst $s panics)"
    printf '3 replicas\tworst rep, whole run: store retries; deadlocks; result batches lost\t%s; %s; %s\t\t\t\n' "$(worst $s store_retries)" "$(worst $s deadlocks)" "$(worst $s results_lost)"
    printf '3 replicas\tloadavg before / other%%\t%s / %s\t\t\t\n' "$(med $s load1)" "$(med $s other_pct)"
  fi
} >"$S"
echo; echo "== summary (medians of $REPS rep(s); scheduled: $SCHED_REPS; (min-max) when reps differ) - raw rows in $RAW"
column -t -s $'\t' "$S" | tee "$OUT/summary.txt"
echo "loadavg at end: $(cut -d' ' -f1-3 /proc/loadavg); results kept in $OUT"
