"""
Tests for L{smartrelay.outbound.parking}: a destination that cannot be
connected to is suspended, and what is queued for it is parked until its
next retry, through L{DeliveryScheduler} with a fake clock, spool, router,
connector and event log.
"""

import os

from twisted.internet.defer import maybeDeferred
from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase

from smartrelay.events import rfc3339
from smartrelay.logs import MessageLog
from smartrelay.outbound.parking import CHUNK, FLUSH_INTERVAL, PROBE_TIMEOUT
from smartrelay.outbound.router import NoRoute
from smartrelay.outbound.scheduler import DeliveryScheduler
from smartrelay.outbound.session import AttemptResult, OpenResult, Reply
from smartrelay.outbound.testing import (
    Delays,
    FakeDeliverer,
    FakeRouter,
    FakeSpool,
    RecordingEvents,
    makeEntry,
)
from smartrelay.spool import Spool

START = 1_700_000_000.0
SMARTHOST = "smarthost.test:25"
DESTINATION = "relay:" + SMARTHOST
REFUSED = Reply(451, "4.4.1", "cannot connect to smarthost.test:25: Connection refused")


def synchronous(f, *args, **kwargs):
    """
    The spool's C{runInThread}, run at once on this thread.
    """
    return maybeDeferred(f, *args, **kwargs)


class ParkingTestsMixin:
    maxConnections = 2
    maxAge = 3600.0

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(START)
        self.spool = self.makeSpool()
        self.events = RecordingEvents()
        self.router = FakeRouter(table={"other.example": ["mx.other.example"]})
        self.deliverer = FakeDeliverer()
        self.deliverer.refuse[SMARTHOST] = REFUSED
        self.scheduler = self.makeScheduler()
        self.scheduler.startService()

    def makeSpool(self):
        return FakeSpool()

    def storeMessage(self, entry, data):
        self.spool.add(entry, data)

    def makeScheduler(self, **options):
        scheduler = DeliveryScheduler(
            spool=self.spool,
            router=self.router,
            connector=self.deliverer,
            events=self.events,
            clock=self.clock,
            retry=Delays((60, 300, 900)),
            maxAge=self.maxAge,
            maxConnections=self.maxConnections,
            **options,
        )
        self.addCleanup(lambda: scheduler.running and scheduler.stopService())
        return scheduler

    def add(self, queue_id, recipients=("a@example.com",), received=None):
        entry = makeEntry(
            queue_id,
            list(recipients),
            received=self.clock.seconds() if received is None else received,
        )
        self.storeMessage(entry, b"message " + queue_id.encode())
        self.scheduler.enqueue(entry)
        return entry

    def addMany(self, count, prefix="P", domain="example.com"):
        return [self.add(f"{prefix}{n}", [f"r{n}@{domain}"]) for n in range(count)]

    def opens(self):
        return [name for name, _ in self.deliverer.opens if name == SMARTHOST]

    def deferrals(self):
        return [e for e in self.events.ofType("deferred") if e[3].get("suspended")]

    def suspendWithOne(self):
        """
        One message is attempted and refused: the smarthost is suspended
        for the first retry delay (60s).
        """
        self.add("FIRST")
        self.clock.advance(0)
        self.assertEqual(len(self.opens()), 1)
        destination = self.destination()
        self.assertEqual(destination["suspended_until"], START + 60)


