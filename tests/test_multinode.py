"""
Several relay nodes sharing one Redis store: two real C{twistd smartrelay}
processes (and plain store clients in separate processes) write at the same
time; nothing is lost and everyone sees the same state.
"""

import os
import smtplib
import subprocess
import sys
import threading

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from smartrelay.store.redis import RedisStore
from tests.redisserver import sharedRedisServer
from tests.sink import RelayProcess, Sink, installedEnvironment, waitFor

PER_NODE = 60
DB = 5


def submitMany(port, prefix, count, results, domain="example.org"):
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("node.test")
        for i in range(count):
            client.mail("app@example.com")
            client.rcpt("%s-%d@%s" % (prefix, i, domain))
            code, text = client.data(b"Subject: t\r\n\r\nhi\r\n")
            results.append((code, text.decode().split()[-1]))


STORE_CLIENT = r"""
import sys
from twisted.internet.task import react
from twisted.internet.defer import ensureDeferred
from smartrelay.store.redis import RedisStore
from smartrelay.store.interfaces import SuppressionEntry

async def main(reactor, url, name, count):
    store = RedisStore.fromURL(url, reactor, prefix="multinode:")
    await store.start()
    allowed = 0
    for i in range(int(count)):
        await store.addSuppression(SuppressionEntry(
            address="%s-%d@example.com" % (name, i), reason="manual", time=1000.0))
        result = await store.takeTokens("shared-bucket", rate=1.0, burst=50.0, now=5000.0)
        allowed += result.allowed
    await store.close()
    print(allowed)

react(lambda reactor, *a: ensureDeferred(main(reactor, *a)), sys.argv[1:])
"""


