#!/usr/bin/env python3
"""
Feedback benchmark: reports per second end to end through a real `twistd
smartrelay`: the feedback listener's SMTP transaction (every 250 after the
report is durable: file fsync, rename, directory fsync), the report read
and classified, its event written and the recipient put on the
suppression list.

The client (in this process, Twisted, N concurrent connections, several
reports per connection) sends DSNs -- hard bounces (5.1.1) with a
different recipient each -- to valid VERP addresses made with the relay's
secret.  The clock runs from the first connection until the last report
has been processed (the suppression list holds every recipient).  Several
runs; medians printed.

    python3 bench/feedback.py                      # 3 runs, 16 connections, 5,000 reports
    python3 bench/feedback.py --reports 20000 --connections 32
"""

import argparse
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time

from twisted.internet import defer, protocol, reactor
from twisted.protocols.basic import LineReceiver

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from accept import freePort, installedEnvironment, installedScript, peakRSS  # noqa: E402

from smartrelay.tokens import Tokens, deriveKey  # noqa: E402

SECRET = "a-benchmark-secret-0123456789"
DOMAIN = "relay.bench.test"

DSN = (
    "From: Mail Delivery System <MAILER-DAEMON@mx%(n)d.example.org>\r\n"
    "To: %(verp)s\r\n"
    "Subject: Undelivered Mail Returned to Sender\r\n"
    "Auto-Submitted: auto-replied\r\n"
    "MIME-Version: 1.0\r\n"
    'Content-Type: multipart/report; report-type=delivery-status; boundary="B%(n)d"\r\n'
    "\r\n"
    "--B%(n)d\r\n"
    "Content-Type: text/plain; charset=us-ascii\r\n"
    "\r\n"
    "This is the mail system at host mx%(n)d.example.org.\r\n"
    "\r\n"
    "I'm sorry to have to inform you that your message could not\r\n"
    "be delivered to one or more recipients.\r\n"
    "\r\n"
    "<%(rcpt)s>: host mx%(n)d.example.org said: 550 5.1.1 <%(rcpt)s>:\r\n"
    "    Recipient address rejected: User unknown in virtual mailbox table\r\n"
    "\r\n"
    "--B%(n)d\r\n"
    "Content-Type: message/delivery-status\r\n"
    "\r\n"
    "Reporting-MTA: dns; mx%(n)d.example.org\r\n"
    "\r\n"
    "Final-Recipient: rfc822; %(rcpt)s\r\n"
    "Original-Recipient: rfc822;%(rcpt)s\r\n"
    "Action: failed\r\n"
    "Status: 5.1.1\r\n"
    "Remote-MTA: dns; mx%(n)d.example.org\r\n"
    "Diagnostic-Code: smtp; 550 5.1.1 <%(rcpt)s>: Recipient address rejected:\r\n"
    "    User unknown in virtual mailbox table\r\n"
    "\r\n"
    "--B%(n)d\r\n"
    "Content-Type: text/rfc822-headers\r\n"
    "\r\n"
    "X-SmartRelay-ID: %(queue)s\r\n"
    "From: App <app@example.com>\r\n"
    "To: %(rcpt)s\r\n"
    "Subject: Your order\r\n"
    "\r\n"
    "--B%(n)d--\r\n"
)


def reports(count: int) -> list:
    """
    (VERP address, report bytes) pairs, each for another recipient.
    """
    tokens = Tokens([deriveKey(SECRET)])
    out = []
    for n in range(count):
        queueID = "01/01-%05d-5C348706" % (n % 100000,)
        verp = "bounce+%s@%s" % (tokens.compact("v", queueID, 0), DOMAIN)
        data = DSN % {"n": n, "verp": verp, "rcpt": "user%d@example.org" % (n,), "queue": queueID}
        # Dot-stuffing (no line starts with a dot here) and the end marker.
        out.append((verp, data.encode("ascii") + b".\r\n"))
    return out


class Sender(LineReceiver):
    """
    One connection: sends reports from the shared queue one after the other
    (MAIL, RCPT, DATA, the report), each waiting for its reply.
    """

    def connectionMade(self):
        self.step = "banner"

    def lineReceived(self, line):
        if line[3:4] == b"-":
            return
        code = line[:3]
        step = self.step
        if step == "banner":
            self.sendLine(b"EHLO bench.client")
            self.step = "ehlo"
        elif step in ("ehlo", "done"):
            if step == "done":
                if code != b"250":
                    self.factory.failed.append(line)
                self.factory.answered += 1
            self.next()
        elif step == "mail":
            self.sendLine(b"RCPT TO:<%s>" % (self.verp.encode(),))
            self.step = "rcpt"
        elif step == "rcpt":
            if code != b"250":
                self.factory.failed.append(line)
            self.sendLine(b"DATA")
            self.step = "data"
        elif step == "data":
            self.transport.write(self.data)
            self.step = "done"

    def next(self):
        if not self.factory.queue:
            self.sendLine(b"QUIT")
            self.step = "quit"
            self.transport.loseConnection()
            return
        self.verp, self.data = self.factory.queue.pop()
        self.sendLine(b"MAIL FROM:<>")
        self.step = "mail"


class SenderFactory(protocol.ClientFactory):
    protocol = Sender

    def __init__(self, queue):
        self.queue = queue
        self.answered = 0
        self.failed = []


