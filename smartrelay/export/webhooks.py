# -*- test-case-name: tests.test_webhooks -*-
"""
Signed webhooks (DESIGN section 1.7b): the store's events, as
C{{"events": [...]}} batches POSTed to C{[webhooks] url}.

Two steps, both through the store (L{IEventStreams}), so a crash loses
nothing and several nodes sharing a Redis store deliver each event once:

  1. I{fill}: claim the next events of the C{webhooks} stream (this node's
     claim), keep the C{[webhooks] events} types, cut them into batches of
     C{[webhooks] batch} and add them to the C{webhooks} outbox in the
     same atomic step that finishes the claim (batch ids come from the
     claim, so a claim filled again after a crash adds nothing twice);
  2. I{deliver}: take due batches from the outbox (each leased to this
     node while it is POSTed), sign and POST each; a 2xx removes it, any
     other answer, a timeout or a refused connection defers it with
     exponential back-off and jitter, until it is older than C{[webhooks]
     max_age}: then it is dropped with an error in the log and counted.

Delivery is at least once: a node that dies after the receiver answered
and before the batch was removed sends it again after its lease.  Both
steps run at least every second (L{TICK}), and at once again while there
is more to do.

The HTTP side (L{AgentPoster}) connects only to addresses that pass
L{smartrelay.ssrf} (checked at every new connection, so DNS
rebinding gets nowhere), follows no redirect and reads at most
L{MAX_RESPONSE_BODY} bytes of an answer.
"""

import hashlib
import hmac
import json
import random
from typing import Any, Callable, Optional, Sequence

import attrs
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.error import ConnectError, ConnectionRefusedError
from twisted.internet.interfaces import IReactorTime, IResolutionReceiver
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import Interface, implementer

from smartrelay.ssrf import URLRefused, checkResolved, hostAddress
from smartrelay.store.interfaces import IEventStreams, OutboxBatch

