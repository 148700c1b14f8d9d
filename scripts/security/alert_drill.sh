#!/usr/bin/env bash
# Escalation drill: posts one synthetic alert per severity (critical, high,
# medium, low) to Alertmanager, waits until each has reached the mailbox of
# its receiver, and writes the evidence to a JSON file.
#
# Usage: scripts/security/alert_drill.sh [--out FILE] [--deadline SECONDS]
#
# Environment (defaults fit docker-compose.observability.yml):
#   ALERTMANAGER_URL         http://127.0.0.1:9093
#   MAILPIT_URL              http://127.0.0.1:8025  (Mailpit's /api/v1/messages)
#   DRILL_EVIDENCE           evidence file; --out wins (alert-drill-<drill id>.json)
#   DRILL_DEADLINE_S         seconds to wait for every mail; --deadline wins (120)
#   ALERT_EMAIL_CRITICAL_TO  mailbox of oncall-critical  (oncall-critical@pqmsg.test)
#   ALERT_EMAIL_HIGH_TO      mailbox of oncall-high      (oncall-high@pqmsg.test)
#   ALERT_EMAIL_STANDARD_TO  mailbox of oncall-standard  (oncall-standard@pqmsg.test)
#
# Exit status: 0 every alert was delivered, 1 some mail is missing at the
# deadline, 2 bad usage or Alertmanager refused the alerts.
# Needs bash, curl and python3 (for JSON). The drill alerts carry
# drill="true" and service="pqmsg-drill": they never inhibit real alerts,
# and the script resolves them when it ends.

set -euo pipefail

ALERTMANAGER_URL="${ALERTMANAGER_URL:-http://127.0.0.1:9093}"
MAILPIT_URL="${MAILPIT_URL:-http://127.0.0.1:8025}"
out="${DRILL_EVIDENCE:-}"
deadline_s="${DRILL_DEADLINE_S:-120}"
readonly POLL_S=2 HTTP_TIMEOUT_S=10

usage() {
    sed -n '2,/^$/s/^# \{0,1\}//p' "$0" >&2
    exit 2
}

while (($#)); do
    case "$1" in
        --out) out="${2:?--out needs a file}"; shift 2 ;;
        --out=*) out="${1#--out=}"; shift ;;
        --deadline) deadline_s="${2:?--deadline needs seconds}"; shift 2 ;;
        --deadline=*) deadline_s="${1#--deadline=}"; shift ;;
        -h | --help) usage ;;
        *) echo "alert_drill: unknown argument: $1" >&2; usage ;;
    esac
done
[[ "$deadline_s" =~ ^[0-9]+$ ]] || { echo "alert_drill: the deadline must be whole seconds" >&2; exit 2; }
command -v curl >/dev/null || { echo "alert_drill: curl is required" >&2; exit 2; }
command -v python3 >/dev/null || { echo "alert_drill: python3 is required" >&2; exit 2; }

