#!/usr/bin/env bash
# Side by side, in one run: the same `turnpike bench mx` load against turnpike, a throwaway
# Postfix that HOLDs the same domains, and Exim when an `exim` (or `exim4`) binary is on the
# PATH; then Postfix's smtp-source as an independent client; then the load generators'
# ceilings against sinks that store nothing (Postfix's smtp-sink and `turnpike bench sink`).
#
# Every server answers 250 only once the message is on disk (turnpike: fdatasync of its
# journal; Postfix: fsync of the queue file, HOLD; Exim: queue_only, no queue runner, its
# spool files fsynced). Each figure is kept only if the client saw every message accepted and
# the server's hold grew by exactly that many (turnpike queue --json, postqueue -j,
# exim -bpc).
#
# bench mx cases (SESSIONS sessions, --pipelining --chunking, i.e. MAIL, RCPT and BDAT in one
# write, and up to 64 messages in flight per connection where the server offers both):
#   4k-1     N_4K x 4096 B,           a new connection per message
#   4k-100   N_4K x 4096 B,           100 messages per connection
#   real-1   N_REAL, --size-dist real  (1 KB - 10 MB, docs/benchmarks.md), 1 per connection
#   real-100 N_REAL, --size-dist real, 100 per connection
# smtp-source cases: N_4K x 4096 B over SESSIONS, with and without -d (connection reuse),
# against turnpike, Postfix, smtp-sink and bench sink.
# Ceilings: bench mx 4k-1 and 4k-100 against smtp-sink and bench sink, with the CPU the
# generator used (it runs on one thread: at most one core).
#
# Usage: benches/compare.sh      (as root: Postfix's master starts as root)
# Environment: N_4K (10000), N_REAL (1000), SESSIONS (50), PF_PORT (10025), EX_PORT (10026),
#   TURNPIKE_BIN (target/release/turnpike; built if missing or BUILD=1), TURNPIKE_ARGS (extra
#   serve args), CASES (default "4k-1 4k-100 real-1 real-100"), KEEP=1 keeps the work dir.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
cd "$repo"
BENCH_NAME=compare
# shellcheck source=benches/postfix_compare.sh
. "$here/postfix_compare.sh"

N_4K=${N_4K:-10000}
N_REAL=${N_REAL:-1000}
EX_PORT=${EX_PORT:-10026}
CASES=${CASES:-4k-1 4k-100 real-1 real-100}
EXIM=$(command -v exim || command -v exim4 || true)
EX_PID=
SINK_PID=
BSINK_PID=

[ "$(id -u)" = 0 ] || die "run as root (Postfix's master daemon starts as root)"
command -v python3 >/dev/null || die "python3 is needed to read the JSON reports"
"$repo/tests/support/install-mail-clients.sh" >/dev/null

WORK=$(mktemp -d /tmp/turnpike-compare.XXXXXX)
chmod 755 "$WORK"

