"""
How fast does the SQLite event store append events?

Appends events in batches through L{SQLiteStore.inThreadPool} (the
production set-up: real reactor, one database thread), one batch in flight
at a time as L{EventLog} does, into a fresh database file per run.  Prints
events/s for each run and the median.

    python bench/store_events.py [--events 100000] [--batch 500] [--runs 3]
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir))

from twisted.internet.defer import ensureDeferred  # noqa: E402
from twisted.internet.task import react  # noqa: E402

from smartrelay.events import Event  # noqa: E402
from smartrelay.store.sqlite import SQLiteStore  # noqa: E402

TYPES = ["accepted", "delivered", "opened", "clicked", "bounced", "deferred"]


def makeEvents(count: int, start: float) -> list[Event]:
    events = []
    for i in range(count):
        type = TYPES[i % len(TYPES)]
        events.append(
            Event(
                type=type,
                queue_id=f"{i // 4:012X}",
                recipient=f"user{i % 5000}@Example{i % 50}.com",
                time=start + i / 1000,
                tag=f"campaign-{i % 20}",
                metadata={"customer": f"c{i % 300}", "template": "welcome-v2"},
                detail=(
                    {
                        "kind": "hard",
                        "reason": "userunknown",
                        "status": "5.1.1",
                        "diagnostic": "550 5.1.1 <user@example.com>: no such user",
                        "remote": "mx1.example.com",
                    }
                    if type == "bounced"
                    else {}
                ),
            )
        )
    return events


async def oneRun(reactor, directory: str, events: list[Event], batch: int) -> float:
    path = os.path.join(directory, f"events-{time.monotonic_ns()}.db")
    store, pool = SQLiteStore.inThreadPool(path, reactor)
    await store.start()
    began = time.perf_counter()
    for i in range(0, len(events), batch):
        await store.appendEvents(events[i : i + batch])
    elapsed = time.perf_counter() - began
    await store.close()
    return len(events) / elapsed


async def main(reactor, options) -> None:
    events = makeEvents(options.events, 1_700_000_000.0)
    rates = []
    with tempfile.TemporaryDirectory() as directory:
        for run in range(options.runs):
            rate = await oneRun(reactor, directory, events, options.batch)
            rates.append(rate)
            print(f"run {run + 1}: {rate:,.0f} events/s")
    print(
        f"median of {options.runs}: {statistics.median(rates):,.0f} events/s"
        f" ({options.events} events, batches of {options.batch})"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--runs", type=int, default=3)
    options = parser.parse_args()
    react(lambda reactor: ensureDeferred(main(reactor, options)))
