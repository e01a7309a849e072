#!/usr/bin/env python3
"""
Acceptance benchmark: Postfix's smtp-source drives a real `twistd smartrelay`
(full durability: every 250 after file fsync, rename and directory fsync),
which relays to Postfix's smtp-sink on loopback at the same time.

Two modes, each run several times (medians printed):

* accept: `[delivery] hold = on`, the relay only accepts and spools (every
  250 after the message is durable): the acceptance rate the issue's target
  is about;
* relay: the relay delivers to smtp-sink while it accepts: acceptance rate
  under full load, and end-to-end rate (first connection to the last
  `delivered` event).

Prints messages/second (first connection to the last 250) and the relay's
peak RSS.

Needs smtp-source and smtp-sink (Debian package `postfix`; only the tools
are used, no Postfix server is started):

    apt-get install -y postfix
    python3 bench/accept.py                  # 3 runs per mode, 20 sessions, 20,000 x 2 KB
    python3 bench/accept.py --mode accept    # one mode only
    python3 bench/accept.py --reuse          # smtp-source -d: many messages per session
    python3 bench/accept.py --mode parked --messages 2000 --runs 9
                                             # in-process: CPU per parked recipient's record
    python3 bench/accept.py --mode parked --record-many   # ... with Spool.recordMany
"""

import argparse
import os
import re
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time


def installedScript(name: str) -> str:
    """
    The console script C{name} that pip installed for this Python (the
    relay under test is the installed one: C{pip install -e .} first).
    """
    for folder in (sysconfig.get_path("scripts"), os.path.dirname(sys.executable)):
        path = os.path.join(folder, name)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    found = shutil.which(name)
    if found is None:
        sys.exit(f"bench: no {name} script for {sys.executable}; pip install -e . first")
    return found


def installedEnvironment() -> dict:
    """
    This process's environment without PYTHONPATH; with
    C{SMARTRELAY_BENCH_TREE} set (a source tree, e.g. a C{git archive} of
    an earlier commit), that tree alone on the relay's PYTHONPATH, for A/B
    runs of two trees by the same benchmark code.
    """
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    tree = os.environ.get("SMARTRELAY_BENCH_TREE")
    if tree:
        env["PYTHONPATH"] = tree
    return env


def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tool(name: str) -> str:
    for candidate in (shutil.which(name), "/usr/sbin/" + name):
        if candidate and os.path.exists(candidate):
            return candidate
    sys.exit(f"bench: {name} not found; install it with: apt-get install -y postfix")


def writeConfig(workdir: str, smtpPort: int, sinkPort: int, extra: str, hold: bool,
                relayLines: str = "") -> str:
    """
    The benchmark relay's configuration file (its path): SMTP on
    C{smtpPort}, delivery to the sink on C{sinkPort}, C{extra} lines
    appended to C{[delivery]}, C{relayLines} to C{[smartrelay]}.
    """
    config = os.path.join(workdir, "smartrelay.ini")
    with open(config, "w") as f:
        f.write(
            f"""[smartrelay]
data_dir = {workdir}/var
hostname = relay.bench.test
{relayLines}

[web]
listen = tcp:0:interface=127.0.0.1

[feedback]
listen = tcp:0:interface=127.0.0.1

[smtp]
listen = tcp:{smtpPort}:interface=127.0.0.1
max_connections_per_client = 1000

[delivery]
smarthost = tcp:host=127.0.0.1:port={sinkPort}
hold = {"on" if hold else "off"}
{extra}
"""
        )
    return config


