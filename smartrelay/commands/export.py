"""
C{smartrelay export}: events as JSON lines or CSV on standard output, the
same rows as the export files (L{smartrelay.export.formats}).

With C{--config FILE} it reads the relay's store directly (the SQLite file
under C{data_dir}, or the Redis server of C{[smartrelay] store}), so it
works with the relay stopped; otherwise it walks C{GET /api/v1/events} of
a running relay.  Events come oldest first; without C{--until} the export
ends at the time it started, so events arriving meanwhile are left for the
next run.  On a terminal, a progress bar on standard error.
"""

import argparse
import os
import time
from typing import Any, Callable, Optional

from smartrelay.commands.base import PROG, CommandError, Console, UsageError
from smartrelay.commands.client import ApiClient, ApiSettings
from smartrelay.commands.common import readConfig, runOnReactor
from smartrelay.commands.console import Progress
from smartrelay.config import parseDuration
from smartrelay.events import EVENT_TYPES
from smartrelay.export.formats import FORMATS, encode, header

#: Events per store or API page.
PAGE = 1000


def parseWhen(text: Optional[str], option: str, now: float) -> Optional[float]:
    """
    POSIX seconds from C{--since}/C{--until}: RFC 3339, a date, POSIX
    seconds, or a duration ago (C{2h}, C{7d}).

    @raise UsageError: for anything else, naming the option.
    """
    if text is None:
        return None
    from smartrelay.web.apirequest import parseTime

    try:
        return parseTime(text)
    except ValueError as e:
        problem = e
    if text.strip()[-1:].isalpha():
        try:
            return now - parseDuration(text)
        except ValueError:
            pass
    raise UsageError(f"{PROG} export: {option}: {problem} (or a duration ago: 2h)") from None


def parseTypes(text: Optional[str]) -> frozenset:
    """
    The C{--type} list (comma-separated); empty for all.

    @raise UsageError: for an unknown type.
    """
    if text is None:
        return frozenset()
    types = [t.strip() for t in text.split(",") if t.strip()]
    for t in types:
        if t not in EVENT_TYPES:
            raise UsageError(
                f"{PROG} export: --type: unknown event type {t!r}"
                f" (one of {', '.join(sorted(EVENT_TYPES))})"
            )
    return frozenset(types)


class TimeProgress(Progress):
    """
    A progress bar over the exported time range, with the count of events.
    """

    def __init__(self, stream, since: Optional[float], until: float, clock=time.monotonic):
        Progress.__init__(self, stream, 1000, "exporting", clock)
        self.since = since
        self.until = until
        self.count = 0

    def event(self, when: float) -> None:
        self.count += 1
        if self.since is None:
            self.since = when
        span = max(self.until - self.since, 1e-9)
        self.update(int(1000 * min(max(when - self.since, 0.0), span) / span))

    def update(self, done: int, force: bool = False) -> None:
        if not self.shown:
            return
        now = self.clock()
        if not force and now - self._last < 0.1:
            return
        self._last = now
        filled = int(self.WIDTH * min(done, self.total) / self.total)
        bar = "#" * filled + "." * (self.WIDTH - filled)
        self.stream.write(f"\r{self.label} [{bar}] {done // 10:3d}% {self.count} events")
        self.stream.flush()


class Writer:
    """
    Writes events to the console in a format, filtered by type, with the
    progress bar.
    """

    def __init__(self, console: Console, format: str, types: frozenset, progress: TimeProgress,
                 timeOf: Callable[[Any], float]):
        self.out = console.stdout
        self.format = format
        self.types = types
        self.progress = progress
        self.timeOf = timeOf
        self.count = 0
        self.out.write(header(format))

    def write(self, events: list) -> None:
        if self.types:
            events = [e for e in events if _type(e) in self.types]
        if not events:
            return
        self.out.write(encode(self.format, events))
        self.count += len(events)
        for e in events:
            self.progress.event(self.timeOf(e))


def _type(e) -> str:
    return e["type"] if isinstance(e, dict) else e.type


async def _fromStore(reactor, config, since, until, types, writer: Writer) -> None:
    store = openStore(config, reactor)
    await store.start()
    try:
        cursor = None
        single = next(iter(types)) if len(types) == 1 else None
        while True:
            page = await store.queryEvents(
                type=single, since=since, until=until, cursor=cursor, limit=PAGE
            )
            writer.write(page.events)
            cursor = page.cursor
            if cursor is None:
                break
    finally:
        await store.close()


