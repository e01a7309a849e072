"""
Tests for L{smartrelay.outbound.scheduler.DeliveryScheduler} with a fake
clock, spool, router, deliverer and event log.
"""

from twisted.internet.defer import fail
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from smartrelay.events import rfc3339
from smartrelay.message import Recipient
from smartrelay.outbound.session import Reply
from smartrelay.outbound.router import NoRoute
from smartrelay.outbound.scheduler import DeliveryScheduler
from smartrelay.outbound.testing import (
    Delays,
    FakeDeliverer,
    FakeRouter,
    FakeSpool,
    RecordingEvents,
    makeEntry,
)

START = 1_700_000_000.0


class SchedulerTestsMixin:
    maxConnections = 2

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(START)
        self.journal = []
        self.spool = FakeSpool(journal=self.journal)
        self.events = RecordingEvents(journal=self.journal)
        self.router = FakeRouter()
        self.deliverer = FakeDeliverer()
        self.scheduler = self.makeScheduler()
        self.scheduler.startService()
        self.addCleanup(lambda: self.scheduler.running and self.scheduler.stopService())

    def schedulerOptions(self) -> dict:
        return dict(
            spool=self.spool,
            router=self.router,
            connector=self.deliverer,
            events=self.events,
            clock=self.clock,
            retry=Delays((60, 300, 900)),
            maxAge=3600.0,
            maxConnections=self.maxConnections,
        )

    def makeScheduler(self, **options):
        return DeliveryScheduler(**dict(self.schedulerOptions(), **options))

    def rebuild(self, **options):
        """
        Replace setUp's scheduler (nothing queued yet) by one made with
        C{options} too.
        """
        self.scheduler.stopService()
        self.scheduler = self.makeScheduler(**options)
        self.scheduler.startService()

    def add(self, queue_id, recipients, received=None, **kwargs):
        entry = makeEntry(
            queue_id,
            recipients,
            received=self.clock.seconds() if received is None else received,
            **kwargs,
        )
        self.spool.add(entry, b"message " + queue_id.encode())
        self.scheduler.enqueue(entry)
        return entry

    def call(self, index=-1):
        return self.deliverer.calls[index]

    def types(self):
        return [(e[0], e[2]) for e in self.events.emitted]

    def stateOf(self, entry):
        return {r.address: (r.state, r.attempts, r.next_attempt) for r in entry.recipients}


