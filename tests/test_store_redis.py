"""
Tests for L{smartrelay.store.redis}: the store contract run against a real
C{redis-server}, plus URL parsing and connection failures.

L{StoreContractMixin} is written for stores whose Deferreds fire at once
(it reads results with C{successResultOf}).  A networked store's Deferreds
fire later, on the reactor, so each contract test runs in a worker thread
against L{BlockingStore}, which calls the real store on the reactor thread
and waits for the answer: the test sees already-fired Deferreds, the store
sees ordinary asynchronous calls on its reactor.  The scenarios and their
assertions are the mixin's own, unchanged.
"""

import functools
import json
import os
import uuid

from twisted.internet import reactor
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint
from twisted.internet.testing import MemoryReactorClock
from twisted.internet.defer import fail, inlineCallbacks, succeed
from twisted.internet.task import deferLater
from twisted.internet.threads import blockingCallFromThread, deferToThread
from twisted.python.threadable import isInIOThread
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from smartrelay.store.interfaces import (
    EventPage,
    IEventStreams,
    ISMSSubmissions,
    IStore,
    StoreClosed,
    SuppressionEntry,
)
from smartrelay.store.redis import (
    BLOCK_EVENTS,
    COMPACT_AT,
    RedisAddress,
    RedisConnectionFailed,
    SCHEMA_VERSION,
    RedisStore,
    UnsupportedSchema,
    parseRedisURL,
)
from tests.redisserver import (
    RedisServer,
    RedisServerError,
    freePort,
    sharedRedisServer,
)
from tests.certs import selfSigned
from tests.test_store import T0, StoreContractMixin, event


@implementer(IStore, IEventStreams, ISMSSubmissions)
class BlockingStore:
    """
    An L{IStore} for a test running in a worker thread: every call runs on
    the reactor thread and returns an already-fired Deferred.  Called on
    the reactor thread (trial's cleanups) it passes the real Deferred on.
    """

    def __init__(self, store, reactor):
        self._store = store
        self._reactor = reactor

    def _call(self, name, *args, **kwargs):
        method = getattr(self._store, name)
        if isInIOThread():
            return method(*args, **kwargs)
        try:
            result = blockingCallFromThread(self._reactor, method, *args, **kwargs)
        except BaseException:
            return fail()
        return succeed(result)

    def start(self):
        return self._call("start")

    def close(self):
        return self._call("close")

    def appendEvents(self, events):
        return self._call("appendEvents", events)

    def eventsForMessage(self, queue_id):
        return self._call("eventsForMessage", queue_id)

    def queryEvents(self, **kwargs):
        return self._call("queryEvents", **kwargs)

    def addSuppression(self, entry):
        return self._call("addSuppression", entry)

    def removeSuppression(self, address):
        return self._call("removeSuppression", address)

    def checkSuppressions(self, addresses, now):
        return self._call("checkSuppressions", addresses, now)

    def listSuppressions(self, **kwargs):
        return self._call("listSuppressions", **kwargs)

    def statistics(self, **kwargs):
        return self._call("statistics", **kwargs)

    def takeTokens(self, key, rate, burst, now, count=1):
        return self._call("takeTokens", key, rate, burst, now, count)

    def pruneEvents(self, before, limit=10000):
        return self._call("pruneEvents", before, limit)

    # IEventStreams (issue 16)

    def claimEvents(self, stream, owner, now, limit=None, begin="oldest"):
        return self._call("claimEvents", stream, owner, now, limit, begin)

    def claimedEvents(self, claim, cursor=None, limit=1000):
        return self._call("claimedEvents", claim, cursor, limit)

    def finishClaim(self, claim):
        return self._call("finishClaim", claim)

    def addToOutbox(self, outbox, batches, claim=None):
        return self._call("addToOutbox", outbox, batches, claim)

    def takeFromOutbox(self, outbox, now, lease, limit=10):
        return self._call("takeFromOutbox", outbox, now, lease, limit)

    def deferInOutbox(self, outbox, id, due):
        return self._call("deferInOutbox", outbox, id, due)

    def removeFromOutbox(self, outbox, id):
        return self._call("removeFromOutbox", outbox, id)

    def outboxSize(self, outbox):
        return self._call("outboxSize", outbox)

    # ISMSSubmissions (issue 15)

    def addSMSSubmission(self, submission):
        return self._call("addSMSSubmission", submission)

    def findSMSSubmission(self, message_id):
        return self._call("findSMSSubmission", message_id)

    def smsSubmissions(self, queue_id, recipient):
        return self._call("smsSubmissions", queue_id, recipient)

    def pruneSMSSubmissions(self, before, limit=10000):
        return self._call("pruneSMSSubmissions", before, limit)


def newPrefix() -> str:
    """
    A key prefix no other test uses.
    """
    return f"test-{uuid.uuid4().hex}:"


def _inThread(test):
    """
    Run a synchronous contract test in a worker thread.
    """

    @functools.wraps(test)
    def run(self):
        return deferToThread(test, self)

    # Not a Hypothesis test itself (the wrapped one is, in its thread).
    run.__dict__.pop("hypothesis", None)
    run.__dict__.pop("is_hypothesis_test", None)
    return run