class MultiNodeTests(TestCase):
    timeout = 180

    def relayConfig(self, server, node, sinkPort):
        return (
            "[smartrelay]\ndata_dir = var\nhostname = node%s.test\nnode_id = %s\n"
            "store = %s\n\n[web]\nlisten = tcp:0:interface=127.0.0.1\n\n[smtp]\nlisten = tcp:0:interface=127.0.0.1\n\n"
            "[delivery]\nsmarthost = tcp:host=127.0.0.1:port=%d\n"
            % (node, node, server.url(db=DB), sinkPort)
        )

    @inlineCallbacks
    def test_twoRelaysShareEventsAndStatistics(self):
        """
        Two relay processes on one Redis accept and deliver at the same
        time; afterwards every event of both is in the shared store and the
        statistics counters (updated concurrently by both) add up exactly.
        """
        server = sharedRedisServer()
        sink = Sink()
        port = reactor.listenTCP(0, sink, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        relays = []
        for node in ("01", "02"):
            relay = RelayProcess(
                os.path.abspath(self.mktemp()),
                self.relayConfig(server, node, port.getHost().port),
            )
            self.addCleanup(relay.kill)
            relay.start()
            relays.append(relay)
        for relay in relays:
            yield relay.waitReady(reactor)

        results = {r: [] for r in ("01", "02")}
        threads = [
            threading.Thread(target=submitMany, args=(relay.port, node, PER_NODE, results[node]))
            for relay, node in zip(relays, ("01", "02"))
        ]
        for t in threads:
            t.start()
        yield deferToThread(lambda: [t.join(60) for t in threads])
        for node in ("01", "02"):
            self.assertEqual([code for code, _ in results[node]], [250] * PER_NODE)
            self.assertTrue(all(qid.startswith(node + "/") for _, qid in results[node]))
        yield waitFor(reactor, lambda: len(sink.received) >= 2 * PER_NODE, timeout=90)
        for relay in relays:
            yield relay.stop()

        store = RedisStore.fromURL(server.url(db=DB), reactor)
        yield store.start()
        self.addCleanup(store.close)
        for node in ("01", "02"):
            for _, queueID in results[node]:
                events = yield store.eventsForMessage(queueID)
                self.assertEqual([e.type for e in events], ["accepted", "delivered"])
        stats = yield store.statistics(since=0, until=4e9, interval="day")
        self.assertEqual(stats.totals.get("accepted"), 2 * PER_NODE)
        self.assertEqual(stats.totals.get("delivered"), 2 * PER_NODE)

    @inlineCallbacks
    def test_rateLimitSharedAcrossNodes(self):
        """
        C{[domain:...] rate} holds across relay nodes: two relays on one
        Redis, each given half of the mail at once, deliver no faster
        together than the one limit allows (their token bucket is shared),
        and each keeps to its connection limit.
        """
        server = sharedRedisServer()
        # A domain of its own, so that no bucket left by an earlier run counts.
        domain = "rate-%d.example" % os.getpid()
        sink = Sink()
        port = reactor.listenTCP(0, sink, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        perNode, rate = 30, 10
        relays = []
        for node in ("03", "04"):
            config = self.relayConfig(server, node, port.getHost().port).replace(
                server.url(db=DB), server.url(db=DB + 2)
            ) + "max_connections_per_domain = 2\n\n[domain:%s]\nrate = %d/s\n" % (domain, rate)
            relay = RelayProcess(os.path.abspath(self.mktemp()), config)
            self.addCleanup(relay.kill)
            relay.start()
            relays.append(relay)
        for relay in relays:
            yield relay.waitReady(reactor)
        results = {node: [] for node in ("03", "04")}
        threads = [
            threading.Thread(
                target=submitMany, args=(relay.port, node, perNode, results[node], domain)
            )
            for relay, node in zip(relays, ("03", "04"))
        ]
        for t in threads:
            t.start()
        yield deferToThread(lambda: [t.join(60) for t in threads])
        yield waitFor(reactor, lambda: len(sink.received) >= 2 * perNode, timeout=90)
        for relay in relays:
            yield relay.stop()
        times = sorted(r.at for r in sink.received)
        # The shared bucket starts full (a burst of `rate`), then refills
        # at `rate` per second: 60 messages need at least 5 seconds.  Two
        # separate buckets would let them through in about 2.
        self.assertGreaterEqual(times[-1] - times[0], (2 * perNode - rate) / rate * 0.9)
        self.assertLessEqual(sink.peak, 2 * 2)

    @inlineCallbacks
    def test_concurrentStoreClients(self):
        """
        Two processes adding suppressions and taking tokens from one shared
        bucket at the same time: each sees the other's suppressions, and
        the bucket hands out exactly its burst, no more (no lost updates).
        """
        server = sharedRedisServer()
        # The clients import the installed smartrelay, from an empty folder.
        cwd = self.mktemp()
        os.makedirs(cwd)

        def run(name):
            return subprocess.run(
                [sys.executable, "-c", STORE_CLIENT, server.url(db=DB + 1), name, "40"],
                cwd=cwd, env=installedEnvironment(), capture_output=True, text=True, timeout=120,
            )

        outcomes = yield deferToThread(
            lambda: [p for p in _parallel([lambda: run("a"), lambda: run("b")])]
        )
        for outcome in outcomes:
            self.assertEqual(outcome.returncode, 0, outcome.stderr)
        self.assertEqual(sum(int(o.stdout.strip()) for o in outcomes), 50)

        store = RedisStore.fromURL(server.url(db=DB + 1), reactor, prefix="multinode:")
        yield store.start()
        self.addCleanup(store.close)
        addresses = ["a-%d@example.com" % i for i in range(40)] + [
            "b-%d@example.com" % i for i in range(40)
        ]
        found = yield store.checkSuppressions(addresses, 2000.0)
        self.assertEqual(sorted(found), sorted(addresses))


def _parallel(functions):
    results = [None] * len(functions)

    def runOne(i, f):
        results[i] = f()

    threads = [threading.Thread(target=runOne, args=(i, f)) for i, f in enumerate(functions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results

