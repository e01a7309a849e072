"""
Tests for L{smartrelay.cluster.commands}: one L{IMailboxes} contract run
against L{LocalMailboxes} and a real C{redis-server}; two nodes' command
channels and their L{Queries} on a fake clock.
"""

from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from smartrelay.cluster.commands import (
    LocalMailboxes,
    NodeCommands,
    NodeTimeout,
    NodeUnavailable,
    StoreUnreachable,
    mailboxBackend,
    ownerOf,
)
from smartrelay.cluster.leases import LocalLeases
from smartrelay.cluster.nodes import NODES
from smartrelay.outbound.scheduler import DeliveryInProgress
from smartrelay.store.interfaces import IMailboxes
from smartrelay.store.memory import MemoryStore
from smartrelay.store.redis import RedisStore
from smartrelay.web.apirequest import ApiError
from smartrelay.web.queries import Queries, QueueActions, answerOrError
from tests.redisserver import sharedRedisServer
from tests.test_store_redis import newPrefix

T0 = 1_800_000_000.0

QA = "0A/01-00001-5C348706"
QB = "0B/01-00001-5C348706"


class MailboxesContractMixin:
    """
    What every L{IMailboxes} does; C{self.mailboxes} is the one under test.
    """

    def test_providesInterface(self):
        """
        The back end provides L{IMailboxes}.
        """
        self.assertTrue(verifyObject(IMailboxes, self.mailboxes))

    async def test_oldestFirstEachOnce(self):
        """
        Messages come out oldest first, at most C{limit} at a time, and
        each once.
        """
        for text in ("one", "two", "thrée"):
            await self.mailboxes.postToMailbox("node:0A", text, 30)
        self.assertEqual(await self.mailboxes.takeFromMailbox("node:0A", 2), ["one", "two"])
        self.assertEqual(await self.mailboxes.takeFromMailbox("node:0A", 100), ["thrée"])
        self.assertEqual(await self.mailboxes.takeFromMailbox("node:0A", 100), [])

    async def test_mailboxesApart(self):
        """
        A message is in the mailbox it was posted to only.
        """
        await self.mailboxes.postToMailbox("node:0A", "for A", 30)
        self.assertEqual(await self.mailboxes.takeFromMailbox("node:0B", 10), [])
        self.assertEqual(await self.mailboxes.takeFromMailbox("node:0A", 10), ["for A"])

    def test_badArguments(self):
        """
        Bad names, messages, TTLs and limits fail with L{ValueError}.
        """
        for args in [
            ("", "m", 30),
            ("a b", "m", 30),
            ("box", b"m", 30),
            ("box", "x" * 70000, 30),
            ("box", "m", 0),
        ]:
            self.failureResultOf(self.mailboxes.postToMailbox(*args), ValueError)
        for args in [("", 1), ("box", 0), ("box", 1001), ("box", True)]:
            self.failureResultOf(self.mailboxes.takeFromMailbox(*args), ValueError)


class LocalMailboxesTests(MailboxesContractMixin, TestCase):
    """
    L{LocalMailboxes} fulfils the mailbox contract.
    """

    def setUp(self):
        self.mailboxes = LocalMailboxes()


class RedisMailboxesTests(MailboxesContractMixin, TestCase):
    """
    L{RedisStore}, against a real C{redis-server}, fulfils the mailbox
    contract.
    """

    def setUp(self):
        self.server = sharedRedisServer()
        self.mailboxes = RedisStore.fromURL(self.server.url(0), reactor, prefix=newPrefix())
        self.addCleanup(self.mailboxes.close)
        return self.mailboxes.start()

    async def test_mailboxExpires(self):
        """
        A mailbox expires C{ttl} after its last post.
        """
        await self.mailboxes.postToMailbox("node:0A", "m", 70)
        reply = self.server.command("PTTL", self.mailboxes.prefix + "mbox:node:0A")
        pttl = int(reply.strip().lstrip(b":"))
        self.assertTrue(60000 < pttl <= 70000, pttl)


class BackendTests(SynchronousTestCase):
    """
    L{mailboxBackend} and L{ownerOf}.
    """

    def test_noneForMemory(self):
        """
        A store without mailboxes (one node) gets none.
        """
        self.assertEqual(mailboxBackend(MemoryStore()), (None, False))

    def test_redis(self):
        """
        The Redis store is its own, shared, back end.
        """
        store = RedisStore.fromURL("redis://127.0.0.1:1/0", Clock())
        self.assertEqual(mailboxBackend(store), (store, True))

    def test_owner(self):
        """
        A queue id's owner is its first two characters, upper case.
        """
        self.assertEqual(ownerOf("2a/01-00001-5C348706"), "2A")