class _ThreadedContract(type):
    """
    Make every C{test_*} method of L{StoreContractMixin} run in a thread.
    """

    def __new__(meta, name, bases, namespace):
        for attr in dir(StoreContractMixin):
            if attr.startswith("test_") and attr not in namespace:
                namespace[attr] = _inThread(getattr(StoreContractMixin, attr))
        return super().__new__(meta, name, bases, namespace)


class RedisStoreTests(StoreContractMixin, TestCase, metaclass=_ThreadedContract):
    """
    L{RedisStore}, against a real C{redis-server}, fulfils the store
    contract.
    """

    def setUp(self):
        self.server = sharedRedisServer()
        return deferToThread(StoreContractMixin.setUp, self)

    def createStore(self):
        self.redisStore = RedisStore.fromURL(
            self.server.url(1), reactor, prefix=newPrefix()
        )
        return BlockingStore(self.redisStore, reactor)

    def test_realStoreProvidesInterface(self):
        """
        L{RedisStore} itself (not only the blocking adapter) provides
        L{IStore}.
        """
        self.assertTrue(verifyObject(IStore, self.redisStore))


class RedisStoreNetworkTests(TestCase):
    """
    L{RedisStore} on the reactor, without the blocking adapter: start,
    close, prefixes, databases and connection failures.
    """

    def setUp(self):
        self.server = sharedRedisServer()

    def makeStore(self, url=None, **kw):
        store = RedisStore.fromURL(url or self.server.url(), reactor, **kw)
        self.addCleanup(store.close)
        return store

    @inlineCallbacks
    def test_startAgainstClosedPort(self):
        """
        C{start} against a port nothing listens on fails with
        L{RedisConnectionFailed} naming the address, and the store does not
        keep trying.
        """
        port = freePort()
        store = self.makeStore(f"redis://127.0.0.1:{port}/0")
        with self.assertRaises(RedisConnectionFailed) as caught:
            yield store.start()
        self.assertIn(f"127.0.0.1:{port}", str(caught.exception))
        # (trial's reactor check after the test finds any retry left.)

    @inlineCallbacks
    def test_startWithWrongPassword(self):
        """
        C{start} with a password the server does not want fails with
        L{RedisConnectionFailed}.
        """
        store = self.makeStore(
            f"redis://:wrong@127.0.0.1:{self.server.port}/0", prefix=newPrefix()
        )
        with self.assertRaises(RedisConnectionFailed):
            yield store.start()

    @inlineCallbacks
    def test_pipelinedOperationsKeepCallOrder(self):
        """
        Operations issued without waiting apply in call order: a query
        issued right after an append sees it.
        """
        store = self.makeStore(prefix=newPrefix())
        yield store.start()
        e = event()
        appended = store.appendEvents([e])
        queried = store.queryEvents()
        closed = store.close()
        yield appended
        page = yield queried
        yield closed
        self.assertEqual(page.events, [e])

    @inlineCallbacks
    def test_closeWaitsForPendingOperations(self):
        """
        C{close} lets operations already issued finish before it
        disconnects; later ones fail with L{StoreClosed}.
        """
        store = self.makeStore(prefix=newPrefix())
        yield store.start()
        taken = store.takeTokens("k", 1.0, 2.0, T0)
        yield store.close()
        self.assertTrue((yield taken).allowed)
        with self.assertRaises(StoreClosed):
            yield store.takeTokens("k", 1.0, 2.0, T0)

    @inlineCallbacks
    def test_prefixesAndDatabasesIsolate(self):
        """
        Stores with different prefixes, or different database numbers, do
        not see each other's data; the same prefix and database share it.
        """
        prefix = newPrefix()
        a = self.makeStore(self.server.url(2), prefix=prefix)
        b = self.makeStore(self.server.url(2), prefix=newPrefix())
        c = self.makeStore(self.server.url(3), prefix=prefix)
        d = self.makeStore(self.server.url(2), prefix=prefix)
        for store in [a, b, c, d]:
            yield store.start()
        e = event()
        yield a.appendEvents([e])
        self.assertEqual((yield b.queryEvents()).events, [])
        self.assertEqual((yield c.queryEvents()).events, [])
        self.assertEqual((yield d.queryEvents()).events, [e])

    @inlineCallbacks
    def test_scriptFlushRecovered(self):
        """
        If the server forgets the Lua scripts (SCRIPT FLUSH, a restart),
        the store sends them again with EVAL.
        """
        store = self.makeStore(prefix=newPrefix())
        yield store.start()
        self.server.command("SCRIPT", "FLUSH")
        result = yield store.takeTokens("k", 1.0, 2.0, T0)
        self.assertTrue(result.allowed)
        yield store.appendEvents([event()])
        self.assertEqual(len((yield store.eventsForMessage("Q1"))), 1)

    @inlineCallbacks
    def test_pruneLeavesNoEventKeys(self):
        """
        Once everything is pruned no event body, index entry or unique
        record is left (recipients normalised with Unicode case rules
        included); the counters are.
        """
        prefix = newPrefix()
        store = self.makeStore(prefix=prefix)
        yield store.start()
        yield store.appendEvents(
            [
                event(T0, "opened", "Q1", "Ü@BÜCHER.de", tag="t"),
                event(T0 + 1, "clicked", "Q1", "ü@bücher.DE", tag="t"),
                event(T0 + 2, "accepted", "Q2", "x@Example.com"),
            ]
        )
        self.assertEqual((yield store.pruneEvents(T0 + 10, 2)), 2)
        self.assertEqual((yield store.pruneEvents(T0 + 10, 2)), 2)
        self.assertEqual((yield store.pruneEvents(T0 + 10, 2)), 1)
        self.assertEqual((yield store.pruneEvents(T0 + 10, 2)), 0)
        protocol = yield store._service.whenConnected()
        keys = yield protocol.execute_command("KEYS", prefix + "*")
        left = sorted(key.decode("utf-8")[len(prefix):] for key in keys)
        self.assertEqual(
            [key for key in left if not key.startswith("stats:")],
            ["epoch", "schema", "seq"],
        )
        stats = yield store.statistics(since=T0 - 3600, until=T0 + 3600)
        self.assertEqual((stats.unique_opens, stats.unique_clicks), (1, 1))

    @inlineCallbacks
    def test_version1UniqueRecordsKept(self):
        """
        Data of layout version 1 is upgraded: its schema key is raised, and
        the pairs its plain C{seen:<type>} sets hold stay counted.
        """
        prefix = newPrefix()
        self.server.command("SET", prefix + "schema", "1")
        self.server.command("SADD", prefix + "seen:opened", '["Q1", "a@example.com"]')
        store = self.makeStore(prefix=prefix)
        yield store.start()
        protocol = yield store._service.whenConnected()
        self.assertEqual(
            (yield protocol.execute_command("GET", prefix + "schema")), b"3"
        )
        yield store.appendEvents(
            [event(T0, "opened", "Q1", "a@Example.com"),
             event(T0, "opened", "Q2", "a@example.com")]
        )
        stats = yield store.statistics(since=T0 - 3600, until=T0 + 3600)
        self.assertEqual((stats.totals, stats.unique_opens), ({"opened": 2}, 1))

    @inlineCallbacks
    def test_newerSchemaRefused(self):
        """
        C{start} refuses data written by a newer smartrelay.
        """
        prefix = newPrefix()
        self.server.command("SET", prefix + "schema", "99")
        store = self.makeStore(prefix=prefix)
        with self.assertRaises(UnsupportedSchema):
            yield store.start()

    @inlineCallbacks
    def test_nanTimeRefused(self):
        """
        A batch with an event whose time is NaN fails with L{ValueError}
        and stores nothing.
        """
        store = self.makeStore(prefix=newPrefix())
        yield store.start()
        with self.assertRaises(ValueError):
            yield store.appendEvents([event(), event(float("nan"))])
        self.assertEqual((yield store.queryEvents()).events, [])

    @inlineCallbacks
    def test_useBeforeStart(self):
        """
        Operations before C{start} fail with L{StoreClosed}.
        """
        store = self.makeStore(prefix=newPrefix())
        with self.assertRaises(StoreClosed):
            yield store.queryEvents()

    @inlineCallbacks
    def test_serverRestartReconnects(self):
        """
        An operation while the server is down fails instead of hanging;
        when the server comes back on the same port the store reconnects
        by itself.
        """
        server = RedisServer().start()
        self.addCleanup(server.stop)
        store = RedisStore.fromURL(server.url(), reactor, prefix=newPrefix())
        self.addCleanup(store.close)
        yield store.start()
        server._terminate()
        with self.assertRaises(Exception):
            yield store.takeTokens("k", 1.0, 2.0, T0)
        server.start(port=server.port)
        for _ in range(100):
            try:
                result = yield store.takeTokens("k", 1.0, 2.0, T0)
            except Exception:
                yield deferLater(reactor, 0.1, lambda: None)
            else:
                break
        else:
            self.fail("the store did not reconnect within 10 seconds")
        # A new server: the bucket starts full again.
        self.assertEqual(result.remaining, 1.0)

    @inlineCallbacks
    def reconnected(self, store):
        """
        Wait until C{store} answers again after its connection was cut.
        """
        for _ in range(200):
            try:
                yield store.takeTokens("k", 1.0, 2.0, T0)
            except Exception:
                yield deferLater(reactor, 0.1, lambda: None)
            else:
                return
        self.fail("the store did not reconnect within 20 seconds")

    @inlineCallbacks
    def test_dataLossObserved(self):
        """
        A reconnection to a server that kept its data tells nobody; one to
        a server that lost it (here FLUSHALL, as a restart without
        persistence) calls the data loss observers once, before the first
        operation on the new connection.
        """
        server = RedisServer().start()
        self.addCleanup(server.stop)
        store = RedisStore.fromURL(server.url(), reactor, prefix=newPrefix())
        self.addCleanup(store.close)
        seen = []
        store.observeDataLoss(lambda: seen.append("lost"))
        yield store.start()
        yield store.addSuppression(SuppressionEntry(address="a@example.com", reason="manual", time=T0))
        server.command("CLIENT", "KILL", "TYPE", "normal")
        yield self.reconnected(store)
        self.assertEqual(seen, [])
        server.command("FLUSHALL")
        server.command("CLIENT", "KILL", "TYPE", "normal")
        store.observeDataLoss(
            lambda: seen.append(store.checkSuppressions(["a@example.com"], T0))
        )
        yield self.reconnected(store)
        self.assertEqual(seen[0], "lost")
        # The second observer's check ran on the new connection, after.
        self.assertEqual((yield seen[1]), {})
        # The schema key is back, as a start would have set it.
        self.assertEqual(
            server.command("GET", store.prefix + "schema"), b"$1\r\n%d\r\n" % SCHEMA_VERSION
        )
        server.command("CLIENT", "KILL", "TYPE", "normal")
        yield self.reconnected(store)
        self.assertEqual(len(seen), 2)

    @inlineCallbacks
    def test_failsAtOnceWhileUnreachable(self):
        """
        Once a connection attempt has failed, an operation fails at once
        with L{RedisConnectionFailed} instead of waiting for the next
        attempt (which the back-off puts up to a minute away): the
        scheduler's suppression check then goes to the replica without a
        pause per message.  The first attempt that connects again ends it.
        """
        server = RedisServer().start()
        self.addCleanup(server.stop)
        store = RedisStore.fromURL(server.url(), reactor, prefix=newPrefix())
        self.addCleanup(store.close)
        yield store.start()
        server.kill()
        yield deferLater(reactor, 0.2, lambda: None)  # the loss is seen
        # This one waits for the first reconnection attempt, which fails.
        with self.assertRaises(Exception):
            yield store.takeTokens("k", 1.0, 2.0, T0)
        failure = self.failureResultOf(
            store.takeTokens("k", 1.0, 2.0, T0), RedisConnectionFailed
        )
        self.assertIn(f"127.0.0.1:{server.port}", failure.getErrorMessage())
        self.failureResultOf(store.checkSuppressions(["a@example.com"], T0))
        server.start(port=server.port)
        for _ in range(200):
            try:
                result = yield store.takeTokens("k", 1.0, 2.0, T0)
            except RedisConnectionFailed:
                yield deferLater(reactor, 0.1, lambda: None)
            else:
                break
        else:
            self.fail("the store did not reconnect within 20 seconds")
        self.assertTrue(result.allowed)


