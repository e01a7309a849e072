"""
C{smartrelay message ID}, C{smartrelay stats} and C{smartrelay events}:
what happened to mail, over the relay's API.
"""

import io
import json
import time
from typing import Callable, Optional

from smartrelay.commands.base import PROG, Console, UsageError
from smartrelay.commands.console import (
    API_NOTE,
    addCommonOptions,
    apiClient,
    eventDetail,
    indent,
    positiveInt,
    quotePath,
    table,
    timeArgument,
    withDefaults,
    write,
)


def _messageText(document: dict, headers: bool = False) -> str:
    envelope = document.get("envelope") or {}
    out = io.StringIO()
    out.write(f"message {document['queue_id']}"
              f" ({'in the queue' if document.get('queued') else 'no longer queued'})\n")
    for key in ("sender", "received", "size", "client", "tag"):
        out.write(f"  {key + ':':<10}{envelope.get(key) if envelope.get(key) is not None else '-'}\n")
    if envelope.get("metadata"):
        out.write(f"  {'metadata:':<10}{json.dumps(envelope['metadata'], ensure_ascii=False)}\n")
    out.write("\nrecipients:\n")
    rows = []
    for r in document.get("recipients", []):
        reply = r.get("last_reply") or {}
        rows.append([r["address"], r.get("state"), r.get("attempts"),
                     r.get("next_attempt"),
                     " ".join(str(reply[k]) for k in ("code", "status", "reply") if reply.get(k))
                     or None])
    out.write(indent(table(rows, ["address", "state", "attempts", "next attempt", "last reply"])))
    out.write("\ntimeline:\n")
    rows = [[e["time"], e["type"], e.get("recipient"), eventDetail(e)]
            for e in document.get("events", [])]
    out.write(indent(table(rows, ["time", "type", "recipient", "detail"])))
    if headers and document.get("headers"):
        out.write("\nheaders:\n" + indent(document["headers"].replace("\r\n", "\n")))
    return out.getvalue()


def message(options, console: Console) -> int:
    """
    C{smartrelay message ID}: the envelope, the recipients' state and the
    timeline of one message.
    """
    document = apiClient(options).json("GET", f"messages/{quotePath(options.queue_id)}")
    write(console, options, document, lambda d: _messageText(d, options.headers))
    return 0


# ---------------------------------------------------------------------------


_STAT_COLUMNS = ("accepted", "delivered", "deferred", "bounced", "suppressed", "complained",
                 "unsubscribed", "opened", "clicked")
#: Shown only when the range has SMS (parts submitted, and their receipts).
_SMS_COLUMNS = ("sms_submitted", "sms_delivered", "sms_failed")


