"""
The Domains page's data: the C{check-dns} checks (L{smartrelay.dnscheck})
of every sending domain, run on demand and remembered for a while, so that
a page view does not query the DNS each time.
"""

from typing import Callable, Optional, Sequence

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from smartrelay.dnscheck import DNSUnavailable

__all__ = ["DomainChecks", "sendingDomains"]


def sendingDomains(config) -> tuple:
    """
    The domains the relay sends for: those with a C{[dkim:DOMAIN]}
    section, else the bounce domain (C{[feedback] bounce_domain} or the
    host name).
    """
    domains = sorted(config.dkim)
    if domains:
        return tuple(domains)
    return ((config.feedback.bounce_domain or config.relay.hostname).lower().rstrip("."),)


@attrs.frozen
class Result:
    """
    The checks of one domain: C{checks} (L{smartrelay.dnscheck.Check}s)
    or C{error} (the name servers did not answer), and when.
    """

    domain: str
    time: float
    checks: tuple = ()
    error: Optional[str] = None


@attrs.define
class DomainChecks:
    """
    @ivar domains: the sending domains.
    @ivar run: C{run(domain) -> Deferred[list[Check]]}; it fails with
        L{DNSUnavailable} when nobody answers.
    @ivar clock: an L{IReactorTime}.
    @ivar keep: seconds a result is shown before it is checked again.
    """

    domains: Sequence[str]
    run: Callable[[str], Deferred]
    clock: IReactorTime
    keep: float = 600.0
    _results: dict = attrs.field(factory=dict, init=False)
    _running: dict = attrs.field(factory=dict, init=False)

    log = Logger()

    async def result(self, domain: str, fresh: bool = False) -> Result:
        """
        The checks of C{domain}: remembered ones unless C{fresh} or too
        old; one run at a time per domain.
        """
        known = self._results.get(domain)
        now = self.clock.seconds()
        if known is not None and not fresh and now - known.time < self.keep:
            return known
        running = self._running.get(domain)
        if running is None:
            running = Deferred.fromCoroutine(self._check(domain))
            self._running[domain] = running
            running.addBoth(self._finished, domain)
        # Each waiter gets the result from a Deferred of its own.
        waiter: Deferred = Deferred()
        running.addBoth(lambda result: (waiter.callback(result), result)[1])
        return await waiter

    def _finished(self, result, domain: str):
        self._running.pop(domain, None)
        return result

    async def _check(self, domain: str) -> Result:
        try:
            checks = await self.run(domain)
        except DNSUnavailable as e:
            result = Result(domain, self.clock.seconds(), error=str(e))
        except Exception as e:
            self.log.failure("UI: the DNS checks of {domain} failed", domain=domain)
            result = Result(domain, self.clock.seconds(), error=f"the checks failed: {e}")
        else:
            result = Result(domain, self.clock.seconds(), checks=tuple(checks))
        self._results[domain] = result
        return result
