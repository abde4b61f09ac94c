#!/usr/bin/env bash
# Postfix vs turnpike: how fast each durably accepts (and holds) mail from smtp-source.
#
# Both servers get the same load: N messages of SIZE payload bytes over SESSIONS parallel SMTP
# sessions from Postfix's smtp-source, on 127.0.0.1. Both answer 250 only after the message is
# on disk: Postfix's cleanup fsyncs the queue file before smtpd's 250; turnpike fdatasyncs its
# journal (group commit) before its 250. Postfix is told to HOLD everything for example.com
# (check_recipient_access ... HOLD), so mail is durably queued and never delivered, which is
# what turnpike does for a hosted domain. Wall clock around smtp-source; counts are verified
# afterwards (postqueue -j / turnpike queue --json) before any figure is printed.
#
# The Postfix instance is throwaway: its own config_directory, queue_directory and
# data_directory under a temp dir, its own port, chroot off. The system Postfix is not touched.
#
# Usage: benches/postfix_compare.sh [--postfix-only | --turnpike-only]
# Sourced (`. benches/postfix_compare.sh`), it only defines its functions (pf_start, pf_held,
# pf_stop, tp_start, tp, tp_held, tp_stop, smtp_source, ...) for benches/compare.sh, which
# sets WORK and its own cleanup. PF_DOMAINS (default example.com): the domains both hold.
# Environment: N (20000), SESSIONS (50), SIZE (4096), PF_PORT (10025),
#   TURNPIKE_BIN (default target/release/turnpike, built with cargo build --release if missing
#   or if BUILD=1), TURNPIKE_ARGS (extra serve args, e.g. "--io epoll"), KEEP=1 keeps the temp dir.
# Run from the repo root, as root (Postfix's master must start as root).

N=${N:-20000}
SESSIONS=${SESSIONS:-50}
SIZE=${SIZE:-4096}
PF_PORT=${PF_PORT:-10025}
PF_DOMAINS=${PF_DOMAINS:-example.com}
TURNPIKE_BIN=${TURNPIKE_BIN:-target/release/turnpike}
TURNPIKE_ARGS=${TURNPIKE_ARGS:-}
PF_STARTED=0
TP_PID=

die() {
  echo "${BENCH_NAME:-postfix_compare}: $*" >&2
  exit 1
}
log() { echo "== $*"; }
now() { date +%s.%N; }

# Waits (bounded) until something accepts TCP connections on 127.0.0.1:$1.
wait_port() {
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  return 1
}

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# smtp_source ADDR [EXTRA ARGS...]: runs the load (N x SIZE over SESSIONS); prints the
# elapsed wall-clock seconds on stdout.
smtp_source() {
  local addr=$1 t0 t1
  shift
  t0=$(now)
  timeout 1800 /usr/sbin/smtp-source -s "$SESSIONS" -m "$N" -l "$SIZE" -M client.test \
    -f sender@client.test -t "user@${PF_DOMAINS%% *}" "$@" "$addr" >&2 \
    || die "smtp-source against $addr failed (exit $?)"
  t1=$(now)
  awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f\n", b - a }'
}

rate() { awk -v n="$N" -v s="$1" 'BEGIN { printf "%.0f\n", n / s }'; }