@implementer(IMailboxes)
class FlakyMailboxes:
    """
    Shared L{LocalMailboxes} that fail while C{down}.
    """

    def __init__(self, local):
        self.local = local
        self.down = False

    def postToMailbox(self, *args):
        if self.down:
            return fail(ConnectionRefusedError("connection refused"))
        return self.local.postToMailbox(*args)

    def takeFromMailbox(self, *args):
        if self.down:
            return fail(ConnectionRefusedError("connection refused"))
        return self.local.takeFromMailbox(*args)


class FakeQueue:
    """
    A node's queue (L{smartrelay.web.queries.QueueControl}, the part the
    actions use): a set of queue ids, some being attempted.
    """

    def __init__(self, queued=(), busy=()):
        self.queued = set(queued)
        self.busy = set(busy)
        self.retried = []

    def retryDomain(self, domain):
        self.retried.append(domain)
        return len(self.queued)

    def queuedMessage(self, queue_id):
        return object() if queue_id in self.queued else None

    def retryNow(self, queue_id):
        self.retried.append(queue_id)
        return queue_id not in self.busy

    def attempting(self, queue_id):
        return {"a@example.org"} if queue_id in self.queued else set()

    def delete(self, queue_id):
        if queue_id not in self.queued:
            raise KeyError(queue_id)
        if queue_id in self.busy:
            raise DeliveryInProgress(queue_id, ["a@example.org"])
        self.queued.discard(queue_id)
        return succeed(["a@example.org"])


class Node:
    """
    One node: its queue, its command channel and its queries, sharing the
    clock, the registry and the mailboxes with the others.
    """

    def __init__(self, clock, leases, mailboxes, node, queued=(), busy=()):
        self.queue = FakeQueue(queued, busy)
        self.mailboxes = FlakyMailboxes(mailboxes)
        self.commands = NodeCommands(
            self.mailboxes, leases, clock, node=node, handler=QueueActions(self.queue).answer
        )
        self.queries = Queries(MemoryStore(), self.queue, None, clock, remote=self.commands)
        leases.acquireLease(NODES, f"{node}-{node.lower()}run", 1 << 30, clock.seconds(), 30)
        self.commands.startService()


