# -*- test-case-name: tests.test_sms_protocol -*-
"""
The ESME side of one SMPP 3.4 session (a transceiver bind).

L{ESMEProtocol} reads and writes PDUs (L{smartrelay.sms.codec}) and
decides only what the protocol itself needs:

* C{bind()}: bind_transceiver and its response, within a timer;
* C{submit(fields)}: submit_sm in order, at most C{window} unanswered, at
  most C{rate} a second; a response timer per request;
* C{ESME_RTHROTTLED} / C{ESME_RMSGQFUL}: the session pauses (1 s,
  doubling while it lasts, up to L{MAX_PAUSE}) and the refused PDU is sent
  again first, before anything newer (order kept);
* a response that does not come within C{responseTimeout}, an
  C{unbind} from the SMSC or a lost connection end the session: every
  request not yet answered fails with L{SessionLost} so that its sender
  can try it again on the next bind (the SMSC may have taken it: at least
  once);
* C{enquire_link} after C{enquireLinkInterval} seconds without traffic;
  C{enquire_link} and C{deliver_sm} / C{data_sm} from the SMSC are always
  answered (the latter after being handed to the C{receiver});
* C{unbind()} on stop.

Everything else (what a message says, what a receipt means) belongs to
the caller.
"""

import heapq
import itertools
from typing import Any, Callable, Optional

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from smartrelay.sms.codec import (
    INTERFACE_VERSION,
    PDU,
    Command,
    InvalidPDU,
    PDUBuffer,
    Status,
    decode,
    encode,
    genericNack,
    makePDU,
    responseTo,
    statusName,
)

#: The longest pause after the SMSC says it is throttling us.
MAX_PAUSE = 30.0

#: Statuses that pause the session; the PDU is sent again.
THROTTLING = frozenset([Status.ESME_RTHROTTLED, Status.ESME_RMSGQFUL])
#: Statuses after which a message may succeed later (the caller retries it
#: on its own schedule); any other refusal is final.
TEMPORARY = frozenset([Status.ESME_RSYSERR, Status.ESME_RX_T_APPN])

MAX_SEQUENCE = 0x7FFFFFFF


class SessionLost(Exception):
    """
    The session ended before the request was answered; the SMSC may or may
    not have it.
    """


class BindFailed(Exception):
    """
    The SMSC refused the bind (or did not answer it).

    @ivar status: the command_status, or L{None} for no answer.
    """

    def __init__(self, status: Optional[int], why: str) -> None:
        super().__init__(why)
        self.status = status


class SubmitRefused(Exception):
    """
    The SMSC answered a submit_sm with an error status.

    @ivar status: the command_status.
    @ivar temporary: whether the message may be accepted later.
    """

    def __init__(self, status: int) -> None:
        super().__init__(statusName(status))
        self.status = status
        self.temporary = status in TEMPORARY

    @property
    def name(self) -> str:
        return statusName(self.status)


@attrs.frozen(kw_only=True)
class SessionSettings:
    """
    What one session needs to know.

    @ivar window: submit_sm sent and not yet answered, at most.
    @ivar rate: submit_sm per second, at most (L{None}: no limit).
    @ivar responseTimeout: seconds to wait for any response.
    @ivar enquireLinkInterval: seconds without traffic before an
        enquire_link.
    @ivar unbindTimeout: seconds to wait for unbind_resp when stopping.
    @ivar maxPDULength: the longest PDU accepted from the SMSC.
    """

    system_id: bytes
    password: bytes = attrs.field(default=b"", repr=False)
    system_type: bytes = b""
    window: int = 10
    rate: Optional[float] = None
    responseTimeout: float = 30.0
    enquireLinkInterval: float = 30.0
    unbindTimeout: float = 5.0
    maxPDULength: int = 70000


@attrs.define(eq=False)
class _Submit:
    """
    One submit_sm to send: its fields and who waits for the answer.
    """

    order: int
    fields: dict
    tlvs: tuple
    result: Deferred

    def __lt__(self, other: "_Submit") -> bool:
        return self.order < other.order


@attrs.define(eq=False)
class _Outstanding:
    pdu: PDU
    result: Deferred
    timer: Any
    submit: Optional[_Submit] = None


_orders = itertools.count()


def nextOrder() -> int:
    """
    A process-wide increasing number: the order in which submits were
    asked for, kept across sessions.
    """
    return next(_orders)


