#!/usr/bin/env bash
# A real SMTP server for the email group: OpenSMTPD from the Debian package, listening on
# $SMTP_URL (127.0.0.1:2525). It accepts mail for any address and delivers it to one Maildir,
# $SMTP_MAILDIR, where tests and people read what the shop sent. Recipients whose local part
# starts with `bounce` are refused with 550 (a permanent failure, as an unknown mailbox is).
# There is no init system here, so the daemon is started in the foreground under nohup.
SERVICE=smtp
source "$(dirname "$0")/lib.sh"

conf="$LOCAL/smtp/smtpd.conf"
pidfile="$LOCAL/smtp/smtpd.pid"

up() {
  local host port
  host=$(url_host "$SMTP_URL"); port=$(url_port "$SMTP_URL" 2525)
  if port_open "$host" "$port"; then
    log "reusing the SMTP server at $host:$port"
    return
  fi
  command -v smtpd >/dev/null || apt_install opensmtpd
  # Delivery runs as an unprivileged local user that owns the Maildir.
  id shopmail >/dev/null 2>&1 || useradd -r -M -d /nonexistent -s /usr/sbin/nologin shopmail
  mkdir -p "$SMTP_MAILDIR" && chown shopmail "$SMTP_MAILDIR"
  # The Maildir may sit under a directory only root can enter; delivery must reach it.
  chmod o+x "$LOCAL" "$LOCAL/smtp"
  cat >"$conf" <<CONF
# Written by scripts/smtp.sh: every recipient into one Maildir, bounce* refused.
table vusers { "@" = "shopmail" }
listen on $host port $port
action "deliver" maildir "$SMTP_MAILDIR" virtual <vusers>
match from any for any rcpt-to regex "^bounce" reject
match from any for any action "deliver"
CONF
  smtpd -n -f "$conf" >/dev/null 2>&1 || die "invalid $conf"
  log "starting smtpd (logs: $LOCAL/logs/smtp.log)"
  nohup smtpd -d -f "$conf" >>"$LOCAL/logs/smtp.log" 2>&1 &
  echo $! >"$pidfile"
  wait_for 30 "smtp" port_open "$host" "$port" || die "smtpd did not start; see $LOCAL/logs/smtp.log"
}

down() {
  if [[ -s "$pidfile" ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    kill "$(cat "$pidfile")" 2>/dev/null || true
    for _ in $(seq 1 20); do kill -0 "$(cat "$pidfile")" 2>/dev/null || break; sleep 0.25; done
  fi
  rm -f "$pidfile"
  log "stopped"
}

"${1:-up}"
