#!/usr/bin/env bash
# ATRN drain: how fast turnpike hands held mail to a customer after ATRN (the reversal).
#
# One throwaway turnpike server (fresh data directory under /tmp, ports 127.0.0.1:0, one
# account "bench" owning example.com). Each case fills the hold with Postfix's smtp-source over
# the MX port, verifies the held count (turnpike queue --json), drains it once with
# `turnpike bench drain` (AUTH PLAIN + bare ATRN; the provider streams bodies from the journal
# with BDAT, which the drain customer offers), then verifies that the drain received exactly
# the held count and that the queue is empty. Only then is the figure kept. A drain that ends
# early (the rest stays held) gives no figure: the run is reported FAILED with the server's
# last warning, the rest is drained without TLS, and the script exits 1 after the summary.
#
# Cases, each run REPS times (median and spread printed):
#   small      N_SMALL x SIZE_SMALL B (10,000 x 4 KB), --tls none         -> msgs/s
#   large      N_LARGE x SIZE_LARGE B (100 x 1 MB),    --tls none         -> MB/s
#   large-tls  same hold, --tls starttls (the server's self-signed cert)  -> MB/s
#   raw        benches/loopback_tcp.py: RAW_BYTES (1 GiB) over one 127.0.0.1 TCP stream
# and derived: TLS cost (large-tls / large) and drain MB/s as % of raw loopback. Each drain also
# records the CPU time the server (all its threads, from /proc) and the drain customer
# (/usr/bin/time) used, printed per message, to show which side is the bottleneck.
#
# Goals (issue "ATRN drain"): small >= 20,000 msgs/s; large without TLS >= 50% of raw loopback.
#
# Usage: benches/drain_bench.sh
# Environment: REPS (3), N_SMALL (10000), SIZE_SMALL (4096), N_LARGE (100),
#   SIZE_LARGE (1048576), SESSIONS (20, smtp-source sessions filling the hold),
#   RAW_BYTES (1073741824), TURNPIKE_BIN (default target/release/turnpike; built with
#   cargo build --release if missing or BUILD=1), TURNPIKE_ARGS (extra serve args, e.g.
#   "--io epoll" or "--cores 1"), MAX_LOAD (3.0: wait up to LOAD_WAIT s (300) for the 1-min
#   load average to drop below it before measuring), PERF_CASE (small|large|large-tls: record
#   `perf record -g` (the server at 4999 Hz, so that a sub-second drain gives enough samples)
#   on the server and on the drain customer during that case's first drain
#   into the kept work dir; the customer's CPU figure then includes perf's own),
#   KEEP=1 keeps the temp dir.
# Run from anywhere; installs smtp-source (postfix) if missing, which needs root.
set -euo pipefail

