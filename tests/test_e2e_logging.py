"""
End-to-end tests of the relay's log as an operator reads it: the installed
C{twistd} with C{--logger smartrelay.logs.jsonObserver}, real SMTP clients
and a real SMTP sink on loopback ports chosen by the OS.
"""

import json
import os
import re
import smtplib
import urllib.error
import urllib.request

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from smartrelay.auth import hashPassword
from tests.sink import RelayProcess, Sink, waitFor

TEXT = "From: app@example.com\r\nTo: ok@example.org\r\nSubject: hi\r\n\r\nhello\r\n"
RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


class JSONRelayProcess(RelayProcess):
    """
    The relay with twistd's C{--logger smartrelay.logs.jsonObserver}: its
    log is its standard output, one JSON object a line.
    """

    def __init__(self, workdir: str, configText: str):
        super().__init__(workdir, configText)
        self.logPath = os.path.join(workdir, "stdout.jsonl")

    def logging(self) -> tuple:
        return ["--logger", "smartrelay.logs.jsonObserver"], open(self.logPath, "ab")

    def records(self) -> list:
        """
        Every line written so far, parsed (each must be JSON).
        """
        return [json.loads(line) for line in self.log().splitlines() if line.strip()]


def submitAndAuth(port, recipients, login=None, source="127.0.0.1"):
    """
    One submission with smtplib from C{source}; returns the DATA reply.
    """
    with smtplib.SMTP("127.0.0.1", port, timeout=30, source_address=(source, 0)) as client:
        client.ehlo("client.test")
        if login is not None:
            client.login(*login)
        client.mail("app@example.com")
        for recipient in recipients:
            client.rcpt(recipient)
        return client.data(TEXT.encode())


def authOnce(port, user, password, source="127.0.0.1"):
    """
    One AUTH PLAIN from C{source}; returns its (code, text).
    """
    import base64

    with smtplib.SMTP("127.0.0.1", port, timeout=30, source_address=(source, 0)) as client:
        client.ehlo("client.test")
        token = base64.b64encode(b"\0" + user.encode() + b"\0" + password.encode()).decode()
        code, text = client.docmd("AUTH", "PLAIN " + token)
        return code, text.decode()


class RelayLogTests(TestCase):
    """
    Runs the relay (L{processClass}) with a sink to relay to.
    """

    timeout = 120
    processClass = RelayProcess

    def startSink(self):
        self.sink = Sink()
        port = reactor.listenTCP(0, self.sink, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.sinkPort = port.getHost().port
        return self.sinkPort

    def startRelay(self, extra=""):
        sinkPort = self.startSink()
        workdir = os.path.abspath(self.mktemp())
        users = os.path.join(workdir, "users")
        os.makedirs(workdir)
        with open(users, "w") as f:
            f.write("app1:%s\n" % hashPassword("right", ln=4))
        config = (
            "[smartrelay]\ndata_dir = var\nhostname = relay.test\nnode_id = 2A\n\n"
            "[web]\nlisten = tcp:0:interface=127.0.0.1\n\n"
            "[smtp]\nlisten = tcp:0:interface=127.0.0.1\nauth_file = %s\n%s\n"
            "[delivery]\nsmarthost = tcp:host=127.0.0.1:port=%d\nretry = 5m\n"
            % (users, extra, sinkPort)
        )
        relay = self.processClass(workdir, config)
        self.addCleanup(relay.kill)
        relay.start()
        return relay


class JSONLogTests(RelayLogTests):
    processClass = JSONRelayProcess

    @inlineCallbacks
    def test_acceptedAndDeliveredLines(self):
        """
        Under C{--logger smartrelay.logs.jsonObserver} every line of the
        relay's standard output is a JSON object with an RFC 3339 time, a
        level, a namespace and a text; the queue id from the 250 reply
        finds one accepted line (sender, recipient count, client, user) and
        one line per recipient's outcome (relay, reply, delay, status).
        """
        relay = self.startRelay()
        yield relay.waitReady(reactor)
        code, text = yield deferToThread(
            submitAndAuth, relay.port, ["ok@example.org", "bounce@example.org"],
            login=("app1", "right"),
        )
        self.assertEqual(code, 250, text)
        queueID = text.decode().split()[-1]

        def outcomes():
            return [
                r for r in relay.records()
                if r.get("queue_id") == queueID and r.get("status") in ("delivered", "bounced")
            ]

        yield waitFor(reactor, lambda: len(outcomes()) == 2)
        yield relay.stop()
        records = relay.records()
        self.assertGreater(len(records), 5)
        for record in records:
            self.assertRegex(record["time"], RFC3339)
            self.assertIn(record["level"], ("debug", "info", "warn", "error", "critical"))
            self.assertIsInstance(record["namespace"], str)
            self.assertIsInstance(record["text"], str)
        self.assertTrue(any("accepting mail on" in r["text"] for r in records))

        [accepted] = [r for r in records if r.get("queue_id") == queueID and "nrcpt" in r]
        self.assertEqual(
            {k: accepted[k] for k in ("namespace", "sender", "nrcpt", "client", "user", "helo")},
            {"namespace": "smartrelay.messages", "sender": "app@example.com", "nrcpt": 2,
             "client": "127.0.0.1", "user": "app1", "helo": "client.test"},
        )
        self.assertEqual(
            accepted["text"],
            f"accepted {queueID} from=<app@example.com> size={accepted['size']} nrcpt=2 "
            "client=127.0.0.1 user=app1",
        )
        byRecipient = {r["recipient"]: r for r in outcomes()}
        delivered = byRecipient["ok@example.org"]
        self.assertEqual(
            (delivered["status"], delivered["relay"], delivered["dsn"]),
            ("delivered", f"127.0.0.1:{self.sinkPort}", "2.0.0"),
        )
        self.assertTrue(delivered["reply"].startswith("250 "), delivered)
        self.assertGreaterEqual(delivered["delay"], 0)
        self.assertIn(f"{queueID} to=<ok@example.org> relay=", delivered["text"])
        self.assertIn("status=delivered (250 ", delivered["text"])
        bounced = byRecipient["bounce@example.org"]
        self.assertEqual((bounced["status"], bounced["dsn"]), ("bounced", "5.1.1"))
        self.assertTrue(bounced["reply"].startswith("550 "), bounced)

    @inlineCallbacks
    def test_authLockOut(self):
        """
        From one address, wrong passwords past auth_client_failures get
        454 4.7.0 even with the right password, and the lock-out is one
        JSON line with the client and the user; the right password from
        another address still logs in and submits.
        """
        relay = self.startRelay(
            "auth_client_failures = 3/15m\nauth_failure_delay = 0\nauth_lockout = 15m\n"
        )
        yield relay.waitReady(reactor)
        for _ in range(3):
            code, text = yield deferToThread(authOnce, relay.port, "app1", "wrong")
            self.assertEqual(code, 535, text)
        code, text = yield deferToThread(authOnce, relay.port, "app1", "right")
        self.assertEqual((code, text), (454, "4.7.0 Too many failed authentications, try again later"))
        code, text = yield deferToThread(
            submitAndAuth, relay.port, ["ok@example.org"], login=("app1", "right"),
            source="127.0.0.2",
        )
        self.assertEqual(code, 250, text)
        yield relay.stop()
        [locked] = [r for r in relay.records() if r.get("scope") == "client"]
        self.assertEqual(
            (locked["level"], locked["client"], locked["user"], locked["service"]),
            ("warn", "127.0.0.1", "app1", "SMTP AUTH"),
        )
        failures = [r for r in relay.records() if r["text"].startswith("failed SMTP AUTH")]
        self.assertEqual(len(failures), 3)
        self.assertEqual({(r["client"], r["user"]) for r in failures}, {("127.0.0.1", "app1")})


def fetch(url):
    """
    GET C{url}; its status code.
    """
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


#: twistd's time stamp (RFC 3339 to the second, with the UTC offset).
STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4}"


