"""
Tests for L{smartrelay.reload}: SIGHUP re-reads the configuration and the
users, applies what it can and names the keys that need a restart.  Unit
tests on a memory reactor with synchronous threads; one end-to-end test
with the installed twistd.
"""

import os
import signal
import smtplib
import ssl
import urllib.error
import urllib.request

from twisted.internet import reactor
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock
from twisted.internet.threads import deferToThread
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from smartrelay.auth import HashedPasswordChecker, hashPassword
from smartrelay.config import parseConfig
from smartrelay.reload import Reloader, changedKeys, installReloadSignal
from smartrelay.service import makeRelayService
from tests.sink import RelayProcess, Sink, waitFor
from tests.test_e2e import RelayTestMixin, writeSelfSigned
from tests.test_e2e_api import webPort
from tests.test_service import SynchronousThreads

BASE = (
    "[smartrelay]\ndata_dir = {data}\nhostname = relay.test\n"
    "[smtp]\nlisten = tcp:2525:interface=127.0.0.1\n{smtp}"
    "[web]\nlisten = tcp:8080:interface=127.0.0.1\n"
    "[delivery]\nsmarthost = tcp:host=127.0.0.1:port=2599\nrewrap_workers = 0\n"
    "[feedback]\n{feedback}"
)


class ChangedKeysTests(SynchronousTestCase):
    """
    L{changedKeys} compares two configurations key by key.
    """

    def test_keys(self) -> None:
        """
        Changed keys are named with their section; added and removed named
        sections by their header alone.
        """
        old = parseConfig("[smtp]\nmax_recipients = 10\n[domain:a.test]\nrate = 10/m\n")
        new = parseConfig("[smtp]\nmax_recipients = 11\n[domain:b.test]\nrate = 10/m\n"
                          "[delivery]\nhold = on\n")
        self.assertEqual(changedKeys(old, new), [
            ("smtp", "max_recipients"), ("delivery", "hold"),
            ("domain:a.test", ""), ("domain:b.test", ""),
        ])

    def test_same(self) -> None:
        """
        The same text gives no change.
        """
        text = "[delivery]\nthrottle_patterns = slow\n[domain:a.test]\nrate = 5/s\n"
        self.assertEqual(changedKeys(parseConfig(text), parseConfig(text)), [])


