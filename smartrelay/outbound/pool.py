"""
Destinations: per-domain (or per-provider) queues, connection pools, rate
limits and adaptive throttles.

A L{Destination} is what limits apply to: a recipient domain, or a group
of domains whose mail exchangers belong to one provider
(C{[provider:google] mx_suffixes = google.com, googlemail.com}).  It holds
the jobs waiting for a connection, counts the sessions open to it, and
knows its L{Limits} and its L{Throttle}.  The delivery scheduler
(L{smartrelay.outbound.scheduler}) decides when a job may be handed to a
session; this module holds the state and the policy that those decisions
read.

L{Throttle} is the adaptive part: a C{421}, or a temporary reply matching
one of the configured "slow down" patterns, halves the destination's
connection and rate budget for a cool-down period; each quiet cool-down
period afterwards doubles it again until it is back to the configured
limits.
"""

import math
from collections import deque
from typing import Any, Optional

import attrs
from twisted.internet.defer import Deferred
from zope.interface import implementer

from smartrelay.outbound.interfaces import IConnector
from smartrelay.outbound.session import TLSPolicy, openSession

__all__ = [
    "Limits",
    "Throttle",
    "Destination",
    "DestinationPolicy",
    "Connector",
    "TLSContexts",
]

#: The smallest share of its configured budget a throttled destination
#: keeps (1/16: 20 connections → 1, 1,000/m → 62/m).
MIN_FACTOR = 1 / 16


@attrs.frozen
class Limits:
    """
    What a destination may use.

    @ivar maxConnections: sessions open at once.
    @ivar rate: messages per second, or L{None} for no limit.
    @ivar burst: the token bucket's capacity for C{rate}.
    @ivar messagesPerConnection: transactions per session before it is
        closed and a fresh one opened.
    @ivar tls: a L{TLSPolicy} name.
    """

    maxConnections: int = 20
    rate: Optional[float] = None
    burst: int = 1
    messagesPerConnection: int = 100
    tls: str = TLSPolicy.OPPORTUNISTIC


@attrs.define
class Throttle:
    """
    The adaptive part of a destination's budget.

    @ivar factor: the share of the configured limits in force (1 = all).
    @ivar until: when the current cool-down ends (clock seconds), or
        L{None} when not throttled.
    """

    clock: Any
    cooldown: float
    factor: float = 1.0
    until: Optional[float] = None
    lastReason: Optional[str] = None

    @property
    def throttled(self) -> bool:
        return self.factor < 1.0

    def trigger(self, reason: str) -> bool:
        """
        Halve the budget (down to L{MIN_FACTOR}) and start a cool-down.

        @return: whether the factor changed.
        """
        before = self.factor
        self.factor = max(MIN_FACTOR, self.factor / 2)
        self.until = self.clock.seconds() + self.cooldown
        self.lastReason = reason
        return self.factor != before

    def recover(self) -> bool:
        """
        One recovery step, when the cool-down is over: double the budget,
        up to the full configured limits, and start the next cool-down
        (if still below them).

        @return: whether the factor changed.
        """
        if self.until is None or self.clock.seconds() < self.until:
            return False
        before = self.factor
        self.factor = min(1.0, self.factor * 2)
        if self.factor < 1.0:
            self.until = self.clock.seconds() + self.cooldown
        else:
            self.until = None
            self.lastReason = None
        return self.factor != before


@attrs.define(eq=False)
class Destination:
    """
    The queue, sessions and budget of one destination.

    @ivar key: C{"example.com"} or C{"provider:google"}.
    @ivar limits: the configured L{Limits}.
    @ivar queue: jobs waiting for a session, oldest first.
    @ivar sessions: sessions open or being opened.
    @ivar established: sessions open (greeted, ready for transactions).
    @ivar idle: workers waiting for a job: C{(Deferred, session)}.
    @ivar tokens: rate tokens taken from the store and not used yet.
    """

    key: str
    limits: Limits
    throttle: Throttle
    queue: deque = attrs.field(factory=deque)
    sessions: int = 0
    established: int = 0
    busy: int = 0
    idle: list = attrs.field(factory=list)
    tokens: int = 0
    fetchingToken: bool = False
    tokenTimer: Any = None
    recoveryTimer: Any = None
    lastUsed: float = 0.0
    served: int = 0
    deadUntil: float = 0.0
    deadVerdict: Any = None
    #: A cluster-wide connection slot is being asked for.
    acquiring: bool = False
    #: Asks again for a slot that was refused.
    leaseTimer: Any = None

    @property
    def maxConnections(self) -> int:
        """
        The connection limit in force (the configured one, throttled).
        """
        return max(1, math.floor(self.limits.maxConnections * self.throttle.factor))

    @property
    def rate(self) -> Optional[float]:
        """
        The rate in force (messages per second), or L{None}.
        """
        if self.limits.rate is None:
            return None
        return self.limits.rate * self.throttle.factor

    @property
    def burst(self) -> int:
        return max(1, math.floor(self.limits.burst * self.throttle.factor))

    def state(self) -> dict:
        """
        A snapshot for the API, the UI and C{/metrics}.
        """
        return {
            "destination": self.key,
            "queued": sum(len(job.addresses) for job in self.queue),
            "connections": self.sessions,
            "busy": self.busy,
            "max_connections": self.maxConnections,
            "configured_max_connections": self.limits.maxConnections,
            "rate": self.rate,
            "configured_rate": self.limits.rate,
            "throttled": self.throttle.throttled,
            "throttle_factor": self.throttle.factor,
            "throttle_until": self.throttle.until,
            "throttle_reason": self.throttle.lastReason,
        }


