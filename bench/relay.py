#!/usr/bin/env python3
"""
End-to-end relay benchmark for the delivery engine: Postfix's smtp-source
drives a real `twistd smartrelay` on loopback, which delivers to Postfix's
smtp-sink as its smarthost.

Measures messages per second from the first byte in (smtp-source starts) to
the last message received at the sink (the sink's own running counter, read
as it streams), the median of several runs, plus the acceptance rate (first
connection to smtp-source's exit) and the relay's peak RSS (VmHWM).

Needs smtp-source and smtp-sink (Debian package `postfix`; only the tools
are used, no Postfix server is started):

    apt-get install -y postfix
    python3 bench/relay.py                         # 3 runs, 20 sessions, 20,000 x 2 KB
    python3 bench/relay.py --runs 1 --messages 2000
    python3 bench/relay.py --reuse                 # smtp-source -d: many messages per session
    python3 bench/relay.py --extra "max_connections_per_domain = 20"
    python3 bench/relay.py --dkim                  # DKIM-sign every message (RSA-2048)
    python3 bench/relay.py --dkim --eight-bit      # 8-bit messages, sink without 8BITMIME
"""

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import accept  # noqa: E402  (bench/accept.py: freePort, tool, peakRSS, countEvents)

_MESSAGES = re.compile(rb"mesg=(\d+)")


class BenchError(Exception):
    """
    A run could not complete; the message says why.
    """


