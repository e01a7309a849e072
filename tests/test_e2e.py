"""
End-to-end tests: a real C{twistd smartrelay} child process on OS-chosen
loopback ports, real SMTP clients (Python's smtplib), a real SMTP sink
server, and a kill -9 in the middle of submissions.
"""

import json
import os
import re
import signal
import smtplib
import sqlite3
import ssl
import subprocess
import threading

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.names import dns
from twisted.trial.unittest import SynchronousTestCase, TestCase

from smartrelay.auth import hashPassword
from smartrelay.ids import isQueueID
from tests.certs import selfSigned
from tests.dnsserver import DNSServer
from tests.sink import (
    PROJECT,
    RelayProcess,
    Sink,
    childrenOf,
    installedEnvironment,
    installedScript,
    running,
    waitFor,
)

TEXT = (
    "From: App <app@example.com>\r\nTo: someone@example.org\r\nSubject: hello\r\n\r\n"
    "Line one\r\n.leading dot\r\n"
)


def submit(port, recipients, body=TEXT, sender="app@example.com", starttls=False, login=None):
    """
    One SMTP transaction with smtplib; returns the (code, text) of the DATA
    reply and the recipients refused at RCPT.
    """
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("client.test")
        if starttls:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            client.starttls(context=context)
            client.ehlo("client.test")
        if login is not None:
            client.login(*login)
        code, text = client.mail(sender)
        if code != 250:
            return (code, text.decode()), recipients
        refused = []
        for r in recipients:
            code, text = client.rcpt(r)
            if code != 250:
                refused.append(r)
        code, text = client.data(body.encode())
        return (code, text.decode()), refused


def events(workdir):
    connection = sqlite3.connect(os.path.join(workdir, "var", "smartrelay.sqlite"))
    try:
        return connection.execute(
            "SELECT type, queue_id, recipient, detail FROM events ORDER BY time, rowid"
        ).fetchall()
    finally:
        connection.close()


