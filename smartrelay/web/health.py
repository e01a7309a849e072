# -*- test-case-name: tests.test_web_metrics -*-
"""
What C{GET /healthz} checks (DESIGN section 1.6): L{HealthCheck} makes a
real small write and fsync in the spool directory (in a thread), one
cheap store call, and asks whether the listeners are up; each probe is
cached for L{PROBE_INTERVAL} seconds and given up after L{PROBE_TIMEOUT}
seconds on the reactor's clock, so that scrapers cannot turn it into disk
load and a hung disk cannot hang it.  The route is in
L{smartrelay.web.metrics}; the answers are in C{docs/metrics.md}.
"""

import errno
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Callable, Optional

import attrs
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from smartrelay.events import rfc3339
from smartrelay.store.interfaces import IStore

if TYPE_CHECKING:
    from smartrelay.events import EventLog

__all__ = [
    "PROBE_ADDRESS",
    "PROBE_FILE",
    "PROBE_INTERVAL",
    "PROBE_TIMEOUT",
    "HealthCheck",
    "ProbeResult",
    "probeSpool",
]

#: Seconds a probe's answer is reused by C{/healthz}.
PROBE_INTERVAL = 2.0
#: Seconds after which C{/healthz} stops waiting for a probe and reports it
#: failed.
PROBE_TIMEOUT = 2.0
#: The file the spool probe creates, writes, fsyncs and removes (in the
#: spool directory; recovery ignores it).
PROBE_FILE = ".healthz-probe"
#: The address the store probe looks up on the suppression list.
PROBE_ADDRESS = "healthz-probe@smartrelay.invalid"


@attrs.frozen
class ProbeResult:
    """
    What one probe found.

    @ivar ok: it worked.
    @ivar problem: what is wrong (L{None} when C{ok}).
    @ivar seconds: how long it took (or has taken so far).
    @ivar checked: when it was started (clock seconds).
    """

    ok: bool
    problem: Optional[str]
    seconds: float
    checked: float

    def asDict(self) -> dict:
        answer: dict = {"ok": self.ok, "seconds": round(self.seconds, 6),
                        "checked_at": rfc3339(self.checked)}
        if self.problem is not None:
            answer["problem"] = self.problem
        return answer


@attrs.define(eq=False)
class _Probe:
    """
    One check (C{run() -> Deferred}), run at most once per C{interval}
    seconds however often it is asked for; its answer waited for at most
    C{timeout} seconds (the check itself goes on; no other starts until it
    ends, so a hung disk does not pile up threads).  C{describe} turns a
    failure into the problem's text.
    """

    clock: IReactorTime
    run: Callable[[], Deferred]
    describe: Callable[[Failure], str]
    interval: float
    timeout: float
    _last: Optional[ProbeResult] = None
    _running: bool = False
    _started: float = 0.0
    _waiters: list = attrs.field(factory=list)
    _timer: Any = None

    def result(self) -> Deferred:
        """
        A L{Deferred} firing with a L{ProbeResult}; never fails.
        """
        now = self.clock.seconds()
        if self._running:
            waited = now - self._started
            if waited >= self.timeout:
                return succeed(self._late(waited))
            return self._wait()
        last = self._last
        if last is not None and 0 <= now - last.checked < self.interval:
            return succeed(last)
        self._running = True
        self._started = now
        waiter = self._wait()
        self._timer = self.clock.callLater(self.timeout, self._timedOut)
        maybeDeferred(self.run).addBoth(self._finished)
        return waiter

    def _wait(self) -> Deferred:
        d: Deferred = Deferred()
        self._waiters.append(d)
        return d

    def _late(self, waited: float) -> ProbeResult:
        return ProbeResult(False, f"no answer after {waited:.1f} s", waited, self._started)

    def _answer(self, result: ProbeResult) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(result)

    def _timedOut(self) -> None:
        self._timer = None
        self._answer(self._late(self.clock.seconds() - self._started))

    def _finished(self, outcome: Any) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        seconds = max(0.0, self.clock.seconds() - self._started)
        if isinstance(outcome, Failure):
            result = ProbeResult(False, self.describe(outcome), seconds, self._started)
        else:
            result = ProbeResult(True, None, seconds, self._started)
        self._running = False
        self._last = result
        self._answer(result)

    def cancel(self) -> None:
        """
        Stop waiting (the relay is stopping): the timer goes.
        """
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None


