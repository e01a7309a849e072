"""
How fast are the event store back ends (SQLite, Redis)?

For each back end, with the real reactor:

1. I{events/s}: realistic events (C{accepted} and C{delivered}, a few
   C{bounced}, with detail dicts, tags, metadata, about 10,000 distinct
   recipients) appended with C{appendEvents} in batches, into a fresh store
   per run.  Once with one batch in flight at a time (as L{EventLog} does)
   and once with two in flight; the better of the two is reported.
2. I{recipient checks/s}: after 10,000 suppressions are added,
   C{checkSuppressions(recipients, now)} calls for lists of C{--recipients}
   addresses (a message's recipients, about 2% of them suppressed), eight
   calls in flight; the rate counts recipients checked.

SQLite runs in a temporary directory through its production set-up (a
one-thread pool, WAL mode).  Redis runs against a C{redis-server} that this
script starts on a free loopback port (see L{tests.redisserver}) and stops
by its PID at the end, also on error; every run starts from an empty
database (C{FLUSHALL}).

    python3 bench/store.py [--backend sqlite|redis|both] [--runs 3]
        [--events 100000] [--batch 500] [--checks 200000] [--recipients 50]
"""

import argparse
import atexit
import os
import random
import statistics
import tempfile
import time

from importlib.util import module_from_spec, spec_from_file_location

from twisted.internet.defer import ensureDeferred, gatherResults
from twisted.internet.task import react

# The stores measured are the installed smartrelay's; only the test suite's
# redis-server helper (which imports nothing of the relay) comes from the
# checkout, by its path, so the checkout is never put on sys.path.
from smartrelay.events import Event
from smartrelay.store.interfaces import SuppressionEntry
from smartrelay.store.redis import RedisStore
from smartrelay.store.sqlite import SQLiteStore


def _redisServerClass():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "tests",
                        "redisserver.py")
    spec = spec_from_file_location("_smartrelay_bench_redisserver", path)
    module = module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.RedisServer


RedisServer = _redisServerClass()

EVENTS_TARGET = 10_000
CHECKS_TARGET = 20_000
SUPPRESSIONS = 10_000
CHECKS_IN_FLIGHT = 8
DEPTHS = (1, 2)
START = 1_700_000_000.0

DOMAINS = [f"mail{i}.example" for i in range(150)] + [
    "gmail.com",
    "yahoo.com",
    "outlook.com",
    "hotmail.com",
    "icloud.com",
    "gmx.de",
    "web.de",
    "orange.fr",
]


def recipientPool(rng: random.Random, count: int = 10_000) -> list[str]:
    """
    C{count} distinct addresses, a few with upper-case domains.
    """
    pool = []
    for i in range(count):
        domain = rng.choice(DOMAINS)
        if i % 17 == 0:
            domain = domain.capitalize()
        pool.append(f"first.last{i}@{domain}")
    return pool


def makeEvents(count: int, rng: random.Random, recipients: list[str]) -> list[Event]:
    """
    C{count} events as the relay writes them: per message (1 to 5
    recipients) an C{accepted} per recipient, then a C{delivered} (one in
    40 a hard C{bounced}) per recipient.
    """
    events: list[Event] = []
    message = 0
    now = START
    while len(events) < count:
        message += 1
        queueID = "01/07-%05d-%08X" % (message % 100_000, message)
        rcpts = rng.sample(recipients, rng.choice([1, 1, 1, 2, 3, 5]))
        tag = f"campaign-{message % 25}"
        metadata = {"customer": f"c{message % 300}", "template": "welcome-v2"}
        size = rng.randrange(2_000, 60_000)
        accepted = {
            "sender": f"news@sender{message % 40}.example",
            "size": size,
            "client": {
                "ip": f"10.0.{message % 250}.{message % 7 + 1}",
                "helo": "app-server.internal",
                "user": "app",
                "tls": True,
            },
        }
        for rcpt in rcpts:
            now += 0.001
            events.append(
                Event(
                    type="accepted",
                    queue_id=queueID,
                    recipient=rcpt,
                    time=now,
                    tag=tag,
                    metadata=metadata,
                    detail=accepted,
                )
            )
        for rcpt in rcpts:
            now += 0.001
            domain = rcpt.rpartition("@")[2].lower()
            if rng.randrange(40) == 0:
                events.append(
                    Event(
                        type="bounced",
                        queue_id=queueID,
                        recipient=rcpt,
                        time=now,
                        tag=tag,
                        metadata=metadata,
                        detail={
                            "kind": "hard",
                            "reason": "userunknown",
                            "status": "5.1.1",
                            "diagnostic": f"550 5.1.1 <{rcpt}>: Recipient address"
                            " rejected: User unknown",
                            "remote": f"mx1.{domain}",
                        },
                    )
                )
            else:
                events.append(
                    Event(
                        type="delivered",
                        queue_id=queueID,
                        recipient=rcpt,
                        time=now,
                        tag=tag,
                        metadata=metadata,
                        detail={
                            "remote": f"mx1.{domain}",
                            "reply": "2.0.0 Ok: queued as 4XyZ12abCd",
                            "code": 250,
                            "tls": True,
                        },
                    )
                )
    del events[count:]
    return events


