"""
Tests for L{smartrelay.engine.workers}: the frame codec, a child's
L{ChildProtocol}, the L{WorkerPool} against fake processes and a L{Clock}, and a real
pool of child processes doing re-wrap jobs.
"""

import io
import os
import pickle
import re
import signal
import struct
import time
from functools import lru_cache

import dkim
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.task import Clock, LoopingCall, deferLater
from twisted.internet.testing import StringTransport
from twisted.logger import Logger, LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from smartrelay.engine import workers
from smartrelay.engine.dkim import DKIMKey, DKIMSigner, generateKey
from smartrelay.engine.downgrade import Offers
from smartrelay.engine.rewrap import RewrapJob, SigningError
from smartrelay.engine.workers import (
    BEAT_INTERVAL,
    MAX_RESTART_DELAY,
    RESTART_DELAY,
    STOP_TIMEOUT,
    STUCK_AFTER,
    YOUNG_DEATH,
    FrameDecoder,
    FrameError,
    JobFailed,
    WorkerError,
    WorkerLost,
    ChildProtocol,
    WorkerPool,
    _ForwardLog,
    encodeFrame,
)
from smartrelay.tokens import Tokens

QUEUE_ID = "79/BC-12331-5C348706"

HTML = (
    b"Received: from app.test ([127.0.0.1])\r\n\tby relay.test (smartrelay)\r\n"
    b"From: Shop <news@shop.example>\r\nTo: a@example.com\r\nSubject: hi\r\n"
    b"MIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
    b'<html><body><a href="https://shop.example/sale">Sale</a></body></html>\r\n'
)

HEADERS = [
    ("Message-ID", "<1@relay.test>"),
    ("Date", "Tue, 14 Nov 2023 22:13:20 +0000"),
    ("Feedback-ID", "spring"),
]


# Jobs: module-level so that pickle (and a real child, which imports this
# module from the project directory) finds them.


class EchoJob:
    """
    Answers with its value and the context it was given.
    """

    def __init__(self, value):
        self.value = value

    def run(self, *context):
        return (self.value, context)


class FailJob:
    """
    Raises L{TypeError} with its text.
    """

    def __init__(self, text):
        self.text = text

    def run(self, *context):
        raise TypeError(self.text)


class SleepJob:
    """
    Sleeps (in a real child) before answering C{"slept"}.
    """

    def __init__(self, seconds):
        self.seconds = seconds

    def run(self, *context):
        time.sleep(self.seconds)
        return "slept"


class PurposeError(JobFailed):
    """
    An error a job raises on purpose; it comes back as itself.
    """

    def __init__(self, what, detail):
        super().__init__(what, detail)
        self.what, self.detail = what, detail


class Unrebuildable(JobFailed):
    """
    A L{JobFailed} that pickle cannot rebuild (C{cls(*args)} fails).
    """

    def __init__(self, a, b):
        super().__init__(f"{a} {b}")


class PurposeJob:
    """
    Raises C{kind(*args)}.
    """

    def __init__(self, kind, *args):
        self.kind, self.args = kind, args

    def run(self, *context):
        raise self.kind(*self.args)


class PrintJob:
    """
    Prints (in a real child, to stderr, which the relay logs) and answers.
    """

    def __init__(self, text):
        self.text = text

    def run(self, *context):
        print(self.text)
        return "printed"


class BigResultJob:
    """
    Returns C{size} bytes.
    """

    def __init__(self, size):
        self.size = size

    def run(self, *context):
        return b"x" * self.size


class UnpicklableResultJob:
    """
    Returns something pickle cannot send back.
    """

    def run(self, *context):
        return lambda: None


class AsyncJob:
    """
    An asynchronous job: answered when the test fires its Deferred
    (C{child.state["async"][name]}); C{notify} first, if given.
    """

    def __init__(self, name, notice=None):
        self.name = name
        self.notice = notice

    def runAsync(self, child):
        if self.notice is not None:
            child.notify(*self.notice)
        d = Deferred()
        child.state.setdefault("async", {})[self.name] = d
        return d


# Made on first use (not at import: a real child imports this module to
# unpickle the jobs above).
@lru_cache(maxsize=None)
def rsaKey():
    """
    A 2048-bit RSA DKIM key: its PEM and its TXT record.
    """
    return generateKey("rsa-sha256", 2048)


def makeSigner():
    pem, _ = rsaKey()
    return DKIMSigner([DKIMKey("shop.example", "s1", "rsa-sha256", pem)])


def dnsfunc(name, timeout=5):
    """
    A dkimpy C{dnsfunc} serving the TXT record of C{s1._domainkey.shop.example}.
    """
    if name.decode("ascii").lower() == "s1._domainkey.shop.example.":
        return rsaKey()[1].encode("ascii")
    return None


def frames(data):
    """
    The unpickled payloads of the frames in C{data}, which holds whole
    frames only.
    """
    decoder = FrameDecoder()
    result = [pickle.loads(payload) for payload in decoder.feed(data)]
    assert decoder.pending == 0, "an incomplete frame"
    return result


def frameOf(value):
    return encodeFrame(pickle.dumps(value, pickle.HIGHEST_PROTOCOL))


def withoutSignatureValues(message):
    """
    C{message} with the values of its DKIM signatures' C{t=} and C{b=}
    tags blanked (they depend on the time of signing).
    """
    return re.sub(
        rb"(\bt=)[0-9]+|(\bb=)(?:[A-Za-z0-9+/=]|\r?\n[ \t]+|[ \t])+",
        lambda m: m.group(1) or m.group(2),
        message,
    )