def probeSpool(directory: str) -> None:
    """
    Create L{PROBE_FILE} in C{directory}, write a few bytes, fsync it and
    remove it: what the spool does for a new segment.  A new directory
    entry each time, so a directory that became read-only (or immutable,
    or full) fails even though the spool's open segment is still writable.
    Blocking: in a thread.
    """
    path = os.path.join(directory, PROBE_FILE)
    try:
        os.unlink(path)  # left by a crash between create and unlink
    except FileNotFoundError:
        pass
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, b"smartrelay health probe\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    os.unlink(path)


def _describeSpool(directory: str) -> Callable[[Failure], str]:
    def describe(failure: Failure) -> str:
        error = failure.value
        if isinstance(error, OSError):
            why = error.strerror or errno.errorcode.get(error.errno or 0, str(error))
            return f"cannot write to {directory}: {why}"
        return f"cannot write to {directory}: {failure.getErrorMessage()}"

    return describe


def _describeStore(failure: Failure) -> str:
    return f"the store failed: {failure.getErrorMessage() or failure.type.__name__}"


class HealthCheck:
    """
    What C{/healthz} checks: the spool directory takes a new file (write
    and fsync, in a thread), the store answers a cheap call (a lookup on
    the suppression list), and every listener is up.
    """

    def __init__(
        self,
        clock: IReactorTime,
        *,
        spoolDirectory: str,
        runInThread: Callable[..., Deferred],
        store: IStore,
        listeners: Callable[[], Mapping],
        events: Optional["EventLog"] = None,
        interval: float = PROBE_INTERVAL,
        timeout: float = PROBE_TIMEOUT,
    ) -> None:
        """
        @param runInThread: C{f(*args) -> Deferred}, for the spool probe.
        @param listeners: C{() -> {name: bool}}: whether each listener is
            up right now.
        @param events: the event log, whose state is reported (not
            checked: mail flows while events wait in the journal).
        """
        self.clock = clock
        self.listeners = listeners
        self.events = events
        self._spool = _Probe(
            clock,
            lambda: runInThread(probeSpool, spoolDirectory),
            _describeSpool(spoolDirectory),
            interval,
            timeout,
        )
        self._store = _Probe(
            clock,
            lambda: store.checkSuppressions([PROBE_ADDRESS], clock.seconds()),
            _describeStore,
            interval,
            timeout,
        )

    async def check(self) -> tuple[bool, dict]:
        """
        Run (or reuse) the probes: C{(healthy, the JSON answer)}.
        """
        spoolWaiting, storeWaiting = self._spool.result(), self._store.result()
        spool = await spoolWaiting
        store = await storeWaiting
        listening = dict(self.listeners())
        problems = []
        if not spool.ok:
            problems.append(f"spool: {spool.problem}")
        if not store.ok:
            problems.append(f"store: {store.problem}")
        for name, up in listening.items():
            if not up:
                problems.append(f"listener {name}: not listening")
        checks: dict = {
            "spool": spool.asDict(),
            "store": store.asDict(),
            "listeners": {"ok": all(listening.values()), **listening},
        }
        if self.events is not None:
            journal = self.events.journal
            checks["events"] = {
                "degraded": self.events.degraded,
                "backlog": self.events.backlog,
                "journal_bytes": 0 if journal is None else journal.size,
            }
        healthy = not problems
        return healthy, {
            "status": "ok" if healthy else "unavailable",
            "problems": problems,
            "checks": checks,
        }

    def stop(self) -> None:
        """
        Cancel the probes' timers (the relay is stopping).
        """
        self._spool.cancel()
        self._store.cancel()
