"""
Worker processes for the CPU-heavy part of re-wrapping (HTML rewriting,
DKIM canonicalisation and signing), so that it runs beside the reactor
instead of taking turns with it for one interpreter lock.

The relay starts C{count} children (C{python -m smartrelay.engine.workers})
and talks to each over its stdin and stdout: frames of a 4-byte big-endian
length and a pickle.  The first frame a child reads is its context (the DKIM
signer and the token keys, which therefore never appear on a command line);
every later one is C{(request id, job)}, answered by C{(request id, True,
result)} or C{(request id, False, error)}, in order.  A job is any
picklable object with a C{run(*context)} method
(L{smartrelay.engine.rewrap.RewrapJob}).  The error is the exception itself
when it is a L{JobFailed} (an error the job raises on purpose, which the
caller must be able to tell apart, such as a DKIM signing failure), else
its type and text, raised in the relay as L{WorkerError}.

A child runs a reactor (L{ChildProtocol} over its stdin and stdout), so
that a job may also be asynchronous: one with a C{runAsync(child)} method
gets the L{ChildProtocol} (its C{reactor}, C{context}, a C{state} dict for
the jobs' own use, and C{notify}) and returns a L{Deferred}; its answer is
written when that fires, while other jobs are answered meanwhile.  This is
how the outbound SMTP sessions run in the children
(L{smartrelay.outbound.remote}).  A child also sends notices of its own,
C{(None, kind, value)}: C{"log"} (a log event of the child, logged by the
relay) and whatever kinds its jobs C{notify} (given to the handler the
relay registered with L{WorkerPool.onNotice}).

Pickle is safe here: both ends are this program, over pipes nobody else
holds.

A child that dies (killed, out of memory, a crash in a C library) fails
the jobs it held with L{WorkerLost}; the scheduler defers those messages as
for any local error, and the child is replaced, after a pause that grows
while children keep dying young.  A child whose relay disappears reads end
of file and exits, so a C{kill -9} of the relay leaves no orphans.
"""

import importlib
import os
import pickle
import signal
import struct
import sys
from typing import Any, Callable, Iterator, List, Optional

from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import ProcessProtocol, Protocol, connectionDone
from twisted.internet.task import LoopingCall
from twisted.logger import Logger, LogLevel, formatEvent
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = [
    "ChildProtocol",
    "FrameDecoder",
    "JobFailed",
    "WorkerError",
    "WorkerLost",
    "WorkerPool",
    "encodeFrame",
]

_LENGTH = struct.Struct(">I")

#: The largest frame accepted, in bytes: a message of the largest size the
#: relay accepts, grown by tracking, is far below it.
MAX_FRAME = 1 << 30

#: Seconds to wait before replacing a child that died, doubled (up to
#: L{MAX_RESTART_DELAY}) for each child that dies within
#: L{YOUNG_DEATH} seconds of its start.
RESTART_DELAY = 1.0
MAX_RESTART_DELAY = 60.0
YOUNG_DEATH = 10.0

#: Seconds children get to exit on their own at shutdown (their input
#: closed) before they are killed.
STOP_TIMEOUT = 5.0

#: A child says it is alive (a C{"beat"} notice) this often; the relay
#: looks as often for children that hold jobs and have said nothing for
#: L{STUCK_AFTER} seconds (a job looping forever blocks the child's
#: reactor, and with it every session the child holds), and kills them:
#: their jobs fail with L{WorkerLost} and they are replaced.
BEAT_INTERVAL = 5.0
STUCK_AFTER = 60.0


class WorkerLost(Exception):
    """
    The worker process running a job went away before answering.
    """


class WorkerError(Exception):
    """
    A job raised an exception in a worker process; the message is its
    type and text.
    """


class JobFailed(Exception):
    """
    The base of the errors a job raises on purpose.  One raised in a worker
    process comes back to the relay as itself (pickled), so the caller sees
    the same exception whether the job ran in a thread or a worker.
    Subclasses must be rebuilt by C{cls(*args)}, as pickle does, and
    should hold only plain data.
    """


