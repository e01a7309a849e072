"""
Tests for L{smartrelay.feedback.processor} and
L{smartrelay.feedback.suppression}: reports turned into events and
suppressions, with a memory store, a fake clock and a report reader that
answers what each test says.
"""

import os
import shutil

from twisted.internet.defer import fail, maybeDeferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from smartrelay.events import Event, EventLog
from smartrelay.feedback.inbox import Envelope, FeedbackInbox, receivedAt
from smartrelay.feedback.processor import (
    FeedbackProcessor,
    ReadReportJob,
    ReportReader,
    feedbackEventID,
)
from smartrelay.feedback.records import FeedbackRecord, Report
from smartrelay.feedback.suppression import BounceSuppressor
from smartrelay.feedback.addresses import FeedbackAddresses
from smartrelay.store.memory import MemoryStore
from smartrelay.tokens import Tokens

QUEUE_ID = "2A/BC-00001-5C348706"
OTHER_ID = "2A/BC-00002-5C348706"
START = 1700000000.0


def hardBounce(recipient="someone@example.org", **kwargs):
    values = dict(
        type="bounce", recipient=recipient, action="failed", status="5.1.1",
        replycode=550, diagnostic="550 5.1.1 no such user", remote="mx.example.org",
        kind="hard", reason="userunknown",
    )
    values.update(kwargs)
    return FeedbackRecord(**values)


def softBounce(recipient="someone@example.org", **kwargs):
    values = dict(status="5.2.2", kind="soft", reason="mailboxfull")
    values.update(kwargs)
    return hardBounce(recipient, **values)


def complaint(feedbackType, recipient="someone@example.org", **kwargs):
    return FeedbackRecord(
        type="complaint", recipient=recipient, feedback_type=feedbackType,
        source_ip="198.51.100.1", user_agent="FBL/1.0", reason="feedback", **kwargs,
    )


class FailingStore(MemoryStore):
    """
    A memory store whose reads fail while C{down} is set.
    """

    down = False

    def eventsForMessage(self, queue_id):
        if self.down:
            return fail(ConnectionError("store down"))
        return MemoryStore.eventsForMessage(self, queue_id)


class ProcessorMixin:
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(START)
        self.tokens = Tokens([b"k" * 32])
        self.store = FailingStore()
        self.successResultOf(self.store.start())
        self.events = EventLog(self.store, self.clock)
        self.directory = self.mktemp()
        self.inbox = FeedbackInbox(self.directory, maybeDeferred)
        self.successResultOf(self.inbox.open())
        #: message bytes -> the Report the fake reader answers.
        self.reports = {}
        self.processor = self.makeProcessor()

    def makeProcessor(self, softLimit=3):
        return FeedbackProcessor(
            clock=self.clock,
            inbox=self.inbox,
            addresses=FeedbackAddresses(
                tokens=self.tokens, bounceDomain="relay.test", verpPrefix="bounce",
                fblAddresses=frozenset(["fbl@example.com"]),
            ),
            store=self.store,
            events=self.events,
            suppressor=BounceSuppressor(
                store=self.store, events=self.events, softLimit=softLimit, softWindow=86400.0
            ),
            read=ReportReader(maybeDeferred, readReport=self.reports.__getitem__),
        )

    def accepted(self, queueID=QUEUE_ID, recipients=("first@example.org", "someone@example.org")):
        """
        Store the message's accepted events, with a tag and metadata.
        """
        for recipient in recipients:
            self.events.emit(
                "accepted", queueID, recipient, tag="welcome", metadata={"user": "42"},
                detail={"sender": "app@example.com"},
            )
        self.settle()

    def settle(self):
        for _ in range(20):
            self.clock.advance(0)

    def verp(self, index=1, queueID=QUEUE_ID):
        return "bounce+%s@relay.test" % (self.tokens.compact("v", queueID, index),)

    def unsub(self, index=1, queueID=QUEUE_ID):
        return "unsub+%s@relay.test" % (self.tokens.compact("u", queueID, index),)

    def deliver(self, recipient, report, data=None):
        """
        A report to C{recipient} as the listener hands it over: stored in
        the inbox first.
        """
        data = data or b"Subject: report %d\r\n\r\n" % (len(self.reports),)
        self.reports[data] = report
        envelope = Envelope("", (recipient,), self.clock.seconds(), {"ip": "192.0.2.7"})
        reportID = self.successResultOf(self.inbox.store(envelope, data))
        self.processor.received(reportID, envelope, data)
        self.settle()
        return reportID

    def stored(self, type=None):
        self.settle()
        events = self.successResultOf(self.store.queryEvents(limit=1000)).events
        return [e for e in events if type is None or e.type == type]

    def suppressed(self, address="someone@example.org"):
        found = self.successResultOf(self.store.checkSuppressions([address], self.clock.seconds()))
        return found.get(address)