# The JSON work: "payload" prints the alerts to post, "evaluate" matches the
# mailbox listing against them and writes the evidence (exit 0 when all arrived).
DRILL_PY=$(cat <<'PY'
import json, os, sys
from datetime import datetime, timedelta, timezone

SEVERITIES = {"critical": ("oncall-critical", "DRILL_TO_CRITICAL"),
              "high": ("oncall-high", "DRILL_TO_HIGH"),
              "medium": ("oncall-standard", "DRILL_TO_STANDARD"),
              "low": ("oncall-standard", "DRILL_TO_STANDARD")}
env = os.environ

def stamp(moment):
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")

def payload(ends_in_s, resolve):
    now = datetime.now(timezone.utc)
    alerts = []
    for severity in SEVERITIES:
        # A fresh alert name per run: alerts of an earlier run that are still
        # resolving can never share a notification group with this run's.
        alert = {"labels": {"alertname": f"PqmsgDrill-{env['DRILL_ID']}", "severity": severity,
                            "service": "pqmsg-drill", "drill": "true",
                            "drill_id": f"{env['DRILL_ID']}-{severity}"},
                 "annotations": {"summary": f"Escalation drill ({severity}): no action needed",
                                 "description": "Synthetic alert of scripts/security/alert_drill.sh."},
                 "startsAt": env["DRILL_POSTED_AT"]}
        alert["endsAt"] = stamp(now if resolve else now + timedelta(seconds=ends_in_s))
        alerts.append(alert)
    print(json.dumps(alerts))

def load(path):
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None

def addresses(value):
    return {part.strip().lower().split("<")[-1].rstrip(">") for part in value.split(",") if part.strip()}

def find_mail(messages, token, wanted):
    hits = [m for m in messages
            if token in m.get("Subject", "")
            and wanted <= {(t.get("Address") or "").lower() for t in m.get("To") or []}]
    return min(hits, key=lambda m: m.get("Created", "")) if hits else None

def am_receivers(am_alerts, token):
    for alert in am_alerts or []:
        if alert.get("labels", {}).get("drill_id") == token:
            return [r.get("name") for r in alert.get("receivers", [])]
    return None

def entry(severity, messages, am_alerts):
    receiver, to_var = SEVERITIES[severity]
    token = f"{env['DRILL_ID']}-{severity}"
    mail = find_mail(messages, token, addresses(env[to_var]))
    return {"severity": severity, "drill_id": token, "receiver": receiver,
            "recipient": env[to_var], "alertmanager_receivers": am_receivers(am_alerts, token),
            "delivered": mail is not None,
            "mailbox_id": mail and mail.get("ID"), "message_id": mail and mail.get("MessageID"),
            "subject": mail and mail.get("Subject"), "received_at": mail and mail.get("Created")}

def evaluate(listing_path, am_alerts_path, final):
    listing = load(listing_path) or {}
    results = [entry(s, listing.get("messages") or [], load(am_alerts_path)) for s in SEVERITIES]
    ok = all(r["delivered"] for r in results)
    if not (ok or final):
        return 1
    evidence = {"drill_id": env["DRILL_ID"], "result": "pass" if ok else "fail",
                "alertmanager_url": env["ALERTMANAGER_URL"], "mailpit_url": env["MAILPIT_URL"],
                "posted_at": env["DRILL_POSTED_AT"], "finished_at": stamp(datetime.now(timezone.utc)),
                "deadline_s": int(env["DRILL_DEADLINE_S"]), "alerts": results}
    with open(env["DRILL_EVIDENCE"], "w", encoding="utf-8") as handle:
        json.dump(evidence, handle, indent=2)
        handle.write("\n")
    for r in results:
        state = "delivered" if r["delivered"] else "MISSING"
        print(f"{r['severity']:>8}  {state:9}  {r['receiver']:15}  {r['recipient']}  "
              f"{r['received_at'] or '-'}  {r['message_id'] or '-'}")
    return 0 if ok else 1

if sys.argv[1] == "id":
    print(datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ-") + os.urandom(4).hex())
elif sys.argv[1] == "now":
    print(stamp(datetime.now(timezone.utc)))
elif sys.argv[1] == "payload":
    payload(int(sys.argv[2]), sys.argv[3] == "resolve")
else:
    sys.exit(evaluate(sys.argv[2], sys.argv[3], sys.argv[4] == "final"))
PY
)

drill() { python3 -c "$DRILL_PY" "$@"; }

DRILL_ID="$(drill id)"
DRILL_POSTED_AT="$(drill now)"
DRILL_EVIDENCE="${out:-alert-drill-$DRILL_ID.json}"
DRILL_DEADLINE_S="$deadline_s"
DRILL_TO_CRITICAL="${ALERT_EMAIL_CRITICAL_TO:-oncall-critical@pqmsg.test}"
DRILL_TO_HIGH="${ALERT_EMAIL_HIGH_TO:-oncall-high@pqmsg.test}"
DRILL_TO_STANDARD="${ALERT_EMAIL_STANDARD_TO:-oncall-standard@pqmsg.test}"
export ALERTMANAGER_URL MAILPIT_URL DRILL_ID DRILL_POSTED_AT DRILL_EVIDENCE DRILL_DEADLINE_S \
    DRILL_TO_CRITICAL DRILL_TO_HIGH DRILL_TO_STANDARD

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

post_alerts() { # $1: "fire" or "resolve"
    drill payload "$((deadline_s + 300))" "$1" >"$work/alerts.json"
    curl -fsS --max-time "$HTTP_TIMEOUT_S" -X POST -H 'Content-Type: application/json' \
        --data-binary "@$work/alerts.json" "$ALERTMANAGER_URL/api/v2/alerts" >/dev/null
}

fetch_state() { # the mailbox listing and Alertmanager's view of the drill alerts
    curl -fsS --max-time "$HTTP_TIMEOUT_S" -o "$work/listing.json" \
        "$MAILPIT_URL/api/v1/messages?limit=200" || rm -f "$work/listing.json"
    curl -fsS --max-time "$HTTP_TIMEOUT_S" -o "$work/am.json" -G \
        --data-urlencode "filter=drill_id=~\"$DRILL_ID-.*\"" \
        "$ALERTMANAGER_URL/api/v2/alerts" || rm -f "$work/am.json"
}

echo "alert_drill: $DRILL_ID -> $ALERTMANAGER_URL, mailbox $MAILPIT_URL, deadline ${deadline_s}s"
post_alerts fire || { echo "alert_drill: Alertmanager refused the drill alerts" >&2; exit 2; }
trap 'post_alerts resolve || true; rm -rf "$work"' EXIT

give_up_at=$((SECONDS + deadline_s))
while :; do
    fetch_state
    if drill evaluate "$work/listing.json" "$work/am.json" poll; then
        echo "alert_drill: every alert reached its receiver; evidence in $DRILL_EVIDENCE"
        exit 0
    fi
    if ((SECONDS >= give_up_at)); then
        drill evaluate "$work/listing.json" "$work/am.json" final || true
        echo "alert_drill: FAILED, mail missing after ${deadline_s}s; evidence in $DRILL_EVIDENCE" >&2
        exit 1
    fi
    sleep "$POLL_S"
done