class TwoNodesTests(SynchronousTestCase):
    """
    A retry or delete sent to node B for a message queued on node A runs
    on A and is answered as A answers.
    """

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(T0)
        self.leases = LocalLeases()
        shared = LocalMailboxes()
        self.a = Node(self.clock, self.leases, shared, "0A", queued={QA}, busy=())
        self.b = Node(self.clock, self.leases, shared, "0B", queued={QB})
        self.addCleanup(self.a.commands.stopService)
        self.addCleanup(self.b.commands.stopService)

    def settle(self, coroutine):
        """
        Run C{coroutine}, letting the nodes read their mailboxes for up to
        two seconds of the fake clock.
        """
        d = Deferred.fromCoroutine(coroutine)
        for _ in range(8):
            if d.called:
                break
            self.clock.advance(0.25)
        return d

    def test_retryReachesTheOwner(self):
        """
        B forwards a retry of A's message; A retries it and B answers A's
        document within a second.
        """
        d = self.settle(self.b.queries.retry(QA))
        self.assertEqual(
            self.successResultOf(d), {"queue_id": QA, "retrying": ["a@example.org"]}
        )
        self.assertEqual(self.a.queue.retried, [QA])
        self.assertEqual(self.b.queue.retried, [])

    def test_deleteReachesTheOwner(self):
        """
        B forwards a delete; A deletes and answers with the addresses.
        """
        d = self.settle(self.b.queries.delete(QA))
        self.assertEqual(self.successResultOf(d), {"queue_id": QA, "deleted": ["a@example.org"]})
        self.assertEqual(self.a.queue.queued, set())

    def test_ownerErrorsComeBackAsThemselves(self):
        """
        What A refuses (not queued: 404; in a transaction: 409) B refuses
        with the same status, code and message.
        """
        d = self.settle(self.b.queries.retry("0A/01-00002-5C348706"))
        error = self.failureResultOf(d, ApiError).value
        self.assertEqual((error.status, error.code), (404, "not_found"))
        self.a.queue.busy.add(QA)
        d = self.settle(self.b.queries.delete(QA))
        error = self.failureResultOf(d, ApiError).value
        self.assertEqual((error.status, error.code), (409, "in_progress"))
        self.assertIn(QA, error.message)

    def test_localStaysLocal(self):
        """
        A message of this node, or one queued here whatever its id says,
        is handled here without the store.
        """
        self.b.mailboxes.down = True
        self.b.queue.queued.add(QA)
        for queueID in (QA, QB):
            answer = self.successResultOf(self.settle(self.b.queries.retry(queueID)))
            self.assertEqual(answer["queue_id"], queueID)
        self.assertEqual(self.a.queue.retried, [])

    def test_ownerNotLive(self):
        """
        A message of a node with no live heartbeat is refused at once with
        503 C{node_unavailable}.
        """
        d = self.settle(self.b.queries.retry("0C/01-00001-5C348706"))
        error = self.failureResultOf(d, ApiError).value
        self.assertEqual((error.status, error.code), (503, "node_unavailable"))
        self.assertIn("node 0C", error.message)

    def test_ownerSilent(self):
        """
        A live owner that does not answer within the timeout gets 504
        C{node_timeout}; its late command is dropped, not run.
        """
        self.a.commands.stopService()
        d = self.settle(self.b.queries.retry(QA))
        self.clock.advance(10.0)
        error = self.failureResultOf(d, ApiError).value
        self.assertEqual((error.status, error.code), (504, "node_timeout"))
        self.a.commands.startService()
        self.clock.advance(0.25)
        self.assertEqual(self.a.queue.retried, [])

    def test_storeUnreachable(self):
        """
        When B cannot post to the store the answer is 503
        C{store_unreachable}, at once.
        """
        self.b.mailboxes.down = True
        d = self.settle(self.b.queries.retry(QA))
        error = self.failureResultOf(d, ApiError).value
        self.assertEqual((error.status, error.code), (503, "store_unreachable"))
        self.assertEqual(self.b.commands._waiting, {})

    def test_unreadableMessageDropped(self):
        """
        Something in the mailbox that is not a message is logged and
        dropped; the channel goes on.
        """
        for junk in ("not json", "5", '{"kind": "command", "id": "x"}', '{"kind": "x", "id": 1}'):
            self.a.mailboxes.local.postToMailbox("node:0A", junk, 30)
        self.clock.advance(0.25)
        self.flushLoggedErrors()
        self.test_retryReachesTheOwner()

    def test_retryDomainEverywhere(self):
        """
        A retry of a domain through B runs on every live node: the answer
        sums them and says what each woke; a live node that does not
        answer is listed as unanswered.
        """
        d = self.settle(self.b.queries.retryDomain("example.org"))
        self.assertEqual(
            self.successResultOf(d),
            {
                "domain": "example.org",
                "messages": 2,
                "nodes": {"0A": 1, "0B": 1},
                "unanswered": [],
            },
        )
        self.assertEqual(self.a.queue.retried, ["example.org"])
        self.assertEqual(self.b.queue.retried, ["example.org"])
        self.a.commands.stopService()
        d = self.settle(self.b.queries.retryDomain("example.org"))
        self.clock.advance(10.0)
        self.assertEqual(
            self.successResultOf(d),
            {"domain": "example.org", "messages": 1, "nodes": {"0B": 1}, "unanswered": ["0A"]},
        )

    def test_retryDomainAlone(self):
        """
        Without other nodes the answer is this node's, as before.
        """
        queries = Queries(MemoryStore(), FakeQueue({QA}), None, self.clock)
        d = Deferred.fromCoroutine(queries.retryDomain("example.org"))
        self.assertEqual(self.successResultOf(d), {"domain": "example.org", "messages": 1})

    def test_unknownCommand(self):
        """
        An unknown command or a bad queue id is answered 400, not run.
        """
        answer = self.successResultOf(QueueActions(FakeQueue()).answer("hold", {"queue_id": QA}))
        self.assertEqual(answer["status"], 400)
        answer = self.successResultOf(QueueActions(FakeQueue()).answer("retry", {"queue_id": 7}))
        self.assertEqual(answer["status"], 400)

    def test_answerOrError(self):
        """
        A malformed answer is a 500, never a crash.
        """
        for answer in (None, {}, {"status": 404, "body": {}}, {"status": "x", "body": 1}):
            with self.assertRaises(ApiError) as caught:
                answerOrError(answer)
            self.assertEqual(caught.exception.status, 500, answer)
        self.assertEqual(answerOrError({"status": 200, "body": {"ok": 1}}), {"ok": 1})

    def test_noTimersLeft(self):
        """
        Stopped, the channels leave no delayed calls.
        """
        self.a.commands.stopService()
        self.b.commands.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])