class OutcomeTests(SchedulerTestsMixin, SynchronousTestCase):
    """
    Replies become recorded states and events.
    """

    def test_notSynchronous(self):
        """enqueue does not attempt delivery inside the call; the next reactor turn does."""
        self.add("Q1", ["a@example.com"])
        self.assertEqual(self.deliverer.calls, [])
        self.clock.advance(0)
        call = self.call()
        self.assertEqual(
            (call.hop.name, call.sender, call.recipients, call.data, call.session.tlsPolicy),
            ("smarthost.test:25", "app@sender.example", ["a@example.com"], b"message Q1",
             "opportunistic"),
        )

    def test_delivered(self):
        """A 2xx reply records 'delivered' and emits a delivered event; the message leaves the queue."""
        entry = self.add("Q1", ["a@example.com"])
        self.clock.advance(0)
        self.call().answer(250, "queued as X", "2.0.0", tls=True)
        self.assertEqual(self.stateOf(entry)["a@example.com"][:2], ("delivered", 1))
        self.assertEqual(
            self.events.emitted,
            [("delivered", "Q1", "a@example.com",
              {"remote": "smarthost.test:25", "reply": "queued as X", "code": 250, "tls": True})],
        )
        self.assertEqual(self.scheduler.queued(), 0)
        self.assertEqual(self.spool.removed, ["Q1"])
        # The session stays open for more mail until the idle timeout.
        self.assertEqual(self.deliverer.connected(), [self.call().session])
        self.clock.advance(self.scheduler.idleTimeout)
        self.assertEqual(self.deliverer.quits, [self.call().session])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_bounced(self):
        """A 5xx reply is a hard bounce with a classified reason, the reply as diagnostic and source smtp."""
        entry = self.add("Q1", ["a@example.com"])
        self.clock.advance(0)
        self.call().answer(550, "<a@example.com>: user unknown", "5.1.1")
        self.assertEqual(self.stateOf(entry)["a@example.com"][0], "bounced")
        self.assertEqual(
            self.events.emitted,
            [("bounced", "Q1", "a@example.com", {
                "kind": "hard",
                "reason": "userunknown",
                "status": "5.1.1",
                "diagnostic": "550 5.1.1 <a@example.com>: user unknown",
                "remote": "smarthost.test:25",
                "source": "smtp",
            })],
        )

    def test_bounceReadsRefusedCommand(self):
        """A bare "user unknown" is a hard userunknown at RCPT, a soft filtered after DATA."""
        for command, expected in [("RCPT", ("hard", "userunknown")), ("DATA", ("soft", "filtered"))]:
            self.events.emitted.clear()
            entry = self.add(f"Q-{command}", ["a@example.com"])
            self.clock.advance(0)
            reply = Reply(550, None, "<a@example.com>: User unknown", command=command)
            self.deliverer.pending()[0].answer(550, overrides={"a@example.com": reply})
            self.assertEqual(self.stateOf(entry)["a@example.com"][0], "bounced")
            (event,) = [e for e in self.events.emitted if e[0] == "bounced"]
            self.assertEqual((event[3]["kind"], event[3]["reason"]), expected)

    def test_bounceHandedToSuppressor(self):
        """
        Every bounced event (and no other) goes to C{bounces}, which puts
        hard ones on the suppression list; its failure is logged as a
        warning, never lost in the scheduler.
        """
        told = []

        class Bounces:
            def bounced(self, event):
                told.append(event)
                return fail(ConnectionError("store down"))

        self.rebuild(bounces=Bounces())
        self.add("Q1", ["a@example.com"])
        self.add("Q2", ["b@example.com"])
        self.clock.advance(0)
        self.call(0).answer(550, "<a@example.com>: user unknown", "5.1.1")
        self.call(1).answer(250, "ok")
        self.assertEqual(
            [(e.type, e.queue_id, e.recipient, e.detail["kind"]) for e in told],
            [("bounced", "Q1", "a@example.com", "hard")],
        )
        self.assertEqual(self.flushLoggedErrors(ConnectionError), [])

    def test_bouncedWithoutStatus(self):
        """A 5xx without an enhanced status gets status 5.0.0 and the undecided reason."""
        self.add("Q1", ["a@example.com"])
        self.clock.advance(0)
        self.call().answer(554, "no")
        detail = self.events.emitted[0][3]
        self.assertEqual(
            (detail["status"], detail["reason"], detail["kind"]), ("5.0.0", "onhold", "soft")
        )

    def test_deferred(self):
        """A 4xx reply defers the recipient with attempts+1 and the next attempt from the schedule."""
        entry = self.add("Q1", ["a@example.com"])
        self.clock.advance(0)
        self.call().answer(451, "greylisted", "4.7.1")
        self.assertEqual(
            self.stateOf(entry)["a@example.com"], ("deferred", 1, START + 60)
        )
        self.assertEqual(
            self.events.emitted,
            [("deferred", "Q1", "a@example.com", {
                "reply": "greylisted",
                "code": 451,
                "status": "4.7.1",
                "remote": "smarthost.test:25",
                "next_attempt": rfc3339(START + 60),
                "attempts": 1,
            })],
        )
        self.assertEqual(self.scheduler.queued(), 1)

    def test_mixedOutcomes(self):
        """One attempt can deliver, bounce and defer different recipients of one message."""
        entry = self.add("Q1", ["ok@example.com", "bad@example.com", "later@example.com"])
        self.clock.advance(0)
        self.assertEqual(len(self.deliverer.calls), 1)
        self.call().answer(
            250, "ok", "2.0.0",
            overrides={
                "bad@example.com": Reply(550, "5.1.1", "no such user"),
                "later@example.com": Reply(452, "4.2.2", "mailbox full"),
            },
        )
        self.assertEqual(
            sorted(self.types()),
            [("bounced", "bad@example.com"), ("deferred", "later@example.com"),
             ("delivered", "ok@example.com")],
        )
        self.assertEqual(
            [r.state for r in entry.recipients], ["delivered", "bounced", "deferred"]
        )
        self.clock.advance(60)
        self.assertEqual(self.call().recipients, ["later@example.com"])

    def test_networkFailureDeferred(self):
        """A synthetic network reply (451 4.4.1) defers like any 4xx."""
        self.add("Q1", ["a@example.com"])
        self.clock.advance(0)
        self.call().answer(451, "connection lost", "4.4.2")
        self.assertEqual(self.types(), [("deferred", "a@example.com")])

    def test_connectFailureDeferred(self):
        """A hop that cannot be connected to defers its recipients with its reply."""
        self.deliverer.refuse["smarthost.test:25"] = Reply(451, "4.4.1", "cannot connect")
        self.add("Q1", ["a@example.com"])
        self.clock.advance(0)
        self.assertEqual(self.deliverer.calls, [])
        ((kind, _, _, detail),) = self.events.emitted
        self.assertEqual(
            (kind, detail["status"], detail["remote"]), ("deferred", "4.4.1", "smarthost.test:25")
        )

    def test_delivererFailure(self):
        """A deliverer that fails (a bug) defers the recipients and logs the error."""
        self.add("Q1", ["a@example.com"])
        self.deliverer.auto = lambda call: 1 / 0
        self.clock.advance(0)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        ((kind, _, _, detail),) = self.events.emitted
        self.assertEqual((kind, detail["code"], detail["status"]), ("deferred", 451, "4.3.0"))

    def test_unreadableMessage(self):
        """A message that cannot be read from the spool is deferred, not lost."""
        entry = self.add("Q1", ["a@example.com"])
        del self.spool.messages["Q1"]
        self.clock.advance(0)
        self.assertEqual(len(self.flushLoggedErrors(FileNotFoundError)), 1)
        self.assertEqual(self.deliverer.calls, [])
        self.assertEqual(entry.recipients[0].state, "deferred")