class BounceTests(ProcessorMixin, SynchronousTestCase):
    def test_hardBounceToVERP(self):
        """
        A DSN to a VERP address: a C{bounced} event for the recipient at
        the token's index (from the accepted events), with the message's
        tag and metadata and the DSN detail; the address is suppressed; the
        report moves to C{done/}.
        """
        self.accepted()
        reportID = self.deliver(self.verp(1), Report("bounce", (hardBounce("SomeOne@Example.org"),)))
        [event] = self.stored("bounced")
        self.assertEqual(
            (event.queue_id, event.recipient, event.tag, event.metadata),
            (QUEUE_ID, "someone@example.org", "welcome", {"user": "42"}),
        )
        self.assertEqual(
            event.detail,
            {
                "kind": "hard", "reason": "userunknown", "status": "5.1.1",
                "diagnostic": "550 5.1.1 no such user", "remote": "mx.example.org",
                "source": "dsn", "action": "failed",
            },
        )
        self.assertEqual(event.id, feedbackEventID(reportID, "0.0"))
        entry = self.suppressed()
        self.assertEqual((entry.reason, entry.source_event, entry.time), ("bounce", event.id, START))
        self.assertTrue(os.path.exists(self.inbox.path("done", reportID)))
        self.assertFalse(os.path.exists(self.inbox.path("new", reportID)))
        self.assertTrue(self.processor.idle())

    def test_verpFallsBackToRecord(self):
        """
        When the message's events are gone, the record's recipient is used
        (and the queue id still comes from the token).
        """
        self.deliver(self.verp(1), Report("bounce", (hardBounce("gone@example.org"),)))
        [event] = self.stored("bounced")
        self.assertEqual((event.queue_id, event.recipient, event.tag), (QUEUE_ID, "gone@example.org", None))
        self.assertIsNotNone(self.suppressed("gone@example.org"))

    def test_postmasterAttribution(self):
        """
        A report to postmaster@ is attributed by the record's queue id
        (X-SmartRelay-ID) and recipient; one event per record.
        """
        self.accepted(OTHER_ID, ("a@example.org", "b@example.org"))
        self.deliver(
            "postmaster@relay.test",
            Report("bounce", (
                hardBounce("a@example.org", queue_id=OTHER_ID),
                hardBounce("b@example.org", queue_id=OTHER_ID),
            )),
        )
        events = self.stored("bounced")
        self.assertEqual([(e.queue_id, e.recipient, e.tag) for e in events], [
            (OTHER_ID, "a@example.org", "welcome"), (OTHER_ID, "b@example.org", "welcome"),
        ])
        self.assertIsNotNone(self.suppressed("a@example.org"))
        self.assertIsNotNone(self.suppressed("b@example.org"))

    def test_verpAndPostmasterOnce(self):
        """
        A report sent to a VERP address and to postmaster@ at once makes
        its events once, attributed by the token.
        """
        self.accepted()
        data = b"Subject: both\r\n\r\n"
        self.reports[data] = Report("bounce", (hardBounce(queue_id=QUEUE_ID),))
        envelope = Envelope("", ("postmaster@relay.test", self.verp(1)), START, {})
        reportID = self.successResultOf(self.inbox.store(envelope, data))
        self.processor.received(reportID, envelope, data)
        self.settle()
        [event] = self.stored("bounced")
        self.assertEqual(event.id, feedbackEventID(reportID, "1.0"))

    def test_postmasterWithoutQueueID(self):
        """
        A record without a queue id is still recorded, under no message.
        """
        self.deliver("postmaster@relay.test", Report("bounce", (hardBounce("x@example.org"),)))
        [event] = self.stored("bounced")
        self.assertEqual((event.queue_id, event.recipient), (None, "x@example.org"))

    def test_delayedNeverSuppresses(self):
        """
        C{Action: delayed} makes a C{deferred} event with source dsn, never
        a bounce, and suppresses nothing, however many come.
        """
        self.accepted()
        for _ in range(5):
            self.deliver(
                self.verp(1),
                Report("bounce", (softBounce(action="delayed", status="4.2.2"),)),
            )
        events = self.stored("deferred")
        self.assertEqual(len(events), 5)
        self.assertEqual(events[0].detail["source"], "dsn")
        self.assertEqual(events[0].detail["action"], "delayed")
        self.assertNotIn("kind", events[0].detail)
        self.assertEqual(self.stored("bounced"), [])
        self.assertIsNone(self.suppressed())

    def test_deliveredActionIgnored(self):
        """
        A DSN record saying delivered or relayed makes no event.
        """
        self.deliver(self.verp(1), Report("bounce", (hardBounce(action="relayed"),)))
        self.assertEqual(self.stored("bounced"), [])

    def test_softBounceEscalation(self):
        """
        Soft bounces suppress only once C{softLimit} of them fall within
        the window; the entry's source event is the last one.
        """
        self.accepted()
        self.deliver(self.verp(1), Report("bounce", (softBounce(),)))
        self.clock.advance(90000)  # the first one leaves the window
        self.deliver(self.verp(1), Report("bounce", (softBounce(),)))
        self.deliver(self.verp(1), Report("bounce", (softBounce(),)))
        self.assertIsNone(self.suppressed())
        self.deliver(self.verp(1), Report("bounce", (softBounce(),)))
        entry = self.suppressed()
        self.assertEqual(entry.reason, "bounce")
        self.assertEqual(entry.source_event, self.stored("bounced")[-1].id)

    def test_softCountsSynchronousBounces(self):
        """
        The scheduler's soft bounces (source smtp) count toward escalation
        with the DSN ones.
        """
        suppressor = self.processor.suppressor
        for _ in range(2):
            event = self.events.emit(
                "bounced", QUEUE_ID, "someone@example.org",
                detail={"kind": "soft", "reason": "mailboxfull", "status": "5.2.2"},
            )
            self.successResultOf(self.settleAnd(suppressor.bounced(event)))
        self.assertIsNone(self.suppressed())
        self.deliver(self.verp(1), Report("bounce", (softBounce(),)))
        self.assertIsNotNone(self.suppressed())

    def settleAnd(self, d):
        self.settle()
        return d

    def test_suppressorHardBounce(self):
        """
        L{BounceSuppressor.bounced} suppresses a hard bounce at once and
        ignores events without a recipient or kind.
        """
        suppressor = self.processor.suppressor
        event = Event(
            type="bounced", queue_id=QUEUE_ID, recipient="h@Example.ORG", time=START,
            detail={"kind": "hard", "reason": "userunknown"},
        )
        entry = self.successResultOf(suppressor.bounced(event))
        self.assertEqual((entry.address, entry.source_event), ("h@example.org", event.id))
        for odd in [
            Event(type="bounced", queue_id=None, recipient=None, time=START, detail={"kind": "hard"}),
            Event(type="bounced", queue_id=None, recipient="x@y.org", time=START, detail={}),
            Event(type="bounced", queue_id=None, recipient="not an address", time=START,
                  detail={"kind": "hard"}),
        ]:
            self.assertIsNone(self.successResultOf(suppressor.bounced(odd)))


