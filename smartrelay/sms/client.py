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

Limits per cluster (issue 17).  With C{rates} (the store) and a
C{settings.rate}, the submit rate holds across every node sharing the
store: each submit_sm takes a token from the store's bucket
C{sms:<smsc>} (C{takeTokens}, as the mail rates) before it is handed to
the session, and the session paces nothing itself; a submit is handed on
only when the session can send it at once (window not full, nothing
queued in it), so the tokens are spent as the submits go out.  While the
store cannot be reached the node paces itself at C{rate / N} (C{N} live
nodes, C{nodes.count()}) and says so in the log.  With C{leases} (a
L{LeaseKeeper <smartrelay.cluster.leases.LeaseKeeper>}) and C{maxBinds},
a bind first takes a lease on C{sms-bind:<smsc>}, at most C{maxBinds}
held in the cluster; it is renewed by the keeper while the session is
bound and given back when it ends (a dead node's within the lease TTL).
A node refused one does not bind and tries again after the back-off.
"""

import heapq
import random
from typing import Any, Callable, Optional

import attrs
from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
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


#: The most a node waits, as a share of a token's time, beyond the moment
#: the bucket holds a token again (see L{SMSClient._fetchToken}).
JITTER = 0.05


class NotConnected(Exception):
    """
    No bound SMPP session came up in time for a submit.
    """


class BindsTaken(Exception):
    """
    Every bind the cluster may hold to the SMSC (C{maxBinds}) is held by
    other nodes.
    """


def _resourceName(text: str) -> str:
    """
    C{text} as a lease or bucket name: printable, no spaces, at most 200.
    """
    name = "".join(c if c.isprintable() and not c.isspace() else "_" for c in text)
    return name[:200] or "_"


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
    @ivar rates: the store whose token bucket C{rateKey} paces the submits
        cluster-wide (C{takeTokens}) at C{settings.rate}, or L{None} for
        the session's own pacing at that rate on this node.
    @ivar rateKey: the bucket (C{sms:<description>} unless given).
    @ivar burst: the bucket's capacity (1: submits spaced C{1 / rate}
        apart in the cluster, as the session spaces them alone).
    @ivar nodes: the live-node registry (C{count()}), for the C{rate / N}
        this node paces itself at while the store cannot be reached;
        L{None} counts this node alone.
    @ivar leases: a L{LeaseKeeper <smartrelay.cluster.leases.LeaseKeeper>}
        holding the cluster's binds (with C{maxBinds}), or L{None}.
    @ivar maxBinds: binds to the SMSC at most in the cluster (L{None}: no
        limit, one per node).
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
    rates: Any = None
    rateKey: Optional[str] = None
    burst: float = 1.0
    nodes: Any = None
    leases: Any = None
    maxBinds: Optional[int] = None
    #: Random numbers in [0, 1) for the wait after a lost race for a token.
    jitter: Callable[[], float] = random.random

    _service: ClientService = attrs.field(init=False)
    _session: Optional[ESMEProtocol] = attrs.field(default=None, init=False)
    _waiting: list = attrs.field(factory=list, init=False)
    #: The cluster-wide submit rate (submits a second), or L{None}.
    rate: Optional[float] = attrs.field(default=None, init=False)
    _tokens: int = attrs.field(default=0, init=False)
    _fetching: bool = attrs.field(default=False, init=False)
    _tokenTimer: Any = attrs.field(default=None, init=False)
    #: Whether the submits are paced on this node alone (store unreachable).
    ratesLocal: bool = attrs.field(default=False, init=False)
    #: The bind's lease while bound (with C{leases} and C{maxBinds}).
    bindLease: Any = attrs.field(default=None, init=False)

    log = Logger()

    def __attrs_post_init__(self) -> None:
        if self.rateKey is None:
            self.rateKey = "sms:" + _resourceName(self.description)
        if self.rates is not None and self.settings.rate:
            # Paced here through the store's bucket, not by the session.
            self.rate = self.settings.rate
            self.settings = attrs.evolve(self.settings, rate=None)
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
        lease: list = [None]
        if self.leases is not None and self.maxBinds:
            d = self.leases.acquire("sms-bind:" + _resourceName(self.description), self.maxBinds)

            def leased(acquired: Any) -> Deferred:
                if acquired.lease is None:
                    return fail(
                        BindsTaken(
                            f"all {self.maxBinds} binds to the SMSC are held by other nodes"
                        )
                    )
                lease[0] = acquired.lease
                return session.bind()

            d.addCallback(leased)
        else:
            d = session.bind()

        def bound(systemID: bytes) -> None:
            self.log.info(
                "SMPP session to {smsc} bound (SMSC system id {system!r})",
                smsc=self.description,
                system=systemID.decode("ascii", "replace"),
            )
            self._session = session
            self.bindLease = lease[0]
            session.whenLost().addCallback(lambda _: self._lost(session, lease[0]))
            self._flush()

        def failed(failure: Failure) -> Failure:
            if lease[0] is not None:
                lease[0].release()
            if failure.check(BindsTaken):
                self.log.info(
                    "not binding to {smsc}: {why}; trying again later",
                    smsc=self.description,
                    why=failure.getErrorMessage(),
                )
            else:
                why = failure.getErrorMessage() if failure.check(BindFailed) else failure
                self.log.error(
                    "SMPP bind to {smsc} failed: {why}", smsc=self.description, why=why
                )
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

    def _lost(self, session: ESMEProtocol, lease: Any = None) -> None:
        if lease is not None:
            lease.release()
            if self.bindLease is lease:
                self.bindLease = None
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
        if self._tokenTimer is not None and self._tokenTimer.active():
            self._tokenTimer.cancel()
        self._tokenTimer = None
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
            if self.rate is not None and self.bound:
                # Waiting for the cluster's rate, not for a session: the
                # session would have queued it (and paced it) alone.
                request.timer = self.clock.callLater(self.queueTimeout, self._expire, request)
                return
            self._waiting.remove(request)
            heapq.heapify(self._waiting)
            request.result.errback(
                NotConnected(
                    f"no SMPP session to {self.description} within {self.queueTimeout:g}s"
                )
            )

    def _flush(self) -> None:
        session = self._session
        lease = self.bindLease
        if lease is not None and lease.lost and session is not None and session.bound:
            # The store gave the bind's slot to another node (not renewed
            # in time): bind again, with a lease, after the back-off.
            self.log.warn(
                "the lease of the SMPP bind to {smsc} was lost; unbinding",
                smsc=self.description,
            )
            self.bindLease = None
            session.unbind()
            return
        paced = self.rate is not None
        while self._waiting and session is not None and session.bound:
            if paced:
                if session.queued or session.inFlight >= self.settings.window:
                    return  # again when an answer comes
                if self._tokens <= 0:
                    self._fetchToken()
                    return
                self._tokens -= 1
            request = heapq.heappop(self._waiting)
            self._cancelTimer(request)
            d = session.submit(request.fields, request.tlvs, order=request.order)
            d.addCallbacks(
                request.result.callback, self._failed, errbackArgs=(request,)
            )
            if paced:
                d.addCallback(self._answered)

    def _answered(self, _: Any) -> None:
        self._flush()

    # -- the cluster-wide submit rate -------------------------------------------

    def nodeCount(self) -> int:
        """
        N: the live nodes the registry last saw (1 without one).
        """
        return 1 if self.nodes is None else max(1, self.nodes.count())

    def _fetchToken(self) -> None:
        """
        Take one token from the store's bucket; flush again when there is
        one (at once, or when the bucket refills).
        """
        if self._fetching or (self._tokenTimer is not None and self._tokenTimer.active()):
            return
        self._fetching = True
        rate = self.rate

        def later(delay: float) -> None:
            if self.running:
                self._tokenTimer = self.clock.callLater(max(delay, 0.001), self._flush)

        def taken(result: Any) -> None:
            self._fetching = False
            if self.ratesLocal:
                self.ratesLocal = False
                self.log.info(
                    "the store answers again: the submit rate to {smsc} is cluster-wide again",
                    smsc=self.description,
                )
            if result.allowed:
                self._tokens += 1
                self._flush()
                return
            # Nodes waiting for the same refill would ask at the same
            # moment and win in the same order every time: each waits a
            # random 0-5 % of a token's time more (a node alone loses
            # about 2.5 % of the rate).
            later(result.retry_after + JITTER * self.jitter() / rate)

        def failed(failure: Failure) -> None:
            # The store is unreachable: pace at this node's share of the
            # rate rather than stop sending or send without limit.
            self._fetching = False
            nodes = self.nodeCount()
            if not self.ratesLocal:
                self.ratesLocal = True
                self.log.warn(
                    "could not take a submit token for {smsc} ({why}); submits are paced "
                    "on this node at 1/{nodes} of [sms] rate until the store answers",
                    smsc=self.description,
                    why=failure.getErrorMessage() or failure.type.__name__,
                    nodes=nodes,
                )
            self._tokens += 1
            later(nodes / rate)
            self._flush()

        d = maybeDeferred(
            self.rates.takeTokens, self.rateKey, rate, max(1.0, self.burst), self.clock.seconds()
        )
        d.addCallbacks(taken, failed)

    def _failed(self, failure: Failure, request: _Request) -> None:
        if failure.check(SessionLost) and self.running:
            # Unanswered: the next bind sends it again, first.
            self._enqueue(request)
            self._flush()
            return
        if failure.check(SessionLost):
            failure = Failure(NotConnected("the SMS client stopped before the SMSC answered"))
        request.result.errback(failure)