class ParkingTests(ParkingTestsMixin, SynchronousTestCase):
    """
    Mail for a suspended destination waits without attempts.
    """

    def destination(self, key=DESTINATION):
        (state,) = [d for d in self.scheduler.destinations() if d["destination"] == key]
        return state

    def test_oneAttemptPerRetry(self):
        """Many messages to a refusing smarthost cause one connection attempt per retry, not one per message."""
        self.suspendWithOne()
        self.addMany(50)
        self.clock.advance(0)
        self.clock.advance(FLUSH_INTERVAL)
        self.assertEqual(len(self.opens()), 1)
        self.assertEqual(self.destination()["parked"], 50)
        # The retry: one probe connection, refused again.
        self.clock.advance(60 - FLUSH_INTERVAL)
        self.assertEqual(len(self.opens()), 2)
        self.assertEqual(self.destination()["suspended_until"], START + 60 + 300)
        self.clock.advance(299)
        self.assertEqual(len(self.opens()), 2)
        self.clock.advance(1)
        self.assertEqual(len(self.opens()), 3)

    def test_noTimerPerMessage(self):
        """Parked messages hold no timer of their own: the delayed calls do not grow with the queue."""
        self.suspendWithOne()
        self.clock.advance(FLUSH_INTERVAL)
        before = len(self.clock.getDelayedCalls())
        self.addMany(200)
        self.clock.advance(FLUSH_INTERVAL)
        self.assertEqual(len(self.clock.getDelayedCalls()), before)
        self.assertEqual(self.router.routed, ["example.com"])

    def test_deferredInBulk(self):
        """Parked recipients are recorded and deferred together once per interval, with the connection failure and the retry time."""
        self.suspendWithOne()
        records = len(self.spool.records)
        entries = self.addMany(30)
        self.clock.advance(FLUSH_INTERVAL / 2)
        self.assertEqual((len(self.spool.records), self.deferrals()), (records, []))
        self.clock.advance(FLUSH_INTERVAL / 2)
        self.assertEqual(len(self.spool.records), records + 30)
        deferrals = self.deferrals()
        self.assertEqual([e[1] for e in deferrals], [e.queue_id for e in entries])
        detail = deferrals[0][3]
        self.assertEqual(
            detail,
            {
                "reply": "delivery temporarily suspended: " + REFUSED.text,
                "code": 451,
                "status": "4.4.1",
                "remote": SMARTHOST,
                "attempts": 0,
                "suspended": DESTINATION,
                "next_attempt": rfc3339(START + 60),
            },
        )
        self.assertEqual(
            [(r.state, r.attempts, r.next_attempt) for r in entries[0].recipients],
            [("deferred", 0, START + 60)],
        )
        # One detail for every recipient it is the same for; the scheduler
        # keeps none per parked recipient, and makes an equal one when asked.
        self.assertTrue(all(d[3] is detail for d in deferrals))
        self.assertEqual(list(self.scheduler._queue._deferrals), [("FIRST", "a@example.com")])
        self.assertEqual(
            self.scheduler.lastDeferral(entries[-1].queue_id, "r29@example.com"), detail
        )

    def test_bulkRecordFails(self):
        """
        If the spool cannot take the bulk record at all, the failure is
        logged and the recipients stay parked: no event, and they are
        released and tried at the retry as any.
        """
        self.suspendWithOne()
        self.spool.failBulk = 1
        entries = self.addMany(3)
        self.clock.advance(0)
        self.clock.advance(FLUSH_INTERVAL)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.assertEqual(self.deferrals(), [])
        self.assertEqual(self.destination()["parked"], 3)
        self.assertEqual([e.recipients[0].state for e in entries], ["queued"] * 3)
        # The retry: the smarthost answers; all three are delivered.
        self.deliverer.refuse.clear()
        self.deliverer.auto = lambda call: AttemptResult(
            call.hop.name, False, {a: Reply(250, None, "ok") for a in call.recipients}
        )
        self.clock.advance(60)
        self.clock.advance(0)
        self.assertEqual([e.recipients[0].state for e in entries], ["delivered"] * 3)

    def test_deleteOneOfSeveral(self):
        """
        A parked message with several recipients: deleting one domain's
        leaves the others parked; deleting the message unparks them all.
        """
        self.suspendWithOne()
        self.add("M", ["a@example.com", "b@example.com", "c@example.net"])
        self.clock.advance(FLUSH_INTERVAL)
        self.assertEqual(self.destination()["parked"], 3)
        self.assertEqual(self.scheduler._parking.forget("M", "example.net"),
                         {self.scheduler._parking._suspensions[DESTINATION]})
        self.assertEqual(self.destination()["parked"], 2)
        self.assertEqual(sorted(self.successResultOf(self.scheduler.delete("M"))),
                         ["a@example.com", "b@example.com", "c@example.net"])
        self.assertEqual(self.destination()["parked"], 0)

    def test_loggedInBulk(self):
        """Parked recipients are logged a line per destination and hundred recipients, each naming its queue ids."""
        lines = []
        self.scheduler.stopService()
        self.scheduler = self.makeScheduler(
            messageLog=MessageLog(log=Logger(namespace="m", observer=lines.append))
        )
        self.scheduler.startService()
        self.suspendWithOne()
        del lines[:]
        self.addMany(150)
        self.clock.advance(FLUSH_INTERVAL)
        self.assertEqual([line["count"] for line in lines], [100, 50])
        first = lines[0]
        self.assertEqual(
            (first["destination"], first["status"], first["dsn"], first["next_attempt"]),
            (DESTINATION, "deferred", "4.4.1", rfc3339(START + 60)),
        )
        self.assertEqual(first["queue_ids"][:2], ["P0", "P1"])
        self.assertIn("P0 <r0@example.com>, P1 <r1@example.com>", first["log_text"])
        self.assertIn("status=deferred (451 4.4.1 delivery temporarily suspended: ", first["log_text"])

    def test_bulkInChunks(self):
        """More parked recipients than one chunk are all recorded, a chunk a reactor turn."""
        self.suspendWithOne()
        self.addMany(CHUNK + 10)
        self.clock.advance(FLUSH_INTERVAL)
        self.assertEqual(len(self.deferrals()), CHUNK + 10)
        self.assertEqual(self.destination()["parked"], CHUNK + 10)

    def test_failedProbeDefersAgain(self):
        """After a failed retry every parked recipient is deferred once more, to the next retry time."""
        self.suspendWithOne()
        self.addMany(5)
        self.clock.advance(FLUSH_INTERVAL)
        self.clock.advance(60 - FLUSH_INTERVAL)
        self.clock.advance(FLUSH_INTERVAL)
        # The probe recipient (P0) was attempted and deferred by its own
        # reply; the others, FIRST now among them, were deferred again, to
        # the next retry.
        deferrals = [(e[1], e[3]["next_attempt"]) for e in self.deferrals()]
        first = rfc3339(START + 60)
        second = rfc3339(START + 60 + 300)
        self.assertEqual(
            deferrals[:5],
            [("P0", first), ("P1", first), ("P2", first), ("P3", first), ("P4", first)],
        )
        self.assertEqual(
            sorted(deferrals[5:]),
            [("FIRST", second), ("P1", second), ("P2", second), ("P3", second), ("P4", second)],
        )
        (probe,) = [e for e in self.events.ofType("deferred") if e[1] == "P0" and "suspended" not in e[3]]
        self.assertEqual(probe[3]["attempts"], 1)
        self.assertEqual(len(self.opens()), 2)

    def test_releaseOnRecovery(self):
        """Once the probe's session opens, every parked recipient is delivered, within the limits."""
        self.deliverer.auto = None
        self.suspendWithOne()
        entries = self.addMany(10)
        self.clock.advance(FLUSH_INTERVAL)
        del self.deliverer.refuse[SMARTHOST]
        self.clock.advance(60)
        # The probe's session opened; everything else is released.
        self.clock.advance(0)
        delivered = 0
        while self.deliverer.pending():
            self.assertLessEqual(len(self.deliverer.connected()), self.maxConnections)
            self.deliverer.pending()[0].answer(250, "ok", "2.0.0")
            delivered += 1
            self.clock.advance(0)
        self.assertEqual(self.destination()["parked"], 0)
        self.assertIsNone(self.destination()["suspended_until"])
        # FIRST came back at its own retry time, found the destination
        # suspended and was parked with the others.
        self.assertEqual(delivered, 11)
        self.assertTrue(all(e.done for e in entries))
        self.assertEqual(
            sorted(e[1] for e in self.events.ofType("delivered")),
            sorted(["FIRST"] + [e.queue_id for e in entries]),
        )
        self.assertEqual(self.scheduler.queued(), 0)

    def test_releaseIsFair(self):
        """A released destination with a long queue leaves room for other destinations."""
        self.suspendWithOne()
        self.addMany(20)
        self.clock.advance(FLUSH_INTERVAL)
        del self.deliverer.refuse[SMARTHOST]
        self.clock.advance(60)
        self.clock.advance(0)
        self.add("OTHER", ["x@other.example"])
        self.clock.advance(0)
        for _ in range(3):
            for call in self.deliverer.pending():
                call.answer(250, "ok", "2.0.0")
            self.clock.advance(0)
        self.assertEqual(len(self.events.ofType("delivered")), 6)
        self.assertIn("OTHER", [e[1] for e in self.events.ofType("delivered")])

    def test_probeOnlyOneConnection(self):
        """While the retry's probe connects, other mail for the destination waits for it."""
        self.suspendWithOne()
        self.addMany(5)
        self.clock.advance(FLUSH_INTERVAL)
        del self.deliverer.refuse[SMARTHOST]
        self.deliverer.hang = True
        self.clock.advance(60)
        self.add("NEW", ["n@example.com"])
        self.scheduler.retryNow("P3")
        self.clock.advance(0)
        self.assertEqual(len(self.deliverer.opening), 1)
        ((d, session),) = self.deliverer.opening
        self.deliverer.hang = False
        self.deliverer.auto = lambda call: _ok(call)
        self.deliverer.sessions.append(session)
        d.callback(OpenResult(session))
        for _ in range(5):
            self.clock.advance(0)
        self.assertEqual(
            sorted(e[1] for e in self.events.ofType("delivered")),
            ["FIRST", "NEW", "P0", "P1", "P2", "P3", "P4"],
        )

    def test_probeReplaced(self):
        """A probe whose recipient goes away without a connection is replaced by another parked recipient."""
        self.suspendWithOne()
        self.addMany(3)
        self.clock.advance(FLUSH_INTERVAL)
        # The probe cannot be routed for now: no connection is attempted.
        self.router.table["example.com"] = NoRoute("no route yet")
        self.clock.advance(60)
        self.assertEqual(len(self.opens()), 1)
        del self.router.table["example.com"]
        self.clock.advance(PROBE_TIMEOUT)
        self.assertEqual(len(self.opens()), 2)

    def test_maxAge(self):
        """A parked recipient whose next retry would come after max_age expires instead."""
        self.suspendWithOne()
        old = self.add("OLD", received=START - self.maxAge + 30)
        young = self.add("YOUNG")
        self.clock.advance(FLUSH_INTERVAL)
        (expired,) = self.events.ofType("expired")
        self.assertEqual(expired[1], "OLD")
        self.assertEqual(expired[3]["reason"], "expired")
        self.assertIn("delivery temporarily suspended", expired[3]["diagnostic"])
        self.assertTrue(old.done)
        self.assertIsNone(self.scheduler.queuedMessage("OLD"))
        self.assertEqual(self.destination()["parked"], 1)
        self.assertEqual(young.recipients[0].state, "deferred")

    def test_maxAgeOnLaterRetry(self):
        """Recipients parked for many retries expire once the next one would be past max_age."""
        self.suspendWithOne()
        self.add("P")
        for _ in range(12):
            self.clock.advance(900)
        self.assertEqual(sorted(e[1] for e in self.events.ofType("expired")), ["FIRST", "P"])
        self.assertEqual(self.scheduler.queued(), 0)

    def test_delete(self):
        """A parked message can be deleted; it is never released afterwards."""
        self.suspendWithOne()
        self.add("P")
        self.clock.advance(FLUSH_INTERVAL)
        self.assertEqual(self.successResultOf(self.scheduler.delete("P")), ["a@example.com"])
        self.assertEqual(self.destination()["parked"], 0)
        del self.deliverer.refuse[SMARTHOST]
        self.clock.advance(60)
        self.clock.advance(0)
        self.assertNotIn(b"message P", [c.data for c in self.deliverer.calls])
        self.assertEqual([e[1] for e in self.events.ofType("expired")], ["P"])

    def test_retryNowProbes(self):
        """retryNow on a parked message tries its destination at once."""
        self.suspendWithOne()
        self.add("P")
        self.clock.advance(FLUSH_INTERVAL)
        self.assertTrue(self.scheduler.retryNow("P"))
        self.clock.advance(0)
        self.assertEqual(len(self.opens()), 2)

    def test_retryDomainProbes(self):
        """retryDomain on a parked domain tries its destination at once and delivers what was parked."""
        self.suspendWithOne()
        self.addMany(3)
        self.clock.advance(FLUSH_INTERVAL)
        del self.deliverer.refuse[SMARTHOST]
        self.deliverer.auto = _ok
        self.assertEqual(self.scheduler.retryDomain("example.com"), 4)
        self.clock.advance(0)
        self.assertEqual(len(self.opens()), 2)
        self.assertEqual(
            sorted(e[1] for e in self.events.ofType("delivered")), ["FIRST", "P0", "P1", "P2"]
        )

    def test_permanentRefusalNotParked(self):
        """A permanent refusal of the connection (a 5xx greeting) bounces; nothing is parked."""
        self.deliverer.refuse[SMARTHOST] = Reply(554, "5.7.1", "go away")
        self.add("FIRST")
        self.clock.advance(0)
        self.add("SECOND")
        self.clock.advance(FLUSH_INTERVAL)
        self.assertEqual(self.destination()["parked"], 0)
        self.assertEqual(sorted(e[1] for e in self.events.ofType("bounced")), ["FIRST", "SECOND"])

    def test_permanentRefusalAtTheProbe(self):
        """A probe refused permanently ends the suspension: the parked recipients get that answer too."""
        self.suspendWithOne()
        self.addMany(3)
        self.clock.advance(FLUSH_INTERVAL)
        self.deliverer.refuse[SMARTHOST] = Reply(554, "5.7.1", "go away")
        self.clock.advance(60)
        self.clock.advance(0)
        self.assertEqual(self.destination()["parked"], 0)
        self.assertEqual(
            sorted(e[1] for e in self.events.ofType("bounced")), ["FIRST", "P0", "P1", "P2"]
        )
        self.assertEqual(self.scheduler.queued(), 0)

    def test_releasedWhileRecording(self):
        """A parked recipient released while its bulk record is being written is delivered once, its events in order."""
        self.suspendWithOne()
        self.add("P")
        self.spool.hold = True
        self.clock.advance(FLUSH_INTERVAL)
        ((_, entry, changes),) = self.spool.held
        self.assertEqual((entry.queue_id, changes[0].state), ("P", "deferred"))
        # The retry comes before the record is written: P is the probe.
        del self.deliverer.refuse[SMARTHOST]
        self.deliverer.auto = _ok
        self.clock.advance(60)
        self.clock.advance(0)
        while self.spool.held:
            self.spool.releaseRecord(0)
            self.clock.advance(0)
        kinds = [e[0] for e in self.events.emitted if e[1] == "P"]
        self.assertEqual(kinds, ["deferred", "delivered"])
        self.assertIsNone(self.scheduler.queuedMessage("P"))
        self.assertEqual(len([c for c in self.deliverer.calls if c.data == b"message P"]), 1)

    def test_queueViews(self):
        """The queue views show a parked recipient as deferred, with the reason and the retry time."""
        self.suspendWithOne()
        self.add("P")
        self.clock.advance(FLUSH_INTERVAL)
        deferral = self.scheduler.lastDeferral("P", "a@example.com")
        self.assertEqual(
            (deferral["code"], deferral["status"], deferral["reply"]),
            (451, "4.4.1", "delivery temporarily suspended: " + REFUSED.text),
        )
        self.assertEqual(self.scheduler.attempting("P"), set())
        self.assertEqual(
            self.scheduler.queuedMessage("P").recipients[0].next_attempt, START + 60
        )
        state = self.destination()
        self.assertEqual(
            (state["parked"], state["suspended_reason"]), (2 - 1, REFUSED.line)
        )

    def test_stopCancelsTimers(self):
        """Stopping the scheduler leaves no parking timer behind."""
        self.suspendWithOne()
        self.addMany(3)
        self.successResultOf(self.scheduler.stopService())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_restartRetriesParked(self):
        """After a restart the parked recipients are retried at their recorded next attempt and delivered once."""
        self.suspendWithOne()
        entries = [self.scheduler.queuedMessage("FIRST")] + self.addMany(5)
        self.clock.advance(FLUSH_INTERVAL)
        # "kill -9": the scheduler is gone, the spool's state is what is left.
        self.scheduler.stopService()
        del self.deliverer.refuse[SMARTHOST]
        self.deliverer.auto = _ok
        self.scheduler = self.makeScheduler()
        for entry in entries:
            self.scheduler.enqueue(entry)
        self.scheduler.startService()
        self.clock.advance(30)
        self.assertEqual(self.events.ofType("delivered"), [])
        self.clock.advance(30)
        self.assertEqual(
            sorted(e[1] for e in self.events.ofType("delivered")),
            [e.queue_id for e in entries],
        )
        for entry in entries:
            kinds = [e[0] for e in self.events.emitted if e[1] == entry.queue_id]
            self.assertEqual(kinds, ["deferred", "delivered"])


