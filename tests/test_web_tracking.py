"""
Tests for L{smartrelay.web.tracking}: in memory through L{StubTreq}, and
in a real headless browser (L{tests.browser}).
"""

import base64
import hashlib
import hmac
import io
import ipaddress
import json
import re
import struct
from html.parser import HTMLParser
from typing import Optional

import attrs
from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, inlineCallbacks
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.http import datetimeToString
from twisted.web.resource import Resource
from twisted.web.server import Site, version as SERVER_VERSION
from twisted.web.static import Data

from smartrelay.events import Event, EventLog
from smartrelay.store.interfaces import SUPPRESSION_REASONS, SuppressionEntry
from smartrelay.store.memory import MemoryStore
from smartrelay.tokens import Tokens
from smartrelay.web import tracking
from smartrelay.web.site import BoundedRequest
from smartrelay.web.tracking import (
    MACHINE_AGENTS,
    TRANSPARENT_GIF,
    UNSUBSCRIBE_REASON,
    UNKNOWN_FOR,
    TrackingApp,
    isMachine,
    loggedPath,
    makeSite,
)

from tests import browser

QUEUE_ID = "79/BC-12331-5C348706"
RECIPIENT = "o'brien&<co>@Example.COM"
TAG = "password-reset"
METADATA = {"user": "42"}
START = 1_700_000_000.0
HUMAN_UA = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 "
    "(KHTML, like Gecko) Chrome/126.0.0.0 Safari/537.36"
)

# -- a stand-in for smartrelay.tokens ----------------------------------------
# The same API (Tokens.read / Tokens.make, TokenData, BadToken a ValueError),
# but it also signs tokens the real Tokens refuses to make (an open token
# without a recipient, a click token without a link), to test that the app
# still refuses them.  tests/test_e2e.py goes through the real Tokens.


class BadToken(ValueError):
    pass


@attrs.frozen
class TokenData:
    queue_id: str
    recipient: Optional[str]
    index: Optional[int]
    url: Optional[str]


@attrs.define
class FakeTokens:
    """
    HMAC-signed JSON tokens of (kind, queue id, recipient, url).
    """

    secret: bytes = b"test secret"

    def _mac(self, body: str) -> str:
        return hmac.new(self.secret, body.encode(), hashlib.sha256).hexdigest()[:20]

    def make(self, kind, queueID, recipient, url=None) -> str:
        payload = json.dumps([kind, queueID, recipient, url]).encode("utf-8")
        body = base64.urlsafe_b64encode(payload).rstrip(b"=").decode("ascii")
        return f"{body}.{self._mac(body)}"

    def read(self, kind: str, token: str) -> TokenData:
        body, dot, mac = token.rpartition(".")
        if not dot or not hmac.compare_digest(mac, self._mac(body)):
            raise BadToken("bad signature")
        try:
            payload = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
            tokenKind, queueID, recipient, url = json.loads(payload)
        except ValueError:
            raise BadToken("malformed")
        if tokenKind != kind:
            raise BadToken("wrong kind")
        return TokenData(queueID, recipient, None, url)


@attrs.define
class FlakyStore(MemoryStore):
    """
    A L{MemoryStore} whose suppression calls and message look-ups can be
    made to fail, and which counts look-ups.
    """

    failChecks: bool = False
    failAdds: bool = False
    failLookups: bool = False
    holdAdds: bool = False
    holdLookups: bool = False
    held: list = attrs.field(factory=list)
    lookups: int = 0
    queries: list = attrs.field(factory=list)

    def release(self):
        """Let every held call go on."""
        held, self.held = self.held, []
        for d, call in held:
            call().chainDeferred(d)

    def checkSuppressions(self, addresses, now):
        if self.failChecks:
            return fail(ConnectionError("store is down"))
        return super().checkSuppressions(addresses, now)

    def addSuppression(self, entry):
        if self.failAdds:
            return fail(ConnectionError("store is down"))
        if self.holdAdds:
            return self._hold(lambda: super(FlakyStore, self).addSuppression(entry))
        return super().addSuppression(entry)

    def _hold(self, call):
        d = Deferred()
        self.held.append((d, call))
        return d

    def queryEvents(self, **filters):
        self.lookups += 1
        self.queries.append(filters)
        if self.failLookups:
            return fail(ConnectionError("store is down"))
        if self.holdLookups:
            return self._hold(lambda: super(FlakyStore, self).queryEvents(**filters))
        return super().queryEvents(**filters)


class _Tags(HTMLParser):
    """
    Collects start tags and checks that non-void elements are closed in
    order.
    """

    VOID = {"meta", "link", "br", "img", "input", "hr"}

    def __init__(self):
        super().__init__()
        self.tags = []
        self.stack = []
        self.errors = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(tag)


def parseHTML(body: bytes) -> _Tags:
    parser = _Tags()
    parser.feed(body.decode("utf-8"))
    parser.close()
    return parser


def signed(test, kind, url=None, recipient=RECIPIENT, queueID=QUEUE_ID):
    return test.tokens.make(kind, queueID, recipient, url)


class TrackingTestsMixin:
    """
    A L{TrackingApp} over a L{FlakyStore} and a real L{EventLog}, on a
    L{Clock}, reached through L{StubTreq}.

    @cvar front: if true (the default), the requests are the site's
        (L{BoundedRequest}), so the clicks and pixels with plain tokens
        are answered by the front route as in the relay; if false, by
        Klein.
    """

    front = True

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(START)
        self.store = FlakyStore()
        self.successResultOf(
            self.store.appendEvents(
                [
                    Event(
                        "accepted",
                        QUEUE_ID,
                        None,
                        START - 10,
                        tag=TAG,
                        metadata=dict(METADATA),
                    )
                ]
            )
        )
        self.events = EventLog(self.store, self.clock)
        self.tokens = FakeTokens()
        self.app = TrackingApp(self.tokens, self.events, self.store, self.clock)
        self.treq = StubTreq(self.app.resource())
        if self.front:
            # treq's in-memory site, with the relay's requests.
            self.treq._agent._serverFactory.requestFactory = BoundedRequest

    def request(self, method, path, userAgent=HUMAN_UA, **kwargs):
        headers = kwargs.pop("headers", {})
        if userAgent is not None:
            headers["User-Agent"] = userAgent
        d = self.treq.request(
            method,
            "http://track.example" + path,
            headers=headers,
            allow_redirects=False,
            **kwargs,
        )
        self.treq.flush()
        response = self.successResultOf(d)
        body = self.successResultOf(self.treq.content(response))
        # The next reactor turn, when opens and clicks are recorded.
        self.clock.advance(0)
        return response, body

    def recorded(self, type, queueID=QUEUE_ID):
        self.clock.advance(0)
        events = self.successResultOf(self.store.eventsForMessage(queueID))
        return [e for e in events if e.type == type]

    def header(self, response, name):
        values = response.headers.getRawHeaders(name)
        return values[0] if values else None

    def assertSecurityHeaders(self, response):
        self.assertEqual(self.header(response, "X-Content-Type-Options"), "nosniff")
        self.assertEqual(self.header(response, "Referrer-Policy"), "no-referrer")
        self.assertEqual(
            self.header(response, "Content-Security-Policy"),
            "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'",
        )
        self.assertEqual(self.header(response, "X-Frame-Options"), "DENY")

    def assertPage(self, response, body, code, title):
        self.assertEqual(response.code, code)
        self.assertEqual(
            self.header(response, "Content-Type"), "text/html; charset=utf-8"
        )
        self.assertSecurityHeaders(response)
        self.assertTrue(body.startswith(b"<!DOCTYPE html>\n"))
        page = parseHTML(body)
        self.assertEqual(page.errors, [])
        self.assertEqual(page.stack, [])
        metas = [a for t, a in page.tags if t == "meta"]
        self.assertIn({"name": "viewport", "content": "width=device-width, initial-scale=1"}, metas)
        # Nothing loaded from anywhere.
        for tag, attributes in page.tags:
            self.assertNotIn(tag, {"img", "script", "link", "iframe"})
            self.assertNotIn("src", attributes)
        self.assertIn(f"<title>{title}</title>".encode(), body)
        return page