class ComplaintTests(ProcessorMixin, SynchronousTestCase):
    def test_abuseSuppresses(self):
        """
        An abuse, fraud, virus, other or untyped complaint is recorded with
        its feedback type and suppresses (reason complaint).
        """
        self.accepted()
        for n, feedbackType in enumerate(["abuse", "fraud", "virus", "other", None]):
            address = "c%d@example.org" % (n,)
            self.deliver("fbl@example.com", Report("complaint", (complaint(feedbackType, address),)))
            self.assertEqual(self.suppressed(address).reason, "complaint", feedbackType)
        events = self.stored("complained")
        self.assertEqual([e.detail["feedback_type"] for e in events], ["abuse", "fraud", "virus", "other", None])
        self.assertEqual(events[0].detail["source_ip"], "198.51.100.1")
        self.assertEqual(events[0].detail["user_agent"], "FBL/1.0")

    def test_verpComplaintHasTag(self):
        """
        A complaint that came back to the VERP address is attributed by the
        token, with the message's tag.
        """
        self.accepted()
        self.deliver(self.verp(1), Report("complaint", (complaint("abuse", None),)))
        [event] = self.stored("complained")
        self.assertEqual((event.recipient, event.tag), ("someone@example.org", "welcome"))
        self.assertEqual(self.suppressed().reason, "complaint")

    def test_notSpamAndAuthFailureRecordedOnly(self):
        """
        not-spam and auth-failure reports are recorded, never suppress.
        """
        self.deliver("fbl@example.com", Report("complaint", (complaint("not-spam"),)))
        self.deliver("fbl@example.com", Report("complaint", (complaint("auth-failure"),)))
        self.assertEqual(len(self.stored("complained")), 2)
        self.assertIsNone(self.suppressed())

    def test_optOutUnsubscribes(self):
        """
        An opt-out report is an C{unsubscribed} event and a suppression
        with reason unsubscribe.
        """
        self.deliver("fbl@example.com", Report("complaint", (complaint("opt-out"),)))
        [event] = self.stored("unsubscribed")
        self.assertEqual((event.detail["method"], event.detail["feedback_type"]), ("arf", "opt-out"))
        self.assertEqual(self.stored("complained"), [])
        self.assertEqual(self.suppressed().reason, "unsubscribe")