class ReloaderTests(SynchronousTestCase):
    """
    L{Reloader} applied to a relay built on a memory reactor.
    """

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.users = os.path.join(self.dir, "users")
        self.writeUsers("app1")
        self.path = os.path.join(self.dir, "smartrelay.ini")
        self.smtp = f"auth_file = {self.users}\n"
        self.feedback = ""
        self.writeConfig()
        self.service = makeRelayService(
            parseConfig(open(self.path).read(), self.path), MemoryReactorClock(),
            SynchronousThreads(),
        )
        self.reloader = Reloader.forService(self.service, self.path)
        # Running as far as the reloader can tell (no start-up on the
        # memory reactor needed for what it touches).
        self.service.running = 1
        self.logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    _hashes: dict = {}

    def writeUsers(self, *names: str) -> None:
        with open(self.users, "w") as f:
            for name in names:
                if name not in self._hashes:
                    self._hashes[name] = hashPassword("pw-" + name, ln=1)
                f.write(f"{name}:{self._hashes[name]}\n")

    def writeConfig(self, extra: str = "") -> None:
        with open(self.path, "w") as f:
            f.write(BASE.format(data=os.path.join(self.dir, "var"), smtp=self.smtp,
                                feedback=self.feedback) + extra)

    def reload(self):
        return self.successResultOf(self.reloader.reload())

    def messages(self, level=None) -> list[str]:
        from twisted.logger import formatEvent

        return [formatEvent(e) for e in self.logged
                if level is None or e["log_level"] == level]

    def test_usersReread(self) -> None:
        """
        A user added to the users file can log in after a reload; the
        checker is the same object, with the new users.
        """
        checker = self.service.policy.checker
        self.writeUsers("app1", "app2")
        report = self.reload()
        self.assertIs(self.service.policy.checker, checker)
        self.assertEqual(sorted(checker.passwords.hashes), ["app1", "app2"])
        self.assertEqual(report.users, 2)
        self.assertEqual(report.restart, ())
        self.assertIn("1 added, 0 removed, 0 with a new password", " ".join(self.messages()))
        from twisted.cred.credentials import UsernamePassword

        self.assertEqual(
            self.successResultOf(checker.requestAvatarId(UsernamePassword(b"app2", b"pw-app2"))),
            "app2")

    def test_authTurnedOnAndOff(self) -> None:
        """
        Setting C{[smtp] auth_file} turns AUTH on for the next sessions,
        removing it turns it off.
        """
        self.smtp = ""
        self.writeConfig()
        report = self.reload()
        self.assertIsNone(self.service.policy.checker)
        self.assertEqual(report.applied, (("smtp", "auth_file"),))
        self.smtp = f"auth_file = {self.users}\n"
        self.writeConfig()
        self.reload()
        self.assertIsInstance(self.service.policy.checker, HashedPasswordChecker)
        self.assertTrue(self.service.policy.authAvailable)

    def test_policyKeys(self) -> None:
        """
        C{allowed_clients}, C{max_recipients} and the soft-bounce limit
        take effect at once.
        """
        self.smtp += "allowed_clients = 10.0.0.0/8\nmax_recipients = 7\n"
        self.feedback = "soft_bounce_limit = 3\nsoft_bounce_window = 1d\n"
        self.writeConfig()
        report = self.reload()
        policy = self.service.policy
        self.assertEqual([str(n) for n in policy.allowedClients], ["10.0.0.0/8"])
        self.assertEqual(policy.maxRecipients, 7)
        self.assertEqual(self.service.bounceSuppressor.softLimit, 3)
        self.assertEqual(self.service.bounceSuppressor.softWindow, 86400.0)
        self.assertEqual(set(report.applied), {
            ("smtp", "allowed_clients"), ("smtp", "max_recipients"),
            ("feedback", "soft_bounce_limit"), ("feedback", "soft_bounce_window")})
        self.assertEqual(self.reload().applied, ())

    def test_apiTokens(self) -> None:
        """
        C{[web] api_tokens} changes the tokens the API accepts at once,
        without logging them.
        """
        self.assertEqual(self.service.api.tokens, ())
        token = "reloaded-token-0123456789abcdef"
        text = open(self.path).read().replace(
            "[web]\n", f"[web]\napi_tokens = {token}\n")
        with open(self.path, "w") as f:
            f.write(text)
        report = self.reload()
        self.assertEqual(self.service.api.tokens, (token,))
        self.assertEqual(report.applied, (("web", "api_tokens"),))
        self.assertNotIn(token, " ".join(self.messages()))
        self.assertIn("1 API token(s) now accepted", " ".join(self.messages()))

    def test_accessLogReopened(self) -> None:
        """
        A reload reopens an access log file (C{[web] access_log} a path),
        so lines after logrotate go to the new file.
        """
        reopened = []
        self.service.accessLog = type("Log", (), {"reopen": lambda self: reopened.append(1)})()
        self.reload()
        self.assertEqual(reopened, [1])

    def test_restartNeeded(self) -> None:
        """
        Keys that cannot change live are named in one warning, every reload
        until the restart, and are not applied.
        """
        self.smtp += "max_message_size = 1M\n"
        self.writeConfig("[tracking]\nbase_url = https://t.example.org\n")
        report = self.reload()
        self.assertEqual(report.restart, (("smtp", "max_message_size"), ("tracking", "base_url")))
        warnings = self.messages(LogLevel.warn)
        self.assertEqual(warnings, [
            "reload: [smtp] max_message_size, [tracking] base_url changed: "
            "restart smartrelay to apply"])
        self.assertEqual(self.reload().restart, report.restart)

    def test_secret(self) -> None:
        """
        A new token secret needs a restart, and the warning says why
        without showing it.
        """
        with open(self.path) as f:
            text = f.read()
        text = text.replace(
            "hostname = relay.test\n", "hostname = relay.test\nsecret = " + "s" * 40 + "\n")
        with open(self.path, "w") as f:
            f.write(text)
        report = self.reload()
        self.assertEqual(report.restart, (("smartrelay", "secret"),))
        warning = " ".join(self.messages(LogLevel.warn))
        self.assertIn("[smartrelay] secret (the token keys)", warning)
        self.assertNotIn("s" * 40, warning)

    def test_badConfig(self) -> None:
        """
        A configuration that does not load changes nothing and is logged as
        one error line naming the key.
        """
        checker = self.service.policy.checker
        self.smtp += "max_recipients = many\n"
        self.writeConfig()
        report = self.reload()
        self.assertIn("[smtp] max_recipients", report.problem)
        self.assertIs(self.service.policy.checker, checker)
        self.assertEqual(self.service.policy.maxRecipients, 1000)
        (error,) = self.messages(LogLevel.error)
        self.assertIn("the running configuration is kept", error)

    def test_badUsersFile(self) -> None:
        """
        A users file with a bad line keeps the running users.
        """
        with open(self.users, "a") as f:
            f.write("broken line\n")
        report = self.reload()
        self.assertIn("users:2: expected 'username:", report.problem)
        self.assertEqual(list(self.service.policy.checker.passwords.hashes), ["app1"])

    def test_notRunning(self) -> None:
        """
        A SIGHUP while the relay is stopping re-reads nothing.
        """
        self.service.running = 0
        self.writeUsers("app1", "app2")
        report = self.reload()
        self.assertEqual(report.problem, "the relay is not running")
        self.assertEqual(list(self.service.policy.checker.passwords.hashes), ["app1"])

    def test_configGone(self) -> None:
        """
        A configuration file that has gone is an error line, not a crash.
        """
        os.unlink(self.path)
        report = self.reload()
        self.assertIn("cannot read", report.problem)


