"""
The sub-commands that talk to a running relay over its JSON API
(L{smartrelay.commands.client}): C{message}, C{queue}, C{suppress},
C{stats}, C{events}.  Human tables by default, C{--json} for scripts;
every API error is one line (exit status 1; 2 for a bad parameter).
"""

import argparse
import csv
import io
import json
import re
import time
from typing import Any, Callable, Iterable, Optional, Sequence

from smartrelay.cli import PROG, CommandError, Console, UsageError
from smartrelay.commands.client import ApiClient, ApiSettings
from smartrelay.config import parseDuration

#: Entries sent per request by C{suppress import}.
IMPORT_CHUNK = 1000


# ---------------------------------------------------------------------------
# Output helpers


def table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    """
    Columns padded to their widest cell (the last one not padded); C{None}
    is shown as C{-}.
    """
    cells = [[str(h) for h in headers]] + [
        ["-" if c is None else str(c) for c in row] for row in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        padded = [cell.ljust(widths[i]) for i, cell in enumerate(row[:-1])] + [row[-1]]
        lines.append("  ".join(padded).rstrip())
    return "\n".join(lines) + "\n"


class Progress:
    """
    A progress bar on standard error, drawn only when it is a terminal.
    """

    WIDTH = 30

    def __init__(self, stream, total: int, label: str, clock: Callable[[], float] = time.monotonic):
        self.stream = stream
        self.total = max(total, 1)
        self.label = label
        self.clock = clock
        self.shown = bool(getattr(stream, "isatty", lambda: False)())
        self._last = float("-inf")

    def update(self, done: int, force: bool = False) -> None:
        if not self.shown:
            return
        now = self.clock()
        if not force and now - self._last < 0.1 and done < self.total:
            return
        self._last = now
        filled = int(self.WIDTH * min(done, self.total) / self.total)
        bar = "#" * filled + "." * (self.WIDTH - filled)
        percent = 100 * min(done, self.total) // self.total
        self.stream.write(f"\r{self.label} [{bar}] {percent:3d}% {done}/{self.total}")
        self.stream.flush()

    def finish(self, done: int) -> None:
        if self.shown:
            self.update(done, force=True)
            self.stream.write("\n")
            self.stream.flush()


def _time(text: Optional[str], option: str) -> Optional[str]:
    """
    A time for the API: a duration (C{30m}, C{2h}, C{7d}) means that long
    ago; anything else (RFC 3339, a date, POSIX seconds) is passed on for
    the API to check.
    """
    if text is None:
        return None
    try:
        ago = parseDuration(text)
    except ValueError:
        return text
    return "%.3f" % (time.time() - ago)


def _write(console: Console, options, document: Any, human: Callable[[Any], str]) -> None:
    if options.json:
        console.stdout.write(json.dumps(document, indent=2, ensure_ascii=False) + "\n")
    else:
        console.stdout.write(human(document))


def _client(options) -> ApiClient:
    settings = ApiSettings.resolve(
        options.url, options.token, options.config, timeout=options.timeout
    )
    return ApiClient(settings)


def _detail(event: dict) -> str:
    """
    One line of an event's detail for a table.
    """
    detail = event.get("detail") or {}
    if event.get("type") == "bounced":
        keys = ("kind", "reason", "status", "remote")
    elif event.get("type") in ("deferred", "delivered", "expired"):
        keys = ("code", "status", "remote", "reply")
    else:
        keys = tuple(detail)
    parts = []
    for key in keys:
        value = detail.get(key)
        if value is not None and value != "":
            parts.append(f"{key}={value}")
    text = " ".join(parts)
    return text if len(text) <= 100 else text[:97] + "..."


# ---------------------------------------------------------------------------
# message


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
    out.write(_indent(table(rows, ["address", "state", "attempts", "next attempt", "last reply"])))
    out.write("\ntimeline:\n")
    rows = [[e["time"], e["type"], e.get("recipient"), _detail(e)]
            for e in document.get("events", [])]
    out.write(_indent(table(rows, ["time", "type", "recipient", "detail"])))
    if headers and document.get("headers"):
        out.write("\nheaders:\n" + _indent(document["headers"].replace("\r\n", "\n")))
    return out.getvalue()


def _indent(text: str) -> str:
    return "".join("  " + line + "\n" for line in text.splitlines())


def message(options, console: Console) -> int:
    """
    C{smartrelay message ID}: the envelope, the recipients' state and the
    timeline of one message.
    """
    document = _client(options).json("GET", f"messages/{_path(options.queue_id)}")
    _write(console, options, document, lambda d: _messageText(d, options.headers))
    return 0


def _path(segment: str) -> str:
    import urllib.parse

    return urllib.parse.quote(segment, safe="/@+")


# ---------------------------------------------------------------------------
# queue


def _summaryText(document: dict) -> str:
    out = io.StringIO()
    out.write(f"{document['messages']} message(s), {document['recipients']} recipient(s) queued\n")
    if not document.get("domains"):
        return out.getvalue()
    rows = [[d["domain"], d["messages"], d["recipients"], d["deferred"], d["attempting"],
             d["oldest"], d["next_attempt"]] for d in document["domains"]]
    out.write(table(rows, ["domain", "messages", "recipients", "deferred", "attempting",
                           "oldest", "next attempt"]))
    for d in document["domains"]:
        for reason in d.get("reasons", []):
            out.write(f"  {d['domain']}: {reason['count']} x {reason['reason']}\n")
    return out.getvalue()


def queueSummary(options, console: Console) -> int:
    """
    C{smartrelay queue [summary] [--domain D]}.
    """
    document = _client(options).json("GET", "queue", {"domain": options.domain})
    _write(console, options, document, _summaryText)
    return 0


def queueList(options, console: Console) -> int:
    """
    C{smartrelay queue list [--domain D] [--state S] [--limit N]}.
    """
    items = list(_client(options).pages(
        "queue/messages", {"domain": options.domain, "state": options.state}, options.limit))

    def human(items: list) -> str:
        rows = []
        for item in items:
            states = sorted({r.get("state") for r in item.get("recipients", [])} - {None})
            nexts = [r["next_attempt"] for r in item.get("recipients", []) if r.get("next_attempt")]
            rows.append([item["queue_id"], item.get("received"), item.get("size"),
                         item.get("sender") or "<>", len(item.get("recipients", [])),
                         ",".join(states), min(nexts) if nexts else None])
        return table(rows, ["queue id", "received", "size", "sender", "rcpts", "state",
                            "next attempt"]) + f"{len(items)} message(s)\n"

    _write(console, options, {"items": items}, lambda d: human(d["items"]))
    return 0


def queueShow(options, console: Console) -> int:
    """
    C{smartrelay queue show ID}: as C{smartrelay message ID}, with the
    headers.
    """
    options.headers = True
    return message(options, console)


def queueRetry(options, console: Console) -> int:
    """
    C{smartrelay queue retry ID... | --domain D}: attempt now.
    """
    client = _client(options)
    if options.domain is not None:
        if options.queue_ids:
            raise UsageError(f"{PROG} queue retry: give queue ids or --domain, not both")
        document = client.json("POST", "queue/retry", {"domain": options.domain})
        _write(console, options, document,
               lambda d: f"retrying {d['messages']} message(s) to {d['domain']}\n")
        return 0
    if not options.queue_ids:
        raise UsageError(f"{PROG} queue retry: give queue ids or --domain")
    return _each(options, console, options.queue_ids, "retry",
                 lambda q: client.json("POST", f"queue/{_path(q)}/retry"),
                 lambda q, d: f"{q}: retrying {', '.join(d.get('retrying', [])) or 'now'}")


def queueDelete(options, console: Console) -> int:
    """
    C{smartrelay queue delete ID...}: the messages never go out.
    """
    client = _client(options)
    return _each(options, console, options.queue_ids, "delete",
                 lambda q: client.json("DELETE", f"queue/{_path(q)}"),
                 lambda q, d: f"{q}: deleted")


def _each(options, console: Console, names: Sequence[str], label: str,
          call: Callable[[str], Any], line: Callable[[str, Any], str]) -> int:
    """
    C{call} for each of C{names}, with a progress bar when there are many;
    an error for one is reported and the others still run (exit status 1).
    """
    progress = Progress(console.stderr, len(names), label) if len(names) > 10 else None
    results, status = [], 0
    for done, name in enumerate(names, 1):
        try:
            document = call(name)
        except (CommandError, UsageError) as e:
            if progress is not None and progress.shown:
                console.stderr.write("\n")
            console.stderr.write(f"{PROG}: error: {str(e).removeprefix(PROG + ': ')}\n")
            status = 1
            results.append({"id": name, "error": str(e)})
        else:
            results.append(document)
            if not options.json:
                console.stdout.write(line(name, document) + "\n")
        if progress is not None:
            progress.update(done)
    if progress is not None:
        progress.finish(len(names))
    if options.json:
        console.stdout.write(json.dumps({"items": results}, indent=2) + "\n")
    return status


# ---------------------------------------------------------------------------
# suppress


def _suppressionRows(items: Iterable[dict]) -> list:
    return [[i["address"], i["reason"], i.get("time"), i.get("expires"), i.get("source_event")]
            for i in items]


_SUPPRESSION_HEADERS = ["address", "reason", "since", "expires", "source event"]


def suppressList(options, console: Console) -> int:
    """
    C{smartrelay suppress list [--search PREFIX] [--reason R] [--limit N]}.
    """
    items = list(_client(options).pages(
        "suppressions", {"q": options.search, "reason": options.reason}, options.limit))
    _write(console, options, {"items": items},
           lambda d: table(_suppressionRows(d["items"]), _SUPPRESSION_HEADERS)
           + f"{len(d['items'])} address(es)\n")
    return 0


def suppressAdd(options, console: Console) -> int:
    """
    C{smartrelay suppress add ADDRESS... [--reason R] [--expires T]}.
    """
    client = _client(options)
    body = {"reason": options.reason}
    if options.expires is not None:
        body["expires"] = options.expires
    return _each(options, console, options.addresses, "add",
                 lambda a: client.json("POST", "suppressions", document={**body, "address": a}),
                 lambda a, d: f"suppressed {d['address']} ({d['reason']})")


def suppressRemove(options, console: Console) -> int:
    """
    C{smartrelay suppress remove ADDRESS...}.
    """
    client = _client(options)
    return _each(options, console, options.addresses, "remove",
                 lambda a: client.json("DELETE", f"suppressions/{_path(a)}"),
                 lambda a, d: f"removed {d['address']}")


def _readImport(path: str, console: Console) -> list:
    """
    The entries of an import file: a JSON array (or C{{"items": [...]}})
    of addresses or objects, or CSV (a header with C{address}, or one
    address and optionally a reason and an expiry a line).
    """
    try:
        if path == "-":
            text = console.stdin.read()
        else:
            with open(path, encoding="utf-8-sig") as f:
                text = f.read()
    except FileNotFoundError:
        raise CommandError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CommandError(f"{path}: cannot read: {getattr(e, 'strerror', None) or e}") from None
    stripped = text.lstrip()
    if stripped.startswith(("[", "{")):
        try:
            document = json.loads(text)
        except ValueError as e:
            raise CommandError(f"{path}: not JSON: {e}") from None
        if isinstance(document, dict) and "items" in document:
            document = document["items"]
        if not isinstance(document, list):
            raise CommandError(f'{path}: expected a JSON array or {{"items": [...]}}')
        return document
    try:
        rows = [row for row in csv.reader(io.StringIO(text)) if any(c.strip() for c in row)]
    except csv.Error as e:
        raise CommandError(f"{path}: not CSV: {e}") from None
    if not rows:
        return []
    header = [h.strip().lower() for h in rows[0]]
    if "address" in header:
        body = rows[1:]
    else:
        header, body = ["address", "reason", "expires"], rows
    items = []
    for number, row in enumerate(body, 1):
        if len(row) > len(header):
            raise CommandError(f"{path}: entry {number}: more fields than the header has")
        items.append({k: v.strip() for k, v in zip(header, row)
                      if k in ("address", "reason", "expires") and v.strip()})
    return items


def suppressImport(options, console: Console) -> int:
    """
    C{smartrelay suppress import FILE [--reason R]}: in requests of
    L{IMPORT_CHUNK} entries, with a progress bar on a terminal.
    """
    items = _readImport(options.file, console)
    client = _client(options)
    progress = Progress(console.stderr, len(items), "import")
    imported = 0
    for start in range(0, len(items), IMPORT_CHUNK):
        chunk = items[start:start + IMPORT_CHUNK]
        try:
            document = client.json("POST", "suppressions/import", {"reason": options.reason},
                                   {"items": chunk})
        except (CommandError, UsageError) as e:
            if progress.shown:
                console.stderr.write("\n")
            message = re.sub(r"items\[(\d+)\]", lambda m: f"entry {start + int(m.group(1))}",
                             str(e).removeprefix(f"{PROG}: "))
            done = f"entries 1 to {start} were imported, " if start else ""
            raise CommandError(
                f"{message}; {done}entries {start + 1} to {len(items)} were not"
            ) from None
        imported += int(document.get("imported", len(chunk)))
        progress.update(imported)
    progress.finish(imported)
    _write(console, options, {"imported": imported},
           lambda d: f"imported {d['imported']} address(es) from {options.file}\n")
    return 0


def suppressExport(options, console: Console) -> int:
    """
    C{smartrelay suppress export [--format csv|json] [--output FILE]}.
    """
    response = _client(options).request(
        "GET", "suppressions/export",
        {"format": options.format, "q": options.search, "reason": options.reason})
    data = response.body
    if options.format == "json":
        document = response.json()
        data = (json.dumps(document.get("items", []), indent=2, ensure_ascii=False) + "\n").encode()
    if options.output is None or options.output == "-":
        console.stdout.write(data.decode("utf-8"))
        return 0
    from smartrelay.cli import writeFileAtomically

    try:
        writeFileAtomically(options.output, data.decode("utf-8"), mode=0o644)
    except OSError as e:
        raise CommandError(f"cannot write {options.output}: {e.strerror or e}") from None
    console.stderr.write(f"wrote {options.output}\n")
    return 0


# ---------------------------------------------------------------------------
# stats

_STAT_COLUMNS = ("accepted", "delivered", "deferred", "bounced", "suppressed", "complained",
                 "unsubscribed", "opened", "clicked")


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
                       ["soft bounces", totals.get("soft_bounces", 0)]],
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
    document = _client(options).json("GET", "stats", {
        "from": _time(options.since, "--from"), "to": _time(options.until, "--to"),
        "interval": options.interval, "tag": options.tag, "domain": options.domain,
    })
    _write(console, options, document, _statsText)
    return 0