class FrameTests(SynchronousTestCase):
    """
    L{encodeFrame} and L{FrameDecoder}.
    """

    def test_encode(self):
        """A frame is the payload's length as 4 big-endian bytes, then the payload."""
        self.assertEqual(encodeFrame(b"abc"), b"\x00\x00\x00\x03abc")
        self.assertEqual(encodeFrame(b""), b"\x00\x00\x00\x00")

    @given(
        st.lists(st.binary(max_size=300), max_size=20),
        st.data(),
    )
    @settings(max_examples=200, deadline=None)
    def test_anyChunks(self, payloads, data):
        """
        Frames concatenated and cut into arbitrary chunks come out as
        exactly the payloads, in order, with nothing pending at the end.
        """
        stream = b"".join(encodeFrame(p) for p in payloads)
        cuts = sorted(data.draw(st.sets(st.integers(0, len(stream)))))
        bounds = [0] + cuts + [len(stream)]
        decoder = FrameDecoder()
        received = []
        for start, end in zip(bounds, bounds[1:]):
            received.extend(decoder.feed(stream[start:end]))
            # What is held is never more than the incomplete tail.
            self.assertLessEqual(decoder.pending, len(stream) - sum(4 + len(p) for p in received))
        self.assertEqual(received, payloads)
        self.assertEqual(decoder.pending, 0)

    def test_pending(self):
        """C{pending} counts the bytes of the incomplete frame held."""
        decoder = FrameDecoder()
        frame = encodeFrame(b"hello")
        self.assertEqual(list(decoder.feed(frame[:2])), [])
        self.assertEqual(decoder.pending, 2)
        self.assertEqual(list(decoder.feed(frame[2:7])), [])
        self.assertEqual(decoder.pending, 7)
        self.assertEqual(list(decoder.feed(frame[7:] + frame[:1])), [b"hello"])
        self.assertEqual(decoder.pending, 1)

    def test_feedIsEager(self):
        """
        C{feed} keeps its data even when the caller does not iterate the
        result: the bytes are buffered at once.
        """
        decoder = FrameDecoder()
        frame = encodeFrame(b"hello")
        decoder.feed(frame[:3])
        self.assertEqual(decoder.pending, 3)
        self.assertEqual(list(decoder.feed(frame[3:])), [b"hello"])

    def test_maxFrame(self):
        """A frame of exactly C{maxFrame} bytes is accepted."""
        decoder = FrameDecoder(maxFrame=10)
        self.assertEqual(list(decoder.feed(encodeFrame(b"x" * 10))), [b"x" * 10])

    @given(st.integers(11, 0xFFFFFFFF))
    def test_overMaxFrame(self, size):
        """
        A length over C{maxFrame} raises L{FrameError} as soon as the
        length has arrived, without waiting for the payload.
        """
        decoder = FrameDecoder(maxFrame=10)
        with self.assertRaises(FrameError):
            list(decoder.feed(struct.pack(">I", size)))

    def test_overMaxFrameAfterGoodOnes(self):
        """
        Payloads before a bad length are still yielded; the error comes
        when the bad length is reached.
        """
        decoder = FrameDecoder(maxFrame=10)
        payloads = decoder.feed(encodeFrame(b"one") + encodeFrame(b"two") + struct.pack(">I", 11))
        self.assertEqual(next(payloads), b"one")
        self.assertEqual(next(payloads), b"two")
        self.assertRaises(FrameError, next, payloads)

    def test_frameErrorIsValueError(self):
        """L{FrameError} is a L{ValueError}."""
        self.assertTrue(issubclass(FrameError, ValueError))

    def test_encodeOverLimit(self):
        """L{encodeFrame} refuses a payload over C{MAX_FRAME}."""
        self.patch(workers, "MAX_FRAME", 8)
        self.assertEqual(encodeFrame(b"x" * 8), b"\x00\x00\x00\x08" + b"x" * 8)
        self.assertRaises(FrameError, encodeFrame, b"x" * 9)


class TrickleStream(io.BytesIO):
    """
    A stream whose reads return at most C{most} bytes, as a pipe may.
    """

    def __init__(self, data, most):
        super().__init__(data)
        self.most = most

    def read(self, size=-1):
        if size is None or size < 0:
            size = self.most
        return super().read(min(size, self.most))