#: The store stream and outbox the webhooks use.
STREAM = OUTBOX = "webhooks"
#: Seconds between rounds when there is nothing more to do.
TICK = 1.0
#: Bytes of a receiver's answer that are read (the rest is dropped).
MAX_RESPONSE_BODY = 64 * 1024
#: Seconds of the first retry; each further one doubles, up to MAX_DELAY.
FIRST_DELAY = 2.0
MAX_DELAY = 3600.0
#: The claims of the fill step, in batches.
CLAIM_BATCHES = 10
#: The signature header.
SIGNATURE_HEADER = "X-SmartRelay-Signature"


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    """
    The C{X-SmartRelay-Signature} value for C{body} sent at C{timestamp}
    (unix seconds): C{t=<timestamp>,v1=<hex HMAC-SHA256(secret, "<t>." +
    body)>}.
    """
    mac = hmac.new(secret, b"%d." % timestamp + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify(secret: bytes, header: str, body: bytes, now: float, tolerance: float = 300) -> bool:
    """
    What a receiver does (docs/webhooks.md): the header's C{v1} is the
    HMAC of C{t} and the body, and C{t} is within C{tolerance} seconds of
    C{now}.
    """
    try:
        fields = dict(item.split("=", 1) for item in header.split(","))
        timestamp = int(fields["t"])
        given = fields["v1"]
    except (KeyError, ValueError):
        return False
    if abs(now - timestamp) > tolerance:
        return False
    expected = hmac.new(secret, b"%d." % timestamp + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, given)


def retryDelay(attempts: int, rng: random.Random) -> float:
    """
    Seconds before the next try of a batch deferred C{attempts} times
    before: L{FIRST_DELAY} doubled per attempt up to L{MAX_DELAY}, of which
    a random half to all (jitter, so that a receiver coming back is not
    hit by every batch at once).
    """
    base = min(MAX_DELAY, FIRST_DELAY * 2 ** min(attempts, 30))
    return base * (0.5 + rng.random() / 2)


@attrs.frozen
class WebhookResponse:
    """
    A receiver's answer: the status code and the start of the body.
    """

    code: int
    body: bytes = b""


class IWebhookPoster(Interface):
    """
    Sends one POST.
    """

    def post(url, body, headers):
        """
        POST C{body} (bytes) with C{headers} (str -> str) to C{url}.

        @rtype: L{Deferred} firing with a L{WebhookResponse}, or failing
            for a connection that could not be made or broke, a refused
            address (L{URLRefused}) or a timeout.
        """

    def close():
        """
        Close idle connections.

        @rtype: L{Deferred}
        """


@implementer(IResolutionReceiver)
class _Addresses:
    def __init__(self):
        self.done: Deferred = Deferred()
        self.addresses: list = []

    def resolutionBegan(self, resolution):
        pass

    def addressResolved(self, address):
        self.addresses.append(address.host)

    def resolutionComplete(self):
        self.done.callback(self.addresses)


def resolveAll(reactor: Any, host: str, port: int) -> Deferred:
    """
    Every address of C{host} (IPv4 and IPv6) through the reactor's
    C{nameResolver}.
    """
    receiver = _Addresses()
    reactor.nameResolver.resolveHostName(receiver, host, port)
    return receiver.done


class _CheckedEndpoint:
    """
    A client endpoint that resolves its host, keeps the addresses that
    L{checkResolved} allows and connects to those in turn (TLS checked
    against the host name for https): the address connected to is always
    one that was checked.
    """

    def __init__(self, factory: "SafeEndpointFactory", scheme: str, host: str, port: int):
        self.factory = factory
        self.scheme = scheme
        self.host = host
        self.port = port

    def connect(self, protocolFactory):
        return Deferred.fromCoroutine(self._connect(protocolFactory))

    async def _connect(self, protocolFactory):
        f = self.factory
        literal = hostAddress(self.host)
        if literal is not None:
            addresses = [str(literal)]
        else:
            addresses = await f.resolve(self.host, self.port)
        allowed = checkResolved(self.host, addresses, f.allowPrivate)
        failure = None
        for address in allowed:
            if ":" in address:
                endpoint = TCP6ClientEndpoint(f.reactor, address, self.port, timeout=f.connectTimeout)
            else:
                endpoint = TCP4ClientEndpoint(f.reactor, address, self.port, timeout=f.connectTimeout)
            if self.scheme == b"https":
                from twisted.internet.ssl import optionsForClientTLS

                endpoint = wrapClientTLS(optionsForClientTLS(self.host), endpoint)
            try:
                return await endpoint.connect(protocolFactory)
            except ConnectError as e:
                failure = e
        raise failure if failure is not None else ConnectionRefusedError(self.host)


@implementer(IAgentEndpointFactory)
class SafeEndpointFactory:
    """
    The L{Agent}'s endpoints: every new connection checked by
    L{smartrelay.ssrf}.

    @ivar resolve: C{resolve(host, port) -> Deferred[list of addresses]}.
    """

    def __init__(self, reactor, allowPrivate: bool, resolve=None, connectTimeout: float = 30):
        self.reactor = reactor
        self.allowPrivate = allowPrivate
        self.resolve = resolve or (lambda host, port: resolveAll(reactor, host, port))
        self.connectTimeout = connectTimeout

    def endpointForURI(self, uri):
        host = uri.host.decode("ascii")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        return _CheckedEndpoint(self, uri.scheme, host, uri.port)


class _LimitedBody(Protocol):
    """
    Reads at most C{limit} bytes of a response body, then stops reading.
    """

    def __init__(self, done: Deferred, limit: int):
        self.done = done
        self.limit = limit
        self.data = b""

    def dataReceived(self, data):
        if len(self.data) < self.limit:
            self.data += data[: self.limit - len(self.data)]
        if len(self.data) >= self.limit and not self.done.called:
            self.done.callback(self.data)
            self.transport.stopProducing()

    def connectionLost(self, reason):
        if not self.done.called:
            self.done.callback(self.data)


@implementer(IWebhookPoster)
class AgentPoster:
    """
    L{IWebhookPoster} with Twisted's L{Agent}: persistent connections, no
    redirects followed, answers read up to L{MAX_RESPONSE_BODY}, the whole
    request given C{timeout} seconds.
    """

    def __init__(self, reactor, allowPrivate: bool, timeout: float = 30.0, resolve=None,
                 maxConnections: int = 4):
        self.reactor = reactor
        self.timeout = timeout
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = maxConnections
        self.pool.cachedConnectionTimeout = 60
        self.agent = Agent.usingEndpointFactory(
            reactor,
            SafeEndpointFactory(reactor, allowPrivate, resolve, connectTimeout=timeout),
            pool=self.pool,
        )

    def post(self, url: str, body: bytes, headers: dict) -> Deferred:
        d = Deferred.fromCoroutine(self._post(url, body, headers))
        return d.addTimeout(self.timeout, self.reactor)

    async def _post(self, url: str, body: bytes, headers: dict) -> WebhookResponse:
        from twisted.web.client import FileBodyProducer
        import io

        response = await self.agent.request(
            b"POST",
            url.encode("ascii"),
            Headers({k: [v] for k, v in headers.items()}),
            FileBodyProducer(io.BytesIO(body)),
        )
        done: Deferred = Deferred()
        response.deliverBody(_LimitedBody(done, MAX_RESPONSE_BODY))
        data = await done
        return WebhookResponse(response.code, data)

    def close(self) -> Deferred:
        return self.pool.closeCachedConnections()


def _why(failure: Failure) -> str:
    if failure.check(defer.TimeoutError, defer.CancelledError):
        return "timed out"
    if failure.check(URLRefused):
        return "refused: " + failure.getErrorMessage()
    text = failure.getErrorMessage() or failure.type.__name__
    return " ".join(text.split())[:300]


class WebhookSender(Service):
    """
    Fills the outbox from the store's events and delivers it (above).

    @ivar delivered: events delivered by this run (2xx).
    @ivar batches: batches delivered by this run.
    @ivar failedAttempts: POSTs that failed (non-2xx, timeout, refused).
    @ivar dropped: batches given up after C{maxAge}.
    @ivar droppedEvents: the events in them.
    @ivar outboxSize: batches in the outbox at the last look (all nodes).
    @ivar lastSuccess: clock seconds of the last 2xx, or L{None}.
    """

    log = Logger()

    def __init__(
        self,
        *,
        store: IEventStreams,
        clock: IReactorTime,
        poster: IWebhookPoster,
        url: str,
        secret: str,
        owner: str,
        events: Sequence[str] = (),
        batch: int = 100,
        maxAge: float = 3 * 86400.0,
        concurrency: int = 4,
        lease: float = 90.0,
        rng: Optional[random.Random] = None,
    ):
        self.store = store
        self.clock = clock
        self.poster = poster
        self.url = url
        self.secret = secret.encode("utf-8")
        self.owner = owner
        self.types = frozenset(events)
        self.batch = batch
        self.maxAge = maxAge
        self.concurrency = concurrency
        self.lease = lease
        self.rng = rng or random.Random()
        self.delivered = 0
        self.batches = 0
        self.failedAttempts = 0
        self.dropped = 0
        self.droppedEvents = 0
        self.outboxSize = 0
        self.lastSuccess: Optional[float] = None
        self._timer = None
        self._round: Optional[Deferred] = None
        self._again = False
        self._inFlight: dict = {}
        self._failures = 0

    # -- the service -----------------------------------------------------

    def startService(self) -> None:
        Service.startService(self)
        self._wake(0)

    def stopService(self) -> Deferred:
        Service.stopService(self)
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        waiting = [d for d in [self._round, *self._inFlight.values()] if d is not None]
        # POSTs in flight finish (their batches are removed or deferred);
        # batches not taken stay in the outbox for the next start.
        d = defer.DeferredList(waiting)
        return d.addCallback(lambda _: self.poster.close())

    @property
    def inFlight(self) -> int:
        return len(self._inFlight)

    def _wake(self, delay: float) -> None:
        if not self.running:
            return
        if self._round is not None:
            self._again = True
            return
        if self._timer is not None and self._timer.active():
            if delay > 0:
                return
            self._timer.cancel()
        self._timer = self.clock.callLater(delay, self._runRound)

    def _runRound(self) -> None:
        self._timer = None
        self._again = False
        self._round = Deferred.fromCoroutine(self.round())
        self._round.addBoth(self._roundDone)

    def _roundDone(self, result) -> None:
        self._round = None
        delay = TICK
        if isinstance(result, Failure):
            self._failures += 1
            delay = min(60.0, TICK * 2 ** min(self._failures, 6))
            self.log.failure("webhooks: store trouble; trying again in {delay:g}s",
                             result, delay=delay)
        else:
            self._failures = 0
            if result or self._again:
                delay = 0
        self._wake(delay)

    # -- one round -----------------------------------------------------------

    async def round(self) -> bool:
        """
        Fill the outbox once and start POSTs for the due batches.

        @return: whether there is more to do at once.
        """
        more = await self.fill()
        if len(self._inFlight) < self.concurrency:
            taken = await self.store.takeFromOutbox(
                OUTBOX, self.clock.seconds(), self.lease,
                limit=self.concurrency - len(self._inFlight),
            )
            for batch in taken:
                if batch.id not in self._inFlight:
                    self._send(batch)
            more = more or len(taken) == self.concurrency
        self.outboxSize = await self.store.outboxSize(OUTBOX)
        return more and len(self._inFlight) < self.concurrency

    async def fill(self) -> bool:
        """
        Move the next claim of the stream into the outbox.

        @return: whether the claim was full (more may be waiting).
        """
        limit = self.batch * CLAIM_BATCHES
        now = self.clock.seconds()
        claim = await self.store.claimEvents(STREAM, self.owner, now, limit=limit, begin="newest")
        if claim is None:
            return False
        events = []
        cursor = None
        while True:
            page = await self.store.claimedEvents(claim, cursor=cursor, limit=1000)
            events.extend(e for e in page.events if not self.types or e.type in self.types)
            cursor = page.cursor
            if cursor is None:
                break
        batches = []
        for i in range(0, len(events), self.batch):
            chunk = events[i : i + self.batch]
            body = json.dumps(
                {"events": [e.asDict() for e in chunk]}, ensure_ascii=False,
                separators=(",", ":"),
            )
            batches.append(OutboxBatch(
                id="%016x-%04d" % (claim.after + 1, i // self.batch),
                body=body, created=now, due=now,
            ))
        await self.store.addToOutbox(OUTBOX, batches, claim)
        return claim.last - claim.after >= limit

    # -- one POST ------------------------------------------------------------

    def _send(self, batch: OutboxBatch) -> None:
        d = Deferred.fromCoroutine(self._deliver(batch))
        self._inFlight[batch.id] = d

        def done(result):
            del self._inFlight[batch.id]
            if isinstance(result, Failure):
                self.log.failure("webhooks: could not settle batch {id}", result, id=batch.id)
            self._wake(0)

        d.addBoth(done)

    async def _deliver(self, batch: OutboxBatch) -> None:
        body = batch.body.encode("utf-8")
        timestamp = int(self.clock.seconds())
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "smartrelay-webhooks",
            SIGNATURE_HEADER: sign(self.secret, timestamp, body),
        }
        try:
            response = await self.poster.post(self.url, body, headers)
        except Exception:
            why = _why(Failure())
        else:
            if 200 <= response.code < 300:
                await self.store.removeFromOutbox(OUTBOX, batch.id)
                count = len(json.loads(body)["events"])
                self.delivered += count
                self.batches += 1
                self.lastSuccess = self.clock.seconds()
                return
            why = f"HTTP {response.code}"
            if 300 <= response.code < 400:
                why += " (redirects are not followed)"
        self.failedAttempts += 1
        now = self.clock.seconds()
        if now - batch.created >= self.maxAge:
            await self.store.removeFromOutbox(OUTBOX, batch.id)
            events = len(json.loads(body)["events"])
            self.dropped += 1
            self.droppedEvents += events
            self.log.error(
                "webhooks: gave up batch {id} ({events} events) after {attempts} attempts"
                " over {age:.0f}s: {why}",
                id=batch.id, events=events, attempts=batch.attempts + 1,
                age=now - batch.created, why=why,
            )
            return
        delay = min(retryDelay(batch.attempts, self.rng), batch.created + self.maxAge - now)
        await self.store.deferInOutbox(OUTBOX, batch.id, now + max(delay, 0.0))
        self.log.warn(
            "webhooks: POST of batch {id} to {url} failed ({why}); attempt {attempt},"
            " next in {delay:.0f}s",
            id=batch.id, url=self.url, why=why, attempt=batch.attempts + 1, delay=delay,
        )