def _suffixMatch(host: str, suffix: str) -> bool:
    return host == suffix or host.endswith("." + suffix)


@attrs.frozen
class DestinationPolicy:
    """
    Maps a routed domain to its destination key and L{Limits}, from the
    C{[delivery]}, C{[domain:...]} and C{[provider:...]} configuration.

    In order: a domain with a section of its own is its own destination;
    mail routed to a relay (the smarthost) is one destination per relay;
    a domain whose MX host names end with a provider's suffix belongs to
    that provider (the longest matching suffix wins); any other domain is
    its own destination with the C{[delivery]} defaults.

    @ivar defaults: L{Limits} for domains without a section of their own.
    @ivar domains: domain name → overrides (a mapping of L{Limits} field
        names to values; missing or L{None} values inherit C{defaults}).
    @ivar providers: C{(key, suffixes, overrides)} triples.
    """

    defaults: Limits = attrs.field(factory=Limits)
    domains: dict = attrs.field(factory=dict)
    providers: tuple = ()

    @classmethod
    def fromConfig(cls, config: Any) -> "DestinationPolicy":
        """
        Build the policy from a L{smartrelay.config.Config}.
        """
        delivery = config.delivery
        defaults = Limits(
            maxConnections=delivery.max_connections_per_domain,
            messagesPerConnection=delivery.messages_per_connection,
            tls=delivery.tls,
        )

        def overrides(section: Any) -> dict:
            values = {
                "maxConnections": section.max_connections,
                "messagesPerConnection": section.messages_per_connection,
                "tls": section.tls,
            }
            if section.rate is not None:
                values["rate"] = section.rate.perSecond
                values["burst"] = section.rate.burst
            return values

        return cls(
            defaults=defaults,
            domains={name: overrides(s) for name, s in config.domains.items()},
            providers=tuple(
                (f"provider:{name}", tuple(s.mx_suffixes), overrides(s))
                for name, s in config.providers.items()
            ),
        )

    def _limits(self, values: dict) -> Limits:
        return attrs.evolve(
            self.defaults, **{k: v for k, v in values.items() if v is not None}
        )

    def lookup(self, domain: str, hops: list) -> tuple:
        """
        @return: C{(key, Limits)} for mail to C{domain} routed to C{hops}.
        """
        domain = domain.lower()
        if domain in self.domains:
            return domain, self._limits(self.domains[domain])
        if hops and all(hop.relay for hop in hops):
            return "relay:" + ",".join(sorted(hop.name for hop in hops)), self.defaults
        hostNames = [hop.name.lower().rstrip(".") for hop in hops]
        best, bestLength = None, 0
        for key, suffixes, values in self.providers:
            for suffix in suffixes:
                if len(suffix) > bestLength and any(_suffixMatch(h, suffix) for h in hostNames):
                    best, bestLength = (key, values), len(suffix)
        if best is not None:
            return best[0], self._limits(best[1])
        return domain, self.defaults


class TLSContexts:
    """
    Client TLS contexts for the TLS policies, built once and cached.

    @param caCertificates: PEM file of the CAs that C{verify} trusts, or
        L{None} for the platform's trust store.
    """

    def __init__(self, caCertificates: Optional[str] = None) -> None:
        self.caCertificates = caCertificates
        self._opportunistic: Any = None
        self._verifying: dict = {}
        self._trustRoot: Any = None

    def contextFor(self, policy: str, host: Optional[str]) -> Any:
        """
        The context for C{policy} at C{host} (the name the certificate
        must carry, for C{verify}), or L{None} for L{TLSPolicy.NONE}.
        """
        if policy == TLSPolicy.NONE:
            return None
        if policy == TLSPolicy.VERIFY and host:
            context = self._verifying.get(host)
            if context is None:
                from twisted.internet.ssl import optionsForClientTLS

                context = optionsForClientTLS(host, trustRoot=self._trust())
                self._verifying[host] = context
            return context
        if self._opportunistic is None:
            from twisted.internet.ssl import CertificateOptions

            self._opportunistic = CertificateOptions(verify=False)
        return self._opportunistic

    def _trust(self) -> Any:
        if self._trustRoot is None:
            from twisted.internet import ssl

            if self.caCertificates is None:
                self._trustRoot = ssl.platformTrust()
            else:
                with open(self.caCertificates, "rb") as f:
                    pem = f.read()
                certificates = [
                    ssl.Certificate.loadPEM(block)
                    for block in _pemBlocks(pem)
                ]
                self._trustRoot = ssl.trustRootFromCertificates(certificates)
        return self._trustRoot


def _pemBlocks(pem: bytes) -> list:
    end = b"-----END CERTIFICATE-----"
    blocks = []
    for chunk in pem.split(end)[:-1]:
        start = chunk.find(b"-----BEGIN CERTIFICATE-----")
        if start >= 0:
            blocks.append(chunk[start:] + end + b"\n")
    return blocks


@implementer(IConnector)
@attrs.define
class Connector:
    """
    Opens outbound sessions: C{open(hop, tlsPolicy) → Deferred[OpenResult]}.
    """

    clock: Any
    heloName: str
    timeout: float
    contexts: TLSContexts = attrs.field(factory=TLSContexts)

    def open(self, hop: Any, tlsPolicy: str) -> Deferred:
        context = self.contexts.contextFor(tlsPolicy, getattr(hop, "host", None) or hop.name)
        return openSession(self.clock, hop, self.heloName, self.timeout, tlsPolicy, context)