class _Signals:
    """
    A stand-in for the L{signal} module that records handlers.
    """

    SIGHUP = signal.SIGHUP

    def __init__(self) -> None:
        self.handlers: dict = {}

    def signal(self, number, handler) -> None:
        self.handlers[number] = handler


class _ThreadCalls:
    def __init__(self) -> None:
        self.calls: list = []

    def callFromThread(self, f, *args) -> None:
        self.calls.append((f, args))


class SignalTests(SynchronousTestCase):
    """
    L{installReloadSignal} wires SIGHUP to the reactor thread.
    """

    def test_handler(self) -> None:
        """
        The SIGHUP handler only asks the reactor thread to reload.
        """
        signals, fakeReactor = _Signals(), _ThreadCalls()
        reloader = object.__new__(Reloader)
        handler = installReloadSignal(fakeReactor, reloader, signals)
        self.assertIs(signals.handlers[signal.SIGHUP], handler)
        handler(signal.SIGHUP, None)
        self.assertEqual(fakeReactor.calls, [(reloader.reload, ())])


API_TOKEN = "reload-e2e-token-0123456789abcdef"


def _apiStatus(port: int, token: str) -> int:
    """
    The status of C{GET /api/v1/queue} with C{token}.
    """
    request = urllib.request.Request(f"http://127.0.0.1:{port}/api/v1/queue",
                                     headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status
    except urllib.error.HTTPError as e:
        return e.code


def _session(port: int) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", port, timeout=30)
    client.ehlo("client.test")
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    client.starttls(context=context)
    client.ehlo("client.test")
    return client


class EndToEndTests(RelayTestMixin, TestCase):
    """
    SIGHUP to a real C{twistd smartrelay}.
    """

    async def test_newUser(self) -> None:
        """
        After SIGHUP a user just added can AUTH, a session opened before it
        stays up and still submits, and an API token just added is accepted.
        """
        self.sink = Sink()
        sinkPort = reactor.listenTCP(0, self.sink, interface="127.0.0.1")
        self.addCleanup(sinkPort.stopListening)
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(workdir)
        certificate, key = writeSelfSigned(workdir)
        users = os.path.join(workdir, "users")
        with open(users, "w") as f:
            f.write("app:%s\n" % hashPassword("s3cret", ln=4))
        extra = ("allowed_clients =\nauth_file = %s\ntls_certificate = %s\ntls_key = %s\n"
                 % (users, certificate, key))
        relay = RelayProcess(workdir, self.relayConfig(sinkPort.getHost().port, extra))
        self.addCleanup(relay.kill)
        relay.start()
        await relay.waitReady(reactor)

        old = await deferToThread(_session, relay.port)
        self.addCleanup(old.close)
        await deferToThread(old.login, "app", "s3cret")
        with open(users, "a") as f:
            f.write("newapp:%s\n" % hashPassword("n3w", ln=4))
        status = await deferToThread(_apiStatus, webPort(relay), API_TOKEN)
        self.assertEqual(status, 403)
        with open(relay.configPath) as f:
            text = f.read()
        with open(relay.configPath, "w") as f:
            f.write(text.replace("[web]\n", f"[web]\napi_tokens = {API_TOKEN}\n", 1))
        os.kill(relay.process.pid, signal.SIGHUP)
        await waitFor(reactor, lambda: "reload: done" in relay.log(), 30)
        self.assertIn("1 added, 0 removed", relay.log())

        new = await deferToThread(_session, relay.port)
        self.addCleanup(new.close)
        code, text = await deferToThread(new.login, "newapp", "n3w")
        self.assertEqual(code, 235)
        code, _ = await deferToThread(old.noop)
        self.assertEqual(code, 250)
        self.assertNotIn("restart smartrelay", relay.log())
        status = await deferToThread(_apiStatus, webPort(relay), API_TOKEN)
        self.assertEqual(status, 200)
        refused = await deferToThread(
            old.sendmail, "app@example.com", ["ok@example.org"],
            b"From: app@example.com\r\nSubject: after\r\n\r\nstill here\r\n")
        self.assertEqual(refused, {})
        await deferToThread(old.quit)
        await deferToThread(new.quit)
        await relay.stop()
