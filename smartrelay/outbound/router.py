"""
Where mail for a domain goes: routers turn a recipient domain into an
ordered list of L{Hop}s (name + client endpoint).

* L{SmarthostRouter}: every domain goes to one configured smarthost.
* L{MXRouter}: direct delivery by MX lookup (RFC 5321 section 5.1,
  RFC 7505 null MX), with the domain's own address records as fallback.

Routers never connect; the delivery client does.  A router that cannot find
a route fails with L{NoRoute}, which says whether the failure is permanent
(bounce) or temporary (retry later).
"""

import random as _random
import re
import socket
from typing import Any, Optional, Sequence

import attrs
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.endpoints import HostnameEndpoint, clientFromString
from twisted.internet.interfaces import (
    IHostnameResolver,
    IHostResolution,
    IReactorPluggableNameResolver,
)
from twisted.logger import Logger
from twisted.names import common, dns, hosts, resolve
from twisted.names import client as dnsclient
from twisted.names import error as dnserror
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

__all__ = [
    "IRouter",
    "Hop",
    "NoRoute",
    "EndpointSpec",
    "MXHostSpec",
    "SmarthostRouter",
    "MXRouter",
    "DomainRouter",
    "makeResolver",
    "NamesHostnameResolver",
]


@attrs.frozen
class Hop:
    """
    One place to try delivering to.

    @ivar name: human-readable name for logs and events, e.g.
        C{"smarthost.example:587"} or an MX host name.
    @ivar endpoint: an L{IStreamClientEndpoint}.
    @ivar host: the host name a verified TLS certificate must carry
        (L{None}: use C{name}).
    @ivar relay: the hop is a relay that takes mail for any domain (a
        smarthost): its mail forms one destination rather than one per
        recipient domain.
    """

    name: str
    endpoint: Any = attrs.field(eq=False, repr=False)
    host: Optional[str] = attrs.field(default=None, eq=False, repr=False)
    relay: bool = attrs.field(default=False, eq=False, repr=False)
    spec: Any = attrs.field(default=None, eq=False, repr=False)


@attrs.frozen
class EndpointSpec:
    """
    How to make a hop's endpoint in another process (a worker process
    that runs delivery sessions, L{smartrelay.outbound.remote}): picklable,
    unlike the endpoint.  A hop given by an endpoint description.
    """

    description: str

    def endpoint(self, reactor: Any, resolvers: dict) -> Any:
        return clientFromString(reactor, self.description)


@attrs.frozen
class MXHostSpec:
    """
    L{EndpointSpec} for a mail exchanger found by an L{MXRouter}: its host
    name (or address), resolved there with the same name servers.

    @ivar nameservers: C{(host, port)} pairs, as for L{makeResolver}.
    """

    host: str
    port: int
    timeout: float
    bindAddress: Optional[str]
    nameservers: tuple

    def endpoint(self, reactor: Any, resolvers: dict) -> Any:
        """
        @param resolvers: the other process's resolvers by name servers,
            made here the first time (so that its DNS cache is shared by
            its sessions).
        """
        resolving = resolvers.get(self.nameservers)
        if resolving is None:
            resolver = makeResolver(self.nameservers, reactor)
            resolving = _NameResolvingReactor(reactor, NamesHostnameResolver(resolver))
            resolvers[self.nameservers] = resolving
        return HostnameEndpoint(resolving, self.host, self.port, self.timeout, self.bindAddress)


class NoRoute(Exception):
    """
    No hop can be found for a domain.

    @ivar permanent: C{True} → the recipients bounce; C{False} → retry.
    @ivar reason: bounce reason (DESIGN 1.7 vocabulary), e.g.
        C{"hostunknown"}.
    @ivar status: RFC 3463 enhanced status code describing the failure.
    @ivar text: a human sentence.
    """

    def __init__(
        self,
        text: str,
        permanent: bool = False,
        reason: str = "hostunknown",
        status: Optional[str] = None,
    ) -> None:
        super().__init__(text)
        self.text = text
        self.permanent = permanent
        self.reason = reason
        self.status = status or ("5.1.2" if permanent else "4.4.3")

    def __repr__(self) -> str:
        return (
            f"NoRoute({self.text!r}, permanent={self.permanent!r}, "
            f"reason={self.reason!r}, status={self.status!r})"
        )


class IRouter(Interface):
    """
    Maps a recipient domain to the hops to try, in order.
    """

    def route(domain: str) -> Deferred:
        """
        @return: a L{Deferred} firing with a non-empty C{list[Hop]}, in the
            order they should be tried, or failing with L{NoRoute}.
        """


# -- smarthost -----------------------------------------------------------