class UnsubscribeAndAutoReplyTests(ProcessorMixin, SynchronousTestCase):
    def test_mailToUnsubAddress(self):
        """
        Any mail to C{unsub+TOKEN@} unsubscribes the recipient at the
        token's index, with the message's tag; a second one changes nothing.
        """
        self.accepted()
        self.deliver(self.unsub(1), Report("none"))
        [event] = self.stored("unsubscribed")
        self.assertEqual(
            (event.queue_id, event.recipient, event.tag, event.detail["method"]),
            (QUEUE_ID, "someone@example.org", "welcome", "mailto"),
        )
        self.assertEqual(self.suppressed().reason, "unsubscribe")
        self.deliver(self.unsub(1), Report("unsubscribe", (FeedbackRecord(type="unsubscribe"),)))
        self.assertEqual(len(self.stored("unsubscribed")), 1)

    def test_unsubUnknownMessage(self):
        """
        Mail to C{unsub+} for a message whose events are gone and that
        names nobody makes nothing, and is still done.
        """
        reportID = self.deliver(self.unsub(1), Report("none"))
        self.assertEqual(self.stored("unsubscribed"), [])
        self.assertTrue(os.path.exists(self.inbox.path("done", reportID)))

    def test_unsubMalformedRecipient(self):
        """
        Mail to C{unsub+} whose only address (from the report) is not an
        address makes nothing and is done, not retried.
        """
        reportID = self.deliver(
            self.unsub(1),
            Report("unsubscribe", (FeedbackRecord(type="unsubscribe", recipient="no-at-sign"),)),
        )
        self.assertEqual(self.stored(), [])
        self.assertTrue(os.path.exists(self.inbox.path("done", reportID)))
        self.assertTrue(self.processor.idle())

    def test_autoReply(self):
        """
        An auto-reply is C{auto_replied}, never a bounce or a suppression.
        """
        self.accepted()
        self.deliver(
            self.verp(1),
            Report("autoreply", (FeedbackRecord(type="autoreply", recipient=None, reason="vacation"),)),
        )
        [event] = self.stored("auto_replied")
        self.assertEqual((event.recipient, event.detail["reason"]), ("someone@example.org", "vacation"))
        self.assertEqual(self.stored("bounced"), [])
        self.assertIsNone(self.suppressed())

    def test_oneLogLinePerReport(self):
        """
        A processed report is one log line naming what it made; none with
        C{logReports} off.
        """
        from twisted.internet.testing import EventLoggingObserver
        from twisted.logger import formatEvent, globalLogPublisher

        self.accepted()
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        reportID = self.deliver(self.verp(1), Report("bounce", (hardBounce(),)))
        lines = [formatEvent(e) for e in observer if "feedback: report" in formatEvent(e)]
        self.assertEqual(
            lines,
            ["feedback: report %s (bounce) from 192.0.2.7 to %s: bounced %s someone@example.org"
             " (hard userunknown 5.1.1)" % (reportID, self.verp(1), QUEUE_ID)],
        )
        self.processor.logReports = False
        self.deliver(self.verp(1), Report("bounce", (hardBounce(),)))
        self.assertEqual(len([e for e in observer if "feedback: report" in formatEvent(e)]), 1)

    def test_notAReport(self):
        """
        Mail to a VERP address that is no report makes no event.
        """
        reportID = self.deliver(self.verp(1), Report("none"))
        self.assertEqual(self.stored(), [])
        self.assertTrue(os.path.exists(self.inbox.path("done", reportID)))

    def test_parserFailure(self):
        """
        A reader that raises (it must not) is logged; the report is done.
        """
        def broken(data):
            raise RuntimeError("bug")

        self.processor.read = ReportReader(maybeDeferred, readReport=broken)
        reportID = self.deliver(self.verp(1), Report("none"))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertTrue(os.path.exists(self.inbox.path("done", reportID)))


