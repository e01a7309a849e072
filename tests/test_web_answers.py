"""
Tests for L{smartrelay.web.answers}: prepared answers written whole, over
the relay's site (L{smartrelay.web.site.makeSite}) in HTTP bytes.
"""

import io

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http import datetimeToString
from twisted.web.resource import Resource
from twisted.web.server import version as SERVER_VERSION

from smartrelay.web.answers import DateHeader, PreparedAnswer, send
from smartrelay.web.site import makeSite

START = 1_700_000_000.0

MOVED = PreparedAnswer.of(
    302,
    [(b"Location", b"https://example.com/"), (b"Cache-Control", b"no-store")],
    b"moved",
)


class Front(Resource):
    """
    A root whose front route answers C{/front} with L{MOVED}.
    """

    isLeaf = True

    def __init__(self, clock):
        super().__init__()
        self.dates = DateHeader(clock)

    def frontRoute(self, request):
        if request.path != b"/front":
            return False
        send(request, MOVED, self.dates)
        return True

    def render_GET(self, request):
        return b"resource"


class PreparedAnswerTests(SynchronousTestCase):
    """
    L{PreparedAnswer.of}.
    """

    def test_encoded(self):
        """
        The header lines are encoded in order, C{Content-Length} last; the
        reason is Twisted Web's.
        """
        self.assertEqual(MOVED.code, 302)
        self.assertEqual(MOVED.reason, b"Found")
        self.assertEqual(
            MOVED.head,
            b"Location: https://example.com/\r\nCache-Control: no-store\r\n"
            b"Content-Length: 5\r\n",
        )
        self.assertEqual(PreparedAnswer.of(599, [], b"").reason, b"Unknown Status")

    def test_refused(self):
        """
        A header that would split the answer or is not a name is refused.
        """
        for name, value in [
            (b"Location", b"https://e.example/\r\nSet-Cookie: a=b"),
            (b"Location", b"x\ny"),
            (b"X\r\nY", b"v"),
            (b"", b"v"),
            (b"A: b", b"v"),
            (b"A b", b"v"),
            ("Location", b"v"),
            (b"Location", "v"),
        ]:
            with self.assertRaises(ValueError):
                PreparedAnswer.of(200, [(name, value)], b"")


class DateHeaderTests(SynchronousTestCase):
    """
    L{DateHeader}.
    """

    def test_onceASecond(self):
        """
        The line is the clock's second in HTTP format, made again when the
        second changes.
        """
        clock = Clock()
        clock.advance(START + 0.2)
        dates = DateHeader(clock)
        line = dates.line()
        self.assertEqual(line, b"Date: " + datetimeToString(START) + b"\r\n")
        clock.advance(0.5)
        self.assertIs(dates.line(), line)
        clock.advance(0.5)
        self.assertEqual(dates.line(), b"Date: " + datetimeToString(START + 1) + b"\r\n")


class SendTests(SynchronousTestCase):
    """
    L{send}, from a site's front route.
    """

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(START)
        self.site = makeSite(Front(self.clock), self.clock, accessLog=None)
        self.log = io.StringIO()
        self.site.accessLog = self.log
        self.site.startFactory()
        self.addCleanup(self.site.stopFactory)

    def serve(self, data):
        address = IPv4Address("TCP", "192.0.2.7", 40000)
        protocol = self.site.buildProtocol(address)
        transport = StringTransport(peerAddress=address)
        protocol.makeConnection(transport)
        protocol.dataReceived(data)
        self.addCleanup(protocol.connectionLost, Failure(ConnectionDone()))
        return transport

    def test_answer(self):
        """
        The status line with the request's version, C{Server}, C{Date},
        the answer's headers and body, in one write; the connection stays
        open and the access log has the status and length.
        """
        transport = self.serve(b"GET /front HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(
            transport.value(),
            b"HTTP/1.1 302 Found\r\nServer: " + SERVER_VERSION + b"\r\n"
            b"Date: " + datetimeToString(START) + b"\r\n" + MOVED.head + b"\r\nmoved",
        )
        self.assertFalse(transport.disconnecting)
        self.assertIn('"GET /front HTTP/1.1" 302 5 ', self.log.getvalue())

    def test_head(self):
        """
        C{HEAD}: no body, and C{-} as the length in the access log.
        """
        transport = self.serve(b"HEAD /front HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertTrue(transport.value().endswith(MOVED.head + b"\r\n"))
        self.assertIn('"HEAD /front HTTP/1.1" 302 - ', self.log.getvalue())

    def test_channelHeaders(self):
        """
        Headers the channel set (C{Connection: close}) are sent, and it
        closes the connection after the answer.
        """
        transport = self.serve(b"GET /front HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        self.assertIn(b"\r\nConnection: close\r\n", transport.value())
        self.assertTrue(transport.value().endswith(b"moved"))
        self.assertTrue(transport.disconnecting)

    def test_keepAlive(self):
        """
        The next request on the connection is served, by the front route
        or by the resource.
        """
        transport = self.serve(
            b"GET /front HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /other HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /front HTTP/1.0\r\n\r\n"
        )
        answers = transport.value()
        self.assertEqual(answers.count(b"HTTP/1.1 302 Found\r\n"), 1)
        self.assertIn(b"HTTP/1.1 200 OK\r\n", answers)
        self.assertIn(b"\r\n\r\nresource", answers)
        self.assertTrue(answers.endswith(b"\r\nmoved"))
        self.assertIn(b"HTTP/1.0 302 Found\r\n", answers)
        self.assertEqual(len(self.log.getvalue().splitlines()), 3)
