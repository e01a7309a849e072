"""
Tests for L{smartrelay.logs}: the per-message log lines (written by the
submission policy and the delivery scheduler) and the JSON lines observer.
"""

import io
import json
import sys

from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import (
    ILogObserver,
    Logger,
    LogLevel,
    LogPublisher,
    formatEvent,
    formatTime,
    globalLogPublisher,
    textFileLogObserver,
)
from twisted.logger import _logger
from twisted.python import log as legacyLog
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from smartrelay.events import rfc3339
from smartrelay.ids import IDState, startRun
from smartrelay.logs import (
    FLUSH_INTERVAL,
    MAX_LINES,
    NAMESPACE,
    BatchedLog,
    JSONLinesObserver,
    MessageLog,
    eventAsJSONLine,
    jsonObserver,
    printable,
)
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
from smartrelay.smtp.protocol import Session
from smartrelay.smtp.submission import SubmissionPolicy
from smartrelay.store.interfaces import SuppressionEntry
from smartrelay.store.memory import MemoryStore

START = 1_700_000_000.0


class Capture(list):
    """
    A log observer keeping the events it sees.
    """

    def __call__(self, event):
        self.append(event)


def capturingLog():
    events = Capture()
    return events, MessageLog(log=Logger(namespace=NAMESPACE, observer=events))


class MessageLogTests(SynchronousTestCase):
    def test_accepted(self):
        """
        The accepted line names the queue id, sender, size, number of
        recipients, client and user, each also a field of the event.
        """
        events, messages = capturingLog()
        messages.accepted(
            "2A/01-00000-6921A3F0", "a@x.example", 1234, 2, "127.0.0.1", "app1",
            helo="client.test", tls=True, tag="welcome",
        )
        [event] = events
        self.assertEqual(
            formatEvent(event),
            "accepted 2A/01-00000-6921A3F0 from=<a@x.example> size=1234 nrcpt=2 "
            "client=127.0.0.1 user=app1",
        )
        self.assertEqual(
            {k: event[k] for k in ("queue_id", "sender", "size", "nrcpt", "client", "user",
                                    "helo", "tls", "tag")},
            {"queue_id": "2A/01-00000-6921A3F0", "sender": "a@x.example", "size": 1234,
             "nrcpt": 2, "client": "127.0.0.1", "user": "app1", "helo": "client.test",
             "tls": True, "tag": "welcome"},
        )
        self.assertEqual((event["log_namespace"], event["log_level"]), (NAMESPACE, LogLevel.info))

    def test_acceptedWithoutUser(self):
        """
        Without AUTH the line has no user, and the null sender is C{<>}.
        """
        events, messages = capturingLog()
        messages.accepted("Q", "", 10, 1, "192.0.2.1")
        self.assertEqual(
            formatEvent(events[0]), "accepted Q from=<> size=10 nrcpt=1 client=192.0.2.1"
        )
        self.assertIsNone(events[0]["user"])

    def test_outcomes(self):
        """
        Each outcome is one line with recipient, relay, delay, attempts,
        status code, status and the reply; a deferral also says when the
        next attempt is; expired lines are warnings.
        """
        events, messages = capturingLog()
        messages.outcome("Q", "b@y.example", "delivered", 1.23, "250 2.0.0 Ok: queued as ABC",
                         relay="mx.y.example", dsn="2.0.0", attempts=1)
        messages.outcome("Q", "c@y.example", "deferred", 0.04, "451 4.7.1 greylisted",
                         relay="mx.y.example", dsn="4.7.1", attempts=2,
                         next_attempt="2023-11-14T22:14:20.000Z")
        messages.outcome("Q", "d@y.example", "expired", 86400, "451 4.4.1 cannot connect",
                         dsn="4.4.1", attempts=9)
        messages.outcome("Q", "e@y.example", "suppressed", 0, "unsubscribe")
        self.assertEqual(
            [formatEvent(e) for e in events],
            [
                "Q to=<b@y.example> relay=mx.y.example delay=1.2 attempts=1 dsn=2.0.0 "
                "status=delivered (250 2.0.0 Ok: queued as ABC)",
                "Q to=<c@y.example> relay=mx.y.example delay=0.0 attempts=2 dsn=4.7.1 "
                "status=deferred (451 4.7.1 greylisted) next_attempt=2023-11-14T22:14:20.000Z",
                "Q to=<d@y.example> relay=none delay=86400.0 attempts=9 dsn=4.4.1 "
                "status=expired (451 4.4.1 cannot connect)",
                "Q to=<e@y.example> relay=none delay=0.0 status=suppressed (unsubscribe)",
            ],
        )
        self.assertEqual(
            [e["log_level"] for e in events],
            [LogLevel.info, LogLevel.info, LogLevel.warn, LogLevel.info],
        )
        self.assertEqual(
            {k: events[0][k] for k in ("queue_id", "recipient", "relay", "delay", "status",
                                        "reply", "dsn", "attempts")},
            {"queue_id": "Q", "recipient": "b@y.example", "relay": "mx.y.example",
             "delay": 1.23, "status": "delivered", "reply": "250 2.0.0 Ok: queued as ABC",
             "dsn": "2.0.0", "attempts": 1},
        )

    def test_replyCannotBreakTheLine(self):
        """
        Control characters in a server's reply are escaped: one outcome
        stays one line.
        """
        events, messages = capturingLog()
        messages.outcome("Q", "b@y.example", "bounced", 1, "550 no\r\nQ to=<x> status=delivered\x1b[2J")
        text = formatEvent(events[0])
        self.assertNotIn("\n", text)
        self.assertNotIn("\r", text)
        self.assertIn("(550 no\\r\\nQ to=<x> status=delivered\\x1b[2J)", text)
        self.assertEqual(printable("plain text"), "plain text")

    def test_disabled(self):
        """
        A disabled log writes nothing.
        """
        events = Capture()
        messages = MessageLog(enabled=False, log=Logger(observer=events))
        messages.accepted("Q", "", 1, 1, "127.0.0.1")
        messages.outcome("Q", "b@y.example", "delivered", 1, "250 ok")
        self.assertEqual(events, [])


