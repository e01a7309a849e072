"""
C{smartrelay check-dns DOMAIN}: is the DNS of a sending domain ready for
the relay's mail?

Five or six checks, each read from the DNS through L{twisted.names} (the
C{[delivery] nameservers} when set, as the relay itself asks):

  - C{spf}: the envelope sender's domain (C{[feedback] bounce_domain}, else
    the C{[smartrelay] hostname}: the VERP return path) has one SPF record,
    and it lets the relay's sending addresses send: the smarthost's
    addresses when C{[delivery] smarthost} is set, else C{[delivery]
    bind_address}; without either, which address sends cannot be known
    offline and the check only warns.
  - C{dkim}: for each key of the C{[dkim:DOMAIN]} section, the TXT record
    at C{SELECTOR._domainkey.DOMAIN} publishes that key's public half.
  - C{dmarc}: C{_dmarc.DOMAIN} (or that of a parent domain) has a
    C{v=DMARC1} record with a policy, and the mail can pass it: DKIM
    aligned (signed for DOMAIN) or SPF aligned (the bounce domain in
    DOMAIN, as C{aspf} asks).
  - C{mx}: the bounce domain has an MX (bounces and complaints come back
    there, to the feedback listener).
  - C{tracking}: the host of C{[tracking] base_url} resolves (recipients'
    mail clients open the tracking and unsubscribe links there).
  - C{ptr}, when mail leaves from C{[delivery] bind_address} straight to
    the MX hosts: the address's reverse DNS name resolves back to it, and
    is the EHLO name (C{[smartrelay] hostname}).

Each check gives a L{Check}: its status (L{OK}, L{WARN} or L{FAIL}), a
sentence, and, when something is missing, the record to publish.  No
answer from the name servers at all stops the run with L{DNSUnavailable}.
"""

import ipaddress
import socket
from typing import Any, Optional, Sequence
from urllib.parse import urlsplit

import attrs
from twisted.names import dns, error

from smartrelay.engine.dkim import publicRecord, txtRecordStrings

__all__ = [
    "OK",
    "WARN",
    "FAIL",
    "Check",
    "DNSUnavailable",
    "DNSChecker",
    "sendingHosts",
    "smarthostHost",
]

OK, WARN, FAIL = "ok", "warn", "fail"

#: RFC 7208 4.6.4: at most 10 mechanisms and modifiers that query the DNS.
SPF_LOOKUP_LIMIT = 10


@attrs.frozen
class Check:
    """
    The outcome of one check.

    @ivar check: C{spf}, C{dkim}, C{dmarc}, C{mx}, C{tracking} or C{ptr}.
    @ivar name: the DNS name that was looked at.
    @ivar status: L{OK}, L{WARN} or L{FAIL}.
    @ivar message: one sentence saying what was found.
    @ivar publish: the record to add or change, in zone-file syntax, or
        L{None}.
    """

    check: str
    name: str
    status: str
    message: str
    publish: Optional[str] = None

    def asJSON(self) -> dict:
        return attrs.asdict(self)


class DNSUnavailable(Exception):
    """
    The name servers did not answer (timed out, or refused): no check can
    be trusted.
    """


class _LookupFailed(Exception):
    """
    The name server answered an error (SERVFAIL, REFUSED, ...) for one name.
    """

    def __init__(self, name: str, why: str) -> None:
        super().__init__(f"the name server answered {why} for {name}")
        self.name = name


class _SPFError(Exception):
    """
    An SPF record that receivers would answer with C{permerror}.
    """


def smarthostHost(endpoint: str) -> Optional[str]:
    """
    The host name or address in a client endpoint string (C{tcp:HOST:PORT},
    C{tcp:host=HOST:port=PORT}, C{tls:...}), or L{None} (C{unix:...}).
    """
    parts = []
    current = ""
    escaped = False
    for char in endpoint:
        if escaped:
            current += char
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ":":
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    kind, rest = parts[0].lower(), parts[1:]
    if kind in ("unix",):
        return None
    positional = [p for p in rest if "=" not in p]
    named = dict(p.split("=", 1) for p in rest if "=" in p)
    host = named.get("host") or (positional[0] if positional else None)
    return host or None


