"""
Events per second through the exporter (DESIGN 1.7b export files) and
through the webhooks to a local receiver.

    python3 bench/export.py                      # both, defaults
    python3 bench/export.py --events 200000 --only export
    python3 bench/export.py --events 50000 --only webhooks --batch 100

Export: a SQLite store (the relay's back end, its one-thread pool) is
filled with N events; then one export writes them to one file (JSONL,
CSV, and gzipped JSONL), as the relay's exporter does (pages of 1,000 read
from the store while the previous page is encoded and written in the
export thread; fsync, link, directory fsync).  Rate: N / time of the
export.

Webhooks: a receiver in a child process (twisted.web on loopback,
answering 200 to each POST after reading it); the sender (persistent
connections, [webhooks] concurrency POSTs at once, signed batches) starts
on the store, then N events are appended in batches of 1,000 (as the event
log writes them); rate: N / time from the first append to the last
event acknowledged by the receiver.

Targets (issue 16): >= 20,000 events/s exported, >= 5,000 events/s
delivered by webhooks.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

RECEIVER = r"""
import sys
from twisted.internet import reactor
from twisted.web.resource import Resource
from twisted.web.server import Site

class Hook(Resource):
    isLeaf = True
    def render_POST(self, request):
        request.content.read()
        return b"ok"

port = reactor.listenTCP(0, Site(Hook()), interface="127.0.0.1")
print(port.getHost().port, flush=True)
reactor.run()
"""


def makeEvents(n, offset=0):
    from smartrelay.events import Event

    t0 = time.time()
    return [
        Event(
            type=("accepted", "delivered", "opened", "bounced")[i % 4],
            queue_id="2A/01-%05d-6921A3F0" % (i % 100000),
            recipient=f"user{i}@example{i % 50}.com",
            time=t0 + i * 0.001,
            tag="newsletter",
            metadata={"campaign": "december", "user": str(i)},
            detail={"code": 250, "remote": "mx.example.com", "reply": "250 2.0.0 OK queued"},
        )
        for i in range(offset, offset + n)
    ]


async def fill(store, n):
    from twisted.internet.defer import gatherResults

    for start in range(0, n, 5000):
        await store.appendEvents(makeEvents(min(5000, n - start), start))


async def benchExport(reactor, n, runs):
    from twisted.internet.threads import deferToThreadPool
    from twisted.python.threadpool import ThreadPool

    from smartrelay.export.exporter import STREAM, Exporter
    from smartrelay.store.sqlite import SQLiteStore

    results = []
    for format, gzip in [("jsonl", False), ("csv", False), ("jsonl", True)]:
        rates = []
        for run in range(runs):
            directory = tempfile.mkdtemp(prefix="bench-export-")
            store, _ = SQLiteStore.inThreadPool(os.path.join(directory, "s.sqlite"), reactor)
            await store.start()
            await fill(store, n)
            pool = ThreadPool(1, 1, name="export")
            pool.start()
            exporter = Exporter(
                store=store, clock=reactor, directory=os.path.join(directory, "out"),
                owner="2A", runInThread=lambda f, *a, **kw: deferToThreadPool(
                    reactor, pool, f, *a, **kw),
                format=format, gzip=gzip,
            )
            os.makedirs(exporter.directory)
            started = time.perf_counter()
            name = await exporter.exportOnce()
            elapsed = time.perf_counter() - started
            pool.stop()
            size = os.path.getsize(os.path.join(exporter.directory, name))
            await store.close()
            rates.append(n / elapsed)
            print(f"  export {format}{' gzip' if gzip else ''} run {run + 1}: {n} events in"
                  f" {elapsed:.2f}s = {n / elapsed:,.0f} events/s ({size / n:.0f} bytes each)")
        results.append((f"{format}{'.gz' if gzip else ''}", sorted(rates)[len(rates) // 2]))
    return results


async def benchWebhooks(reactor, n, batch, concurrency, runs):
    from twisted.internet.task import deferLater

    from smartrelay.export.webhooks import AgentPoster, WebhookSender
    from smartrelay.store.sqlite import SQLiteStore

    child = subprocess.Popen([sys.executable, "-c", RECEIVER], stdout=subprocess.PIPE, text=True)
    try:
        port = int(child.stdout.readline())
        rates = []
        for run in range(runs):
            directory = tempfile.mkdtemp(prefix="bench-webhooks-")
            store, _ = SQLiteStore.inThreadPool(os.path.join(directory, "s.sqlite"), reactor)
            await store.start()
            sender = WebhookSender(
                store=store, clock=reactor,
                poster=AgentPoster(reactor, allowPrivate=True, maxConnections=concurrency),
                url=f"http://127.0.0.1:{port}/hook", secret="bench-secret-0123456789",
                owner="2A", batch=batch, concurrency=concurrency,
            )
            sender.startService()
            await deferLater(reactor, 0.2, lambda: None)
            started = time.perf_counter()
            await fill(store, n)
            while sender.delivered < n:
                await deferLater(reactor, 0.01, lambda: None)
            elapsed = time.perf_counter() - started
            await sender.stopService()
            await store.close()
            rates.append(n / elapsed)
            print(f"  webhooks run {run + 1}: {n} events in {sender.batches} POSTs,"
                  f" {elapsed:.2f}s = {n / elapsed:,.0f} events/s")
        return sorted(rates)[len(rates) // 2]
    finally:
        child.terminate()
        child.wait()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=100000)
    parser.add_argument("--webhook-events", type=int, default=50000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", choices=("export", "webhooks"))
    options = parser.parse_args()

    from twisted.internet import task
    from twisted.internet.defer import Deferred

    async def run(reactor):
        if options.only != "webhooks":
            for name, rate in await benchExport(reactor, options.events, options.runs):
                print(f"export {name}: median {rate:,.0f} events/s (target 20,000)")
        if options.only != "export":
            rate = await benchWebhooks(reactor, options.webhook_events, options.batch,
                                       options.concurrency, options.runs)
            print(f"webhooks: median {rate:,.0f} events/s (target 5,000)")

    task.react(lambda reactor: Deferred.fromCoroutine(run(reactor)))


if __name__ == "__main__":
    main()