def writeLines(messages):
    """
    One line of each kind, at info and at warn, to C{messages}.
    """
    messages.accepted("2A/01-00000-6921A3F0", "a@x.example", 1234, 2, "127.0.0.1", "app1",
                      helo="client.test", tls=True, tag="welcome")
    messages.accepted("2A/01-00001-6921A3F0", "", 10, 1, "192.0.2.1")
    messages.outcome("2A/01-00000-6921A3F0", "b@y.example", "delivered", 1.23,
                     "250 2.0.0 Ok: queued as ABC", relay="mx.y.example", dsn="2.0.0", attempts=1)
    messages.outcome("2A/01-00000-6921A3F0", "c@y.example", "deferred", 0.04,
                     "451 4.7.1 greyl\u00efsted", relay="mx.y.example", dsn="4.7.1", attempts=2,
                     next_attempt="2023-11-14T22:14:20.000Z")
    messages.outcome("2A/01-00001-6921A3F0", "d@y.example", "expired", 86400,
                     "451 4.4.1 cannot connect", dsn="4.4.1", attempts=9)
    messages.outcome("2A/01-00001-6921A3F0", "e@y.example", "suppressed", 0, "unsubscribe")
    messages.parked("y.example", [("Q1", "f@y.example"), ("Q2", "g@y.example")],
                    "421 4.7.0 try later", "4.7.0", "2023-11-14T22:14:20.000Z")


class _Bytes(io.BytesIO):
    """
    A binary file whose text a L{FileLogObserver} writes as UTF-8.
    """