class DurabilityTests(ProcessorMixin, SynchronousTestCase):
    def crash(self):
        """
        What a crash after processing, before the move to done/, leaves:
        every report back in new/; then a new run recovers them.
        """
        for name in os.listdir(os.path.join(self.directory, "done")):
            shutil.move(self.inbox.path("done", name), self.inbox.path("new", name))
        self.processor = self.makeProcessor()
        pending = self.successResultOf(self.inbox.open())
        self.processor.recover(pending)
        self.settle()
        return pending

    def test_reprocessingMakesNoDuplicates(self):
        """
        Processing every report again after a crash adds no event (same
        ids, already stored) and leaves the suppressions as they were.
        """
        self.accepted()
        self.deliver(self.verp(1), Report("bounce", (hardBounce(),)))
        self.deliver(self.verp(0), Report("bounce", (softBounce("first@example.org"),)))
        self.deliver("fbl@example.com", Report("complaint", (complaint("abuse", "c@example.org"),)))
        self.deliver("postmaster@relay.test", Report("bounce", (hardBounce("x@example.org"),)))
        self.deliver(self.unsub(0), Report("none"))
        before = [(e.id, e.type) for e in self.stored()]
        entries = [self.suppressed(a) for a in ("someone@example.org", "c@example.org", "x@example.org")]
        self.clock.advance(60)
        self.assertEqual(len(self.crash()), 5)
        self.assertEqual([(e.id, e.type) for e in self.stored()], before)
        self.assertEqual(
            [self.suppressed(a) for a in ("someone@example.org", "c@example.org", "x@example.org")],
            entries,
        )
        self.assertEqual(os.listdir(os.path.join(self.directory, "new")), [])

    def test_crashBeforeProcessing(self):
        """
        A report stored (250) but never processed is processed by the next
        run's recovery.
        """
        self.accepted()
        data = b"Subject: dsn\r\n\r\n"
        self.reports[data] = Report("bounce", (hardBounce(),))
        envelope = Envelope("", (self.verp(1),), START, {})
        reportID = self.successResultOf(self.inbox.store(envelope, data))
        self.assertEqual(receivedAt(reportID), START)
        self.assertEqual(self.crash(), [reportID])
        [event] = self.stored("bounced")
        self.assertEqual(event.id, feedbackEventID(reportID, "0.0"))
        self.assertIsNotNone(self.suppressed())

    def test_damagedReportSetAside(self):
        """
        A report file in new/ without its envelope line is logged and moved
        to done/ at recovery, not retried.
        """
        reportID = "1700000000000-0123456789ab"
        with open(self.inbox.path("new", reportID), "wb") as f:
            f.write(b"Subject: no envelope\r\n\r\n")
        self.processor.recover([reportID])
        self.settle()
        self.assertTrue(os.path.exists(self.inbox.path("done", reportID)))
        self.assertTrue(self.processor.idle())
        self.assertEqual(self.stored(), [])

    def test_storeDownRetried(self):
        """
        While the store fails, the report stays in new/ and is tried again
        with back-off; once the store answers it is processed once.
        """
        self.accepted()
        self.store.down = True
        reportID = self.deliver(self.verp(1), Report("bounce", (hardBounce(),)))
        self.assertEqual(len(self.flushLoggedErrors(ConnectionError)), 1)
        self.assertTrue(os.path.exists(self.inbox.path("new", reportID)))
        self.assertFalse(self.processor.idle())
        self.clock.advance(5)
        self.settle()
        self.assertEqual(len(self.flushLoggedErrors(ConnectionError)), 1)
        self.store.down = False
        self.clock.advance(30)
        self.settle()
        self.assertEqual(len(self.stored("bounced")), 1)
        self.assertTrue(os.path.exists(self.inbox.path("done", reportID)))
        self.assertTrue(self.processor.idle())

    def test_unsubscribeHeldWhileStoreDown(self):
        """
        Mail to C{unsub+} while the store cannot say whom it is for: the
        address the mail names is held provisionally (not put on the list)
        until the report is processed once the store answers; then the
        token's recipient is unsubscribed and the hold released.
        """
        held = {}

        class Provisional:
            def holdProvisionally(self, key, entry):
                held[key] = entry

            def releaseProvisional(self, key):
                held.pop(key, None)

        self.processor.provisional = Provisional()
        self.accepted()
        self.store.down = True
        reportID = self.deliver(
            self.unsub(1),
            Report("unsubscribe", (FeedbackRecord(type="unsubscribe", recipient="Leaver@Example.org"),)),
        )
        self.flushLoggedErrors(ConnectionError)
        self.assertEqual(
            [(k, e.address, e.reason, e.time) for k, e in held.items()],
            [(reportID, "Leaver@example.org", "unsubscribe", START)],
        )
        self.assertIsNone(self.suppressed("Leaver@example.org"))
        self.store.down = False
        self.clock.advance(5)
        self.settle()
        self.assertEqual(held, {})
        self.assertEqual(self.suppressed().reason, "unsubscribe")
        self.assertIsNone(self.suppressed("Leaver@example.org"))

    def test_unsubscribeHeldForEnvelopeSender(self):
        """
        A mail to C{unsub+} that names nobody itself is held for its
        envelope sender while the store is down.
        """
        held = {}

        class Provisional:
            def holdProvisionally(self, key, entry):
                held[key] = entry.address

            def releaseProvisional(self, key):
                held.pop(key, None)

        self.processor.provisional = Provisional()
        self.store.down = True
        data = b"Subject: bye\r\n\r\n"
        self.reports[data] = Report("none")
        envelope = Envelope("me@Example.org", (self.unsub(1),), self.clock.seconds(), {})
        reportID = self.successResultOf(self.inbox.store(envelope, data))
        self.processor.received(reportID, envelope, data)
        self.settle()
        self.flushLoggedErrors(ConnectionError)
        self.assertEqual(held, {reportID: "me@example.org"})

    def test_stopCancelsRetries(self):
        """
        C{stop} cancels waiting retries (the report stays in new/ for the
        next start) and fires once nothing is in flight.
        """
        self.store.down = True
        reportID = self.deliver(self.verp(1), Report("bounce", (hardBounce(),)))
        self.flushLoggedErrors(ConnectionError)
        self.successResultOf(self.processor.stop())
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertTrue(os.path.exists(self.inbox.path("new", reportID)))

    def test_stopWaitsForInFlight(self):
        """
        C{stop} waits for a report being processed.
        """
        from twisted.internet.defer import Deferred

        waiting = Deferred()
        read = self.processor.read
        self.processor.read = lambda data: waiting.addCallback(lambda _: read(data))
        self.deliver(self.verp(1), Report("bounce", (hardBounce(),)))
        stopped = self.processor.stop()
        self.assertNoResult(stopped)
        waiting.callback(None)
        self.settle()
        self.successResultOf(stopped)
        self.assertEqual(len(self.stored("bounced")), 1)

    def test_prune(self):
        """
        The inbox prunes processed reports older than the cut-off only.
        """
        old = self.deliver("postmaster@relay.test", Report("none"))
        self.clock.advance(100)
        new = self.deliver("postmaster@relay.test", Report("none"))
        self.assertEqual(self.successResultOf(self.inbox.prune(START + 50)), 1)
        self.assertFalse(os.path.exists(self.inbox.path("done", old)))
        self.assertTrue(os.path.exists(self.inbox.path("done", new)))


