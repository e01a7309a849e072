"""
What does a cluster-wide connection slot cost per delivery on Redis?

For each simulated delivery the relay does what the scheduler does for a
new session on a rate-limited destination, two ways, in interleaved runs:

  - C{separate} (the baseline, what the scheduler does today): take a
    rate token (C{takeTokens}), take a connection-slot lease through the
    L{LeaseKeeper} (C{acquireLease}, one Lua script), give the lease back
    at the end (C{ZREM}): three round trips;
  - C{combined}: L{LeaseKeeper.acquireWithToken} (C{acquireLeaseAndTokens},
    one Lua script for the lease and the token), then the release: two.

C{--concurrency} deliveries are in flight at once, over the store's one
connection, as on a busy node.  The figure reported is the relay
process's CPU time (user + system, C{time.process_time}) per delivery,
and the wall-clock rate; redis-server's own CPU is not counted.

A worst case: a real session carries up to C{messages_per_connection}
messages on one lease, so the lease part is paid once per session, not
once per message.

redis-server is started on a free loopback port by L{tests.redisserver}
(loaded by its path; the checkout is not put on sys.path) and stopped by
its PID at the end.

    python3 bench/cluster.py [--deliveries 20000] [--concurrency 50] [--runs 3]
                             [--only separate|combined]
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


async def run(reactor, store, deliveries: int, concurrency: int, mode: str) -> tuple:
    keeper = LeaseKeeper(store, reactor, holder="bench", shared=True, ttl=30)
    keeper.startService()
    left = [deliveries]

    async def separate(n: int) -> None:
        while left[0] > 0:
            left[0] -= 1
            token = await store.takeTokens(
                f"rate:bench{n % 10}", 1e9, 1e9, reactor.seconds()
            )
            assert token.allowed
            acquired = await keeper.acquire(f"conn:bench{n % 10}", 10**6)
            acquired.lease.release()

    async def combined(n: int) -> None:
        resource, key = f"conn:bench{n % 10}", f"rate:bench{n % 10}"
        while left[0] > 0:
            left[0] -= 1
            acquired = await keeper.acquireWithToken(resource, 10**6, key, 1e9, 1e9)
            acquired.lease.release()

    worker = {"separate": separate, "combined": combined}[mode]
    cpu, wall = time.process_time(), time.perf_counter()
    await gatherResults([ensureDeferred(worker(n)) for n in range(concurrency)])
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    keeper.stopService()
    return cpu / deliveries, deliveries / wall


MODES = {
    "separate": "token + lease + release (3 round trips)",
    "combined": "lease with token + release (2 round trips)",
}


async def main(reactor, options) -> None:
    server = _redisServerClass()()
    server.start()
    modes = [options.only] if options.only else list(MODES)
    results = {mode: [] for mode in modes}
    try:
        store = RedisStore.fromURL(server.url(0), reactor)
        await store.start()
        for mode in modes:
            await run(reactor, store, 1000, options.concurrency, mode)  # warm up
        for i in range(options.runs):
            for mode in modes:
                cpu, rate = await run(
                    reactor, store, options.deliveries, options.concurrency, mode
                )
                results[mode].append((cpu, rate))
                print(f"run {i + 1} {mode}: {cpu * 1000:.3f} ms, {rate:,.0f}/s", flush=True)
        await store.close()
    finally:
        server.stop()
    medians = {}
    for mode in modes:
        cpu = statistics.median(r[0] for r in results[mode])
        rate = statistics.median(r[1] for r in results[mode])
        medians[mode] = cpu
        print(
            f"{MODES[mode]}: {cpu * 1000:.3f} ms relay CPU per delivery "
            f"(median of {options.runs} runs of {options.deliveries}, "
            f"{options.concurrency} in flight; runs "
            + ", ".join(f"{r[0] * 1000:.3f}" for r in results[mode])
            + f"), {rate:,.0f} deliveries/s"
        )
    if len(medians) == 2:
        print(f"combined / separate: {medians['combined'] / medians['separate']:.2f}")
    print("load average: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))


def parse():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--deliveries", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", choices=sorted(MODES), default=None)
    return parser.parse_args()


if __name__ == "__main__":
    options = parse()
    react(lambda reactor: ensureDeferred(main(reactor, options)))