# ---------------------------------------------------------------------------
# events


def parseTime(text: str) -> float:
    """
    POSIX seconds of an event's RFC 3339 C{time} (C{...Z} or an offset).
    """
    from datetime import datetime

    return datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00")).timestamp()


def _eventLine(event: dict) -> str:
    return "  ".join(str(x) for x in (
        event["time"], event["type"], event.get("queue_id") or "-",
        event.get("recipient") or "-", _detail(event))).rstrip() + "\n"


def events(options, console: Console, sleep: Callable[[float], None] = time.sleep) -> int:
    """
    C{smartrelay events [filters] [--limit N] [--follow]}: every matching
    event, oldest first, one a line (or one JSON object a line with
    C{--json}); C{--follow} then waits for new ones until interrupted.
    """
    client = _client(options)
    query = {
        "type": options.type, "recipient": options.recipient, "tag": options.tag,
        "domain": options.domain, "queue_id": options.queue_id,
        "since": _time(options.since, "--since"), "until": _time(options.until, "--until"),
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
# The parsers


def _common(parser: argparse.ArgumentParser) -> None:
    """
    The options of every API command (defaults applied in L{_defaults}:
    argparse.SUPPRESS keeps a nested parser from overwriting them).
    """
    group = parser.add_argument_group("how to reach the relay")
    group.add_argument("--url", default=argparse.SUPPRESS, metavar="URL",
                       help="the relay's web address (default: SMARTRELAY_URL, else from "
                            "[web] listen of --config, else http://127.0.0.1:8080)")
    group.add_argument("--token", default=argparse.SUPPRESS, metavar="TOKEN",
                       help="an API token (default: SMARTRELAY_TOKEN, else the first of "
                            "[web] api_tokens of --config)")
    group.add_argument("--config", default=argparse.SUPPRESS, metavar="FILE",
                       help="the relay's configuration, for the URL and the token")
    group.add_argument("--timeout", type=float, default=argparse.SUPPRESS, metavar="SECONDS",
                       help="how long to wait for the relay (default 30)")
    parser.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print JSON instead of a table")


_DEFAULTS = {"url": None, "token": None, "config": None, "timeout": 30.0, "json": False,
             "domain": None}


def _run(function):
    """
    C{function(options, console)} with the common options' defaults filled in.
    """

    def run(options, console):
        for key, value in _DEFAULTS.items():
            if not hasattr(options, key):
                setattr(options, key, value)
        return function(options, console)

    run.__doc__ = function.__doc__
    return run


def register(commands) -> None:
    """
    Add C{message}, C{queue}, C{suppress}, C{stats} and C{events}.
    """
    from smartrelay.store.interfaces import SUPPRESSION_REASONS

    reasons = sorted(SUPPRESSION_REASONS)
    api = "Talks to a running relay over its HTTP API (docs/api.md)."

    p = commands.add_parser("message", help="show a message: envelope, recipients, timeline",
                            description="Show the message with queue id ID (the id in the "
                                        "250 reply): its envelope, each recipient's state and "
                                        "every event. " + api)
    p.add_argument("queue_id", metavar="ID")
    p.add_argument("--headers", action="store_true", help="also print the headers as received")
    _common(p)
    p.set_defaults(run=_run(message))

    p = commands.add_parser("queue", help="see and steer the delivery queue",
                            description="The delivery queue: a summary per domain (the "
                                        "default), the messages, one message, retry now, "
                                        "delete. " + api)
    _common(p)
    p.add_argument("--domain", metavar="DOMAIN", default=argparse.SUPPRESS,
                   help="only this recipient domain")
    p.set_defaults(run=_run(queueSummary))
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    q = actions.add_parser("summary", help="per domain: counts, deferral reasons, next attempt")
    q.add_argument("--domain", metavar="DOMAIN", default=argparse.SUPPRESS,
                   help="only this recipient domain")
    _common(q)
    q.set_defaults(run=_run(queueSummary))
    q = actions.add_parser("list", help="the queued messages, oldest first")
    q.add_argument("--domain", metavar="DOMAIN", default=argparse.SUPPRESS,
                   help="only this recipient domain")
    q.add_argument("--state", choices=("queued", "deferred"), default=None)
    q.add_argument("--limit", type=_positive, default=None, metavar="N", help="at most N messages")
    _common(q)
    q.set_defaults(run=_run(queueList))
    q = actions.add_parser("show", help="one queued message, with its headers")
    q.add_argument("queue_id", metavar="ID")
    _common(q)
    q.set_defaults(run=_run(queueShow), headers=True)
    q = actions.add_parser("retry", help="attempt messages now")
    q.add_argument("queue_ids", metavar="ID", nargs="*")
    q.add_argument("--domain", metavar="DOMAIN", default=argparse.SUPPRESS,
                   help="every message waiting for this domain")
    _common(q)
    q.set_defaults(run=_run(queueRetry))
    q = actions.add_parser("delete", help="delete messages: they never go out")
    q.add_argument("queue_ids", metavar="ID", nargs="+")
    _common(q)
    q.set_defaults(run=_run(queueDelete))

    p = commands.add_parser("suppress", help="the suppression list",
                            description="The suppression list: addresses mail is never sent "
                                        "to. " + api)
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    q = actions.add_parser("list", help="the suppressed addresses")
    q.add_argument("--search", metavar="PREFIX", default=None, help="addresses starting with PREFIX")
    q.add_argument("--reason", choices=reasons, default=None)
    q.add_argument("--limit", type=_positive, default=None, metavar="N")
    _common(q)
    q.set_defaults(run=_run(suppressList))
    q = actions.add_parser("add", help="suppress addresses")
    q.add_argument("addresses", metavar="ADDRESS", nargs="+")
    q.add_argument("--reason", choices=reasons, default="manual")
    q.add_argument("--expires", metavar="TIME", default=None,
                   help="when the entry lapses (RFC 3339, a date, POSIX seconds)")
    _common(q)
    q.set_defaults(run=_run(suppressAdd))
    q = actions.add_parser("remove", help="let mail go to addresses again")
    q.add_argument("addresses", metavar="ADDRESS", nargs="+")
    _common(q)
    q.set_defaults(run=_run(suppressRemove))
    q = actions.add_parser("import", help="add addresses from a CSV or JSON file")
    q.add_argument("file", metavar="FILE", help="CSV or JSON; - for standard input")
    q.add_argument("--reason", choices=reasons, default="manual",
                   help="for entries that name none (default manual)")
    _common(q)
    q.set_defaults(run=_run(suppressImport))
    q = actions.add_parser("export", help="print or save the whole list")
    q.add_argument("--format", choices=("csv", "json"), default="csv")
    q.add_argument("--output", metavar="FILE", default=None, help="write FILE instead of printing")
    q.add_argument("--search", metavar="PREFIX", default=None)
    q.add_argument("--reason", choices=reasons, default=None)
    _common(q)
    q.set_defaults(run=_run(suppressExport))

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
    _common(p)
    p.set_defaults(run=_run(stats))

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
    p.add_argument("--limit", type=_positive, default=None, metavar="N")
    p.add_argument("--follow", action="store_true", help="then wait for new events")
    p.add_argument("--interval", type=float, default=2.0, metavar="SECONDS",
                   help="with --follow, how often to ask (default 2)")
    _common(p)
    p.set_defaults(run=_run(events))


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, not {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, not {text!r}")
    return value