class FrameError(ValueError):
    """
    A frame's length is beyond L{MAX_FRAME}: the stream is not ours.
    """


def encodeFrame(payload: bytes) -> bytes:
    """
    C{payload} with its length in front.
    """
    if len(payload) > MAX_FRAME:
        raise FrameError(f"a frame of {len(payload)} bytes is over the limit of {MAX_FRAME}")
    return _LENGTH.pack(len(payload)) + payload


class FrameDecoder:
    """
    Splits a byte stream into the payloads of L{encodeFrame}, however the
    stream was cut into chunks.
    """

    def __init__(self, maxFrame: Optional[int] = None) -> None:
        self._buffer = bytearray()
        self._maxFrame = MAX_FRAME if maxFrame is None else maxFrame

    def feed(self, data: bytes) -> Iterator[bytes]:
        """
        Add C{data} (at once, whether or not the result is iterated);
        return an iterator over every payload now complete.

        @raise FrameError: (from the iterator) a length over the limit.
        """
        self._buffer += data
        return self._payloads()

    def _payloads(self) -> Iterator[bytes]:
        buffer = self._buffer
        offset = 0
        try:
            while len(buffer) - offset >= _LENGTH.size:
                (size,) = _LENGTH.unpack_from(buffer, offset)
                if size > self._maxFrame:
                    raise FrameError(
                        f"a frame of {size} bytes is over the limit of {self._maxFrame}"
                    )
                end = offset + _LENGTH.size + size
                if len(buffer) < end:
                    break
                yield bytes(buffer[offset + _LENGTH.size : end])
                offset = end
        finally:
            del buffer[:offset]

    @property
    def pending(self) -> int:
        """
        Bytes of an incomplete frame held.
        """
        return len(self._buffer)


class _Worker(ProcessProtocol):
    """
    One child process, seen from the relay.
    """

    log = Logger()

    def __init__(self, pool: "WorkerPool", number: int) -> None:
        self.pool = pool
        self.number = number
        self.decoder = FrameDecoder()
        self.waiting: dict = {}
        self.startedAt = pool.reactor.seconds()
        #: When the child last wrote anything (an answer, a notice).
        self.lastHeard = self.startedAt
        self.ended = Deferred()
        self.alive = False
        self.stderr = b""

    def connectionMade(self) -> None:
        self.alive = True

    def send(self, requestID: int, job: Any) -> Deferred:
        d = Deferred()
        self.waiting[requestID] = d
        self.transport.write(encodeFrame(pickle.dumps((requestID, job), pickle.HIGHEST_PROTOCOL)))
        return d

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == 2:
            self._stderr(data)
            return
        self.lastHeard = self.pool.reactor.seconds()
        try:
            for payload in self.decoder.feed(data):
                requestID, ok, value = pickle.loads(payload)
                if requestID is None:
                    self.pool._notice(self, ok, value)
                    continue
                d = self.waiting.pop(requestID)
                if ok:
                    d.callback(value)
                elif isinstance(value, JobFailed):
                    d.errback(value)
                else:
                    d.errback(WorkerError(value))
        except Exception:
            self.log.failure("worker {number} sent a bad answer; replacing it", number=self.number)
            self.kill()

    def _stderr(self, data: bytes) -> None:
        # A child writes to stderr only when something is badly wrong (an
        # interpreter error before it could answer): log it by line.
        self.stderr += data
        *lines, self.stderr = self.stderr.split(b"\n")
        for line in lines:
            self.log.warn(
                "worker {number}: {line}",
                number=self.number,
                line=line.decode("utf-8", "replace"),
            )

    def kill(self) -> None:
        if self.alive:
            try:
                self.transport.signalProcess("KILL")
            except Exception:
                pass

    def processEnded(self, reason: Failure) -> None:
        self.alive = False
        waiting, self.waiting = self.waiting, {}
        for d in waiting.values():
            d.errback(WorkerLost(f"worker process {self.number} ended: {reason.value}"))
        self.pool._ended(self, reason)
        self.ended.callback(None)


