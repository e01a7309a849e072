"""
Tests for L{smartrelay.sms.client}: the reconnecting, binding SMS client
against fake SMSCs over in-memory connections.
"""

import random

from twisted.internet.defer import fail, succeed
from twisted.internet.task import Clock
from twisted.test.iosim import connect, makeFakeClient, makeFakeServer
from twisted.trial.unittest import SynchronousTestCase

from smartrelay.cluster.leases import LeaseKeeper, LocalLeases
from smartrelay.sms.client import NotConnected, SMSClient
from smartrelay.sms.codec import Status
from smartrelay.sms.protocol import SessionLost, SessionSettings, SubmitRefused
from smartrelay.sms.testing import FakeSMSC, SMSCScript
from smartrelay.store.memory import MemoryStore


class FakeEndpoint:
    """
    Connects each attempt to a new L{FakeSMSC} in memory.
    """

    def __init__(self, scripts):
        self.scripts = list(scripts)
        self.smscs = []
        self.pumps = []

    def connect(self, factory):
        script = self.scripts.pop(0) if len(self.scripts) > 1 else self.scripts[0]
        smsc = FakeSMSC(script)
        protocol = factory.buildProtocol(None)
        self.pumps.append(
            connect(smsc, makeFakeServer(smsc), protocol, makeFakeClient(protocol), greet=False)
        )
        self.smscs.append(smsc)
        return succeed(protocol)

    def flush(self):
        for pump in self.pumps:
            pump.flush()


class ClientTests(SynchronousTestCase):
    def makeClient(self, *scripts, **kw):
        self.clock = Clock()
        self.endpoint = FakeEndpoint(scripts or [SMSCScript()])
        self.receipts = []
        client = SMSClient(
            self.endpoint, self.clock,
            SessionSettings(system_id=b"esme", responseTimeout=5, **kw),
            self.receipts.append, queueTimeout=30, retryPolicy=lambda attempt: 2.0,
        )
        client.startService()
        self.endpoint.flush()
        return client

    def submit(self, client, text=b"hi"):
        return client.submit({"destination_addr": b"39333", "short_message": text})

    def test_submitOnBoundSession(self):
        """
        The client binds on connecting and submits through the session.
        """
        client = self.makeClient()
        self.assertTrue(client.bound)
        d = self.submit(client)
        self.endpoint.flush()
        self.assertEqual(self.successResultOf(d), "1A0")

    def test_bindFailureRetried(self):
        """
        A refused bind is retried after the back-off; submits wait for the
        bound session.
        """
        client = self.makeClient(SMSCScript(bindStatus=Status.ESME_RBINDFAIL), SMSCScript())
        self.assertFalse(client.bound)
        d = self.submit(client)
        self.assertNoResult(d)
        self.clock.advance(2)
        self.endpoint.flush()
        self.assertTrue(client.bound)
        self.endpoint.flush()
        self.assertEqual(self.successResultOf(d), "1A0")
        self.assertEqual(len(self.endpoint.smscs), 2)

    def test_unansweredResentOnNextBind(self):
        """
        Submits unanswered when the session drops are sent again, in their
        order and before newer ones, on the next bind.
        """
        client = self.makeClient(SMSCScript(submitStatuses=[None, None]), SMSCScript())
        first, second = self.submit(client, b"1"), self.submit(client, b"2")
        self.endpoint.flush()
        self.clock.advance(5)  # response timeout: the session is dropped
        self.endpoint.flush()
        third = self.submit(client, b"3")
        self.clock.advance(2)
        self.endpoint.flush()
        self.endpoint.flush()
        again = self.endpoint.smscs[1].submits
        self.assertEqual([p.get("short_message") for p in again], [b"1", b"2", b"3"])
        self.assertEqual(
            [self.successResultOf(d) for d in (first, second, third)], ["1A0", "1A1", "1A2"]
        )

    def test_inFlight(self):
        """
        L{SMSClient.inFlight} counts the submits sent and not answered yet;
        without a session it is 0.
        """
        client = self.makeClient(SMSCScript(submitStatuses=[None, Status.ESME_ROK]))
        self.assertEqual(client.inFlight, 0)
        self.submit(client, b"1")
        self.endpoint.flush()
        self.assertEqual(client.inFlight, 1)
        self.clock.advance(5)  # response timeout: the session is dropped
        self.endpoint.flush()
        self.assertFalse(client.bound)
        self.assertEqual(client.inFlight, 0)
        self.assertEqual(client.waiting, 1)

    def test_refusalIsFinal(self):
        """
        A refusal by the SMSC reaches the caller; it is not retried.
        """
        client = self.makeClient(SMSCScript(submitStatuses=[Status.ESME_RINVDSTADR]))
        d = self.submit(client)
        self.endpoint.flush()
        self.failureResultOf(d, SubmitRefused)
        self.assertEqual(len(self.endpoint.smscs[0].submits), 1)

    def test_notConnected(self):
        """
        A submit that finds no bound session within the queue timeout fails
        with L{NotConnected}.
        """
        client = self.makeClient(SMSCScript(bindStatus=Status.ESME_RINVPASWD))
        d = self.submit(client)
        self.clock.advance(30)
        self.failureResultOf(d, NotConnected)
        self.assertEqual(client.waiting, 0)

    def test_receiptsHandedOn(self):
        """
        Receipts on the session reach the client's receiver.
        """
        client = self.makeClient(SMSCScript(receipts=True))
        self.submit(client)
        self.endpoint.flush()
        self.assertEqual([p.name for p in self.receipts], ["deliver_sm"])

    def test_stopUnbinds(self):
        """
        Stopping unbinds the session and fails waiting submits; a submit
        after the stop fails at once.
        """
        client = self.makeClient(SMSCScript(submitStatuses=[None]))
        d = self.submit(client)
        self.endpoint.flush()
        stopped = client.stopService()
        self.endpoint.flush()
        self.successResultOf(stopped)
        self.assertEqual(self.endpoint.smscs[0].received[-1].name, "unbind")
        self.failureResultOf(d, NotConnected)
        self.failureResultOf(self.submit(client), NotConnected)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class FlakyTokens:
    """
    A store's C{takeTokens} (a L{MemoryStore}'s buckets) that cannot be
    reached while C{down}.
    """

    def __init__(self, store):
        self.store = store
        self.down = False
        self.keys = []

    def takeTokens(self, key, rate, burst, now, count=1):
        self.keys.append(key)
        if self.down:
            return fail(ConnectionRefusedError("connection refused"))
        return self.store.takeTokens(key, rate, burst, now, count)