def startRelay(workdir: str, smtpPort: int, sinkPort: int, extra: str, hold: bool) -> tuple:
    config = writeConfig(workdir, smtpPort, sinkPort, extra, hold)
    log = os.path.join(workdir, "twistd.log")
    process = subprocess.Popen(
        [installedScript("twistd"),
         "-n", "--pidfile=", "--logfile", log, "smartrelay", "--config", config],
        cwd=workdir, env=installedEnvironment(), stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit("bench: relay exited:\n" + open(log).read())
        if os.path.exists(log) and "accepting mail on" in open(log).read():
            return process, log
        time.sleep(0.05)
    process.kill()
    sys.exit("bench: relay did not start:\n" + open(log).read())


def peakRSS(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) * 1024


def countEvents(database: str, kind: str) -> int:
    connection = sqlite3.connect(database, timeout=30)
    try:
        return connection.execute("SELECT count(*) FROM events WHERE type = ?", (kind,)).fetchone()[0]
    finally:
        connection.close()


def oneRun(args, mode: str) -> dict:
    workdir = tempfile.mkdtemp(prefix="smartrelay-bench-", dir=args.tmp)
    smtpPort, sinkPort = freePort(), freePort()
    sink = subprocess.Popen(
        [tool("smtp-sink"), "-u", "root", f"127.0.0.1:{sinkPort}", "1000"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    relay, log = startRelay(workdir, smtpPort, sinkPort, args.extra, hold=(mode == "accept"))
    try:
        command = [tool("smtp-source"), "-s", str(args.sessions), "-m", str(args.messages),
                   "-l", str(args.size), "-f", "app@bench.test", "-t", "rcpt@sink.test"]
        if args.reuse:
            command.append("-d")
        command.append(f"127.0.0.1:{smtpPort}")
        started = time.monotonic()
        result = subprocess.run(command, capture_output=True, text=True)
        elapsed = time.monotonic() - started
        if result.returncode != 0:
            print("smtp-source:", result.stdout, result.stderr, file=sys.stderr)
        database = os.path.join(workdir, "var", "smartrelay.sqlite")
        delivered, drained = 0, float("nan")
        if mode == "relay":
            # Wait for the queue to drain, to report end-to-end figures too.
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                time.sleep(0.5)
                delivered = countEvents(database, "delivered")
                if delivered >= args.messages:
                    break
            drained = time.monotonic() - started
        else:
            time.sleep(1)  # let the last accepted events reach the store
        rss = peakRSS(relay.pid)
        accepted = countEvents(database, "accepted")
    finally:
        relay.send_signal(signal.SIGTERM)
        relay.wait(60)
        sink.kill()
        sink.wait()
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "accepted": accepted,
        "delivered": delivered,
        "accept_rate": args.messages / elapsed,
        "end_to_end_rate": delivered / drained,
        "peak_rss_mb": rss / 2**20,
    }


def parkedRecord(args) -> None:
    """
    C{--mode parked}: in this process, no network, no relay: the CPU time
    of the bulk record of parked recipients (issue 18), per recipient.
    C{--messages} one-recipient messages are parked at one suspended
    destination, then recorded as the scheduler's C{_recordParked} does:
    L{Parking._flush}, one C{Spool.record} per message (a real spool in a
    temporary directory; its thread hand-off replaced by a reactor turn on
    a fake clock, so that the records share one group commit), a
    L{DeferredList} over them, and one C{EventLog.emit} per recipient with
    the suspension's shared detail; then the event log's batch into a real
    SQLite store (same hand-off).  Repeated C{--runs} times on the same
    messages (each repetition a later retry).  The imported C{smartrelay}
    is measured: put a tree first on C{PYTHONPATH} to measure another.
    """
    from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
    from twisted.internet.task import Clock

    import smartrelay
    from smartrelay.events import EventLog
    from smartrelay.message import Recipient, SpoolEntry
    from smartrelay.outbound.parking import Parking
    from smartrelay.outbound.session import Reply
    from smartrelay.spool import Spool
    from smartrelay.store.sqlite import SQLiteStore

    class Retries:
        def delay(self, failures):
            return 60.0 * failures

    workdir = tempfile.mkdtemp(prefix="smartrelay-bench-parked-", dir=args.tmp)
    clock = Clock()
    clock.advance(1_700_000_000.0)

    def inTurn(f, *a, **kw):
        # The thread pool's hand-off, as a later reactor turn.
        d = Deferred()
        clock.callLater(0, lambda: maybeDeferred(f, *a, **kw).chainDeferred(d))
        return d

    def turns(n=8):
        for _ in range(n):
            clock.advance(0)

    spool = Spool(os.path.join(workdir, "spool"), inTurn, clock=clock)
    store = SQLiteStore(os.path.join(workdir, "events.sqlite"), inTurn)
    events = EventLog(store, clock, maxBatch=args.messages + 1)
    for d in (spool.recover(), store.start()):
        turns()
    entries = [
        SpoolEntry(queue_id="79BC-%05d-5C348706" % n, sender="app@bench.test",
                   recipients=[Recipient("rcpt%d@sink.test" % n)], received=clock.seconds(),
                   size=args.size)
        for n in range(args.messages)
    ]
    body = b"x" * args.size
    for entry in entries:
        spool.store(entry, body)
    turns()

    def record(batch):
        # As DeliveryScheduler._recordParked (its log lines left out); with
        # --record-many, as it would with Spool.recordMany.
        if args.record_many:
            recording = spool.recordMany([(entry, changes) for entry, changes, _ in batch])
        else:
            recording = DeferredList(
                [maybeDeferred(spool.record, entry, changes) for entry, changes, _ in batch],
                consumeErrors=True)

        def recorded(results):
            for (ok, _), (entry, changes, evs) in zip(results, batch):
                if ok:
                    for kind, address, detail, line in evs:
                        events.emit(kind, entry.queue_id, address, tag=entry.tag,
                                    metadata=entry.metadata or None, detail=detail)

        recording.addCallback(recorded)

    parking = Parking(clock=clock, retry=Retries(), maxAge=10 * 86400.0, record=record,
                      expire=None, release=None, opening=lambda key: False,
                      chunk=args.messages + 1)
    refused = Reply(451, "4.4.1", "cannot connect to 127.0.0.1:25: Connection refused")
    parking.suspend("relay:127.0.0.1:25", refused, "127.0.0.1:25")
    for entry in entries:
        parking.park("relay:127.0.0.1:25", entry, [entry.recipients[0].address])
    costs = []
    for n in range(args.runs):
        if n:
            parking.suspend("relay:127.0.0.1:25", refused, "127.0.0.1:25")
        timer = parking._flushTimer
        if timer is not None and timer.active():
            timer.cancel()
        started = time.process_time()
        parking._flush()
        turns(20)  # the group commit, the events emitted, their batch written
        costs.append((time.process_time() - started) / args.messages * 1e6)
        print("parked run %d: %.1f us CPU per parked recipient" % (n + 1, costs[-1]), flush=True)
        if events.backlog or events.writesInFlight:
            sys.exit("bench: events still being written after 20 turns")
    deferred = [r.state for e in entries for r in e.recipients].count("deferred")
    if deferred != args.messages:
        sys.exit(f"bench: only {deferred} of {args.messages} recipients recorded as deferred")
    stored = countEvents(os.path.join(workdir, "events.sqlite"), "deferred")
    if stored != args.messages * args.runs:
        sys.exit(f"bench: {stored} deferred events stored, not {args.messages * args.runs}")
    parking.stop()
    print("parked median of %d (%s, %d recipients%s): %.1f us CPU per parked recipient "
          "(flush, spool record and group commit, event, its SQLite write)"
          % (args.runs, os.path.dirname(smartrelay.__file__), args.messages,
             ", recordMany" if args.record_many else "", statistics.median(costs)), flush=True)
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--reuse", action="store_true", help="smtp-source -d (reuse sessions)")
    parser.add_argument("--mode", choices=["accept", "relay", "both", "parked"], default="both",
                        help="parked: the bulk record of parked recipients, in this process")
    parser.add_argument("--record-many", action="store_true",
                        help="--mode parked: record with one Spool.recordMany call instead "
                             "of a Spool.record per message and a DeferredList")
    parser.add_argument("--extra", default="", help="extra lines for the [delivery] section")
    parser.add_argument("--tmp", default=None, help="directory for the relay's data")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    if args.mode == "parked":
        parkedRecord(args)
        return
    modes = ["accept", "relay"] if args.mode == "both" else [args.mode]
    for mode in modes:
        results = []
        for n in range(args.runs):
            r = oneRun(args, mode)
            results.append(r)
            print(
                "%s run %d: %6.0f msg/s accepted, %6.0f msg/s end to end, accepted %d, "
                "delivered %d, peak RSS %.0f MB"
                % (mode, n + 1, r["accept_rate"], r["end_to_end_rate"], r["accepted"],
                   r["delivered"], r["peak_rss_mb"]),
                flush=True,
            )
        print(
            "%s median of %d: %.0f msg/s accepted, %.0f msg/s end to end, peak RSS %.0f MB"
            % (
                mode,
                len(results),
                statistics.median(r["accept_rate"] for r in results),
                statistics.median(r["end_to_end_rate"] for r in results),
                statistics.median(r["peak_rss_mb"] for r in results),
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