stop_pid() {
  local pid=$1
  [ -n "$pid" ] || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

compare_cleanup() {
  local rc=$?
  pf_stop
  stop_pid "$TP_PID"
  stop_pid "$SINK_PID"
  stop_pid "$BSINK_PID"
  if [ -n "$EX_PID" ]; then stop_pid "$EX_PID"; fi
  if [ "${KEEP:-0}" = 1 ] || [ "$rc" != 0 ]; then
    echo "compare: work dir kept: $WORK" >&2
  else
    rm -rf "$WORK"
  fi
  exit "$rc"
}
trap compare_cleanup EXIT
trap 'exit 130' INT TERM

# --- Exim (only when installed; not on the development host, so this part is untested) ---
ex_start() {
  mkdir -p "$WORK/exim-spool"
  local user
  user=$(id -un Debian-exim 2>/dev/null || echo root)
  chown "$user" "$WORK/exim-spool"
  cat >"$WORK/exim.conf" <<EOC
primary_hostname = bench.exim
domainlist hold_domains = ${PF_DOMAINS// / : }
daemon_smtp_ports = $EX_PORT
local_interfaces = 127.0.0.1
spool_directory = $WORK/exim-spool
log_file_path = $WORK/exim-%s.log
exim_user = $user
exim_group = $(id -gn "$user")
never_users = root
queue_only = true
smtp_accept_max = 1000
smtp_accept_max_per_host = 1000
smtp_accept_queue_per_connection = 0
smtp_accept_reserve = 0
host_lookup =
rfc1413_hosts =
acl_smtp_rcpt = check_rcpt
begin acl
check_rcpt:
  accept domains = +hold_domains
  deny message = relay not permitted
begin routers
begin transports
EOC
  "$EXIM" -C "$WORK/exim.conf" -bd -oX "$EX_PORT" -oP "$WORK/exim.pid" \
    || die "Exim did not start; see $WORK/exim-main.log"
  wait_port "$EX_PORT" || die "Exim did not listen on $EX_PORT"
  EX_PID=$(cat "$WORK/exim.pid")
}
ex_held() { "$EXIM" -C "$WORK/exim.conf" -bpc; }

# bench_mx ADDR N ARGS...: runs the load; prints "msgs_per_s accepted cpu_cores" from its
# JSON report (the human summary goes to the log).
bench_mx() {
  local addr=$1 n=$2
  shift 2
  "$TURNPIKE_BIN" bench mx --target "$addr" --messages "$n" --sessions "$SESSIONS" \
    --pipelining --chunking --json "$WORK/mx.json" "$@" >>"$WORK/bench.log" 2>&1 \
    || die "bench mx against $addr failed; see $WORK/bench.log"
  python3 - "$WORK/mx.json" <<'EOP'
import json, sys
r = json.load(open(sys.argv[1]))
p = r["phases"][0]
print(f'{p["msgs_per_s"]:.0f} {p["messages"]} {r["client"]["cpu_cores"]:.2f}')
EOP
}

case_args() {
  case $1 in
    4k-1) echo "$N_4K --size 4096 --per-connection 1" ;;
    4k-100) echo "$N_4K --size 4096 --per-connection 100" ;;
    real-1) echo "$N_REAL --size-dist real --per-connection 1" ;;
    real-100) echo "$N_REAL --size-dist real --per-connection 100" ;;
    *) die "unknown case $1" ;;
  esac
}

# held_now SERVER: the server's held count.
held_now() {
  case $1 in
    turnpike) tp_held ;;
    postfix) pf_held ;;
    exim) ex_held ;;
  esac
}

# run_server_case SERVER ADDR CASE: bench mx, checked against the hold; prints msgs/s.
run_server_case() {
  local server=$1 addr=$2 c=$3 before after n rate accepted cpu
  # shellcheck disable=SC2046 # case_args is a word list
  set -- $(case_args "$c")
  n=$1
  shift
  before=$(held_now "$server")
  read -r rate accepted cpu < <(bench_mx "$addr" "$n" "$@")
  after=$(held_now "$server")
  [ "$accepted" = "$n" ] || die "$server $c: $accepted of $n accepted (see $WORK/bench.log)"
  [ $((after - before)) = "$n" ] || die "$server $c: hold grew by $((after - before)), expected $n"
  echo "$rate"
}

uptime_now() { uptime | sed 's/.*load average: //'; }

log "load average before: $(uptime_now)"
tp_start
log "turnpike ${TURNPIKE_ARGS:+($TURNPIKE_ARGS) }on $TP_MX"
pf_start
log "Postfix $(postconf -d -h mail_version) on 127.0.0.1:$PF_PORT"
if [ -n "$EXIM" ]; then
  ex_start
  log "Exim ($EXIM) on 127.0.0.1:$EX_PORT"
else
  log "no exim binary on the PATH: Exim skipped"
fi

declare -A RATE
for c in $CASES; do
  RATE[turnpike,$c]=$(run_server_case turnpike "$TP_MX" "$c")
  RATE[postfix,$c]=$(run_server_case postfix "127.0.0.1:$PF_PORT" "$c")
  if [ -n "$EXIM" ]; then RATE[exim,$c]=$(run_server_case exim "127.0.0.1:$EX_PORT" "$c"); fi
  log "bench mx $c: turnpike ${RATE[turnpike,$c]}, postfix ${RATE[postfix,$c]}${EXIM:+, exim ${RATE[exim,$c]}} msgs/s"
done

# smtp-source, the independent client, N_4K x 4096 B.
N=$N_4K
SIZE=4096
smtp-sink -u nobody "127.0.0.1:2626" 256 >"$WORK/smtp-sink.log" 2>&1 &
SINK_PID=$!
wait_port 2626 || die "smtp-sink did not listen on 2626"
"$TURNPIKE_BIN" bench sink --listen 127.0.0.1:0 --cores 1 >"$WORK/bench-sink.out" 2>&1 &
BSINK_PID=$!
for _ in $(seq 100); do grep -q listening "$WORK/bench-sink.out" && break; sleep 0.1; done
BSINK=$(awk '/listening on/ { print $5; exit }' "$WORK/bench-sink.out")
[ -n "$BSINK" ] || die "bench sink did not start: $(cat "$WORK/bench-sink.out")"