REPS=${REPS:-3}
N_SMALL=${N_SMALL:-10000}
SIZE_SMALL=${SIZE_SMALL:-4096}
N_LARGE=${N_LARGE:-100}
SIZE_LARGE=${SIZE_LARGE:-1048576}
SESSIONS=${SESSIONS:-20}
RAW_BYTES=${RAW_BYTES:-1073741824}
TURNPIKE_BIN=${TURNPIKE_BIN:-target/release/turnpike}
TURNPIKE_ARGS=${TURNPIKE_ARGS:-}
MAX_LOAD=${MAX_LOAD:-3.0}
LOAD_WAIT=${LOAD_WAIT:-300}
PERF_CASE=${PERF_CASE:-}
[ $# = 0 ] || { echo "usage: $0 (settings through the environment; see the header)" >&2; exit 2; }

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
cd "$repo"

die() {
  echo "drain_bench: $*" >&2
  exit 1
}
log() { echo "== $*"; }

command -v python3 >/dev/null || die "python3 is needed (JSON, statistics, loopback reference)"
if [ ! -x /usr/sbin/smtp-source ]; then
  "$repo/tests/support/install-mail-clients.sh"
fi
if [ -n "$PERF_CASE" ]; then
  command -v perf >/dev/null || die "PERF_CASE is set but perf is not installed"
fi

WORK=$(mktemp -d /tmp/turnpike-drain.XXXXXX)
TP_DATA=$WORK/turnpike-data
TP_PID=
PERF_PID=

stop_pid() {
  local pid=$1 sig=$2
  kill -0 "$pid" 2>/dev/null || return 0
  kill "-$sig" "$pid" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

cleanup() {
  local rc=$?
  if [ -n "$PERF_PID" ]; then stop_pid "$PERF_PID" INT; fi
  if [ -n "$TP_PID" ]; then stop_pid "$TP_PID" TERM; fi
  if [ "${KEEP:-0}" = 1 ] || [ "$rc" != 0 ] || [ -n "$PERF_CASE" ]; then
    echo "drain_bench: work dir kept: $WORK" >&2
  else
    rm -rf "$WORK"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

load1() { cut -d' ' -f1 /proc/loadavg; }

# Waits (bounded by LOAD_WAIT) for the 1-min load average to drop below MAX_LOAD.
wait_quiet() {
  local waited=0
  while awk -v l="$(load1)" -v m="$MAX_LOAD" 'BEGIN { exit !(l >= m) }'; do
    if [ "$waited" -ge "$LOAD_WAIT" ]; then
      echo "drain_bench: load $(load1) still >= $MAX_LOAD after ${LOAD_WAIT}s; measuring anyway" >&2
      return 0
    fi
    [ "$waited" = 0 ] && log "load $(load1) >= $MAX_LOAD; waiting (up to ${LOAD_WAIT}s)"
    sleep 10
    waited=$((waited + 10))
  done
}

# --- server ---------------------------------------------------------------------------------

if [ ! -x "$TURNPIKE_BIN" ] || [ "${BUILD:-0}" = 1 ]; then
  log "cargo build --release"
  cargo build --release --bin turnpike
fi
[ -x "$TURNPIKE_BIN" ] || die "no turnpike binary at $TURNPIKE_BIN"
TURNPIKE_BIN=$(cd "$(dirname "$TURNPIKE_BIN")" && pwd)/$(basename "$TURNPIKE_BIN")

mkdir -p "$TP_DATA"
cat >"$WORK/turnpike.toml" <<'EOF'
[server]
hostname = "mx.bench"
[listen]
mx = ["127.0.0.1:0"]
odmr = ["127.0.0.1:0"]
submission = ["127.0.0.1:0"]
submissions = ["127.0.0.1:0"]
metrics = ["127.0.0.1:0"]
[limits]
max_connections_per_ip = 1000
max_message_size = "200MiB"
# AUTH PLAIN without TLS for the --tls none drains (loopback only).
[odmr]
allow_plaintext_auth = true
EOF
TP=("$TURNPIKE_BIN" --data-dir "$TP_DATA" --config "$WORK/turnpike.toml")
echo bench-password >"$WORK/password"
"${TP[@]}" account add bench --domain example.com --password-stdin <"$WORK/password" >/dev/null \
  || die "turnpike account add failed"
# shellcheck disable=SC2086 # TURNPIKE_ARGS is a list of words on purpose
"${TP[@]}" serve $TURNPIKE_ARGS >"$WORK/turnpike.out" 2>"$WORK/turnpike.err" &
TP_PID=$!
MX= ODMR=
for _ in $(seq 100); do
  if [ -f "$TP_DATA/listening" ]; then
    MX=$(awk '$1 == "mx" { print $2; exit }' "$TP_DATA/listening")
    ODMR=$(awk '$1 == "odmr" { print $2; exit }' "$TP_DATA/listening")
    [ -n "$MX" ] && [ -n "$ODMR" ] && break
  fi
  kill -0 "$TP_PID" 2>/dev/null || break
  sleep 0.1
done
if [ -z "$MX" ] || [ -z "$ODMR" ]; then
  echo "---- turnpike stderr ----" >&2; cat "$WORK/turnpike.err" >&2
  die "turnpike serve did not write mx and odmr lines to $TP_DATA/listening"
fi
[ -f "$TP_DATA/tls/cert.pem" ] || die "no self-signed certificate at $TP_DATA/tls/cert.pem"
log "turnpike ${TURNPIKE_ARGS:+($TURNPIKE_ARGS) }pid $TP_PID: mx $MX, odmr $ODMR"

# held: messages held for example.com (0 when the domain is absent).
held() {
  "${TP[@]}" queue --json | python3 -c '
import json, sys
q = json.load(sys.stdin)
print(sum(d["messages"] for d in q.get("domains", []) if d["domain"] == "example.com"))'
}

# fill N SIZE: holds N messages of SIZE payload bytes; verifies the held count.
fill() {
  local n=$1 size=$2 before
  before=$(held)
  [ "$before" = 0 ] || die "the hold is not empty before filling ($before held)"
  timeout 1800 /usr/sbin/smtp-source -s "$SESSIONS" -m "$n" -l "$size" -M client.test \
    -f s@client.test -t user@example.com "$MX" >&2 || die "smtp-source failed (exit $?)"
  local got
  got=$(held)
  [ "$got" = "$n" ] || die "turnpike holds $got messages after smtp-source, expected $n"
}

# cpu_ticks PID: user + system clock ticks of a process (all threads) so far.
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }

# drain CASE N TLS...: one drain of the whole hold; verifies counts and the empty queue; appends
# "case msgs msgs_per_s mb_per_s secs server_cpu_s customer_cpu_s" to $WORK/results.
drain() {
  local case=$1 n=$2
  shift 2
  local out=$WORK/drain-$case-$RUN.out
  local customer_perf=()
  if [ "$PERF_CASE" = "$case" ] && [ "$RUN" = 1 ]; then
    customer_perf=(perf record -g -o "$WORK/perf-$case-customer.data" --)
    perf record -F 4999 -g -o "$WORK/perf-$case.data" -p "$TP_PID" >"$WORK/perf-$case.log" 2>&1 &
    PERF_PID=$!
    sleep 0.5
  fi
  local ticks_before
  ticks_before=$(cpu_ticks "$TP_PID")
  timeout 1800 /usr/bin/time -f '%U %S' -o "$out.time" "${customer_perf[@]}" "${TP[@]}" bench drain --provider "$ODMR" \
    --account bench --password-file "$WORK/password" "$@" >"$out" 2>&1 || {
    cat "$out" >&2
    die "turnpike bench drain ($case) failed"
  }
  local server_cpu customer_cpu
  server_cpu=$(awk -v a="$ticks_before" -v b="$(cpu_ticks "$TP_PID")" -v hz="$(getconf CLK_TCK)" \
    'BEGIN { printf "%.3f", (b - a) / hz }')
  customer_cpu=$(awk '{ printf "%.3f", $1 + $2 }' "$out.time")
  if [ -n "$PERF_PID" ]; then
    kill -INT "$PERF_PID"
    wait "$PERF_PID" || true
    PERF_PID=
    log "perf data: $WORK/perf-$case.data (perf report -i ... --no-children)"
  fi
  # received N messages, B bytes in S s / rate X msgs/s, Y MB/s / ... / malformed M
  local got bytes secs malformed
  read -r got bytes secs < <(awk '$1 == "received" { print $2, $4, $7 }' "$out")
  malformed=$(awk '$1 == "malformed" { print $2 }' "$out")
  if [ "$got" != "$n" ] && [ "$(held)" != 0 ]; then
    # The session ended early and the rest stayed held (the server's log says why). No figure
    # for this run; drain the rest without TLS so the next case starts from an empty hold.
    local why
    why=$(grep -E 'WARN|ERROR' "$WORK/turnpike.err" | tail -n 1 | sed 's/^.*turnpike::/turnpike::/')
    echo "drain_bench: $case run $RUN FAILED: received ${got:-?} of $n held; server: $why" >&2
    echo "$case FAILED ${got:-0} $n $why" >>"$WORK/failures"
    "${TP[@]}" bench drain --provider "$ODMR" --account bench --password-file "$WORK/password" \
      --tls none >"$out.rest" 2>&1 || { cat "$out.rest" >&2; die "$case: could not drain the rest"; }
    [ "$(held)" = 0 ] || die "$case: the hold is not empty after draining the rest"
    return 0
  fi
  [ "$got" = "$n" ] || { cat "$out" >&2; die "$case: drain received ${got:-?} messages, $n were held"; }
  [ "$malformed" = 0 ] || { cat "$out" >&2; die "$case: $malformed malformed messages"; }
  # The journal's DONE records go through the writer cores: give them a moment.
  local left=
  for _ in $(seq 50); do
    left=$(held)
    [ "$left" = 0 ] && break
    sleep 0.1
  done
  [ "$left" = 0 ] || die "$case: $left messages still held after the drain"
  awk -v c="$case" -v n="$got" -v b="$bytes" -v s="$secs" -v sc="$server_cpu" -v cc="$customer_cpu" \
    'BEGIN { printf "%s %d %.1f %.2f %.3f %s %s\n", c, n, n / s, b / s / 1e6, s, sc, cc }' >>"$WORK/results"
  log "$case run $RUN: $(sed -n 2p "$out" | sed 's/^rate *//') ($got messages, ${secs}s; cpu server ${server_cpu}s, customer ${customer_cpu}s)"
}

raw() {
  local line
  line=$(python3 "$here/loopback_tcp.py" "$RAW_BYTES") || die "loopback_tcp.py failed"
  # loopback BYTES bytes in S s = X MB/s
  awk '{ printf "raw 0 0 %s %s 0 0\n", $8, $5 }' <<<"$line" >>"$WORK/results"
  log "raw run $RUN: $line"
}

: >"$WORK/results"
: >"$WORK/failures"
LOAD_BEFORE=$(load1)
for RUN in $(seq "$REPS"); do
  wait_quiet
  log "run $RUN/$REPS (load $(load1))"
  fill "$N_SMALL" "$SIZE_SMALL"
  drain small "$N_SMALL" --tls none
  fill "$N_LARGE" "$SIZE_LARGE"
  drain large "$N_LARGE" --tls none
  fill "$N_LARGE" "$SIZE_LARGE"
  drain large-tls "$N_LARGE" --tls starttls --ca "$TP_DATA/tls/cert.pem" --server-name localhost
  raw
done
LOAD_AFTER=$(load1)

stop_pid "$TP_PID" TERM
TP_PID=

echo
echo "date:      $(date -u +%Y-%m-%dT%H:%MZ)   host: $(nproc) cores, $(uname -r)"
echo "server:    turnpike serve ${TURNPIKE_ARGS:-(defaults)}; load avg $LOAD_BEFORE before, $LOAD_AFTER after"
echo "hold:      smtp-source -s $SESSIONS; small $N_SMALL x $SIZE_SMALL B, large $N_LARGE x $SIZE_LARGE B"
echo "drain:     turnpike bench drain (AUTH PLAIN, bare ATRN, BDAT); counts and empty queue verified"
python3 - "$WORK/results" "$REPS" "$WORK/failures" <<'EOF'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
reps = int(sys.argv[2])
failed = {}
for l in open(sys.argv[3]):
    f = l.split(maxsplit=4)
    if f:
        failed.setdefault(f[0], []).append(f"received {f[2]} of {f[3]}: {f[4].strip() if len(f) > 4 else '?'}")
col = {"msgs": 2, "mb": 3, "secs": 4}
def values(case, what):
    return [float(r[col[what]]) for r in rows if r[0] == case]
def stat(case, what):
    v = values(case, what)
    assert len(v) + len(failed.get(case, [])) == reps, f"{case}: {len(v)} results, expected {reps}"
    return statistics.median(v), min(v), max(v)
def fmt(case, what, unit, digits):
    if case in failed:
        return f"FAILED in {len(failed[case])} of {reps} runs, no figure ({failed[case][0]})"
    m, lo, hi = stat(case, what)
    spread = (hi - lo) / m * 100 if m else 0.0
    return f"{m:,.{digits}f} {unit} (median of {reps}; min {lo:,.{digits}f}, max {hi:,.{digits}f}, spread {spread:.0f}%)"
print(f"small:     {fmt('small', 'msgs', 'msgs/s', 0)}")
print(f"large:     {fmt('large', 'mb', 'MB/s', 1)}")
print(f"large-tls: {fmt('large-tls', 'mb', 'MB/s', 1)}")
print(f"raw:       {fmt('raw', 'mb', 'MB/s', 1)}  (one loopback TCP stream, no protocol)")
# Ratios per run (same run = same conditions), then their median.
ln, lt, rw = values("large", "mb"), values("large-tls", "mb"), values("raw", "mb")
pct = [n / r * 100 for n, r in zip(ln, rw)]
if "large-tls" in failed:
    print("tls cost:  not measured (STARTTLS drain failed)")
else:
    tls = [t / n for t, n in zip(lt, ln)]
    pct_tls = [t / r * 100 for t, r in zip(lt, rw)]
    print(f"tls cost:  STARTTLS drain runs at {statistics.median(tls):.2f}x the plain drain "
          f"(per run {', '.join(f'{x:.2f}' for x in tls)}); {statistics.median(pct_tls):.0f}% of raw")
for case in ("small", "large", "large-tls"):
    if case in failed:
        continue
    per = [(float(r[5]) / int(r[1]) * 1e6, float(r[6]) / int(r[1]) * 1e6, float(r[5]) / float(r[4]) * 100,
            float(r[6]) / float(r[4]) * 100) for r in rows if r[0] == case]
    s_us, c_us = statistics.median(p[0] for p in per), statistics.median(p[1] for p in per)
    s_pct, c_pct = statistics.median(p[2] for p in per), statistics.median(p[3] for p in per)
    print(f"cpu {case + ':':10} server {s_us:,.0f} us/msg ({s_pct:.0f}% of one core over the drain), "
          f"customer {c_us:,.0f} us/msg ({c_pct:.0f}%)")
print(f"vs raw:    plain drain {statistics.median(pct):.0f}% of raw loopback "
      f"(per run {', '.join(f'{x:.0f}' for x in pct)})")
small = stat("small", "msgs")[0]
print(f"goals:     small >= 20,000 msgs/s: {'met' if small >= 20000 else 'NOT met'}; "
      f"plain drain >= 50% of raw: {'met' if statistics.median(pct) >= 50 else 'NOT met'}")
sys.exit(1 if failed else 0)
EOF