class OpenPixelTests(TrackingTestsMixin, SynchronousTestCase):
    """
    C{/t/o/<token>.gif}.
    """

    def assertPixel(self, response, body):
        self.assertEqual(response.code, 200)
        self.assertEqual(body, TRANSPARENT_GIF)
        self.assertEqual(self.header(response, "Content-Type"), "image/gif")
        self.assertEqual(
            self.header(response, "Cache-Control"),
            "no-store, no-cache, must-revalidate, private, max-age=0",
        )
        self.assertEqual(self.header(response, "Pragma"), "no-cache")
        self.assertEqual(self.header(response, "Expires"), "0")
        self.assertSecurityHeaders(response)

    def test_gif(self):
        """
        The pixel is a valid 43-byte 1x1 GIF89a with colour 0 transparent.
        """
        gif = TRANSPARENT_GIF
        self.assertEqual(len(gif), 43)
        self.assertEqual(gif[:6], b"GIF89a")
        self.assertEqual(struct.unpack("<HH", gif[6:10]), (1, 1))
        self.assertEqual(gif[13:19], b"\x00\x00\x00\xff\xff\xff")
        self.assertEqual(gif[19:22], b"!\xf9\x04")
        self.assertEqual(gif[22] & 1, 1)  # transparent flag
        self.assertEqual(gif[25], 0)  # transparent index
        self.assertEqual(gif[27:28], b",")
        self.assertEqual(gif[-1:], b";")

    def test_open(self):
        """
        A good token gets the GIF with no-cache headers and records
        C{opened} with the message's tag and metadata.
        """
        response, body = self.request("GET", f"/t/o/{signed(self, 'o')}.gif")
        self.assertPixel(response, body)
        [event] = self.recorded("opened")
        self.assertEqual(event.recipient, RECIPIENT)
        self.assertEqual(event.tag, TAG)
        self.assertEqual(event.metadata, METADATA)
        self.assertEqual(
            event.detail, {"user_agent": HUMAN_UA, "ip": "127.0.0.1", "machine": False}
        )
        self.assertEqual(event.time, START)

    def test_forwardedFor(self):
        """
        X-Forwarded-For gives the event's ip only when the peer is one of
        the trusted proxies; otherwise the peer is the client.
        """
        path = f"/t/o/{signed(self, 'o')}.gif"
        headers = {"X-Forwarded-For": "203.0.113.9, 127.0.0.1"}
        self.request("GET", path, headers=dict(headers))
        self.app.trustedProxies = (ipaddress.ip_network("127.0.0.0/8"),)
        self.request("GET", path, headers=dict(headers))
        self.assertEqual(
            [e.detail["ip"] for e in self.recorded("opened")], ["127.0.0.1", "203.0.113.9"]
        )

    def test_head(self):
        """
        HEAD gets the pixel's headers, the length of the GIF and no body;
        it records C{opened} like a GET.
        """
        response, body = self.request("HEAD", f"/t/o/{signed(self, 'o')}.gif")
        self.assertEqual(response.code, 200)
        self.assertEqual(body, b"")
        self.assertEqual(self.header(response, "Content-Length"), "43")
        self.assertEqual(self.header(response, "Content-Type"), "image/gif")
        self.assertEqual(self.header(response, "Pragma"), "no-cache")
        self.assertEqual(len(self.recorded("opened")), 1)

    def test_badTokens(self):
        """
        A bad token still gets the GIF, and nothing is recorded.
        """
        good = signed(self, "o")
        for token in [
            "garbage",
            good[:-1],
            good[:10],
            signed(self, "c", url="https://example.com/"),
            signed(self, "u"),
            signed(self, "o", recipient=None),
            "%00%ff",
            "caf%C3%A9",
        ]:
            response, body = self.request("GET", f"/t/o/{token}.gif")
            self.assertPixel(response, body)
        self.assertEqual(self.recorded("opened"), [])

    def test_machine(self):
        """
        Hits from image proxies and from clients without a User-Agent are
        recorded with C{machine} true.
        """
        token = signed(self, "o")
        self.request(
            "GET",
            f"/t/o/{token}.gif",
            userAgent="Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 "
            "(via ggpht.com GoogleImageProxy)",
        )
        self.request("GET", f"/t/o/{token}.gif", userAgent=None)
        self.assertEqual(
            [e.detail["machine"] for e in self.recorded("opened")], [True, True]
        )
        self.assertEqual(self.recorded("opened")[1].detail["user_agent"], "")

    def test_lookupCached(self):
        """
        The message's tag and metadata are read from the store once.
        """
        token = signed(self, "o")
        for _ in range(3):
            self.request("GET", f"/t/o/{token}.gif")
        self.assertEqual(self.store.lookups, 1)
        self.assertEqual([e.tag for e in self.recorded("opened")], [TAG] * 3)

    def test_lookupReadsAcceptedOnly(self):
        """
        The look-up asks the store for the message's first C{accepted}
        event only, not for all its events (its opens and clicks among
        them).
        """
        self.request("GET", f"/t/o/{signed(self, 'o')}.gif")
        self.assertEqual(
            self.store.queries, [{"type": "accepted", "queue_id": QUEUE_ID, "limit": 1}]
        )

    def test_cacheBounded(self):
        """
        The cache keeps at most C{cacheSize} messages, dropping the least
        recently used.
        """
        self.app.hits.cacheSize = 2
        for n in range(3):
            queueID = f"79/BC-12331-0000000{n}"
            self.successResultOf(
                self.store.appendEvents([Event("accepted", queueID, None, START, tag=f"t{n}")])
            )
            self.request("GET", f"/t/o/{signed(self, 'o', queueID=queueID)}.gif")
        self.assertEqual(self.store.lookups, 3)
        self.request("GET", f"/t/o/{signed(self, 'o', queueID='79/BC-12331-00000000')}.gif")
        self.assertEqual(self.store.lookups, 4)
        self.request("GET", f"/t/o/{signed(self, 'o', queueID='79/BC-12331-00000002')}.gif")
        self.assertEqual(self.store.lookups, 4)

    def test_unknownMessageRemembered(self):
        """
        A message the store does not know (no C{accepted} event) is looked
        up once, not once per hit, and again after C{UNKNOWN_FOR} seconds.
        """
        queueID = "79/BC-12331-0000000F"
        token = signed(self, "c", queueID=queueID, url="https://shop.example/")
        for _ in range(3):
            self.request("GET", f"/t/c/{token}")
        self.assertEqual(self.store.lookups, 1)
        self.assertEqual([e.tag for e in self.recorded("clicked", queueID)], [None] * 3)
        self.successResultOf(
            self.store.appendEvents([Event("accepted", queueID, None, START, tag="late")])
        )
        self.clock.advance(UNKNOWN_FOR + 1)
        before = self.store.lookups
        self.request("GET", f"/t/c/{token}")
        self.assertEqual(self.store.lookups, before + 1)
        self.assertEqual(self.recorded("clicked", queueID)[-1].tag, "late")

    def test_concurrentLookupsShared(self):
        """
        Hits on one message that arrive while its look-up is running wait
        for that look-up instead of starting their own.
        """
        self.store.holdLookups = True
        token = signed(self, "o")
        for _ in range(5):
            self.request("GET", f"/t/o/{token}.gif")
        self.assertEqual(self.store.lookups, 1)
        self.store.holdLookups = False
        self.store.release()
        self.assertEqual([e.tag for e in self.recorded("opened")], [TAG] * 5)

    def test_lookupFails(self):
        """
        If the store cannot say the tag and metadata, the event is recorded
        without them (and the failure logged).
        """
        self.store.failLookups = True
        response, body = self.request("GET", f"/t/o/{signed(self, 'o')}.gif")
        self.assertEqual(body, TRANSPARENT_GIF)
        self.store.failLookups = False
        [event] = self.recorded("opened")
        self.assertIsNone(event.tag)
        self.assertEqual(event.metadata, {})
        self.assertEqual(len(self.flushLoggedErrors(ConnectionError)), 1)
        # Not cached: the next hit finds them.
        self.request("GET", f"/t/o/{signed(self, 'o')}.gif")
        self.assertEqual(self.recorded("opened")[1].tag, TAG)