# pf_start: a throwaway Postfix under $WORK on 127.0.0.1:$PF_PORT that HOLDs $PF_DOMAINS.
pf_start() {
  port_free "$PF_PORT" || die "port $PF_PORT is in use; set PF_PORT"
  PF_CONF=$WORK/postfix-etc
  mkdir -p "$PF_CONF" "$WORK/postfix-spool" "$WORK/postfix-lib"
  chown postfix:postfix "$WORK/postfix-lib"
  cp /etc/postfix/master.cf "$PF_CONF/master.cf"
  local hold="" d
  for d in $PF_DOMAINS; do hold="${hold:+$hold, }$d=HOLD"; done
  cat >"$PF_CONF/main.cf" <<EOC
compatibility_level = 3.6
queue_directory = $WORK/postfix-spool
data_directory = $WORK/postfix-lib
meta_directory = /etc/postfix
mail_owner = postfix
setgid_group = postdrop
myhostname = bench.localdomain
mydomain = localdomain
mydestination =
relay_domains = ${PF_DOMAINS// /, }
mynetworks = 127.0.0.0/8
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
alias_maps =
alias_database =
local_recipient_maps =
biff = no
# The realistic size mix goes up to 10 MB; the default limit (10240000) is too close.
message_size_limit = 20480000
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
smtpd_recipient_restrictions = check_recipient_access inline:{$hold}, permit_mynetworks, reject_unauth_destination
maillog_file_prefixes = $WORK
maillog_file = $WORK/postfix.log
EOC
  # Our port instead of 25, and no chroot (it would need copies of /etc files in the spool).
  postconf -c "$PF_CONF" -M# smtp/inet
  postconf -c "$PF_CONF" -Me "$PF_PORT/inet = $PF_PORT inet n - n - - smtpd"
  postconf -c "$PF_CONF" -F '*/*/chroot = n'
  PF_STARTED=1
  postfix -c "$PF_CONF" check && postfix -c "$PF_CONF" start || {
    tail -n 20 "$WORK/postfix.log" >&2
    die "the throwaway Postfix instance did not start"
  }
  wait_port "$PF_PORT" || die "Postfix did not listen on $PF_PORT; see $WORK/postfix.log"
}

# pf_held: messages in the throwaway Postfix's hold queue.
pf_held() { postqueue -c "$PF_CONF" -j | grep -c '"queue_name": *"hold"' || true; }

pf_stop() {
  if [ "$PF_STARTED" = 1 ]; then
    postfix -c "$PF_CONF" stop >/dev/null 2>&1 || postfix -c "$PF_CONF" abort >/dev/null 2>&1 || true
    PF_STARTED=0
  fi
}

# tp_start: turnpike serve on a fresh data directory under $WORK, one account owning
# $PF_DOMAINS; sets TP_MX (the MX address) and TP_PID.
tp_start() {
  if [ ! -x "$TURNPIKE_BIN" ] || [ "${BUILD:-0}" = 1 ]; then
    log "cargo build --release"
    cargo build --release --bin turnpike
  fi
  [ -x "$TURNPIKE_BIN" ] || die "no turnpike binary at $TURNPIKE_BIN"
  TP_DATA=$WORK/turnpike-data
  mkdir -p "$TP_DATA"
  cat >"$WORK/turnpike.toml" <<'EOC'
[server]
hostname = "mx.bench"
[listen]
mx = ["127.0.0.1:0"]
odmr = ["127.0.0.1:0"]
odmrs = ["127.0.0.1:0"]
submission = ["127.0.0.1:0"]
submissions = ["127.0.0.1:0"]
metrics = ["127.0.0.1:0"]
# The load generator is one address with SESSIONS connections; Postfix's own cap
# (smtpd_client_connection_count_limit) is 50 by default and anvil is not running here.
[limits]
max_connections_per_ip = 1000
EOC
  local args=() d
  for d in $PF_DOMAINS; do args+=(--domain "$d"); done
  echo bench-password | tp account add bench "${args[@]}" --password-stdin \
    || die "turnpike account add failed"
  # Not through tp(): $! must be turnpike's own pid, not a subshell's.
  # shellcheck disable=SC2086 # TURNPIKE_ARGS is a list of words on purpose
  "$TURNPIKE_BIN" --data-dir "$TP_DATA" --config "$WORK/turnpike.toml" serve $TURNPIKE_ARGS \
    >"$WORK/turnpike.out" 2>"$WORK/turnpike.err" &
  TP_PID=$!
  TP_MX=
  for _ in $(seq 100); do
    if [ -f "$TP_DATA/listening" ]; then
      TP_MX=$(awk '$1 == "mx" { print $2; exit }' "$TP_DATA/listening")
      break
    fi
    kill -0 "$TP_PID" 2>/dev/null || break
    sleep 0.1
  done
  if [ -z "$TP_MX" ]; then
    echo "---- turnpike stdout ----" >&2; cat "$WORK/turnpike.out" >&2
    echo "---- turnpike stderr ----" >&2; cat "$WORK/turnpike.err" >&2
    if kill -0 "$TP_PID" 2>/dev/null; then
      die "turnpike serve wrote no mx line to $TP_DATA/listening within 10 s"
    fi
    wait "$TP_PID" && st=0 || st=$?
    TP_PID=
    die "turnpike serve exited (status $st) before listening"
  fi
}

# tp ARGS...: the turnpike CLI on the benchmark's data directory.
tp() { "$TURNPIKE_BIN" --data-dir "$TP_DATA" --config "$WORK/turnpike.toml" "$@"; }

# tp_held: messages turnpike holds for $PF_DOMAINS.
tp_held() {
  tp queue --json | python3 -c '
import json, sys
domains = sys.argv[1].split()
q = json.load(sys.stdin)
print(sum(d["messages"] for d in q["domains"] if d["domain"] in domains))' "$PF_DOMAINS"
}

tp_stop() {
  [ -n "$TP_PID" ] || return 0
  kill -TERM "$TP_PID" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$TP_PID" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$TP_PID" 2>/dev/null; then
    kill -KILL "$TP_PID" 2>/dev/null || true
    wait "$TP_PID" 2>/dev/null || true
    TP_PID=
    die "turnpike did not exit within 10 s of SIGTERM"
  fi
  local st=0
  wait "$TP_PID" || st=$?
  TP_PID=
  [ "$st" = 0 ] || die "turnpike exited with status $st after SIGTERM"
}

postfix_run() {
  pf_start
  log "Postfix $(postconf -d -h mail_version) on 127.0.0.1:$PF_PORT: $N x $SIZE B, $SESSIONS sessions"
  PF_SECS=$(smtp_source "127.0.0.1:$PF_PORT")
  local held
  held=$(pf_held)
  [ "$held" = "$N" ] || die "Postfix holds $held messages, expected $N (postqueue -c $PF_CONF -p)"
  PF_RATE=$(rate "$PF_SECS")
  log "Postfix: $N held in ${PF_SECS}s = $PF_RATE msgs/s"
  pf_stop
}

turnpike_run() {
  tp_start
  log "turnpike ${TURNPIKE_ARGS:+($TURNPIKE_ARGS) }on $TP_MX: $N x $SIZE B, $SESSIONS sessions"
  TP_SECS=$(smtp_source "$TP_MX")
  local held
  held=$(tp_held)
  [ "$held" = "$N" ] || die "turnpike holds $held messages, expected $N"
  TP_RATE=$(rate "$TP_SECS")
  log "turnpike: $N held in ${TP_SECS}s = $TP_RATE msgs/s"
  tp_stop
}

main() {
  set -euo pipefail
  RUN_POSTFIX=1
  RUN_TURNPIKE=1
  case "${1:-}" in
    --postfix-only) RUN_TURNPIKE=0 ;;
    --turnpike-only) RUN_POSTFIX=0 ;;
    "") ;;
    *) echo "usage: $0 [--postfix-only | --turnpike-only]" >&2; exit 2 ;;
  esac

  local here repo
  here=$(cd "$(dirname "$0")" && pwd)
  repo=$(cd "$here/.." && pwd)
  cd "$repo"

  [ "$(id -u)" = 0 ] || die "run as root (Postfix's master daemon starts as root)"
  command -v python3 >/dev/null || die "python3 is needed to read turnpike's JSON"
  "$repo/tests/support/install-mail-clients.sh"

  WORK=$(mktemp -d /tmp/turnpike-bench.XXXXXX)
  chmod 755 "$WORK"
  trap cleanup EXIT
  trap 'exit 130' INT TERM

  if [ "$RUN_POSTFIX" = 1 ]; then postfix_run; fi
  if [ "$RUN_TURNPIKE" = 1 ]; then turnpike_run; fi

  echo
  echo "date:      $(date -u +%Y-%m-%dT%H:%MZ)   host: $(nproc) cores, $(uname -r)"
  echo "load:      smtp-source -s $SESSIONS -m $N -l $SIZE"
  if [ "$RUN_POSTFIX" = 1 ]; then echo "postfix:   $PF_RATE msgs/s (${PF_SECS}s)"; fi
  if [ "$RUN_TURNPIKE" = 1 ]; then echo "turnpike:  $TP_RATE msgs/s (${TP_SECS}s)"; fi
  if [ "$RUN_POSTFIX" = 1 ] && [ "$RUN_TURNPIKE" = 1 ]; then
    ratio=$(awk -v t="$TP_SECS" -v p="$PF_SECS" 'BEGIN { printf "%.2f", p / t }')
    echo "ratio:     ${ratio}x (turnpike msgs/s / postfix msgs/s, same run)"
  fi
}

cleanup() {
  local rc=$?
  pf_stop
  if [ -n "$TP_PID" ] && kill -0 "$TP_PID" 2>/dev/null; then
    kill -TERM "$TP_PID" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$TP_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$TP_PID" 2>/dev/null || true
    wait "$TP_PID" 2>/dev/null || true
  fi
  if [ "${KEEP:-0}" = 1 ] || [ "$rc" != 0 ]; then
    echo "postfix_compare: work dir kept: $WORK" >&2
  else
    rm -rf "$WORK"
  fi
  exit "$rc"
}

# Run as a script; sourced, only the functions above are defined.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  main "$@"
fi