class SinkCounter:
    """
    Postfix's smtp-sink run with C{-c}, whose running counters
    (C{sess=N quit=N mesg=N}, separated by carriage returns, written when a
    session ends, on QUIT and when "." is received) are read as they stream
    by a thread, which notes when each new message count was seen.

    @ivar messages: messages received so far ("." seen).
    @ivar lastMessageAt: C{time.monotonic()} when the count last went up.
    """

    def __init__(self, port: int, concurrency: int, eightBitMIME: bool = True) -> None:
        self.messages = 0
        self.lastMessageAt: Optional[float] = None
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self.process = subprocess.Popen(
            [accept.tool("smtp-sink"), "-c", "-u", "root", "-m", str(concurrency),
             *([] if eightBitMIME else ["-8"]), f"127.0.0.1:{port}", "1024"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        pending = b""
        while True:
            chunk = os.read(fd, 65536)
            now = time.monotonic()
            if not chunk:
                break
            pending += chunk
            *records, pending = re.split(rb"[\r\n]", pending)
            counts = [int(m.group(1)) for m in map(_MESSAGES.search, records) if m]
            if counts:
                with self._changed:
                    if max(counts) > self.messages:
                        self.messages = max(counts)
                        self.lastMessageAt = now
                    self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def waitFor(self, count: int, stall: float, limit: float) -> None:
        """
        Wait until C{count} messages have arrived.

        @param stall: give up if the count has not moved for this long.
        @param limit: give up after this long in all.
        @raise BenchError: on either time-out, or if the sink exits.
        """
        started = time.monotonic()
        with self._changed:
            lastCount, lastChange = self.messages, time.monotonic()
            while self.messages < count:
                now = time.monotonic()
                if self.process.poll() is not None:
                    raise BenchError(
                        f"smtp-sink exited ({self.process.returncode}) after "
                        f"{self.messages} messages: {self.stderr()}"
                    )
                if self.messages != lastCount:
                    lastCount, lastChange = self.messages, now
                if now - lastChange > stall:
                    raise BenchError(
                        f"no message reached the sink for {stall:.0f} s "
                        f"({self.messages} of {count} received)"
                    )
                if now - started > limit:
                    raise BenchError(
                        f"gave up after {limit:.0f} s: {self.messages} of {count} "
                        f"messages received at the sink"
                    )
                self._changed.wait(0.5)

    def stderr(self) -> str:
        if self.process.poll() is None or self.process.stderr is None:
            return ""
        return self.process.stderr.read().decode("utf-8", "replace").strip()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self._thread.join(5)
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()


def _tail(path: str, lines: int = 30) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return "(no log)"


def startRelay(workdir: str, smtpPort: int, sinkPort: int, extra: str, hold: bool = False) -> tuple:
    """
    Start C{twistd smartrelay} as L{accept.startRelay} does (same
    configuration, delivery not held unless C{hold}), but keep its standard
    error (where configuration errors go) and raise L{BenchError} instead
    of exiting.

    @return: C{(subprocess.Popen, log path)} once it accepts mail.
    """
    return startConfigured(workdir, accept.writeConfig(workdir, smtpPort, sinkPort, extra, hold=hold))


def startConfigured(workdir: str, config: str) -> tuple:
    """
    Start C{twistd smartrelay --config config} in C{workdir}, as
    L{startRelay} does.

    @return: C{(subprocess.Popen, log path)} once it accepts mail.
    @raise BenchError: if it exits or does not start in 30 s.
    """
    log = os.path.join(workdir, "twistd.log")
    errors = os.path.join(workdir, "twistd.stderr")
    with open(errors, "wb") as stderr:
        process = subprocess.Popen(
            [accept.installedScript("twistd"),
             "-n", "--pidfile=", "--logfile", log, "smartrelay", "--config", config],
            cwd=workdir, env=accept.installedEnvironment(), stdin=subprocess.DEVNULL,
            stdout=stderr, stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BenchError(
                f"relay exited ({process.returncode}):\n{_tail(errors)}{_tail(log)}"
            )
        if "accepting mail on" in _tail(log, 10_000):
            return process, log
        time.sleep(0.05)
    _stopRelay(process)
    raise BenchError(f"relay did not start within 30 s:\n{_tail(errors)}{_tail(log)}")


def _stopRelay(relay: subprocess.Popen) -> None:
    if relay.poll() is not None:
        return
    relay.send_signal(signal.SIGTERM)
    try:
        relay.wait(60)
    except subprocess.TimeoutExpired:
        print("bench: relay did not stop within 60 s of SIGTERM; killing it",
              file=sys.stderr)
        relay.kill()
        relay.wait()


def dkimSection(workdir: str, algorithm: str) -> str:
    """
    A fresh DKIM key for C{bench.test} (smtp-source's From domain) in
    C{workdir}, and the C{[dkim:bench.test]} section that signs with it.
    """
    from smartrelay.engine.dkim import generateKey

    pem, _ = generateKey(algorithm, 2048)
    path = os.path.join(workdir, "bench.key")
    with open(path, "wb") as f:
        f.write(pem)
    return f"[dkim:bench.test]\nselector = bench\nkey = {path}\nalgorithm = {algorithm}\n"


def eightBitMessage(workdir: str, size: int) -> str:
    """
    A file for C{smtp-source -F}: an 8-bit UTF-8 text message
    (C{Content-Transfer-Encoding: 8bit}, 8-bit Subject) from C{bench.test} of
    about C{size} bytes.
    """
    line = "Gr\u00fc\u00dfe aus K\u00f6ln, sch\u00f6ne Tage w\u00fcnscht der Laden \u2014 bis bald!"
    header = (
        "From: Laden <app@bench.test>\nTo: rcpt@sink.test\nSubject: Gr\u00fc\u00dfe\n"
        "MIME-Version: 1.0\nContent-Type: text/plain; charset=utf-8\n"
        "Content-Transfer-Encoding: 8bit\n\n"
    )
    lines = max(1, (size - len(header.encode("utf-8"))) // (len(line.encode("utf-8")) + 2))
    path = os.path.join(workdir, "eight-bit.eml")
    with open(path, "w", encoding="utf-8") as f:
        f.write(header + (line + "\n") * lines)
    return path


def oneRun(args: argparse.Namespace) -> dict:
    """
    One run: a fresh relay and sink, C{args.messages} messages through them.

    @return: the run's figures.
    @raise BenchError: if it cannot complete.
    """
    workdir = tempfile.mkdtemp(prefix="smartrelay-bench-relay-", dir=args.tmp)
    smtpPort, sinkPort = accept.freePort(), accept.freePort()
    sink = SinkCounter(sinkPort, args.sink_concurrency, eightBitMIME=not args.eight_bit)
    relay: Optional[subprocess.Popen] = None
    log = os.path.join(workdir, "twistd.log")
    try:
        time.sleep(0.2)
        if sink.process.poll() is not None:
            raise BenchError(f"smtp-sink did not start: {sink.stderr()}")
        extra = args.extra
        if args.dkim:
            extra += "\n" + dkimSection(workdir, args.dkim)
        relay, log = startRelay(workdir, smtpPort, sinkPort, extra)
        command = [accept.tool("smtp-source"), "-s", str(args.sessions),
                   "-m", str(args.messages), "-f", "app@bench.test", "-t", "rcpt@sink.test"]
        if not args.eight_bit:
            command += ["-l", str(args.size)]
        if args.reuse:
            command.append("-d")
        if args.eight_bit:
            command += ["-F", eightBitMessage(workdir, args.size)]
        command.append(f"127.0.0.1:{smtpPort}")
        started = time.monotonic()
        try:
            source = subprocess.run(command, capture_output=True, text=True,
                                    timeout=args.timeout)
        except subprocess.TimeoutExpired:
            raise BenchError(
                f"smtp-source did not finish within {args.timeout:.0f} s "
                f"(sink has {sink.messages}); relay log:\n{_tail(log)}"
            )
        acceptedIn = time.monotonic() - started
        if source.returncode != 0 or source.stderr.strip():
            print(f"bench: smtp-source exited {source.returncode}: "
                  f"{source.stdout.strip()} {source.stderr.strip()}", file=sys.stderr)
        try:
            sink.waitFor(args.messages, stall=args.stall,
                         limit=max(0.0, args.timeout - acceptedIn))
        except BenchError as e:
            raise BenchError(f"{e}; relay log:\n{_tail(log)}")
        assert sink.lastMessageAt is not None
        endToEnd = sink.lastMessageAt - started
        rss = accept.peakRSS(relay.pid)
        workersRSS = sum(accept.peakRSS(child) for child in _children(relay.pid))
        database = os.path.join(workdir, "var", "smartrelay.sqlite")
        time.sleep(0.5)  # let the last events reach the store
        try:
            accepted = accept.countEvents(database, "accepted")
            delivered = accept.countEvents(database, "delivered")
        except Exception as e:  # the store is only a sanity check here
            print(f"bench: could not count events: {e}", file=sys.stderr)
            accepted = delivered = -1
        return {
            "end_to_end_rate": args.messages / endToEnd,
            "end_to_end_seconds": endToEnd,
            "accept_rate": args.messages / acceptedIn,
            "received": sink.messages,
            "accepted": accepted,
            "delivered": delivered,
            "peak_rss_mb": rss / 2**20,
            "workers_rss_mb": workersRSS / 2**20,
        }
    finally:
        if relay is not None:
            _stopRelay(relay)
        sink.stop()
        if args.keep:
            print(f"bench: kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def _children(pid: int) -> list:
    """
    The process ids of C{pid}'s children (the relay's re-wrap workers).
    """
    children = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status") as f:
                status = f.read()
        except OSError:
            continue
        match = re.search(r"^PPid:\s+(\d+)$", status, re.MULTILINE)
        if match and int(match.group(1)) == pid:
            children.append(int(name))
    return children


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--sessions", type=int, default=20, help="smtp-source -s")
    parser.add_argument("--messages", type=int, default=20000, help="smtp-source -m")
    parser.add_argument("--size", type=int, default=2048, help="message size (bytes)")
    parser.add_argument("--reuse", action="store_true",
                        help="smtp-source -d: many messages per session")
    parser.add_argument("--dkim", nargs="?", const="rsa-sha256", default=None,
                        choices=["rsa-sha256", "ed25519-sha256"],
                        help="sign every message (a fresh RSA-2048 or Ed25519 key for bench.test)")
    parser.add_argument("--eight-bit", action="store_true",
                        help="send an 8-bit UTF-8 message of --size bytes to a sink that does "
                             "not offer 8BITMIME (smtp-sink -8): every message is downgraded")
    parser.add_argument("--extra", action="append", default=[],
                        help="a line for the relay's [delivery] section (repeatable)")
    parser.add_argument("--sink-concurrency", type=int, default=1000, help="smtp-sink -m")
    parser.add_argument("--timeout", type=float, default=900.0,
                        help="seconds a run may take in all")
    parser.add_argument("--stall", type=float, default=60.0,
                        help="give up when the sink gets nothing for this long")
    parser.add_argument("--tmp", default=None, help="directory for the relay's data")
    parser.add_argument("--keep", action="store_true", help="keep the relay's data")
    args = parser.parse_args()
    args.extra = "\n".join(args.extra)
    accept.tool("smtp-source"), accept.tool("smtp-sink")  # fail early if missing

    results = []
    for n in range(args.runs):
        try:
            r = oneRun(args)
        except BenchError as e:
            sys.exit(f"bench: run {n + 1} failed: {e}")
        results.append(r)
        print(
            "run %d: %6.0f msg/s end to end (%d at the sink in %.1f s), "
            "%6.0f msg/s accepted, events: accepted %d, delivered %d, "
            "peak RSS %.0f MB (+ %.0f MB in re-wrap workers)"
            % (n + 1, r["end_to_end_rate"], r["received"], r["end_to_end_seconds"],
               r["accept_rate"], r["accepted"], r["delivered"], r["peak_rss_mb"],
               r["workers_rss_mb"]),
            flush=True,
        )
    print(
        "relay: %.0f msg/s end to end (runs: %s), accepted %.0f msg/s, "
        "peak RSS %.0f MB (+ %.0f MB in re-wrap workers)"
        % (
            statistics.median(r["end_to_end_rate"] for r in results),
            ", ".join("%.0f" % r["end_to_end_rate"] for r in results),
            statistics.median(r["accept_rate"] for r in results),
            statistics.median(r["peak_rss_mb"] for r in results),
            statistics.median(r["workers_rss_mb"] for r in results),
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