class TextLogTests(RelayLogTests):
    """
    twistd's own text log file (C{--logfile}), where the message lines and
    the access lines are written in batches, straight to the file.
    """

    @inlineCallbacks
    def test_messageAndAccessLines(self):
        """
        The accepted line, a line per recipient and the web site's access
        line read as twistd writes a log event: C{TIME [NAMESPACE#LEVEL]
        TEXT}; after a clean stop every one is in the file.
        """
        relay = self.startRelay()
        yield relay.waitReady(reactor)
        webPort = int(re.search(r"web endpoints on .*port=(\d+)", relay.log()).group(1))
        code, text = yield deferToThread(
            submitAndAuth, relay.port, ["ok@example.org", "bounce@example.org"],
            login=("app1", "right"),
        )
        self.assertEqual(code, 250, text)
        queueID = text.decode().split()[-1]
        status = yield deferToThread(fetch, f"http://127.0.0.1:{webPort}/healthz")
        yield waitFor(reactor, lambda: relay.log().count(f"{queueID} to=<") == 2)
        yield relay.stop()
        lines = relay.log().splitlines()
        q = re.escape(queueID)
        patterns = [
            rf"{STAMP} \[smartrelay\.messages#info\] accepted {q} from=<app@example\.com> "
            r"size=\d+ nrcpt=2 client=127\.0\.0\.1 user=app1",
            rf"{STAMP} \[smartrelay\.messages#info\] {q} to=<ok@example\.org> "
            rf"relay=127\.0\.0\.1:{self.sinkPort} delay=\d+\.\d attempts=1 dsn=2\.0\.0 "
            r"status=delivered \(250 .*\)",
            rf"{STAMP} \[smartrelay\.messages#info\] {q} to=<bounce@example\.org> "
            rf"relay=127\.0\.0\.1:{self.sinkPort} delay=\d+\.\d attempts=1 dsn=5\.1\.1 "
            r"status=bounced \(550 .*\)",
            rf'{STAMP} \[twisted\.python\.log#info\] "127\.0\.0\.1" - - \[[^]]+\] '
            rf'"GET /healthz HTTP/1\.1" {status} ',
        ]
        for pattern in patterns:
            self.assertEqual(
                len([line for line in lines if re.match(pattern, line)]), 1, (pattern, lines)
            )
