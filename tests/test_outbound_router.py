"""
Tests for L{smartrelay.outbound.router}: smarthost and MX routing with a
fake DNS resolver and a memory reactor (no sockets).
"""

import random

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import fail, succeed
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.names import dns
from twisted.names import error as dnserror
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from smartrelay.outbound.router import (
    CachingResolver,
    DomainRouter,
    IRouter,
    MXRouter,
    NamesHostnameResolver,
    NoRoute,
    SmarthostRouter,
    makeResolver,
)


class FakeResolver:
    """
    A twisted.names resolver answering from dictionaries.  A value is a
    list of records or an exception to fail with; a missing name has no
    records of that type (NODATA).
    """

    def __init__(self, mx=None, a=None, aaaa=None):
        self.mx = mx or {}
        self.a = a or {}
        self.aaaa = aaaa or {}
        self.queries = []

    def _answer(self, table, kind, name, make):
        self.queries.append((kind, name))
        value = table.get(name, [])
        if isinstance(value, Exception):
            return fail(value)
        return succeed(([dns.RRHeader(name, kind, payload=make(v)) for v in value], [], []))

    def lookupMailExchange(self, name, timeout=None):
        return self._answer(self.mx, dns.MX, name, lambda v: dns.Record_MX(*v))

    def lookupAddress(self, name, timeout=None):
        return self._answer(self.a, dns.A, name, dns.Record_A)

    def lookupIPV6Address(self, name, timeout=None):
        return self._answer(self.aaaa, dns.AAAA, name, dns.Record_AAAA)


class SmarthostRouterTests(SynchronousTestCase):
    """
    L{SmarthostRouter} sends everything to one endpoint.
    """

    def test_interface(self):
        """SmarthostRouter provides IRouter."""
        router = SmarthostRouter(MemoryReactorClock(), "tcp:smarthost.example:587")
        verifyObject(IRouter, router)

    def test_everyDomainOneHop(self):
        """Every domain routes to the same single hop, named host:port."""
        router = SmarthostRouter(MemoryReactorClock(), "tcp:host=smarthost.example:port=587")
        one = self.successResultOf(router.route("example.com"))
        two = self.successResultOf(router.route("example.org"))
        self.assertEqual(one, two)
        self.assertEqual([hop.name for hop in one], ["smarthost.example:587"])

    def test_timeoutAndBindAddressApplied(self):
        """The configured connect timeout and bind address are used when the description lacks them."""
        reactor = MemoryReactorClock()
        router = SmarthostRouter(reactor, "tcp:smarthost.example:2525", 12, "192.0.2.1")
        (hop,) = self.successResultOf(router.route("example.com"))
        hop.endpoint.connect(Factory.forProtocol(Protocol))
        host, port, factory, timeout, bindAddress = reactor.tcpClients[0]
        self.assertEqual((host, port, timeout, bindAddress), ("smarthost.example", 2525, 12, ("192.0.2.1", 0)))
        self.assertEqual(hop.name, "smarthost.example:2525")

    def test_descriptionWins(self):
        """A timeout set in the description is not overridden."""
        reactor = MemoryReactorClock()
        router = SmarthostRouter(reactor, "tcp:smarthost.example:25:timeout=5", 30)
        (hop,) = self.successResultOf(router.route("example.com"))
        hop.endpoint.connect(Factory.forProtocol(Protocol))
        self.assertEqual(reactor.tcpClients[0][3], 5)

    def test_badDescription(self):
        """An unusable endpoint description fails at construction, not at delivery time."""
        self.assertRaises(ValueError, SmarthostRouter, MemoryReactorClock(), "nosuchtype:foo")


