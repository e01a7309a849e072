"""
What does a cluster-wide connection slot cost per delivery on Redis?

For each simulated delivery the relay does what the scheduler does for a
new session on a rate-limited destination: take a rate token
(C{takeTokens}), take a connection-slot lease through the
L{LeaseKeeper} (C{acquireLease}, one Lua script), and give the lease back
at the end (C{ZREM}); C{--concurrency} deliveries are in flight at once,
over the store's one connection, as on a busy node.  The figure reported
is the relay process's CPU time (user + system, C{time.process_time})
per delivery, and the wall-clock rate; redis-server's own CPU is not
counted.

A worst case: a real session carries up to C{messages_per_connection}
messages on one lease, so the lease part is paid once per session, not
once per message.

redis-server is started on a free loopback port by L{tests.redisserver}
(loaded by its path; the checkout is not put on sys.path) and stopped by
its PID at the end.

    python3 bench/cluster.py [--deliveries 20000] [--concurrency 50] [--runs 3]
"""

import argparse
import os
import statistics
import time
from importlib.util import module_from_spec, spec_from_file_location

from twisted.internet.defer import ensureDeferred, gatherResults
from twisted.internet.task import react

from smartrelay.cluster.leases import LeaseKeeper
from smartrelay.store.redis import RedisStore


def _redisServerClass():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "tests",
                        "redisserver.py")
    spec = spec_from_file_location("_smartrelay_bench_redisserver", path)
    module = module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.RedisServer


async def run(reactor, store, deliveries: int, concurrency: int) -> tuple:
    keeper = LeaseKeeper(store, reactor, holder="bench", shared=True, ttl=30)
    keeper.startService()
    left = [deliveries]

    async def worker(n: int) -> None:
        while left[0] > 0:
            left[0] -= 1
            token = await store.takeTokens(
                f"rate:bench{n % 10}", 1e9, 1e9, reactor.seconds()
            )
            assert token.allowed
            acquired = await keeper.acquire(f"conn:bench{n % 10}", 10**6)
            acquired.lease.release()

    cpu, wall = time.process_time(), time.perf_counter()
    await gatherResults([ensureDeferred(worker(n)) for n in range(concurrency)])
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    keeper.stopService()
    return cpu / deliveries, deliveries / wall


async def main(reactor, options) -> None:
    server = _redisServerClass()()
    server.start()
    try:
        store = RedisStore.fromURL(server.url(0), reactor)
        await store.start()
        await run(reactor, store, 1000, options.concurrency)  # warm up
        results = []
        for _ in range(options.runs):
            results.append(await run(reactor, store, options.deliveries, options.concurrency))
        await store.close()
    finally:
        server.stop()
    cpu = statistics.median(r[0] for r in results)
    rate = statistics.median(r[1] for r in results)
    print(
        f"lease + token per delivery on Redis: {cpu * 1000:.3f} ms relay CPU "
        f"(median of {options.runs} runs of {options.deliveries}, "
        f"{options.concurrency} in flight), {rate:,.0f} deliveries/s"
    )


def parse():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--deliveries", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--runs", type=int, default=3)
    return parser.parse_args()


if __name__ == "__main__":
    options = parse()
    react(lambda reactor: ensureDeferred(main(reactor, options)))