class ChildProtocolTests(SynchronousTestCase):
    """
    L{ChildProtocol}, a child's end of the pipes.
    """

    context = ("signer", "tokens")

    def child(self):
        child = ChildProtocol(Clock())
        transport = StringTransport()
        child.makeConnection(transport)
        return child, transport

    def serve(self, data, chunk=None):
        """
        Feed C{data} in chunks of C{chunk} bytes, end the input, and give
        the answers; the output is closed at the end.
        """
        child, transport = self.child()
        step = chunk or max(1, len(data))
        for start in range(0, len(data), step):
            child.dataReceived(data[start : start + step])
        child.readConnectionLost()
        self.assertTrue(transport.disconnecting)
        return frames(transport.value())

    def test_answers(self):
        """After the context frame, each job frame gets its answer, in order, run with the context."""
        data = frameOf(self.context) + b"".join(
            frameOf((i, EchoJob(f"job {i}"))) for i in (7, 3, 9)
        )
        self.assertEqual(
            self.serve(data),
            [(i, True, (f"job {i}", self.context)) for i in (7, 3, 9)],
        )

    @given(st.lists(st.binary(max_size=200), max_size=8), st.integers(1, 10))
    @settings(deadline=None)
    def test_shortReads(self, values, most):
        """Input arriving in pieces of any size (a pipe) changes nothing."""
        data = frameOf(self.context) + b"".join(
            frameOf((i, EchoJob(value))) for i, value in enumerate(values)
        )
        self.assertEqual(
            self.serve(data, most),
            [(i, True, (value, self.context)) for i, value in enumerate(values)],
        )

    def test_error(self):
        """A job that raises is answered C{(id, False, "TypeName: text")}, and serving continues."""
        data = (
            frameOf(self.context)
            + frameOf((1, EchoJob("a")))
            + frameOf((2, FailJob("no good")))
            + frameOf((3, EchoJob("b")))
        )
        self.assertEqual(
            self.serve(data),
            [
                (1, True, ("a", self.context)),
                (2, False, "TypeError: no good"),
                (3, True, ("b", self.context)),
            ],
        )

    def test_endBeforeContext(self):
        """No input at all: nothing is answered, the output is closed."""
        self.assertEqual(self.serve(b""), [])

    def test_endInContext(self):
        """Input ending inside the context frame (its length or its payload): nothing answered."""
        context = frameOf(self.context)
        for end in (1, 3, 4, 5, len(context) - 1):
            self.assertEqual(self.serve(context[:end]), [], end)

    def test_endAfterContext(self):
        """Input ending right after the context: nothing answered."""
        self.assertEqual(self.serve(frameOf(self.context)), [])

    def test_endInJob(self):
        """Input ending inside a job frame: the jobs before it are answered, then the output closed."""
        job = frameOf((2, EchoJob("b")))
        head = frameOf(self.context) + frameOf((1, EchoJob("a")))
        for end in (1, 4, 5, len(job) - 1):
            self.assertEqual(self.serve(head + job[:end]), [(1, True, ("a", self.context))], end)

    def test_overLimit(self):
        """
        A frame length over C{MAX_FRAME}: the stream is not ours; the child
        says so on stderr and closes its end, answering nothing more.
        """
        self.patch(workers, "MAX_FRAME", 100)
        stderr = io.StringIO()
        self.patch(workers.sys, "stderr", stderr)
        child, transport = self.child()
        child.dataReceived(frameOf(self.context) + struct.pack(">I", 101) + b"x" * 101)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"")
        self.assertIn("over the limit", stderr.getvalue())

    def test_garbage(self):
        """
        A frame pickle cannot read, or a request that is not C{(id, job)}:
        the stream is not ours; the child says so on stderr and closes
        its end, after answering what came before.
        """
        for bad in (encodeFrame(b"not a pickle"), frameOf(("one", "two", "three"))):
            stderr = io.StringIO()
            self.patch(workers.sys, "stderr", stderr)
            child, transport = self.child()
            child.dataReceived(frameOf(self.context) + frameOf((1, EchoJob("a"))) + bad)
            self.assertTrue(transport.disconnecting)
            self.assertEqual(frames(transport.value()), [(1, True, ("a", self.context))])
            self.assertIn("bad input from the relay", stderr.getvalue())

    def test_jobFailedAsItself(self):
        """
        A L{JobFailed} is answered as the exception itself, so that the
        relay sees its type and fields; one that cannot be rebuilt from
        its pickle is answered as text.
        """
        data = (
            frameOf(self.context)
            + frameOf((1, PurposeJob(PurposeError, "dkim", "KeyError: x")))
            + frameOf((2, PurposeJob(Unrebuildable, "a", "b")))
        )
        (first, second) = self.serve(data)
        self.assertEqual(first[:2], (1, False))
        self.assertIsInstance(first[2], PurposeError)
        self.assertEqual((first[2].what, first[2].detail), ("dkim", "KeyError: x"))
        self.assertEqual(second, (2, False, "Unrebuildable: a b"))

    def test_unpicklableResult(self):
        """
        A job whose result cannot be pickled is answered C{(id, False,
        error text)} like any job that fails, and serving goes on (the
        child does not die, failing every job it holds).
        """
        data = (
            frameOf(self.context)
            + frameOf((1, UnpicklableResultJob()))
            + frameOf((2, EchoJob("b")))
        )
        answers = self.serve(data)
        self.assertEqual(len(answers), 2)
        self.assertEqual(answers[0][:2], (1, False))
        self.assertEqual(answers[1], (2, True, ("b", self.context)))

    def test_resultOverLimit(self):
        """
        A result too big for one frame is answered with an error, and
        serving goes on.
        """
        data = (
            frameOf(self.context)
            + frameOf((1, BigResultJob(200)))
            + frameOf((2, EchoJob("b")))
        )
        self.patch(workers, "MAX_FRAME", 150)
        answers = self.serve(data)
        self.assertEqual(answers[0][:2], (1, False))
        self.assertIn("FrameError", answers[0][2])
        self.assertEqual(answers[1], (2, True, ("b", self.context)))

    def test_asyncJob(self):
        """
        A job with C{runAsync} is given the child and answered when its
        Deferred fires; jobs after it are answered meanwhile.
        """
        child, transport = self.child()
        child.dataReceived(
            frameOf(self.context)
            + frameOf((1, AsyncJob("slow")))
            + frameOf((2, EchoJob("quick")))
            + frameOf((3, AsyncJob("failing")))
        )
        self.assertEqual(frames(transport.value()), [(2, True, ("quick", self.context))])
        transport.clear()
        child.state["async"]["failing"].errback(TypeError("broken"))
        child.state["async"]["slow"].callback("done")
        self.assertEqual(
            frames(transport.value()), [(3, False, "TypeError: broken"), (1, True, "done")]
        )

    def test_beats(self):
        """A child says it is alive every C{BEAT_INTERVAL} seconds, until it ends."""
        child, transport = self.child()
        child.reactor.advance(BEAT_INTERVAL)
        child.reactor.advance(BEAT_INTERVAL)
        self.assertEqual(frames(transport.value()), [(None, "beat", None)] * 2)
        child.connectionLost()
        self.assertEqual(child.reactor.getDelayedCalls(), [])

    def test_notify(self):
        """C{notify(kind, value)} writes the notice C{(None, kind, value)}."""
        child, transport = self.child()
        child.dataReceived(frameOf(self.context) + frameOf((1, AsyncJob("a", ("hello", 42)))))
        self.assertEqual(frames(transport.value()), [(None, "hello", 42)])

    def test_endWaitsForAsync(self):
        """
        When the input ends, the stop hooks run and the output is closed
        only once they and the asynchronous jobs are done; their answers
        are still written.
        """
        child, transport = self.child()
        child.dataReceived(frameOf(self.context) + frameOf((1, AsyncJob("a"))))
        hook = Deferred()
        called = []
        child.onStop(lambda: called.append(True) or hook)
        child.readConnectionLost()
        self.assertEqual(called, [True])
        self.assertFalse(transport.disconnecting)
        child.state["async"]["a"].callback("late")
        self.assertFalse(transport.disconnecting)
        hook.callback(None)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(frames(transport.value()), [(1, True, "late")])
        self.assertNoResult(child.finished)
        child.connectionLost()
        self.successResultOf(child.finished)

    def test_outputGone(self):
        """Nobody reads the answers (the relay is gone): the child finishes at once."""
        child, transport = self.child()
        child.dataReceived(frameOf(self.context) + frameOf((1, AsyncJob("a"))))
        child.writeConnectionLost()
        self.successResultOf(child.finished)

    def test_forwardLog(self):
        """
        The child's log events at C{info} and above go to the relay as
        C{"log"} notices, with the traceback of a failure; debug ones do
        not.
        """
        child, transport = self.child()
        log = Logger(observer=_ForwardLog(child))
        log.debug("quiet")
        log.info("TLS with {remote} failed", remote="mx.example")
        try:
            1 / 0
        except ZeroDivisionError:
            log.failure("broken")
        (info, failure) = frames(transport.value())
        self.assertEqual(info, (None, "log", ("info", "TLS with mx.example failed")))
        self.assertEqual(failure[:2], (None, "log"))
        self.assertEqual(failure[2][0], "critical")
        self.assertIn("ZeroDivisionError", failure[2][1])


