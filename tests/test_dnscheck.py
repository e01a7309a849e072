"""
Tests for L{smartrelay.dnscheck} and C{smartrelay check-dns}, against a
real DNS server on loopback (L{tests.dnsserver.DNSServer}) with the real
reactor; the command line itself runs in a child process.
"""

import json
import os
import sys

from hypothesis import given
from hypothesis import strategies as st

from twisted.internet import defer, reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.names import error as _dnserror
from twisted.trial.unittest import SynchronousTestCase, TestCase

from smartrelay.commands.checkdns import runChecks
from smartrelay.config import parseConfig
from smartrelay.dnscheck import FAIL, OK, WARN, Check, formatChecks, smarthostHost
from smartrelay.engine.dkim import generateKey
from tests.dnsserver import DNSServer

#: A public-looking address: answers of the test zone only, never contacted.
PUBLIC = "5.9.10.11"
OTHER = "5.9.10.99"


_KEYS: dict = {}


def _keys(algorithm: str) -> tuple:
    """
    One key per algorithm for every test (a 2048-bit RSA key, whose
    record is more than one TXT string).
    """
    if algorithm not in _KEYS:
        _KEYS[algorithm] = generateKey(algorithm, 2048)
    return _KEYS[algorithm]


class SmarthostHostTests(SynchronousTestCase):
    """
    L{smarthostHost} finds the host in a client endpoint string.
    """

    def test_forms(self) -> None:
        """
        Positional, named and escaped hosts are found; unix sockets have none.
        """
        self.assertEqual(smarthostHost("tcp:smtp.example.net:587"), "smtp.example.net")
        self.assertEqual(smarthostHost("tcp:host=smtp.example.net:port=25"), "smtp.example.net")
        self.assertEqual(smarthostHost("tls:host=smtp.example.net:port=465"), "smtp.example.net")
        self.assertEqual(smarthostHost(r"tcp:host=\:\:1:port=25"), "::1")
        self.assertIsNone(smarthostHost("unix:/run/smtp.sock"))


class _ZoneResolver:
    """
    An in-memory C{IResolver} for the SPF evaluator: TXT records by name,
    and every other name is NXDOMAIN; answers at once.
    """

    def __init__(self, txt: dict) -> None:
        self.txt = txt

    def _answer(self, name, records):
        from twisted.names import dns as _dns

        if name not in records:
            return defer.fail(_dnserror.DNSNameError(name))
        return defer.succeed(([_dns.RRHeader(name=name, type=_dns.TXT, payload=_dns.Record_TXT(
            r.encode())) for r in records[name]], [], []))

    def lookupText(self, name, timeout=None):
        return self._answer(name, self.txt)

    def lookupAddress(self, name, timeout=None):
        return self._answer(name, {})

    lookupIPV6Address = lookupMailExchange = lookupAddress


_SPF_TERMS = st.sampled_from([
    "all", "-all", "~all", "?all", "+all", "ip4:5.9.10.0/24", "ip4:5.9.10.11", "ip6:2001:db8::/32",
    "a", "mx", "a:x.test", "mx:x.test/24", "a/24//64", "include:inc.test", "include:none.test",
    "redirect=inc.test", "exp=explain.test", "ptr", "exists:%{i}.x.test", "ip4:bad", "bogus",
    "include:%{d}", "v=spf1",
])


class SPFPropertyTests(SynchronousTestCase):
    """
    The SPF evaluator on arbitrary records.
    """

    @given(st.lists(_SPF_TERMS, max_size=12), st.lists(_SPF_TERMS, max_size=6))
    def test_anyRecord(self, terms, included) -> None:
        """
        Any record gives a known result or a permanent error, never
        another exception, and stays within the lookup limit.
        """
        from smartrelay.dnscheck import DNSChecker, _SPFError

        resolver = _ZoneResolver({
            "d.test": ["v=spf1 " + " ".join(terms)],
            "inc.test": ["v=spf1 " + " ".join(included)],
        })
        checker = DNSChecker(resolver=resolver, config=parseConfig(""))
        budget = [10]
        d = defer.Deferred.fromCoroutine(checker.spfResult("d.test", PUBLIC, budget))
        result = self.successResultOf(d.addErrback(lambda f: f.trap(_SPFError) and None))
        if result is not None:
            self.assertIn(result[0], {"pass", "fail", "softfail", "neutral", "none"})
        self.assertGreaterEqual(budget[0], -1)