class RoutingTests(SchedulerTestsMixin, SynchronousTestCase):
    """
    Recipients are grouped by route; unroutable recipients are settled.
    """

    def test_smarthostOneAttempt(self):
        """With one hop for every domain, all recipients of a message share one attempt."""
        self.add("Q1", ["a@x.example", "b@y.example", "c@x.example"])
        self.clock.advance(0)
        self.assertEqual(len(self.deliverer.calls), 1)
        self.assertEqual(
            sorted(self.call().recipients), ["a@x.example", "b@y.example", "c@x.example"]
        )

    def test_groupByHops(self):
        """Recipients at different domains (destinations) get separate attempts."""
        self.rebuild(maxConnections=3)
        self.router.table = {"x.example": ["mx.x"], "y.example": ["mx.y"], "z.example": ["mx.x"]}
        self.add("Q1", ["a@x.example", "b@y.example", "c@x.example", "d@z.example"])
        self.clock.advance(0)
        groups = sorted((c.hop.name, sorted(c.recipients)) for c in self.deliverer.calls)
        self.assertEqual(
            groups,
            [("mx.x", ["a@x.example", "c@x.example"]), ("mx.x", ["d@z.example"]),
             ("mx.y", ["b@y.example"])],
        )

    def test_recipientLimit(self):
        """At most maxRecipientsPerAttempt recipients go in one attempt."""
        self.scheduler.maxRecipientsPerAttempt = 3
        self.add("Q1", [f"r{i}@example.com" for i in range(5)])
        self.clock.advance(0)
        self.assertEqual([len(c.recipients) for c in self.deliverer.calls], [3, 2])

    def test_nextHop(self):
        """When a hop cannot be reached the next hop is tried with the same recipients."""
        self.router.table = {"example.com": ["mx1", "mx2"]}
        self.deliverer.refuse["mx1"] = Reply(451, "4.4.1", "refused")
        entry = self.add("Q1", ["a@example.com"])
        self.clock.advance(0)
        self.assertEqual([name for name, _ in self.deliverer.opens], ["mx1", "mx2"])
        self.assertEqual(self.call().hop.name, "mx2")
        self.call().answer(250, "ok", "2.0.0")
        self.assertEqual(entry.recipients[0].state, "delivered")
        self.assertEqual(self.events.emitted[0][3]["remote"], "mx2")

    def test_lastHopReplyCounts(self):
        """When every hop fails, the last hop's reply decides."""
        self.router.table = {"example.com": ["mx1", "mx2"]}
        self.deliverer.refuse["mx1"] = Reply(451, "4.4.1", "refused")
        self.deliverer.refuse["mx2"] = Reply(421, "4.3.2", "busy")
        self.add("Q1", ["a@example.com"])
        self.clock.advance(0)
        self.assertEqual(len(self.deliverer.opens), 2)
        detail = self.events.emitted[0][3]
        self.assertEqual((detail["remote"], detail["code"]), ("mx2", 421))

    def test_noNextHopAfterTransaction(self):
        """A reply inside the mail transaction is final for this attempt: no next hop."""
        self.router.table = {"example.com": ["mx1", "mx2"]}
        self.add("Q1", ["a@example.com"])
        self.clock.advance(0)
        self.call().answer(451, "try later", "4.3.0")
        self.assertEqual(len(self.deliverer.calls), 1)

    def test_noRoutePermanent(self):
        """A permanent NoRoute bounces with its reason, without any connection."""
        self.router.table = {
            "null.example": NoRoute("null.example does not accept mail", permanent=True,
                                    reason="hostunknown", status="5.1.10")
        }
        entry = self.add("Q1", ["a@null.example", "b@ok.example"])
        self.clock.advance(0)
        self.assertEqual([c.recipients for c in self.deliverer.calls], [["b@ok.example"]])
        ((kind, _, recipient, detail),) = self.events.emitted
        self.assertEqual((kind, recipient), ("bounced", "a@null.example"))
        self.assertEqual(
            detail,
            {"kind": "hard", "reason": "hostunknown", "status": "5.1.10",
             "diagnostic": "550 5.1.10 null.example does not accept mail", "remote": None,
             "source": "smtp"},
        )
        self.assertEqual(entry.recipients[0].state, "bounced")

    def test_noRouteTemporary(self):
        """A temporary NoRoute defers."""
        self.router.table = {"slow.example": NoRoute("SERVFAIL", permanent=False)}
        self.add("Q1", ["a@slow.example"])
        self.clock.advance(0)
        ((kind, _, _, detail),) = self.events.emitted
        self.assertEqual((kind, detail["status"]), ("deferred", "4.4.3"))


