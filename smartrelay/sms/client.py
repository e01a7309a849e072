# -*- test-case-name: tests.test_sms_client -*-
"""
The persistent SMPP session to C{[sms] smsc}: a Twisted C{ClientService}
(back-off with jitter between connection attempts) whose
C{prepareConnection} binds, so a connection counts as made only once it
is bound.

L{SMSClient.submit} queues a submit_sm for whichever session is bound.
A submit whose session ends before it is answered (response timeout,
unbind, lost connection) goes back to the front of the queue, in its
original order, and is sent again on the next bind: the SMSC may already
have it, so delivery is at least once.  A submit that finds no bound
session for C{queueTimeout} seconds fails with L{NotConnected}, which the
gateway reports as a temporary failure (the delivery scheduler tries the
recipient again later).
"""

import heapq
import random
from typing import Any, Callable, Optional

import attrs
from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from smartrelay.sms.codec import PDU
from smartrelay.sms.protocol import (
    BindFailed,
    ESMEProtocol,
    SessionLost,
    SessionSettings,
    nextOrder,
)


class NotConnected(Exception):
    """
    No bound SMPP session came up in time for a submit.
    """


@attrs.define(eq=False)
class _Request:
    order: int
    fields: dict
    tlvs: tuple
    result: Deferred
    timer: Any = None

    def __lt__(self, other: "_Request") -> bool:
        return self.order < other.order


@attrs.define(eq=False, slots=False)
class _SessionFactory(Factory):
    client: "SMSClient"

    def buildProtocol(self, addr):
        protocol = ESMEProtocol(self.client.clock, self.client.settings, self.client.receiver)
        protocol.factory = self
        return protocol


@attrs.define(eq=False, slots=False)
class SMSClient(Service):
    """
    Keeps one bound transceiver session to the SMSC and sends submits
    through it.

    @ivar receiver: called with every deliver_sm / data_sm (receipts).
    @ivar queueTimeout: seconds a submit waits for a bound session.
    """

    endpoint: IStreamClientEndpoint
    clock: IReactorTime
    settings: SessionSettings
    receiver: Callable[[PDU], Any]
    queueTimeout: float = 60.0
    retryPolicy: Callable[[int], float] = attrs.field(
        factory=lambda: backoffPolicy(initialDelay=1.0, maxDelay=60.0, factor=2.0,
                                      jitter=random.random)
    )
    description: str = "the SMSC"

    _service: ClientService = attrs.field(init=False)
    _session: Optional[ESMEProtocol] = attrs.field(default=None, init=False)
    _waiting: list = attrs.field(factory=list, init=False)

    log = Logger()

    def __attrs_post_init__(self) -> None:
        self._service = ClientService(
            self.endpoint,
            _SessionFactory(self),
            retryPolicy=self.retryPolicy,
            clock=self.clock,
            prepareConnection=self._bind,
        )

    @property
    def bound(self) -> bool:
        return self._session is not None and self._session.bound

    @property
    def inFlight(self) -> int:
        """
        Submits sent on the session and not answered yet (at most the
        window).
        """
        return 0 if self._session is None else self._session.inFlight

    @property
    def waiting(self) -> int:
        """
        Submits waiting for a session (not sent, or to be sent again).
        """
        return len(self._waiting)

    def _bind(self, session: ESMEProtocol) -> Deferred:
        d = session.bind()

        def bound(systemID: bytes) -> None:
            self.log.info(
                "SMPP session to {smsc} bound (SMSC system id {system!r})",
                smsc=self.description,
                system=systemID.decode("ascii", "replace"),
            )
            self._session = session
            session.whenLost().addCallback(lambda _: self._lost(session))
            self._flush()

        def failed(failure: Failure) -> Failure:
            why = failure.getErrorMessage() if failure.check(BindFailed) else failure
            self.log.error("SMPP bind to {smsc} failed: {why}", smsc=self.description, why=why)
            # ClientService (Twisted 26.10) neither closes a connection
            # whose prepareConnection failed nor has a transition for its
            # later disconnect (NoTransition in its Waiting state): close it
            # here, unseen by the service, which is already waiting to retry.
            if hasattr(session, "_lostNotification"):
                session._lostNotification = lambda reason: None
            if session.connected and session.transport is not None:
                session.transport.loseConnection()
            return failure

        return d.addCallbacks(bound, failed)

    def _lost(self, session: ESMEProtocol) -> None:
        if self._session is session:
            self._session = None
            if self.running:
                self.log.warn("SMPP session to {smsc} lost; reconnecting", smsc=self.description)

    def startService(self) -> None:
        Service.startService(self)
        self._service.startService()

    def stopService(self) -> Deferred:
        """
        Unbind, close, and fail every waiting submit with L{SessionLost}.
        """
        Service.stopService(self)
        session, self._session = self._session, None
        d = session.unbind() if session is not None else succeed(None)

        def stopped(_: Any) -> Deferred:
            waiting, self._waiting = sorted(self._waiting), []
            for request in waiting:
                self._cancelTimer(request)
                if not request.result.called:
                    request.result.errback(SessionLost("the SMS client is stopping"))
            return self._service.stopService()

        return d.addBoth(stopped)

    def submit(self, fields: dict, tlvs: tuple = ()) -> Deferred:
        """
        Send a submit_sm on the bound session (now or once there is one).

        @return: a L{Deferred} firing with the SMSC's message id, or
            failing with L{SubmitRefused <smartrelay.sms.protocol.SubmitRefused>}
            or L{NotConnected}.
        """
        request = _Request(nextOrder(), dict(fields), tuple(tlvs), Deferred())
        if not self.running:
            request.result.errback(NotConnected("the SMS client is not running"))
            return request.result
        self._enqueue(request)
        self._flush()
        return request.result

    def _enqueue(self, request: _Request) -> None:
        heapq.heappush(self._waiting, request)
        if request.timer is None:
            request.timer = self.clock.callLater(self.queueTimeout, self._expire, request)

    def _cancelTimer(self, request: _Request) -> None:
        if request.timer is not None and request.timer.active():
            request.timer.cancel()
        request.timer = None

    def _expire(self, request: _Request) -> None:
        request.timer = None
        if request in self._waiting:
            self._waiting.remove(request)
            heapq.heapify(self._waiting)
            request.result.errback(
                NotConnected(
                    f"no SMPP session to {self.description} within {self.queueTimeout:g}s"
                )
            )

    def _flush(self) -> None:
        session = self._session
        while self._waiting and session is not None and session.bound:
            request = heapq.heappop(self._waiting)
            self._cancelTimer(request)
            d = session.submit(request.fields, request.tlvs, order=request.order)
            d.addCallbacks(
                request.result.callback, self._failed, errbackArgs=(request,)
            )

    def _failed(self, failure: Failure, request: _Request) -> None:
        if failure.check(SessionLost) and self.running:
            # Unanswered: the next bind sends it again, first.
            self._enqueue(request)
            self._flush()
            return
        if failure.check(SessionLost):
            failure = Failure(NotConnected("the SMS client stopped before the SMSC answered"))
        request.result.errback(failure)