def sendingHosts(config) -> tuple[list[str], str]:
    """
    What SPF must let send, and where that comes from.

    @return: C{(hosts, source)}: host names or addresses (empty when they
        cannot be known offline) and a phrase naming the setting.
    """
    delivery = config.delivery
    if delivery.smarthost is not None:
        host = smarthostHost(delivery.smarthost)
        if host is not None:
            return [host], "[delivery] smarthost"
    if delivery.bind_address is not None:
        return [delivery.bind_address], "[delivery] bind_address"
    return [], ""


def _isAddress(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _tags(record: str) -> dict[str, str]:
    """
    The C{tag=value} pairs of a DKIM or DMARC record (lower-case tags,
    values stripped).
    """
    tags = {}
    for part in record.split(";"):
        tag, equals, value = part.partition("=")
        if equals:
            tags.setdefault(tag.strip().lower(), value.strip())
    return tags


def _zoneTXT(name: str, value: str) -> str:
    """
    A TXT record in zone-file syntax, cut into strings of 255 characters.
    """
    strings = " ".join('"' + part.replace('"', '\\"') + '"' for part in txtRecordStrings(value))
    if len(value) > 255:
        return f"{name}. IN TXT ( {strings} )"
    return f"{name}. IN TXT {strings}"


def _aligned(domain: str, other: str, mode: str, organization: Optional[str] = None) -> bool:
    """
    Is C{other} aligned with C{domain} (RFC 7489 3.1): the same name, or,
    relaxed (C{mode} C{r}), in the same organizational domain.  Without a
    public suffix list, that is C{organization} (the parent whose DMARC
    record applies) when given, else one of the two names being a
    subdomain of the other.
    """
    domain, other = domain.lower(), other.lower()
    if domain == other:
        return True
    if mode == "s":
        return False

    def within(name: str, parent: str) -> bool:
        return name == parent or name.endswith("." + parent)

    if organization is not None and within(domain, organization) and within(other, organization):
        return True
    return within(other, domain) or within(domain, other)


@attrs.define
class DNSChecker:
    """
    Runs the checks for one domain.

    @ivar resolver: a L{twisted.names} C{IResolver}.
    @ivar config: the relay's L{smartrelay.config.Config}.
    @ivar timeout: the per-query retry timeouts, in seconds.
    @ivar nameservers: the name servers, for messages (C{"host:port"}, or
        C{"the system's"}).
    """

    resolver: Any
    config: Any
    timeout: Sequence[float] = (1.0, 3.0)
    nameservers: str = "the system's name servers"

    # -- lookups -----------------------------------------------------------

    async def _query(self, method: str, name: str, wanted: int) -> Optional[list]:
        """
        The payloads of the records of type C{wanted} at C{name}: L{None}
        when the name does not exist, C{[]} when it has none of that type.

        @raise DNSUnavailable: no answer.
        @raise error.DNSServerError: the server failed for this name.
        """
        try:
            answers, authority, additional = await getattr(self.resolver, method)(
                name, timeout=tuple(self.timeout)
            )
        except error.DNSServerError:
            raise _LookupFailed(name, "SERVFAIL") from None
        except error.DNSQueryRefusedError:
            raise _LookupFailed(name, "REFUSED") from None
        except (error.DNSFormatError, error.DNSNotImplementedError, error.DNSUnknownError) as e:
            raise _LookupFailed(name, type(e).__name__) from None
        except (error.DomainError, error.AuthoritativeDomainError):
            # NXDOMAIN (DNSNameError), or no such name in /etc/hosts.
            return None
        except (error.DNSQueryTimeoutError, error.TimeoutError, ConnectionError, OSError) as e:
            raise DNSUnavailable(
                f"no answer from {self.nameservers} for {name} "
                f"({type(e).__name__}): is the name server running and reachable?"
            ) from None
        return [a.payload for a in answers if a.type == wanted]

    async def _txt(self, name: str) -> Optional[list[str]]:
        """
        The TXT records at C{name}, each one string (its strings joined).
        """
        records = await self._query("lookupText", name, dns.TXT)
        if records is None:
            return None
        return [b"".join(r.data).decode("utf-8", "replace") for r in records]

    async def _addresses(self, host: str) -> list[str]:
        """
        The IPv4 and IPv6 addresses of C{host} (C{host} itself if it is an
        address).
        """
        if _isAddress(host):
            return [str(ipaddress.ip_address(host))]
        found = []
        for record in await self._query("lookupAddress", host, dns.A) or []:
            found.append(record.dottedQuad())
        for record in await self._query("lookupIPV6Address", host, dns.AAAA) or []:
            found.append(socket.inet_ntop(socket.AF_INET6, record.address))
        return found

    async def _mx(self, domain: str) -> Optional[list[tuple[int, str]]]:
        records = await self._query("lookupMailExchange", domain, dns.MX)
        if records is None:
            return None
        return sorted((r.preference, r.name.name.decode("ascii").rstrip(".")) for r in records)

    # -- the checks ----------------------------------------------------------

    async def run(self, domain: str) -> list[Check]:
        """
        Every check for the From domain C{domain}, in order.

        @raise DNSUnavailable: the name servers do not answer.
        """
        steps = [
            ("spf", self.bounceDomain(), lambda: self.checkSPF(domain)),
            ("dkim", f"_domainkey.{domain}", lambda: self.checkDKIM(domain)),
            ("dmarc", f"_dmarc.{domain}", lambda: self.checkDMARC(domain)),
            ("mx", self.bounceDomain(), self.checkMX),
            ("tracking", urlsplit(self.config.tracking.base_url).hostname or "", self.checkTracking),
            ("ptr", "", self.checkPTR),
        ]
        checks: list[Check] = []
        for check, name, step in steps:
            try:
                result = await step()
            except _LookupFailed as e:
                checks.append(Check(check, e.name, FAIL, str(e)))
                continue
            if isinstance(result, list):
                checks.extend(result)
            elif result is not None:
                checks.append(result)
        return checks

    def bounceDomain(self) -> str:
        relay, feedback = self.config.relay, self.config.feedback
        return (feedback.bounce_domain or relay.hostname).lower().rstrip(".")

    async def _spfRecord(self, domain: str) -> Optional[str]:
        """
        The one SPF record of C{domain}, or L{None}.

        @raise _SPFError: several.
        """
        records = [
            r for r in await self._txt(domain) or []
            if r.lower() == "v=spf1" or r.lower().startswith("v=spf1 ")
        ]
        if len(records) > 1:
            raise _SPFError(f"{domain} has {len(records)} SPF records; receivers need exactly one")
        return records[0] if records else None

    async def spfResult(self, domain: str, address: str, budget: list) -> tuple[str, str]:
        """
        What SPF says of mail from C{address} for C{domain} (RFC 7208,
        without macros, C{ptr} or C{exists}, which are skipped).

        @param budget: C{[n]}, the DNS-querying terms still allowed.
        @return: C{(result, term)}: C{pass}, C{fail}, C{softfail},
            C{neutral} or C{none}, and the term that decided (or C{""}).
        @raise _SPFError: a record receivers would reject as C{permerror}.
        """
        record = await self._spfRecord(domain)
        if record is None:
            return "none", ""
        ip = ipaddress.ip_address(address)
        results = {"+": "pass", "-": "fail", "~": "softfail", "?": "neutral"}
        redirect = None

        def spend(term: str) -> None:
            budget[0] -= 1
            if budget[0] < 0:
                raise _SPFError(
                    f"more than {SPF_LOOKUP_LIMIT} DNS lookups (at {term!r} in {domain})"
                )

        for term in record.split()[1:]:
            if term.lower().startswith("redirect="):
                redirect = term.split("=", 1)[1]
                continue
            if "=" in term.split(":")[0]:
                continue  # another modifier (exp=...)
            qualifier = term[0] if term[0] in results else "+"
            mechanism = term[1:] if term[0] in results else term
            name, _, argument = mechanism.partition(":")
            name = name.lower()
            if "%" in argument:
                continue  # macros: cannot be judged without a message
            matched = False
            if name == "all":
                matched = True
            elif name in ("ip4", "ip6"):
                try:
                    network = ipaddress.ip_network(argument, strict=False)
                except ValueError:
                    raise _SPFError(f"bad {name} term {term!r} in {domain}") from None
                matched = ip.version == network.version and ip in network
            elif name.split("/")[0] in ("a", "mx"):
                spend(term)
                base = name.split("/")[0]
                target, prefixes = (argument or domain), ""
                if "/" in name:
                    prefixes = name[len(base):]
                elif "/" in target:
                    target, _, rest = target.partition("/")
                    prefixes = "/" + rest
                cidr4, _, cidr6 = prefixes.lstrip("/").partition("//")
                if base == "a":
                    hosts = [target]
                else:
                    hosts = [h for _, h in (await self._mx(target) or [])][:10]
                for host in hosts:
                    for candidate in await self._addresses(host):
                        candidate = ipaddress.ip_address(candidate)
                        if candidate.version != ip.version:
                            continue
                        length = cidr4 if ip.version == 4 else cidr6
                        network = ipaddress.ip_network(
                            f"{candidate}/{length or candidate.max_prefixlen}", strict=False
                        )
                        if ip in network:
                            matched = True
            elif name == "include":
                spend(term)
                result, _ = await self.spfResult(argument, address, budget)
                if result == "none":
                    raise _SPFError(f"{term!r} in {domain}: {argument} has no SPF record")
                matched = result == "pass"
            elif name in ("ptr", "exists"):
                spend(term)
                continue
            else:
                raise _SPFError(f"unknown SPF term {term!r} in {domain}")
            if matched:
                return results[qualifier], term
        if redirect is not None:
            spend("redirect=" + redirect)
            result, term = await self.spfResult(redirect, address, budget)
            if result == "none":
                raise _SPFError(f"redirect={redirect} in {domain}: no SPF record there")
            return result, term
        return "neutral", ""

    async def checkSPF(self, domain: str) -> Check:
        envelope = self.bounceDomain()
        hosts, source = sendingHosts(self.config)
        where = f"SPF of {envelope} (the envelope sender's domain)"
        try:
            record = await self._spfRecord(envelope)
        except _SPFError as e:
            return Check("spf", envelope, FAIL, str(e))
        terms = []
        for host in hosts:
            if _isAddress(host):
                terms.append(f"ip{ipaddress.ip_address(host).version}:{host}")
            else:
                terms.append(f"a:{host}")
        if record is None:
            suggested = " ".join(["v=spf1"] + (terms or ["ip4:<the relay's public IPv4 address>"]) + ["~all"])
            return Check("spf", envelope, FAIL, f"{where}: no SPF record",
                         _zoneTXT(envelope, suggested))
        if not hosts:
            return Check(
                "spf", envelope, WARN,
                f"{where}: {record!r}; which address sends cannot be known offline "
                "(set [delivery] bind_address, or check that the record covers "
                "this host's public address)",
            )
        failures = []
        for host in hosts:
            addresses = await self._addresses(host)
            if not addresses:
                failures.append(f"{host} ({source}) does not resolve")
            for address in addresses:
                try:
                    result, term = await self.spfResult(envelope, address, [SPF_LOOKUP_LIMIT])
                except _SPFError as e:
                    return Check("spf", envelope, FAIL, f"{where}: {e}")
                if result != "pass":
                    failures.append(f"{address} ({source} {host}) gets {result}"
                                    + (f" from {term!r}" if term else ""))
        if failures:
            words = record.split()
            allAt = next((i for i, w in enumerate(words) if w.lstrip("+-~?").lower() == "all"
                          or w.lower().startswith("redirect=")), len(words))
            suggested = " ".join(words[:allAt] + terms + words[allAt:])
            return Check("spf", envelope, FAIL, f"{where}: " + "; ".join(failures),
                         _zoneTXT(envelope, suggested))
        return Check("spf", envelope, OK,
                     f"{where} lets {', '.join(hosts)} ({source}) send")

    async def checkDKIM(self, domain: str) -> list[Check]:
        section = self.config.dkim.get(domain)
        if section is None:
            return [Check(
                "dkim", f"_domainkey.{domain}", FAIL,
                f"no [dkim:{domain}] section: mail from {domain} is not signed "
                f"(make a key with: smartrelay dkim-keygen {domain} SELECTOR)",
            )]
        checks = []
        for algorithm, selector, path in section.signingKeys():
            name = f"{selector}._domainkey.{domain}"
            try:
                with open(path, "rb") as f:
                    expected = publicRecord(f.read())
            except (OSError, ValueError) as e:
                checks.append(Check("dkim", name, FAIL,
                                    f"cannot read the key {path}: {getattr(e, 'strerror', None) or e}"))
                continue
            wanted = _tags(expected)
            publish = _zoneTXT(name, expected)
            records = await self._txt(name)
            keys = [_tags(r) for r in records or [] if "p" in _tags(r)]
            if not keys:
                checks.append(Check("dkim", name, FAIL, f"{name}: no DKIM key record", publish))
                continue
            published = ["".join(k["p"].split()) for k in keys]
            if wanted["p"] in published:
                k = keys[published.index(wanted["p"])]
                if k.get("k", "rsa").lower() != wanted["k"]:
                    checks.append(Check("dkim", name, FAIL,
                                        f"{name}: the key is published with k={k.get('k', 'rsa')}, "
                                        f"expected k={wanted['k']}", publish))
                else:
                    checks.append(Check("dkim", name, OK,
                                        f"{name} publishes the {algorithm} key {path}"))
            elif "" in published:
                checks.append(Check("dkim", name, FAIL, f"{name}: the key is revoked (p= is empty)",
                                    publish))
            else:
                checks.append(Check("dkim", name, FAIL,
                                    f"{name}: the published key is not the one in {path}", publish))
        return checks

    async def checkDMARC(self, domain: str) -> Check:
        labels = domain.split(".")
        found = None
        for start in range(0, max(1, len(labels) - 1)):
            name = "_dmarc." + ".".join(labels[start:])
            records = [r for r in await self._txt(name) or []
                       if r.replace(" ", "").lower().startswith("v=dmarc1")]
            if records:
                found = name, records
                break
        name = f"_dmarc.{domain}"
        publish = _zoneTXT(name, f"v=DMARC1; p=none; rua=mailto:postmaster@{domain}")
        if found is None:
            return Check("dmarc", name, FAIL, f"{name}: no DMARC record", publish)
        name, records = found
        if len(records) > 1:
            return Check("dmarc", name, FAIL,
                         f"{name} has {len(records)} DMARC records; receivers ignore them all")
        tags = _tags(records[0])
        policy = tags.get("p", "").lower()
        if name != f"_dmarc.{domain}":
            policy = tags.get("sp", policy).lower()
        if policy not in ("none", "quarantine", "reject"):
            return Check("dmarc", name, FAIL, f"{name}: no valid policy (p=) in {records[0]!r}",
                         publish)
        dkimAligned = domain in self.config.dkim and _aligned(
            domain, domain, tags.get("adkim", "r").lower())
        bounce = self.bounceDomain()
        organization = name[len("_dmarc."):] if name != f"_dmarc.{domain}" else None
        spfAligned = _aligned(domain, bounce, tags.get("aspf", "r").lower(), organization)
        aligned = []
        if dkimAligned:
            aligned.append(f"DKIM (d={domain})")
        if spfAligned:
            aligned.append(f"SPF (bounce domain {bounce})")
        if not aligned:
            return Check(
                "dmarc", name, FAIL,
                f"{name}: p={policy}, but neither DKIM (no [dkim:{domain}] section) nor SPF "
                f"(bounce domain {bounce}, aspf={tags.get('aspf', 'r')}) is aligned with {domain}",
            )
        note = "; p=none only reports" if policy == "none" else ""
        return Check("dmarc", name, OK, f"{name}: p={policy}, aligned by {' and '.join(aligned)}{note}")

    async def checkMX(self) -> Check:
        bounce = self.bounceDomain()
        hostname = self.config.relay.hostname
        publish = f"{bounce}. IN MX 10 {hostname}."
        exchangers = await self._mx(bounce)
        if not exchangers:
            return Check("mx", bounce, FAIL,
                         f"{bounce} (the bounce domain) has no MX: bounces and complaints "
                         "cannot come back", publish)
        if exchangers == [(0, "")]:
            return Check("mx", bounce, FAIL,
                         f"{bounce} (the bounce domain) has a null MX: it takes no mail", publish)
        hosts = ", ".join(f"{preference} {host}" for preference, host in exchangers)
        return Check("mx", bounce, OK, f"{bounce} (the bounce domain) has MX {hosts}")

    async def checkPTR(self) -> Optional[Check]:
        """
        Reverse DNS of the address mail leaves from (C{[delivery]
        bind_address}, when mail goes to the MX hosts directly): a name
        that resolves back to the address (forward-confirmed, which Gmail
        and Yahoo require), best the C{[smartrelay] hostname} the relay
        says in EHLO.  L{None} when the address is not known (a smarthost
        sends for the relay, or no bind address is set).
        """
        delivery = self.config.delivery
        if delivery.smarthost is not None or delivery.bind_address is None:
            return None
        address = str(ipaddress.ip_address(delivery.bind_address))
        reverse = ipaddress.ip_address(address).reverse_pointer
        hostname = self.config.relay.hostname.lower().rstrip(".")
        publish = f"{reverse}. IN PTR {hostname}.  (set by whoever runs {address}: ask them)"
        records = await self._query("lookupPointer", reverse, dns.PTR) or []
        names = [r.name.name.decode("ascii").rstrip(".").lower() for r in records]
        if not names:
            return Check("ptr", reverse, FAIL,
                         f"{address} ([delivery] bind_address) has no reverse DNS name", publish)
        confirmed = []
        for name in names:
            if address in await self._addresses(name):
                confirmed.append(name)
        if not confirmed:
            return Check("ptr", reverse, FAIL,
                         f"{address} is {', '.join(names)}, which does not resolve back to "
                         f"{address}", f"{names[0]}. IN A {address}" if ipaddress.ip_address(
                             address).version == 4 else f"{names[0]}. IN AAAA {address}")
        if hostname not in confirmed:
            return Check("ptr", reverse, WARN,
                         f"{address} is {confirmed[0]} (forward-confirmed), but the relay says "
                         f"EHLO {hostname}: set [smartrelay] hostname = {confirmed[0]}")
        return Check("ptr", reverse, OK, f"{address} is {hostname}, forward-confirmed")

    async def checkTracking(self) -> Check:
        url = self.config.tracking.base_url
        host = urlsplit(url).hostname or ""
        publish = f"{host}. IN A <the web server's public address>"
        addresses = await self._addresses(host)
        if not addresses:
            return Check("tracking", host, FAIL,
                         f"{host} ([tracking] base_url {url}) does not resolve", publish)
        private = [a for a in addresses
                   if not ipaddress.ip_address(a).is_global]
        if private:
            return Check("tracking", host, WARN,
                         f"{host} ([tracking] base_url {url}) is {', '.join(private)}: "
                         "recipients on the Internet cannot reach that", publish)
        return Check("tracking", host, OK, f"{host} ([tracking] base_url) is {', '.join(addresses)}")


def formatChecks(domain: str, checks: Sequence[Check]) -> str:
    """
    The checklist for a terminal: one line per check, the record to
    publish under a failed one, and a summary line.
    """
    lines = [f"DNS of {domain}:"]
    for check in checks:
        lines.append(f"  {check.status.upper():<4}  {check.check:<8}  {check.message}")
        if check.publish is not None and check.status != OK:
            lines.append(f"        publish: {check.publish}")
    failed = sum(1 for c in checks if c.status == FAIL)
    warned = sum(1 for c in checks if c.status == WARN)
    if failed:
        lines.append(f"{failed} of {len(checks)} checks failed")
    else:
        lines.append(f"all {len(checks)} checks passed" + (f" ({warned} with a warning)" if warned else ""))
    return "\n".join(lines) + "\n"