declare -A SRC
for target in turnpike postfix smtp-sink bench-sink; do
  case $target in
    turnpike) addr=$TP_MX ;;
    postfix) addr=127.0.0.1:$PF_PORT ;;
    smtp-sink) addr=127.0.0.1:2626 ;;
    bench-sink) addr=$BSINK ;;
  esac
  for mode in plain reuse; do
    flag=()
    [ "$mode" = reuse ] && flag=(-d)
    before=
    case $target in turnpike | postfix) before=$(held_now "$target") ;; esac
    secs=$(smtp_source "$addr" "${flag[@]}" 2>>"$WORK/bench.log")
    if [ -n "$before" ]; then
      after=$(held_now "$target")
      [ $((after - before)) = "$N" ] || die "smtp-source $mode -> $target: hold grew by $((after - before)), expected $N"
    fi
    SRC[$target,$mode]=$(rate "$secs")
    log "smtp-source ${flag[*]:-} -> $target: ${SRC[$target,$mode]} msgs/s"
  done
done

# The generators' ceilings: bench mx against the two sinks.
declare -A CEIL CPU
for target in smtp-sink bench-sink; do
  addr=127.0.0.1:2626
  [ "$target" = bench-sink ] && addr=$BSINK
  for c in 4k-1 4k-100; do
    # shellcheck disable=SC2046
    read -r r a cpu < <(bench_mx "$addr" $(case_args "$c"))
    [ "$a" = "$N_4K" ] || die "bench mx $c -> $target: $a of $N_4K accepted"
    CEIL[$target,$c]=$r
    CPU[$target,$c]=$cpu
    log "bench mx $c -> $target: $r msgs/s, client ${cpu} cores"
  done
done

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2fx", a / b; else print "-" }'; }
pct() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.0f%%", 100 * a / b; else print "-" }'; }

echo
echo "date: $(date -u +%Y-%m-%dT%H:%MZ)  host: $(nproc) cores, $(uname -r)  load average after: $(uptime_now)"
echo "turnpike ${TURNPIKE_ARGS:-(default cores)}; $SESSIONS sessions; N_4K=$N_4K N_REAL=$N_REAL"
echo
printf '%-10s %10s %10s %10s %10s %10s\n' case turnpike postfix exim tp/postfix tp/exim
for c in $CASES; do
  e=${RATE[exim,$c]:-}
  printf '%-10s %10s %10s %10s %10s %10s\n' "$c" "${RATE[turnpike,$c]}" "${RATE[postfix,$c]}" \
    "${e:--}" "$(ratio "${RATE[turnpike,$c]}" "${RATE[postfix,$c]}")" \
    "$(if [ -n "$e" ]; then ratio "${RATE[turnpike,$c]}" "$e"; else echo -; fi)"
done
echo
echo "smtp-source -s $SESSIONS -m $N_4K -l 4096 (msgs/s):"
printf '%-12s %10s %10s\n' target plain "-d"
for t in turnpike postfix smtp-sink bench-sink; do
  printf '%-12s %10s %10s\n' "$t" "${SRC[$t,plain]}" "${SRC[$t,reuse]}"
done
echo "turnpike / smtp-source's ceiling (smtp-sink): plain $(pct "${SRC[turnpike,plain]}" "${SRC[smtp-sink,plain]}"), -d $(pct "${SRC[turnpike,reuse]}" "${SRC[smtp-sink,reuse]}")"
echo "turnpike / postfix with smtp-source: plain $(ratio "${SRC[turnpike,plain]}" "${SRC[postfix,plain]}"), -d $(ratio "${SRC[turnpike,reuse]}" "${SRC[postfix,reuse]}")"
echo
echo "bench mx ceilings (msgs/s, client cores) and vs smtp-source on the same sink:"
for t in smtp-sink bench-sink; do
  echo "  $t: 4k-1 ${CEIL[$t,4k-1]} (${CPU[$t,4k-1]} cores, $(ratio "${CEIL[$t,4k-1]}" "${SRC[$t,plain]}") smtp-source plain);" \
    "4k-100 ${CEIL[$t,4k-100]} (${CPU[$t,4k-100]} cores, $(ratio "${CEIL[$t,4k-100]}" "${SRC[$t,reuse]}") smtp-source -d)"
done
