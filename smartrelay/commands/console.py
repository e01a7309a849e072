"""
What the commands over the relay's API share (L{smartrelay.commands.client}
does the HTTP): their common options, tables, a progress bar, an action
run on many ids, times given as durations.
"""

import argparse
import json
import time
import urllib.parse
from typing import Any, Callable, Optional, Sequence

from smartrelay.commands.base import PROG, CommandError, Console, UsageError
from smartrelay.commands.client import ApiClient, ApiSettings
from smartrelay.config import parseDuration

#: The end of each command's description.
API_NOTE = "Talks to a running relay over its HTTP API (docs/api.md)."


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


def timeArgument(text: Optional[str], option: str) -> Optional[str]:
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


def write(console: Console, options, document: Any, human: Callable[[Any], str]) -> None:
    if options.json:
        console.stdout.write(json.dumps(document, indent=2, ensure_ascii=False) + "\n")
    else:
        console.stdout.write(human(document))


def apiClient(options) -> ApiClient:
    settings = ApiSettings.resolve(
        options.url, options.token, options.config, timeout=options.timeout
    )
    return ApiClient(settings)


def eventDetail(event: dict) -> str:
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


def indent(text: str) -> str:
    return "".join("  " + line + "\n" for line in text.splitlines())


def quotePath(segment: str) -> str:
    return urllib.parse.quote(segment, safe="/@+")


def runEach(options, console: Console, names: Sequence[str], label: str,
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


def addCommonOptions(parser: argparse.ArgumentParser) -> None:
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


def withDefaults(function):
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


def positiveInt(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, not {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, not {text!r}")
    return value
