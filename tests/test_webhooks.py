"""
Tests for L{smartrelay.export.webhooks}: signatures, the outbox filled
from the store and delivered with retries, back-off and give-up, several
nodes, and the connect-time address checks; on a memory store, a fake
clock and a fake poster.
"""

import json
import random

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import URI
from zope.interface import implementer
from zope.interface.verify import verifyObject

from smartrelay.events import Event
from smartrelay.ssrf import URLRefused
from smartrelay.export.webhooks import (
    FIRST_DELAY,
    MAX_DELAY,
    OUTBOX,
    SIGNATURE_HEADER,
    AgentPoster,
    IWebhookPoster,
    SafeEndpointFactory,
    WebhookResponse,
    WebhookSender,
    _LimitedBody,
    retryDelay,
    sign,
    verify,
)
from smartrelay.store.memory import MemoryStore

T0 = 1_796_000_000.0
SECRET = "0123456789abcdef-secret"


@implementer(IWebhookPoster)
class FakePoster:
    """
    Records POSTs; answers each with the next of C{answers} (a code, an
    exception, or None for a Deferred the test fires), then 200.
    """

    def __init__(self, answers=()):
        self.answers = list(answers)
        self.posts = []
        self.closed = False

    def post(self, url, body, headers):
        answer = self.answers.pop(0) if self.answers else 200
        d = Deferred() if answer is None else None
        self.posts.append((url, body, headers, d))
        if d is not None:
            return d
        if isinstance(answer, Exception):
            return fail(answer)
        return succeed(WebhookResponse(answer, b"ok"))

    def close(self):
        self.closed = True
        return succeed(None)

    def events(self):
        return [e["id"] for _, body, _, _ in self.posts for e in json.loads(body)["events"]]


def event(n, type="delivered"):
    """
    A numbered event.
    """
    return Event(type=type, queue_id="Q", recipient=f"r{n}@example.com", time=T0 + n, id=f"e{n}")


class SignatureTests(SynchronousTestCase):
    """
    The C{X-SmartRelay-Signature} header of DESIGN section 1.7b.
    """

    def test_knownValue(self):
        """
        C{v1} is the hex HMAC-SHA256 of C{"<t>." + body} under the secret.
        """
        self.assertEqual(
            sign(b"secret", 1700000000, b'{"events":[]}'),
            "t=1700000000,v1=" + __import__("hmac").new(
                b"secret", b'1700000000.{"events":[]}', "sha256").hexdigest(),
        )

    def test_verify(self):
        """
        L{verify} accepts the right signature within 5 minutes and refuses
        another secret, another body, an old or future timestamp and a
        malformed header.
        """
        header = sign(b"k", 1000, b"body")
        self.assertTrue(verify(b"k", header, b"body", 1000 + 299))
        self.assertFalse(verify(b"x", header, b"body", 1000))
        self.assertFalse(verify(b"k", header, b"bodY", 1000))
        self.assertFalse(verify(b"k", header, b"body", 1000 + 301))
        self.assertFalse(verify(b"k", header, b"body", 1000 - 301))
        for bad in ["", "t=1000", "v1=ab", "t=x,v1=ab", "nonsense"]:
            self.assertFalse(verify(b"k", bad, b"body", 1000))

    def test_retryDelays(self):
        """
        Delays double from L{FIRST_DELAY} up to L{MAX_DELAY}, each between
        half and all of that.
        """
        rng = random.Random(1)
        for attempts in range(40):
            base = min(MAX_DELAY, FIRST_DELAY * 2**attempts)
            delay = retryDelay(attempts, rng)
            self.assertTrue(base / 2 <= delay <= base, (attempts, delay))