def runNow(work: Callable[[Any], Any]) -> Any:
    """
    Run the coroutine C{work(None)} whose awaits all fire at once (a
    SQLite store read in this thread): no reactor is needed.
    """
    from twisted.internet.defer import Deferred

    d = Deferred.fromCoroutine(work(None))
    box: list = []
    d.addBoth(box.append)
    if not box:
        raise CommandError("the event store did not answer")
    result = box[0]
    if hasattr(result, "raiseException"):
        result.raiseException()
    return result


def openStore(config, reactor):
    """
    The relay's store, for reading: the SQLite file (which must exist) or
    the Redis server.

    @raise CommandError: no SQLite file where the configuration says.
    """
    relay = config.relay
    if relay.store == "sqlite":
        from twisted.internet.defer import maybeDeferred

        from smartrelay.store.sqlite import SQLiteStore

        path = os.path.join(relay.data_dir, "smartrelay.sqlite")
        if not os.path.isfile(path):
            raise CommandError(
                f"no event store at {path} (is [smartrelay] data_dir right, and the"
                " command run from the relay's directory?)"
            )
        return SQLiteStore(path, maybeDeferred)
    from smartrelay.store.redis import RedisStore

    return RedisStore.fromURL(relay.store, reactor)


def export(options, console: Console, now: Callable[[], float] = time.time) -> int:
    """
    C{smartrelay export [--since T] [--until T] [--type T,...] [--format
    jsonl|csv] [--config FILE]}: every matching event, oldest first.
    """
    started = now()
    since = parseWhen(options.since, "--since", started)
    until = parseWhen(options.until, "--until", started)
    if until is None:
        until = started
    if since is not None and since >= until:
        raise UsageError(f"{PROG} export: --since must be before --until")
    types = parseTypes(options.type)
    progress = TimeProgress(console.stderr, since, until)
    try:
        if options.config is not None:
            config = readConfig(options.config, "export")
            writer = Writer(console, options.format, types, progress, lambda e: e.time)

            async def work(reactor):
                try:
                    await _fromStore(reactor, config, since, until, types, writer)
                except (CommandError, BrokenPipeError):
                    raise
                except Exception as e:
                    raise CommandError(f"cannot read the event store: {e}") from None

            if config.relay.store == "sqlite":
                # Read in this thread: every Deferred has fired on return.
                runNow(work)
            else:
                runOnReactor(work)
        else:
            from smartrelay.web.apirequest import parseTime

            settings = ApiSettings.resolve(options.url, options.token, None,
                                           timeout=options.timeout)
            client = ApiClient(settings)
            writer = Writer(console, options.format, types, progress,
                            lambda e: parseTime(e["time"]))
            query = {"since": "%.6f" % since if since is not None else None,
                     "until": "%.6f" % until,
                     "type": next(iter(types)) if len(types) == 1 else None}
            batch = []
            for item in client.pages("events", query):
                batch.append(item)
                if len(batch) >= PAGE:
                    writer.write(batch)
                    batch = []
            writer.write(batch)
        console.stdout.flush()
    except BrokenPipeError:
        # The reader went away (| head): not an error.
        return 0
    progress.finish(progress.count)
    return 0


def register(commands) -> None:
    """
    Add C{export}.
    """
    p = commands.add_parser(
        "export",
        help="events as JSON lines or CSV",
        description=(
            "Print the events (oldest first) as JSON lines (one DESIGN 1.7 event "
            "object a line) or CSV (a header row; metadata and detail as JSON "
            "text), the rows of the [export] files.  With --config it reads the "
            "relay's store directly; otherwise it asks a running relay over its "
            "HTTP API (--url, --token or SMARTRELAY_URL, SMARTRELAY_TOKEN)."
        ),
    )
    p.add_argument("--since", metavar="TIME", default=None,
                   help="from (RFC 3339, a date, POSIX seconds, or a duration ago: 7d)")
    p.add_argument("--until", metavar="TIME", default=None,
                   help="until, exclusive (default: now)")
    p.add_argument("--type", metavar="TYPE[,TYPE]", default=None,
                   help="only these event types")
    p.add_argument("--format", choices=FORMATS, default="jsonl",
                   help="jsonl (default) or csv")
    p.add_argument("--config", metavar="FILE", default=None,
                   help="the relay's configuration: read its store directly")
    p.add_argument("--url", metavar="URL", default=None,
                   help="without --config: the relay's web address")
    p.add_argument("--token", metavar="TOKEN", default=None,
                   help="without --config: an API token")
    p.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                   help="without --config: how long to wait for the relay (default 30)")
    p.set_defaults(run=export)