class MXRouterTests(SynchronousTestCase):
    """
    L{MXRouter} resolves MX records into hops.
    """

    def router(self, resolver, **kwargs):
        self.reactor = MemoryReactorClock()
        return MXRouter(self.reactor, resolver, random=random.Random(1), **kwargs)

    def names(self, d):
        return [hop.name for hop in self.successResultOf(d)]

    def noRoute(self, d):
        return self.failureResultOf(d, NoRoute).value

    def test_interface(self):
        """MXRouter provides IRouter."""
        verifyObject(IRouter, self.router(FakeResolver()))

    def test_preferenceOrder(self):
        """Hops come in MX preference order, lowest first."""
        resolver = FakeResolver(mx={"example.com": [(20, "mx2.example.com"), (10, "mx1.example.com")]})
        self.assertEqual(
            self.names(self.router(resolver).route("example.com")),
            ["mx1.example.com", "mx2.example.com"],
        )

    def test_equalPreferenceShuffled(self):
        """Equal preferences are put in random order; better preferences still come first."""
        resolver = FakeResolver(
            mx={"example.com": [(5, "a.mx"), (5, "b.mx"), (5, "c.mx"), (1, "first.mx")]}
        )
        orders = set()
        for seed in range(20):
            router = MXRouter(MemoryReactorClock(), resolver, random=random.Random(seed))
            names = self.names(router.route("example.com"))
            self.assertEqual(names[0], "first.mx")
            self.assertEqual(sorted(names[1:]), ["a.mx", "b.mx", "c.mx"])
            orders.add(tuple(names))
        self.assertGreater(len(orders), 1)

    def test_domainNormalised(self):
        """Upper case and a trailing dot do not matter."""
        resolver = FakeResolver(mx={"example.com": [(10, "MX.Example.COM.")]})
        self.assertEqual(self.names(self.router(resolver).route("Example.COM.")), ["mx.example.com"])

    def test_implicitMX(self):
        """Without MX records the domain's own address is the hop."""
        resolver = FakeResolver(a={"example.com": ["192.0.2.5"]})
        self.assertEqual(self.names(self.router(resolver).route("example.com")), ["example.com"])

    def test_implicitMXIPv6Only(self):
        """An AAAA record alone is enough for the implicit MX."""
        resolver = FakeResolver(aaaa={"example.com": ["2001:db8::5"]})
        self.assertEqual(self.names(self.router(resolver).route("example.com")), ["example.com"])

    def test_noMXNoAddress(self):
        """No MX and no address records: permanent, hostunknown."""
        error = self.noRoute(self.router(FakeResolver()).route("example.com"))
        self.assertTrue(error.permanent)
        self.assertEqual(error.reason, "hostunknown")

    def test_nullMX(self):
        """RFC 7505 null MX is a permanent hostunknown with status 5.1.10."""
        resolver = FakeResolver(mx={"example.com": [(0, "")]}, a={"example.com": ["192.0.2.1"]})
        error = self.noRoute(self.router(resolver).route("example.com"))
        self.assertEqual((error.permanent, error.reason, error.status), (True, "hostunknown", "5.1.10"))

    def test_nxdomain(self):
        """NXDOMAIN is permanent."""
        resolver = FakeResolver(mx={"nope.example": dnserror.DNSNameError("nope")})
        error = self.noRoute(self.router(resolver).route("nope.example"))
        self.assertTrue(error.permanent)
        self.assertEqual(error.reason, "hostunknown")

    def test_servfail(self):
        """SERVFAIL is temporary."""
        resolver = FakeResolver(mx={"example.com": dnserror.DNSServerError("servfail")})
        error = self.noRoute(self.router(resolver).route("example.com"))
        self.assertFalse(error.permanent)
        self.assertEqual(error.status, "4.4.3")

    def test_timeout(self):
        """A DNS timeout is temporary."""
        resolver = FakeResolver(mx={"example.com": dnserror.DNSQueryTimeoutError("slow")})
        self.assertFalse(self.noRoute(self.router(resolver).route("example.com")).permanent)

    def test_addressLookupTimeout(self):
        """A timeout while looking up the implicit MX's address is temporary."""
        resolver = FakeResolver(a={"example.com": dnserror.DNSQueryTimeoutError("slow")})
        self.assertFalse(self.noRoute(self.router(resolver).route("example.com")).permanent)

    def test_addressLiteral(self):
        """A domain literal routes straight to that address, without DNS."""
        resolver = FakeResolver()
        self.assertEqual(self.names(self.router(resolver).route("[192.0.2.7]")), ["192.0.2.7"])
        self.assertEqual(self.names(self.router(resolver).route("[IPv6:2001:db8::7]")), ["2001:db8::7"])
        self.assertEqual(resolver.queries, [])

    def test_hopResolvesWithOurResolver(self):
        """A hop's endpoint resolves the MX host with the router's resolver and uses port, timeout, bindAddress."""
        resolver = FakeResolver(
            mx={"example.com": [(10, "mx.example.com")]},
            a={"mx.example.com": ["192.0.2.10"]},
        )
        router = self.router(resolver, port=2525, connectTimeout=7, bindAddress="192.0.2.99")
        (hop,) = self.successResultOf(router.route("example.com"))
        hop.endpoint.connect(Factory.forProtocol(Protocol))
        host, port, factory, timeout, bindAddress = self.reactor.tcpClients[0]
        self.assertEqual(
            (host, port, timeout, bindAddress), ("192.0.2.10", 2525, 7, ("192.0.2.99", 0))
        )
        self.assertIn(("A", "mx.example.com"), [(dns.QUERY_TYPES[k], n) for k, n in resolver.queries])


class Receiver:
    def __init__(self):
        self.addresses = []
        self.complete = False

    def resolutionBegan(self, resolution):
        self.resolution = resolution

    def addressResolved(self, address):
        self.addresses.append(address)

    def resolutionComplete(self):
        self.complete = True