class TimingTests(SchedulerTestsMixin, SynchronousTestCase):
    """
    Retries follow the schedule; old messages expire; recovered entries wait.
    """

    def test_retrySchedule(self):
        """Each temporary failure waits the next delay of the schedule; the last delay repeats."""
        self.add("Q1", ["a@example.com"])
        self.clock.advance(0)
        delays = []
        for expected in (60, 300, 900, 900):
            before = self.clock.seconds()
            self.call().answer(451, "later", "4.0.0")
            count = len(self.deliverer.calls)
            self.clock.advance(expected - 1)
            self.assertEqual(len(self.deliverer.calls), count)
            self.clock.advance(1)
            self.assertEqual(len(self.deliverer.calls), count + 1)
            delays.append(self.clock.seconds() - before)
        self.assertEqual(delays, [60, 300, 900, 900])
        attempts = [e[3]["attempts"] for e in self.events.emitted]
        self.assertEqual(attempts, [1, 2, 3, 4])

    def test_expiry(self):
        """A recipient whose next attempt would be past maxAge expires instead (final, no more timers)."""
        entry = self.add("Q1", ["a@example.com"])
        self.clock.advance(0)
        while not self.events.ofType("expired"):
            self.call().answer(451, "still greylisted", "4.7.1")
            self.clock.advance(max(0, entry.recipients[0].next_attempt - self.clock.seconds()))
        # attempts at +0, +60, +360, +1260, +2160, +3060; the next (+3960) is too late
        self.assertEqual(len(self.deliverer.calls), 6)
        ((kind, _, _, detail),) = self.events.ofType("expired")
        self.assertEqual(detail["reason"], "expired")
        self.assertEqual(detail["attempts"], 6)
        self.assertEqual(detail["diagnostic"], "451 4.7.1 still greylisted")
        self.assertEqual(entry.recipients[0].state, "expired")
        self.assertEqual(self.scheduler.queued(), 0)
        self.clock.advance(self.scheduler.idleTimeout)  # the idle session closes
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_recoveredFutureAttempt(self):
        """A recovered entry whose next attempt is in the future waits for it."""
        entry = makeEntry("Q1", ["a@example.com"], received=START - 100)
        entry.recipients[0] = Recipient("a@example.com", "deferred", 2, START + 500)
        self.spool.add(entry)
        self.scheduler.enqueue(entry)
        self.clock.advance(499)
        self.assertEqual(self.deliverer.calls, [])
        self.clock.advance(1)
        self.assertEqual(len(self.deliverer.calls), 1)
        self.call().answer(451, "later", "4.0.0")
        self.assertEqual(entry.recipients[0].attempts, 3)
        self.assertEqual(entry.recipients[0].next_attempt, START + 500 + 900)

    def test_recoveredPartlyDone(self):
        """Only the non-final recipients of a recovered entry are attempted."""
        entry = makeEntry("Q1", ["a@example.com", "b@example.com"], received=START)
        entry.recipients[0] = Recipient("a@example.com", "delivered", 1, 0)
        self.spool.add(entry)
        self.scheduler.enqueue(entry)
        self.clock.advance(0)
        self.assertEqual(self.call().recipients, ["b@example.com"])

    def test_enqueueBeforeStart(self):
        """Entries enqueued before the service starts are scheduled when it starts."""
        self.scheduler.stopService()
        self.add("Q1", ["a@example.com"])
        self.clock.advance(10)
        self.assertEqual(self.deliverer.calls, [])
        self.scheduler.startService()
        self.clock.advance(0)
        self.assertEqual(len(self.deliverer.calls), 1)

    def test_enqueueTwice(self):
        """Enqueueing the same message twice does not attempt it twice."""
        entry = self.add("Q1", ["a@example.com"])
        self.scheduler.enqueue(entry)
        self.clock.advance(0)
        self.scheduler.enqueue(entry)
        self.clock.advance(0)
        self.assertEqual(len(self.deliverer.calls), 1)

    def test_retryNow(self):
        """retryNow attempts a deferred recipient at once; it is False for unknown or busy messages."""
        self.add("Q1", ["a@example.com"])
        self.clock.advance(0)
        self.assertFalse(self.scheduler.retryNow("Q1"))  # in flight
        self.call().answer(451, "later", "4.0.0")
        self.assertTrue(self.scheduler.retryNow("Q1"))
        self.assertEqual(len(self.deliverer.calls), 2)
        self.assertFalse(self.scheduler.retryNow("nope"))
        self.call().answer(250, "ok")
        self.assertFalse(self.scheduler.retryNow("Q1"))  # done
        self.clock.advance(self.scheduler.idleTimeout)  # the idle session closes
        self.assertEqual(self.clock.getDelayedCalls(), [])