def _ok(call):
    """
    Every recipient of C{call} accepted.
    """
    return AttemptResult(call.hop.name, False, {a: Reply(250, "2.0.0", "ok") for a in call.recipients})


class RealSpoolTests(ParkingTestsMixin, SynchronousTestCase):
    """
    Parking over the real spool: nothing parked is lost when the relay
    dies, and a restart retries it.
    """

    def makeSpool(self):
        self.directory = self.mktemp()
        os.makedirs(self.directory)
        return Spool(self.directory, synchronous, clock=self.clock)

    def storeMessage(self, entry, data):
        self.successResultOf(self.spool.store(entry, data))

    def destination(self, key=DESTINATION):
        (state,) = [d for d in self.scheduler.destinations() if d["destination"] == key]
        return state

    def recover(self):
        spool = Spool(self.directory, synchronous, clock=self.clock)
        return spool, self.successResultOf(spool.recover())

    def test_killedBeforeTheBulkRecord(self):
        """Recipients parked but not yet recorded are on disk as queued: a restart attempts them at once."""
        self.suspendWithOne()
        self.addMany(3)
        _, recovered = self.recover()
        states = {e.queue_id: e.recipients[0].state for e in recovered}
        self.assertEqual(states, {"FIRST": "deferred", "P0": "queued", "P1": "queued", "P2": "queued"})

    def test_killedAfterTheBulkRecord(self):
        """Recorded parked recipients are on disk as deferred until the retry time, and are delivered after a restart."""
        self.suspendWithOne()
        self.addMany(3)
        self.clock.advance(FLUSH_INTERVAL)
        spool, recovered = self.recover()
        self.assertEqual(
            {e.queue_id: (e.recipients[0].state, e.recipients[0].next_attempt) for e in recovered},
            {"FIRST": ("deferred", START + 60), "P0": ("deferred", START + 60),
             "P1": ("deferred", START + 60), "P2": ("deferred", START + 60)},
        )
        self.scheduler.stopService()
        self.spool = spool
        del self.deliverer.refuse[SMARTHOST]
        self.deliverer.auto = _ok
        self.scheduler = self.makeScheduler()
        for entry in recovered:
            self.scheduler.enqueue(entry)
        self.scheduler.startService()
        self.clock.advance(60)
        self.clock.advance(0)
        self.assertEqual(
            sorted(e[1] for e in self.events.ofType("delivered")), ["FIRST", "P0", "P1", "P2"]
        )
        self.assertEqual(self.recover()[1], [])


