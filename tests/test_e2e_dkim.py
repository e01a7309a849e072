"""
End-to-end tests of DKIM through a real C{twistd smartrelay}: what the sink
receives verifies with dkimpy and with Debian's Mail::DKIM (an independent
implementation), also when the next hop lacks 8BITMIME and the message had
to be downgraded; a signing failure defers the message instead of sending
it unsigned; a signer that fails its self-test stops start-up with one line.
"""

import email
import email.policy
import json
import os
import shutil
import subprocess
import textwrap

import dkim
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from smartrelay.engine.dkim import generateKey
from tests.sink import (
    RelayProcess,
    Sink,
    installedEnvironment,
    installedScript,
    waitFor,
)
from tests.test_e2e import events, submit
from tests.test_engine_dkim import _PERL_VERIFY

GREETING = "Gr\u00fc\u00dfe aus K\u00f6ln!\r\nSch\u00f6ne Tage w\u00fcnscht der Laden.\r\n"

#: An 8-bit UTF-8 text part, declared 8bit.
EIGHT_BIT = (
    "From: Laden <news@shop.example>\r\n"
    "To: leser@example.org\r\n"
    "Subject: Gr\u00fc\u00dfe\r\n"
    "MIME-Version: 1.0\r\n"
    "Content-Type: text/plain; charset=utf-8\r\n"
    "Content-Transfer-Encoding: 8bit\r\n"
    "\r\n" + GREETING
)

SELECTOR = "s1._domainkey.shop.example"


def perlVerify(message: bytes, record: str) -> list:
    """
    Mail::DKIM's verdict on C{message}, with C{record} as the only DNS:
    the overall result, then one "algorithm result" line per signature.
    """
    if shutil.which("perl") is None:
        raise SkipTest("perl is not installed")
    check = subprocess.run(["perl", "-MMail::DKIM::Verifier", "-e", "1"], capture_output=True)
    if check.returncode != 0:
        raise AssertionError(
            "Mail::DKIM is missing: apt-get install libmail-dkim-perl (test.sh does this)"
        )
    run = subprocess.run(
        ["perl", "-e", _PERL_VERIFY, SELECTOR, record],
        input=message,
        capture_output=True,
        timeout=60,
        env=dict(os.environ, LC_ALL="C"),
    )
    assert run.returncode == 0, run.stderr
    return run.stdout.decode("utf-8").splitlines()