_UNESCAPED_COLON = re.compile(r"(?<!\\):")
_KEYWORD = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$", re.DOTALL)
_HOST_PORT_TYPES = {"tcp", "tcp6", "ssl", "tls", "txtorcon", "tor"}
_BIND_TYPES = {"tcp", "tcp6", "ssl", "tls"}
_TIMEOUT_TYPES = {"tcp", "tcp6", "ssl", "tls", "unix"}


def _describe(description: str) -> tuple:
    """
    Split an endpoint description into (type, positional args, keyword args),
    enough to know which parameters it sets and to name the hop.
    """
    parts = _UNESCAPED_COLON.split(description)
    kind = parts[0].lower()
    args, kwargs = [], {}
    for part in parts[1:]:
        part = part.replace("\\:", ":")
        match = _KEYWORD.match(part)
        if match:
            kwargs[match.group(1)] = match.group(2)
        else:
            args.append(part)
    return kind, args, kwargs


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


@implementer(IRouter)
class SmarthostRouter:
    """
    Route every domain to one smarthost given as an endpoint description
    (C{tcp:host=smarthost.example:port=587}, C{ssl:smarthost.example:465},
    ...).

    C{connectTimeout} and C{bindAddress} are applied when the description
    does not set C{timeout} / C{bindAddress} itself and its endpoint type
    accepts them.  A bad description raises L{ValueError} at construction.
    """

    def __init__(
        self,
        reactor: Any,
        endpointDescription: str,
        connectTimeout: float = 30.0,
        bindAddress: Optional[str] = None,
        relay: bool = True,
    ) -> None:
        kind, args, kwargs = _describe(endpointDescription)
        description = endpointDescription
        if kind in _TIMEOUT_TYPES and "timeout" not in kwargs:
            description += ":timeout=" + _escape(_number(connectTimeout))
        if bindAddress and kind in _BIND_TYPES and "bindAddress" not in kwargs:
            description += ":bindAddress=" + _escape(bindAddress)
        endpoint = clientFromString(reactor, description)
        host = kwargs.get("host", args[0] if args else None) if kind in _HOST_PORT_TYPES else None
        self.hop = Hop(
            name=_hopName(kind, args, kwargs, endpointDescription),
            endpoint=endpoint,
            host=host,
            relay=relay,
            spec=EndpointSpec(description),
        )

    def route(self, domain: str) -> Deferred:
        return succeed([self.hop])


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _hopName(kind: str, args: list, kwargs: dict, description: str) -> str:
    if kind in _HOST_PORT_TYPES:
        host = kwargs.get("host", args[0] if args else None)
        port = kwargs.get("port", args[1] if len(args) > 1 else None)
        if host:
            host = f"[{host}]" if isIPv6Address(host) else host
            return f"{host}:{port}" if port else host
    if kind == "unix":
        path = kwargs.get("path", args[0] if args else "")
        return f"unix:{path}"
    return description


@implementer(IRouter)
@attrs.define
class DomainRouter:
    """
    Per-domain routes (C{[domain:example.com] route = ...}) in front of a
    default router (the smarthost, or MX lookups).

    @ivar routes: lower-case domain → L{IRouter} for that domain.
    @ivar default: the L{IRouter} for every other domain.
    """

    routes: dict
    default: Any

    def route(self, domain: str) -> Deferred:
        router = self.routes.get(domain.strip().rstrip(".").lower(), self.default)
        return router.route(domain)


# -- direct delivery (MX) --------------------------------------------------

_TEMPORARY_DNS = (
    dnserror.DNSServerError,
    dnserror.DNSQueryRefusedError,
    dnserror.DNSFormatError,
    dnserror.DNSNotImplementedError,
    dnserror.DNSUnknownError,
    dnserror.DNSQueryTimeoutError,
    dnserror.TimeoutError,
)


