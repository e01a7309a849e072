#!/usr/bin/env python3
"""
Does the relay's memory stay flat?  Two measurements of the installed
C{twistd smartrelay} (issue 18: RSS after 1,000,000 messages through the
relay within 10 % of RSS after 100,000; a queue of 1,000,000 deferred
messages held in less than 1 GB):

* C{relay}: Postfix's C{smtp-source} sends C{--step} messages at a time
  (20 sessions, 2 KB, a new connection per message) and the relay delivers
  them to C{smtp-sink}; after each step, once the sink has every message
  and the relay's queue is empty, the relay's resident set (C{VmRSS}, and
  the peak C{VmHWM}) is read, with its re-wrap workers' apart.
* C{deferred}: the smarthost refuses connections (nothing listens on its
  port), C{[delivery] retry = 1h}, so every accepted message stays queued
  and deferred; the RSS is read after each step of accepted messages.

Each step's line is printed as it is measured, then the ratio of the last
step's RSS to the first's (C{relay}) or the RSS per queued message
(C{deferred}).

    apt-get install -y postfix        # smtp-source and smtp-sink only
    python3 bench/memory.py --mode relay                       # 10 steps of 100,000
    python3 bench/memory.py --mode deferred
    python3 bench/memory.py --mode relay --step 20000 --messages 100000   # a quick look
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import accept  # noqa: E402  (bench/accept.py: the installed twistd, ports, tools)
from relay import BenchError, SinkCounter, _children, _stopRelay, startRelay  # noqa: E402


def _status(pid: int, field: str) -> int:
    """
    A C{/proc/PID/status} memory field in bytes (0 if the process is gone).
    """
    try:
        with open(f"/proc/{pid}/status") as f:
            found = re.search(rf"{field}:\s+(\d+) kB", f.read())
    except OSError:
        return 0
    return int(found.group(1)) * 1024 if found else 0


def _send(source: str, port: int, count: int, sessions: int, size: int) -> float:
    started = time.monotonic()
    result = subprocess.run(
        [source, "-s", str(sessions), "-m", str(count), "-l", str(size),
         "-f", "app@bench.test", "-t", "rcpt@sink.test", f"127.0.0.1:{port}"],
        capture_output=True, text=True,
    )
    if result.returncode != 0:
        raise BenchError(f"smtp-source failed: {result.stdout}{result.stderr}")
    return time.monotonic() - started


def _measure(relay, sent: int, count: int, elapsed: float) -> dict:
    workers = _children(relay.pid)
    return {
        "messages": sent,
        "rss": _status(relay.pid, "VmRSS"),
        "hwm": _status(relay.pid, "VmHWM"),
        "workers": sum(_status(pid, "VmRSS") for pid in workers),
        "rate": 0.0 if not elapsed else count / elapsed,
    }


def _print(row: dict, what: str) -> None:
    print(
        f"{row['messages']:>9,} {what}: relay RSS {row['rss'] / 2**20:7.1f} MB "
        f"(peak {row['hwm'] / 2**20:7.1f} MB), re-wrap workers {row['workers'] / 2**20:6.1f} MB"
        f", {row['rate']:,.0f} msg/s this step",
        flush=True,
    )


def runRelay(args, workdir: str) -> list:
    smtpPort, sinkPort = accept.freePort(), accept.freePort()
    sink = SinkCounter(sinkPort, 100)
    relay, log = startRelay(workdir, smtpPort, sinkPort, "retry = 1m\n" + args.extra)
    rows = []
    try:
        sent = 0
        while sent < args.messages:
            count = min(args.step, args.messages - sent)
            started = time.monotonic()
            _send(accept.tool("smtp-source"), smtpPort, count, args.sessions, args.size)
            sent += count
            sink.waitFor(sent, stall=120, limit=3600)
            elapsed = time.monotonic() - started
            time.sleep(args.settle)
            rows.append(_measure(relay, sent, count, elapsed))
            _print(rows[-1], "delivered")
    finally:
        _stopRelay(relay)
        sink.stop()
    return rows


def runDeferred(args, workdir: str) -> list:
    smtpPort, deadPort = accept.freePort(), accept.freePort()
    relay, log = startRelay(workdir, smtpPort, deadPort, "retry = 1h\nmax_age = 5d\n" + args.extra)
    rows = []
    try:
        sent = 0
        while sent < args.messages:
            count = min(args.step, args.messages - sent)
            elapsed = _send(accept.tool("smtp-source"), smtpPort, count, args.sessions, args.size)
            sent += count
            time.sleep(args.settle)
            rows.append(_measure(relay, sent, count, elapsed))
            _print(rows[-1], "queued")
    finally:
        _stopRelay(relay)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=["relay", "deferred"], default="relay")
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--step", type=int, default=100_000)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--settle", type=float, default=5.0,
                        help="seconds to wait after a step before reading the RSS")
    parser.add_argument("--extra", default="", help="lines added to [delivery]")
    parser.add_argument("--tmp", default=None, help="where the relay's data goes")
    parser.add_argument("--keep", action="store_true", help="keep the relay's directory")
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="smartrelay-memory-", dir=args.tmp)
    try:
        rows = (runRelay if args.mode == "relay" else runDeferred)(args, workdir)
    except BenchError as e:
        sys.exit(f"bench: {e}")
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    first, last = rows[0], rows[-1]
    if args.mode == "relay":
        print(f"RSS after {last['messages']:,} / after {first['messages']:,}: "
              f"{last['rss'] / first['rss']:.3f} (target <= 1.10)")
    else:
        print(f"{last['messages']:,} deferred messages queued: relay RSS "
              f"{last['rss'] / 2**20:.0f} MB + workers {last['workers'] / 2**20:.0f} MB, "
              f"{(last['rss'] - first['rss']) / max(last['messages'] - first['messages'], 1):.0f}"
              f" bytes per message between the first and last step (target: all < 1 GB)")


if __name__ == "__main__":
    main()