def writeConfig(workdir: str, feedbackPort: int, logMessages: bool) -> str:
    config = os.path.join(workdir, "smartrelay.ini")
    with open(config, "w") as f:
        f.write(
            f"""[smartrelay]
data_dir = {workdir}/var
hostname = {DOMAIN}
secret = {SECRET}
log_messages = {'on' if logMessages else 'off'}

[web]
listen = tcp:0:interface=127.0.0.1

[smtp]
listen = tcp:0:interface=127.0.0.1

[feedback]
listen = tcp:{feedbackPort}:interface=127.0.0.1
max_connections_per_client = 1000

[delivery]
hold = on
"""
        )
    return config


def suppressed(database: str) -> int:
    connection = sqlite3.connect(database, timeout=30)
    try:
        return connection.execute("SELECT count(*) FROM suppressions").fetchone()[0]
    except sqlite3.OperationalError:
        return 0
    finally:
        connection.close()


def cpuSeconds(pid: int) -> float:
    """
    User + system CPU seconds of process C{pid} and of its children (the
    re-wrap worker) so far.
    """
    total = 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    pids = [pid]
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            pids += [int(p) for p in f.read().split()]
    except OSError:
        pass
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def sleep(seconds: float) -> defer.Deferred:
    d = defer.Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


async def oneRun(args) -> dict:
    workdir = tempfile.mkdtemp(prefix="smartrelay-bench-feedback-", dir=args.tmp)
    port = freePort()
    config = writeConfig(workdir, port, not args.quiet)
    log = os.path.join(workdir, "twistd.log")
    relay = subprocess.Popen(
        [installedScript("twistd"), "-n", "--pidfile=", "--logfile", log,
         "smartrelay", "--config", config],
        cwd=workdir, env=installedEnvironment(), stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while "accepting mail on" not in (open(log).read() if os.path.exists(log) else ""):
            if relay.poll() is not None or time.monotonic() > deadline:
                sys.exit("bench: relay did not start:\n" + open(log).read())
            await sleep(0.05)
        profiler = None
        if args.profile:
            # py-spy (PyPI) samples the relay's threads while reports arrive.
            profiler = subprocess.Popen(
                ["py-spy", "record", "-p", str(relay.pid), "-r", "200", "-f", "raw",
                 "-o", args.profile, "--nonblocking", "-d", "8"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        queue = reports(args.reports)
        factory = SenderFactory(queue)
        database = os.path.join(workdir, "var", "smartrelay.sqlite")
        cpuBefore = cpuSeconds(relay.pid)
        started = time.monotonic()
        for _ in range(args.connections):
            reactor.connectTCP("127.0.0.1", port, factory)
        while factory.answered < args.reports and not factory.failed:
            await sleep(0.01)
        accepted = time.monotonic() - started
        if factory.failed:
            sys.exit("bench: refused: %r" % (factory.failed[:3],))
        last, lastChange = -1, time.monotonic()
        while True:
            count = suppressed(database)
            if count >= args.reports:
                break
            if count != last:
                last, lastChange = count, time.monotonic()
            elif time.monotonic() - lastChange > 30:
                sys.exit("bench: stuck at %d suppressed; the relay's log ends:\n%s"
                         % (count, open(log).read()[-3000:]))
            await sleep(0.05)
        processed = time.monotonic() - started
        count = suppressed(database)
        cpu = cpuSeconds(relay.pid) - cpuBefore
        rss = peakRSS(relay.pid)
        if profiler is not None:
            profiler.wait(30)
            args.profile = None  # the first run only
    finally:
        relay.send_signal(signal.SIGTERM)
        relay.wait(60)
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "suppressed": count,
        "accept_rate": args.reports / accepted,
        "end_to_end_rate": count / processed,
        "peak_rss_mb": rss / 2**20,
        "cpu_ms": cpu * 1000 / count,
    }


async def main(args):
    results = []
    for n in range(args.runs):
        r = await oneRun(args)
        results.append(r)
        print(
            "run %d: %6.0f reports/s accepted (250), %6.0f reports/s end to end, "
            "%d suppressed, relay CPU %.2f ms per report, peak RSS %.0f MB"
            % (n + 1, r["accept_rate"], r["end_to_end_rate"], r["suppressed"], r["cpu_ms"],
               r["peak_rss_mb"]),
            flush=True,
        )
    print(
        "median of %d: %.0f reports/s accepted, %.0f reports/s end to end, "
        "relay CPU %.2f ms per report"
        % (
            len(results),
            statistics.median(r["accept_rate"] for r in results),
            statistics.median(r["end_to_end_rate"] for r in results),
            statistics.median(r["cpu_ms"] for r in results),
        ),
        flush=True,
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--reports", type=int, default=5000)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--tmp", default=None, help="directory for the relay's data")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--profile", metavar="FILE",
                        help="py-spy raw profile of the relay for 8 s of the first run")
    parser.add_argument("--quiet", action="store_true",
                        help="[smartrelay] log_messages = off (no line per report)")
    args = parser.parse_args()
    failures = []

    def run():
        d = defer.Deferred.fromCoroutine(main(args))
        d.addErrback(failures.append)
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(run)
    reactor.run()
    if failures:
        failures[0].raiseException()
