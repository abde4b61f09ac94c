#!/usr/bin/env bash
# Installs the real mail clients the interop tests and the Postfix benchmark drive: swaks and
# Postfix (for /usr/sbin/smtp-source and, in the benchmark, a throwaway Postfix instance).
#
# Debian packages only, without prompts: postfix is preseeded to "No configuration", so its
# postinst writes no main.cf and starts nothing. Idempotent: apt is touched only when a program
# is missing. Afterwards no system Postfix daemon is left running (smtp-source is a standalone
# client; the interop tests never need the daemon).
set -euo pipefail

need=()
command -v swaks >/dev/null 2>&1 || need+=(swaks)
[ -x /usr/sbin/smtp-source ] || need+=(postfix)

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

command -v swaks >/dev/null
[ -x /usr/sbin/smtp-source ]
echo "install-mail-clients: swaks and smtp-source present"