def _defaultSpawn(reactor: Any, protocol: ProcessProtocol) -> Any:
    executable = sys.executable
    env = os.environ.copy()
    # The child imports what the relay imported, from where it did, even
    # if the relay changed directory since (twistd --rundir).
    env["PYTHONPATH"] = os.pathsep.join(os.path.abspath(p) for p in sys.path if p)
    return reactor.spawnProcess(
        protocol,
        executable,
        [executable, "-m", "smartrelay.engine.workers"],
        env=env,
        childFDs={0: "w", 1: "r", 2: "r"},
    )


class WorkerPool:
    """
    C{count} worker processes running jobs with one context.

    @ivar reactor: provides C{seconds}, C{callLater} and (with the default
        C{spawn}) C{spawnProcess}.
    @ivar spawn: C{spawn(reactor, protocol) -> process transport}; tests
        replace it.
    @ivar preload: modules each child imports as soon as it starts (those
        of the jobs it will run), so that its first jobs do not wait for
        them.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        count: int,
        spawn: Callable[[Any, ProcessProtocol], Any] = _defaultSpawn,
        preload: tuple = (),
    ) -> None:
        if count < 1:
            raise ValueError("a worker pool needs at least one worker")
        self.reactor = reactor
        self.count = count
        self.spawn = spawn
        self.preload = tuple(preload)
        self.workers: List[_Worker] = []
        self._context: Optional[bytes] = None
        self._nextID = 0
        self._running = False
        self._delay = RESTART_DELAY
        self._restarts: list = []
        self._noticeHandlers: dict = {}
        self._endHandlers: list = []
        self._watch: Optional[LoopingCall] = None

    def onNotice(self, kind: str, handler: Callable[[Any, Any], None]) -> None:
        """
        Call C{handler(worker, value)} for each notice of C{kind} a child
        sends (C{worker} is the one that sent it, as L{pick} gives it).
        """
        self._noticeHandlers[kind] = handler

    def onEnded(self, handler: Callable[[Any], None]) -> None:
        """
        Call C{handler(worker)} when a child has ended (after the jobs it
        held have failed with L{WorkerLost}).
        """
        self._endHandlers.append(handler)

    def _notice(self, worker: _Worker, kind: str, value: Any) -> None:
        if kind == "beat":
            return
        if kind == "log":
            level, text = value
            self.log.emit(
                LogLevel.levelWithName(level),
                "worker {number}: {text}",
                number=worker.number,
                text=text,
            )
            return
        handler = self._noticeHandlers.get(kind)
        if handler is None:
            self.log.warn(
                "worker {number} sent a notice of unknown kind {kind!r}",
                number=worker.number,
                kind=kind,
            )
            return
        handler(worker, value)

    def start(self, *context: Any) -> None:
        """
        Start the children, each given C{context} (picklable), which every
        job's C{run} receives.
        """
        self._context = encodeFrame(pickle.dumps(context, pickle.HIGHEST_PROTOCOL))
        self._running = True
        for number in range(self.count):
            self._spawn(number)
        self._watch = LoopingCall(self._watchStuck)
        self._watch.clock = self.reactor
        self._watch.start(BEAT_INTERVAL, now=False)

    def _watchStuck(self) -> None:
        """
        Kill the children that hold jobs and have said nothing for
        L{STUCK_AFTER} seconds.
        """
        now = self.reactor.seconds()
        for worker in self.workers:
            if worker.alive and worker.waiting and now - worker.lastHeard > STUCK_AFTER:
                self.log.error(
                    "worker process {number} holds {jobs} job(s) and has said nothing "
                    "for {quiet:.0f} s; killing it",
                    number=worker.number,
                    jobs=len(worker.waiting),
                    quiet=now - worker.lastHeard,
                )
                worker.kill()

    def _spawn(self, number: int) -> None:
        worker = _Worker(self, number)
        worker.transport = self.spawn(self.reactor, worker)
        worker.transport.write(self._context)
        self.workers.append(worker)
        if self.preload:
            self._nextID += 1
            worker.send(self._nextID, Preload(self.preload)).addErrback(self._preloadFailed, number)

    def _preloadFailed(self, failure: Failure, number: int) -> None:
        if failure.check(WorkerLost):
            return  # its end is logged (or it was stopped)
        self.log.failure(
            "worker {number} could not import {modules}",
            failure,
            number=number,
            modules=", ".join(self.preload),
        )

    @property
    def available(self) -> bool:
        """
        Whether a child is running to take a job.
        """
        return self._running and any(w.alive for w in self.workers)

    @property
    def running(self) -> int:
        """
        Children running now (for C{/metrics}).
        """
        return sum(1 for w in self.workers if w.alive) if self._running else 0

    @property
    def inFlight(self) -> int:
        """
        Jobs sent to children and not answered yet.
        """
        return sum(len(w.waiting) for w in self.workers)

    def run(self, job: Any) -> Deferred:
        """
        Run C{job.run(*context)} in the least busy child.

        @return: L{Deferred} firing with its result; failing with
            L{WorkerError} when it raised, L{WorkerLost} when its child
            died first or no child is running.
        """
        worker = self.pick()
        if worker is None:
            return _failed(WorkerLost("no re-wrap worker process is running"))
        return self.runOn(worker, job)

    def pick(self) -> Optional[_Worker]:
        """
        The least busy child running, or L{None}.
        """
        alive = [w for w in self.workers if w.alive]
        if not self._running or not alive:
            return None
        return min(alive, key=lambda w: len(w.waiting))

    def runOn(self, worker: _Worker, job: Any) -> Deferred:
        """
        Run C{job} in C{worker} (one L{pick} gave): for jobs that belong
        with state a child holds, such as an SMTP session.

        @return: as L{run}; failing with L{WorkerLost} at once if that
            child is gone.
        """
        if not (self._running and worker.alive):
            return _failed(WorkerLost(f"worker process {worker.number} is not running"))
        self._nextID += 1
        return worker.send(self._nextID, job)

    def _ended(self, worker: _Worker, reason: Failure) -> None:
        self.workers.remove(worker)
        for handler in self._endHandlers:
            try:
                handler(worker)
            except Exception:
                self.log.failure("while handling the end of worker {number}", number=worker.number)
        if not self._running:
            return
        lived = self.reactor.seconds() - worker.startedAt
        if lived >= YOUNG_DEATH:
            # A child that ran fine for a while is replaced promptly, however
            # many deaths came before it, and so is the next; only a burst
            # of young deaths waits longer and longer.
            self._delay = RESTART_DELAY
        self.log.error(
            "re-wrap worker process {number} ended after {lived:.1f} s ({why}); "
            "starting another in {delay:.0f} s",
            number=worker.number,
            lived=lived,
            why=reason.value,
            delay=self._delay,
        )
        call = self.reactor.callLater(self._delay, self._restart, worker.number)
        self._restarts.append(call)
        if lived < YOUNG_DEATH:
            self._delay = min(self._delay * 2, MAX_RESTART_DELAY)

    def _restart(self, number: int) -> None:
        self._restarts = [c for c in self._restarts if c.active()]
        if self._running:
            self._spawn(number)

    def stop(self) -> Deferred:
        """
        Close the children's input so they finish what they hold and exit;
        kill those still there after L{STOP_TIMEOUT} seconds.

        @return: L{Deferred} firing when all have ended.
        """
        self._running = False
        if self._watch is not None and self._watch.running:
            self._watch.stop()
        for call in self._restarts:
            if call.active():
                call.cancel()
        self._restarts = []
        workers = [w for w in self.workers if w.alive]
        for worker in workers:
            worker.transport.closeStdin()
        if not workers:
            return succeed(None)
        timeout = self.reactor.callLater(STOP_TIMEOUT, lambda: [w.kill() for w in workers])
        done = DeferredList([w.ended for w in workers])

        def ended(result: Any) -> None:
            if timeout.active():
                timeout.cancel()

        return done.addCallback(ended)


class Preload:
    """
    The job a child is given first when the pool has modules to preload:
    it imports them.
    """

    def __init__(self, modules: tuple) -> None:
        self.modules = modules

    def run(self, *context: Any) -> None:
        for name in self.modules:
            importlib.import_module(name)


def _failed(error: Exception) -> Deferred:
    d: Deferred = Deferred()
    d.errback(error)
    return d


@implementer(IHalfCloseableProtocol)
class ChildProtocol(Protocol):
    """
    A child's end of the pipes (over L{twisted.internet.stdio.StandardIO}):
    the context, then jobs, each answered when done.

    A job with a C{runAsync(child)} method is given this protocol and
    answered when the L{Deferred} it returns fires (other jobs are answered
    meanwhile); any other job is run at once, C{job.run(*context)}, and
    answered in order.

    @ivar reactor: the child's reactor, for asynchronous jobs.
    @ivar context: what the relay gave at start, once it is read.
    @ivar state: a dict the jobs keep their own state in (one key per kind
        of job), for the life of the child.
    @ivar finished: a L{Deferred} firing once the input has ended and every
        asynchronous job then running has been answered; the child exits
        then.
    """

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.context: Optional[tuple] = None
        self.state: dict = {}
        self.finished: Deferred = Deferred()
        self._decoder = FrameDecoder()
        self._running: dict = {}
        self._ended = False
        self._closing = False
        self._stopping = False
        self._stopHooks: list = []
        self._beat: Optional[LoopingCall] = None

    def connectionMade(self) -> None:
        self._beat = LoopingCall(self.notify, "beat", None)
        self._beat.clock = self.reactor
        self._beat.start(BEAT_INTERVAL, now=False)

    def dataReceived(self, data: bytes) -> None:
        try:
            for payload in self._decoder.feed(data):
                request = pickle.loads(payload)
                if self.context is None:
                    self.context = request
                    continue
                self._request(*request)
        except Exception as e:
            # Not our stream (a frame over the limit, one pickle cannot
            # read): stop reading it, say why (the relay logs a child's
            # stderr), and end.
            sys.stderr.write(f"smartrelay worker: bad input from the relay: {e}\n")
            self._ended = True
            self._closing = True
            self.transport.loseConnection()

    def _request(self, requestID: int, job: Any) -> None:
        runAsync = getattr(job, "runAsync", None)
        if runAsync is None:
            try:
                result = job.run(*self.context)
            except Exception as e:
                result = Failure(e)
            self._answer(requestID, result)
            return
        d = maybeDeferred(runAsync, self)
        self._running[requestID] = d
        d.addBoth(self._answered, requestID)

    def _answered(self, result: Any, requestID: int) -> None:
        del self._running[requestID]
        self._answer(requestID, result)
        self._maybeFinished()

    def _answer(self, requestID: int, result: Any) -> None:
        # A job that fails, or whose result cannot be sent (pickle cannot
        # encode it, or it is over the frame limit), is answered with the
        # error; the child serves on.
        if isinstance(result, Failure):
            answer = _errorFrame(requestID, result.value)
        else:
            try:
                answer = encodeFrame(
                    pickle.dumps((requestID, True, result), pickle.HIGHEST_PROTOCOL)
                )
            except Exception as e:
                answer = _errorFrame(requestID, e)
        self.transport.write(answer)

    def notify(self, kind: str, value: Any) -> None:
        """
        Send the relay a notice: C{(None, kind, value)}.
        """
        try:
            frame = encodeFrame(pickle.dumps((None, kind, value), pickle.HIGHEST_PROTOCOL))
        except Exception as e:
            sys.stderr.write(f"smartrelay worker: could not send a {kind} notice: {e}\n")
            return
        self.transport.write(frame)

    def onStop(self, hook: Callable[[], Any]) -> None:
        """
        Call C{hook()} when the input ends (the relay is stopping its
        workers); it may return a L{Deferred}, waited for before the child
        exits.  Asynchronous jobs use it to let go of what they hold.
        """
        self._stopHooks.append(hook)

    def readConnectionLost(self) -> None:
        """
        The input ended: answer what is running, let the jobs' state go,
        then close the output.
        """
        self._ended = True
        self._stopping = True
        hooks, self._stopHooks = self._stopHooks, []
        waits = [maybeDeferred(hook) for hook in hooks]
        done = DeferredList(waits, consumeErrors=True) if waits else succeed(None)
        done.addBoth(self._stopped)

    def _stopped(self, result: Any) -> None:
        self._stopping = False
        self._maybeFinished()

    def writeConnectionLost(self) -> None:
        # Nobody reads the answers any more: the relay is gone (killed), so
        # there is nobody to finish anything for; the child ends now.
        self._ended = True
        if not self.finished.called:
            self.finished.callback(None)

    def _maybeFinished(self) -> None:
        if self._ended and not (self._running or self._stopping or self._closing):
            self._closing = True
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._ended = True
        if self._beat is not None and self._beat.running:
            self._beat.stop()
        if not self.finished.called:
            self.finished.callback(None)


class _ForwardLog:
    """
    A child's log observer: events at C{info} and above go to the relay as
    C{"log"} notices, with their traceback if any.
    """

    def __init__(self, child: ChildProtocol) -> None:
        self.child = child

    def __call__(self, event: dict) -> None:
        level = event.get("log_level", LogLevel.info)
        if level < LogLevel.info or self.child.transport is None:
            return
        text = formatEvent(event)
        failure = event.get("log_failure")
        if failure is not None:
            text = f"{text}\n{failure.getTraceback()}"
        self.child.notify("log", (level.name, text))


def _errorFrame(requestID: int, error: Exception) -> bytes:
    """
    The answer for a job that raised C{error}: the exception itself if it
    is a L{JobFailed} that survives pickling, else its type and text.
    """
    if isinstance(error, JobFailed):
        try:
            payload = pickle.dumps((requestID, False, error), pickle.HIGHEST_PROTOCOL)
            pickle.loads(payload)
        except Exception:
            pass
        else:
            return encodeFrame(payload)
    text = f"{type(error).__name__}: {error}"
    return encodeFrame(pickle.dumps((requestID, False, text), pickle.HIGHEST_PROTOCOL))


def main() -> None:
    # The relay decides when its workers stop (by closing their input, once
    # the deliveries in flight are done), so signals meant for the relay are
    # ignored: a Ctrl-C for a foreground twistd reaches the whole process
    # group, and systemd (KillMode=control-group) or timeout(1) send SIGTERM
    # to every process of the service at once.  If the relay dies, the end
    # of input still ends the worker; a stuck worker gets SIGKILL.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from twisted.internet import reactor
    from twisted.internet.stdio import StandardIO
    from twisted.logger import globalLogBeginner

    # Answers go to the real stdout (file descriptor 1, StandardIO's); a
    # stray print() goes to stderr, which the relay logs.
    sys.stdout = sys.stderr
    child = ChildProtocol(reactor)
    globalLogBeginner.beginLoggingTo([_ForwardLog(child)], redirectStandardIO=False)
    StandardIO(child, reactor=reactor)
    child.finished.addBoth(lambda _: reactor.stop())
    reactor.run(installSignalHandlers=False)


if __name__ == "__main__":
    # Run as smartrelay.engine.workers, not as __main__: the jobs' modules
    # import this one by name, and their JobFailed must be the one
    # ChildProtocol checks for.
    from smartrelay.engine import workers

    workers.main()
