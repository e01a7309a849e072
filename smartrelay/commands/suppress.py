"""
C{smartrelay suppress}: the suppression list over the relay's API.
"""

import csv
import io
import json
import re
from typing import Iterable

from smartrelay.commands.base import PROG, CommandError, Console, UsageError
from smartrelay.commands.console import (
    API_NOTE,
    Progress,
    addCommonOptions,
    apiClient,
    positiveInt,
    quotePath,
    runEach,
    table,
    withDefaults,
    write,
)

#: Entries sent per request by C{suppress import}.
IMPORT_CHUNK = 1000


def _suppressionRows(items: Iterable[dict]) -> list:
    return [[i["address"], i["reason"], i.get("time"), i.get("expires"), i.get("source_event")]
            for i in items]


_SUPPRESSION_HEADERS = ["address", "reason", "since", "expires", "source event"]


def suppressList(options, console: Console) -> int:
    """
    C{smartrelay suppress list [--search PREFIX] [--reason R] [--limit N]}.
    """
    items = list(apiClient(options).pages(
        "suppressions", {"q": options.search, "reason": options.reason}, options.limit))
    write(console, options, {"items": items},
           lambda d: table(_suppressionRows(d["items"]), _SUPPRESSION_HEADERS)
           + f"{len(d['items'])} address(es)\n")
    return 0


def suppressAdd(options, console: Console) -> int:
    """
    C{smartrelay suppress add ADDRESS... [--reason R] [--expires T]}.
    """
    client = apiClient(options)
    body = {"reason": options.reason}
    if options.expires is not None:
        body["expires"] = options.expires
    return runEach(options, console, options.addresses, "add",
                 lambda a: client.json("POST", "suppressions", document={**body, "address": a}),
                 lambda a, d: f"suppressed {d['address']} ({d['reason']})")


def suppressRemove(options, console: Console) -> int:
    """
    C{smartrelay suppress remove ADDRESS...}.
    """
    client = apiClient(options)
    return runEach(options, console, options.addresses, "remove",
                 lambda a: client.json("DELETE", f"suppressions/{quotePath(a)}"),
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
    client = apiClient(options)
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
    write(console, options, {"imported": imported},
           lambda d: f"imported {d['imported']} address(es) from {options.file}\n")
    return 0


def suppressExport(options, console: Console) -> int:
    """
    C{smartrelay suppress export [--format csv|json] [--output FILE]}.
    """
    response = apiClient(options).request(
        "GET", "suppressions/export",
        {"format": options.format, "q": options.search, "reason": options.reason})
    data = response.body
    if options.format == "json":
        document = response.json()
        data = (json.dumps(document.get("items", []), indent=2, ensure_ascii=False) + "\n").encode()
    if options.output is None or options.output == "-":
        console.stdout.write(data.decode("utf-8"))
        return 0
    from smartrelay.commands.base import writeFileAtomically

    try:
        writeFileAtomically(options.output, data.decode("utf-8"), mode=0o644)
    except OSError as e:
        raise CommandError(f"cannot write {options.output}: {e.strerror or e}") from None
    console.stderr.write(f"wrote {options.output}\n")
    return 0


# ---------------------------------------------------------------------------


def register(commands) -> None:
    """
    Add C{suppress} and its actions.
    """
    from smartrelay.store.interfaces import SUPPRESSION_REASONS

    reasons = sorted(SUPPRESSION_REASONS)
    api = API_NOTE

    p = commands.add_parser("suppress", help="the suppression list",
                            description="The suppression list: addresses mail is never sent "
                                        "to. " + api)
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    q = actions.add_parser("list", help="the suppressed addresses")
    q.add_argument("--search", metavar="PREFIX", default=None, help="addresses starting with PREFIX")
    q.add_argument("--reason", choices=reasons, default=None)
    q.add_argument("--limit", type=positiveInt, default=None, metavar="N")
    addCommonOptions(q)
    q.set_defaults(run=withDefaults(suppressList))
    q = actions.add_parser("add", help="suppress addresses")
    q.add_argument("addresses", metavar="ADDRESS", nargs="+")
    q.add_argument("--reason", choices=reasons, default="manual")
    q.add_argument("--expires", metavar="TIME", default=None,
                   help="when the entry lapses (RFC 3339, a date, POSIX seconds)")
    addCommonOptions(q)
    q.set_defaults(run=withDefaults(suppressAdd))
    q = actions.add_parser("remove", help="let mail go to addresses again")
    q.add_argument("addresses", metavar="ADDRESS", nargs="+")
    addCommonOptions(q)
    q.set_defaults(run=withDefaults(suppressRemove))
    q = actions.add_parser("import", help="add addresses from a CSV or JSON file")
    q.add_argument("file", metavar="FILE", help="CSV or JSON; - for standard input")
    q.add_argument("--reason", choices=reasons, default="manual",
                   help="for entries that name none (default manual)")
    addCommonOptions(q)
    q.set_defaults(run=withDefaults(suppressImport))
    q = actions.add_parser("export", help="print or save the whole list")
    q.add_argument("--format", choices=("csv", "json"), default="csv")
    q.add_argument("--output", metavar="FILE", default=None, help="write FILE instead of printing")
    q.add_argument("--search", metavar="PREFIX", default=None)
    q.add_argument("--reason", choices=reasons, default=None)
    addCommonOptions(q)
    q.set_defaults(run=withDefaults(suppressExport))