class DKIMRelayMixin:
    """
    A relay with a DKIM key for shop.example delivering to an in-process
    sink.
    """

    timeout = 120

    def startRelay(self, sinkExtensions=()):
        self.sink = Sink(extensions=sinkExtensions)
        port = reactor.listenTCP(0, self.sink, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.workdir = os.path.abspath(self.mktemp())
        os.makedirs(self.workdir)
        pem, self.record = generateKey("rsa-sha256", 2048)
        keyPath = os.path.join(self.workdir, "shop.key")
        with open(keyPath, "wb") as f:
            f.write(pem)
        config = (
            "[smartrelay]\ndata_dir = var\nhostname = relay.test\nnode_id = 2A\n\n"
            "[smtp]\nlisten = tcp:0:interface=127.0.0.1\n\n"
            "[web]\nlisten = tcp:0:interface=127.0.0.1\n\n"
            "[delivery]\nsmarthost = tcp:host=127.0.0.1:port=%d\nretry = 5m\n\n"
            "[dkim:shop.example]\nselector = s1\nkey = %s\n"
            % (port.getHost().port, keyPath)
        )
        self.relay = RelayProcess(self.workdir, config)
        self.addCleanup(self.relay.kill)
        self.relay.start()
        return self.relay.waitReady(reactor)

    def dnsfunc(self, name, timeout=5):
        if name.lower().rstrip(b".") == SELECTOR.encode("ascii"):
            return self.record.encode("ascii")
        return None

    @inlineCallbacks
    def deliver(self, message):
        """
        Submit C{message}, wait for it at the sink, stop the relay; the
        received copy.
        """
        (code, text), refused = yield deferToThread(
            submit, self.relay.port, ["leser@example.org"], message, "app@shop.example"
        )
        self.assertEqual((code, refused), (250, []), text)
        yield waitFor(reactor, lambda: self.sink.received)
        yield self.relay.stop()
        [received] = self.sink.received
        return received

    def assertVerifies(self, data):
        """
        dkimpy and Mail::DKIM both pass the signature of C{data}.
        """
        self.assertTrue(data.startswith(b"DKIM-Signature:"), data[:200])
        self.assertTrue(dkim.verify(data, dnsfunc=self.dnsfunc))
        self.assertEqual(perlVerify(data, self.record), ["pass", "rsa-sha256 pass"])

    def assertGreeting(self, data):
        """
        C{data}'s Subject and text decode to the original.
        """
        message = email.message_from_bytes(data, policy=email.policy.default)
        self.assertEqual(message["Subject"], "Gr\u00fc\u00dfe")
        self.assertEqual(
            message.get_content().replace("\r\n", "\n"), GREETING.replace("\r\n", "\n")
        )


class EightBitTests(DKIMRelayMixin, TestCase):
    """
    An 8-bit UTF-8 message with DKIM on: the signature covers the bytes
    the next hop receives, whatever that hop offers.
    """

    @inlineCallbacks
    def test_withoutEightBitMIME(self):
        """
        To a server without 8BITMIME and SMTPUTF8 the message arrives 7-bit
        (downgraded before it was signed): the signature verifies with
        dkimpy and with Mail::DKIM, and the text decodes to the original.
        """
        yield self.startRelay()
        received = yield self.deliver(EIGHT_BIT)
        data = received.data
        self.assertTrue(data.isascii())
        self.assertIn(b"Content-Transfer-Encoding: quoted-printable\r\n", data)
        self.assertIn(b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n", data)
        self.assertNotIn(b"BODY=8BITMIME", b"".join(self.sink.mailCommands))
        self.assertVerifies(data)
        self.assertGreeting(data)

    @inlineCallbacks
    def test_withEightBitMIME(self):
        """
        To a server offering 8BITMIME and SMTPUTF8 the message goes as it
        is, 8-bit, announced with BODY=8BITMIME and SMTPUTF8; it verifies
        too.
        """
        yield self.startRelay(sinkExtensions=(b"8BITMIME", b"SMTPUTF8"))
        received = yield self.deliver(EIGHT_BIT)
        data = received.data
        self.assertIn(GREETING.encode("utf-8"), data)
        self.assertIn("Subject: Gr\u00fc\u00dfe\r\n".encode("utf-8"), data)
        [mail] = self.sink.mailCommands
        self.assertIn(b" BODY=8BITMIME", mail)
        self.assertIn(b" SMTPUTF8", mail)
        self.assertVerifies(data)
        self.assertGreeting(data)


class FailClosedTests(DKIMRelayMixin, TestCase):
    """
    A message of a domain with keys that cannot be signed is deferred,
    never sent unsigned; mail of other domains goes unsigned as before.
    """

    @inlineCallbacks
    def test_signingErrorDefers(self):
        """
        A header field dkimpy cannot parse makes signing fail: the
        recipient gets a C{deferred} event whose reply names the DKIM
        failure, and nothing reaches the sink; a message from a domain
        without a key is delivered unsigned meanwhile.
        """
        yield self.startRelay()
        # 7-bit, so that no downgrade reads the bad line as the body's start.
        unparsable = (
            "From: Laden <news@shop.example>\r\nTo: leser@example.org\r\n"
            "Bad Field: x\r\nSubject: hello\r\n\r\nHello\r\n"
        )
        (code, text), _ = yield deferToThread(
            submit, self.relay.port, ["leser@example.org"], unparsable, "app@shop.example"
        )
        self.assertEqual(code, 250, text)
        queueID = text.split()[-1]
        other = EIGHT_BIT.replace("news@shop.example", "news@other.example")
        (code, text), _ = yield deferToThread(
            submit, self.relay.port, ["leser@example.org"], other, "app@other.example"
        )
        self.assertEqual(code, 250, text)

        def deferred():
            return [e for e in events(self.workdir) if e[0] == "deferred" and e[1] == queueID]

        yield waitFor(reactor, lambda: deferred() and self.sink.received)
        yield self.relay.stop()
        [(_, _, recipient, detail)] = deferred()
        self.assertEqual(recipient, "leser@example.org")
        detail = json.loads(detail)
        self.assertEqual((detail["code"], detail["status"]), (451, "4.3.0"))
        self.assertTrue(
            detail["reply"].startswith(
                "local error: DKIM signing for shop.example failed (MessageFormatError: "
            ),
            detail["reply"],
        )
        self.assertTrue(detail["reply"].endswith("; not sending it unsigned"), detail["reply"])
        [received] = self.sink.received
        self.assertNotIn(b"DKIM-Signature", received.data)
        self.assertIn(b"From: Laden <news@other.example>", received.data)
        with open(self.relay.logPath, encoding="utf-8") as f:
            log = f.read()
        self.assertIn(f"could not re-wrap {queueID} for leser@example.org: DKIM signing", log)


#: Installed in the relay's interpreter by a sitecustomize module: dkimpy's
#: internals as a release that moved them might leave them.
_BROKEN_DKIMPY = '''
import dkim

def gen_header(self, *args, **kwargs):
    raise AttributeError("'DKIM' object has no attribute 'signature_fields'")

dkim.DomainSigner.gen_header = gen_header
'''


class SelfTestStartupTests(SynchronousTestCase):
    """
    The installed C{twistd smartrelay} does not start when a DKIM key's
    self-test fails.
    """

    def test_brokenDkimpyStopsStartup(self):
        """
        With a dkimpy whose internals no longer fit the signing hook, the
        relay stops at start-up with exit status 1 and one line naming the
        section and the failure, before it listens; no traceback.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(directory, "site"))
        with open(os.path.join(directory, "site", "sitecustomize.py"), "w") as f:
            f.write(textwrap.dedent(_BROKEN_DKIMPY))
        pem, _ = generateKey("ed25519-sha256")
        keyPath = os.path.join(directory, "shop.key")
        with open(keyPath, "wb") as f:
            f.write(pem)
        configPath = os.path.join(directory, "relay.ini")
        with open(configPath, "w") as f:
            f.write(
                "[smtp]\nlisten = tcp:0:interface=127.0.0.1\n\n"
                "[web]\nlisten = tcp:0:interface=127.0.0.1\n\n"
                "[dkim:shop.example]\nselector = s1\nalgorithm = ed25519-sha256\n"
                "key = %s\n" % (keyPath,)
            )
        # Only the sitecustomize folder is put on the path, never the
        # checkout: the relay under test is the installed one.
        env = dict(installedEnvironment(), PYTHONPATH=os.path.join(directory, "site"))
        result = subprocess.run(
            [installedScript("twistd"), "-n", "--pidfile=", "--logfile",
             os.path.join(directory, "twistd.log"), "smartrelay", "--config", configPath],
            cwd=directory, env=env, capture_output=True, text=True, timeout=60,
        )
        self.assertEqual(result.returncode, 1, result.stderr)
        prefix = (
            f"smartrelay: {configPath}: [dkim:shop.example]: DKIM self-test for shop.example "
            "failed: signing a test message raised AttributeError: 'DKIM' object has no "
            "attribute 'signature_fields' (dkimpy "
        )
        self.assertTrue(result.stderr.startswith(prefix), result.stderr)
        self.assertTrue(result.stderr.endswith("; smartrelay supports dkimpy 1.1)\n"),
                        result.stderr)
        self.assertEqual(result.stderr.count("\n"), 1, result.stderr)
        logPath = os.path.join(directory, "twistd.log")
        if os.path.exists(logPath):
            with open(logPath, encoding="utf-8") as f:
                self.assertNotIn("accepting mail", f.read())
