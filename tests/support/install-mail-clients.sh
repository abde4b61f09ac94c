#!/usr/bin/env bash
# Installs the real mail clients the interop tests and the Postfix benchmark drive: swaks,
# Postfix (for /usr/sbin/smtp-source and smtp-sink and, in the benchmark, a throwaway Postfix
# instance), fetchmail (the ODMR customer of tests/fetchmail.rs) and Dovecot's LMTP server
# (dovecot-lmtpd, the LMTP delivery target of tests/deliver_targets.rs, which runs its own
# instance with a temporary config; the system daemon is never used).
#
# Debian packages only, without prompts: postfix is preseeded to "No configuration", so its
# postinst writes no main.cf and starts nothing. Idempotent: apt is touched only when a program
# is missing. Afterwards no system Postfix daemon is left running (smtp-source is a standalone
# client; the interop tests never need the daemon), and no system fetchmail daemon either:
# Debian's starts only with START_DAEMON=yes in /etc/default/fetchmail and an /etc/fetchmailrc,
# and a fresh install has neither (the tests run fetchmail in the foreground, with their own
# rc file and pid file).
set -euo pipefail

need=()
command -v swaks >/dev/null 2>&1 || need+=(swaks)
# swaks only recommends its TLS module; without it every --tls run exits "TLS not available".
perl -MNet::SSLeay -e1 >/dev/null 2>&1 || need+=(libnet-ssleay-perl)
[ -x /usr/sbin/smtp-source ] || need+=(postfix)
command -v fetchmail >/dev/null 2>&1 || need+=(fetchmail)
{ [ -x /usr/sbin/dovecot ] && [ -x /usr/lib/dovecot/lmtp ]; } || need+=(dovecot-lmtpd)

if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "install-mail-clients: need root to install ${need[*]}" >&2
    exit 1
  fi
  echo "install-mail-clients: installing ${need[*]}"
  debconf-set-selections <<'EOF'
postfix postfix/main_mailer_type select No configuration
postfix postfix/mailname string localhost
EOF
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}"
fi

# A configured system instance (or a postinst on some other setup) may have started Postfix.
if [ -f /etc/postfix/main.cf ] && /usr/sbin/postfix status >/dev/null 2>&1; then
  echo "install-mail-clients: stopping the system Postfix daemon"
  /usr/sbin/postfix stop
fi

# Should a system fetchmail daemon run anyway (a configured host), stop it by its pid file.
fetchmail_pid=/var/run/fetchmail/fetchmail.pid
if [ -s "$fetchmail_pid" ] && kill -0 "$(head -n 1 "$fetchmail_pid")" 2>/dev/null; then
  echo "install-mail-clients: stopping the system fetchmail daemon"
  start-stop-daemon --stop --quiet --oknodo --pidfile "$fetchmail_pid" --exec /usr/bin/fetchmail
fi

# dovecot-core's postinst starts the system Dovecot where the init system lets it.
if [ -s /run/dovecot/master.pid ] && kill -0 "$(head -n 1 /run/dovecot/master.pid)" 2>/dev/null; then
  echo "install-mail-clients: stopping the system Dovecot daemon"
  /usr/sbin/dovecot stop || start-stop-daemon --stop --quiet --oknodo \
    --pidfile /run/dovecot/master.pid --exec /usr/sbin/dovecot
fi

command -v swaks >/dev/null
perl -MNet::SSLeay -e1
[ -x /usr/sbin/smtp-source ]
command -v fetchmail >/dev/null
[ -x /usr/sbin/dovecot ] && [ -x /usr/lib/dovecot/lmtp ]
echo "install-mail-clients: swaks, smtp-source, smtp-sink, fetchmail and dovecot-lmtpd present"