class ClickTests(TrackingTestsMixin, SynchronousTestCase):
    """
    C{/t/c/<token>}.
    """

    def test_click(self):
        """
        A good token redirects to exactly the signed link, uncached, and
        records C{clicked} with the link.
        """
        url = "https://shop.example/p?id=1&x=%2F#frag"
        response, body = self.request("GET", f"/t/c/{signed(self, 'c', url)}")
        self.assertEqual(response.code, 302)
        self.assertEqual(response.headers.getRawHeaders("Location"), [url])
        self.assertEqual(self.header(response, "Cache-Control"), "no-store")
        self.assertSecurityHeaders(response)
        [event] = self.recorded("clicked")
        self.assertEqual(
            (event.queue_id, event.recipient, event.tag, event.metadata),
            (QUEUE_ID, RECIPIENT, TAG, METADATA),
        )
        self.assertEqual(
            event.detail,
            {"url": url, "user_agent": HUMAN_UA, "ip": "127.0.0.1", "machine": False},
        )

    def test_plainHTTP(self):
        """
        http links redirect too, whatever the case of the scheme.
        """
        for url in ["http://example.com/", "HTTP://Example.com/a"]:
            response, _ = self.request("GET", f"/t/c/{signed(self, 'c', url)}")
            self.assertEqual(response.headers.getRawHeaders("Location"), [url])

    def test_nonASCII(self):
        """
        Non-ASCII characters and spaces in the link are percent-encoded in
        C{Location}; the event keeps the link as signed.
        """
        url = "https://example.com/caf\u00e9 menu?q=\u00fc"
        response, _ = self.request("GET", f"/t/c/{signed(self, 'c', url)}")
        self.assertEqual(
            response.headers.getRawHeaders("Location"),
            ["https://example.com/caf%C3%A9%20menu?q=%C3%BC"],
        )
        self.assertEqual(self.recorded("clicked")[0].detail["url"], url)

    def assertNotValid(self, response, body):
        self.assertPage(response, body, 404, "This link is not valid")
        self.assertIsNone(response.headers.getRawHeaders("Location"))

    def test_badTokens(self):
        """
        A bad token gets the 404 page, never a redirect, and records
        nothing.
        """
        good = signed(self, "c", "https://example.com/")
        for token in [
            "garbage",
            good[:-3],
            good[: len(good) // 2],
            signed(self, "o"),
            signed(self, "u"),
            signed(self, "c", None),
            "..",
        ]:
            response, body = self.request("GET", f"/t/c/{token}")
            self.assertNotValid(response, body)
        self.assertEqual(self.recorded("clicked"), [])

    def test_notHTTP(self):
        """
        A signed link that is not an absolute http(s) URL with a host gets
        the 404 page.
        """
        for url in [
            "javascript:alert(1)",
            "data:text/html,<script>alert(1)</script>",
            "ftp://example.com/file",
            "mailto:a@example.com",
            "//evil.example/",
            "/relative",
            "http://",
            "https:example.com",
            "http://[::1/",
            "https://example.com/\r\nSet-Cookie: a=b",
            "https://example.com/\x00",
        ]:
            response, body = self.request("GET", f"/t/c/{signed(self, 'c', url)}")
            self.assertNotValid(response, body)
        self.assertEqual(self.recorded("clicked"), [])

    def test_scanner(self):
        """
        Clicks by link scanners are recorded with C{machine} true.
        """
        token = signed(self, "c", "https://example.com/")
        self.request("GET", f"/t/c/{token}", userAgent="python-requests/2.31.0")
        [event] = self.recorded("clicked")
        self.assertTrue(event.detail["machine"])


class KleinOpenPixelTests(OpenPixelTests):
    """
    C{/t/o/<token>.gif} through Klein (the route that answers a token
    segment with percent-escapes), as through the front route.
    """

    front = False


class KleinClickTests(ClickTests):
    """
    C{/t/c/<token>} through Klein, as through the front route.
    """

    front = False


class UnsubscribeTests(TrackingTestsMixin, SynchronousTestCase):
    """
    C{/u/<token>}.
    """

    def suppressed(self):
        return self.successResultOf(
            self.store.checkSuppressions([RECIPIENT], self.clock.seconds())
        )

    def test_suppressionReason(self):
        """
        The reason used is one the store accepts.
        """
        self.assertIn(UNSUBSCRIBE_REASON, SUPPRESSION_REASONS)

    def test_page(self):
        """
        GET shows the address, escaped, and a form posting back here; it
        unsubscribes nobody and records nothing.
        """
        response, body = self.request("GET", f"/u/{signed(self, 'u')}")
        page = self.assertPage(response, body, 200, "Unsubscribe")
        self.assertEqual(self.header(response, "Cache-Control"), "no-store")
        self.assertIn(b"o&#x27;brien&amp;&lt;co&gt;@Example.COM", body)
        self.assertNotIn(RECIPIENT.encode(), body)
        forms = [a for t, a in page.tags if t == "form"]
        self.assertEqual(forms, [{"method": "post"}])
        self.assertIn(b">Unsubscribe</button>", body)
        self.assertEqual(self.suppressed(), {})
        self.assertEqual(self.recorded("unsubscribed"), [])

    def test_pageBadTokens(self):
        """
        GET with a bad token gets the 404 page.
        """
        for token in [
            "garbage",
            signed(self, "u")[:-1],
            signed(self, "o"),
            signed(self, "u", recipient="no-at-sign"),
        ]:
            response, body = self.request("GET", f"/u/{token}")
            self.assertPage(response, body, 404, "This link is not valid")

    def test_oneClick(self):
        """
        The RFC 8058 one-click POST suppresses the address (reason
        C{unsubscribe}, now) and records C{unsubscribed} by C{one-click}.
        """
        response, body = self.request(
            "POST",
            f"/u/{signed(self, 'u')}",
            data={"List-Unsubscribe": "One-Click"},
        )
        self.assertEqual(response.code, 200)
        self.assertEqual(self.header(response, "Content-Type"), "text/plain; charset=utf-8")
        self.assertEqual(body, b"Unsubscribed.\n")
        [entry] = self.suppressed().values()
        self.assertEqual(
            (entry.address, entry.reason, entry.time, entry.expires),
            ("o'brien&<co>@example.com", "unsubscribe", START, None),
        )
        [event] = self.recorded("unsubscribed")
        self.assertEqual((event.recipient, event.tag, event.metadata), (RECIPIENT, TAG, METADATA))
        self.assertEqual(
            event.detail, {"method": "one-click", "user_agent": HUMAN_UA, "ip": "127.0.0.1"}
        )

    def test_oneClickMultipart(self):
        """
        The one-click body is also understood as multipart/form-data.
        """
        body = (
            b"--XyZ\r\n"
            b'Content-Disposition: form-data; name="List-Unsubscribe"\r\n'
            b"\r\n"
            b"One-Click\r\n"
            b"--XyZ--\r\n"
        )
        response, body = self.request(
            "POST",
            f"/u/{signed(self, 'u')}",
            data=body,
            headers={"Content-Type": "multipart/form-data; boundary=XyZ"},
        )
        self.assertEqual(body, b"Unsubscribed.\n")
        self.assertEqual(self.recorded("unsubscribed")[0].detail["method"], "one-click")

    def test_form(self):
        """
        The page's form POST unsubscribes and answers with a page.
        """
        response, body = self.request(
            "POST",
            f"/u/{signed(self, 'u')}",
            data=b"",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        self.assertPage(response, body, 200, "You are unsubscribed")
        self.assertIn(b"o&#x27;brien&amp;&lt;co&gt;@Example.COM", body)
        self.assertEqual(len(self.suppressed()), 1)
        [event] = self.recorded("unsubscribed")
        self.assertEqual(event.detail["method"], "form")

    def test_repeat(self):
        """
        A second POST answers the same, keeps the first entry's time and
        records nothing more.
        """
        path = f"/u/{signed(self, 'u')}"
        first = self.request("POST", path, data={"List-Unsubscribe": "One-Click"})[1]
        self.clock.advance(3600)
        second = self.request("POST", path, data={"List-Unsubscribe": "One-Click"})[1]
        self.assertEqual(first, second)
        response, body = self.request("POST", path)
        self.assertPage(response, body, 200, "You are unsubscribed")
        [entry] = self.suppressed().values()
        self.assertEqual(entry.time, START)
        self.assertEqual(len(self.recorded("unsubscribed")), 1)

    def test_alreadySuppressed(self):
        """
        An address already suppressed for another reason keeps its entry.
        """
        entry = SuppressionEntry(address=RECIPIENT, reason="complaint", time=START - 5)
        self.successResultOf(self.store.addSuppression(entry))
        response, body = self.request("POST", f"/u/{signed(self, 'u')}")
        self.assertEqual(response.code, 200)
        self.assertEqual(list(self.suppressed().values()), [entry])

    def test_postBadToken(self):
        """
        POST with a bad token gets the 404 page and suppresses nothing.
        """
        for token in ["garbage", signed(self, "u")[:-2], signed(self, "c", "https://e.example/")]:
            response, body = self.request(
                "POST", f"/u/{token}", data={"List-Unsubscribe": "One-Click"}
            )
            self.assertPage(response, body, 404, "This link is not valid")
        self.assertEqual(self.store._suppressions, {})

    def test_storeFails(self):
        """
        If the store fails to add the entry, the answer is a 503 page
        asking to try again, without a traceback; a later POST succeeds.
        """
        path = f"/u/{signed(self, 'u')}"
        self.store.failAdds = True
        response, body = self.request("POST", path, data={"List-Unsubscribe": "One-Click"})
        self.store.failAdds = False
        self.assertPage(response, body, 503, "Please try again")
        self.assertEqual(self.header(response, "Retry-After"), "60")
        self.assertNotIn(b"Traceback", body)
        self.assertNotIn(b"store is down", body)
        self.assertEqual(self.suppressed(), {})
        self.assertEqual(len(self.flushLoggedErrors(ConnectionError)), 1)
        self.assertEqual(self.recorded("unsubscribed"), [])
        response, body = self.request("POST", path, data={"List-Unsubscribe": "One-Click"})
        self.assertEqual(response.code, 200)
        self.assertEqual(len(self.suppressed()), 1)

    def test_checkFails(self):
        """
        If the store cannot say whether the address is on the list already
        (a Redis outage), the address is unsubscribed anyway (adding twice
        changes nothing): the relay's store keeps the entry for the store.
        """
        path = f"/u/{signed(self, 'u')}"
        self.store.failChecks = True
        response, body = self.request("POST", path, data={"List-Unsubscribe": "One-Click"})
        self.store.failChecks = False
        self.assertEqual(response.code, 200)
        self.assertEqual(len(self.suppressed()), 1)
        self.assertEqual(len(self.recorded("unsubscribed")), 1)


class OtherPathTests(TrackingTestsMixin, SynchronousTestCase):
    """
    Everything else.
    """

    def test_unknownPath(self):
        """
        Unknown paths get a small 404 page.
        """
        for path in ["/", "/t/o/", "/t/x/abc", "/u/", "/u/a/b", "/t/o/token.png"]:
            response, body = self.request("GET", path)
            self.assertPage(response, body, 404, "Page not found")

    def test_badEncoding(self):
        """
        A path that is not UTF-8 gets a 400 page (not Klein's logged error).
        """
        for path in ["/t/c/%ff", "/u/%c3%28", "/%ff"]:
            response, body = self.request("GET", path)
            self.assertPage(response, body, 400, "Bad request")

    def test_wrongMethod(self):
        """
        A method a route does not take gets a 405 page naming the allowed
        ones.
        """
        response, body = self.request("POST", f"/t/c/{signed(self, 'c', 'https://e.example/')}")
        self.assertPage(response, body, 405, "Method not allowed")
        self.assertEqual(sorted(self.header(response, "Allow").split(", ")), ["GET", "HEAD"])
        self.assertEqual(self.recorded("clicked"), [])

    def test_internalError(self):
        """
        An unexpected error gets a 500 page, never a traceback.
        """

        class BrokenTokens:
            def read(self, kind, token):
                raise RuntimeError("secret detail")

        self.app.tokens = BrokenTokens()
        response, body = self.request("GET", "/u/x")
        self.assertPage(response, body, 500, "Something went wrong")
        self.assertNotIn(b"secret detail", body)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_internalErrorLogsNoToken(self):
        """
        The error logged for a 500 names the route, not the token.
        """

        class BrokenTokens:
            def read(self, kind, token):
                raise RuntimeError("broken")

        logged = []
        self.app.tokens = BrokenTokens()
        self.app.log = Logger(observer=logged.append)
        self.request("GET", "/u/the-secret-token?a=b")
        [event] = logged
        self.assertEqual(event["path"], f"/u/<token:{digest('the-secret-token')}>?<query>")
        self.assertNotIn("the-secret-token", repr(event))

    def test_makeSite(self):
        """
        L{makeSite} makes a quiet site that shows no tracebacks, on the
        app's clock, logging with L{accessLogFormatter}.
        """
        site = makeSite(self.app)
        self.assertIsInstance(site, Site)
        self.assertFalse(site.noisy)
        self.assertFalse(site.displayTracebacks)
        self.assertIs(site.reactor, self.clock)


class FastRouteTests(TrackingTestsMixin, SynchronousTestCase):
    """
    The click and pixel routes served in front of Klein
    (L{TrackingApp.frontRoute}) answer exactly as the Klein routes do (a
    percent-encoded token segment goes through Klein).
    """

    def setUp(self):
        super().setUp()
        resource = self.app.resource()
        front = resource.frontRoute
        self.answered = []

        def spy(request):
            answered = front(request)
            if answered:
                self.answered.append(request.path.decode("ascii"))
            return answered

        resource.frontRoute = spy
        self.treq = StubTreq(resource)
        self.treq._agent._serverFactory.requestFactory = BoundedRequest

    def answer(self, path, method="GET"):
        response, body = self.request(method, path)
        headers = {
            name: values
            for name, values in response.headers.getAllRawHeaders()
            if name.lower() != b"date"
        }
        return response.code, headers, body

    def viaKlein(self, path):
        # The last character of the token percent-encoded: the same token
        # once decoded, but not a plain segment.
        head, tail = path[:-1], path[-1]
        return head + "%%%02X" % ord(tail)

    def test_sameAnswers(self):
        """
        Good and bad clicks and pixels, by C{GET} and C{HEAD}: same code,
        headers, body and events by either path.
        """
        paths = [
            f"/t/c/{signed(self, 'c', 'https://shop.example/p?id=1')}",
            f"/t/c/{signed(self, 'c', 'javascript:alert(1)')}",
            f"/t/c/{signed(self, 'o')}",
            "/t/c/garbage",
            f"/t/o/{signed(self, 'o')}.gif",
            "/t/o/garbage.gif",
        ]
        for method in ["GET", "HEAD"]:
            for path in paths:
                before = len(self.tracked())
                fast = self.answer(path, method)
                afterFast = self.tracked()
                slow = path[:-4] if path.endswith(".gif") else path
                klein = self.answer(self.viaKlein(slow) + path[len(slow):], method)
                afterKlein = self.tracked()
                self.assertEqual(fast, klein, (method, path))
                fastEvents = afterFast[before:]
                self.assertEqual(afterKlein[len(afterFast):], fastEvents, path)
                if method == "HEAD":
                    self.assertEqual(fast[2], b"")
        # The plain spellings only, by the front route.
        self.assertEqual(self.answered, paths * 2)
        # One good click and one good pixel, each answered both ways, twice.
        self.assertEqual(len(self.tracked()), 8)

    def tracked(self):
        return [
            (e.type, e.queue_id, e.recipient, e.tag, e.metadata, e.detail)
            for e in self.recorded("clicked") + self.recorded("opened")
        ]

    def test_otherSegmentsToKlein(self):
        """
        Paths that are not a click or a pixel under C{/t/} are Klein's
        (404 page), whatever their shape, and so are other methods.
        """
        for path in ["/t/x/abc", "/t/o/token.png", "/t/o/.gif", "/t/c/a/b", "/t/c/"]:
            response, body = self.request("GET", path)
            self.assertPage(response, body, 404, "Page not found")
        response, body = self.request("POST", f"/t/c/{signed(self, 'c', 'https://e.example/')}")
        self.assertEqual(response.code, 405)
        self.assertEqual(self.answered, [])

    def test_query(self):
        """
        A query string after a plain token is ignored, as Klein ignores it.
        """
        url = "https://shop.example/"
        response, _ = self.request("GET", f"/t/c/{signed(self, 'c', url)}?utm=x")
        self.assertEqual(response.headers.getRawHeaders("Location"), [url])
        self.assertEqual(len(self.answered), 1)

    def test_redirectsKept(self):
        """
        The answer for a link is made once and kept for the next clicks on
        it (each click still opens its token and records its event); at
        most C{_MAX_REDIRECTS} links are kept.
        """
        self.patch(tracking, "_MAX_REDIRECTS", 2)
        made = []
        original = tracking._redirectAnswer
        self.patch(tracking, "_redirectAnswer", lambda url: made.append(url) or original(url))
        links = ["https://a.example/", "https://b.example/", "https://c.example/"]
        for url in links[:2] + links[:2] + ["javascript:x", "javascript:x"]:
            response, _ = self.request("GET", f"/t/c/{signed(self, 'c', url)}")
        self.assertEqual(made, links[:2] + ["javascript:x"])
        self.assertEqual(response.code, 404)
        self.assertEqual(len(self.recorded("clicked")), 4)
        self.request("GET", f"/t/c/{signed(self, 'c', links[2])}")
        self.assertLessEqual(len(self.app._redirects), 2)
        response, _ = self.request("GET", f"/t/c/{signed(self, 'c', links[0])}")
        self.assertEqual(response.headers.getRawHeaders("Location"), [links[0]])

    def test_batch(self):
        """
        The answers go out at once; the hits of one reactor turn are
        recorded together in the next.
        """
        paths = [
            f"/t/c/{signed(self, 'c', 'https://shop.example/')}",
            f"/t/o/{signed(self, 'o')}.gif",
        ]
        responses = [
            self.treq.get("http://track.example" + path, allow_redirects=False) for path in paths
        ]
        self.treq.flush()
        self.assertEqual([self.successResultOf(d).code for d in responses], [302, 200])
        self.assertEqual(self.store.lookups, 0)
        self.assertEqual(self.events.backlog, 0)
        drained = self.app.drained()
        self.assertNoResult(drained)
        self.clock.advance(0)
        self.assertEqual(self.store.lookups, 1)
        self.successResultOf(drained)
        self.assertEqual([len(self.recorded(t)) for t in ("clicked", "opened")], [1, 1])

    def test_emitFails(self):
        """
        An event that cannot be emitted is logged; the others of its batch
        are emitted all the same.
        """
        self.request("GET", f"/t/o/{signed(self, 'o')}.gif")
        events = self.events
        calls = []

        class FailFirst:
            def emit(self, *args, **kwargs):
                calls.append(args)
                if len(calls) == 1:
                    raise RuntimeError("no room")
                return events.emit(*args, **kwargs)

        self.app.hits.events = FailFirst()
        token = signed(self, "o")
        for _ in range(2):
            self.treq.get(f"http://track.example/t/o/{token}.gif")
        self.treq.flush()
        self.clock.advance(0)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(len(calls), 2)
        self.assertEqual(len(self.recorded("opened")), 2)

    def test_internalError(self):
        """
        An unexpected error on the fast path gets the same 500 page and
        logged error as through Klein.
        """

        class BrokenTokens:
            def read(self, kind, token):
                raise RuntimeError("secret detail")

        self.app.tokens = BrokenTokens()
        for path in ["/t/c/abc", "/t/c/ab%63"]:
            response, body = self.request("GET", path)
            self.assertPage(response, body, 500, "Something went wrong")
            self.assertNotIn(b"secret detail", body)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)
        self.assertEqual(self.answered, ["/t/c/abc"])


class FrontRouteWireTests(TrackingTestsMixin, SynchronousTestCase):
    """
    The front route's answers in HTTP bytes, over L{makeSite}'s site: the
    channel's keep-alive, pipelining and versions work as for any request.
    """

    def setUp(self):
        super().setUp()
        self.site = makeSite(self.app)
        self.site.startFactory()
        self.addCleanup(self.site.stopFactory)
        self.site.logFile = io.StringIO()

    def serve(self, data: bytes) -> StringTransport:
        address = IPv4Address("TCP", "192.0.2.7", 40000)
        protocol = self.site.buildProtocol(address)
        transport = StringTransport(peerAddress=address)
        protocol.makeConnection(transport)
        protocol.dataReceived(data)
        self.addCleanup(protocol.connectionLost, Failure(ConnectionDone()))
        return transport

    def test_answer(self):
        """
        A click: the status line, C{Server}, C{Date}, the route's headers
        and the page, and the connection kept open.
        """
        url = "https://shop.example/?a=1&b=2"
        token = signed(self, "c", url)
        transport = self.serve(b"GET /t/c/%s HTTP/1.1\r\nHost: t\r\n\r\n" % token.encode())
        head, _, body = transport.value().partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        self.assertEqual(lines[0], b"HTTP/1.1 302 Found")
        headers = dict(line.split(b": ", 1) for line in lines[1:])
        self.assertEqual(len(headers), len(lines) - 1)
        self.assertEqual(headers[b"Location"], url.encode())
        self.assertEqual(headers[b"Server"], SERVER_VERSION)
        self.assertEqual(headers[b"Date"], datetimeToString(START))
        self.assertEqual(headers[b"Content-Length"], b"%d" % len(body))
        self.assertIn(b'href="https://shop.example/?a=1&amp;b=2"', body)
        self.assertFalse(transport.disconnecting)
        self.assertIn(f'"GET /t/c/<token:{digest(token)}> HTTP/1.1" 302 {len(body)} ',
                      self.site.logFile.getvalue())

    def test_pipelined(self):
        """
        Requests sent together are answered in order, the front route's
        and Klein's alike.
        """
        click = signed(self, "c", "https://shop.example/").encode()
        transport = self.serve(
            b"GET /t/c/%s HTTP/1.1\r\nHost: t\r\n\r\n"
            b"GET /t/x HTTP/1.1\r\nHost: t\r\n\r\n"
            b"GET /t/o/%s.gif HTTP/1.1\r\nHost: t\r\n\r\n" % (click, signed(self, "o").encode())
        )
        statuses = re.findall(rb"HTTP/1\.1 \d+ [A-Za-z ]+\r\n", transport.value())
        self.assertEqual(
            statuses, [b"HTTP/1.1 302 Found\r\n", b"HTTP/1.1 404 Not Found\r\n", b"HTTP/1.1 200 OK\r\n"]
        )
        self.assertTrue(transport.value().endswith(TRANSPARENT_GIF))

    def test_close(self):
        """
        HTTP/1.0 gets an HTTP/1.0 answer; it, and C{Connection: close},
        close the connection after the answer.
        """
        token = signed(self, "o").encode()
        for request, status in [
            (b"GET /t/o/%s.gif HTTP/1.0\r\n\r\n", b"HTTP/1.0 200 OK\r\n"),
            (b"GET /t/o/%s.gif HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
             b"HTTP/1.1 200 OK\r\n"),
        ]:
            transport = self.serve(request % token)
            self.assertTrue(transport.value().startswith(status))
            self.assertTrue(transport.value().endswith(TRANSPARENT_GIF))
            self.assertTrue(transport.disconnecting)
        self.assertIn(b"\r\nConnection: close\r\n", transport.value())

    def test_head(self):
        """
        C{HEAD}: the headers of the C{GET} answer, C{Content-Length}
        included, and no body.
        """
        transport = self.serve(
            b"HEAD /t/o/%s.gif HTTP/1.1\r\nHost: t\r\n\r\n" % signed(self, "o").encode()
        )
        self.assertTrue(transport.value().endswith(b"\r\nContent-Length: 43\r\n\r\n"))
        self.clock.advance(0)
        self.assertEqual(len(self.recorded("opened")), 1)


def digest(token: str) -> str:
    return hashlib.sha256(token.encode("ascii")).hexdigest()[:8]


class AccessLogTests(TrackingTestsMixin, SynchronousTestCase):
    """
    The access log of L{makeSite}'s site, for requests in HTTP bytes, with
    real tokens.
    """

    def setUp(self):
        super().setUp()
        self.tokens = Tokens([b"k" * 32])
        self.app.tokens = self.tokens
        self.site = makeSite(self.app)
        self.site.startFactory()
        self.addCleanup(self.site.stopFactory)
        self.logFile = io.StringIO()
        self.site.logFile = self.logFile

    def serve(self, request: bytes) -> tuple[bytes, str]:
        """
        Serve one request over a L{StringTransport}: (the answer, the
        access log).
        """
        address = IPv4Address("TCP", "192.0.2.7", 40000)
        protocol = self.site.buildProtocol(address)
        transport = StringTransport(peerAddress=address)
        protocol.makeConnection(transport)
        protocol.dataReceived(request)
        self.clock.advance(0)
        log = self.logFile.getvalue()
        protocol.connectionLost(Failure(ConnectionDone()))
        return transport.value(), log

    def test_click(self):
        """
        A click is logged with its route and status; neither the token,
        nor the recipient, nor the link, nor the referrer's path shows.
        """
        link = "https://shop.example/offer?for=alice"
        token = self.tokens.make("c", QUEUE_ID, RECIPIENT, link)
        answer, log = self.serve(
            b"GET /t/c/%s HTTP/1.1\r\nHost: track.example\r\n"
            b"User-Agent: Mail/1.0\r\n"
            b"Referer: https://webmail.example/inbox/42?user=alice\r\n\r\n" % token.encode()
        )
        self.assertTrue(answer.startswith(b"HTTP/1.1 302 "))
        [line] = log.splitlines()
        self.assertRegex(
            line,
            r'^"192\.0\.2\.7" - - \[[^]]+\] '
            + re.escape(f'"GET /t/c/<token:{digest(token)}> HTTP/1.1" 302 ')
            + r'\d+ "https://webmail\.example" "Mail/1\.0"$',
        )
        for secret in (token, RECIPIENT, "brien", link, "offer", "inbox", "alice"):
            self.assertNotIn(secret, line)

    def test_pixel(self):
        """
        The open pixel is logged as its route with C{.gif}.
        """
        token = self.tokens.make("o", QUEUE_ID, RECIPIENT)
        _, log = self.serve(b"GET /t/o/%s.gif HTTP/1.1\r\nHost: t\r\n\r\n" % token.encode())
        self.assertIn(f'"GET /t/o/<token:{digest(token)}>.gif HTTP/1.1" 200 43 ', log)
        self.assertNotIn(token, log)

    def test_unsubscribe(self):
        """
        A one-click unsubscribe is logged as its route; a referrer that is
        the unsubscribe page itself shows only its origin.
        """
        token = self.tokens.make("u", QUEUE_ID, "jane@example.com")
        body = b"List-Unsubscribe=One-Click"
        _, log = self.serve(
            b"POST /u/%s HTTP/1.1\r\nHost: t\r\n"
            b"Referer: https://track.example/u/%s\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (token.encode(), token.encode(), len(body), body)
        )
        self.assertIn(f'"POST /u/<token:{digest(token)}> HTTP/1.1" 200 ', log)
        self.assertIn('"https://track.example"', log)
        self.assertNotIn(token, log)
        self.assertNotIn("jane", log)

    def test_badToken(self):
        """
        A bad token is hashed all the same, with its 404.
        """
        _, log = self.serve(b"GET /t/c/not-a-token HTTP/1.1\r\nHost: t\r\n\r\n")
        self.assertIn(f'"GET /t/c/<token:{digest("not-a-token")}> HTTP/1.1" 404 ', log)

    def test_loggedPath(self):
        """
        Every spelling of a token route hides the token; other paths show
        their path without the query; nothing but printable ASCII is left.
        """
        h = digest("tok")
        cases = {
            b"/t/c/tok": f"/t/c/<token:{h}>",
            b"/t/o/tok.gif": f"/t/o/<token:{h}>.gif",
            b"/t/o/tok": f"/t/o/<token:{h}>",
            b"/t/c/tok.gif": f"/t/c/<token:{digest('tok.gif')}>",
            b"/u/tok?List-Unsubscribe=One-Click": f"/u/<token:{h}>?<query>",
            b"//t//c/tok": f"/t/c/<token:{h}>",
            b"/t%2Fc/tok": f"/t/c/<token:{h}>",
            b"/%74/c/tok": f"/t/c/<token:{h}>",
            b"/track/t/c/tok": f"/track/t/c/<token:{h}>",
            b"https://track.example/t/c/tok": f"/t/c/<token:{h}>",
            b"/u/tok/more": f"/u/<token:{digest('tok/more')}>",
            b"/": "/",
            b"/healthz": "/healthz",
            b"/api/v1/events?recipient=a@b": "/api/v1/events?<query>",
            b"/%ff": "/%FF",
            b"/caf\xc3\xa9 x": "/caf%C3%A9%20x",
            b"/\"quoted\"": "/%22quoted%22",
            b"http://[::1/x": "/<uri>",
        }
        for uri, expected in cases.items():
            self.assertEqual(loggedPath(uri), expected.encode("ascii"), uri)


class DrainTests(TrackingTestsMixin, SynchronousTestCase):
    """
    L{TrackingApp.drained}: what the relay waits for before it flushes the
    events and closes the store when stopping.
    """

    def test_idle(self):
        """With nothing in progress, it fires at once."""
        self.successResultOf(self.app.drained())

    def test_openBeingRecorded(self):
        """
        It waits for an open being recorded in the background (the GIF is
        already answered) until its event is emitted.
        """
        self.store.holdLookups = True
        response, body = self.request("GET", f"/t/o/{signed(self, 'o')}.gif")
        self.assertEqual(response.code, 200)
        drained = self.app.drained()
        self.assertNoResult(drained)
        self.store.holdLookups = False
        self.store.release()
        self.successResultOf(drained)
        [event] = self.recorded("opened")
        self.assertEqual(event.tag, TAG)

    def test_startedMeanwhile(self):
        """Work started while it waits is waited for too."""
        self.store.holdLookups = True
        self.request("GET", f"/t/o/{signed(self, 'o')}.gif")
        drained = self.app.drained()
        other = "79/BC-12331-0000000E"
        self.request("GET", f"/t/c/{signed(self, 'c', queueID=other, url='https://shop.example/')}")
        [(first, call), second] = self.store.held
        self.store.held.remove((first, call))
        call().chainDeferred(first)
        self.assertNoResult(drained)
        self.store.holdLookups = False
        self.store.release()
        self.successResultOf(drained)
        self.assertEqual(len(self.recorded("opened")), 1)
        self.assertEqual(len(self.recorded("clicked", other)), 1)

    def test_unsubscribeInProgress(self):
        """
        It waits for an unsubscribe whose store write has not finished,
        through to its event.
        """
        self.store.holdAdds = True
        d = self.treq.request(
            "POST",
            f"http://track.example/u/{signed(self, 'u')}",
            data={"List-Unsubscribe": "One-Click"},
        )
        self.treq.flush()
        self.assertNoResult(d)
        drained = self.app.drained()
        self.assertNoResult(drained)
        self.store.holdAdds = False
        self.store.release()
        self.treq.flush()
        self.successResultOf(drained)
        self.assertEqual(self.successResultOf(d).code, 200)
        self.assertEqual(len(self.recorded("unsubscribed")), 1)


class MachineTests(SynchronousTestCase):
    """
    L{isMachine}.
    """

    MACHINES = [
        None,
        "",
        "   ",
        "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)",
        "YahooMailProxy; https://help.yahoo.com/kb/yahoo-mail-proxy-SLN28749.html",
        "Microsoft Office Protocol Discovery",
        "Microsoft Office Existence Discovery",
        "Mozilla/5.0 SafeLinks/1.0",
        "Barracuda Sentinel (EE)",
        "Mimecast Link Checker",
        "Proofpoint URL Defense",
        "python-requests/2.31.0",
        "Python-urllib/3.11",
        "Go-http-client/1.1",
        "curl/8.5.0",
        "Wget/1.21.4",
        "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
        "Mozilla/5.0 (compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm)",
        "Slackbot-LinkExpanding 1.0 (+https://api.slack.com/robots)",
        "Mozilla/5.0 (compatible; AhrefsBot/7.0)",
        "Some Crawler/1.0",
        "Baiduspider/2.0",
        "Mozilla/5.0 (compatible; SkypeUriPreview Preview/0.5)",
        "facebookexternalhit/1.1",
        "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
        "HeadlessChrome/126.0.0.0 Safari/537.36",
        "Mozilla/5.0 (Unknown; Linux x86_64) AppleWebKit/538.1 (KHTML, like Gecko) "
        "PhantomJS/2.1.1 Safari/538.1",
    ]

    HUMANS = [
        HUMAN_UA,
        "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 "
        "(KHTML, like Gecko) Mobile/15E148",
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:127.0) Gecko/20100101 Thunderbird/127.0",
        "Mozilla/4.0 (compatible; ms-office; MSOffice 16)",
        "Mozilla/5.0 (Linux; Android 10; CUBOT X30) AppleWebKit/537.36 "
        "(KHTML, like Gecko) Chrome/126.0.0.0 Mobile Safari/537.36",
        "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 "
        "(KHTML, like Gecko) Version/17.5 Safari/605.1.15",
    ]

    def test_machines(self):
        """
        Known scanners, proxies, libraries, bots and headless browsers, and
        empty user agents, are machines.
        """
        for agent in self.MACHINES:
            self.assertTrue(isMachine(agent), agent)

    def test_humans(self):
        """
        Ordinary browsers and mail clients are not.
        """
        for agent in self.HUMANS:
            self.assertFalse(isMachine(agent), agent)

    def test_everyPatternTested(self):
        """
        Every entry of L{MACHINE_AGENTS} matches one of the tested agents.
        """
        for name, pattern in MACHINE_AGENTS:
            self.assertTrue(
                any(a and re.search(pattern, a, re.I) for a in self.MACHINES), name
            )


