"""
Real peers for end-to-end tests: an SMTP sink server (built from
twisted.mail.smtp) that records what it receives and answers recipients by
their local part, and a helper to run C{twistd smartrelay} as a child
process on OS-chosen loopback ports.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from email.parser import BytesHeaderParser

import attrs
from twisted.internet import defer
from twisted.internet.protocol import ServerFactory
from twisted.internet.task import deferLater
from twisted.mail import smtp
from zope.interface import implementer

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def installedScript(name: str) -> str:
    """
    The console script C{name} (C{twistd}, C{smartrelay}) that pip installed
    for this Python: in its scheme's scripts folder, next to it, or on PATH.

    @raise RuntimeError: if there is none.
    """
    for folder in (sysconfig.get_path("scripts"), os.path.dirname(sys.executable)):
        path = os.path.join(folder, name)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"no {name} script for {sys.executable}: pip install -e '.[test]'")
    return found


def installedEnvironment() -> dict:
    """
    This process's environment without PYTHONPATH, for children that must
    run the installed smartrelay, not a checkout put on the path.
    """
    return {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}


@attrs.define
class Received:
    sender: str
    recipients: list
    data: bytes
    at: float = attrs.field(factory=time.monotonic)

    @property
    def queueID(self) -> str:
        return BytesHeaderParser().parsebytes(self.data)["X-SmartRelay-ID"]


@implementer(smtp.IMessage)
class _Message:
    def __init__(self, sink, sender, recipient):
        self.sink, self.sender, self.recipient = sink, sender, recipient
        self.lines = []

    def lineReceived(self, line):
        self.lines.append(line)

    def eomReceived(self):
        if self.sink.holding:
            # Answered (and counted as received) when the test fires it.
            self.sink.holding -= 1
            d = defer.Deferred()
            self.sink.held.append(d)
            return d
        self.sink.received.append(
            Received(self.sender, [self.recipient], b"\r\n".join(self.lines) + b"\r\n")
        )
        return defer.succeed(None)

    def connectionLost(self):
        pass


@implementer(smtp.IMessageDelivery)
class _Delivery:
    def __init__(self, sink):
        self.sink = sink

    def receivedHeader(self, helo, origin, recipients):
        return None

    def validateFrom(self, helo, origin):
        return origin

    def validateTo(self, user):
        local = user.dest.local.decode()
        if local.startswith("bounce"):
            raise smtp.SMTPBadRcpt(user, code=550, resp="5.1.1 No such user here")
        if local.startswith("defer"):
            raise smtp.SMTPBadRcpt(user, code=451, resp="4.2.0 Try again later")
        sender = str(user.orig) if user.orig else ""
        return lambda: _Message(self.sink, sender, str(user.dest))


class _SinkESMTP(smtp.ESMTP):
    def extensions(self):
        extensions = smtp.ESMTP.extensions(self)
        extensions.update(dict.fromkeys(self.factory.extensions))
        return extensions

    def do_MAIL(self, rest):
        self.factory.mailCommands.append(rest)
        smtp.ESMTP.do_MAIL(self, rest)

    def connectionMade(self):
        self.factory.connections += 1
        self.factory.open += 1
        self.factory.peak = max(self.factory.peak, self.factory.open)
        smtp.ESMTP.connectionMade(self)

    def connectionLost(self, reason):
        self.factory.open -= 1
        smtp.ESMTP.connectionLost(self, reason)


class Sink(ServerFactory):
    """
    An SMTP server that accepts everything except recipients whose local
    part starts with C{bounce} (550) or C{defer} (451).  It counts
    connections (C{connections} in all, C{open} now, C{peak} at most at
    once) and stamps each message with its arrival time.

    @ivar extensions: EHLO keywords it offers besides Twisted's own (AUTH,
        STARTTLS), such as C{(b"8BITMIME", b"SMTPUTF8")}; by default none,
        so it is a server without 8BITMIME and SMTPUTF8.
    @ivar mailCommands: what followed C{MAIL} in each MAIL command
        (C{FROM:<...>} and the parameters), as bytes.
    @ivar holding: how many of the next messages get no answer after their
        data (until the test fires their Deferred in C{held}).
    """

    def __init__(self, extensions=()):
        self.extensions = tuple(extensions)
        self.mailCommands = []
        self.received = []
        self.connections = 0
        self.open = 0
        self.peak = 0
        self.holding = 0
        self.held = []

    def buildProtocol(self, addr):
        p = _SinkESMTP()
        p.delivery = _Delivery(self)
        p.factory = self
        p.host = b"sink.test"
        return p

    def queueIDs(self) -> set:
        return {r.queueID for r in self.received}


def _status(pid):
    """
    C{/proc/PID/status} as a dict, or C{None} if there is no such process.
    """
    try:
        with open(f"/proc/{pid}/status") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


def childrenOf(pid):
    """
    The process ids of C{pid}'s running children (a relay's re-wrap
    workers).
    """
    children = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            status = _status(name)
            if status and status.get("PPid") == str(pid) and running(name):
                children.append(int(name))
    return children


def running(pid):
    """
    Whether process C{pid} exists and is not a zombie.
    """
    status = _status(pid)
    return status is not None and not status.get("State", "").startswith("Z")


def waitFor(reactor, condition, timeout=60.0, interval=0.05):
    """
    Poll C{condition} on the real reactor until it is true; fails after
    C{timeout} seconds (end-to-end tests only).
    """
    deadline = time.monotonic() + timeout

    @defer.inlineCallbacks
    def loop():
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError("condition not met within %.0f seconds" % timeout)
            yield deferLater(reactor, interval, lambda: None)

    return loop()


class RelayProcess:
    """
    C{twistd -n smartrelay --config PATH} as a child process, with its own
    log file; the SMTP port (L{port}) and the feedback port
    (L{feedbackPort}) are read from the log.  A config without a
    C{[feedback]} section gets one with an OS-chosen loopback port, so that
    relays of concurrent tests never compete for the default 2526.
    """

    def __init__(self, workdir: str, configText: str):
        self.workdir = workdir
        os.makedirs(workdir, exist_ok=True)
        self.configPath = os.path.join(workdir, "smartrelay.ini")
        if not re.search(r"(?m)^\[feedback\]", configText):
            configText += "\n[feedback]\nlisten = tcp:0:interface=127.0.0.1\n"
        with open(self.configPath, "w") as f:
            f.write(configText)
        self.logPath = os.path.join(workdir, "twistd.log")
        self.process = None
        self.port = None
        self.feedbackPort = None

    def logging(self) -> tuple:
        """
        twistd's logging options, and where the child's standard output
        goes: here, twistd's own log file.
        """
        return ["--logfile", self.logPath], subprocess.DEVNULL

    def start(self):
        self._logOffset = os.path.getsize(self.logPath) if os.path.exists(self.logPath) else 0
        options, stdout = self.logging()
        self.process = subprocess.Popen(
            [
                installedScript("twistd"),
                "-n",
                "--pidfile=",
                *options,
                "smartrelay",
                "--config",
                self.configPath,
            ],
            cwd=self.workdir,
            env=installedEnvironment(),
            stdout=stdout,
            stderr=open(os.path.join(self.workdir, "stderr.log"), "ab"),
        )

    def log(self) -> str:
        try:
            with open(self.logPath, encoding="utf-8", errors="replace") as f:
                f.seek(self._logOffset)
                return f.read()
        except FileNotFoundError:
            return ""

    def waitReady(self, reactor, timeout=30.0):
        def ready():
            if self.process.poll() is not None:
                raise AssertionError(
                    "relay exited with %s:\n%s" % (self.process.returncode, self.log())
                )
            log = self.log()
            match = re.search(r"accepting mail on .*port=(\d+)", log)
            if match:
                self.port = int(match.group(1))
                feedback = re.search(r"feedback: receiving reports on .*port=(\d+)", log)
                self.feedbackPort = int(feedback.group(1)) if feedback else None
                return True
            return False

        return waitFor(reactor, ready, timeout)

    def kill(self, sig=signal.SIGKILL):
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, sig)
            self.process.wait(30)

    def stop(self, reactor=None, timeout=60.0):
        """
        A clean stop (SIGTERM).

        @return: a L{Deferred} firing when the process has exited; the
            reactor keeps running meanwhile, so peers in this process (the
            sink) can answer the relay's goodbyes.
        """
        if reactor is None:
            from twisted.internet import reactor
        if self.process is None or self.process.poll() is not None:
            return defer.succeed(None)
        os.kill(self.process.pid, signal.SIGTERM)
        return waitFor(reactor, lambda: self.process.poll() is not None, timeout)