class BatchedMessageLogTests(SynchronousTestCase):
    """
    Given a clock, L{MessageLog} writes its lines in batches (L{BatchedLog}),
    the same lines as one event at a time.
    """

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(START + 0.7)

    def immediately(self, observer, times):
        """
        What C{observer} gets from L{writeLines} without a clock, one event
        at a time, the n-th line made at C{times[n]}.
        """
        times = iter(times)
        self.patch(_logger, "time", lambda: next(times))
        writeLines(MessageLog(log=Logger(namespace=NAMESPACE, observer=observer)))
        self.patch(_logger, "time", lambda: self.fail("time asked for"))

    def batched(self, observer, step=0.0):
        """
        L{writeLines} with a clock, the clock advancing C{step} between
        lines, and their times; nothing logged yet.
        """
        messages = MessageLog(log=Logger(namespace=NAMESPACE, observer=observer),
                              clock=self.clock)
        times = []
        clock = self.clock

        class Stepping:
            def seconds(self):
                times.append(clock.seconds())
                clock.rightNow += step
                return times[-1]

            def callLater(self, *a, **k):
                return clock.callLater(*a, **k)

        messages._batch.clock = Stepping()
        writeLines(messages)
        return messages, times

    def test_textLogFile(self):
        """
        With twistd's text log file the only observer, the lines wait for
        L{FLUSH_INTERVAL} and are then written in one C{write}: byte for
        byte what the file got one event at a time (time stamps, across a
        second, C{[smartrelay.messages#info]}, C{#warn} for an expired
        recipient).
        """
        out = io.StringIO()
        writes = []
        original = out.write
        out.write = lambda text: (writes.append(text), original(text))[1]
        self.patch(_logger, "time", lambda: self.fail("time asked for"))
        messages, times = self.batched(LogPublisher(textFileLogObserver(out)), step=0.1)
        self.assertNotEqual(int(times[0]), int(times[-1]))
        self.assertEqual(out.getvalue(), "")
        self.clock.advance(FLUSH_INTERVAL)
        self.assertEqual(len(writes), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

        expected = io.StringIO()
        self.immediately(LogPublisher(textFileLogObserver(expected)), times)
        self.assertEqual(out.getvalue(), expected.getvalue())
        text = out.getvalue()
        self.assertIn(
            formatTime(times[0]) + " [smartrelay.messages#info] accepted 2A/01-00000-6921A3F0 "
            "from=<a@x.example> size=1234 nrcpt=2 client=127.0.0.1 user=app1\n", text)
        self.assertIn(" [smartrelay.messages#warn] 2A/01-00001-6921A3F0 to=<d@y.example> ", text)
        self.assertEqual(text.count("\n"), 7)

    def test_binaryLogFile(self):
        """
        A log file the observer writes UTF-8 bytes to (twistd's C{LogFile})
        gets the same bytes.
        """
        out = _Bytes()
        messages, times = self.batched(LogPublisher(textFileLogObserver(out)))
        messages.flush()
        expected = _Bytes()
        self.immediately(LogPublisher(textFileLogObserver(expected)), times)
        self.assertEqual(out.getvalue(), expected.getvalue())
        self.assertIn("greyl\u00efsted".encode("utf-8"), out.getvalue())

    def test_otherObservers(self):
        """
        With any other observers (a test's, a JSON observer, several), each
        line is one event, in order, with its level, its fields and the time
        it was made: the very events logged one at a time.
        """
        for observers in [[Capture()], [Capture(), textFileLogObserver(io.StringIO())]]:
            publisher = LogPublisher(*observers)
            messages, times = self.batched(publisher, step=0.05)
            self.assertEqual(observers[0], [])
            self.clock.advance(FLUSH_INTERVAL)
            expected = Capture()
            self.immediately(expected, times)
            self.assertEqual(len(observers[0]), 7)
            self.assertEqual({e.pop("log_logger") for e in observers[0]}, {messages.log})
            self.assertEqual({type(e.pop("log_logger")) for e in expected}, {Logger})
            self.assertEqual(observers[0], expected)
            self.assertEqual([e["log_time"] for e in observers[0]], times)
            self.assertEqual(
                [e["log_level"] for e in observers[0]],
                [LogLevel.info] * 4 + [LogLevel.warn] + [LogLevel.info] * 2,
            )
            self.assertEqual(observers[0][0]["helo"], "client.test")

    def test_json(self):
        """
        The JSON observer writes each batched line as it did one event at a
        time.
        """
        out = io.StringIO()
        messages, times = self.batched(LogPublisher(JSONLinesObserver(out)), step=0.3)
        messages.flush()
        expected = io.StringIO()
        self.immediately(LogPublisher(JSONLinesObserver(expected)), times)
        self.assertEqual(out.getvalue(), expected.getvalue())
        self.assertEqual(json.loads(out.getvalue().splitlines()[0])["queue_id"],
                         "2A/01-00000-6921A3F0")

    def test_observerChanges(self):
        """
        Each flush looks at the observers again: a second one added to
        twistd's text log file gets events, and the file its lines.
        """
        out = io.StringIO()
        publisher = LogPublisher(textFileLogObserver(out))
        messages = MessageLog(log=Logger(namespace=NAMESPACE, observer=publisher),
                              clock=self.clock)
        messages.accepted("Q", "", 1, 1, "127.0.0.1")
        messages.flush()
        events = Capture()
        publisher.addObserver(events)
        messages.accepted("R", "", 1, 1, "127.0.0.1")
        messages.flush()
        self.assertEqual([e["queue_id"] for e in events], ["R"])
        self.assertEqual(out.getvalue().count(" [smartrelay.messages#info] accepted "), 2)

    def test_otherFormat(self):
        """
        A text file observer that formats lines otherwise than twistd's
        (another time format) gets events.
        """
        out = io.StringIO()
        publisher = LogPublisher(textFileLogObserver(out, timeFormat="%H:%M"))
        messages = MessageLog(log=Logger(namespace=NAMESPACE, observer=publisher),
                              clock=self.clock)
        messages.accepted("Q", "", 1, 1, "127.0.0.1")
        messages.flush()
        self.assertEqual(
            out.getvalue(),
            formatTime(self.clock.seconds(), "%H:%M")
            + " [smartrelay.messages#info] accepted Q from=<> size=1 nrcpt=1 client=127.0.0.1\n",
        )

    def test_full(self):
        """
        L{MAX_LINES} waiting lines are written at once.
        """
        events = Capture()
        messages = MessageLog(log=Logger(namespace=NAMESPACE, observer=events), clock=self.clock)
        for n in range(MAX_LINES - 1):
            messages.accepted(str(n), "", 1, 1, "127.0.0.1")
        self.assertEqual(events, [])
        messages.accepted("last", "", 1, 1, "127.0.0.1")
        self.assertEqual(len(events), MAX_LINES)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop(self):
        """
        L{MessageLog.stop} writes what waits, and later lines at once.
        """
        events = Capture()
        messages = MessageLog(log=Logger(namespace=NAMESPACE, observer=events), clock=self.clock)
        messages.accepted("Q", "", 1, 1, "127.0.0.1")
        messages.stop()
        self.assertEqual([e["queue_id"] for e in events], ["Q"])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        messages.outcome("Q", "b@y.example", "delivered", 1, "250 ok")
        self.assertEqual([e["queue_id"] for e in events], ["Q", "Q"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_disabled(self):
        """
        Disabled (C{log_messages = off}), it writes nothing and waits for
        nothing, even when flushed or stopped.
        """
        events = Capture()
        out = io.StringIO()
        for observer in [events, LogPublisher(textFileLogObserver(out))]:
            messages = MessageLog(False, Logger(namespace=NAMESPACE, observer=observer),
                                  clock=self.clock)
            writeLines(messages)
            self.assertEqual(self.clock.getDelayedCalls(), [])
            messages.flush()
            messages.stop()
        self.assertEqual((events, out.getvalue()), ([], ""))

    def test_withoutClock(self):
        """
        Without a clock each line is logged at once; flush and stop do
        nothing.
        """
        events, messages = capturingLog()
        messages.accepted("Q", "", 1, 1, "127.0.0.1")
        self.assertEqual(len(events), 1)
        messages.flush()
        messages.stop()
        self.assertEqual(len(events), 1)

    def test_brokenFile(self):
        """
        If the direct write fails, the lines go through the publisher
        (which deals with its broken observer).
        """
        out = io.StringIO()
        out.close()
        publisher = LogPublisher(textFileLogObserver(out))
        errors = []
        publisher._errorLoggerForObserver = lambda o: Logger(observer=errors.append)
        messages = MessageLog(log=Logger(namespace=NAMESPACE, observer=publisher),
                              clock=self.clock)
        messages.accepted("Q", "", 1, 1, "127.0.0.1")
        messages.flush()
        self.assertEqual(len(errors), 1)


class BatchedLogTests(SynchronousTestCase):
    """
    L{BatchedLog} details.
    """

    def test_newlines(self):
        """
        A line holding newlines is written as twistd writes it (its
        continuation lines indented by a tab); an empty one not at all.
        """
        clock = Clock()
        clock.advance(START)
        out, expected = io.StringIO(), io.StringIO()
        batch = BatchedLog(clock, "n", LogPublisher(textFileLogObserver(out)))
        batch.add(LogLevel.error, "two\nlines")
        batch.add(LogLevel.info, "")
        batch.flush()
        self.patch(_logger, "time", lambda: START)
        log = Logger(namespace="n", observer=LogPublisher(textFileLogObserver(expected)))
        log.emit(LogLevel.error, "{log_text}", log_text="two\nlines")
        log.emit(LogLevel.info, "{log_text}", log_text="")
        self.assertEqual(out.getvalue(), expected.getvalue())
        self.assertEqual(out.getvalue(), formatTime(START) + " [n#error] two\n\tlines\n")

    def test_roundedStamp(self):
        """
        A line made in the last microsecond of a second has the next
        second's time stamp, as twistd's (C{datetime}'s rounding) gives it;
        the others of that second keep theirs.
        """
        clock = Clock()
        out, expected = io.StringIO(), io.StringIO()
        batch = BatchedLog(clock, "n", LogPublisher(textFileLogObserver(out)))
        log = Logger(namespace="n", observer=LogPublisher(textFileLogObserver(expected)))
        for when in [START + 0.5, START + 0.9999998, START + 0.9, START + 1.0000001]:
            clock.rightNow = when
            batch.add(LogLevel.info, "x")
            self.patch(_logger, "time", lambda: when)
            log.emit(LogLevel.info, "{log_text}", log_text="x")
        batch.flush()
        self.assertEqual(out.getvalue(), expected.getvalue())
        self.assertEqual(len(set(out.getvalue().splitlines())), 2)


class SubmissionLineTests(SynchronousTestCase):
    def test_acceptedMessageLogged(self):
        """
        The submission policy writes the accepted line with the queue id of
        the 250 once the message is stored (and not for a spool failure).
        """
        from twisted.internet.defer import succeed

        class Spool:
            def store(self, entry, data):
                return succeed(entry)

        clock = Clock()
        clock.advance(START)
        store = MemoryStore()
        self.successResultOf(store.start())
        from smartrelay.events import EventLog

        events, messages = capturingLog()
        policy = SubmissionPolicy(
            clock=clock,
            hostname="relay.example",
            spool=Spool(),
            ids=startRun(IDState(), START, node=0x2A)[1],
            events=EventLog(store, clock),
            enqueue=lambda entry: None,
            messageLog=messages,
        )
        session = Session(peer="192.0.2.9", loopback=False, helo="c.test", esmtp=True,
                          tls=True, user="app1")
        queueID = self.successResultOf(
            policy.messageReceived(session, "a@x.example", ["b@y.example", "c@y.example"],
                                   b"Subject: hi\r\n\r\nbody\r\n")
        )
        [event] = events
        self.assertEqual(event["queue_id"], queueID)
        self.assertEqual(
            formatEvent(event),
            f"accepted {queueID} from=<a@x.example> size={event['size']} nrcpt=2 "
            "client=192.0.2.9 user=app1",
        )
        self.assertGreater(event["size"], len(b"Subject: hi\r\n\r\nbody\r\n"))
        clock.advance(0)


class SchedulerLineTests(SynchronousTestCase):
    """
    The scheduler writes one line per recipient and attempt, once the
    outcome is recorded.
    """

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(START)
        self.spool = FakeSpool()
        self.events = RecordingEvents()
        self.deliverer = FakeDeliverer()
        self.lines, messages = capturingLog()
        self.store = MemoryStore()
        self.successResultOf(self.store.start())
        self.scheduler = DeliveryScheduler(
            spool=self.spool,
            router=FakeRouter(),
            connector=self.deliverer,
            events=self.events,
            clock=self.clock,
            retry=Delays((60, 300)),
            maxAge=3600.0,
            maxConnections=2,
            store=self.store,
            suppress=True,
            messageLog=messages,
        )
        self.scheduler.startService()
        self.addCleanup(lambda: self.scheduler.running and self.scheduler.stopService())

    def add(self, recipients, received=START):
        entry = makeEntry("2A/01-00000-6921A3F0", recipients, received=received)
        self.spool.add(entry)
        self.scheduler.enqueue(entry)
        return entry

    def texts(self):
        return [formatEvent(e) for e in self.lines]

    def test_deliveredBouncedDeferred(self):
        """
        One attempt with three outcomes: three lines, each with the relay,
        the delay since acceptance, the status code and the reply.
        """
        self.add(["ok@example.com", "bad@example.com", "later@example.com"], received=START - 2)
        self.clock.advance(0)
        self.deliverer.calls[-1].answer(
            250, "Ok: queued as ABC", "2.0.0",
            overrides={
                "bad@example.com": Reply(550, "5.1.1", "no such user"),
                "later@example.com": Reply(452, "4.2.2", "mailbox full"),
            },
        )
        self.assertEqual(
            sorted(self.texts()),
            sorted([
                "2A/01-00000-6921A3F0 to=<ok@example.com> relay=smarthost.test:25 delay=2.0 "
                "attempts=1 dsn=2.0.0 status=delivered (250 2.0.0 Ok: queued as ABC)",
                "2A/01-00000-6921A3F0 to=<bad@example.com> relay=smarthost.test:25 delay=2.0 "
                "attempts=1 dsn=5.1.1 status=bounced (550 5.1.1 no such user)",
                "2A/01-00000-6921A3F0 to=<later@example.com> relay=smarthost.test:25 delay=2.0 "
                f"attempts=1 dsn=4.2.2 status=deferred (452 4.2.2 mailbox full) "
                f"next_attempt={rfc3339(START + 60)}",
            ]),
        )
        delivered = [e for e in self.lines if e["status"] == "delivered"][0]
        self.assertEqual(
            (delivered["queue_id"], delivered["recipient"], delivered["relay"], delivered["delay"]),
            ("2A/01-00000-6921A3F0", "ok@example.com", "smarthost.test:25", 2.0),
        )

    def test_expired(self):
        """
        A recipient that would be retried after max_age expires: a warning
        line with the last reply.
        """
        self.add(["later@example.com"], received=START - 3590)
        self.clock.advance(0)
        self.deliverer.calls[-1].answer(451, "try later", "4.3.0")
        [line] = self.lines
        self.assertEqual(line["log_level"], LogLevel.warn)
        self.assertEqual(
            formatEvent(line),
            "2A/01-00000-6921A3F0 to=<later@example.com> relay=smarthost.test:25 "
            "delay=3590.0 attempts=1 dsn=4.3.0 status=expired (451 4.3.0 try later)",
        )

    def test_suppressed(self):
        """
        A suppressed recipient gets a line with the suppression's reason
        and no relay.
        """
        self.successResultOf(
            self.store.addSuppression(SuppressionEntry(address="gone@example.com", reason="unsubscribe", time=START))
        )
        self.add(["gone@example.com"])
        self.clock.advance(0)
        self.assertEqual(
            self.texts(),
            ["2A/01-00000-6921A3F0 to=<gone@example.com> relay=none delay=0.0 "
             "status=suppressed (unsubscribe)"],
        )

    def test_noConnection(self):
        """
        When no server answered (a refused connection) the relay is none
        and the line carries the local reply.
        """
        self.deliverer.refuse["smarthost.test:25"] = Reply(451, "4.4.1", "cannot connect")
        self.add(["a@example.com"])
        self.clock.advance(0)
        [line] = self.lines
        self.assertEqual((line["status"], line["dsn"]), ("deferred", "4.4.1"))
        self.assertIn("(451 4.4.1 cannot connect)", formatEvent(line))

    def test_loggedAfterRecord(self):
        """
        The line is written only once the outcome is recorded in the spool,
        like the event.
        """
        self.spool.hold = True
        self.add(["ok@example.com"])
        self.clock.advance(0)
        self.deliverer.calls[-1].answer(250, "ok", "2.0.0")
        self.assertEqual(self.lines, [])
        self.spool.releaseRecord()
        self.assertEqual(len(self.lines), 1)


class JSONTests(SynchronousTestCase):
    def event(self, **fields):
        events = Capture()
        Logger(namespace="smartrelay.test", observer=events).info(
            fields.pop("format", "hello {name}"), **fields
        )
        return events[0]

    def test_fields(self):
        """
        A line is one JSON object: RFC 3339 time, level, namespace, the
        formatted text, and every named field.
        """
        event = self.event(name="world", queue_id="Q1", size=12, detail={"a": [1, 2]})
        event["log_time"] = START + 0.25
        line = eventAsJSONLine(event)
        self.assertNotIn("\n", line)
        self.assertEqual(
            json.loads(line),
            {
                "time": "2023-11-14T22:13:20.250Z",
                "level": "info",
                "namespace": "smartrelay.test",
                "text": "hello world",
                "name": "world",
                "queue_id": "Q1",
                "size": 12,
                "detail": {"a": [1, 2]},
            },
        )

    def test_messageLineAsJSON(self):
        """
        An outcome line carries queue id, recipient, relay, reply, delay
        and status as fields.
        """
        events, messages = capturingLog()
        messages.outcome("Q", "b@y.example", "delivered", 1.5, "250 ok", relay="mx", dsn="2.0.0",
                         attempts=1)
        record = json.loads(eventAsJSONLine(events[0]))
        self.assertEqual(
            {k: record[k] for k in ("namespace", "queue_id", "recipient", "relay", "reply",
                                     "delay", "status", "dsn", "attempts")},
            {"namespace": NAMESPACE, "queue_id": "Q", "recipient": "b@y.example", "relay": "mx",
             "reply": "250 ok", "delay": 1.5, "status": "delivered", "dsn": "2.0.0",
             "attempts": 1},
        )

    def test_oddValues(self):
        """
        Values JSON cannot hold are written as text (bytes decoded, sets as
        lists, objects as their text, NaN and odd dict keys as reprs), and
        a field named like a top-level key gets a C{field_} prefix.
        """
        class Thing:
            def __str__(self):
                return "a thing"

        event = self.event(
            format="{name}", name=b"caf\xc3\xa9", tags={"b", "a"}, thing=Thing(),
            nan=float("nan"), keys={(1, 2): "x"}, text="mine", namespace=3,
        )
        record = json.loads(eventAsJSONLine(event))
        self.assertEqual(record["name"], "café")
        self.assertEqual(record["tags"], ["a", "b"])
        self.assertEqual(record["thing"], "a thing")
        self.assertEqual(record["nan"], "nan")
        self.assertEqual(record["keys"], "{(1, 2): 'x'}")
        self.assertEqual((record["field_text"], record["field_namespace"]), ("mine", 3))
        self.assertEqual(record["namespace"], "smartrelay.test")

    def test_failure(self):
        """
        A failure's line has the message as text, the error and the
        traceback.
        """
        events = Capture()
        try:
            1 / 0
        except ZeroDivisionError:
            Logger(namespace="smartrelay.test", observer=events).failure(
                "could not {what}", Failure(), what="divide"
            )
        record = json.loads(eventAsJSONLine(events[0]))
        self.assertEqual((record["level"], record["text"]), ("critical", "could not divide"))
        self.assertEqual(record["error"], "ZeroDivisionError: division by zero")
        self.assertIn("Traceback", record["traceback"])
        self.assertEqual(record["what"], "divide")

    def test_badFormat(self):
        """
        A format that does not match its fields still gives a line.
        """
        record = json.loads(eventAsJSONLine(self.event(format="{missing}")))
        self.assertIn("Unable to format event", record["text"])

    def test_legacyEvent(self):
        """
        An old-style C{twisted.python.log.msg} event has its text and
        system, without the old-style keys.
        """
        events = Capture()
        globalLogPublisher.addObserver(events)
        self.addCleanup(globalLogPublisher.removeObserver, events)
        legacyLog.msg("old", "style", system="HTTP", custom=7)
        [event] = [e for e in events if e.get("custom") == 7]
        record = json.loads(eventAsJSONLine(event))
        self.assertEqual((record["text"], record["system"], record["custom"]), ("old style", "HTTP", 7))
        for key in ("message", "isError", "format"):
            self.assertNotIn(key, record)

    def test_minimalEvent(self):
        """
        An event with nothing in it still gives a line.
        """
        record = json.loads(eventAsJSONLine({}))
        self.assertEqual((record["level"], record["namespace"]), ("info", "-"))

    def test_observer(self):
        """
        The observer writes one line per event and flushes it; it is an
        C{ILogObserver}.
        """
        out = io.StringIO()
        observer = JSONLinesObserver(out)
        verifyObject(ILogObserver, observer)
        observer(self.event(name="a"))
        observer(self.event(name="b"))
        lines = out.getvalue().splitlines()
        self.assertEqual([json.loads(line)["text"] for line in lines], ["hello a", "hello b"])

    def test_observerNeverRaises(self):
        """
        An event that breaks the formatter is written as an error line
        instead of raising (a raising observer is dropped).
        """
        class Exploding(dict):
            def get(self, key, default=None):
                raise RuntimeError("boom")

        out = io.StringIO()
        JSONLinesObserver(out)(Exploding())
        record = json.loads(out.getvalue())
        self.assertEqual(record["level"], "error")
        self.assertIn("boom", record["text"])

    def test_jsonObserverWritesToStdout(self):
        """
        The twistd C{--logger} factory takes no arguments and writes to the
        standard output it finds when called.
        """
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        observer = jsonObserver()
        self.patch(sys, "stdout", io.StringIO())
        observer(self.event(name="x"))
        self.assertEqual(json.loads(out.getvalue())["text"], "hello x")

    def test_globalEvents(self):
        """
        Through the global publisher (as under twistd), the message lines
        reach an observer with their fields.
        """
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        MessageLog().accepted("Q", "a@x.example", 1, 1, "127.0.0.1")
        [event] = [e for e in logged if e.get("log_namespace") == NAMESPACE]
        self.assertEqual(json.loads(eventAsJSONLine(event))["queue_id"], "Q")