def makeSuppressions(rng: random.Random) -> list[SuppressionEntry]:
    """
    L{SUPPRESSIONS} entries, every reason, one in ten already expired.
    """
    reasons = ["bounce", "bounce", "bounce", "complaint", "unsubscribe", "manual"]
    entries = []
    for i in range(SUPPRESSIONS):
        entries.append(
            SuppressionEntry(
                address=f"gone{i}@{rng.choice(DOMAINS)}",
                reason=reasons[i % len(reasons)],
                source_event=f"{i:032x}",
                time=START - 86_400 + i,
                expires=START - 3_600 if i % 10 == 0 else None,
            )
        )
    return entries


def makeCheckLists(
    rng: random.Random,
    calls: int,
    size: int,
    recipients: list[str],
    suppressed: list[SuppressionEntry],
) -> list[list[str]]:
    """
    C{calls} recipient lists of C{size} addresses; one address in 50 is on
    the suppression list (some with the domain's case changed).
    """
    lists = []
    for _ in range(calls):
        addresses = []
        for _ in range(size):
            if rng.randrange(50) == 0:
                address = rng.choice(suppressed).address
                if rng.randrange(2):
                    local, _, domain = address.rpartition("@")
                    address = local + "@" + domain.upper()
                addresses.append(address)
            else:
                addresses.append(rng.choice(recipients))
        lists.append(addresses)
    return lists


class Backend:
    """
    Makes fresh stores of one back end.
    """

    name: str

    async def fresh(self, reactor):
        raise NotImplementedError

    def cleanUp(self) -> None:
        pass


class SQLiteBackend(Backend):
    name = "sqlite"

    def __init__(self) -> None:
        self._directory = tempfile.TemporaryDirectory(prefix="smartrelay-bench-")
        self._count = 0

    async def fresh(self, reactor):
        self._count += 1
        path = os.path.join(self._directory.name, f"store-{self._count}.db")
        store, pool = SQLiteStore.inThreadPool(path, reactor)
        await store.start()
        return store

    def cleanUp(self) -> None:
        self._directory.cleanup()


class RedisBackend(Backend):
    name = "redis"

    def __init__(self, server: RedisServer) -> None:
        self._server = server

    async def fresh(self, reactor):
        reply = self._server.command("FLUSHALL")
        if not reply.startswith(b"+OK"):
            raise RuntimeError(f"FLUSHALL failed: {reply!r}")
        store = RedisStore.fromURL(self._server.url(0), reactor)
        await store.start()
        return store


async def appendAll(store, events: list[Event], batch: int, depth: int) -> float:
    """
    Append C{events} in batches, C{depth} batches in flight; events/s.
    """
    batches = iter([events[i : i + batch] for i in range(0, len(events), batch)])

    async def writer():
        for chunk in batches:
            await store.appendEvents(chunk)

    began = time.perf_counter()
    await gatherResults([ensureDeferred(writer()) for _ in range(depth)])
    elapsed = time.perf_counter() - began
    return len(events) / elapsed


async def checkAll(store, lists: list[list[str]], now: float) -> tuple[float, int]:
    """
    Run C{checkSuppressions} for every list, L{CHECKS_IN_FLIGHT} calls in
    flight; recipients checked per second and the number found suppressed.
    """
    work = iter(lists)
    found = 0

    async def checker():
        nonlocal found
        for addresses in work:
            result = await store.checkSuppressions(addresses, now)
            found += len(result)

    began = time.perf_counter()
    await gatherResults([ensureDeferred(checker()) for _ in range(CHECKS_IN_FLIGHT)])
    elapsed = time.perf_counter() - began
    return sum(len(addresses) for addresses in lists) / elapsed, found


async def addSuppressions(store, entries: list[SuppressionEntry]) -> None:
    for i in range(0, len(entries), 200):
        await gatherResults([store.addSuppression(e) for e in entries[i : i + 200]])


