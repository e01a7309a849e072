"""
How much Redis memory do the events of a delivered message take?

Starts a private C{redis-server} (a temporary directory, a loopback port
the OS picked, no persistence; see L{tests.redisserver}), writes the events
the relay writes for C{--messages} delivered messages through
L{RedisStore.appendEvents} (per message an C{accepted} with the client,
size and header block of the first recipient's event, then a C{delivered}
with the remote and its reply; one recipient per message, every recipient
distinct, a tag and metadata, messages 0.2 s apart, batches of C{--batch}
events as L{EventLog} writes them) and reports:

    - bytes per message: the growth of C{INFO memory}'s C{used_memory}
      over the writes, divided by the messages;
    - keys per message: the growth of C{DBSIZE}, divided likewise;
    - write throughput: events appended per second (one batch in flight).

Then it checks that the events read back (one message's events, a page of
a recipient's, a tag's) so that a layout that loses data cannot look small,
and times reads: one message's events, a recipient's, a page of 100 of a
tag's from a point in the middle (medians of 20, milliseconds).

With C{--where} it also sums C{MEMORY USAGE} per kind of key (the events,
each index, the counters) for the first run: where the bytes go.

    python3 bench/redis_events.py [--messages 3000] [--batch 200] [--runs 3]
        [--where]
"""

import argparse
import os
import random
import socket
import statistics
import time

from importlib.util import module_from_spec, spec_from_file_location

from twisted.internet.defer import ensureDeferred
from twisted.internet.task import react

# The store measured is the installed smartrelay's; only the test suite's
# redis-server helper comes from the checkout, by its path.
from smartrelay.events import Event
from smartrelay.store.redis import RedisStore


def _redisServerClass():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "tests",
                        "redisserver.py")
    spec = spec_from_file_location("_smartrelay_bench_redisserver", path)
    module = module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.RedisServer


RedisServer = _redisServerClass()

START = 1_700_000_000.0
# A few tags and domains, so that the statistics counters (one series per
# tag, domain and tag + domain, kept apart from the events) are soon all
# there and the figure is what each further message costs.
DOMAINS = [f"mail{i}.example" for i in range(6)] + [
    "gmail.com", "yahoo.com", "outlook.com", "hotmail.com", "icloud.com", "gmx.de",
]
TAGS = 5


def messageEvents(number: int, rng: random.Random) -> list:
    """
    The two events of one delivered message, shaped as the SMTP listener
    and the delivery scheduler write them.
    """
    queueID = "01/07-%05d-%08X" % (number % 100, int(START) + number // 5)
    domain = rng.choice(DOMAINS)
    recipient = f"first.last{number}@{domain}"
    sender = f"news@sender{number % 40}.example"
    now = START + number * 0.2
    tag = f"campaign-{number % TAGS}"
    metadata = {"customer": f"c{number % 300}", "template": "welcome-v2"}
    headers = (
        f"From: News <{sender}>\r\n"
        f"To: <{recipient}>\r\n"
        f"Subject: Your order {number} has shipped\r\n"
        f"Date: Tue, 14 Nov 2023 22:13:{number % 60:02d} +0000\r\n"
        f"Message-ID: <{number:08x}.{rng.randrange(1 << 32):08x}@sender.example>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
    )
    accepted = Event(
        type="accepted",
        queue_id=queueID,
        recipient=recipient,
        time=now,
        tag=tag,
        metadata=metadata,
        detail={
            "sender": sender,
            "size": rng.randrange(2_000, 60_000),
            "client": {
                "ip": f"10.0.{number % 250}.{number % 7 + 1}",
                "helo": "app-server.internal",
                "user": "app",
                "tls": True,
            },
            "headers": headers,
        },
    )
    delivered = Event(
        type="delivered",
        queue_id=queueID,
        recipient=recipient,
        time=now + 0.05 + rng.random() / 10,
        tag=tag,
        metadata=metadata,
        detail={
            "remote": f"mx1.{domain}",
            "reply": "2.0.0 Ok: queued as 4XyZ12abCd",
            "code": 250,
            "tls": True,
        },
    )
    return [accepted, delivered]


def _resp(data: bytes, i: int = 0):
    """
    One RESP reply parsed from C{data} at C{i}: (value, next index), or
    L{None} when C{data} ends before the reply does.
    """
    end = data.find(b"\r\n", i)
    if end < 0:
        return None
    kind, line, i = data[i:i + 1], data[i + 1:end], end + 2
    if kind in (b"+", b"-"):
        return line.decode("utf-8"), i
    if kind == b":":
        return int(line), i
    if kind == b"$":
        size = int(line)
        if size < 0:
            return None, i
        if len(data) < i + size + 2:
            return None
        return data[i:i + size].decode("utf-8", "replace"), i + size + 2
    if kind == b"*":
        items = []
        for _ in range(int(line)):
            parsed = _resp(data, i)
            if parsed is None:
                return None
            item, i = parsed
            items.append(item)
        return items, i
    raise ValueError(f"not a RESP reply: {data[i - 1:i + 20]!r}")


def command(server, *args: str):
    """
    Send one command to C{server} and read its whole reply.
    """
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"".join(
            [b"*%d\r\n" % len(args)]
            + [b"$%d\r\n%s\r\n" % (len(a.encode()), a.encode()) for a in args]
        ))
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                raise RuntimeError(f"connection closed during {args[0]}")
            data += chunk
            parsed = _resp(data)
            if parsed is not None:
                return parsed[0]