@implementer(IRouter)
class MXRouter:
    """
    Direct delivery: route a domain to its mail exchangers.

    * MX records in preference order, equal preferences shuffled;
    * no MX records → the domain's own A/AAAA records (implicit MX);
    * RFC 7505 null MX (C{MX 0 .}) → permanent L{NoRoute} (hostunknown);
    * NXDOMAIN, or no MX and no address → permanent L{NoRoute};
    * DNS timeouts, SERVFAIL, refusals → temporary L{NoRoute};
    * an address literal domain (C{[192.0.2.1]}) → that address.

    Host names of the hops are resolved at connect time with the same
    resolver (not the system's C{getaddrinfo}), IPv4 addresses first.

    @param resolver: a L{twisted.names} C{IResolver} (see L{makeResolver}).
    @param random: a L{random.Random} used to order equal preferences.
    @param nameservers: the name servers C{resolver} was made with (by
        L{makeResolver}), if it was: hops then carry an L{MXHostSpec}, and
        can be connected from a worker process.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        resolver: Any,
        port: int = 25,
        connectTimeout: float = 30.0,
        bindAddress: Optional[str] = None,
        random: Optional[_random.Random] = None,
        nameservers: Optional[Sequence] = None,
    ) -> None:
        self._resolver = resolver
        self._nameservers = (
            None if nameservers is None
            else tuple((host, int(port)) for host, port in nameservers)
        )
        self._reactor = _NameResolvingReactor(reactor, NamesHostnameResolver(resolver))
        self._port = port
        self._timeout = connectTimeout
        self._bindAddress = bindAddress
        self._random = random or _random.Random()

    def _hop(self, host: str) -> Hop:
        spec = None
        if self._nameservers is not None:
            spec = MXHostSpec(
                host, self._port, self._timeout, self._bindAddress, self._nameservers
            )
        return Hop(
            name=host,
            endpoint=HostnameEndpoint(
                self._reactor, host, self._port, self._timeout, self._bindAddress
            ),
            spec=spec,
        )

    def route(self, domain: str) -> Deferred:
        domain = domain.strip().rstrip(".").lower()
        if domain.startswith("[") and domain.endswith("]"):
            literal = domain[1:-1]
            if literal.lower().startswith("ipv6:"):
                literal = literal[5:]
            if isIPAddress(literal) or isIPv6Address(literal):
                return succeed([self._hop(literal)])
            return _fail(
                NoRoute(f"bad address literal {domain}", permanent=True,
                        status="5.1.2")
            )
        if not domain:
            return _fail(NoRoute("empty domain", permanent=True))
        d = self._resolver.lookupMailExchange(domain)
        d.addCallbacks(
            lambda result: self._fromMX(domain, result[0]),
            lambda failure: self._dnsFailed(domain, "MX", failure),
        )
        return d

    def _fromMX(self, domain: str, answers: Sequence) -> Any:
        records = [a.payload for a in answers if a.type == dns.MX]
        if not records:
            return self._implicitMX(domain)
        real = [r for r in records if str(r.name).rstrip(".")]
        if not real:
            raise NoRoute(
                f"{domain} does not accept mail (null MX, RFC 7505)",
                permanent=True,
                reason="hostunknown",
                status="5.1.10",
            )
        byPreference: dict = {}
        for record in real:
            byPreference.setdefault(record.preference, []).append(
                str(record.name).rstrip(".").lower()
            )
        hops, seen = [], set()
        for preference in sorted(byPreference):
            names = byPreference[preference]
            self._random.shuffle(names)
            for name in names:
                if name not in seen:
                    seen.add(name)
                    hops.append(self._hop(name))
        return hops

    def _implicitMX(self, domain: str) -> Deferred:
        lookups = [
            self._resolver.lookupAddress(domain),
            self._resolver.lookupIPV6Address(domain),
        ]

        def checked(results):
            found, failures = False, []
            for ok, value in results:
                if ok:
                    found = found or any(
                        a.type in (dns.A, dns.AAAA) for a in value[0]
                    )
                else:
                    failures.append(value)
            if found:
                return [self._hop(domain)]
            temporary = [f for f in failures if f.check(*_TEMPORARY_DNS)]
            if temporary:
                return self._dnsFailed(domain, "A/AAAA", temporary[0])
            if failures and not all(f.check(dnserror.DNSNameError) for f in failures):
                return self._dnsFailed(domain, "A/AAAA", failures[0])
            raise NoRoute(
                f"{domain} has no MX and no address records",
                permanent=True,
                reason="hostunknown",
                status="5.1.2",
            )

        return DeferredList(lookups, consumeErrors=True).addCallback(checked)

    def _dnsFailed(self, domain: str, what: str, failure: Failure) -> None:
        if failure.check(NoRoute):
            failure.raiseException()
        if failure.check(dnserror.DNSNameError):
            raise NoRoute(
                f"{domain}: no such domain (NXDOMAIN)",
                permanent=True,
                reason="hostunknown",
                status="5.1.2",
            )
        if not failure.check(*_TEMPORARY_DNS):
            self.log.failure(
                "unexpected failure looking up {what} for {domain}",
                failure,
                what=what,
                domain=domain,
            )
        raise NoRoute(
            f"{domain}: {what} lookup failed temporarily "
            f"({failure.type.__name__}: {failure.getErrorMessage()})",
            permanent=False,
            reason="networkerror",
            status="4.4.3",
        )


def _fail(exc: Exception) -> Deferred:
    d: Deferred = Deferred()
    d.errback(Failure(exc))
    return d


def makeResolver(nameservers: Sequence, reactor: Any) -> Any:
    """
    A caching L{twisted.names} resolver (C{/etc/hosts}, cache, DNS) that
    uses C{reactor}.

    This is L{twisted.names.client.createResolver} with an injected reactor:
    C{createResolver} takes none and would use the global one.

    @param nameservers: C{(host, port)} pairs; empty → the system's
        C{/etc/resolv.conf}.
    """
    servers = [(host, int(port)) for host, port in nameservers]
    if servers:
        theResolver = dnsclient.Resolver(servers=servers, reactor=reactor)
    else:
        theResolver = dnsclient.Resolver(resolv="/etc/resolv.conf", reactor=reactor)
    return resolve.ResolverChain(
        [
            hosts.Resolver(b"/etc/hosts"),
            CachingResolver(theResolver, reactor),
        ]
    )


class CachingResolver(common.ResolverBase):
    """
    Answers from memory while the records' TTL lasts, otherwise asks
    C{resolver} and remembers the answer (for the smallest TTL in it, at
    most C{maxTTL}).  No timers: expired answers are dropped when looked
    up, and the oldest go first when there are more than C{size}.

    (L{twisted.names.client.createResolver} puts a L{cache.CacheResolver}
    in front of the DNS client, but nothing ever fills it: only a DNS
    server's factory does.)
    """

    def __init__(self, resolver: Any, clock: Any, size: int = 10000, maxTTL: float = 86400) -> None:
        common.ResolverBase.__init__(self)
        self.resolver = resolver
        self.clock = clock
        self.size = size
        self.maxTTL = maxTTL
        self._answers: dict = {}

    def _lookup(self, name: bytes, cls: int, type: int, timeout: Any) -> Deferred:
        query = dns.Query(name, type, cls)
        now = self.clock.seconds()
        cached = self._answers.get(query)
        if cached is not None:
            expires, result = cached
            if now < expires:
                return succeed(result)
            del self._answers[query]

        def store(result: tuple) -> tuple:
            records = [r for section in result for r in section]
            ttl = min([r.ttl for r in records], default=0)
            if ttl > 0:
                self._answers.pop(query, None)
                self._answers[query] = (self.clock.seconds() + min(ttl, self.maxTTL), result)
                while len(self._answers) > self.size:
                    del self._answers[next(iter(self._answers))]
            return result

        return self.resolver._lookup(name, cls, type, timeout).addCallback(store)


# -- host name resolution through twisted.names ----------------------------


@implementer(IHostResolution)
@attrs.define
class _Resolution:
    name: str
    _lookups: list = attrs.field(factory=list)

    def cancel(self) -> None:
        for d in self._lookups:
            d.cancel()


@implementer(IHostnameResolver)
@attrs.define
class NamesHostnameResolver:
    """
    An L{IHostnameResolver} answering from a L{twisted.names} C{IResolver}
    (A, then AAAA records), so that the hosts we connect to are resolved
    with the configured name servers.
    """

    resolver: Any

    def resolveHostName(
        self,
        resolutionReceiver: Any,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Optional[Sequence] = None,
        transportSemantics: str = "TCP",
    ) -> IHostResolution:
        resolution = _Resolution(hostName)
        resolutionReceiver.resolutionBegan(resolution)
        want4 = addressTypes is None or IPv4Address in addressTypes
        want6 = addressTypes is None or IPv6Address in addressTypes
        if isIPAddress(hostName) or isIPv6Address(hostName):
            kind = IPv4Address if isIPAddress(hostName) else IPv6Address
            if (want4, want6)[kind is IPv6Address]:
                resolutionReceiver.addressResolved(kind("TCP", hostName, portNumber))
            resolutionReceiver.resolutionComplete()
            return resolution
        if want4:
            resolution._lookups.append(self.resolver.lookupAddress(hostName))
        if want6:
            resolution._lookups.append(self.resolver.lookupIPV6Address(hostName))

        def found(results):
            for ok, value in results:
                if not ok:
                    continue
                for answer in value[0]:
                    if answer.type == dns.A:
                        resolutionReceiver.addressResolved(
                            IPv4Address("TCP", answer.payload.dottedQuad(), portNumber)
                        )
                    elif answer.type == dns.AAAA:
                        address = socket.inet_ntop(
                            socket.AF_INET6, answer.payload.address
                        )
                        resolutionReceiver.addressResolved(
                            IPv6Address("TCP", address, portNumber)
                        )
            resolutionReceiver.resolutionComplete()

        DeferredList(resolution._lookups, consumeErrors=True).addCallback(found)
        return resolution


@implementer(IReactorPluggableNameResolver)
class _NameResolvingReactor:
    """
    A reactor whose C{nameResolver} is ours; everything else is delegated.
    L{HostnameEndpoint} takes its name resolver from its reactor.
    """

    def __init__(self, reactor: Any, nameResolver: Any) -> None:
        self._reactor = reactor
        self.nameResolver = nameResolver

    def installNameResolver(self, resolver: Any) -> Any:
        previous, self.nameResolver = self.nameResolver, resolver
        return previous

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)