def _oldRecord(e) -> str:
    """
    An event as layout version 2 stored it in its events hash.
    """
    return json.dumps(
        [e.id, e.time, e.type, e.queue_id, e.recipient, e.tag, e.metadata, e.detail]
    )


class RedisBucketLayoutTests(TestCase):
    """
    Layout version 3: events in compressed time buckets, moved there from
    the layout of version 2 by C{start}.
    """

    def setUp(self):
        self.server = sharedRedisServer()
        self.prefix = newPrefix()
        self.store = RedisStore.fromURL(self.server.url(), reactor, prefix=self.prefix)
        self.addCleanup(self.store.close)

    def keys(self) -> list:
        reply = self.server.command("KEYS", self.prefix + "*").decode("utf-8")
        return sorted(
            line[len(self.prefix):]
            for line in reply.split("\r\n")
            if line.startswith(self.prefix)
        )

    def fields(self, bucket: str) -> list:
        reply = self.server.command("HKEYS", self.prefix + "e:b:" + bucket)
        return [line for line in reply.decode("latin-1").split("\r\n")
                if line[:2] in ("r:", "z:")]

    @inlineCallbacks
    def test_version2Migrated(self):
        """
        The events of a version 2 store (one hash of every event, a sorted
        set per index) are moved into buckets on start, with their
        sequence numbers: every query and stream cursor sees them as
        before, new events come after them, and no old key is left.
        """
        events = [
            event(T0 + i / 2, "accepted" if i % 2 else "delivered", f"Q{i % 7}",
                  f"r{i % 5}@Example.COM", tag=f"t{i % 3}", detail={"i": i})
            for i in range(250)
        ]
        p = self.prefix
        self.server.command("SET", p + "schema", "2")
        self.server.command("SET", p + "seq", str(len(events)))
        for seq, e in enumerate(events, 1):
            member = "%016x" % seq
            self.server.command("HSET", p + "events", member, _oldRecord(e))
            for index in ["ev:all", f"ev:y:{e.type}", f"ev:q:{e.queue_id}",
                          f"ev:r:{e.recipient.lower()}", f"ev:t:{e.tag}"]:
                self.server.command("ZADD", p + index, repr(e.time), member)
        self.server.command("HSET", p + "stream:export", "cursor", "100")
        yield self.store.start()

        left = self.keys()
        self.assertEqual([k for k in left if k.startswith("ev") or k == "events"], [])
        self.assertEqual(self.server.command("GET", p + "schema"), b"$1\r\n3\r\n")
        self.assertEqual((yield self.store.eventsForMessage("Q3")),
                         [e for e in events if e.queue_id == "Q3"])
        page = yield self.store.queryEvents(recipient="r2@example.com", tag="t1",
                                            limit=1000)
        self.assertEqual(page.events, [e for e in events
                                       if e.recipient == "r2@Example.COM" and e.tag == "t1"])
        # A minute of the old events filled a bucket past the compaction
        # threshold.
        self.assertTrue(any(f.startswith("z:") for f in self.fields(repr(T0 - 20))))
        claim = yield self.store.claimEvents("export", "me", T0)
        self.assertEqual((claim.after, claim.last), (100, 250))
        page = yield self.store.claimedEvents(claim)
        self.assertEqual(page.events, events[100:])
        later = event(T0 + 500, queue_id="Q3")
        yield self.store.appendEvents([later])
        self.assertEqual((yield self.store.eventsForMessage("Q3"))[-1], later)
        claim2 = yield self.store.claimEvents("other", "me", T0)
        self.assertEqual(claim2.last, 251)

    @inlineCallbacks
    def test_bucketsCompacted(self):
        """
        Once a bucket holds L{COMPACT_AT} raw events (appended in any number
        of batches) they become one compressed block; reads see the same
        events, in order.
        """
        yield self.store.start()
        events = [event(T0 + i / 10, queue_id=f"Q{i % 4}", detail={"i": i})
                  for i in range(COMPACT_AT + 10)]
        for first in range(0, len(events), 9):
            yield self.store.appendEvents(events[first:first + 9])
        bucket = repr(float(T0 - T0 % 60))
        fields = self.fields(bucket)
        self.assertEqual(len([f for f in fields if f.startswith("z:")]), 1)
        # Batches of 9: the 8th brought the bucket to 72 raw events, all
        # packed; the last 2 are raw.
        self.assertEqual(len([f for f in fields if f.startswith("r:")]), 2)
        page = yield self.store.queryEvents(limit=1000)
        self.assertEqual(page.events, events)
        self.assertEqual((yield self.store.eventsForMessage("Q1")), events[1::4])

    @inlineCallbacks
    def test_blocksMerged(self):
        """
        Raw events are packed together with the bucket's smallest block
        (below L{BLOCK_EVENTS}): a busy bucket ends up with few big
        blocks.
        """
        yield self.store.start()
        events = [event(T0 + i / 10, queue_id=f"Q{i % 4}") for i in range(150)]
        for first in range(0, len(events), 9):
            yield self.store.appendEvents(events[first:first + 9])
        fields = self.fields(repr(float(T0 - T0 % 60)))
        # Packed at 72 events and again at 144 (with the block of 72).
        self.assertLess(72, BLOCK_EVENTS)
        self.assertEqual(sorted(f.split(":")[-1] for f in fields if f.startswith("z:")),
                         ["144"])
        self.assertEqual(len([f for f in fields if f.startswith("r:")]), 6)
        self.assertEqual((yield self.store.queryEvents(limit=1000)).events, events)

    @inlineCallbacks
    def test_staleBucketsPacked(self):
        """
        The few raw events of a bucket are packed once events are written
        two buckets later; the current bucket's stay raw.
        """
        yield self.store.start()
        first = [event(T0, queue_id="Q1"), event(T0 + 1, queue_id="Q2")]
        yield self.store.appendEvents(first)
        yield self.store.appendEvents([event(T0 + 60)])
        old = repr(float(T0 - T0 % 60))
        self.assertEqual(len([f for f in self.fields(old) if f.startswith("r:")]), 2)
        late = event(T0 + 150)
        yield self.store.appendEvents([late])
        self.assertEqual([f[:2] for f in self.fields(old)], ["z:"])
        self.assertEqual(
            self.server.command("SMEMBERS", self.prefix + "e:raw").count(b"\r\n$"), 2
        )
        self.assertEqual((yield self.store.eventsForMessage("Q2")), first[1:])

    @inlineCallbacks
    def test_pruneRereadsChangedBucket(self):
        """
        A bucket that changes between the prune's read and its rewrite is
        read again; one that keeps changing is left for the next call (and
        the unique open records wait for its events to go).
        """
        yield self.store.start()
        yield self.store.appendEvents(
            [event(T0, "opened", "Q1"), event(T0 + 1, queue_id="Q2")]
        )
        bucket = self.prefix + "e:b:" + repr(float(T0 - T0 % 60))
        original = RedisStore._script
        changes = []
        limit = [1000]

        def script(store, protocol, name, keys, args):
            if name == "rewrite" and len(changes) < limit[0]:
                changes.append(name)
                self.server.command("HINCRBY", bucket, "v", "1")
            return original(store, protocol, name, keys, args)

        self.patch(RedisStore, "_script", script)
        self.assertEqual((yield self.store.pruneEvents(T0 + 10)), 0)
        self.assertEqual(len(changes), 11)
        self.assertEqual(len((yield self.store.queryEvents()).events), 2)
        self.assertEqual(
            self.server.command("ZCARD", self.prefix + "seenat:opened"), b":1\r\n"
        )
        del changes[:]
        limit[0] = 3
        self.assertEqual((yield self.store.pruneEvents(T0 + 10)), 3)
        self.assertEqual(len(changes), 3)
        self.assertEqual((yield self.store.queryEvents()).events, [])

    @inlineCallbacks
    def test_compactionLosesRace(self):
        """
        A compaction whose raw events are no longer all there (another
        node compacted or pruned them) changes nothing.
        """
        yield self.store.start()
        yield self.store.appendEvents([event(T0), event(T0 + 1)])
        bucket = repr(float(T0 - T0 % 60))
        before = self.fields(bucket)
        protocol = yield self.store._service.whenConnected()
        done = yield self.store._script(
            protocol, "compact", [self.prefix + "e:b:" + bucket, self.prefix + "e:raw"],
            ["z:0000000000000001:3", b"junk", "", bucket, *before, "r:00000000000000ff"],
        )
        self.assertEqual(done, 0)
        self.assertEqual(self.fields(bucket), before)
        self.assertEqual(len((yield self.store.queryEvents()).events), 2)

    @inlineCallbacks
    def test_pruneThroughCompactedBuckets(self):
        """
        Pruning in small steps through compacted buckets deletes exactly
        the oldest events before the cut, keeps the rest readable, and
        leaves no index entry for what is gone.
        """
        yield self.store.start()
        events = [event(T0 + i, queue_id=f"Q{i // 50}", recipient=f"r{i // 50}@x.org")
                  for i in range(300)]
        yield self.store.appendEvents(events)
        cut = T0 + 130.5
        deleted = 0
        while True:
            n = yield self.store.pruneEvents(cut, 40)
            self.assertLessEqual(n, 40)
            if not n:
                break
            deleted += n
        self.assertEqual(deleted, 131)
        page = yield self.store.queryEvents(limit=1000)
        self.assertEqual(page.events, events[131:])
        self.assertEqual((yield self.store.eventsForMessage("Q0")), [])
        self.assertEqual((yield self.store.eventsForMessage("Q2")), events[131:150])
        page = yield self.store.queryEvents(recipient="r1@x.org")
        self.assertEqual(page.events, [])
        index = self.server.command("HKEYS", self.prefix + "e:q").decode("utf-8")
        self.assertNotIn("Q0", index)
        self.assertNotIn("Q1", index)
        self.assertIn("Q2", index)