class SenderTests(SynchronousTestCase):
    """
    L{WebhookSender}: every event, in signed batches, at least once.
    """

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(T0)
        self.store = MemoryStore()
        self.logged = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)

    def sender(self, poster, owner="2A", **kw):
        options = dict(
            store=self.store, clock=self.clock, poster=poster,
            url="https://hooks.example.com/in", secret=SECRET, owner=owner,
            rng=random.Random(0),
        )
        options.update(kw)
        sender = WebhookSender(**options)
        sender.startService()
        self.addCleanup(sender.stopService)
        self.clock.advance(0)
        return sender

    def append(self, *events):
        self.successResultOf(self.store.appendEvents(list(events)))

    def test_signedBatches(self):
        """
        Events appended after the start are POSTed in batches of C{batch}
        as C{{"events": [...]}} with section 1.7 objects, each signed with
        the secret and the clock's time; events from before the first
        start are not sent.
        """
        self.append(event(0))
        poster = FakePoster()
        sender = self.sender(poster, batch=2)
        self.append(event(1), event(2), event(3))
        self.clock.advance(1)
        self.assertEqual(poster.events(), ["e1", "e2", "e3"])
        self.assertEqual([len(json.loads(b)["events"]) for _, b, _, _ in poster.posts], [2, 1])
        url, body, headers, _ = poster.posts[0]
        self.assertEqual(url, "https://hooks.example.com/in")
        self.assertEqual(json.loads(body)["events"][0], event(1).asDict())
        self.assertEqual(headers["Content-Type"], "application/json")
        self.assertTrue(verify(SECRET.encode(), headers[SIGNATURE_HEADER], body, T0 + 1))
        self.assertTrue(headers[SIGNATURE_HEADER].startswith("t=%d," % (T0 + 1)))
        self.assertEqual((sender.delivered, sender.batches), (3, 2))
        self.assertEqual(self.successResultOf(self.store.outboxSize(OUTBOX)), 0)

    def test_typeFilter(self):
        """
        Only the C{[webhooks] events} types are sent.
        """
        poster = FakePoster()
        self.sender(poster, events=["bounced"])
        self.append(event(1), event(2, "bounced"), event(3, "opened"))
        self.clock.advance(1)
        self.assertEqual(poster.events(), ["e2"])

    def test_retriesWithBackOff(self):
        """
        Two 500s, then success: the batch is tried again after the
        back-off delays and delivered once; the failures are logged.
        """
        poster = FakePoster([500, 503])
        sender = self.sender(poster)
        self.append(event(1))
        self.clock.advance(1)
        self.assertEqual(len(poster.posts), 1)
        self.clock.advance(FIRST_DELAY / 2 - 0.1)
        self.assertEqual(len(poster.posts), 1)
        self.clock.advance(FIRST_DELAY)
        self.assertEqual(len(poster.posts), 2)
        self.clock.advance(2 * FIRST_DELAY + 1)
        self.assertEqual(len(poster.posts), 3)
        self.assertEqual(sender.delivered, 1)
        self.assertEqual(sender.failedAttempts, 2)
        self.clock.advance(3600)
        self.assertEqual(len(poster.posts), 3)
        warnings = [e for e in self.logged if "HTTP 500" in str(e.get("why"))]
        self.assertEqual(len(warnings), 1)

    def test_refusedAndTimeoutRetried(self):
        """
        A refused connection and an address refused at connect time are
        failures like a 5xx.
        """
        poster = FakePoster([ConnectionRefusedError(), URLRefused("x resolves to a loopback")])
        sender = self.sender(poster)
        self.append(event(1))
        self.clock.advance(1)
        self.clock.advance(FIRST_DELAY + 1)
        self.clock.advance(2 * FIRST_DELAY + 1)
        self.assertEqual(len(poster.posts), 3)
        self.assertEqual(sender.delivered, 1)
        whys = [e.get("why") for e in self.logged if e.get("why")]
        self.assertTrue(any("refused: x resolves" in w for w in whys), whys)

    def test_redirectNotFollowed(self):
        """
        A 3xx is a failure, logged as a redirect that is not followed.
        """
        poster = FakePoster([302])
        self.sender(poster)
        self.append(event(1))
        self.clock.advance(1)
        whys = [e.get("why") for e in self.logged if e.get("why")]
        self.assertIn("HTTP 302 (redirects are not followed)", whys)

    def test_givenUpAfterMaxAge(self):
        """
        A batch still failing at C{max_age} is dropped with an error in the
        log and counted.
        """
        poster = FakePoster([500] * 1000)
        sender = self.sender(poster, maxAge=60.0)
        self.append(event(1), event(2))
        for _ in range(100):
            self.clock.advance(5)
        self.assertEqual((sender.dropped, sender.droppedEvents), (1, 2))
        self.assertEqual(self.successResultOf(self.store.outboxSize(OUTBOX)), 0)
        errors = [e for e in self.logged if "gave up" in e.get("log_format", "")]
        self.assertEqual(len(errors), 1)
        self.assertEqual(errors[0]["log_level"].name, "error")
        tries = len(poster.posts)
        self.clock.advance(3600)
        self.assertEqual(len(poster.posts), tries)

    def test_survivesRestartMidPost(self):
        """
        A sender that dies with a POST unanswered: the next one (same
        store) sends that batch again once its lease ends.
        """
        stuck = FakePoster([None])
        first = self.sender(stuck, lease=30.0)
        self.append(event(1))
        self.clock.advance(1)
        self.assertEqual(len(stuck.posts), 1)
        first.running = False  # killed: nothing more from it
        poster = FakePoster()
        self.sender(poster, lease=30.0)
        self.clock.advance(1)
        self.assertEqual(poster.posts, [])
        for _ in range(31):
            self.clock.advance(1)
        self.assertEqual(poster.events(), ["e1"])

    def test_twoNodesDeliverEachEventOnce(self):
        """
        Two nodes on one store deliver every event, none twice.
        """
        a, b = FakePoster(), FakePoster()
        self.sender(a, owner="01", batch=3)
        self.sender(b, owner="02", batch=3)
        for n in range(50):
            self.append(event(n))
            self.clock.advance(0.3)
        self.clock.advance(5)
        both = a.events() + b.events()
        self.assertEqual(sorted(both), sorted(f"e{n}" for n in range(50)))
        self.assertTrue(a.posts and b.posts)

    def test_concurrencyLimit(self):
        """
        At most C{concurrency} POSTs are in flight; a finished one lets the
        next start at once.
        """
        poster = FakePoster([None] * 10)
        sender = self.sender(poster, batch=1, concurrency=2)
        self.append(*[event(n) for n in range(5)])
        self.clock.advance(1)
        self.assertEqual(len(poster.posts), 2)
        self.assertEqual(sender.inFlight, 2)
        poster.posts[0][3].callback(WebhookResponse(204))
        self.clock.advance(0)
        self.assertEqual(len(poster.posts), 3)

    def test_stopWaitsForPosts(self):
        """
        C{stopService} waits for the POSTs in flight, then closes the
        poster's connections.
        """
        poster = FakePoster([None])
        sender = self.sender(poster)
        self.append(event(1))
        self.clock.advance(1)
        stopped = sender.stopService()
        self.assertNoResult(stopped)
        poster.posts[0][3].callback(WebhookResponse(200))
        self.successResultOf(stopped)
        self.assertTrue(poster.closed)
        self.assertEqual(self.successResultOf(self.store.outboxSize(OUTBOX)), 0)

    def test_storeTroubleRetried(self):
        """
        A store failure is logged and the round is tried again later.
        """
        poster = FakePoster()
        sender = self.sender(poster)
        self.successResultOf(self.store.close())
        self.clock.advance(1)
        self.assertTrue(self.flushLoggedErrors())
        self.assertTrue(sender.running)

    def test_fakeProvidesInterface(self):
        """
        The fake and the real poster provide L{IWebhookPoster}.
        """
        self.assertTrue(verifyObject(IWebhookPoster, FakePoster()))
        self.assertTrue(verifyObject(IWebhookPoster, AgentPoster(MemoryReactorClock(), False)))