class FixedNodes:
    def __init__(self, n):
        self.n = n

    def count(self):
        return self.n


class ClusterRateTests(SynchronousTestCase):
    """
    C{[sms] rate} across the nodes sharing a store: every submit_sm takes
    a token from the store's bucket C{sms:<smsc>}; C{rate / N} per node
    while the store cannot be reached.
    """

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.tokens = FlakyTokens(MemoryStore())
        self.random = random.Random(17)

    def client(self, rate=2.0, nodes=None, window=10, script=None):
        endpoint = FakeEndpoint([script or SMSCScript()])
        client = SMSClient(
            endpoint, self.clock,
            SessionSettings(system_id=b"esme", responseTimeout=5, rate=rate, window=window),
            lambda pdu: None, queueTimeout=30, retryPolicy=lambda attempt: 2.0,
            description="tcp:host=smsc.test:port=2775", rates=self.tokens, nodes=nodes,
            jitter=self.random.random,
        )
        client.startService()
        endpoint.flush()
        self.addCleanup(client.stopService)
        return client, endpoint

    def submitted(self, endpoint):
        return sum(len(smsc.submits) for smsc in endpoint.smscs)

    def drive(self, seconds, *endpoints, step=0.05):
        """
        Advance the clock, flushing the connections, and note the submits
        each endpoint's SMSC had after each step.
        """
        seen = []
        end = self.clock.seconds() + seconds
        while True:
            for endpoint in endpoints:
                endpoint.flush()
            now = self.clock.seconds()
            if now >= end:
                break
            due = [c.getTime() for c in self.clock.getDelayedCalls()]
            self.clock.advance(min([end, now + step] + [t for t in due if t > now]) - now)
            for endpoint in endpoints:
                endpoint.flush()
            seen.append(tuple(self.submitted(e) for e in endpoints))
        return seen

    def test_twoNodesShareTheRate(self):
        """
        Two nodes with a backlog each send, together, C{rate} submits a
        second (not twice that), from the bucket C{sms:<smsc>}; the
        sessions pace nothing themselves.
        """
        a, ea = self.client()
        b, eb = self.client()
        self.assertIsNone(a.settings.rate)
        self.assertEqual(a.rate, 2.0)
        results = [a.submit({"short_message": b"a%d" % i}) for i in range(40)]
        results += [b.submit({"short_message": b"b%d" % i}) for i in range(40)]
        seen = self.drive(10.0, ea, eb)
        total = sum(seen[-1])
        # 10 s at 2 a second, plus the bucket's one token at the start.
        self.assertTrue(19 <= total <= 21, seen[-1])
        self.assertTrue(seen[-1][0] >= 5 and seen[-1][1] >= 5, seen[-1])
        self.assertEqual(set(self.tokens.keys), {"sms:tcp:host=smsc.test:port=2775"})
        # Those sent were answered; the others still wait (not failed).
        self.assertEqual(sum(1 for d in results if d.called), total)

    def test_aloneAtTheWholeRate(self):
        """
        One node alone sends at the whole rate.
        """
        a, ea = self.client(rate=5.0)
        for i in range(100):
            a.submit({"short_message": b"%d" % i})
        seen = self.drive(4.0, ea)
        self.assertTrue(20 <= seen[-1][0] <= 21, seen[-1])

    def test_backlogDoesNotExpire(self):
        """
        A submit waiting for the cluster's rate on a bound session is not
        failed after the queue timeout (it waits for the rate, not for a
        session).
        """
        a, ea = self.client(rate=0.5)
        results = [a.submit({"short_message": b"%d" % i}) for i in range(20)]
        self.drive(40.0, ea, step=0.5)
        self.assertFalse([d for d in results if d.called and d.result is not None and not isinstance(d.result, str)])
        for d in results:
            if d.called:
                self.assertIsInstance(self.successResultOf(d), str)

    def test_unreachableStoreGivesAShare(self):
        """
        While the store cannot be reached a node paces itself at C{rate / N}
        and says so once; when it answers again the bucket applies again.
        """
        a, ea = self.client(rate=4.0, nodes=FixedNodes(2))
        for i in range(100):
            a.submit({"short_message": b"%d" % i})
        self.tokens.down = True
        seen = self.drive(5.0, ea)
        # 2 a second for 5 s (the first at once).
        self.assertTrue(10 <= seen[-1][0] <= 11, seen[-1])
        self.assertTrue(a.ratesLocal)
        self.tokens.down = False
        before = seen[-1][0]
        seen = self.drive(5.0, ea)
        self.assertFalse(a.ratesLocal)
        self.assertTrue(19 <= seen[-1][0] - before <= 22, (before, seen[-1]))

    def test_windowStillHolds(self):
        """
        Submits are handed to the session only when it can send them:
        never more than the window unanswered, and the tokens are spent as
        they go out.
        """
        a, ea = self.client(
            rate=100.0, window=2, script=SMSCScript(submitStatuses=[None] * 10)
        )
        for i in range(10):
            a.submit({"short_message": b"%d" % i})
        self.drive(1.0, ea)
        self.assertEqual(self.submitted(ea), 2)
        self.assertEqual(a.waiting, 8)