class CountingProtocol:
    """
    Count the commands a store's connection sends.
    """

    def __init__(self, store):
        self.commands = []
        d = store._service.whenConnected()
        protocol = d.result
        original = protocol.execute_command

        def execute_command(*args, **kwargs):
            self.commands.append(args[0])
            return original(*args, **kwargs)

        protocol.execute_command = execute_command


class RedisStoreRoundTripTests(TestCase):
    """
    L{RedisStore} answers in few round trips and copes with big messages.
    """

    @inlineCallbacks
    def setUp(self):
        self.server = sharedRedisServer()
        self.store = RedisStore.fromURL(self.server.url(), reactor, prefix=newPrefix())
        self.addCleanup(self.store.close)
        yield self.store.start()
        self.counter = CountingProtocol(self.store)

    @inlineCallbacks
    def test_appendIsOneScript(self):
        """
        A batch of events, with its indexes and counters, is one EVALSHA.
        """
        yield self.store.appendEvents(
            [event(T0 + i, "opened", f"Q{i % 3}", f"r{i}@example.com", tag="t")
             for i in range(50)]
        )
        self.assertEqual(self.counter.commands, ["EVALSHA"])
        stats = yield self.store.statistics(since=T0 - 3600, until=T0 + 3600)
        self.assertEqual((stats.totals, stats.unique_opens), ({"opened": 50}, 50))

    @inlineCallbacks
    def test_checkSuppressionsOneCommand(self):
        """
        C{checkSuppressions} for many addresses is one HMGET.
        """
        entry = SuppressionEntry(address="u7@example.com", reason="manual", time=T0)
        yield self.store.addSuppression(entry)
        del self.counter.commands[:]
        found = yield self.store.checkSuppressions(
            [f"u{i}@example.com" for i in range(500)], T0
        )
        self.assertEqual(found, {"u7@example.com": entry})
        self.assertEqual(self.counter.commands, ["HMGET"])

    @inlineCallbacks
    def test_queriesAreOneScript(self):
        """
        A filtered page of events, a page of the suppression list, the
        statistics and a token take are one script call each.
        """
        yield self.store.queryEvents(type="opened", tag="t", recipient="a@b.c")
        yield self.store.listSuppressions(prefix="a", reason="bounce")
        yield self.store.statistics(since=T0, until=T0 + 86400 * 30, tag="t")
        yield self.store.takeTokens("k", 1.0, 2.0, T0)
        self.assertEqual(self.counter.commands, ["EVALSHA"] * 4)

    @inlineCallbacks
    def test_bigMessage(self):
        """
        A message with more events than a Lua C{unpack} takes at once is
        returned whole and in order; filtered queries page through it.
        """
        events = [
            event(T0 + i // 7, "delivered", "BIG", f"r{i}@example.com",
                  detail={"i": i})
            for i in range(9000)
        ]
        yield self.store.appendEvents(events)
        self.assertEqual((yield self.store.eventsForMessage("BIG")), events)
        page = yield self.store.queryEvents(
            queue_id="BIG", recipient="r8999@EXAMPLE.com", limit=1
        )
        self.assertEqual(page, EventPage(events=[events[-1]], cursor=None))