class ConcurrencyTests(SchedulerTestsMixin, SynchronousTestCase):
    """
    At most maxConnections attempts run; waiting attempts are served in order.
    """

    def test_limit(self):
        """No more than maxConnections attempts are in flight; a finished one lets the next start."""
        for i in range(5):
            self.add(f"Q{i}", ["a@example.com"])
        self.clock.advance(0)
        self.assertEqual(len(self.deliverer.pending()), 2)
        self.call(0).answer(250, "ok")
        self.assertEqual(len(self.deliverer.pending()), 2)
        self.assertEqual(len(self.deliverer.calls), 3)
        for call in list(self.deliverer.pending()):
            call.answer(250, "ok")
        self.assertEqual(len(self.deliverer.pending()), 2)
        for call in list(self.deliverer.pending()):
            call.answer(250, "ok")
        self.assertEqual(
            [c.data for c in self.deliverer.calls], [b"message Q%d" % i for i in range(5)]
        )
        self.assertEqual(self.scheduler.queued(), 0)

    def test_retriesNotStarved(self):
        """A retry that comes due waits behind earlier work only, not behind mail that arrives later."""
        self.rebuild(maxConnections=1)
        self.add("A", ["a@example.com"])
        self.clock.advance(0)
        self.call().answer(451, "later", "4.0.0")  # A due again at +60
        self.add("B0", ["b@example.com"])
        self.clock.advance(0)  # B0 in flight, holding the only connection
        self.clock.advance(30)
        for i in range(1, 4):
            self.add(f"B{i}", ["b@example.com"])
        self.clock.advance(30)  # A comes due: behind B1..B3
        for i in range(4):
            self.add(f"C{i}", ["c@example.com"])
        self.clock.advance(0)
        while self.deliverer.pending():
            self.deliverer.pending()[0].answer(250, "ok")
        order = [c.data.split()[1].decode() for c in self.deliverer.calls]
        self.assertEqual(order, ["A", "B0", "B1", "B2", "B3", "A", "C0", "C1", "C2", "C3"])