class FakeWorkers:
    """
    A worker pool that runs jobs at once (or fails them all).
    """

    def __init__(self, running=True, failing=False):
        self.running, self.failing, self.jobs = running, failing, []

    @property
    def available(self):
        return self.running

    def run(self, job):
        self.jobs.append(job)
        if self.failing:
            return fail(RuntimeError("worker died"))
        return maybeDeferred(job.run, "context")


class ReportReaderTests(SynchronousTestCase):
    DSN = (
        b"From: MAILER-DAEMON@mx.example.org\r\nSubject: Undelivered Mail\r\n"
        b"MIME-Version: 1.0\r\n"
        b'Content-Type: multipart/report; report-type=delivery-status; boundary="b"\r\n\r\n'
        b"--b\r\nContent-Type: text/plain\r\n\r\nFailed.\r\n"
        b"--b\r\nContent-Type: message/delivery-status\r\n\r\n"
        b"Reporting-MTA: dns; mx.example.org\r\n\r\n"
        b"Final-Recipient: rfc822; who@example.org\r\nAction: failed\r\nStatus: 5.1.1\r\n"
        b"\r\n--b--\r\n"
    )

    def test_workerWhenRunning(self):
        """
        With a running worker pool the real readReport runs there.
        """
        workers = FakeWorkers()
        threads = []
        reader = ReportReader(lambda *a: threads.append(a), workers=workers)
        report = self.successResultOf(reader(self.DSN))
        self.assertEqual([type(j) for j in workers.jobs], [ReadReportJob])
        self.assertEqual(threads, [])
        self.assertEqual((report.type, report.records[0].recipient), ("bounce", "who@example.org"))

    def test_threadOtherwise(self):
        """
        Without workers, with none running, or when the worker fails, the
        reader runs in a thread.
        """
        for workers in [None, FakeWorkers(running=False), FakeWorkers(failing=True)]:
            reader = ReportReader(maybeDeferred, workers=workers)
            self.assertEqual(self.successResultOf(reader(self.DSN)).type, "bounce")