class FormatTests(SynchronousTestCase):
    """
    L{formatChecks} makes a checklist.
    """

    def test_checklist(self) -> None:
        """
        One line per check, the record to publish under a failed one, and
        a count of failures.
        """
        text = formatChecks("example.test", [
            Check("spf", "example.test", OK, "fine"),
            Check("mx", "example.test", FAIL, "no MX", "example.test. IN MX 10 relay.test."),
        ])
        self.assertEqual(text.splitlines(), [
            "DNS of example.test:",
            "  OK    spf       fine",
            "  FAIL  mx        no MX",
            "        publish: example.test. IN MX 10 relay.test.",
            "1 of 2 checks failed",
        ])


class DNSCheckTests(TestCase):
    """
    L{runChecks} against a zone served by a real DNS server.
    """

    def setUp(self) -> None:
        self.server = DNSServer(reactor)
        self.server.start()
        self.addCleanup(self.server.stop)
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        pem, self.rsaRecord = _keys("rsa-sha256")
        self.rsaKey = self._write("rsa.key", pem)
        pem, self.edRecord = _keys("ed25519-sha256")
        self.edKey = self._write("ed.key", pem)
        self.settings = {
            "smartrelay": {"hostname": "relay.example.test"},
            "delivery": {"nameservers": self.server.configValue, "bind_address": PUBLIC},
            "feedback": {"bounce_domain": "bounces.example.test"},
            "tracking": {"base_url": "https://t.example.test"},
            "dkim:example.test": {"selector": "s1", "key": self.rsaKey},
        }
        self.server.addTXT("bounces.example.test", f"v=spf1 ip4:{PUBLIC}/32 -all")
        self.server.addTXT("s1._domainkey.example.test", self.rsaRecord)
        self.server.addTXT("_dmarc.example.test", "v=DMARC1; p=reject; aspf=r")
        self.server.addMX("bounces.example.test", [(10, "relay.example.test")])
        self.server.addA("t.example.test", PUBLIC)
        self.server.addPTR(PUBLIC, "relay.example.test")
        self.server.addA("relay.example.test", PUBLIC)

    def _write(self, name: str, data: bytes) -> str:
        path = os.path.join(self.dir, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def config(self):
        text = "".join(
            f"[{section}]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items())
            for section, keys in self.settings.items()
        )
        return parseConfig(text)

    async def _checks(self, domain: str = "example.test") -> dict:
        checks = await runChecks(reactor, self.config(), domain, 2.0)
        return {c.check: c for c in checks}

    def checks(self, domain: str = "example.test") -> defer.Deferred:
        return defer.Deferred.fromCoroutine(self._checks(domain))

    async def test_allGood(self) -> None:
        """
        A domain with every record in place passes every check.
        """
        checks = await self.checks()
        self.assertEqual({name: c.status for name, c in checks.items()},
                         dict.fromkeys(["spf", "dkim", "dmarc", "mx", "tracking", "ptr"], OK))
        self.assertIn("[delivery] bind_address", checks["spf"].message)

    async def test_spfMissing(self) -> None:
        """
        No SPF record at the bounce domain fails, with the record to publish.
        """
        self.server.remove("bounces.example.test", 16)
        checks = await self.checks()
        self.assertEqual(checks["spf"].status, FAIL)
        self.assertEqual(checks["spf"].publish,
                         f'bounces.example.test. IN TXT "v=spf1 ip4:{PUBLIC} ~all"')

    async def test_spfDoesNotCover(self) -> None:
        """
        An SPF record that does not cover the bind address fails, and the
        suggested record adds it before C{all}.
        """
        self.server.remove("bounces.example.test", 16)
        self.server.addTXT("bounces.example.test", f"v=spf1 ip4:{OTHER} -all")
        checks = await self.checks()
        self.assertEqual(checks["spf"].status, FAIL)
        self.assertIn("gets fail from '-all'", checks["spf"].message)
        self.assertIn(f"v=spf1 ip4:{OTHER} ip4:{PUBLIC} -all", checks["spf"].publish)

    async def test_spfIncludeAndMX(self) -> None:
        """
        C{include:}, C{a:} and C{mx} mechanisms are followed.
        """
        self.server.remove("bounces.example.test", 16)
        self.server.addTXT("bounces.example.test", "v=spf1 mx include:_spf.example.test -all")
        self.server.addTXT("_spf.example.test", "v=spf1 a:out.example.test/24 ~all")
        self.server.addA("out.example.test", "5.9.10.1")
        checks = await self.checks()
        self.assertEqual(checks["spf"].status, OK)

    async def test_spfTwoRecords(self) -> None:
        """
        Two SPF records are a permanent error receivers reject.
        """
        self.server.addTXT("bounces.example.test", "v=spf1 -all")
        checks = await self.checks()
        self.assertEqual(checks["spf"].status, FAIL)
        self.assertIn("2 SPF records", checks["spf"].message)

    async def test_spfLookupLimit(self) -> None:
        """
        More than ten DNS-querying terms fail (RFC 7208 permerror).
        """
        self.server.remove("bounces.example.test", 16)
        self.server.addTXT("bounces.example.test", "v=spf1 " + "a:x.example.test " * 11 + "-all")
        checks = await self.checks()
        self.assertEqual(checks["spf"].status, FAIL)
        self.assertIn("more than 10 DNS lookups", checks["spf"].message)

    async def test_spfSmarthost(self) -> None:
        """
        With a smarthost, SPF must cover the smarthost's addresses.
        """
        self.settings["delivery"]["smarthost"] = "tcp:host=smtp.provider.test:port=587"
        self.server.addA("smtp.provider.test", OTHER)
        checks = await self.checks()
        self.assertEqual(checks["spf"].status, FAIL)
        self.assertIn("[delivery] smarthost", checks["spf"].message)
        self.assertIn("a:smtp.provider.test", checks["spf"].publish)

    async def test_spfUnknownSender(self) -> None:
        """
        Without a bind address or smarthost, an SPF record only warns.
        """
        del self.settings["delivery"]["bind_address"]
        checks = await self.checks()
        self.assertEqual(checks["spf"].status, WARN)

    async def test_dkimMissing(self) -> None:
        """
        No key record at the selector fails, with the whole record to publish.
        """
        self.server.remove("s1._domainkey.example.test")
        checks = await self.checks()
        self.assertEqual(checks["dkim"].status, FAIL)
        self.assertIn('s1._domainkey.example.test. IN TXT ( "v=DKIM1; k=rsa; p=',
                      checks["dkim"].publish)

    async def test_dkimOtherKey(self) -> None:
        """
        A published key that is not the configured one fails.
        """
        self.server.remove("s1._domainkey.example.test")
        self.server.addTXT("s1._domainkey.example.test", generateKey("rsa-sha256", 1024)[1])
        checks = await self.checks()
        self.assertEqual(checks["dkim"].status, FAIL)
        self.assertIn("not the one in", checks["dkim"].message)

    async def test_dkimBoth(self) -> None:
        """
        With C{algorithm = both}, each key is checked on its own.
        """
        self.settings["dkim:example.test"].update(
            algorithm="both", ed25519_selector="e1", ed25519_key=self.edKey)
        checks = await defer.Deferred.fromCoroutine(
            runChecks(reactor, self.config(), "example.test", 2.0))
        dkim = [c for c in checks if c.check == "dkim"]
        self.assertEqual([(c.name, c.status) for c in dkim], [
            ("s1._domainkey.example.test", OK), ("e1._domainkey.example.test", FAIL)])
        self.server.addTXT("e1._domainkey.example.test", self.edRecord)
        checks = await defer.Deferred.fromCoroutine(
            runChecks(reactor, self.config(), "example.test", 2.0))
        self.assertEqual([c.status for c in checks if c.check == "dkim"], [OK, OK])

    async def test_dkimNotConfigured(self) -> None:
        """
        A domain without a [dkim:...] section fails the DKIM check.
        """
        del self.settings["dkim:example.test"]
        checks = await self.checks()
        self.assertEqual(checks["dkim"].status, FAIL)
        self.assertIn("dkim-keygen", checks["dkim"].message)

    async def test_dmarcMissing(self) -> None:
        """
        No DMARC record fails, with a p=none record to start from.
        """
        self.server.remove("_dmarc.example.test")
        checks = await self.checks()
        self.assertEqual(checks["dmarc"].status, FAIL)
        self.assertIn('_dmarc.example.test. IN TXT "v=DMARC1; p=none', checks["dmarc"].publish)

    async def test_dmarcParent(self) -> None:
        """
        A subdomain is covered by its parent's DMARC record (its sp=).
        """
        self.settings["dkim:mail.example.test"] = self.settings.pop("dkim:example.test")
        self.server.addTXT("s1._domainkey.mail.example.test", self.rsaRecord)
        checks = await self.checks("mail.example.test")
        self.assertEqual(checks["dmarc"].status, OK)
        self.assertEqual(checks["dmarc"].name, "_dmarc.example.test")

    async def test_dmarcSiblingAligned(self) -> None:
        """
        Relaxed SPF alignment holds for a bounce domain beside the From
        domain under the parent whose DMARC record applies.
        """
        del self.settings["dkim:example.test"]
        self.server.addTXT("s1._domainkey.mail.example.test", self.rsaRecord)
        checks = await self.checks("mail.example.test")
        self.assertEqual(checks["dmarc"].status, OK)
        self.assertIn("SPF (bounce domain bounces.example.test)", checks["dmarc"].message)

    async def test_dmarcNotAligned(self) -> None:
        """
        Strict SPF alignment with a bounce subdomain and no DKIM key fails.
        """
        del self.settings["dkim:example.test"]
        self.server.remove("_dmarc.example.test")
        self.server.addTXT("_dmarc.example.test", "v=DMARC1; p=quarantine; aspf=s")
        checks = await self.checks()
        self.assertEqual(checks["dmarc"].status, FAIL)
        self.assertIn("neither DKIM", checks["dmarc"].message)

    async def test_dmarcNoPolicy(self) -> None:
        """
        A DMARC record without a valid p= fails.
        """
        self.server.remove("_dmarc.example.test")
        self.server.addTXT("_dmarc.example.test", "v=DMARC1; rua=mailto:x@example.test")
        checks = await self.checks()
        self.assertEqual(checks["dmarc"].status, FAIL)

    async def test_mxMissing(self) -> None:
        """
        A bounce domain without MX fails, with the MX record to publish.
        """
        self.server.remove("bounces.example.test", 15)
        checks = await self.checks()
        self.assertEqual(checks["mx"].status, FAIL)
        self.assertEqual(checks["mx"].publish,
                         "bounces.example.test. IN MX 10 relay.example.test.")

    async def test_serverFailure(self) -> None:
        """
        SERVFAIL for one name fails that check only, naming the name.
        """
        self.server.servfail("_dmarc.example.test")
        checks = await self.checks()
        self.assertEqual(checks["dmarc"].status, FAIL)
        self.assertEqual(checks["dmarc"].message,
                         "the name server answered SERVFAIL for _dmarc.example.test")
        self.assertEqual(checks["spf"].status, OK)

    async def test_trackingHost(self) -> None:
        """
        A tracking host that does not resolve fails; one on a loopback
        address warns.
        """
        self.server.remove("t.example.test")
        checks = await self.checks()
        self.assertEqual(checks["tracking"].status, FAIL)
        self.server.addA("t.example.test", "127.0.0.1")
        checks = await self.checks()
        self.assertEqual(checks["tracking"].status, WARN)

    async def test_ptrMissing(self) -> None:
        """
        A bind address without reverse DNS fails, naming the PTR record.
        """
        self.server.remove("11.10.9.5.in-addr.arpa")
        checks = await self.checks()
        self.assertEqual(checks["ptr"].status, FAIL)
        self.assertTrue(checks["ptr"].publish.startswith(
            "11.10.9.5.in-addr.arpa. IN PTR relay.example.test."))

    async def test_ptrNotConfirmed(self) -> None:
        """
        A reverse name that does not resolve back to the address fails.
        """
        self.server.remove("relay.example.test", 1)
        self.server.addA("relay.example.test", OTHER)
        checks = await self.checks()
        self.assertEqual(checks["ptr"].status, FAIL)
        self.assertEqual(checks["ptr"].publish, f"relay.example.test. IN A {PUBLIC}")

    async def test_ptrOtherName(self) -> None:
        """
        A forward-confirmed name other than the EHLO name warns.
        """
        self.server.remove("11.10.9.5.in-addr.arpa")
        self.server.addPTR(PUBLIC, "static.host.test")
        self.server.addA("static.host.test", PUBLIC)
        checks = await self.checks()
        self.assertEqual(checks["ptr"].status, WARN)
        self.assertIn("set [smartrelay] hostname = static.host.test", checks["ptr"].message)

    async def test_ptrSmarthost(self) -> None:
        """
        Through a smarthost there is no reverse DNS check: the provider sends.
        """
        self.settings["delivery"]["smarthost"] = "tcp:host=smtp.provider.test:port=587"
        checks = await self.checks()
        self.assertNotIn("ptr", checks)


class CommandLineTests(TestCase):
    """
    C{smartrelay check-dns} in a child process.
    """

    def setUp(self) -> None:
        self.server = DNSServer(reactor)
        self.server.start()
        self.addCleanup(self.server.stop)
        self.config = self.mktemp()
        with open(self.config, "w") as f:
            f.write("[smartrelay]\nhostname = relay.example.test\n"
                    f"[delivery]\nnameservers = {self.server.configValue}\n"
                    f"bind_address = {PUBLIC}\n"
                    "[tracking]\nbase_url = https://t.example.test\n")
        self.server.addTXT("relay.example.test", f"v=spf1 ip4:{PUBLIC} -all")
        self.server.addMX("relay.example.test", [(10, "relay.example.test")])
        self.server.addA("t.example.test", PUBLIC)

    def run_(self, *args: str) -> defer.Deferred:
        return getProcessOutputAndValue(
            sys.executable,
            ["-c", "import sys; from smartrelay.cli import main; sys.exit(main())", *args],
            env=os.environ,
            reactor=reactor,
        )

    async def test_checklist(self) -> None:
        """
        A failed check prints the checklist with the record to publish and
        exits with status 1.
        """
        out, err, code = await self.run_("check-dns", "example.test", "--config", self.config)
        text = out.decode()
        self.assertEqual(code, 1, err)
        self.assertIn("  OK    spf ", text)
        self.assertIn("  FAIL  dkim ", text)
        self.assertIn('publish: _dmarc.example.test. IN TXT "v=DMARC1; p=none', text)
        self.assertIn("checks failed", text)

    async def test_json(self) -> None:
        """
        C{--json} prints one document with every check.
        """
        out, err, code = await self.run_("check-dns", "example.test", "--json",
                                         "--config", self.config)
        document = json.loads(out)
        self.assertEqual(code, 1)
        self.assertFalse(document["ok"])
        self.assertEqual([c["check"] for c in document["checks"]],
                         ["spf", "dkim", "dmarc", "mx", "tracking", "ptr"])
        self.assertEqual(set(document["checks"][0]),
                         {"check", "name", "status", "message", "publish"})

    async def test_badDomain(self) -> None:
        """
        A domain that is no DNS name is a usage error: one line, status 2.
        """
        out, err, code = await self.run_("check-dns", "exa mple", "--config", self.config)
        self.assertEqual(code, 2)
        self.assertEqual(len(err.decode().splitlines()), 1, err)
        self.assertIn("invalid domain", err.decode())

    async def test_badConfig(self) -> None:
        """
        A configuration that does not load is one line and status 2.
        """
        with open(self.config, "a") as f:
            f.write("[delivery2]\n")
        out, err, code = await self.run_("check-dns", "example.test", "--config", self.config)
        self.assertEqual(code, 2)
        self.assertEqual(len(err.decode().splitlines()), 1, err)
        self.assertIn("unknown section", err.decode())

    async def test_unreachableNameserver(self) -> None:
        """
        A name server that does not answer is one line and status 1.
        """
        port = self.server.port
        await self.server.stop()
        self.server.stop = lambda: None
        with open(self.config, "w") as f:
            f.write(f"[delivery]\nnameservers = 127.0.0.1:{port}\n")
        out, err, code = await self.run_("check-dns", "example.test", "--timeout", "0.5",
                                         "--config", self.config)
        self.assertEqual(code, 1)
        self.assertEqual(err.decode().splitlines(), [
            err.decode().strip()])
        self.assertIn(f"no answer from 127.0.0.1:{port}", err.decode())