class ESMEProtocol(Protocol):
    """
    One SMPP session from the ESME's side.

    @ivar receiver: called with each deliver_sm or data_sm from the SMSC
        (C{receiver(pdu)}); its result is ignored (the response is sent
        first, always).
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        settings: SessionSettings,
        receiver: Callable[[PDU], Any] = lambda pdu: None,
    ) -> None:
        self.clock = clock
        self.settings = settings
        self.receiver = receiver
        self.bound = False
        self.closing = False
        self.connected = False
        self._frames = PDUBuffer(maximum=settings.maxPDULength)
        self._sequence = 0
        self._outstanding: dict = {}
        self._queue: list = []  # heap of _Submit by order
        self._inWindow = 0
        self._pausedUntil = 0.0
        self._pause = 0.0
        self._nextSend = 0.0
        self._sendTimer = None
        self._idleTimer = None
        self._lost: Deferred = Deferred()
        self.submitted = 0

    # -- connection ---------------------------------------------------------

    def connectionMade(self) -> None:
        self.connected = True
        self._touch()

    def connectionLost(self, reason: Failure = None) -> None:
        self.connected = False
        self.bound = False
        for timer in (self._sendTimer, self._idleTimer):
            if timer is not None and timer.active():
                timer.cancel()
        outstanding, self._outstanding = self._outstanding, {}
        queued, self._queue = sorted(self._queue), []
        lost = SessionLost("the SMPP session ended")
        for request in outstanding.values():
            if request.timer.active():
                request.timer.cancel()
            if not request.result.called:
                request.result.errback(Failure(lost))
        for submit in queued:
            if not submit.result.called:
                submit.result.errback(Failure(lost))
        if not self._lost.called:
            self._lost.callback(None)

    def whenLost(self) -> Deferred:
        """
        A L{Deferred} firing when the connection is closed.
        """
        d: Deferred = Deferred()
        self._lost.addBoth(lambda r: (d.callback(None), r)[1])
        return d

    def _drop(self, why: str) -> None:
        self.log.warn("dropping the SMPP session: {why}", why=why)
        self.bound = False
        if self.transport is not None:
            self.transport.abortConnection()

    # -- timers -------------------------------------------------------------

    def _touch(self) -> None:
        """
        Traffic: the enquire_link timer starts again.
        """
        if self._idleTimer is not None and self._idleTimer.active():
            self._idleTimer.reset(self.settings.enquireLinkInterval)
        elif self.connected:
            self._idleTimer = self.clock.callLater(
                self.settings.enquireLinkInterval, self._enquire
            )

    def _enquire(self) -> None:
        self._idleTimer = None
        if not self.connected or self.closing:
            return
        d = self._request(makePDU(Command.enquire_link, self._nextSequence()))
        d.addErrback(lambda f: None)
        self._touch()

    # -- sending ------------------------------------------------------------

    def _nextSequence(self) -> int:
        self._sequence = self._sequence % MAX_SEQUENCE + 1
        return self._sequence

    def _write(self, pdu: PDU) -> None:
        self.transport.write(encode(pdu))

    def _request(self, pdu: PDU, submit: Optional[_Submit] = None) -> Deferred:
        """
        Send a request; the result fires with its response PDU (any
        status), or fails with L{SessionLost}.  No response within the
        timeout ends the session.
        """
        result: Deferred = Deferred()
        timer = self.clock.callLater(self.settings.responseTimeout, self._timedOut, pdu.sequence)
        self._outstanding[pdu.sequence] = _Outstanding(pdu, result, timer, submit)
        self._write(pdu)
        return result

    def _timedOut(self, sequence: int) -> None:
        request = self._outstanding.get(sequence)
        if request is None:
            return
        self._drop(
            f"no answer to {request.pdu.name} (sequence {sequence}) within "
            f"{self.settings.responseTimeout:g}s"
        )

    def bind(self) -> Deferred:
        """
        Bind as a transceiver.

        @return: a L{Deferred} firing with the SMSC's system_id, or failing
            with L{BindFailed} (the connection is then closed).
        """
        pdu = makePDU(
            Command.bind_transceiver,
            self._nextSequence(),
            system_id=self.settings.system_id,
            password=self.settings.password,
            system_type=self.settings.system_type,
            interface_version=INTERFACE_VERSION,
        )

        def answered(response: PDU) -> bytes:
            if response.command_id == Command.bind_transceiver_resp and response.status == 0:
                self.bound = True
                self._pump()
                return response.get("system_id")
            if self.transport is not None:
                self.transport.loseConnection()
            raise BindFailed(
                response.status,
                f"the SMSC refused the bind: {statusName(response.status)}",
            )

        def lost(failure: Failure) -> None:
            failure.trap(SessionLost)
            raise BindFailed(None, "the connection closed before the bind was answered")

        return self._request(pdu).addCallbacks(answered, lost)

    def submit(self, fields: dict, tlvs: tuple = (), order: Optional[int] = None) -> Deferred:
        """
        Send a submit_sm with C{fields} (its mandatory parameters; the rest
        are 0 or empty) when the window, the rate and any pause allow.

        @param order: where it goes in the queue (lower first); a retried
            message keeps the number it was first given.
        @return: a L{Deferred} firing with the SMSC's message id (C{str}),
            or failing with L{SubmitRefused} or L{SessionLost}.
        """
        makePDU(Command.submit_sm, 1, **fields)  # unknown names raise now
        result: Deferred = Deferred()
        if not self.connected or self.closing:
            result.errback(SessionLost("the SMPP session is not open"))
            return result
        heapq.heappush(
            self._queue,
            _Submit(nextOrder() if order is None else order, dict(fields), tuple(tlvs), result),
        )
        self._pump()
        return result

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def inFlight(self) -> int:
        return self._inWindow

    def _pump(self) -> None:
        """
        Send queued submits while the window, the rate and any pause allow.
        """
        if self._sendTimer is not None and self._sendTimer.active():
            return
        while self._queue and self.bound and not self.closing:
            if self._inWindow >= self.settings.window:
                return
            now = self.clock.seconds()
            wait = max(self._pausedUntil, self._nextSend) - now
            if wait > 0:
                self._sendTimer = self.clock.callLater(wait, self._pumpLater)
                return
            submit = heapq.heappop(self._queue)
            if self.settings.rate:
                self._nextSend = max(self._nextSend, now) + 1.0 / self.settings.rate
            self._send(submit)

    def _pumpLater(self) -> None:
        self._sendTimer = None
        self._pump()

    def _send(self, submit: _Submit) -> None:
        pdu = makePDU(Command.submit_sm, self._nextSequence(), tlvs=submit.tlvs, **submit.fields)
        self._inWindow += 1
        self.submitted += 1
        d = self._request(pdu, submit)
        d.addCallbacks(self._submitAnswered, self._submitLost, (submit,), None, (submit,))

    def _submitAnswered(self, response: PDU, submit: _Submit) -> None:
        self._inWindow -= 1
        status = response.status
        if status in THROTTLING:
            self._pause = min(MAX_PAUSE, self._pause * 2 if self._pause else 1.0)
            self._pausedUntil = self.clock.seconds() + self._pause
            self.log.info(
                "the SMSC answered {status}: pausing {pause:g}s, then sending again",
                status=statusName(status),
                pause=self._pause,
            )
            heapq.heappush(self._queue, submit)
        elif status == 0 and response.command_id == Command.submit_sm_resp:
            self._pause = 0.0
            messageID = response.get("message_id")
            submit.result.callback(messageID.decode("ascii", "replace"))
        else:
            submit.result.errback(SubmitRefused(status or Status.ESME_RUNKNOWNERR))
        self._pump()

    def _submitLost(self, failure: Failure, submit: _Submit) -> None:
        self._inWindow -= 1
        if not submit.result.called:
            submit.result.errback(failure)

    def unbind(self) -> Deferred:
        """
        Stop sending, unbind (waiting at most C{unbindTimeout} for the
        answer) and close the connection.  Submits not yet answered fail
        with L{SessionLost}.

        @return: a L{Deferred} firing once the connection is closed.
        """
        if not self.connected:
            return succeed(None)
        done = self.whenLost()
        if self.closing:
            return done
        self.closing = True
        if not self.bound:
            self.transport.loseConnection()
            return done
        self.bound = False
        d = self._request(makePDU(Command.unbind, self._nextSequence()))
        timer = self.clock.callLater(self.settings.unbindTimeout, self.transport.abortConnection)

        def close(_: Any) -> None:
            if timer.active():
                timer.cancel()
            if self.transport is not None and self.connected:
                self.transport.loseConnection()

        d.addBoth(close)
        return done

    # -- receiving ----------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        try:
            frames = self._frames.feed(data)
        except InvalidPDU as e:
            self._write(genericNack(0, e.status))
            self._drop(f"unreadable data from the SMSC: {e}")
            return
        for frame in frames:
            if not self.connected:
                return
            self._touch()
            try:
                pdu = decode(frame, self.settings.maxPDULength)
            except InvalidPDU as e:
                self.log.warn("unreadable PDU from the SMSC: {why}", why=str(e))
                if e.command_id is None or not e.command_id & 0x80000000:
                    self._write(genericNack(e.sequence or 0, e.status))
                continue
            self._received(pdu)

    def _received(self, pdu: PDU) -> None:
        if pdu.isResponse:
            request = self._outstanding.pop(pdu.sequence, None)
            if request is None:
                self.log.info(
                    "{name} for no request of ours (sequence {sequence}, {status})",
                    name=pdu.name,
                    sequence=pdu.sequence,
                    status=statusName(pdu.status),
                )
                return
            if request.timer.active():
                request.timer.cancel()
            request.result.callback(pdu)
            return
        command = pdu.command_id
        if command == Command.enquire_link:
            self._write(responseTo(pdu))
        elif command in (Command.deliver_sm, Command.data_sm):
            # Answered first, always: what the receiver makes of it is ours.
            self._write(responseTo(pdu, message_id=b""))
            try:
                self.receiver(pdu)
            except Exception:
                self.log.failure("handling {name} from the SMSC", name=pdu.name)
        elif command == Command.unbind:
            self._write(responseTo(pdu))
            self.bound = False
            self.closing = True
            self.log.info("the SMSC unbound the session")
            self.transport.loseConnection()
        elif command == Command.outbind:
            self.log.info("ignoring an outbind on a session we opened")
        else:
            self._write(genericNack(pdu.sequence, Status.ESME_RINVCMDID))