class RedisStoreUNIXSocketTests(TestCase):
    """
    L{RedisStore} connects over a UNIX socket given by a C{unix://} URL.
    """

    @inlineCallbacks
    def test_unixSocket(self):
        """
        Events written over the UNIX socket are read back over TCP from the
        same database.
        """
        server = RedisServer(unixSocket=True).start()
        self.addCleanup(server.stop)
        prefix = newPrefix()
        overUNIX = RedisStore.fromURL(
            f"unix://{server.socketPath}?db=2", reactor, prefix=prefix
        )
        overTCP = RedisStore.fromURL(server.url(2), reactor, prefix=prefix)
        for store in [overUNIX, overTCP]:
            self.addCleanup(store.close)
            yield store.start()
        e = event()
        yield overUNIX.appendEvents([e])
        self.assertEqual((yield overTCP.eventsForMessage("Q1")), [e])


class RedisStoreTLSTests(TestCase):
    """
    L{RedisStore} talks TLS to a real TLS-only redis-server given by a
    C{rediss://} URL, verifying its certificate.
    """

    def tlsServer(self):
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        certificate, key = selfSigned("127.0.0.1", ipAddresses=["127.0.0.1"])
        paths = (os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem"))
        for path, pem in zip(paths, (certificate, key)):
            with open(path, "wb") as f:
                f.write(pem)
        server = RedisServer(tls=paths).start()
        self.addCleanup(server.stop)
        return server, paths[0]

    @inlineCallbacks
    def test_tlsWithPrivateCA(self):
        """
        With ?ssl_ca_certs naming the server's CA, events are written and
        read back over TLS.
        """
        server, ca = self.tlsServer()
        store = RedisStore.fromURL(
            f"rediss://127.0.0.1:{server.port}/1?ssl_ca_certs={ca}", reactor, prefix=newPrefix()
        )
        self.addCleanup(store.close)
        yield store.start()
        e = event()
        yield store.appendEvents([e])
        self.assertEqual((yield store.eventsForMessage("Q1")), [e])

    @inlineCallbacks
    def test_untrustedCertificate(self):
        """
        Without the CA, the self-signed certificate is refused and start()
        fails clearly.
        """
        server, _ = self.tlsServer()
        store = RedisStore.fromURL(f"rediss://127.0.0.1:{server.port}/1", reactor)
        self.addCleanup(store.close)
        failure = yield self.assertFailure(store.start(), RedisConnectionFailed)
        self.assertIn("cannot connect to the Redis event store at rediss://", str(failure))


class RedisAddressTests(SynchronousTestCase):
    """
    L{RedisAddress.endpoint} builds the endpoint the URL asks for.
    """

    def test_endpoints(self):
        """
        TCP URLs get a L{HostnameEndpoint}, C{rediss://} one wrapped in TLS,
        C{unix://} a L{UNIXClientEndpoint}.
        """
        clock = MemoryReactorClock()
        self.assertIsInstance(
            parseRedisURL("redis://h:1").endpoint(clock), HostnameEndpoint
        )
        self.assertIsInstance(
            parseRedisURL("unix:///tmp/r.sock").endpoint(clock), UNIXClientEndpoint
        )
        tls = parseRedisURL("rediss://h:1").endpoint(clock)
        self.assertNotIsInstance(tls, HostnameEndpoint)
        self.assertIsInstance(tls._wrappedEndpoint, HostnameEndpoint)


class RedisServerHelperTests(SynchronousTestCase):
    """
    The test helper fails loudly, not by skipping, without C{redis-server}.
    """

    def test_missingExecutable(self):
        """
        Starting a server whose executable is not on PATH raises
        L{RedisServerError} that says to install Redis.
        """
        server = RedisServer(executable="no-such-redis-server-here")
        error = self.assertRaises(RedisServerError, server.start)
        self.assertIn("install Redis", str(error))


class ParseRedisURLTests(SynchronousTestCase):
    """
    L{parseRedisURL} reads C{redis://}, C{rediss://} and C{unix://} URLs and
    says clearly what is wrong with a bad one.
    """

    def test_full(self):
        """
        Host, port, database and password are read.
        """
        self.assertEqual(
            parseRedisURL("redis://:s3cret@redis.example:6380/4"),
            RedisAddress(host="redis.example", port=6380, db=4, password="s3cret"),
        )

    def test_caFile(self):
        """
        ?ssl_ca_certs names a CA file for rediss:// URLs; it must exist and
        makes no sense without TLS.
        """
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("x")
        self.assertEqual(parseRedisURL(f"rediss://h/0?ssl_ca_certs={path}").caFile, path)
        self.assertRaises(ValueError, parseRedisURL, f"redis://h/0?ssl_ca_certs={path}")
        self.assertRaises(ValueError, parseRedisURL, "rediss://h/0?ssl_ca_certs=/nonexistent/ca")

    def test_defaults(self):
        """
        The port defaults to 6379 and the database to 0.
        """
        for url in ["redis://localhost", "redis://localhost/", "REDIS://localhost"]:
            self.assertEqual(
                parseRedisURL(url), RedisAddress(host="localhost", port=6379, db=0)
            )

    def test_userAndEscapes(self):
        """
        An ACL user name is read; percent-escapes in credentials are
        decoded; a lone user info is the password.
        """
        self.assertEqual(
            parseRedisURL("redis://relay:p%40ss%3Aword@h:1/2"),
            RedisAddress(host="h", port=1, db=2, username="relay", password="p@ss:word"),
        )
        self.assertEqual(
            parseRedisURL("redis://secret@h").password, "secret"
        )

    def test_tls(self):
        """
        C{rediss://} means TLS.
        """
        address = parseRedisURL("rediss://h:6390/1")
        self.assertEqual((address.tls, address.port, address.db), (True, 6390, 1))

    def test_ipv6(self):
        """
        An IPv6 literal in brackets is a host.
        """
        address = parseRedisURL("redis://[::1]:7000/0")
        self.assertEqual((address.host, address.port), ("::1", 7000))
        self.assertEqual(str(address), "redis://[::1]:7000/0")

    def test_unix(self):
        """
        C{unix:///path?db=N} names a socket and a database.
        """
        self.assertEqual(
            parseRedisURL("unix:///run/redis/redis.sock?db=3"),
            RedisAddress(path="/run/redis/redis.sock", db=3),
        )
        self.assertEqual(
            parseRedisURL("unix://:pw@/tmp/r.sock"),
            RedisAddress(path="/tmp/r.sock", db=0, password="pw"),
        )

    def test_dbQueryParameter(self):
        """
        C{?db=N} works for TCP URLs too and must agree with the path.
        """
        self.assertEqual(parseRedisURL("redis://h?db=5").db, 5)
        self.assertEqual(parseRedisURL("redis://h/5?db=5").db, 5)

    def test_strHidesPassword(self):
        """
        The address as text, used in errors and logs, has no password.
        """
        address = parseRedisURL("redis://:s3cret@h:1/2")
        self.assertNotIn("s3cret", str(address))
        self.assertNotIn("s3cret", repr(address))

    def test_bad(self):
        """
        Malformed URLs fail with L{ValueError} saying what is wrong.
        """
        for url, words in [
            ("http://h:6379/0", "redis://, rediss:// or unix://"),
            ("localhost:6379", "redis://, rediss:// or unix://"),
            ("", "redis://, rediss:// or unix://"),
            ("redis://", "no host"),
            ("redis://:pw@/0", "no host"),
            ("redis://h:port/0", "bad port"),
            ("redis://h:99999/0", "bad port"),
            ("redis://h:0/0", "1 to 65535"),
            ("redis://h:/0", "empty port"),
            ("redis://h/one", "non-negative integer"),
            ("redis://h/-1", "non-negative integer"),
            ("redis://h/1/2", "non-negative integer"),
            ("redis://h/1?db=2", "two different databases"),
            ("redis://h/1?timeout=3", "unknown Redis URL parameter"),
            ("redis://h/1?db=1&db=1", "repeats"),
            ("redis://h/1#frag", "fragment"),
            ("unix://host/tmp/r.sock", "no host"),
            ("unix://", "absolute socket path"),
            ("unix:///tmp/r.sock?db=x", "non-negative integer"),
            (None, "must be a string"),
            (b"redis://h", "must be a string"),
        ]:
            with self.assertRaises(ValueError, msg=url) as caught:
                parseRedisURL(url)
            self.assertIn(words, str(caught.exception), url)

    def test_fromURLBad(self):
        """
        L{RedisStore.fromURL} refuses a bad URL at once.
        """
        self.assertRaises(ValueError, RedisStore.fromURL, "redis://h/x", reactor)


class FastProtocolTests(SynchronousTestCase):
    """
    The store's protocol (txredisapi's, with the rest of a read after a
    bulk string handled in the same call) parses replies as txredisapi
    does, however the bytes are cut, without pausing the transport or
    waiting for the reactor.
    """

    REPLIES = (
        b"*4\r\n:1\r\n:3\r\n$1\r\n0\r\n$4\r\n1.25\r\n"
        b"+OK\r\n"
        b"$-1\r\n"
        b"*2\r\n*2\r\n$1\r\na\r\n$0\r\n\r\n*0\r\n"
        b"-NOSCRIPT No matching script\r\n"
        b":42\r\n"
        b"$5\r\nhe\r\nl\r\n"
    )

    def protocol(self):
        from twisted.internet.testing import StringTransport

        from smartrelay.store.redis import _fastProtocol

        clock = MemoryReactorClock()
        protocol = _fastProtocol()(charset=None, convertNumbers=False, replyTimeout=None)
        protocol.callLater = clock.callLater
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport, clock

    def replies(self, chunks):
        protocol, transport, clock = self.protocol()
        ds = [protocol.execute_command("PING") for _ in range(7)]
        for chunk in chunks:
            protocol.dataReceived(chunk)
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertEqual(transport.producerState, "producing")
        return ds

    def check(self, ds):
        values = [self.successResultOf(d) for d in ds[:4]]
        self.assertEqual(values[0], [1, 3, b"0", b"1.25"])
        self.assertEqual(values[1], "OK")
        self.assertIsNone(values[2])
        self.assertEqual(values[3], [[b"a", b""], []])
        failure = self.failureResultOf(ds[4])
        self.assertTrue(str(failure.value).startswith("NOSCRIPT"), failure)
        self.assertEqual(self.successResultOf(ds[5]), 42)
        self.assertEqual(self.successResultOf(ds[6]), b"he\r\nl")

    def test_oneRead(self):
        """
        Seven pipelined replies in one read.
        """
        self.check(self.replies([self.REPLIES]))

    def test_everyCut(self):
        """
        The same replies cut in two at every byte, and byte by byte.
        """
        for i in range(1, len(self.REPLIES)):
            self.check(self.replies([self.REPLIES[:i], self.REPLIES[i:]]))
        self.check(self.replies([self.REPLIES[i : i + 1] for i in range(len(self.REPLIES))]))

    def test_commandEncoding(self):
        """
        Commands are encoded as txredisapi encodes them.
        """
        from txredisapi import BaseRedisProtocol

        from smartrelay.store.redis import _fastProtocol

        args = ("EVALSHA", b"\x00sha", "2", "bücher", 7, 1.5, bytearray(b"x"))
        plain = BaseRedisProtocol(charset=None)
        fast = _fastProtocol()(charset=None)
        self.assertEqual(fast._build_command(*args), plain._build_command(*args))