# -- in a real browser ------------------------------------------------------


class BrowserTests(TestCase):
    """
    The pages and redirects in headless Chromium, against a real loopback
    server on the reactor.
    """

    timeout = 120

    @inlineCallbacks
    def setUp(self):
        self.driver = yield browser.startBrowser(self)
        self.store = MemoryStore()
        yield self.store.appendEvents(
            [Event("accepted", QUEUE_ID, None, reactor.seconds(), tag=TAG, metadata=METADATA)]
        )
        self.events = EventLog(self.store, reactor)
        self.tokens = FakeTokens()
        self.app = TrackingApp(self.tokens, self.events, self.store, reactor)
        self.base = browser.listenLoopback(self, reactor, makeSite(self.app))
        # A second server: the links' targets and a mail-like page.
        other = Resource()
        other.putChild(
            b"landing", Data(b"<!DOCTYPE html><title>Landing</title><p>landed", "text/html")
        )
        self.other = browser.listenLoopback(self, reactor, Site(other))
        self.otherRoot = other

    def inBrowser(self, f, *args):
        return deferToThread(f, *args)

    @inlineCallbacks
    def eventually(self, type, count=1):
        for _ in range(200):
            events = yield self.store.eventsForMessage(QUEUE_ID)
            found = [e for e in events if e.type == type]
            if len(found) >= count:
                return found
            yield deferLater(reactor, 0.02, lambda: None)
        self.fail(f"no {type} event recorded")

    @inlineCallbacks
    def test_unsubscribe(self):
        """
        The page shows the address and unsubscribes nobody; its button
        does, and shows the confirmation.
        """
        recipient = "jane+news@example.com"
        token = self.tokens.make("u", QUEUE_ID, recipient)
        url = f"{self.base}/u/{token}"

        def openPage():
            self.driver.get(url)
            from selenium.webdriver.common.by import By

            return (
                self.driver.title,
                self.driver.find_element(By.CSS_SELECTOR, ".address").text,
                self.driver.find_element(By.TAG_NAME, "button").text,
            )

        title, shown, button = yield self.inBrowser(openPage)
        self.assertEqual((title, shown, button), ("Unsubscribe", recipient, "Unsubscribe"))
        found = yield self.store.checkSuppressions([recipient], reactor.seconds())
        self.assertEqual(found, {})

        def press():
            from selenium.webdriver.common.by import By
            from selenium.webdriver.support.ui import WebDriverWait

            self.driver.find_element(By.TAG_NAME, "button").click()
            WebDriverWait(self.driver, 20).until(
                lambda d: d.title == "You are unsubscribed"
            )
            return self.driver.current_url, self.driver.find_element(By.TAG_NAME, "main").text

        finalURL, text = yield self.inBrowser(press)
        self.assertEqual(finalURL, url)
        self.assertIn(f"{recipient} will not receive these e-mails any more.", text)
        found = yield self.store.checkSuppressions([recipient], reactor.seconds())
        self.assertEqual(found[recipient].reason, "unsubscribe")
        [event] = yield self.eventually("unsubscribed")
        self.assertEqual(event.detail["method"], "form")
        self.assertEqual(event.detail["user_agent"], browser.DESKTOP_USER_AGENT)
        self.assertEqual(event.tag, TAG)

    @inlineCallbacks
    def test_click(self):
        """
        A tracked link lands the browser on the signed target and records
        C{clicked}.
        """
        target = f"{self.other}/landing?from=mail&x=1"
        token = self.tokens.make("c", QUEUE_ID, RECIPIENT, target)

        def follow():
            self.driver.get(f"{self.base}/t/c/{token}")
            return self.driver.current_url, self.driver.title

        finalURL, title = yield self.inBrowser(follow)
        self.assertEqual((finalURL, title), (target, "Landing"))
        [event] = yield self.eventually("clicked")
        self.assertEqual(event.detail["url"], target)
        self.assertEqual(event.detail["ip"], "127.0.0.1")
        self.assertFalse(event.detail["machine"])

    @inlineCallbacks
    def test_badClick(self):
        """
        A bad click token shows the 404 page and goes nowhere.
        """

        def follow():
            self.driver.get(f"{self.base}/t/c/garbage")
            return self.driver.current_url, self.driver.title

        finalURL, title = yield self.inBrowser(follow)
        self.assertEqual((finalURL, title), (f"{self.base}/t/c/garbage", "This link is not valid"))

    @inlineCallbacks
    def test_openPixel(self):
        """
        A page showing the pixel loads it as a 1x1 image and records
        C{opened}.
        """
        token = self.tokens.make("o", QUEUE_ID, RECIPIENT)
        mail = (
            '<!DOCTYPE html><title>Mail</title><p>Hello</p>'
            f'<img id="pixel" src="{self.base}/t/o/{token}.gif" width="1" height="1" alt="">'
        ).encode()
        self.otherRoot.putChild(b"mail.html", Data(mail, "text/html"))

        def load():
            self.driver.get(f"{self.other}/mail.html")
            return self.driver.execute_script(
                "var i = document.getElementById('pixel');"
                "return [i.complete, i.naturalWidth, i.naturalHeight];"
            )

        complete, width, height = yield self.inBrowser(load)
        self.assertEqual((complete, width, height), (True, 1, 1))
        [event] = yield self.eventually("opened")
        self.assertEqual((event.recipient, event.tag), (RECIPIENT, TAG))
        self.assertFalse(event.detail["machine"])