class ClusterBindTests(SynchronousTestCase):
    """
    With C{maxBinds}, the binds to the SMSC are leases held in the
    cluster: no more than that many nodes bind at once.
    """

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.backend = LocalLeases()

    def client(self, holder):
        keeper = LeaseKeeper(self.backend, self.clock, holder=holder, shared=True, ttl=30)
        keeper.startService()
        self.addCleanup(keeper.stopService)
        endpoint = FakeEndpoint([SMSCScript()])
        client = SMSClient(
            endpoint, self.clock, SessionSettings(system_id=b"esme", responseTimeout=5),
            lambda pdu: None, queueTimeout=30, retryPolicy=lambda attempt: 2.0,
            description="smsc.test", leases=keeper, maxBinds=1,
        )
        client.startService()
        endpoint.flush()
        return client, endpoint, keeper

    def test_oneBindInTheCluster(self):
        """
        The second node does not bind while the first holds the only
        bind; it binds after its back-off once the first has unbound.
        The lease is renewed while bound.
        """
        a, ea, ka = self.client("a")
        b, eb, kb = self.client("b")
        self.assertTrue(a.bound)
        self.assertFalse(b.bound)
        self.assertEqual([s.bound for s in eb.smscs], [False])
        for _ in range(6):
            self.clock.advance(10)
            ea.flush()
            eb.flush()
        self.assertTrue(a.bound)
        self.assertFalse(a.bindLease.lost)
        self.assertFalse(b.bound)
        stopped = a.stopService()
        ea.flush()
        self.successResultOf(stopped)
        self.assertEqual(ka.heldBy("sms-bind:smsc.test"), 0)
        self.clock.advance(2)
        eb.flush()
        self.assertTrue(b.bound)
        self.assertEqual(kb.heldBy("sms-bind:smsc.test"), 1)
        stopped = b.stopService()
        eb.flush()
        self.successResultOf(stopped)