class NamesHostnameResolverTests(SynchronousTestCase):
    """
    L{NamesHostnameResolver} adapts a twisted.names resolver for endpoints.
    """

    def test_ipv4First(self):
        """IPv4 addresses are reported before IPv6 ones."""
        resolver = NamesHostnameResolver(
            FakeResolver(a={"h.example": ["192.0.2.1"]}, aaaa={"h.example": ["2001:db8::1"]})
        )
        receiver = Receiver()
        resolver.resolveHostName(receiver, "h.example", 25)
        self.assertTrue(receiver.complete)
        self.assertEqual(
            receiver.addresses,
            [IPv4Address("TCP", "192.0.2.1", 25), IPv6Address("TCP", "2001:db8::1", 25)],
        )

    def test_failureIsEmpty(self):
        """A failed lookup completes with no addresses (the endpoint reports DNSLookupError)."""
        resolver = NamesHostnameResolver(
            FakeResolver(a={"h.example": dnserror.DNSNameError("no")})
        )
        receiver = Receiver()
        resolver.resolveHostName(receiver, "h.example", 25)
        self.assertEqual((receiver.addresses, receiver.complete), ([], True))

    def test_literal(self):
        """An IP literal resolves to itself."""
        receiver = Receiver()
        NamesHostnameResolver(FakeResolver()).resolveHostName(receiver, "192.0.2.3", 25)
        self.assertEqual(receiver.addresses, [IPv4Address("TCP", "192.0.2.3", 25)])


class MakeResolverTests(SynchronousTestCase):
    """
    L{makeResolver} builds a resolver on the given reactor.
    """

    def test_nameservers(self):
        """Configured name servers are used instead of resolv.conf, and no global reactor."""
        reactor = MemoryReactorClock()
        resolver = makeResolver([("127.0.0.1", 10053)], reactor)
        caching = resolver.resolvers[-1]
        self.assertIs(caching.clock, reactor)
        dnsResolver = caching.resolver
        self.assertEqual(dnsResolver.servers, [("127.0.0.1", 10053)])
        self.assertIs(dnsResolver._reactor, reactor)
        self.assertIsNone(dnsResolver.resolv)


class CachingResolverTests(SynchronousTestCase):
    """
    L{CachingResolver} keeps answers for their TTL, without timers.
    """

    def setUp(self):
        from twisted.internet.task import Clock
        from twisted.names import dns

        self.clock = Clock()
        self.asked = []
        self.ttl = 60
        test = self

        class Upstream:
            def _lookup(self, name, cls, type, timeout):
                test.asked.append(name)
                record = dns.RRHeader(name, dns.A, dns.IN, test.ttl, dns.Record_A("192.0.2.1"))
                return succeed(([record], [], []))

        self.resolver = CachingResolver(Upstream(), self.clock, size=2)

    def test_ttl(self):
        """A second lookup within the TTL is answered from memory; after it, upstream is asked."""
        self.successResultOf(self.resolver.lookupAddress("a.test"))
        self.clock.advance(59)
        self.successResultOf(self.resolver.lookupAddress("a.test"))
        self.assertEqual(self.asked, [b"a.test"])
        self.clock.advance(1)
        self.successResultOf(self.resolver.lookupAddress("a.test"))
        self.assertEqual(self.asked, [b"a.test", b"a.test"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_zeroTTLNotCached(self):
        self.ttl = 0
        self.successResultOf(self.resolver.lookupAddress("a.test"))
        self.successResultOf(self.resolver.lookupAddress("a.test"))
        self.assertEqual(len(self.asked), 2)

    def test_bounded(self):
        """The oldest answers are dropped beyond the size limit."""
        for name in ("a.test", "b.test", "c.test", "a.test"):
            self.successResultOf(self.resolver.lookupAddress(name))
        self.assertEqual(self.asked, [b"a.test", b"b.test", b"c.test", b"a.test"])


class DomainRouterTests(SynchronousTestCase):
    """
    L{DomainRouter} and L{smartrelay.service.makeRouter}: per-domain routes
    before the default router.
    """

    def test_routes(self):
        special = SmarthostRouter(MemoryReactorClock(), "tcp:host=special.example:port=2525", relay=False)
        default = SmarthostRouter(MemoryReactorClock(), "tcp:host=smarthost.example:port=25")
        router = DomainRouter({"example.com": special}, default)
        verifyObject(IRouter, router)
        (hop,) = self.successResultOf(router.route("Example.COM."))
        self.assertEqual((hop.name, hop.host, hop.relay), ("special.example:2525", "special.example", False))
        (hop,) = self.successResultOf(router.route("other.example"))
        self.assertEqual((hop.name, hop.relay), ("smarthost.example:25", True))

    def test_fromConfig(self):
        from smartrelay.config import parseConfig
        from smartrelay.service import makeRouter

        reactor = MemoryReactorClock()
        config = parseConfig(
            "[delivery]\nnameservers = 127.0.0.1:10053\n"
            "[domain:example.com]\nroute = tcp:host=127.0.0.1:port=2626\n"
            "[domain:plain.example]\nmax_connections = 3\n"
        )
        router = makeRouter(config, reactor)
        self.assertIsInstance(router, DomainRouter)
        self.assertEqual(list(router.routes), ["example.com"])
        self.assertIsInstance(router.default, MXRouter)
        (hop,) = self.successResultOf(router.route("example.com"))
        self.assertEqual(hop.name, "127.0.0.1:2626")
        self.assertIsInstance(makeRouter(parseConfig(""), reactor), MXRouter)
