"""
How long one scrape of C{/metrics} keeps the reactor thread busy with a big
queue: the relay's own collectors (smartrelay.web.metrics) over a real
DeliveryScheduler holding N queued messages (delivery on hold, so the queue
stays) spread over D recipient domains, with every event type counted and
the store latency histogram filled.

    python3 bench/metrics.py                      # 100,000 messages, 5,000 domains
    python3 bench/metrics.py --messages 10000 --domains 50 --recipients 3

Prints the time of the first scrape, the median and worst of --runs
scrapes after it, the worst slice of the queue passes they start (each a
reactor turn of its own), and the size of the answer.
"""

import argparse
import os
import random
import statistics
import sys
import tempfile
import time

from prometheus_client.exposition import generate_latest  # noqa: E402
from twisted.internet.defer import maybeDeferred  # noqa: E402
from twisted.internet.task import Clock  # noqa: E402

from smartrelay.events import EVENT_TYPES, EventLog  # noqa: E402
from smartrelay.message import Recipient, SpoolEntry  # noqa: E402
from smartrelay.outbound.scheduler import DeliveryScheduler  # noqa: E402
from smartrelay.outbound.testing import Delays, FakeDeliverer, FakeRouter, FakeSpool  # noqa: E402
from smartrelay.spool import Spool  # noqa: E402
from smartrelay.store.memory import MemoryStore  # noqa: E402
from smartrelay.web.metrics import RelayCollector, RelayMetrics  # noqa: E402


NEWLINE = b"\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--domains", type=int, default=5_000)
    parser.add_argument("--recipients", type=int, default=1, help="recipients per message")
    parser.add_argument("--runs", type=int, default=20)
    options = parser.parse_args()

    clock = Clock()
    clock.advance(1_700_000_000)
    metrics = RelayMetrics()
    store = metrics.timedStore(MemoryStore(), clock)
    events = EventLog(store, clock, observe=metrics.events.count)
    scheduler = DeliveryScheduler(
        spool=FakeSpool(),
        router=FakeRouter(),
        connector=FakeDeliverer(),
        events=events,
        clock=clock,
        retry=Delays((60,)),
        maxAge=86400.0,
        maxConnections=100,
        hold=True,
        store=store,
    )
    scheduler.startService()
    rng = random.Random(1)
    # Domain sizes as in real mail: a few big ones, a long tail.
    weights = [1 / (rank + 1) for rank in range(options.domains)]
    for n in range(options.messages):
        domains = rng.choices(range(options.domains), weights, k=options.recipients)
        scheduler.enqueue(
            SpoolEntry(
                queue_id=f"2A/01-{n:05d}-{n:08X}",
                sender="app@example.com",
                recipients=[Recipient(f"user{n}.{i}@d{d}.example") for i, d in enumerate(domains)],
                received=clock.seconds() - rng.uniform(0, 3600),
                size=2048,
            )
        )
    for type in EVENT_TYPES:
        events.emit(type, "2A/01-00000-00000000", "a@d0.example", detail={"kind": "hard"})
    for _ in range(1000):
        store.checkSuppressions(["a@d0.example"], clock.seconds())
    clock.advance(0)
    with tempfile.TemporaryDirectory() as directory:
        spool = Spool(directory, maybeDeferred, clock=clock)
        spool.recover()
        metrics.register(
            RelayCollector(
                clock=clock,
                scheduler=scheduler,
                spool=spool,
                events=events,
                journal=None,
                listeners={},
                nodeID="2A",
            )
        )
        first = time.perf_counter()
        generate_latest(metrics.registry)
        first = time.perf_counter() - first
        times, slices = [], []
        for _ in range(options.runs):
            started = time.perf_counter()
            answer = generate_latest(metrics.registry)
            times.append(time.perf_counter() - started)
            # The sliced pass the scrape started, one reactor turn a slice.
            while clock.getDelayedCalls():
                [call] = clock.getDelayedCalls()
                func, args, kw = call.func, call.args, call.kw
                call.cancel()
                started = time.perf_counter()
                func(*args, **kw)
                slices.append(time.perf_counter() - started)
    print(
        f"{options.messages:,} messages x {options.recipients} recipient(s), "
        f"{options.domains:,} domains: first scrape {first * 1000:.1f} ms; then scrape "
        f"median {statistics.median(times) * 1000:.1f} ms, worst {max(times) * 1000:.1f} ms; "
        f"{len(slices) // max(1, options.runs)} slices a pass, slice median "
        f"{statistics.median(slices or [0]) * 1000:.1f} ms, worst {max(slices, default=0) * 1000:.1f} ms; {len(answer):,} bytes, "
        f"{answer.count(NEWLINE):,} lines"
    )

if __name__ == "__main__":
    main()