class FakeProcess:
    """
    A process transport: records what the pool does to it.
    """

    def __init__(self, protocol, pid):
        self.protocol = protocol
        self.pid = pid
        self.written = []
        self.stdinClosed = False
        self.signals = []

    def write(self, data):
        self.written.append(data)

    def closeStdin(self):
        self.stdinClosed = True

    def signalProcess(self, sig):
        self.signals.append(sig)

    def received(self):
        """
        What the pool sent, unpickled: its context, then C{(id, job)}s.
        """
        return frames(b"".join(self.written))

    def requests(self):
        """
        The C{(id, job)} pairs sent (after the context).
        """
        return self.received()[1:]

    def answer(self, requestID, ok, value, pieces=1):
        """
        Answer on stdout, cut into C{pieces} calls.
        """
        frame = frameOf((requestID, ok, value))
        step = -(-len(frame) // pieces)
        for start in range(0, len(frame), step):
            self.protocol.childDataReceived(1, frame[start : start + step])

    def die(self, signal=9):
        self.protocol.processEnded(Failure(ProcessTerminated(None, signal, None)))

    def exit(self):
        self.protocol.processEnded(Failure(ProcessDone(0)))


class FakeSpawn:
    """
    A C{spawn(reactor, protocol)} connecting each protocol to a L{FakeProcess}.
    """

    def __init__(self):
        self.processes = []

    def __call__(self, reactor, protocol):
        process = FakeProcess(protocol, 1000 + len(self.processes))
        self.processes.append(process)
        protocol.makeConnection(process)
        return process


class PoolTests(SynchronousTestCase):
    """
    L{WorkerPool} with fake processes and a L{Clock}.
    """

    context = ("signer", "tokens")

    def setUp(self):
        self.clock = Clock()
        self.spawn = FakeSpawn()
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def pool(self, count=2, start=True):
        pool = WorkerPool(self.clock, count, spawn=self.spawn)
        if start:
            pool.start(*self.context)
        return pool

    def process(self, worker):
        [process] = [p for p in self.spawn.processes if p.protocol is worker]
        return process

    def restartDelays(self):
        """
        The delays of the pending respawns, from now.
        """
        return sorted(
            c.getTime() - self.clock.seconds()
            for c in self.clock.getDelayedCalls()
            if not isinstance(c.func, LoopingCall)  # the watch for stuck children
        )

    def test_stuckChildKilled(self):
        """
        A child that holds a job and says nothing for C{STUCK_AFTER}
        seconds (a job looping forever) is killed, its jobs failing with
        L{WorkerLost}, and replaced; one that keeps beating is not, nor is
        an idle one.
        """
        pool = self.pool(3)
        stuck, beating, idle = self.spawn.processes
        job = pool.runOn(stuck.protocol, EchoJob("x"))
        pool.runOn(beating.protocol, EchoJob("y"))
        for _ in range(int(STUCK_AFTER / BEAT_INTERVAL) + 1):
            beating.protocol.childDataReceived(1, frameOf((None, "beat", None)))
            self.clock.advance(BEAT_INTERVAL)
        self.assertEqual(stuck.signals, ["KILL"])
        self.assertEqual((beating.signals, idle.signals), ([], []))
        errors = [e for e in self.events if e.get("log_level") == LogLevel.error]
        self.assertIn("has said nothing", errors[0]["log_format"])
        stuck.die()
        self.failureResultOf(job, WorkerLost)
        self.assertEqual(self.restartDelays(), [RESTART_DELAY])
        self.flushLoggedErrors()

    def test_countBelowOne(self):
        """A pool of fewer than one worker is refused."""
        for count in (0, -1):
            self.assertRaises(ValueError, WorkerPool, self.clock, count, spawn=self.spawn)

    def test_preload(self):
        """
        A pool with modules to preload gives each child, after the context
        and before any job, the job that imports them; a child whose import
        fails is logged and serves on.
        """
        pool = WorkerPool(self.clock, 2, spawn=self.spawn, preload=("json", "no.such"))
        pool.start(*self.context)
        for process in self.spawn.processes:
            context, (rid, job) = process.received()
            self.assertEqual(context, self.context)
            self.assertIsInstance(job, workers.Preload)
            self.assertEqual(job.modules, ("json", "no.such"))
        a = self.spawn.processes[0]
        [(rid, job)] = a.requests()
        self.assertRaises(ModuleNotFoundError, job.run, *self.context)
        a.answer(rid, False, "ModuleNotFoundError: No module named 'no'")
        self.assertEqual(len(self.flushLoggedErrors(WorkerError)), 1)
        self.assertTrue(pool.available)

    def test_startWritesContextFirst(self):
        """C{start} spawns C{count} children and writes each the context frame before anything else."""
        pool = self.pool(3)
        self.assertEqual(len(self.spawn.processes), 3)
        self.assertTrue(pool.available)
        for process in self.spawn.processes:
            self.assertEqual(process.received(), [self.context])
        pool.run(EchoJob("x"))
        first = self.spawn.processes[0].received()
        self.assertEqual(first[0], self.context)
        self.assertEqual(first[1][0], 1)

    def test_notStarted(self):
        """Before C{start}, the pool is not available and C{run} fails with L{WorkerLost}."""
        pool = self.pool(start=False)
        self.assertFalse(pool.available)
        self.failureResultOf(pool.run(EchoJob("x")), WorkerLost)
        self.assertEqual(self.spawn.processes, [])

    def test_leastBusy(self):
        """C{run} sends each job to the live worker with the fewest outstanding jobs."""
        pool = self.pool(3)
        a, b, c = self.spawn.processes
        for i in range(3):
            pool.run(EchoJob(i))
        self.assertEqual([len(p.requests()) for p in (a, b, c)], [1, 1, 1])
        [(idB, _)] = b.requests()
        b.answer(idB, True, "done")
        pool.run(EchoJob("next"))
        self.assertEqual([len(p.requests()) for p in (a, b, c)], [1, 2, 1])
        self.assertEqual(b.requests()[1][1].value, "next")
        # Each later job goes to one of those holding fewest.
        for i in range(9):
            before = [len(p.protocol.waiting) for p in (a, b, c)]
            pool.run(EchoJob(i))
            after = [len(p.protocol.waiting) for p in (a, b, c)]
            [chosen] = [n for n in range(3) if after[n] == before[n] + 1]
            self.assertEqual(before[chosen], min(before))
        self.assertEqual([len(p.protocol.waiting) for p in (a, b, c)], [4, 4, 4])

    def test_requestIDsUnique(self):
        """Every job gets its own request id."""
        pool = self.pool(2)
        for i in range(6):
            pool.run(EchoJob(i))
        ids = [rid for p in self.spawn.processes for rid, _ in p.requests()]
        self.assertEqual(sorted(ids), sorted(set(ids)))
        self.assertEqual(len(ids), 6)

    def test_answers(self):
        """Answers, in any order and cut anywhere, fire the Deferreds of their jobs."""
        pool = self.pool(2)
        a, b = self.spawn.processes
        ds = [pool.run(EchoJob(i)) for i in range(4)]
        # Jobs alternate: a holds 0 and 2, b holds 1 and 3.
        (id0, _), (id2, _) = a.requests()
        (id1, _), (id3, _) = b.requests()
        b.answer(id3, True, "three", pieces=7)
        a.answer(id2, True, "two", pieces=100)
        self.assertEqual(self.successResultOf(ds[3]), "three")
        self.assertEqual(self.successResultOf(ds[2]), "two")
        self.assertNoResult(ds[0])
        self.assertNoResult(ds[1])
        # One cut inside its length.
        zero = frameOf((id0, True, "zero"))
        a.protocol.childDataReceived(1, zero[:3])
        self.assertNoResult(ds[0])
        a.protocol.childDataReceived(1, zero[3:])
        b.answer(id1, True, "one")
        self.assertEqual(self.successResultOf(ds[0]), "zero")
        self.assertEqual(self.successResultOf(ds[1]), "one")

    def test_manyAnswersOneChunk(self):
        """Several answers arriving in one chunk all fire."""
        pool = self.pool(1)
        [a] = self.spawn.processes
        ds = [pool.run(EchoJob(i)) for i in range(3)]
        a.protocol.childDataReceived(
            1, b"".join(frameOf((rid, True, job.value * 10)) for rid, job in a.requests())
        )
        self.assertEqual([self.successResultOf(d) for d in ds], [0, 10, 20])

    def test_errorAnswer(self):
        """A C{False} answer fails the job with L{WorkerError} carrying the child's text."""
        pool = self.pool(1)
        [a] = self.spawn.processes
        d = pool.run(FailJob("x"))
        [(rid, _)] = a.requests()
        a.answer(rid, False, "TypeError: x")
        failure = self.failureResultOf(d, WorkerError)
        self.assertEqual(str(failure.value), "TypeError: x")
        # The worker is still in use.
        self.assertTrue(pool.available)
        self.assertEqual(a.signals, [])

    def test_jobFailedAnswer(self):
        """A L{JobFailed} answer fails the job with that very exception."""
        pool = self.pool(1)
        [a] = self.spawn.processes
        d = pool.run(PurposeJob(PurposeError, "dkim", "KeyError: x"))
        [(rid, _)] = a.requests()
        a.answer(rid, False, PurposeError("dkim", "KeyError: x"))
        failure = self.failureResultOf(d, PurposeError)
        self.assertEqual(failure.value.detail, "KeyError: x")
        self.assertTrue(pool.available)

    def test_deathFailsOutstanding(self):
        """
        A child that dies fails the jobs it held with L{WorkerLost}; the
        other child's jobs are untouched; a new child is started after
        C{RESTART_DELAY}, with the context first and the same number.
        """
        pool = self.pool(2)
        a, b = self.spawn.processes
        ds = [pool.run(EchoJob(i)) for i in range(4)]
        number = a.protocol.number
        a.die()
        for d in (ds[0], ds[2]):
            failure = self.failureResultOf(d, WorkerLost)
            self.assertIn("ended", str(failure.value))
        self.assertNoResult(ds[1])
        self.assertNoResult(ds[3])
        self.assertEqual([w.transport for w in pool.workers], [b])
        self.assertTrue(pool.available)
        self.assertEqual(self.restartDelays(), [RESTART_DELAY])
        # Meanwhile jobs go to the live one.
        pool.run(EchoJob("meanwhile"))
        self.assertEqual(len(b.requests()), 3)
        self.clock.advance(RESTART_DELAY - 0.001)
        self.assertEqual(len(self.spawn.processes), 2)
        self.clock.advance(0.001)
        self.assertEqual(len(self.spawn.processes), 3)
        c = self.spawn.processes[2]
        self.assertEqual(c.received(), [self.context])
        self.assertEqual(c.protocol.number, number)
        self.assertEqual(len(pool.workers), 2)
        # And the new one takes work.
        d = pool.run(EchoJob("new"))
        [(rid, _)] = c.requests()
        c.answer(rid, True, "fresh")
        self.assertEqual(self.successResultOf(d), "fresh")

    def test_youngDeathsDoubleDelay(self):
        """Children that keep dying young are replaced after a pause that doubles, up to C{MAX_RESTART_DELAY}."""
        self.pool(1)
        delays = []
        for _ in range(10):
            self.spawn.processes[-1].die()
            [delay] = self.restartDelays()
            delays.append(delay)
            self.clock.advance(delay)
        expected = []
        delay = RESTART_DELAY
        for _ in range(10):
            expected.append(delay)
            delay = min(delay * 2, MAX_RESTART_DELAY)
        self.assertEqual(delays, expected)
        self.assertEqual(delays[-1], MAX_RESTART_DELAY)
        self.assertEqual(len(self.spawn.processes), 11)

    def test_oldDeathResets(self):
        """After a child that lived longer than C{YOUNG_DEATH} dies, the pause is back to C{RESTART_DELAY}."""
        self.pool(1)
        for _ in range(4):
            self.spawn.processes[-1].die()
            [delay] = self.restartDelays()
            self.clock.advance(delay)
        self.clock.advance(YOUNG_DEATH + 1)
        self.spawn.processes[-1].die()
        [delay] = self.restartDelays()
        self.clock.advance(delay)
        # The next (young) death waits the base delay again.
        self.spawn.processes[-1].die()
        self.assertEqual(self.restartDelays(), [RESTART_DELAY])

    def test_oldDeathRestartsAfterBaseDelay(self):
        """
        A child that dies after living longer than C{YOUNG_DEATH} is
        replaced after C{RESTART_DELAY}, not after the pause grown by an
        earlier burst of young deaths.
        """
        self.pool(1)
        for _ in range(6):
            self.spawn.processes[-1].die()
            [delay] = self.restartDelays()
            self.clock.advance(delay)
        self.clock.advance(3600)
        self.spawn.processes[-1].die()
        self.assertEqual(self.restartDelays(), [RESTART_DELAY])


    def test_noLiveWorker(self):
        """With every child dead (before replacement), C{run} fails with L{WorkerLost}."""
        pool = self.pool(1)
        [a] = self.spawn.processes
        a.die()
        self.assertFalse(pool.available)
        self.failureResultOf(pool.run(EchoJob("x")), WorkerLost)
        self.assertEqual(a.requests(), [])
        self.clock.advance(RESTART_DELAY)
        self.assertTrue(pool.available)
        pool.run(EchoJob("x"))
        self.assertEqual(len(self.spawn.processes[-1].requests()), 1)

    def test_garbageKills(self):
        """An answer that does not unpickle makes the pool kill that child (and log why)."""
        pool = self.pool(2)
        a, b = self.spawn.processes
        d = pool.run(EchoJob("x"))
        a.protocol.childDataReceived(1, encodeFrame(b"not a pickle"))
        self.assertEqual(a.signals, ["KILL"])
        self.assertEqual(b.signals, [])
        self.assertTrue(self.flushLoggedErrors())
        # When it is gone, its job fails with WorkerLost.
        self.assertNoResult(d)
        a.die()
        self.failureResultOf(d, WorkerLost)
        self.assertEqual(self.restartDelays(), [RESTART_DELAY])

    def test_unknownRequestKills(self):
        """An answer to a request the child was never sent makes the pool kill it."""
        self.pool(1)
        [a] = self.spawn.processes
        a.answer(12345, True, "?")
        self.assertEqual(a.signals, ["KILL"])
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)

    def test_oversizedAnswerKills(self):
        """An answer length over the frame limit makes the pool kill the child."""
        self.pool(1)
        [a] = self.spawn.processes
        a.protocol.childDataReceived(1, b"\xff\xff\xff\xff")
        self.assertEqual(a.signals, ["KILL"])
        self.assertEqual(len(self.flushLoggedErrors(FrameError)), 1)

    def test_badTupleKills(self):
        """A well-pickled answer that is not a C{(id, ok, value)} triple makes the pool kill the child."""
        self.pool(1)
        [a] = self.spawn.processes
        a.protocol.childDataReceived(1, frameOf("hello"))
        self.assertEqual(a.signals, ["KILL"])
        self.assertTrue(self.flushLoggedErrors(ValueError))

    def test_stderrLogged(self):
        """A child's stderr is logged line by line, a partial line when it is complete."""
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.pool(2)
        a, b = self.spawn.processes
        a.protocol.childDataReceived(2, b"Traceback (most recent\xff call last):\nline t")
        b.protocol.childDataReceived(2, b"other\n")
        a.protocol.childDataReceived(2, b"wo\n")
        lines = [(e["number"], e["line"]) for e in events if "line" in e and "number" in e]
        self.assertEqual(
            lines,
            [
                (a.protocol.number, "Traceback (most recent\ufffd call last):"),
                (b.protocol.number, "other"),
                (a.protocol.number, "line two"),
            ],
        )
        # Stderr is no answer: nothing killed.
        self.assertEqual(a.signals + b.signals, [])

    def test_stop(self):
        """
        C{stop} closes every child's input; its Deferred fires once all
        have ended, with no respawn and no kill.
        """
        pool = self.pool(2)
        a, b = self.spawn.processes
        job = pool.run(EchoJob("held"))
        d = pool.stop()
        self.assertTrue(a.stdinClosed)
        self.assertTrue(b.stdinClosed)
        self.assertFalse(pool.available)
        self.failureResultOf(pool.run(EchoJob("late")), WorkerLost)
        # A child finishes what it holds.
        [(rid, _)] = a.requests()
        a.answer(rid, True, "finished")
        self.assertEqual(self.successResultOf(job), "finished")
        a.exit()
        self.assertNoResult(d)
        b.exit()
        self.successResultOf(d)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(a.signals + b.signals, [])
        self.assertEqual(len(self.spawn.processes), 2)
        self.assertEqual(pool.workers, [])

    def test_stopKills(self):
        """Children still there C{STOP_TIMEOUT} seconds after C{stop} are killed."""
        pool = self.pool(3)
        a, b, c = self.spawn.processes
        d = pool.stop()
        a.exit()
        self.clock.advance(STOP_TIMEOUT - 0.001)
        self.assertEqual(b.signals + c.signals, [])
        self.clock.advance(0.001)
        self.assertEqual((a.signals, b.signals, c.signals), ([], ["KILL"], ["KILL"]))
        self.assertNoResult(d)
        b.die()
        c.die()
        self.successResultOf(d)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(len(self.spawn.processes), 3)

    def test_stopFailsHeldJobsOfKilled(self):
        """A job held by a child killed at stop fails with L{WorkerLost}."""
        pool = self.pool(1)
        [a] = self.spawn.processes
        job = pool.run(SleepJob(100))
        pool.stop()
        self.clock.advance(STOP_TIMEOUT)
        self.assertEqual(a.signals, ["KILL"])
        a.die()
        self.failureResultOf(job, WorkerLost)

    def test_stopCancelsRespawn(self):
        """C{stop} cancels a pending respawn; with no child left its Deferred has already fired."""
        pool = self.pool(1)
        [a] = self.spawn.processes
        a.die()
        self.assertEqual(len(self.restartDelays()), 1)
        d = pool.stop()
        self.successResultOf(d)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(MAX_RESTART_DELAY * 10)
        self.assertEqual(len(self.spawn.processes), 1)
        self.assertFalse(pool.available)

    def test_stopCancelsRespawnWithLiveOnes(self):
        """C{stop} with one child dead (respawn pending) and one alive: no respawn, fires when the live one ends."""
        pool = self.pool(2)
        a, b = self.spawn.processes
        a.die()
        d = pool.stop()
        self.assertTrue(b.stdinClosed)
        self.assertFalse(a.stdinClosed)
        b.exit()
        self.successResultOf(d)
        self.clock.advance(MAX_RESTART_DELAY * 10)
        self.assertEqual(len(self.spawn.processes), 2)

    def test_deathAfterStopNoRespawn(self):
        """A child that dies after C{stop} is not replaced."""
        pool = self.pool(1)
        [a] = self.spawn.processes
        d = pool.stop()
        a.die()
        self.successResultOf(d)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(MAX_RESTART_DELAY * 10)
        self.assertEqual(len(self.spawn.processes), 1)


