"""
How many submit_sm a second does one SMPP session carry with a window of 10?

The relay's L{SMSClient} (a C{ClientService}, the bind in
C{prepareConnection}, the L{ESMEProtocol} session with its window, response
timers and receipt answers) binds over loopback TCP to a local SMSC and
submits C{--messages} single-part GSM texts as fast as the window allows
(no C{rate}); the figure is submits answered per second of wall clock, from
the first submit to the last submit_sm_resp, and the relay process's CPU
time per submit.

Two SMSCs:

* C{--smsc npm} (the default when node is installed): C{tests/js/smsc.js},
  the npm C{smpp} package in its own node process, which also decodes each
  submit, writes a JSON line about it (to /dev/null here) and sends a
  delivery receipt for it, which the session answers: the traffic of a real
  SMSC, the two ends on different processes.
* C{--smsc fake}: the in-process fake of L{smartrelay.sms.testing} on the
  same reactor (no receipts): both ends share one core, so the figure is
  a lower bound of the client's own speed.

With C{--redis} every run is made twice, interleaved: as above, and with
C{[sms] rate} held cluster-wide through a Redis store (a local
C{redis-server} started by L{tests.redisserver}, stopped at the end): each
submit takes a token from the bucket C{sms:<smsc>} first, at C{--rate}
(default 10**9 a second, so that the bucket never waits: the figure is what
the token costs).

    python3 bench/sms.py [--smsc npm|fake] [--messages 20000] [--window 10] [--runs 3]
                         [--redis [--rate R]]
"""

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import time

from twisted.internet import endpoints
from twisted.internet.defer import ensureDeferred, gatherResults
from twisted.internet.task import deferLater, react

from smartrelay.sms.alphabet import split
from smartrelay.sms.client import SMSClient
from smartrelay.sms.protocol import SessionSettings
from smartrelay.sms.testing import FakeSMSCFactory, SMSCScript

JS = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "tests", "js")


def startNode() -> tuple:
    node = shutil.which("node") or shutil.which("nodejs")
    if node is None:
        raise SystemExit("bench/sms.py: node is not installed; use --smsc fake")
    process = subprocess.Popen(
        [node, os.path.join(JS, "smsc.js"), os.devnull], stdout=subprocess.PIPE
    )
    line = process.stdout.readline()
    if not line:
        raise SystemExit("bench/sms.py: the npm SMSC did not start (npm ci in tests/js?)")
    return process, json.loads(line)["port"]


def _redisServerClass():
    from importlib.util import module_from_spec, spec_from_file_location

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "tests",
                        "redisserver.py")
    spec = spec_from_file_location("_smartrelay_bench_redisserver", path)
    module = module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.RedisServer


async def once(
    reactor, port: int, messages: int, window: int, store=None, rate=None
) -> tuple:
    receipts = [0]
    client = SMSClient(
        endpoint=endpoints.clientFromString(reactor, f"tcp:host=127.0.0.1:port={port}"),
        clock=reactor,
        settings=SessionSettings(system_id=b"bench", password=b"pw", window=window, rate=rate),
        receiver=lambda pdu: receipts.__setitem__(0, receipts[0] + 1),
        description=f"tcp:host=127.0.0.1:port={port}",
        rates=store,
    )
    client.startService()
    while not client.bound:
        await deferLater(reactor, 0.01, lambda: None)
    [short] = split("Your code is 123456 [valid 10 min]").shortMessages(0)
    fields = {
        "source_addr_ton": 5, "source_addr_npi": 0, "source_addr": b"Shop",
        "dest_addr_ton": 1, "dest_addr_npi": 1, "destination_addr": b"393331234567",
        "registered_delivery": 1, "data_coding": 0, "short_message": short,
    }
    cpu, wall = time.process_time(), time.perf_counter()
    await gatherResults([client.submit(fields) for _ in range(messages)])
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    await client.stopService()
    return messages / wall, cpu / messages * 1e6, receipts[0]


async def main(reactor, options) -> None:
    process = None
    if options.smsc == "npm":
        process, port = startNode()
    else:
        factory = FakeSMSCFactory(SMSCScript())
        listening = reactor.listenTCP(0, factory, interface="127.0.0.1")
        port = listening.getHost().port
    server = store = None
    if options.redis:
        from smartrelay.store.redis import RedisStore

        server = _redisServerClass()()
        server.start()
        store = RedisStore.fromURL(server.url(0), reactor)
        await store.start()
    modes = [("session alone", None, None)]
    if store is not None:
        modes.append((f"rate {options.rate:g}/s through the Redis bucket", store, options.rate))
    try:
        results = {name: ([], []) for name, _, _ in modes}
        for run in range(options.runs):
            for name, paced, rate in modes:
                speed, cpu, receipts = await once(
                    reactor, port, options.messages, options.window, paced, rate
                )
                results[name][0].append(speed)
                results[name][1].append(cpu)
                print(f"run {run + 1}, {name}: {speed:,.0f} submits/s, {cpu:.0f} us relay "
                      f"CPU per submit, {receipts} receipts answered", flush=True)
        for name, (speeds, cpus) in results.items():
            print(f"{options.smsc} SMSC, window {options.window}, {options.messages} submits, "
                  f"{name}: median {statistics.median(speeds):,.0f} submits/s, "
                  f"{statistics.median(cpus):.0f} us CPU per submit")
        print("load average: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    finally:
        if store is not None:
            await store.close()
            server.stop()
        if process is not None:
            os.kill(process.pid, signal.SIGTERM)
            process.wait(10)
        else:
            await listening.stopListening()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--smsc", choices=["npm", "fake"],
                        default="npm" if shutil.which("node") else "fake")
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--redis", action="store_true")
    parser.add_argument("--rate", type=float, default=1e9)
    options = parser.parse_args()
    react(lambda reactor: ensureDeferred(main(reactor, options)))