class RelayTestMixin:
    def startSink(self):
        self.sink = Sink()
        port = reactor.listenTCP(0, self.sink, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port

    def relayConfig(self, sinkPort, extra=""):
        return (
            "[smartrelay]\ndata_dir = var\nhostname = relay.test\nnode_id = 2A\n\n"
            "[web]\nlisten = tcp:0:interface=127.0.0.1\n\n[smtp]\nlisten = tcp:0:interface=127.0.0.1\n%s\n"
            "[delivery]\nsmarthost = tcp:host=127.0.0.1:port=%d\nretry = 5m\n"
            % (extra, sinkPort)
        )

    def makeRelay(self, config):
        self.workdir = os.path.abspath(self.mktemp())
        relay = RelayProcess(self.workdir, config)
        self.addCleanup(relay.kill)
        return relay


class DeliveryTests(RelayTestMixin, TestCase):
    timeout = 120

    @inlineCallbacks
    def test_submitDeliverBounceDefer(self):
        """
        A message to three recipients gets a 250 with its queue id; the good
        recipient's copy reaches the sink with X-SmartRelay-ID and Received
        headers; the 550 recipient bounces; the 451 recipient is deferred and
        still queued after a restart.
        """
        sinkPort = self.startSink()
        relay = self.makeRelay(self.relayConfig(sinkPort))
        relay.start()
        yield relay.waitReady(reactor)
        (code, text), refused = yield deferToThread(
            submit, relay.port, ["ok@example.org", "bounce@example.org", "defer@example.org"]
        )
        self.assertEqual((code, refused), (250, []))
        match = re.match(r"2\.0\.0 OK (\S+)$", text)
        self.assertTrue(match, text)
        queueID = match.group(1)
        self.assertTrue(isQueueID(queueID) and queueID.startswith("2A/"), queueID)

        yield waitFor(reactor, lambda: self.sink.received)
        [received] = self.sink.received
        self.assertEqual(received.queueID, queueID)
        self.assertEqual(received.recipients, ["ok@example.org"])
        # The envelope sender is the VERP address for this recipient.
        self.assertRegex(received.sender, r"^bounce\+[a-z2-7]{37}@relay\.test$")
        self.assertTrue(received.data.startswith(b"Received: from client.test ([127.0.0.1])"))
        self.assertIn(b"\r\n.leading dot\r\n", received.data)

        yield waitFor(
            reactor,
            lambda: {e[0] for e in events(self.workdir)} >= {"delivered", "bounced", "deferred"},
        )
        yield relay.stop()
        byRecipient = {}
        for kind, qid, recipient, detail in events(self.workdir):
            self.assertEqual(qid, queueID)
            byRecipient.setdefault(recipient, []).append(kind)
        self.assertEqual(
            byRecipient,
            {
                "ok@example.org": ["accepted", "delivered"],
                "bounce@example.org": ["accepted", "bounced"],
                "defer@example.org": ["accepted", "deferred"],
            },
        )
        relay.start()
        yield relay.waitReady(reactor)
        self.assertIn("recovered 1 queued message", relay.log())
        yield relay.stop()

    @inlineCallbacks
    def test_directDeliveryThroughRealDNS(self):
        """
        Without a smarthost the relay looks up MX records through the
        configured name server (a real DNS server on loopback): mail for a
        domain reaches its preferred exchanger (here: the sink), a null-MX
        domain bounces as hostunknown without any connection, and an
        NXDOMAIN domain bounces too.
        """
        sinkPort = self.startSink()
        dnsServer = DNSServer(reactor)
        dnsServer.start()
        self.addCleanup(dnsServer.stop)
        dnsServer.addMX("mx-routed.test", [(10, "mx1.mx-routed.test"), (20, "mx2.mx-routed.test")])
        dnsServer.addA("mx1.mx-routed.test", "127.0.0.1")
        dnsServer.addA("mx2.mx-routed.test", "127.0.0.2")
        dnsServer.nullMX("nomail.test")
        config = (
            "[smartrelay]\ndata_dir = var\nhostname = relay.test\nnode_id = 2A\n\n"
            "[web]\nlisten = tcp:0:interface=127.0.0.1\n\n[smtp]\nlisten = tcp:0:interface=127.0.0.1\n\n"
            "[delivery]\nnameservers = %s\nmx_port = %d\nretry = 5m\n"
            % (dnsServer.configValue, sinkPort)
        )
        relay = self.makeRelay(config)
        relay.start()
        yield relay.waitReady(reactor)
        (code, _), refused = yield deferToThread(
            submit, relay.port, ["alice@mx-routed.test", "bob@nomail.test", "carol@nowhere.test"]
        )
        self.assertEqual((code, refused), (250, []))
        yield waitFor(reactor, lambda: self.sink.received)
        self.assertEqual(self.sink.received[0].recipients, ["alice@mx-routed.test"])
        yield waitFor(
            reactor, lambda: sum(e[0] in ("delivered", "bounced") for e in events(self.workdir)) == 3
        )
        yield relay.stop()
        outcomes = {
            recipient: (kind, json.loads(detail))
            for kind, _, recipient, detail in events(self.workdir)
            if kind != "accepted"
        }
        self.assertEqual(outcomes["alice@mx-routed.test"][1]["remote"], "mx1.mx-routed.test")
        kind, detail = outcomes["bob@nomail.test"]
        self.assertEqual((kind, detail["reason"], detail["kind"], detail["status"]),
                         ("bounced", "hostunknown", "hard", "5.1.10"))
        kind, detail = outcomes["carol@nowhere.test"]
        self.assertEqual((kind, detail["reason"]), ("bounced", "hostunknown"))
        self.assertIn(("mx-routed.test", dns.MX), dnsServer.queries)

    @inlineCallbacks
    def test_tlsAndAuth(self):
        """
        With allowed_clients empty, an unauthenticated client gets 554 5.7.1;
        after STARTTLS and AUTH the same submission is accepted.
        """
        sinkPort = self.startSink()
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(workdir)
        certificate, key = writeSelfSigned(workdir)
        users = os.path.join(workdir, "users")
        with open(users, "w") as f:
            f.write("app:%s\n" % hashPassword("s3cret", ln=4))
        extra = (
            "allowed_clients =\nauth_file = %s\ntls_certificate = %s\ntls_key = %s\n"
            % (users, certificate, key)
        )
        relay = RelayProcess(workdir, self.relayConfig(sinkPort, extra))
        self.addCleanup(relay.kill)
        relay.start()
        yield relay.waitReady(reactor)
        (code, text), _ = yield deferToThread(submit, relay.port, ["ok@example.org"])
        self.assertEqual(code, 554)
        self.assertTrue(text.startswith("5.7.1 "), text)
        (code, text), _ = yield deferToThread(
            submit, relay.port, ["ok@example.org"], starttls=True, login=("app", "s3cret")
        )
        self.assertEqual(code, 250, text)
        yield waitFor(reactor, lambda: self.sink.received)
        self.assertIn(b"with ESMTPSA", self.sink.received[0].data)
        yield relay.stop()


class CrashTests(RelayTestMixin, TestCase):
    timeout = 180

    @inlineCallbacks
    def test_killDuringSubmission(self):
        """
        kill -9 while clients are submitting: after a restart every message
        that got a 250 is delivered; none is lost.
        """
        sinkPort = self.startSink()
        relay = self.makeRelay(self.relayConfig(sinkPort))
        relay.start()
        yield relay.waitReady(reactor)
        accepted, lock, stop = [], threading.Lock(), threading.Event()

        def client(n):
            i = 0
            while not stop.is_set():
                try:
                    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as c:
                        c.ehlo("crash.test")
                        for _ in range(5):
                            c.mail("app@example.com")
                            c.rcpt("ok%d-%d@example.org" % (n, i))
                            code, text = c.data(TEXT.encode() + (b"x" * 70 + b"\r\n") * 40)
                            i += 1
                            if code == 250:
                                with lock:
                                    accepted.append(text.decode().split()[-1])
                except (OSError, smtplib.SMTPException):
                    return

        threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        try:
            yield waitFor(reactor, lambda: len(accepted) >= 200, timeout=60)
            workers = childrenOf(relay.process.pid)
            relay.kill(signal.SIGKILL)
        finally:
            stop.set()
            yield deferToThread(lambda: [t.join(30) for t in threads])
        survivors = set(accepted)
        self.assertGreaterEqual(len(survivors), 200)
        # The re-wrap workers do not outlive a relay killed with SIGKILL:
        # their input ends, so they exit.
        self.assertTrue(workers)
        yield waitFor(reactor, lambda: not any(running(pid) for pid in workers), timeout=30)
        relay.start()
        yield relay.waitReady(reactor)
        yield waitFor(reactor, lambda: survivors <= self.sink.queueIDs(), timeout=90)
        yield relay.stop()


class StartupTests(SynchronousTestCase):
    def run_twistd(self, *args, cwd=None, logfile=None):
        logging = ["--logfile", logfile] if logfile else []
        return subprocess.run(
            [installedScript("twistd"), "-n", "--pidfile=", *logging, "smartrelay", *args],
            cwd=cwd or self.mktemp_dir(), env=installedEnvironment(), capture_output=True,
            text=True, timeout=60,
        )

    def mktemp_dir(self):
        path = self.mktemp()
        os.makedirs(path)
        return path

    def test_badConfigOneLine(self):
        """
        A config mistake stops start-up with exit status 1 and one line
        naming section, key and problem; no traceback.
        """
        directory = os.path.abspath(self.mktemp_dir())
        path = os.path.join(directory, "bad.ini")
        with open(path, "w") as f:
            f.write("[smtp]\nmax_conections = 5\n")
        result = self.run_twistd("--config", path, cwd=directory)
        self.assertEqual(result.returncode, 1)
        self.assertEqual(
            result.stderr,
            "smartrelay: %s: [smtp] max_conections: unknown key 'max_conections' "
            "(did you mean 'max_connections'?)\n" % (path,),
        )

    def test_missingConfigFile(self):
        """
        A missing config file is one line too.
        """
        result = self.run_twistd("--config", "/nonexistent/smartrelay.ini")
        self.assertEqual(result.returncode, 1)
        self.assertEqual(result.stderr.count("\n"), 1)
        self.assertIn("/nonexistent/smartrelay.ini", result.stderr)
        self.assertNotIn("Traceback", result.stderr)

    def test_jsonLoggerNeedsForeground(self):
        """
        The JSON log observer writes to standard output, which a daemon
        does not have: without C{-n} twistd refuses it with one line
        instead of running with every log line lost.
        """
        directory = os.path.abspath(self.mktemp_dir())
        result = subprocess.run(
            [installedScript("twistd"), "--pidfile=", "--logger", "smartrelay.logs.jsonObserver",
             "smartrelay"],
            cwd=directory, env=installedEnvironment(), capture_output=True, text=True,
            timeout=60,
        )
        self.assertEqual(result.returncode, 1)
        self.assertEqual(
            result.stderr,
            "smartrelay: --logger smartrelay.logs.jsonObserver writes to standard output: "
            "run twistd with -n (--nodaemon), or drop --logger to use --logfile\n",
        )
        self.assertFalse(os.path.exists(os.path.join(directory, "var")))

    def test_dataDirNotADirectory(self):
        """
        A data_dir that cannot be created is one line and exit status 1.
        """
        directory = os.path.abspath(self.mktemp_dir())
        blocker = os.path.join(directory, "var")
        with open(blocker, "w") as f:
            f.write("a file where the directory should be")
        result = self.run_twistd(cwd=directory)
        self.assertEqual(result.returncode, 1)
        self.assertEqual(
            result.stderr, "smartrelay: [smartrelay] data_dir: cannot create var: File exists\n"
        )

    def test_damagedIDState(self):
        """
        A damaged queue-id state file stops start-up with one line that says
        what the file is for; it is never silently reset.
        """
        directory = os.path.abspath(self.mktemp_dir())
        os.makedirs(os.path.join(directory, "var"))
        with open(os.path.join(directory, "var", "queue-ids.json"), "w") as f:
            f.write("{torn")
        result = self.run_twistd(cwd=directory)
        self.assertEqual(result.returncode, 1)
        self.assertEqual(result.stderr.count("\n"), 1)
        self.assertTrue(
            result.stderr.startswith("smartrelay: var/queue-ids.json is damaged ("), result.stderr
        )

    def test_portInUse(self):
        """
        If the SMTP port cannot be bound, start-up fails: the reason is
        logged in one line naming the key and the address, with no
        traceback, and twistd exits with status 1.
        """
        import socket

        busy = socket.socket()
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        self.addCleanup(busy.close)
        directory = os.path.abspath(self.mktemp_dir())
        path = os.path.join(directory, "relay.ini")
        with open(path, "w") as f:
            f.write(
                "[smtp]\nlisten = tcp:%d:interface=127.0.0.1\n"
                "[web]\nlisten = tcp:0:interface=127.0.0.1\n"
                "[feedback]\nlisten = tcp:0:interface=127.0.0.1\n" % busy.getsockname()[1]
            )
        log = os.path.join(directory, "twistd.log")
        result = self.run_twistd("--config", path, cwd=directory, logfile=log)
        self.assertEqual(result.returncode, 1)
        with open(log) as f:
            text = f.read()
        self.assertIn(
            "smartrelay could not start: [smtp] listen: cannot listen on "
            "127.0.0.1:%d: Address already in use" % busy.getsockname()[1],
            text,
        )
        self.assertNotIn("Traceback", text)

    def test_exampleConfigAccepted(self):
        """
        The documented example configuration passes validation in twistd.
        """
        from smartrelay.tap import Options

        options = Options()
        options.parseOptions(["--config", os.path.join(PROJECT, "etc", "smartrelay.ini")])
        self.assertEqual(options.relayConfig.smtp.listen, "tcp:2525:interface=127.0.0.1")


def writeSelfSigned(directory):
    """
    A self-signed certificate and key for STARTTLS tests, as files.
    """
    certificate, key = selfSigned("relay.test", days=30)
    certPath = os.path.join(directory, "cert.pem")
    keyPath = os.path.join(directory, "key.pem")
    with open(certPath, "wb") as f:
        f.write(certificate)
    with open(keyPath, "wb") as f:
        f.write(key)
    return certPath, keyPath


HTML_MESSAGE = (
    "From: Shop <news@shop.example>\r\nTo: reader@example.org\r\nSubject: Spring sale\r\n"
    "X-SmartRelay-Track: opens,clicks\r\nX-SmartRelay-Tag: spring\r\n"
    "X-SmartRelay-Metadata-campaign: c42\r\n"
    "MIME-Version: 1.0\r\nContent-Type: multipart/alternative; boundary=\"b1\"\r\n\r\n"
    "--b1\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
    "See https://shop.example/sale\r\n"
    "--b1\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
    "<html><body><p>Sale!</p><a href=\"https://shop.example/sale?x=1&amp;y=2\">Go</a>"
    "<a href=\"mailto:help@shop.example\">Help</a></body></html>\r\n"
    "--b1--\r\n"
)


class RewrapEndToEndTests(RelayTestMixin, TestCase):
    """
    The whole re-wrap path through a real C{twistd smartrelay}: VERP,
    List-Unsubscribe, tracking and DKIM on the delivered message; the
    tracked link and the one-click unsubscribe through the relay's real
    HTTP server; the next message to the unsubscribed address suppressed.
    """

    timeout = 120

    @inlineCallbacks
    def test_rewrapTrackUnsubscribe(self):
        import dkim
        import treq
        from email import message_from_bytes, policy

        from smartrelay.engine.dkim import generateKey
        from smartrelay.tokens import Tokens
        from tests.redisserver import freePort

        sinkPort = self.startSink()
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(workdir)
        pem, txt = generateKey("rsa-sha256", 2048)
        keyPath = os.path.join(workdir, "shop.key")
        with open(keyPath, "wb") as f:
            f.write(pem)
        webPort = freePort()
        config = (
            "[smartrelay]\ndata_dir = var\nhostname = relay.test\nnode_id = 2A\n"
            "secret = a-test-secret-of-some-length\n\n"
            "[smtp]\nlisten = tcp:0:interface=127.0.0.1\n\n"
            "[web]\nlisten = tcp:%d:interface=127.0.0.1\n\n"
            "[tracking]\nbase_url = http://127.0.0.1:%d\n\n"
            "[feedback]\nbounce_domain = bounces.relay.test\nlisten = tcp:0:interface=127.0.0.1\n\n"
            "[delivery]\nsmarthost = tcp:host=127.0.0.1:port=%d\nretry = 5m\n\n"
            "[dkim:shop.example]\nselector = s1\nkey = %s\n"
            % (webPort, webPort, sinkPort, keyPath)
        )
        relay = RelayProcess(workdir, config)
        self.workdir = workdir
        self.addCleanup(relay.kill)
        relay.start()
        yield relay.waitReady(reactor)

        (code, text), _ = yield deferToThread(
            submit, relay.port, ["reader@example.org"], HTML_MESSAGE, "app@shop.example"
        )
        self.assertEqual(code, 250, text)
        queueID = text.split()[-1]
        yield waitFor(reactor, lambda: self.sink.received)
        [received] = self.sink.received
        tokens = Tokens.load(["a-test-secret-of-some-length"], os.path.join(workdir, "unused"))

        # VERP return path naming this message and recipient.
        local, _, domain = received.sender.partition("@")
        self.assertEqual(domain, "bounces.relay.test")
        self.assertEqual(tokens.readCompact("v", local.split("+", 1)[1]), (queueID, 0))

        # Control headers gone; List-Unsubscribe, Feedback-ID, Message-ID added.
        data = received.data
        message = message_from_bytes(data, policy=policy.default)
        self.assertIsNone(message["X-SmartRelay-Track"])
        self.assertIsNone(message["X-SmartRelay-Tag"])
        self.assertEqual(message["List-Unsubscribe-Post"], "List-Unsubscribe=One-Click")
        self.assertEqual(message["Feedback-ID"], "spring:shop.example:smartrelay")
        self.assertIsNotNone(message["Message-ID"])

        # DKIM verifies with dkimpy against the published key.
        record = txt.encode()

        def dnsfunc(name, timeout=5):
            return record if name.rstrip(b".") == b"s1._domainkey.shop.example" else None

        self.assertTrue(dkim.verify(data, dnsfunc=dnsfunc))
        signature = message["DKIM-Signature"]
        self.assertIn("list-unsubscribe", signature.lower())

        # The HTML link is tracked, mailto is not; the text part is untouched.
        text_part, html_part = [p for p in message.walk() if not p.is_multipart()]
        self.assertEqual(text_part.get_content().strip(), "See https://shop.example/sale")
        html = html_part.get_content()
        self.assertIn('href="mailto:help@shop.example"', html)
        self.assertIn("/t/o/", html)
        tracked = html.split('href="', 1)[1].split('"', 1)[0]
        self.assertTrue(tracked.startswith("http://127.0.0.1:%d/t/c/" % webPort), tracked)

        # Following it redirects to the original link and records a click.
        from twisted.web.client import HTTPConnectionPool

        pool = HTTPConnectionPool(reactor, persistent=False)
        response = yield treq.get(tracked, allow_redirects=False, pool=pool)
        yield response.content()
        self.assertEqual(response.code, 302)
        self.assertEqual(
            response.headers.getRawHeaders("location"), ["https://shop.example/sale?x=1&y=2"]
        )
        yield waitFor(reactor, lambda: any(e[0] == "clicked" for e in events(workdir)))

        # The one-click unsubscribe suppresses the address.
        https = message["List-Unsubscribe"].split(",")[0].strip(" <>")
        response = yield treq.post(
            https,
            data=b"List-Unsubscribe=One-Click",
            headers={"Content-Type": ["application/x-www-form-urlencoded"]},
            pool=pool,
        )
        yield response.content()
        self.assertEqual(response.code, 200)
        yield waitFor(reactor, lambda: any(e[0] == "unsubscribed" for e in events(workdir)))

        # The next message to that address is suppressed, not delivered.
        (code, text), _ = yield deferToThread(
            submit, relay.port, ["reader@example.org"], HTML_MESSAGE, "app@shop.example"
        )
        self.assertEqual(code, 250)
        second = text.split()[-1]
        yield waitFor(
            reactor, lambda: any(e[0] == "suppressed" and e[1] == second for e in events(workdir))
        )
        yield relay.stop()
        self.assertEqual(len(self.sink.received), 1)
        byType = {}
        for kind, qid, recipient, detail in events(workdir):
            byType.setdefault(kind, []).append((qid, json.loads(detail)))
        self.assertEqual(byType["suppressed"], [(second, {"reason": "unsubscribe"})])
        self.assertEqual(byType["clicked"][0][1]["url"], "https://shop.example/sale?x=1&y=2")
        # Tag and metadata travel with every event of the message.
        connection = sqlite3.connect(os.path.join(workdir, "var", "smartrelay.sqlite"))
        try:
            tags = connection.execute(
                "SELECT DISTINCT type, tag FROM events WHERE queue_id = ?", (queueID,)
            ).fetchall()
        finally:
            connection.close()
        self.assertEqual({tag for _, tag in tags}, {"spring"})
        self.assertTrue({"accepted", "delivered", "clicked"} <= {kind for kind, _ in tags})