def _info(server, field: str) -> int:
    for line in command(server, "INFO", "memory").split("\r\n"):
        if line.startswith(field + ":"):
            return int(line.split(":", 1)[1])
    raise RuntimeError(f"no {field} in INFO memory")


def _dbsize(server) -> int:
    return command(server, "DBSIZE")


def where(server, prefix: str = "smartrelay:") -> dict:
    """
    Bytes (C{MEMORY USAGE}, every element counted) and keys per kind of
    key: the key without its prefix, up to its second C{:} part.
    """
    kinds: dict = {}
    cursor = "0"
    while True:
        cursor, keys = command(server, "SCAN", cursor, "COUNT", "1000")
        for key in keys:
            parts = key[len(prefix):].split(":")
            kind = ":".join(parts[:2]) if parts[0] in ("e", "ev", "stats") else parts[0]
            size = command(server, "MEMORY", "USAGE", key, "SAMPLES", "0")
            bytes_, count = kinds.get(kind, (0, 0))
            kinds[kind] = (bytes_ + size, count + 1)
        if cursor == "0":
            return kinds


async def oneRun(reactor, server, messages: int, batch: int, seed: int) -> dict:
    command(server, "FLUSHALL")
    rng = random.Random(seed)
    events = []
    for number in range(messages):
        events += messageEvents(number, rng)
    store = RedisStore.fromURL(server.url(), reactor)
    await store.start()
    try:
        memoryBefore = _info(server, "used_memory")
        keysBefore = _dbsize(server)
        started = time.perf_counter()
        for first in range(0, len(events), batch):
            await store.appendEvents(events[first : first + batch])
        elapsed = time.perf_counter() - started
        memoryAfter = _info(server, "used_memory")
        keysAfter = _dbsize(server)
        kinds = where(server)

        # Read back: a layout that drops data must not look small.
        probe = events[len(events) // 2]
        mine = await store.eventsForMessage(probe.queue_id)
        assert [e.id for e in mine] == [
            e.id for e in events if e.queue_id == probe.queue_id
        ], mine
        page = await store.queryEvents(recipient=probe.recipient)
        assert {e.id for e in page.events} == {
            e.id for e in events if e.recipient == probe.recipient
        }, page
        page = await store.queryEvents(tag=probe.tag, limit=50)
        assert len(page.events) == 50 and all(e.tag == probe.tag for e in page.events)
        assert page.events == sorted(page.events, key=lambda e: e.time)

        # Read latency: one message's events, a recipient's page, a page of
        # 100 of a tag's events from a time in the middle.
        reads = {"message": [], "recipient": [], "tag page": []}
        for i in range(20):
            probe = events[(2 * i + 1) * len(events) // 42]
            started = time.perf_counter()
            await store.eventsForMessage(probe.queue_id)
            reads["message"].append(time.perf_counter() - started)
            started = time.perf_counter()
            await store.queryEvents(recipient=probe.recipient)
            reads["recipient"].append(time.perf_counter() - started)
            started = time.perf_counter()
            await store.queryEvents(tag=probe.tag, since=probe.time, limit=100)
            reads["tag page"].append(time.perf_counter() - started)
    finally:
        await store.close()
    return {
        "bytes": (memoryAfter - memoryBefore) / messages,
        "keys": (keysAfter - keysBefore) / messages,
        "rate": len(events) / elapsed,
        "kinds": kinds,
        "reads": {k: statistics.median(v) * 1000 for k, v in reads.items()},
    }


async def main(reactor, options) -> None:
    server = RedisServer().start()
    try:
        results = []
        for run in range(options.runs):
            result = await oneRun(reactor, server, options.messages, options.batch, run)
            results.append(result)
            if run == 0 and options.where:
                print("where the bytes go (MEMORY USAGE per key, summed by kind):")
                kinds = sorted(result["kinds"].items(), key=lambda kv: -kv[1][0])
                for kind, (size, count) in kinds:
                    print("  %-16s %8d keys %7.0f bytes/message" % (
                        kind, count, size / options.messages))
            print(
                "run %d: %d messages, %.0f bytes/message, %.2f keys/message,"
                " %.0f events/s; reads (median ms): %s"
                % (run + 1, options.messages, result["bytes"], result["keys"],
                   result["rate"],
                   ", ".join("%s %.2f" % kv for kv in result["reads"].items()))
            )
        print(
            "median: %.0f bytes per delivered message, %.2f keys per message,"
            " %.0f events/s written; reads (ms): %s"
            % (
                statistics.median(r["bytes"] for r in results),
                statistics.median(r["keys"] for r in results),
                statistics.median(r["rate"] for r in results),
                ", ".join(
                    "%s %.2f" % (kind, statistics.median(r["reads"][kind] for r in results))
                    for kind in results[0]["reads"]
                ),
            )
        )
    finally:
        server.stop()


def parseArguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=200)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--where", action="store_true",
                        help="break the first run's memory down by kind of key")
    options = parser.parse_args(argv)
    if options.messages < 10:
        parser.error("--messages must be at least 10")
    if options.batch < 1:
        parser.error("--batch must be at least 1")
    if options.runs < 1:
        parser.error("--runs must be at least 1")
    return options


if __name__ == "__main__":
    options = parseArguments()
    react(lambda reactor: ensureDeferred(main(reactor, options)))