class ParkingFlushTests(SynchronousTestCase):
    """
    L{Parking}'s bulk record on its own (fake clock, recording callables):
    what it hands the scheduler per parked recipient, and what the
    recipients of one suspension share.
    """

    def setUp(self):
        from smartrelay.outbound.parking import Parking

        self.clock = Clock()
        self.clock.advance(START)
        self.batches, self.expired, self.released = [], [], []
        self.parking = Parking(
            clock=self.clock,
            retry=Delays((60, 300)),
            maxAge=3600.0,
            record=self.batches.append,
            expire=lambda entry, changes, events: self.expired.append((entry, changes, events)),
            release=lambda entry, addresses: self.released.append((entry, addresses)),
            opening=lambda key: False,
        )
        self.addCleanup(self.parking.stop)
        self.suspension = self.parking.suspend(DESTINATION, REFUSED, SMARTHOST)

    def park(self, queue_id, addresses, received=START, attempts=0):
        entry = makeEntry(queue_id, list(addresses), received=received)
        for recipient in entry.recipients:
            recipient.attempts = attempts
        self.parking.park(DESTINATION, entry, list(addresses))
        return entry

    def flush(self):
        self.clock.advance(FLUSH_INTERVAL)
        self.assertLessEqual(len(self.batches), 1)
        return self.batches.pop() if self.batches else []

    def test_oneDetailPerSuspension(self):
        """
        Every parked recipient of one suspension with as many attempts gets
        the same detail dict (one object: the event log encodes it once) and
        the same reply text; messages with one recipient and with several
        are recorded alike.
        """
        self.park("M1", ["a@example.com"])
        self.park("M2", ["b@example.com"])
        self.park("M3", ["c@example.com", "d@example.net"])
        batch = self.flush()
        self.assertEqual([entry.queue_id for entry, _, _ in batch], ["M1", "M2", "M3"])
        events = [event for _, _, each in batch for event in each]
        self.assertEqual([e[1] for e in events],
                         ["a@example.com", "b@example.com", "c@example.com", "d@example.net"])
        details = {id(e[2]) for e in events}
        self.assertEqual(len(details), 1)
        self.assertEqual(events[0][2], {
            "reply": "delivery temporarily suspended: " + REFUSED.text,
            "code": 451,
            "status": "4.4.1",
            "remote": SMARTHOST,
            "attempts": 0,
            "suspended": DESTINATION,
            "next_attempt": rfc3339(START + 60),
        })
        for state, address, detail, line in events:
            self.assertEqual(state, "deferred")
            self.assertEqual(line, {
                "delay": FLUSH_INTERVAL,
                "reply": "451 4.4.1 delivery temporarily suspended: " + REFUSED.text,
                "relay": None,
                "dsn": "4.4.1",
                "attempts": 0,
                "next_attempt": rfc3339(START + 60),
            })
        changes = [change for _, each, _ in batch for change in each]
        self.assertEqual(
            [(c.address, c.state, c.attempts, c.next_attempt) for c in changes],
            [(a, "deferred", 0, START + 60)
             for a in ("a@example.com", "b@example.com", "c@example.com", "d@example.net")],
        )
        self.assertEqual(len(self.parking), 4)

    def test_detailByAttempts(self):
        """
        Recipients with different attempt counts get their own detail.
        """
        self.park("M1", ["a@example.com"], attempts=2)
        self.park("M2", ["b@example.com"], attempts=2)
        self.park("M3", ["c@example.com"], attempts=5)
        details = [each[0][2] for _, _, each in self.flush()]
        self.assertIs(details[0], details[1])
        self.assertEqual([d["attempts"] for d in details], [2, 2, 5])
        self.assertIsNot(details[0], details[2])

    def test_detailsNotKeptAfterFlush(self):
        """
        A later flush makes new details (the recipients of the earlier one
        may keep theirs).
        """
        self.park("M1", ["a@example.com"])
        first = self.flush()[0][2][0][2]
        self.park("M2", ["b@example.com"])
        second = self.flush()[0][2][0][2]
        self.assertEqual(first, second)
        self.assertIsNot(first, second)

    def test_finalRecipientUnparked(self):
        """
        A parked one-recipient message whose recipient has meanwhile
        reached a final state is not recorded, and no longer parked.
        """
        from smartrelay.message import Recipient

        entry = self.park("M1", ["a@example.com"])
        self.park("M2", ["b@example.com"])
        entry.recipients = [Recipient("a@example.com", "delivered", 1, 0.0)]
        batch = self.flush()
        self.assertEqual([e.queue_id for e, _, _ in batch], ["M2"])
        self.assertNotIn(("M1", "a@example.com"), self.parking)
        self.assertEqual(len(self.parking), 1)

    def test_onlyPendingRecipient(self):
        """
        Only the recipient whose deferral is pending is recorded: one
        released meanwhile (the message then gone from the parking) is not.
        """
        self.park("M1", ["a@example.com"])
        self.parking.forget("M1")
        self.park("M2", ["b@example.com"])
        self.assertEqual([e.queue_id for e, _, _ in self.flush()], ["M2"])

    def test_expiresSingle(self):
        """
        A one-recipient message past its maximum age at the retry time
        expires (through C{expire}, not the bulk record) and is unparked.
        """
        self.park("OLD", ["a@example.com"], received=START - 3590)
        self.park("NEW", ["b@example.com"])
        batch = self.flush()
        self.assertEqual([e.queue_id for e, _, _ in batch], ["NEW"])
        [(entry, changes, events)] = self.expired
        self.assertEqual(entry.queue_id, "OLD")
        self.assertEqual([(c.address, c.state) for c in changes], [("a@example.com", "expired")])
        [(state, address, detail, line)] = events
        self.assertEqual(state, "expired")
        self.assertEqual(detail["reason"], "expired")
        self.assertEqual(detail["diagnostic"],
                         "451 4.4.1 delivery temporarily suspended: " + REFUSED.text)
        self.assertNotIn("next_attempt", detail)
        self.assertNotIn(("OLD", "a@example.com"), self.parking)
