"""
Tests for L{smartrelay.web.site}'s front routes: L{SiteRoot.frontRoute}
and L{BoundedRequest.process}, over L{makeSite} in HTTP bytes.
"""

import io

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from smartrelay.web.site import SiteRoot, makeSite


class Leaf(Resource):
    """
    Answers its name; with C{front}, a front route that answers paths
    ending in C{/front} (and raises for C{/boom}).
    """

    isLeaf = True

    def __init__(self, name, front=False):
        super().__init__()
        self.name = name
        self.asked = []
        if front:
            self.frontRoute = self._front

    def _front(self, request):
        self.asked.append(request.path)
        if request.path.endswith(b"/boom"):
            raise RuntimeError("front route broke")
        if not request.path.endswith(b"/front"):
            return False
        body = b"front of " + self.name
        request.setHeader(b"Content-Length", b"%d" % len(body))
        request.write(body)
        request.finish()
        return True

    def render_GET(self, request):
        return b"resource " + self.name


class FrontRouteTests(SynchronousTestCase):
    """
    A mounted application's C{frontRoute} is asked first, for its own
    first path segment only.
    """

    def setUp(self):
        self.tracking = Leaf(b"t", front=True)
        self.api = Leaf(b"api")
        self.default = Leaf(b"ui", front=True)
        root = SiteRoot(self.default, {b"t": self.tracking, b"api": self.api})
        self.site = makeSite(root, Clock(), accessLog=io.StringIO())
        self.site.startFactory()
        self.addCleanup(self.site.stopFactory)

    def get(self, path):
        address = IPv4Address("TCP", "192.0.2.7", 40000)
        protocol = self.site.buildProtocol(address)
        transport = StringTransport(peerAddress=address)
        protocol.makeConnection(transport)
        protocol.dataReceived(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path)
        self.addCleanup(protocol.connectionLost, Failure(ConnectionDone()))
        return transport.value()

    def test_answered(self):
        """
        A request the front route answers gets its answer; the resource is
        not asked.
        """
        answer = self.get(b"/t/front")
        self.assertTrue(answer.endswith(b"front of t"))
        self.assertEqual(self.tracking.asked, [b"/t/front"])

    def test_declined(self):
        """
        A request the front route declines goes to the resource as usual.
        """
        self.assertTrue(self.get(b"/t/other").endswith(b"resource t"))
        self.assertEqual(self.tracking.asked, [b"/t/other"])

    def test_otherSegments(self):
        """
        Only the application mounted under the first segment is asked; the
        default application's front route never is, nor one for a path
        without that segment.
        """
        for path, answer in [
            (b"/api/front", b"resource api"),
            (b"/front", b"resource ui"),
            (b"/", b"resource ui"),
            (b"/tt/front", b"resource ui"),
            (b"/t", b"resource t"),
        ]:
            self.assertTrue(self.get(path).endswith(answer), path)
        self.assertEqual(self.tracking.asked, [b"/t"])
        self.assertEqual(self.default.asked, [])

    def test_fails(self):
        """
        A front route that raises gets the site's 500 answer and a logged
        error, not a hung request.
        """
        answer = self.get(b"/t/boom")
        self.assertTrue(answer.startswith(b"HTTP/1.1 500 "))
        self.assertNotIn(b"front route broke", answer)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
