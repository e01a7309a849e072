"""
Tests for the delivery engine's destinations: pooled sessions, per-domain
and provider limits, rate limits from the store's token buckets, and
adaptive throttling.  Socket-free: a fake clock, spool, router and
connector (L{smartrelay.outbound.testing}).
"""

import re

from twisted.internet.defer import fail
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from smartrelay.config import parseConfig
from smartrelay.engine.downgrade import Offers, Prepared
from smartrelay.engine.rewrap import SigningError
from smartrelay.outbound.parking import FLUSH_INTERVAL
from smartrelay.outbound.pool import Destination, DestinationPolicy, Limits, Throttle
from smartrelay.outbound.router import Hop
from smartrelay.outbound.scheduler import DeliveryScheduler
from smartrelay.outbound.session import Reply
from smartrelay.outbound.testing import (
    Delays,
    FakeDeliverer,
    FakeRouter,
    FakeSpool,
    RecordingEvents,
    makeEntry,
)
from smartrelay.store.memory import MemoryStore

START = 1_700_000_000.0


class PoolTestsMixin:
    maxConnections = 10
    limits = Limits(maxConnections=3, messagesPerConnection=100)

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(START)
        self.spool = FakeSpool()
        self.events = RecordingEvents()
        self.router = FakeRouter(
            table={
                "a.example": ["mx.a.example"],
                "b.example": ["mx.b.example"],
                "c.example": ["mx.c.example"],
            }
        )
        self.deliverer = FakeDeliverer()
        self.store = MemoryStore()
        self.scheduler = self.makeScheduler()
        self.scheduler.startService()
        self.addCleanup(lambda: self.scheduler.running and self.scheduler.stopService())

    def makeScheduler(self, **kwargs):
        options = dict(
            spool=self.spool,
            router=self.router,
            connector=self.deliverer,
            events=self.events,
            clock=self.clock,
            retry=Delays((60, 300)),
            maxAge=86400.0,
            maxConnections=self.maxConnections,
            policy=DestinationPolicy(defaults=self.limits),
            store=self.store,
            throttlePatterns=(re.compile("rate limited", re.I),),
            throttleCooldown=600.0,
            idleTimeout=30.0,
        )
        options.update(kwargs)
        return DeliveryScheduler(**options)

    def rebuild(self, **options):
        """
        Replace setUp's scheduler (nothing queued yet) by one made with
        C{options} too.
        """
        self.scheduler.stopService()
        self.scheduler = self.makeScheduler(**options)
        self.scheduler.startService()

    def add(self, queue_id, recipients):
        entry = makeEntry(queue_id, recipients, received=self.clock.seconds())
        self.spool.add(entry, b"message " + queue_id.encode())
        self.scheduler.enqueue(entry)
        return entry

    def addMany(self, count, domain="a.example", prefix="Q"):
        return [self.add(f"{prefix}{i}", [f"r{i}@{domain}"]) for i in range(count)]

    def answerAll(self, code=250, text="ok"):
        while self.deliverer.pending():
            self.deliverer.pending()[0].answer(code, text)

    def destination(self, key="a.example"):
        (state,) = [d for d in self.scheduler.destinations() if d["destination"] == key]
        return state


