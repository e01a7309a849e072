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

Pickle is safe here: both ends are this program, over pipes nobody else
holds.

A child that dies (killed, out of memory, a crash in a C library) fails
the jobs it held with L{WorkerLost}; the scheduler defers those messages as
for any local error, and the child is replaced, after a pause that grows
while children keep dying young.  A child whose relay disappears reads end
of file and exits, so a C{kill -9} of the relay leaves no orphans.
"""

import os
import pickle
import signal
import struct
import sys
from typing import Any, BinaryIO, Callable, Iterator, List, Optional

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

__all__ = ["FrameDecoder", "JobFailed", "WorkerError", "WorkerLost", "WorkerPool", "encodeFrame"]

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

    def __init__(self, maxFrame: int = MAX_FRAME) -> None:
        self._buffer = bytearray()
        self._maxFrame = maxFrame

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
        try:
            for payload in self.decoder.feed(data):
                requestID, ok, value = pickle.loads(payload)
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
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        count: int,
        spawn: Callable[[Any, ProcessProtocol], Any] = _defaultSpawn,
    ) -> None:
        if count < 1:
            raise ValueError("a worker pool needs at least one worker")
        self.reactor = reactor
        self.count = count
        self.spawn = spawn
        self.workers: List[_Worker] = []
        self._context: Optional[bytes] = None
        self._nextID = 0
        self._running = False
        self._delay = RESTART_DELAY
        self._restarts: list = []

    def start(self, *context: Any) -> None:
        """
        Start the children, each given C{context} (picklable), which every
        job's C{run} receives.
        """
        self._context = encodeFrame(pickle.dumps(context, pickle.HIGHEST_PROTOCOL))
        self._running = True
        for number in range(self.count):
            self._spawn(number)

    def _spawn(self, number: int) -> None:
        worker = _Worker(self, number)
        worker.transport = self.spawn(self.reactor, worker)
        worker.transport.write(self._context)
        self.workers.append(worker)

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
        alive = [w for w in self.workers if w.alive]
        if not self._running or not alive:
            return _failed(WorkerLost("no re-wrap worker process is running"))
        worker = min(alive, key=lambda w: len(w.waiting))
        self._nextID += 1
        return worker.send(self._nextID, job)

    def _ended(self, worker: _Worker, reason: Failure) -> None:
        self.workers.remove(worker)
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


def _failed(error: Exception) -> Deferred:
    d: Deferred = Deferred()
    d.errback(error)
    return d


def _readExactly(stream: BinaryIO, size: int) -> Optional[bytes]:
    chunks = []
    while size:
        chunk = stream.read(size)
        if not chunk:
            return None
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def serve(stdin: BinaryIO, stdout: BinaryIO) -> None:
    """
    A child's loop: read the context, then answer jobs until end of input.
    """

    def read() -> Optional[Any]:
        header = _readExactly(stdin, _LENGTH.size)
        if header is None:
            return None
        (size,) = _LENGTH.unpack(header)
        if size > MAX_FRAME:
            raise FrameError(f"a frame of {size} bytes is over the limit of {MAX_FRAME}")
        payload = _readExactly(stdin, size)
        if payload is None:
            return None
        return pickle.loads(payload)

    context = read()
    if context is None:
        return
    while True:
        request = read()
        if request is None:
            return
        requestID, job = request
        try:
            answer = encodeFrame(
                pickle.dumps((requestID, True, job.run(*context)), pickle.HIGHEST_PROTOCOL)
            )
        except Exception as e:
            # A job that fails, or whose result cannot be sent (pickle
            # cannot encode it, or it is over the frame limit), is answered
            # with the error; the child serves on.
            answer = _errorFrame(requestID, e)
        stdout.write(answer)
        stdout.flush()


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
    # Answers go to the real stdout; a stray print() goes to stderr, which
    # the relay logs.
    answers = sys.stdout.buffer
    sys.stdout = sys.stderr
    serve(sys.stdin.buffer, answers)


if __name__ == "__main__":
    # Run as smartrelay.engine.workers, not as __main__: the jobs' modules
    # import this one by name, and their JobFailed must be the one serve()
    # checks for.
    from smartrelay.engine import workers

    workers.main()
