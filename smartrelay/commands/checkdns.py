"""
C{smartrelay check-dns DOMAIN [--config FILE] [--json] [--timeout S]}:
the DNS checks of L{smartrelay.dnscheck}, as a checklist or as JSON.
"""

import argparse
import json

from smartrelay.commands.base import PROG, CommandError, Console, UsageError, dkimNameProblem
from smartrelay.commands.common import readConfig, runOnReactor
from smartrelay.dnscheck import FAIL, DNSChecker, DNSUnavailable, formatChecks


def _timeouts(total: float) -> tuple:
    """
    Per-try timeouts adding up to C{total}: a quick try, then a longer one
    (a lost UDP packet costs one try, not the whole wait).
    """
    if total >= 2:
        return (1.0, total - 1.0)
    return (total,)


async def runChecks(reactor, config, domain: str, timeout: float) -> list:
    """
    The checks for C{domain} with the resolver the relay would use.

    @raise CommandError: the name servers do not answer.
    """
    from smartrelay.outbound.router import makeResolver

    servers = config.delivery.nameservers
    described = ", ".join(f"{h}:{p}" for h, p in servers) or "the system's name servers"
    checker = DNSChecker(
        resolver=makeResolver(servers, reactor),
        config=config,
        timeout=_timeouts(timeout),
        nameservers=described,
    )
    try:
        return await checker.run(domain)
    except DNSUnavailable as e:
        raise CommandError(str(e)) from None


def checkDNS(options: argparse.Namespace, console: Console) -> int:
    """
    Run the checks; exit status 0 when none failed, 1 when one did (or
    the name servers did not answer), 2 for a bad domain or configuration.
    """
    command = f"{PROG} check-dns"
    domain = options.domain.lower()
    if domain.endswith(".") and len(domain) > 1:
        domain = domain[:-1]
    problem = dkimNameProblem(domain, "domain")
    if problem is not None:
        raise UsageError(f"{command}: {problem}")
    if not options.timeout > 0:
        raise UsageError(f"{command}: --timeout must be more than 0 seconds")
    config = readConfig(options.config, command)
    checks = runOnReactor(lambda reactor: runChecks(reactor, config, domain, options.timeout))
    if options.json:
        document = {
            "domain": domain,
            "ok": not any(c.status == FAIL for c in checks),
            "checks": [c.asJSON() for c in checks],
        }
        console.stdout.write(json.dumps(document, indent=2) + "\n")
    else:
        console.stdout.write(formatChecks(domain, checks))
    return 1 if any(c.status == FAIL for c in checks) else 0


def register(commands) -> None:
    p = commands.add_parser(
        "check-dns",
        help="check a sending domain's SPF, DKIM, DMARC, MX and tracking host",
        description=(
            "Check the DNS records mail from DOMAIN needs: SPF of the "
            "envelope sender's domain covers the sending addresses, each "
            "DKIM key of [dkim:DOMAIN] is published, DMARC is present and "
            "aligned, the bounce domain has an MX, the tracking host "
            "resolves.  Prints the record to publish for what is missing.  "
            "Asks [delivery] nameservers when set.  Needs no running relay."
        ),
    )
    p.add_argument("domain", metavar="DOMAIN", help="the From: domain of the mail")
    p.add_argument("--config", metavar="FILE", help="the relay's configuration (default: built-in defaults)")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS",
                   help="how long to wait for each DNS answer (default 5)")
    p.set_defaults(run=checkDNS)