class RealWorkerTests(TestCase):
    """
    A L{WorkerPool} of real child processes (C{python -m
    smartrelay.engine.workers}) on the real reactor, doing re-wrap jobs.
    """

    timeout = 60

    def setUp(self):
        self.signer = makeSigner()
        self.tokens = Tokens([b"k" * 32])
        self.pool = WorkerPool(reactor, 2)
        # Cleanups run last first: stop the pool, then check.
        self.addCleanup(self.noneLeft)
        self.pool.start(self.signer, self.tokens)
        self.addCleanup(self.pool.stop)
        self.pids = [w.transport.pid for w in self.pool.workers]

    def noneLeft(self):
        """
        Checked after the pool has stopped: none of its children is
        left, not even as a zombie.
        """
        self.assertEqual(self.pool.workers, [])
        for pid in self.pids:
            self.assertFalse(alive(pid), pid)

    def job(self, recipient="a@example.com", data=HTML, offers=Offers()):
        return RewrapJob(
            data,
            HEADERS,
            "https://t.example/t/o/pixel.gif",
            ("https://t.example", QUEUE_ID, recipient),
            offers,
        )

    @inlineCallbacks
    def test_rewrap(self):
        """
        A child's re-wrap is what the job gives in process, but for the
        signing time; its DKIM signature verifies; the link is tracked.
        """
        job = self.job()
        prepared = yield self.pool.run(job)
        message = prepared.data
        expected = job.run(self.signer, self.tokens).data
        self.assertEqual(withoutSignatureValues(message), withoutSignatureValues(expected))
        self.assertTrue(message.startswith(b"DKIM-Signature:"))
        self.assertTrue(dkim.verify(message, dnsfunc=dnsfunc))
        self.assertFalse(dkim.verify(message.replace(b"Sale", b"Sole"), dnsfunc=dnsfunc))
        self.assertNotIn(b'href="https://shop.example/sale"', message)
        token = message.split(b"https://t.example/t/c/", 1)[1].split(b'"', 1)[0].decode("ascii")
        click = self.tokens.read("c", token)
        self.assertEqual(
            (click.queue_id, click.recipient, click.url),
            (QUEUE_ID, "a@example.com", "https://shop.example/sale"),
        )
        self.assertIn(b"https://t.example/t/o/pixel.gif", message)

    @inlineCallbacks
    def test_manyJobs(self):
        """Many jobs at once, spread over both children, each get their own answer."""
        recipients = [f"r{i}@example.com" for i in range(20)]
        ds = [self.pool.run(self.job(r)) for r in recipients]
        self.assertEqual(sorted(len(w.waiting) for w in self.pool.workers), [10, 10])
        for recipient, d in zip(recipients, ds):
            message = (yield d).data
            token = message.split(b"https://t.example/t/c/", 1)[1].split(b'"', 1)[0].decode("ascii")
            self.assertEqual(self.tokens.read("c", token).recipient, recipient)
            self.assertTrue(dkim.verify(message, dnsfunc=dnsfunc))

    @inlineCallbacks
    def test_error(self):
        """A job that raises in the child fails with L{WorkerError}; the child goes on."""
        failure = yield self.assertFailure(self.pool.run(FailJob("bad input")), WorkerError)
        self.assertEqual(str(failure), "TypeError: bad input")
        bad = RewrapJob(None, [], None, None, Offers())
        yield self.assertFailure(self.pool.run(bad), WorkerError)
        message = (yield self.pool.run(self.job())).data
        self.assertTrue(dkim.verify(message, dnsfunc=dnsfunc))
        self.assertEqual([w.transport.pid for w in self.pool.workers], self.pids)

    @inlineCallbacks
    def test_signingErrorComesBack(self):
        """
        A job whose DKIM signing fails in the child fails with that
        L{SigningError} in the relay (not a mere L{WorkerError}), so the
        scheduler can say why it defers; the child goes on.
        """
        bad = HTML.replace(b"Subject: hi\r\n", b"Subject: hi\r\n:bad\r\n")
        error = yield self.assertFailure(self.pool.run(self.job(data=bad)), SigningError)
        self.assertEqual(error.domain, "shop.example")
        self.assertTrue(error.why.startswith("MessageFormatError: "), error.why)
        message = (yield self.pool.run(self.job())).data
        self.assertTrue(dkim.verify(message, dnsfunc=dnsfunc))
        self.assertEqual([w.transport.pid for w in self.pool.workers], self.pids)

    @inlineCallbacks
    def test_downgradedInTheChild(self):
        """
        For a server without 8BITMIME the child downgrades the 8-bit body
        before it signs: the signature verifies on the 7-bit result.
        """
        eight = HTML.replace(b"Sale</a>", "Gr\u00fc\u00dfe</a>".encode("utf-8"))
        prepared = yield self.pool.run(self.job(data=eight))
        self.assertTrue(prepared.data.isascii())
        self.assertFalse(prepared.eightBitMIME)
        self.assertTrue(dkim.verify(prepared.data, dnsfunc=dnsfunc))
        prepared = yield self.pool.run(self.job(data=eight, offers=Offers(eightBitMIME=True)))
        self.assertTrue(prepared.eightBitMIME)
        self.assertIn("Gr\u00fc\u00dfe</a>".encode("utf-8"), prepared.data)
        self.assertTrue(dkim.verify(prepared.data, dnsfunc=dnsfunc))

    @inlineCallbacks
    def test_printGoesToLog(self):
        """
        A job's C{print} does not corrupt the answers (a child's stdout is
        stderr): it is logged, by line.
        """
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        result = yield self.pool.run(PrintJob("a stray print"))
        self.assertEqual(result, "printed")
        message = (yield self.pool.run(self.job())).data
        self.assertTrue(dkim.verify(message, dnsfunc=dnsfunc))
        yield waitUntil(lambda: any(e.get("line") == "a stray print" for e in events), 20)

    @inlineCallbacks
    def test_killedChild(self):
        """
        A child killed with SIGKILL fails the job it held with
        L{WorkerLost}; the pool answers through the other child, and
        replaces the dead one.
        """
        held = self.pool.run(SleepJob(30))
        [victim] = [w for w in self.pool.workers if w.waiting]
        [other] = [w for w in self.pool.workers if w is not victim]
        pid = victim.transport.pid
        os.kill(pid, signal.SIGKILL)
        failure = yield self.assertFailure(held, WorkerLost)
        self.assertIn("ended", str(failure))
        self.assertFalse(alive(pid))
        self.assertFalse(victim.alive)
        self.assertTrue(other.alive)
        message = (yield self.pool.run(self.job())).data
        self.assertTrue(dkim.verify(message, dnsfunc=dnsfunc))
        # The dead one is gone (its replacement may be there already, on a
        # loaded machine).
        self.assertNotIn(victim, self.pool.workers)
        self.assertIn(other, self.pool.workers)
        # The replacement comes after RESTART_DELAY, and works.
        yield waitUntil(lambda: len(self.pool.workers) == 2, RESTART_DELAY + 20)
        [new] = [w for w in self.pool.workers if w is not other]
        self.pids.append(new.transport.pid)
        self.assertEqual(new.number, victim.number)
        ds = [self.pool.run(self.job()) for _ in range(4)]
        self.assertEqual(len(new.waiting), 2)
        for d in ds:
            message = (yield d).data
            self.assertTrue(dkim.verify(message, dnsfunc=dnsfunc))

    @inlineCallbacks
    def test_signalsIgnored(self):
        """
        SIGINT and SIGTERM sent to the whole process group (Ctrl-C, systemd,
        timeout(1)) do not end a child: the relay ends it when its own
        shutdown is done, by closing its input.
        """
        yield gatherResults([self.pool.run(EchoJob(n)) for n in range(4)])
        for pid in self.pids:
            os.kill(pid, signal.SIGINT)
            os.kill(pid, signal.SIGTERM)
        results = yield gatherResults([self.pool.run(self.job()) for _ in range(4)])
        for prepared in results:
            self.assertTrue(dkim.verify(prepared.data, dnsfunc=dnsfunc))
        self.assertEqual([w.transport.pid for w in self.pool.workers], self.pids)
        for pid in self.pids:
            self.assertTrue(alive(pid), pid)

    @inlineCallbacks
    def test_stop(self):
        """C{stop} ends every child; each has finished the job it held."""
        # On a loaded machine a child may take seconds to get to its job.
        self.patch(workers, "STOP_TIMEOUT", 60.0)
        held = self.pool.run(SleepJob(0.2))
        yield self.pool.stop()
        self.assertEqual(self.successResultOf(held), "slept")
        for pid in self.pids:
            self.assertFalse(alive(pid), pid)
        self.failureResultOf(self.pool.run(self.job()), WorkerLost)

    @inlineCallbacks
    def test_stopKillsStuck(self):
        """C{stop} kills, after C{STOP_TIMEOUT}, a child stuck in a job; the job fails with L{WorkerLost}."""
        self.patch(workers, "STOP_TIMEOUT", 0.5)
        held = self.pool.run(SleepJob(60))
        started = time.monotonic()
        yield self.pool.stop()
        self.assertLess(time.monotonic() - started, 30)
        self.failureResultOf(held, WorkerLost)
        for pid in self.pids:
            self.assertFalse(alive(pid), pid)


def alive(pid):
    """
    Whether process C{pid} exists (a zombie counts).
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@inlineCallbacks
def waitUntil(condition, timeout):
    """
    Poll C{condition} on the real reactor until it is true.
    """
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} seconds")
        yield deferLater(reactor, 0.05, lambda: None)
