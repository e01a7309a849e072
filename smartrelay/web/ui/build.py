"""
Building the reports UI from the relay's configuration (C{service.py}
calls L{makeUiApp}).
"""

from twisted.internet.defer import Deferred

from smartrelay.auth import HashedPasswordChecker, PasswordFile
from smartrelay.dnscheck import DNSChecker
from smartrelay.web.queries import Queries
from smartrelay.web.ui.app import UiApp
from smartrelay.web.ui.domains import DomainChecks, sendingDomains
from smartrelay.web.ui.pages import RewrapSettings
from smartrelay.web.ui.sessions import Sessions

__all__ = ["makeUiApp"]

#: Seconds the DNS checks of one domain may take (two tries).
DNS_TIMEOUT = (1.0, 3.0)


def makeUiApp(config, reactor, queries: Queries, runInThread) -> UiApp:
    """
    The UI over C{queries} (the API's), its users from C{[web]
    users_file} checked in C{runInThread} (scrypt is slow), its sessions
    as C{[web] session_timeout} and C{session_lifetime} say.
    """
    web = config.web
    checker = None
    if web.users_file is not None:
        checker = HashedPasswordChecker(PasswordFile.load(web.users_file), runInThread)
    dns = _LazyDNSChecker(config, reactor)
    return UiApp(
        queries=queries,
        clock=reactor,
        checker=checker,
        sessions=Sessions(reactor, idle=web.session_timeout, lifetime=web.session_lifetime),
        trustedProxies=web.trusted_proxies,
        domains=DomainChecks(
            sendingDomains(config),
            run=dns.run,
            clock=reactor,
        ),
        rewrap=RewrapSettings.fromConfig(config),
    )


class _LazyDNSChecker:
    """
    The DNS checks with the resolver the relay would use, made at the
    first check (a resolver reads the system's configuration and keeps a
    timer to re-read it: nothing of that before the page is asked for).
    """

    def __init__(self, config, reactor) -> None:
        self.config = config
        self.reactor = reactor
        self.checker = None

    def run(self, domain: str) -> Deferred:
        if self.checker is None:
            from smartrelay.outbound.router import makeResolver

            servers = self.config.delivery.nameservers
            self.checker = DNSChecker(
                resolver=makeResolver(servers, self.reactor),
                config=self.config,
                timeout=DNS_TIMEOUT,
                nameservers=", ".join(f"{h}:{p}" for h, p in servers)
                or "the system's name servers",
            )
        return Deferred.fromCoroutine(self.checker.run(domain))
