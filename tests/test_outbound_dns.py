"""
Tests for L{smartrelay.outbound.router.MXRouter} and
L{smartrelay.outbound.router.makeResolver} against a real DNS server
(L{tests.dnsserver.DNSServer}) on loopback, with the real reactor.
"""

import json
import signal
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.internet.protocol import Factory, Protocol
from twisted.names import cache, dns
from twisted.trial.unittest import TestCase

from smartrelay.outbound.router import MXRouter, NoRoute, makeResolver
from tests.dnsserver import DNSServer, startProcess


class _Banner(Protocol):
    """
    Server side: send a banner and close.
    """

    def connectionMade(self) -> None:
        self.transport.write(b"220 mx1.test ready\r\n")
        self.transport.loseConnection()


class _Reader(Protocol):
    """
    Client side: collect everything until the connection closes.
    """

    def __init__(self) -> None:
        self.data = b""
        self.done: defer.Deferred = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any) -> None:
        self.done.callback(self.data)


class MXRouterDNSTests(TestCase):
    """
    L{MXRouter} with L{makeResolver} asking a real DNS server.
    """

    def setUp(self) -> None:
        self.server = DNSServer(reactor)
        self.server.start()
        self.addCleanup(self.server.stop)
        self.resolver = makeResolver(self.server.nameservers, reactor)
        self.addCleanup(self._clearCache)

    def _clearCache(self) -> None:
        """
        Cancel the cache's expiry timers, which would otherwise be left in
        the reactor after the test.
        """
        for resolver in self.resolver.resolvers:
            if isinstance(resolver, cache.CacheResolver):
                for call in resolver.cancel.values():
                    if call.active():
                        call.cancel()
                resolver.cancel.clear()
                resolver.cache.clear()

    def router(self, **kwargs: Any) -> MXRouter:
        return MXRouter(reactor, self.resolver, **kwargs)

    @defer.inlineCallbacks
    def assertNoRoute(self, domain: str, permanent: bool) -> Any:
        """
        Routing C{domain} fails with a L{NoRoute} of the given kind.

        @return: (via a L{Deferred}) the L{NoRoute}.
        """
        try:
            hops = yield self.router().route(domain)
        except NoRoute as e:
            self.assertIs(e.permanent, permanent, repr(e))
            return e
        self.fail(f"{domain} routed to {hops!r}")

    @defer.inlineCallbacks
    def test_preferenceOrder(self) -> Any:
        """
        Hops come in MX preference order, lowest first, whatever the order
        of the records in the answer.
        """
        self.server.addMX(
            "example.test",
            [(30, "mx3.example.test"), (10, "mx1.example.test"), (20, "mx2.example.test")],
        )
        hops = yield self.router().route("example.test")
        self.assertEqual(
            [h.name for h in hops],
            ["mx1.example.test", "mx2.example.test", "mx3.example.test"],
        )
        self.assertIn(("example.test", dns.MX), self.server.queries)

    @defer.inlineCallbacks
    def test_equalPreferences(self) -> Any:
        """
        Exchangers of equal preference are all hops, after the better ones
        and before the worse ones.
        """
        self.server.addMX(
            "example.test",
            [(10, "a.example.test"), (10, "b.example.test"), (5, "best.example.test"),
             (50, "backup.example.test")],
        )
        hops = yield self.router().route("Example.TEST.")
        names = [h.name for h in hops]
        self.assertEqual(names[0], "best.example.test")
        self.assertEqual(sorted(names[1:3]), ["a.example.test", "b.example.test"])
        self.assertEqual(names[3], "backup.example.test")

    @defer.inlineCallbacks
    def test_nullMX(self) -> Any:
        """
        An RFC 7505 null MX is a permanent L{NoRoute}, reason hostunknown.
        """
        self.server.nullMX("nomail.test")
        self.server.addA("nomail.test", "127.0.0.1")
        e = yield self.assertNoRoute("nomail.test", permanent=True)
        self.assertEqual(e.reason, "hostunknown")
        self.assertEqual(e.status, "5.1.10")

    @defer.inlineCallbacks
    def test_implicitMX(self) -> Any:
        """
        Without MX records, a domain with an address record is its own
        (only) hop.
        """
        self.server.addA("plain.test", "127.0.0.1")
        hops = yield self.router().route("plain.test")
        self.assertEqual([h.name for h in hops], ["plain.test"])
        self.assertIn(("plain.test", dns.A), self.server.queries)

    @defer.inlineCallbacks
    def test_implicitMXIPv6(self) -> Any:
        """
        An AAAA record alone is enough for an implicit MX.
        """
        self.server.addAAAA("six.test", "::1")
        hops = yield self.router().route("six.test")
        self.assertEqual([h.name for h in hops], ["six.test"])

    @defer.inlineCallbacks
    def test_noAddress(self) -> Any:
        """
        A domain that exists but has neither MX nor address records is a
        permanent L{NoRoute}.
        """
        self.server.addTXT("empty.test", "v=spf1 -all")
        e = yield self.assertNoRoute("empty.test", permanent=True)
        self.assertEqual(e.reason, "hostunknown")

    @defer.inlineCallbacks
    def test_nxdomain(self) -> Any:
        """
        A domain the server says does not exist is a permanent L{NoRoute}.
        """
        e = yield self.assertNoRoute("nowhere.test", permanent=True)
        self.assertEqual(e.reason, "hostunknown")
        self.assertEqual(e.status, "5.1.2")
        self.assertEqual(self.server.queries, [("nowhere.test", dns.MX)])

    @defer.inlineCallbacks
    def test_servfail(self) -> Any:
        """
        SERVFAIL is a temporary L{NoRoute}.
        """
        self.server.servfail("broken.test")
        e = yield self.assertNoRoute("broken.test", permanent=False)
        self.assertEqual(e.status, "4.4.3")

    @defer.inlineCallbacks
    def test_servfailOnAddress(self) -> Any:
        """
        SERVFAIL while looking for the implicit MX's addresses is temporary
        too: the name exists (NODATA for MX), its address lookups fail.
        """
        self.server.addTXT("flaky.test", "x")
        # The MX query gets NODATA; then make the address queries fail.
        original = self.server._zone.query

        def query(q: dns.Query, timeout: Any = None) -> defer.Deferred:
            if q.type in (dns.A, dns.AAAA):
                self.server.servfail("flaky.test")
            return original(q, timeout)

        self.server._zone.query = query  # type: ignore[method-assign]
        yield self.assertNoRoute("flaky.test", permanent=False)

    @defer.inlineCallbacks
    def test_ttlRespected(self) -> Any:
        """
        A second route within the records' TTL is answered from the
        resolver's cache (the server is not asked again); after the TTL it
        is.
        """
        self.server.addMX("cached.test", [(10, "mx.cached.test")], ttl=1)
        router = self.router()
        hops = yield router.route("cached.test")
        self.assertEqual([h.name for h in hops], ["mx.cached.test"])
        asked = list(self.server.queries)
        self.assertEqual(asked, [("cached.test", dns.MX)])

        hops = yield router.route("cached.test")
        self.assertEqual([h.name for h in hops], ["mx.cached.test"])
        self.assertEqual(self.server.queries, asked, "not answered from the cache")

        yield task.deferLater(reactor, 1.2, lambda: None)
        hops = yield router.route("cached.test")
        self.assertEqual([h.name for h in hops], ["mx.cached.test"])
        self.assertEqual(self.server.queries, asked + [("cached.test", dns.MX)])

    @defer.inlineCallbacks
    def test_connectThroughHop(self) -> Any:
        """
        Connecting a hop's endpoint resolves the exchanger's host name with
        the same DNS server and reaches the address it gives.
        """
        listening = reactor.listenTCP(0, Factory.forProtocol(_Banner), interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        self.server.addMX("example.test", [(10, "mx1.test")])
        self.server.addA("mx1.test", "127.0.0.1")
        router = self.router(port=listening.getHost().port, connectTimeout=5)
        hops = yield router.route("example.test")
        self.assertEqual([h.name for h in hops], ["mx1.test"])
        reader = yield hops[0].endpoint.connect(Factory.forProtocol(_Reader))
        banner = yield reader.done
        self.assertEqual(banner, b"220 mx1.test ready\r\n")
        self.assertIn(("mx1.test", dns.A), self.server.queries)


class DNSServerTests(TestCase):
    """
    L{DNSServer} itself: TCP as well as UDP, and the separate-process mode.
    """

    @defer.inlineCallbacks
    def test_tcp(self) -> Any:
        """
        The server answers over TCP on the same port as UDP.
        """
        from twisted.names import client

        server = DNSServer(reactor)
        server.addA("tcp.test", "192.0.2.1")
        port = server.start()
        self.addCleanup(server.stop)
        resolver = client.Resolver(servers=[("127.0.0.1", port)], reactor=reactor)
        answer = yield resolver.queryTCP([dns.Query(b"tcp.test", dns.A)])
        self.assertEqual(
            [a.payload.dottedQuad() for a in answer.answers], ["192.0.2.1"]
        )
        self.assertEqual(server.queries, [("tcp.test", dns.A)])
        # Let the server side of the TCP connection go before the test ends.
        yield server.stop()

    @defer.inlineCallbacks
    def test_process(self) -> Any:
        """
        C{python -m tests.dnsserver --zone FILE} serves a JSON zone and
        prints its port.
        """
        zonePath = self.mktemp()
        with open(zonePath, "w") as f:
            json.dump(
                {"ttl": 60, "mx": {"proc.test": [[10, "mx.proc.test"]]},
                 "a": {"mx.proc.test": ["127.0.0.1"]}, "nullmx": ["null.test"]},
                f,
            )
        process, port = startProcess(zonePath)

        def stop() -> None:
            process.send_signal(signal.SIGTERM)
            process.wait(10)
            process.stdout.close()

        self.addCleanup(stop)
        self.assertEqual(process.poll(), None)
        resolver = makeResolver([("127.0.0.1", port)], reactor)
        hops = yield MXRouter(reactor, resolver).route("proc.test")
        self.assertEqual([h.name for h in hops], ["mx.proc.test"])
        for r in resolver.resolvers:
            if isinstance(r, cache.CacheResolver):
                for call in r.cancel.values():
                    if call.active():
                        call.cancel()