def _percent(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _statsText(document: dict) -> str:
    out = io.StringIO()
    scope = "".join(f", {k} {document[k]}" for k in ("tag", "domain") if document.get(k))
    out.write(f"from {document['from']} to {document['to']}{scope}\n\n")
    totals = document.get("totals", {})
    counts = totals.get("counts", {})
    out.write(table([[k, counts.get(k, 0)] for k in _STAT_COLUMNS]
                    + [["hard bounces", totals.get("hard_bounces", 0)],
                       ["soft bounces", totals.get("soft_bounces", 0)]]
                    + [[k, counts[k]] for k in _SMS_COLUMNS if counts.get(k)],
                    ["event", "count"]))
    rates = document.get("rates", {})
    if rates:
        out.write("\n" + table([[k, _percent(v)] for k, v in rates.items()], ["rate", "value"]))
    limit = document.get("complaint_rate_limit")
    if limit is not None:
        over = document.get("complaint_rate_over_limit")
        verdict = {True: "OVER the limit", False: "under the limit", None: "no deliveries"}[over]
        out.write(f"\ncomplaint rate {_percent(rates.get('complaint'))}: {verdict} "
                  f"({_percent(limit)}, Gmail and Yahoo)\n")
    reasons = totals.get("bounce_reasons") or {}
    if reasons:
        out.write("\n" + table(sorted(reasons.items(), key=lambda kv: -kv[1]),
                               ["bounce reason", "count"]))
    buckets = [b for b in document.get("buckets", []) if any(b.get("counts", {}).values())]
    if buckets:
        out.write("\n" + table(
            [[b["start"]] + [b["counts"].get(k, 0) for k in _STAT_COLUMNS] for b in buckets],
            ["start"] + list(_STAT_COLUMNS)))
    return out.getvalue()


def stats(options, console: Console) -> int:
    """
    C{smartrelay stats [--from T] [--to T] [--interval hour|day] [--tag T]
    [--domain D]}.
    """
    document = apiClient(options).json("GET", "stats", {
        "from": timeArgument(options.since, "--from"), "to": timeArgument(options.until, "--to"),
        "interval": options.interval, "tag": options.tag, "domain": options.domain,
    })
    write(console, options, document, _statsText)
    return 0


# ---------------------------------------------------------------------------


def parseTime(text: str) -> float:
    """
    POSIX seconds of an event's RFC 3339 C{time} (C{...Z} or an offset).
    """
    from datetime import datetime

    return datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00")).timestamp()


def _eventLine(event: dict) -> str:
    return "  ".join(str(x) for x in (
        event["time"], event["type"], event.get("queue_id") or "-",
        event.get("recipient") or "-", eventDetail(event))).rstrip() + "\n"


def events(options, console: Console, sleep: Callable[[float], None] = time.sleep) -> int:
    """
    C{smartrelay events [filters] [--limit N] [--follow]}: every matching
    event, oldest first, one a line (or one JSON object a line with
    C{--json}); C{--follow} then waits for new ones until interrupted.
    """
    client = apiClient(options)
    query = {
        "type": options.type, "recipient": options.recipient, "tag": options.tag,
        "domain": options.domain, "queue_id": options.queue_id,
        "since": timeArgument(options.since, "--since"), "until": timeArgument(options.until, "--until"),
    }

    def show(event: dict) -> None:
        if options.json:
            console.stdout.write(json.dumps(event, ensure_ascii=False) + "\n")
        else:
            console.stdout.write(_eventLine(event))
        console.stdout.flush()

    seen: dict = {}
    last = None
    for event in client.pages("events", query, options.limit):
        show(event)
        seen[event["id"]] = event["time"]
        last = event["time"]
    if not options.follow:
        return 0
    if options.until is not None:
        raise UsageError(f"{PROG} events: --follow and --until do not go together")
    # The cursor ends with the last page; go on from the last event's time
    # (less a margin for events written late, e.g. by another node), and
    # skip what was shown already.
    try:
        while True:
            sleep(options.interval)
            since = None if last is None else "%.6f" % (parseTime(last) - 60)
            for event in client.pages("events", {**query, "since": since or query["since"]}):
                if event["id"] in seen:
                    continue
                show(event)
                seen[event["id"]] = event["time"]
                last = max(last or event["time"], event["time"], key=parseTime)
            cutoff = parseTime(last) - 120 if last else None
            if cutoff is not None and len(seen) > 10000:
                seen = {k: v for k, v in seen.items() if parseTime(v) >= cutoff}
    except KeyboardInterrupt:
        return 0


# ---------------------------------------------------------------------------


def register(commands) -> None:
    """
    Add C{message}, C{stats} and C{events}.
    """
    api = API_NOTE

    p = commands.add_parser("message", help="show a message: envelope, recipients, timeline",
                            description="Show the message with queue id ID (the id in the "
                                        "250 reply): its envelope, each recipient's state and "
                                        "every event. " + api)
    p.add_argument("queue_id", metavar="ID")
    p.add_argument("--headers", action="store_true", help="also print the headers as received")
    addCommonOptions(p)
    p.set_defaults(run=withDefaults(message))

    p = commands.add_parser("stats", help="counts and rates",
                            description="Counts and rates of deliveries, bounces, complaints, "
                                        "unsubscribes, opens and clicks, with the complaint "
                                        "rate against the 0.3% limit. " + api)
    p.add_argument("--from", dest="since", metavar="TIME", default=None,
                   help="start (RFC 3339, a date, POSIX seconds, or a duration ago: 7d)")
    p.add_argument("--to", dest="until", metavar="TIME", default=None, help="end (default now)")
    p.add_argument("--interval", choices=("hour", "day"), default=None)
    p.add_argument("--tag", default=None)
    p.add_argument("--domain", default=None)
    addCommonOptions(p)
    p.set_defaults(run=withDefaults(stats))

    p = commands.add_parser("events", help="the event stream",
                            description="Events, oldest first, one a line; --follow waits "
                                        "for new ones. " + api)
    p.add_argument("--type", default=None)
    p.add_argument("--recipient", default=None)
    p.add_argument("--tag", default=None)
    p.add_argument("--domain", default=None)
    p.add_argument("--queue-id", dest="queue_id", default=None, metavar="ID")
    p.add_argument("--since", metavar="TIME", default=None,
                   help="RFC 3339, a date, POSIX seconds, or a duration ago: 1h")
    p.add_argument("--until", metavar="TIME", default=None)
    p.add_argument("--limit", type=positiveInt, default=None, metavar="N")
    p.add_argument("--follow", action="store_true", help="then wait for new events")
    p.add_argument("--interval", type=float, default=2.0, metavar="SECONDS",
                   help="with --follow, how often to ask (default 2)")
    addCommonOptions(p)
    p.set_defaults(run=withDefaults(events))