class ReuseTests(PoolTestsMixin, SynchronousTestCase):
    """
    Sessions carry many transactions.
    """

    def test_reused(self):
        """Messages to one destination, one after the other, share one session."""
        self.addMany(3)
        self.scheduler.policy = DestinationPolicy(defaults=Limits(maxConnections=1))
        self.clock.advance(0)
        self.answerAll()
        self.assertEqual(len(self.deliverer.sessions), 1)
        self.assertEqual(len(self.deliverer.calls), 3)
        self.assertEqual({id(c.session) for c in self.deliverer.calls}, {id(self.deliverer.sessions[0])})
        self.assertEqual(len(self.events.ofType("delivered")), 3)

    def test_messagesPerConnection(self):
        """After messagesPerConnection transactions a session is closed and a new one opened."""
        self.scheduler.policy = DestinationPolicy(
            defaults=Limits(maxConnections=1, messagesPerConnection=2)
        )
        self.addMany(5)
        self.clock.advance(0)
        self.answerAll()
        self.assertEqual([s.transactions for s in self.deliverer.sessions], [2, 2, 1])
        self.assertEqual(self.deliverer.quits, self.deliverer.sessions[:2])

    def test_idleTimeout(self):
        """An idle session is closed after idleTimeout; new mail then opens a new one."""
        self.addMany(1)
        self.clock.advance(0)
        self.answerAll()
        self.clock.advance(29)
        self.assertEqual(len(self.deliverer.connected()), 1)
        self.add("L1", ["late@a.example"])
        self.clock.advance(0)
        self.answerAll()
        self.assertEqual(len(self.deliverer.sessions), 1)  # reused before the timeout
        self.clock.advance(30)
        self.assertEqual(self.deliverer.connected(), [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_serverClosedIdleSession(self):
        """A session the server closed while idle is not used again."""
        self.addMany(1)
        self.clock.advance(0)
        self.answerAll()
        self.deliverer.sessions[0].closeByServer()
        self.add("L1", ["late@a.example"])
        self.clock.advance(0)
        self.answerAll()
        self.assertEqual(len(self.deliverer.sessions), 2)
        self.assertEqual(len(self.events.ofType("delivered")), 2)

    def test_unansweredRetriedOnFreshSession(self):
        """A reused connection that died before answering gets the job again on a new session, once."""
        self.addMany(2)
        self.scheduler.policy = DestinationPolicy(defaults=Limits(maxConnections=1))
        self.clock.advance(0)
        self.deliverer.pending()[0].answer(250, "ok")
        self.deliverer.pending()[0].answer(451, "lost", "4.4.2", unanswered=True)
        self.assertEqual(len(self.deliverer.sessions), 2)
        self.deliverer.pending()[0].answer(250, "ok")
        self.assertEqual(len(self.events.ofType("delivered")), 2)
        self.assertEqual(self.events.ofType("deferred"), [])

    def test_hopMismatchReconnects(self):
        """A job whose hops do not include the idle session's host gets its own session."""
        self.addMany(1)
        self.clock.advance(0)
        self.answerAll()
        self.router.table["a.example"] = ["mx2.a.example"]
        self.add("L1", ["late@a.example"])
        self.clock.advance(0)
        self.answerAll()
        self.assertEqual([s.hop.name for s in self.deliverer.sessions], ["mx.a.example", "mx2.a.example"])
        self.assertFalse(self.deliverer.sessions[0].connected)


class LimitTests(PoolTestsMixin, SynchronousTestCase):
    """
    Connection limits per destination and in all.
    """

    def test_perDestination(self):
        """No more than the destination's maxConnections sessions are open at once."""
        self.addMany(10)
        self.clock.advance(0)
        self.assertEqual(len(self.deliverer.sessions), 3)
        self.assertEqual(len(self.deliverer.pending()), 3)
        self.assertEqual(self.destination()["queued"], 7)
        self.answerAll()
        self.assertEqual(len(self.deliverer.sessions), 3)
        self.assertEqual(len(self.events.ofType("delivered")), 10)

    def test_domainSection(self):
        """A [domain:...] limit overrides the default for that domain only."""
        config = parseConfig(
            "[delivery]\nmax_connections_per_domain = 4\n"
            "[domain:a.example]\nmax_connections = 1\n"
        )
        self.scheduler.policy = DestinationPolicy.fromConfig(config)
        self.addMany(5, "a.example", "A")
        self.addMany(5, "b.example", "B")
        self.clock.advance(0)
        hosts = [s.hop.name for s in self.deliverer.sessions]
        self.assertEqual((hosts.count("mx.a.example"), hosts.count("mx.b.example")), (1, 4))

    def test_global(self):
        """maxConnections bounds the sessions of all destinations together."""
        self.rebuild(maxConnections=4)
        self.addMany(5, "a.example", "A")
        self.addMany(5, "b.example", "B")
        self.clock.advance(0)
        # First come, first served: a.example fills its own limit (3).
        self.assertEqual(len(self.deliverer.sessions), 4)
        hosts = sorted(s.hop.name for s in self.deliverer.sessions)
        self.assertEqual(hosts, ["mx.a.example"] * 3 + ["mx.b.example"])
        self.answerAll()
        self.assertEqual(len(self.events.ofType("delivered")), 10)

    def test_idleSessionMakesRoom(self):
        """An idle session of one destination is closed when another needs its slot."""
        self.rebuild(maxConnections=1)
        self.addMany(1, "a.example", "A")
        self.clock.advance(0)
        self.answerAll()
        self.addMany(1, "b.example", "B")
        self.clock.advance(0)
        self.assertEqual([s.connected for s in self.deliverer.sessions], [False, True])
        self.answerAll()
        self.assertEqual(len(self.events.ofType("delivered")), 2)

    def test_busyDestinationYields(self):
        """With every slot taken, a session hands its slot over to a destination that has none."""
        self.rebuild(maxConnections=1)
        self.addMany(3, "a.example", "A")
        self.clock.advance(0)
        self.addMany(1, "b.example", "B")
        self.clock.advance(0)
        self.answerAll()
        order = [c.data.split()[1].decode() for c in self.deliverer.calls]
        self.assertEqual(order[:2], ["A0", "B0"])
        self.assertEqual(len(self.events.ofType("delivered")), 4)

    def test_providerGroupsDomains(self):
        """Domains whose MX hosts belong to one provider share the provider's limit."""
        config = parseConfig(
            "[provider:bigmail]\nmx_suffixes = bigmail.test\nmax_connections = 2\n"
        )
        self.scheduler.policy = DestinationPolicy.fromConfig(config)
        self.router.table.update({"x.example": ["in1.bigmail.test"], "y.example": ["in1.bigmail.test"]})
        self.addMany(3, "x.example", "X")
        self.addMany(3, "y.example", "Y")
        self.clock.advance(0)
        self.assertEqual(len(self.deliverer.sessions), 2)
        self.assertEqual(
            [d["destination"] for d in self.scheduler.destinations()], ["provider:bigmail"]
        )
        self.answerAll()
        self.assertEqual(len(self.events.ofType("delivered")), 6)

    def test_tlsPolicyPerDomain(self):
        """Sessions are opened with the destination's TLS policy."""
        config = parseConfig("[domain:a.example]\ntls = required\n")
        self.scheduler.policy = DestinationPolicy.fromConfig(config)
        self.addMany(1, "a.example", "A")
        self.addMany(1, "b.example", "B")
        self.clock.advance(0)
        self.assertEqual(
            sorted(self.deliverer.opens),
            [("mx.a.example", "required"), ("mx.b.example", "opportunistic")],
        )


class ConnectFailureTests(PoolTestsMixin, SynchronousTestCase):
    """
    What happens when a session cannot be opened.
    """

    def test_deadDestinationFailsItsQueue(self):
        """
        When no session can be opened, the attempt is deferred at once and
        everything else queued for those hops is parked, without attempts,
        and deferred in one bulk record.
        """
        self.scheduler.policy = DestinationPolicy(defaults=Limits(maxConnections=1))
        self.deliverer.refuse["mx.a.example"] = Reply(451, "4.4.1", "cannot connect")
        self.addMany(4)
        self.clock.advance(0)
        self.assertEqual(len(self.deliverer.opens), 1)
        self.assertEqual(len(self.events.ofType("deferred")), 1)
        self.clock.advance(FLUSH_INTERVAL)
        self.assertEqual(len(self.deliverer.opens), 1)
        self.assertEqual(len(self.events.ofType("deferred")), 4)

    def test_oneOpeningWhileNoneOpen(self):
        """
        While no session to a destination is open, one at a time is
        opened; once it is, more are opened for what waits, up to the
        limit (3).
        """
        self.deliverer.hang = True
        self.addMany(4)
        self.clock.advance(0)
        self.assertEqual(len(self.deliverer.opening), 1)
        [(first, session1)] = self.deliverer.opening
        first.callback(self._opened(session1))
        self.assertEqual(len(self.deliverer.opening), 3)

    def test_refusedOnceWithManyWaiting(self):
        """
        A destination that refuses, with many messages waiting and a limit
        of many connections: one connection finds it out, and everything
        is parked.
        """
        self.deliverer.hang = True
        self.addMany(10)
        self.clock.advance(0)
        [(first, _)] = self.deliverer.opening
        from smartrelay.outbound.session import OpenResult

        first.callback(OpenResult(None, Reply(451, "4.4.1", "cannot connect")))
        self.assertEqual(len(self.deliverer.opens), 1)
        self.clock.advance(FLUSH_INTERVAL)
        self.assertEqual(len(self.deliverer.opens), 1)
        self.assertEqual(len(self.events.ofType("deferred")), 10)

    def test_turnedAwayWhileOthersWork(self):
        """A connection refused while other sessions work puts the job back in the queue."""
        self.deliverer.hang = True
        self.addMany(3)
        self.clock.advance(0)
        [(first, session1)] = self.deliverer.opening
        first.callback(self._opened(session1))
        _, (second, session2), (third, _) = self.deliverer.opening
        from smartrelay.outbound.session import OpenResult

        second.callback(OpenResult(None, Reply(421, "4.7.0", "too many connections")))
        self.assertEqual(self.events.ofType("deferred"), [])
        third.callback(OpenResult(None, Reply(421, "4.7.0", "too many connections")))
        self.answerAll()
        self.assertEqual(len(self.events.ofType("delivered")), 3)
        self.assertTrue(self.destination()["throttled"])

    def _opened(self, session):
        from smartrelay.outbound.session import OpenResult

        self.deliverer.sessions.append(session)
        return OpenResult(session)


class RateTests(PoolTestsMixin, SynchronousTestCase):
    """
    Rate limits come from the store's token buckets.
    """

    limits = Limits(maxConnections=5, rate=2.0, burst=2)

    def delivered(self):
        return len(self.events.ofType("delivered"))

    def test_rate(self):
        """With 2/s and a burst of 2, six messages take two seconds."""
        self.deliverer.auto = lambda call: __import__(
            "smartrelay.outbound.session", fromlist=["AttemptResult"]
        ).AttemptResult(call.hop.name, False, {a: Reply(250, None, "ok") for a in call.recipients})
        self.addMany(6)
        self.clock.advance(0)
        self.assertEqual(self.delivered(), 2)
        self.clock.advance(0.5)
        self.assertEqual(self.delivered(), 3)
        self.clock.advance(0.5)
        self.assertEqual(self.delivered(), 4)
        self.clock.advance(1)
        self.assertEqual(self.delivered(), 6)

    def test_sharedBucket(self):
        """Two schedulers (two nodes) sharing a store share the bucket."""
        auto = lambda call: __import__(
            "smartrelay.outbound.session", fromlist=["AttemptResult"]
        ).AttemptResult(call.hop.name, False, {a: Reply(250, None, "ok") for a in call.recipients})
        self.deliverer.auto = auto
        otherDeliverer = FakeDeliverer(auto=auto)
        otherEvents = RecordingEvents()
        other = self.makeScheduler(connector=otherDeliverer, events=otherEvents)
        other.startService()
        self.addMany(4)
        for i in range(4):
            entry = makeEntry(f"O{i}", [f"o{i}@a.example"], received=self.clock.seconds())
            self.spool.add(entry, b"message")
            other.enqueue(entry)
        self.clock.advance(0)
        self.assertEqual(self.delivered() + len(otherEvents.ofType("delivered")), 2)
        self.clock.advance(1)
        self.assertEqual(self.delivered() + len(otherEvents.ofType("delivered")), 4)

    def test_storeDownPacesLocally(self):
        """
        If the store cannot be reached, a node alone goes on at the
        configured rate (never unlimited) and says so once; when the store
        answers again the bucket is shared again.
        """
        store = self.store

        class DownStore:
            down = True

            def takeTokens(self, *args):
                if self.down:
                    return fail(ConnectionError("store down"))
                return store.takeTokens(*args)

        down = DownStore()
        self.rebuild(store=down)
        self.deliverer.auto = lambda call: __import__(
            "smartrelay.outbound.session", fromlist=["AttemptResult"]
        ).AttemptResult(call.hop.name, False, {a: Reply(250, None, "ok") for a in call.recipients})
        self.addMany(5)
        self.clock.advance(0)
        # This node's own bucket: the burst of 2 at once, then 2 a second.
        self.assertEqual(self.delivered(), 2)
        self.assertTrue(self.scheduler.ratesLocal)
        self.clock.advance(0.5)
        self.assertEqual(self.delivered(), 3)
        self.assertEqual(self.flushLoggedErrors(ConnectionError), [])
        down.down = False
        # The store's bucket again (full: its burst of 2).
        self.clock.advance(0.5)
        self.assertEqual(self.delivered(), 5)
        self.assertFalse(self.scheduler.ratesLocal)


class ThrottleTests(PoolTestsMixin, SynchronousTestCase):
    """
    421s and "slow down" replies halve a destination's budget for a while.
    """

    limits = Limits(maxConnections=8, rate=10.0, burst=10)

    def test_421Halves(self):
        """A 421 halves connections and rate, and the deferred event says so."""
        self.addMany(1)
        self.clock.advance(0)
        self.deliverer.pending()[0].answer(421, "too busy", "4.7.0")
        state = self.destination()
        self.assertEqual(
            (state["max_connections"], state["rate"], state["throttled"]), (4, 5.0, True)
        )
        ((_, _, _, detail),) = self.events.ofType("deferred")
        self.assertEqual(detail["throttle"]["destination"], "a.example")
        self.assertEqual(detail["throttle"]["max_connections"], 4)

    def test_patternMatch(self):
        """A 4xx whose text matches a throttle pattern throttles; another 4xx does not."""
        self.addMany(2)
        self.clock.advance(0)
        self.deliverer.pending()[0].answer(451, "greylisted", "4.7.1")
        self.assertFalse(self.destination()["throttled"])
        self.deliverer.pending()[0].answer(451, "You are being rate limited", "4.7.28")
        self.assertTrue(self.destination()["throttled"])

    def test_recovery(self):
        """After each quiet cool-down the budget doubles until it is whole again."""
        self.addMany(1)
        self.clock.advance(0)
        self.deliverer.pending()[0].answer(421, "slow down", "4.7.0")
        self.addMany(1, prefix="R")
        self.clock.advance(0)
        self.deliverer.pending()[0].answer(421, "slow down", "4.7.0")
        self.assertEqual(self.destination()["max_connections"], 2)
        self.clock.advance(600)
        self.assertEqual(self.destination()["max_connections"], 4)
        self.clock.advance(600)
        state = self.destination()
        self.assertEqual((state["max_connections"], state["throttled"]), (8, False))
        self.clock.advance(self.scheduler.idleTimeout)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_fewerSessionsWhenThrottled(self):
        """Sessions beyond the throttled limit close after their transaction."""
        self.addMany(8)
        self.clock.advance(0)
        self.assertEqual(len(self.deliverer.sessions), 8)
        self.deliverer.pending()[0].answer(421, "slow down", "4.7.0")
        for call in list(self.deliverer.pending()):
            call.answer(250, "ok")
        self.assertEqual(len(self.deliverer.connected()), 4)

    def test_floor(self):
        """A throttle never goes below one connection."""
        throttle = Throttle(self.clock, 60.0)
        destination = Destination("d", Limits(maxConnections=3), throttle)
        for _ in range(10):
            throttle.trigger("421")
        self.assertEqual(destination.maxConnections, 1)


class RetryTests(PoolTestsMixin, SynchronousTestCase):
    """
    Retry by domain, jitter and bounce kinds.
    """

    def test_retryDomain(self):
        """retryDomain attempts every waiting recipient at that domain now."""
        self.add("Q1", ["x@a.example", "y@b.example"])
        self.add("Q2", ["z@a.example"])
        self.clock.advance(0)
        self.answerAll(451, "later")
        count = len(self.deliverer.calls)
        self.assertEqual(self.scheduler.retryDomain("A.example"), 2)
        retried = [c.recipients for c in self.deliverer.calls[count:]]
        self.assertEqual(sorted(retried), [["x@a.example"], ["z@a.example"]])
        self.assertEqual(self.scheduler.retryDomain("nowhere.example"), 0)

    def test_jitter(self):
        """Retry delays are stretched by up to the jitter fraction."""
        scheduler = self.makeScheduler(jitter=0.5)
        scheduler.random.seed(1)
        self.scheduler.stopService()
        self.scheduler = scheduler
        scheduler.startService()
        entries = self.addMany(20)
        self.clock.advance(0)
        self.answerAll(451, "later")
        delays = [e.recipients[0].next_attempt - START for e in entries]
        self.assertTrue(all(60 <= d <= 90 for d in delays), delays)
        self.assertGreater(len(set(delays)), 10)

    def test_softBounce(self):
        """A 5xx for a full mailbox is a soft bounce; user unknown is hard."""
        self.add("Q1", ["full@a.example", "gone@a.example"])
        self.clock.advance(0)
        self.deliverer.pending()[0].answer(
            250,
            "ok",
            overrides={
                "full@a.example": Reply(552, "5.2.2", "mailbox full"),
                "gone@a.example": Reply(550, "5.1.1", "user unknown"),
            },
        )
        kinds = {e[2]: (e[3]["kind"], e[3]["reason"]) for e in self.events.ofType("bounced")}
        self.assertEqual(
            kinds,
            {"full@a.example": ("soft", "mailboxfull"), "gone@a.example": ("hard", "userunknown")},
        )


class StopTests(PoolTestsMixin, SynchronousTestCase):
    """
    Shutdown closes the pool.
    """

    def test_idleSessionsClosed(self):
        """stopService closes idle sessions at once."""
        self.addMany(2)
        self.clock.advance(0)
        self.answerAll()
        self.assertEqual(len(self.deliverer.connected()), 2)
        self.successResultOf(self.scheduler.stopService())
        self.assertEqual(self.deliverer.connected(), [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_busySessionFinishesThenCloses(self):
        """A session in a transaction finishes it, then closes; queued jobs stay in the spool."""
        self.scheduler.policy = DestinationPolicy(defaults=Limits(maxConnections=1))
        entries = self.addMany(3)
        self.clock.advance(0)
        d = self.scheduler.stopService()
        self.assertNoResult(d)
        self.deliverer.pending()[0].answer(250, "ok")
        self.successResultOf(d)
        self.assertEqual(self.deliverer.connected(), [])
        self.assertEqual([e.recipients[0].state for e in entries], ["delivered", "queued", "queued"])


class PolicyTests(SynchronousTestCase):
    """
    L{DestinationPolicy} picks destination keys and limits.
    """

    def policy(self, text):
        return DestinationPolicy.fromConfig(parseConfig(text))

    def hops(self, *names, relay=False):
        return [Hop(name, None, relay=relay) for name in names]

    def test_defaults(self):
        policy = self.policy(
            "[delivery]\nmax_connections_per_domain = 7\nmessages_per_connection = 9\ntls = verify\n"
        )
        key, limits = policy.lookup("Example.COM", self.hops("mx.example.com"))
        self.assertEqual(key, "example.com")
        self.assertEqual(
            (limits.maxConnections, limits.messagesPerConnection, limits.tls, limits.rate),
            (7, 9, "verify", None),
        )

    def test_domainOverrides(self):
        policy = self.policy(
            "[domain:example.com]\nrate = 120/m\nmax_connections = 2\n"
            "[provider:big]\nmx_suffixes = big.test\nmax_connections = 30\n"
        )
        key, limits = policy.lookup("example.com", self.hops("in.big.test"))
        self.assertEqual((key, limits.maxConnections, limits.rate, limits.burst), ("example.com", 2, 2.0, 2))

    def test_provider(self):
        policy = self.policy(
            "[provider:big]\nmx_suffixes = big.test\nmax_connections = 30\n"
            "[provider:bigger]\nmx_suffixes = eu.big.test\nmax_connections = 5\n"
        )
        self.assertEqual(policy.lookup("x.example", self.hops("in.big.test"))[0], "provider:big")
        self.assertEqual(policy.lookup("y.example", self.hops("mx1.eu.big.test"))[0], "provider:bigger")
        self.assertEqual(policy.lookup("z.example", self.hops("notbig.test"))[0], "z.example")

    def test_relay(self):
        policy = self.policy("")
        key, _ = policy.lookup("x.example", self.hops("smarthost:587", relay=True))
        self.assertEqual(key, "relay:smarthost:587")


class SuppressionTests(PoolTestsMixin, SynchronousTestCase):
    """
    Recipients on the suppression list are not delivered.
    """

    def makeScheduler(self, **kwargs):
        return super().makeScheduler(**dict(dict(suppress=True), **kwargs))

    def setUp(self):
        super().setUp()
        from smartrelay.store.interfaces import SuppressionEntry

        self.successResultOf(self.store.start())
        self.successResultOf(
            self.store.addSuppression(SuppressionEntry(address="gone@a.example", reason="bounce", time=START))
        )

    def test_suppressed(self):
        """A suppressed recipient gets a final 'suppressed' state and event; the others go on."""
        entry = self.add("Q1", ["gone@a.example", "ok@a.example"])
        self.clock.advance(0)
        self.answerAll()
        self.assertEqual(
            {r.address: r.state for r in entry.recipients},
            {"gone@a.example": "suppressed", "ok@a.example": "delivered"},
        )
        [event] = self.events.ofType("suppressed")
        self.assertEqual((event[2], event[3]), ("gone@a.example", {"reason": "bounce"}))
        self.assertEqual([c.recipients for c in self.deliverer.calls], [["ok@a.example"]])

    def test_everyoneSuppressed(self):
        """A message whose recipients are all suppressed is finished without any connection."""
        entry = self.add("Q1", ["gone@a.example"])
        self.clock.advance(0)
        self.assertTrue(entry.done)
        self.assertEqual(self.deliverer.opens, [])
        self.assertEqual(self.scheduler.queued(), 0)

    def test_storeDown(self):
        """
        If the list cannot be checked (and there is no local replica) the
        recipient is held, never delivered unchecked: deferred with a
        reason that says so, retried on the retry schedule.
        """

        class DownStore:
            def checkSuppressions(self, addresses, now):
                return fail(ConnectionError("store down"))

        self.rebuild(store=DownStore())
        entry = self.add("Q1", ["gone@a.example"])
        self.clock.advance(0)
        self.assertEqual(self.deliverer.opens, [])
        [deferred] = self.events.ofType("deferred")
        self.assertEqual(deferred[3]["code"], 451)
        self.assertIn("suppression list cannot be checked", deferred[3]["reply"])
        self.assertEqual(entry.recipients[0].next_attempt, START + 60)


class RewrapHookTests(PoolTestsMixin, SynchronousTestCase):
    """
    With a rewrapper, each recipient gets its own transaction with its own
    sender and message.
    """

    def test_perRecipient(self):
        """
        Each recipient is re-wrapped for the session that will send it (told
        what that server offers) and its message is sent as the re-wrap
        made it.
        """
        from twisted.internet.defer import succeed

        calls = []

        class Rewrapper:
            def rewrap(self, entry, index, data, offers):
                calls.append((entry.queue_id, index, offers))
                prepared = Prepared(data + b"#%d" % index)
                return succeed((f"bounce+{index}@b.example", prepared))

        self.rebuild(rewrapper=Rewrapper())
        self.add("Q1", ["x@a.example", "y@a.example"])
        self.clock.advance(0)
        self.answerAll()
        self.assertEqual(sorted(calls), [("Q1", 0, Offers()), ("Q1", 1, Offers())])
        sent = sorted((c.sender, c.recipients, c.data.data) for c in self.deliverer.calls)
        self.assertEqual(
            sent,
            [("bounce+0@b.example", ["x@a.example"], b"message Q1#0"),
             ("bounce+1@b.example", ["y@a.example"], b"message Q1#1")],
        )

    def test_offersOfTheSession(self):
        """The re-wrap is told what the session's server offers, 8BITMIME and SMTPUTF8."""
        from twisted.internet.defer import succeed

        offered = Offers(eightBitMIME=True, smtpUTF8=True)
        self.deliverer.offers = offered
        seen = []

        class Rewrapper:
            def rewrap(self, entry, index, data, offers):
                seen.append(offers)
                return succeed(("", Prepared(data, eightBitMIME=True)))

        self.rebuild(rewrapper=Rewrapper())
        self.add("Q1", ["x@a.example"])
        self.clock.advance(0)
        self.answerAll()
        self.assertEqual(seen, [offered])
        self.assertEqual(len(self.events.ofType("delivered")), 1)

    def test_rewrapFailure(self):
        """A re-wrap that fails (a bug) defers the recipient, logged, never lost."""

        class Broken:
            def rewrap(self, entry, index, data, offers):
                return fail(ZeroDivisionError())

        self.rebuild(rewrapper=Broken())
        entry = self.add("Q1", ["x@a.example"])
        self.clock.advance(0)
        self.assertEqual(entry.recipients[0].state, "deferred")
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        [(_, _, _, detail)] = self.events.ofType("deferred")
        self.assertEqual(
            (detail["code"], detail["status"], detail["reply"]),
            (451, "4.3.0", "local error: could not prepare the message"),
        )

    def test_signingFailureDeferred(self):
        """
        A re-wrap whose DKIM signing failed defers the recipient with a
        451 that names the failure; nothing is sent, and it is tried again
        on the retry schedule.
        """

        class Failing:
            def rewrap(self, entry, index, data, offers):
                return fail(SigningError("shop.example", "InternalError: hook not used"))

        self.rebuild(rewrapper=Failing())
        entry = self.add("Q1", ["x@a.example"])
        self.clock.advance(0)
        self.assertEqual(entry.recipients[0].state, "deferred")
        self.assertEqual(self.deliverer.calls, [])
        [(_, queueID, recipient, detail)] = self.events.ofType("deferred")
        self.assertEqual((queueID, recipient), ("Q1", "x@a.example"))
        self.assertEqual((detail["code"], detail["status"]), (451, "4.3.0"))
        self.assertEqual(
            detail["reply"],
            "local error: DKIM signing for shop.example failed "
            "(InternalError: hook not used); not sending it unsigned",
        )
        self.assertEqual(entry.recipients[0].next_attempt, START + 60)

    def inPlace(self):
        """
        Sessions that re-wrap in place (as those in worker processes do),
        and a rewrapper whose C{job} says what to make.
        """
        self.deliverer.rewrapsInPlace = True
        made = []

        class Request:
            def __init__(self, data, index, offers):
                self.data, self.index, self.offers = data, index, offers

        class Rewrapper:
            def job(self, entry, index, data, offers):
                made.append((entry.queue_id, index))
                return Request(data, index, offers)

            def rewrap(self, entry, index, data, offers):
                raise AssertionError("a session that re-wraps in place gets the job")

        self.rebuild(rewrapper=Rewrapper())
        return made

    def test_inPlace(self):
        """
        A session that re-wraps in place is given the re-wrap's request
        (made for its offers) and no sender (the request makes it), one
        transaction a recipient.
        """
        made = self.inPlace()
        self.add("Q1", ["x@a.example", "y@a.example"])
        self.clock.advance(0)
        self.assertEqual(sorted(made), [("Q1", 0), ("Q1", 1)])
        sent = sorted(
            (c.recipients, c.sender, c.data.data, c.data.index) for c in self.deliverer.calls
        )
        self.assertEqual(
            sent,
            [
                (["x@a.example"], None, b"message Q1", 0),
                (["y@a.example"], None, b"message Q1", 1),
            ],
        )
        self.answerAll()
        self.assertEqual(len(self.events.ofType("delivered")), 2)

    def test_inPlaceSigningError(self):
        """
        A signing error raised where the session re-wraps (the send fails
        with it) defers the recipient with the same 451 as a local one.
        """
        self.inPlace()
        entry = self.add("Q1", ["x@a.example"])
        self.clock.advance(0)
        [call] = self.deliverer.pending()
        call.d.errback(SigningError("shop.example", "InternalError: hook not used"))
        self.assertEqual(entry.recipients[0].state, "deferred")
        [(_, _, _, detail)] = self.events.ofType("deferred")
        self.assertEqual((detail["code"], detail["status"]), (451, "4.3.0"))
        self.assertIn("DKIM signing for shop.example failed", detail["reply"])

    def test_inPlaceWorkerError(self):
        """
        The re-wrap breaking in the worker (L{WorkerError}) defers the
        recipient with "could not prepare the message", logged.
        """
        from smartrelay.engine.workers import WorkerError

        self.inPlace()
        entry = self.add("Q1", ["x@a.example"])
        self.clock.advance(0)
        [call] = self.deliverer.pending()
        call.d.errback(WorkerError("ZeroDivisionError: division by zero"))
        self.assertEqual(entry.recipients[0].state, "deferred")
        [(_, _, _, detail)] = self.events.ofType("deferred")
        self.assertEqual(detail["reply"], "local error: could not prepare the message")
        self.assertEqual(len(self.flushLoggedErrors(WorkerError)), 1)