class ConnectCheckTests(SynchronousTestCase):
    """
    Every new connection is checked where it goes (DNS rebinding).
    """

    def endpoint(self, url, addresses, allowPrivate=False):
        self.reactor = MemoryReactorClock()
        factory = SafeEndpointFactory(
            self.reactor, allowPrivate, resolve=lambda host, port: succeed(addresses)
        )
        return factory.endpointForURI(URI.fromBytes(url))

    def test_rebindingRefused(self):
        """
        A name that now resolves only to loopback or private addresses is
        refused before any connection is made.
        """
        ep = self.endpoint(b"https://hooks.example.com/x", ["127.0.0.1", "10.0.0.7"])
        failure = self.failureResultOf(ep.connect(None), URLRefused)
        self.assertIn("hooks.example.com resolves to a loopback address", str(failure.value))
        self.assertEqual(self.reactor.tcpClients, [])

    def test_onlyCheckedAddressesUsed(self):
        """
        Of a name's addresses only the public ones are connected to.
        """
        ep = self.endpoint(b"http://hooks.example.com:8443/x", ["10.0.0.7", "93.184.216.34"])
        ep.connect(object())
        self.assertEqual(
            [(host, port) for host, port, *_ in self.reactor.tcpClients],
            [("93.184.216.34", 8443)],
        )

    def test_allowPrivate(self):
        """
        With C{allow_private} a loopback address is connected to.
        """
        ep = self.endpoint(b"http://127.0.0.1:9/x", [], allowPrivate=True)
        ep.connect(object())
        self.assertEqual([c[:2] for c in self.reactor.tcpClients], [("127.0.0.1", 9)])

    def test_literalAddressChecked(self):
        """
        An address in the URL is checked too (the configuration already
        refuses it; this is the second line of defence).
        """
        ep = self.endpoint(b"http://[::1]:9/x", ["93.184.216.34"])
        self.failureResultOf(ep.connect(None), URLRefused)

    def test_bodyLimit(self):
        """
        At most the limit of a response body is kept, then reading stops.
        """
        done = Deferred()
        protocol = _LimitedBody(done, 10)

        class Transport:
            stopped = False

            def stopProducing(self):
                Transport.stopped = True

        protocol.transport = Transport()
        protocol.dataReceived(b"12345")
        self.assertNoResult(done)
        protocol.dataReceived(b"67890abcdef")
        self.assertEqual(self.successResultOf(done), b"1234567890")
        self.assertTrue(Transport.stopped)