async def benchBackend(reactor, backend: Backend, options, data) -> dict:
    events, suppressions, lists = data
    name = backend.name
    appendRates = {depth: [] for depth in DEPTHS}
    for run in range(options.runs):
        for depth in DEPTHS:
            store = await backend.fresh(reactor)
            try:
                rate = await appendAll(store, events, options.batch, depth)
            finally:
                await store.close()
            appendRates[depth].append(rate)
            print(
                f"{name:6} run {run + 1}: {rate:>10,.0f} events/s"
                f" ({depth} batch{'es' if depth > 1 else ''} in flight)",
                flush=True,
            )

    store = await backend.fresh(reactor)
    checkRates = []
    try:
        began = time.perf_counter()
        await addSuppressions(store, suppressions)
        print(
            f"{name:6} added {len(suppressions):,} suppressions in"
            f" {time.perf_counter() - began:.1f} s",
            flush=True,
        )
        for run in range(options.runs):
            rate, found = await checkAll(store, lists, START)
            checkRates.append(rate)
            checked = sum(len(addresses) for addresses in lists)
            print(
                f"{name:6} run {run + 1}: {rate:>10,.0f} recipient checks/s"
                f" ({len(lists):,} calls of {options.recipients},"
                f" {CHECKS_IN_FLIGHT} in flight; {found:,} of {checked:,} suppressed)",
                flush=True,
            )
    finally:
        await store.close()

    medians = {depth: statistics.median(rates) for depth, rates in appendRates.items()}
    best = max(DEPTHS, key=lambda depth: medians[depth])
    return {
        "appendRates": appendRates,
        "appendBest": best,
        "checkRates": checkRates,
    }


def runs(rates: list[float]) -> str:
    return ", ".join(f"{rate:,.0f}" for rate in rates)


def printTable(results: dict, options) -> None:
    print()
    print(
        f"{options.events:,} events in batches of {options.batch};"
        f" {options.checks:,} recipients checked per run in calls of"
        f" {options.recipients}; medians of {options.runs} runs"
    )
    print(
        f"targets: >= {EVENTS_TARGET:,} events/s and >= {CHECKS_TARGET:,}"
        " recipient checks/s per back end"
    )
    print()
    header = ("back end", "metric", "runs", "median", "target", "result")
    rows = []
    for name, result in results.items():
        for depth in DEPTHS:
            rates = result["appendRates"][depth]
            median = statistics.median(rates)
            best = depth == result["appendBest"]
            rows.append(
                (
                    name,
                    f"events/s, {depth} in flight" + (" (better)" if best else ""),
                    runs(rates),
                    f"{median:,.0f}",
                    f"{EVENTS_TARGET:,}" if best else "",
                    ("ok" if median >= EVENTS_TARGET else "MISSED") if best else "",
                )
            )
        rates = result["checkRates"]
        median = statistics.median(rates)
        rows.append(
            (
                name,
                f"recipient checks/s, {CHECKS_IN_FLIGHT} in flight",
                runs(rates),
                f"{median:,.0f}",
                f"{CHECKS_TARGET:,}",
                "ok" if median >= CHECKS_TARGET else "MISSED",
            )
        )
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    right = {2, 3, 4}

    def line(row):
        cells = [
            cell.rjust(width) if i in right else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths))
        ]
        return "  ".join(cells).rstrip()

    print(line(header))
    print("  ".join("-" * width for width in widths))
    for row in rows:
        print(line(row))


async def main(reactor, options, server) -> None:
    rng = random.Random(20261123)
    recipients = recipientPool(rng)
    events = makeEvents(options.events, rng, recipients)
    suppressions = makeSuppressions(rng)
    calls = max(1, options.checks // options.recipients)
    lists = makeCheckLists(rng, calls, options.recipients, recipients, suppressions)
    distinct = len({event.recipient for event in events})
    print(
        f"{len(events):,} events ({distinct:,} distinct recipients),"
        f" {len(suppressions):,} suppressions, {calls:,} recipient lists",
        flush=True,
    )
    data = (events, suppressions, lists)

    backends = []
    if options.backend in ("sqlite", "both"):
        backends.append(SQLiteBackend())
    if options.backend in ("redis", "both"):
        backends.append(RedisBackend(server))
    results = {}
    try:
        for backend in backends:
            results[backend.name] = await benchBackend(reactor, backend, options, data)
    finally:
        for backend in backends:
            backend.cleanUp()
    printTable(results, options)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--backend", choices=["sqlite", "redis", "both"], default="both")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--checks", type=int, default=200_000)
    parser.add_argument("--recipients", type=int, default=50)
    options = parser.parse_args()

    server = None
    if options.backend in ("redis", "both"):
        server = RedisServer()
        # Stopped by PID however the script ends (react() exits through
        # SystemExit; atexit covers anything that skips the finally).
        atexit.register(server.stop)
        server.start()
        print(f"redis-server pid {server.process.pid} on port {server.port}", flush=True)
    try:
        react(lambda reactor: ensureDeferred(main(reactor, options, server)))
    finally:
        if server is not None:
            server.stop()