class RecordTests(SchedulerTestsMixin, SynchronousTestCase):
    """
    State changes are durable before they are reported.
    """

    def test_recordBeforeEmit(self):
        """Events are emitted only after spool.record has fired."""
        self.spool.hold = True
        self.add("Q1", ["a@example.com", "b@example.com"])
        self.clock.advance(0)
        self.call().answer(250, "ok", overrides={"b@example.com": Reply(451, "4.0.0", "later")})
        self.assertEqual(self.events.emitted, [])
        self.spool.releaseRecord()
        self.assertEqual(
            self.journal,
            [
                ("record", "Q1", "a@example.com", "delivered"),
                ("record", "Q1", "b@example.com", "deferred"),
                ("emit", "Q1", "a@example.com", "delivered"),
                ("emit", "Q1", "b@example.com", "deferred"),
            ],
        )

    def test_recordFailureRetried(self):
        """A failed record is logged and retried later; the event follows the successful record, the recipient is not re-attempted meanwhile."""
        self.spool.failRecords = 2
        entry = self.add("Q1", ["a@example.com"])
        self.clock.advance(0)
        self.call().answer(250, "ok")
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.assertEqual(self.events.emitted, [])
        self.assertEqual(entry.recipients[0].state, "queued")
        self.assertFalse(self.scheduler.retryNow("Q1"))
        self.clock.advance(10)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.assertEqual(self.events.emitted, [])
        self.clock.advance(20)
        self.assertEqual(self.types(), [("delivered", "a@example.com")])
        self.assertEqual(entry.recipients[0].state, "delivered")
        self.assertEqual(len(self.deliverer.calls), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class StopTests(SchedulerTestsMixin, SynchronousTestCase):
    """
    stopService lets attempts in flight finish, within a bound.
    """

    maxConnections = 1

    def test_waitsForInFlight(self):
        """stopService waits for the attempt in flight, records it, and starts nothing new."""
        self.add("Q1", ["a@example.com"])
        later = self.add("Q2", ["b@example.com"])
        self.clock.advance(0)
        d = self.scheduler.stopService()
        self.assertNoResult(d)
        self.call().answer(250, "ok")
        self.successResultOf(d)
        self.assertEqual(self.types(), [("delivered", "a@example.com")])
        self.assertEqual(len(self.deliverer.calls), 1)
        self.assertEqual(later.recipients[0].state, "queued")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_waitsForRecordAfterAttempt(self):
        """
        stopService also waits for the spool record (and so the event) of
        an attempt that finishes while it waits: the record starts only
        when the reply arrives, after the stop began.
        """
        self.spool.hold = True
        self.add("Q1", ["a@example.com"])
        self.clock.advance(0)
        d = self.scheduler.stopService()
        self.call().answer(250, "ok")
        self.assertEqual(len(self.spool.held), 1)
        self.assertNoResult(d)
        self.assertEqual(self.types(), [])
        self.spool.releaseRecord()
        self.successResultOf(d)
        self.assertEqual(self.types(), [("delivered", "a@example.com")])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_cancelsTimers(self):
        """stopService with nothing in flight returns at once and leaves no timers."""
        self.add("Q1", ["a@example.com"], next_attempt=START + 100)
        self.successResultOf(self.scheduler.stopService())
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(200)
        self.assertEqual(self.deliverer.calls, [])

    def test_timeout(self):
        """After shutdownTimeout, attempts still in flight are cancelled and left in the spool."""
        entry = self.add("Q1", ["a@example.com"])
        self.clock.advance(0)
        d = self.scheduler.stopService()
        self.clock.advance(29)
        self.assertNoResult(d)
        self.clock.advance(1)
        self.successResultOf(d)
        self.assertEqual(self.deliverer.cancelled, [self.call()])
        self.assertFalse(self.call().session.connected)
        self.assertEqual(self.spool.records, [])
        self.assertEqual(self.events.emitted, [])
        self.assertEqual(entry.recipients[0].state, "queued")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_recordRetriedAtStop(self):
        """A record waiting to be retried is retried at once when stopping."""
        self.spool.failRecords = 1
        entry = self.add("Q1", ["a@example.com"])
        self.clock.advance(0)
        self.call().answer(250, "ok")
        self.flushLoggedErrors(OSError)
        d = self.scheduler.stopService()
        self.clock.advance(0)
        self.successResultOf(d)
        self.assertEqual(entry.recipients[0].state, "delivered")
        self.assertEqual(self.types(), [("delivered", "a@example.com")])


class HoldTests(SchedulerTestsMixin, SynchronousTestCase):
    """
    [delivery] hold: accept and queue, deliver nothing until released.
    """

    def setUp(self):
        SchedulerTestsMixin.setUp(self)
        self.scheduler.stopService()
        self.scheduler.hold = True
        self.scheduler.startService()

    def test_nothingAttempted(self):
        """While on hold, queued messages are not attempted, however long we wait."""
        self.add("Q1", ["a@example.com"])
        self.clock.advance(3000)
        self.assertEqual(self.deliverer.calls, [])
        self.assertEqual(self.scheduler.queued(), 1)

    def test_release(self):
        """Releasing the hold schedules everything that was queued."""
        self.add("Q1", ["a@example.com"])
        self.add("Q2", ["b@example.com"])
        self.scheduler.release()
        self.clock.advance(0)
        self.assertEqual(len(self.deliverer.calls), 2)

    def test_retryNowStillWorks(self):
        """An explicit retry delivers one message even while on hold."""
        self.add("Q1", ["a@example.com"])
        self.assertTrue(self.scheduler.retryNow("Q1"))
        self.clock.advance(0)
        self.assertEqual(len(self.deliverer.calls), 1)


class QueueControlTests(SchedulerTestsMixin, SynchronousTestCase):
    """
    What the HTTP API reads and does to the queue: the queued messages,
    who is being attempted, the last deferral, and deleting a message.
    """

    def test_queuedMessages(self):
        """queuedMessages lists what is still to deliver, oldest first; finished mail leaves it."""
        self.add("Q2", ["b@example.com"], received=START + 5)
        first = self.add("Q1", ["a@example.com"], received=START)
        self.assertEqual([e.queue_id for e in self.scheduler.queuedMessages()], ["Q1", "Q2"])
        self.assertIs(self.scheduler.queuedMessage("Q1"), first)
        self.assertIsNone(self.scheduler.queuedMessage("Q9"))
        self.clock.advance(0)
        self.assertEqual(self.scheduler.attempting("Q1"), {"a@example.com"})
        [call] = [c for c in self.deliverer.calls if c.recipients == ["a@example.com"]]
        call.answer(250, "ok", "2.0.0")
        self.assertEqual([e.queue_id for e in self.scheduler.queuedMessages()], ["Q2"])
        self.assertEqual(self.scheduler.attempting("Q1"), set())

    def test_lastDeferral(self):
        """The detail of a recipient's last deferred event is kept while it waits, and dropped once final."""
        self.add("Q1", ["a@example.com"])
        self.clock.advance(0)
        self.call().answer(451, "greylisted", "4.7.1")
        deferral = self.scheduler.lastDeferral("Q1", "a@example.com")
        self.assertEqual((deferral["code"], deferral["reply"]), (451, "greylisted"))
        self.assertEqual(self.scheduler.attempting("Q1"), set())
        self.assertTrue(self.scheduler.retryNow("Q1"))
        self.clock.advance(0)
        self.call().answer(250, "ok", "2.0.0")
        self.assertIsNone(self.scheduler.lastDeferral("Q1", "a@example.com"))

    def test_delete(self):
        """
        Deleting a deferred message records every waiting recipient as
        expired (reason deleted) in the spool before its event, and it is
        never attempted again.
        """
        entry = self.add("Q1", ["a@example.com", "b@example.com"])
        self.clock.advance(0)
        self.call().answer(451, "try later", "4.7.1")
        calls = len(self.deliverer.calls)
        d = self.scheduler.delete("Q1")
        self.assertEqual(sorted(self.successResultOf(d)), ["a@example.com", "b@example.com"])
        self.assertEqual({r.state for r in entry.recipients}, {"expired"})
        expired = self.events.ofType("expired")
        self.assertEqual(len(expired), 2)
        self.assertEqual(expired[0][3]["reason"], "deleted")
        self.assertEqual(expired[0][3]["attempts"], 1)
        self.assertLess(
            self.journal.index(("record", "Q1", "a@example.com", "expired")),
            self.journal.index(("emit", "Q1", "a@example.com", "expired")),
        )
        self.assertEqual(self.scheduler.queuedMessages(), [])
        self.assertEqual(self.spool.removed, ["Q1"])
        self.clock.advance(86400)
        self.assertEqual(len(self.deliverer.calls), calls)
        self.assertFalse(self.scheduler.retryNow("Q1"))

    def test_deleteUnknown(self):
        """Deleting a message that is not queued raises KeyError and changes nothing."""
        self.assertRaises(KeyError, self.scheduler.delete, "Q9")
        self.assertEqual(self.events.emitted, [])

    def test_deleteInFlight(self):
        """A message in a transaction cannot be deleted: DeliveryInProgress names its recipients."""
        from smartrelay.outbound.scheduler import DeliveryInProgress

        self.add("Q1", ["a@example.com"])
        self.clock.advance(0)
        error = self.assertRaises(DeliveryInProgress, self.scheduler.delete, "Q1")
        self.assertEqual(error.recipients, ["a@example.com"])
        self.assertIn("a@example.com", str(error))
        self.call().answer(250, "ok", "2.0.0")
        self.assertEqual(self.events.ofType("expired"), [])

    def test_deleteWaitingJob(self):
        """A job waiting for a free session is taken back: the message is deleted and never sent."""
        self.add("Q1", ["a@example.com"])
        self.add("Q2", ["b@example.com"])
        self.add("Q3", ["c@example.com"])
        self.clock.advance(0)
        self.assertEqual(len(self.deliverer.calls), 2)
        self.assertEqual(self.scheduler.attempting("Q3"), {"c@example.com"})
        self.assertEqual(self.successResultOf(self.scheduler.delete("Q3")), ["c@example.com"])
        self.call(0).answer(250, "ok", "2.0.0")
        self.call(1).answer(250, "ok", "2.0.0")
        self.clock.advance(0)
        sent = [r for call in self.deliverer.calls for r in call.recipients]
        self.assertNotIn("c@example.com", sent)
        self.assertEqual([e[2] for e in self.events.ofType("expired")], ["c@example.com"])
