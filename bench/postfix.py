#!/usr/bin/env python3
"""
smartrelay against Postfix on the same machine, in one run: for each path,
rounds of the installed `twistd smartrelay` and of a private Postfix
instance (Debian `postfix`, its own configuration, queue and port in a
temporary directory; the system's Postfix, if any, is not touched)
alternate, driven by the same `smtp-source` (20 sessions, 2 KB messages, a
new connection per message unless --reuse) and delivering to the same kind
of `smtp-sink`. Prints each round and, per path, the medians and the ratio.

Paths:

* down: the next hop refuses connections (smarthost / relayhost on a port
  nothing listens on): the acceptance rate while mail can only be queued;
* hold: nothing is delivered by choice (smartrelay `[delivery] hold = on`,
  Postfix `defer_transports = relay, smtp`): acceptance alone, the rate
  the down path is measured against;
* relay: relayed end to end to smtp-sink (first connection to the last
  message at the sink);
* dkim: the same with an RSA-2048 DKIM signature on every message:
  smartrelay's re-wrap + DKIM against Postfix + OpenDKIM (Debian
  `opendkim`, as a milter), both signing with the same key.

For each round it also prints the CPU time per message of the server under
test (its whole process tree: twistd and its re-wrap workers; Postfix's
master with every child it has run, plus OpenDKIM) and the machine's busy
share during the round.

Needs (as root, for Postfix's master):

    apt-get install -y postfix opendkim
    python3 bench/postfix.py                        # 3 rounds of each path
    python3 bench/postfix.py --paths relay,dkim --rounds 5
    python3 bench/postfix.py --paths down,hold       # the outage path against acceptance alone
    python3 bench/postfix.py --messages 5000 --rounds 1
"""

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import accept  # noqa: E402  (freePort, tool, installedScript)
import relay  # noqa: E402  (SinkCounter, startRelay, dkimSection, BenchError)

PATHS = ("down", "hold", "relay", "dkim")
TICKS = os.sysconf("SC_CLK_TCK")

# Postfix's daemons, from Debian's master.cf, none chrooted (the private
# instance has no chroot set up); the SMTP server on our port.
_MASTER_CF = """\
{listen} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""

_MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {dir}/spool
data_directory = {dir}/data
myhostname = postfix.bench.test
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
relayhost = [127.0.0.1]:{nextHop}
smtpd_relay_restrictions = permit_mynetworks, reject
maillog_file = /dev/stdout
default_process_limit = 200
smtpd_client_connection_count_limit = 0
smtpd_client_connection_rate_limit = 0
smtp_tls_security_level = none
smtpd_tls_security_level = none
alias_maps =
alias_database =
local_recipient_maps =
biff = no
{hold}{milter}"""

_OPENDKIM_CONF = """\
Syslog no
Background no
Mode s
Domain bench.test
Selector bench
KeyFile {key}
Canonicalization relaxed/relaxed
SignatureAlgorithm rsa-sha256
OversignHeaders From
InternalHosts 127.0.0.1
Socket inet:{port}@127.0.0.1
PidFile {dir}/opendkim.pid
RequireSafeKeys no
"""


def waitForPort(port: int, what: str, process: subprocess.Popen, log: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise relay.BenchError(f"{what} exited ({process.returncode}):\n{relay._tail(log)}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise relay.BenchError(f"{what} did not listen on {port} within 30 s:\n{relay._tail(log)}")


def treeCPU(pid: int) -> float:
    """
    CPU seconds of C{pid} and every live descendant, each with the time of
    the children it has reaped (Postfix's master reaps every daemon it ran).
    """
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(name)] = int(fields[1])
        times[int(name)] = sum(int(v) for v in fields[11:15]) / TICKS
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        total += times.get(current, 0.0)
        todo.extend(child for child, parent in parents.items() if parent == current)
    return total


def machineTicks() -> tuple:
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]
    return sum(values), idle


class Server:
    """
    A server under test: C{start()}, C{stop()}, C{cpu()}, C{port}.
    """

    name = "?"
    port = 0

    def cpu(self) -> float:
        raise NotImplementedError


class SmartRelay(Server):
    name = "smartrelay"

    def __init__(self, workdir: str, nextHop: int, dkim: Optional[str], hold: bool = False) -> None:
        self.workdir, self.nextHop, self.dkim, self.hold = workdir, nextHop, dkim, hold
        self.port = accept.freePort()
        self.process: Optional[subprocess.Popen] = None

    def start(self) -> None:
        extra = "" if self.dkim is None else "\n" + relay.dkimSection(self.workdir, "rsa-sha256")
        self.process, self.log = relay.startRelay(
            self.workdir, self.port, self.nextHop, extra, hold=self.hold)

    def cpu(self) -> float:
        return treeCPU(self.process.pid)

    def stop(self) -> None:
        if self.process is not None:
            relay._stopRelay(self.process)


class Postfix(Server):
    name = "postfix"

    def __init__(self, workdir: str, nextHop: int, dkim: Optional[str], hold: bool = False) -> None:
        self.dir = workdir
        self.port = accept.freePort()
        self.nextHop = nextHop
        self.dkim = dkim
        self.hold = hold
        self.process: Optional[subprocess.Popen] = None
        self.milter: Optional[subprocess.Popen] = None
        self.log = os.path.join(workdir, "postfix.log")

    def start(self) -> None:
        etc = os.path.join(self.dir, "etc")
        os.chmod(self.dir, 0o755)  # the postfix user reaches data/ through it
        for sub in ("etc", "spool", "data"):
            os.makedirs(os.path.join(self.dir, sub), exist_ok=True)
        shutil.chown(os.path.join(self.dir, "data"), "postfix")
        milter = ""
        if self.dkim is not None:
            milterPort = accept.freePort()
            key = os.path.join(self.dir, "bench.key")
            with open(key, "w") as f:
                f.write(self.dkim)
            os.chmod(key, 0o600)
            conf = os.path.join(self.dir, "opendkim.conf")
            with open(conf, "w") as f:
                f.write(_OPENDKIM_CONF.format(key=key, port=milterPort, dir=self.dir))
            milterLog = os.path.join(self.dir, "opendkim.log")
            with open(milterLog, "wb") as out:
                self.milter = subprocess.Popen(
                    [accept.tool("opendkim"), "-f", "-x", conf],
                    stdout=out, stderr=subprocess.STDOUT)
            waitForPort(milterPort, "opendkim", self.milter, milterLog)
            milter = (f"smtpd_milters = inet:127.0.0.1:{milterPort}\n"
                      "milter_default_action = tempfail\n")
        with open(os.path.join(etc, "main.cf"), "w") as f:
            hold = "defer_transports = relay, smtp\n" if self.hold else ""
            f.write(_MAIN_CF.format(dir=self.dir, nextHop=self.nextHop, milter=milter, hold=hold))
        with open(os.path.join(etc, "master.cf"), "w") as f:
            f.write(_MASTER_CF.format(listen=f"127.0.0.1:{self.port}"))
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(
                [accept.tool("postfix"), "-c", etc, "start-fg"],
                stdout=out, stderr=subprocess.STDOUT)
        waitForPort(self.port, "postfix", self.process, self.log)

    def cpu(self) -> float:
        total = treeCPU(self.process.pid)
        if self.milter is not None:
            total += treeCPU(self.milter.pid)
        return total

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            subprocess.run([accept.tool("postfix"), "-c", os.path.join(self.dir, "etc"), "stop"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.milter is not None and self.milter.poll() is None:
            self.milter.terminate()
            self.milter.wait(10)


def oneRound(args, kind: str, path: str, dkimKey: Optional[str]) -> dict:
    """
    One server, one path: start it, send, measure, stop.
    """
    workdir = tempfile.mkdtemp(prefix=f"bench-{kind}-{path}-", dir=args.tmp)
    sink = None
    if path in ("down", "hold"):
        nextHop = accept.freePort()  # nothing listens there
    else:
        nextHop = accept.freePort()
        sink = relay.SinkCounter(nextHop, 100)
        time.sleep(0.2)
    server = (SmartRelay if kind == "smartrelay" else Postfix)(
        workdir, nextHop, dkimKey if path == "dkim" else None, hold=path == "hold")
    try:
        server.start()
        cpuBefore = server.cpu()
        totalBefore, idleBefore = machineTicks()
        command = [accept.tool("smtp-source"), "-s", str(args.sessions),
                   "-m", str(args.messages), "-l", str(args.size),
                   "-f", "app@bench.test", "-t", "rcpt@sink.test"]
        if args.reuse:
            command.append("-d")
        command.append(f"127.0.0.1:{server.port}")
        started = time.monotonic()
        source = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
        accepted = time.monotonic() - started
        if source.returncode != 0 or source.stderr.strip():
            raise relay.BenchError(f"{kind}: smtp-source: {source.stdout} {source.stderr}")
        if sink is not None:
            sink.waitFor(args.messages, stall=60, limit=args.timeout)
            elapsed = sink.lastMessageAt - started
        else:
            elapsed = accepted
        if args.settle:
            # Let the work the last messages left behind (the parked
            # recipients' bulk record once a second, event batches) be done
            # and counted.
            time.sleep(args.settle)
        totalAfter, idleAfter = machineTicks()
        cpu = server.cpu() - cpuBefore
        busy = 1 - (idleAfter - idleBefore) / max(1, totalAfter - totalBefore)
        return {
            "rate": args.messages / elapsed,
            "cpu_ms": 1000 * cpu / args.messages,
            "busy": busy,
        }
    finally:
        server.stop()
        if sink is not None:
            sink.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--paths", default=",".join(PATHS),
                        help="comma-separated, of: " + ", ".join(PATHS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--messages", type=int, default=10000)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--reuse", action="store_true", help="smtp-source -d")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--tmp", default=None)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--settle", type=float, default=0.0,
                        help="seconds to wait after the last message before reading the "
                             "servers' CPU time (counts the work left behind, e.g. the "
                             "parked recipients' bulk record); not in the rate")
    parser.add_argument("--servers", default="smartrelay,postfix",
                        help="comma-separated, of: smartrelay, postfix (e.g. smartrelay "
                             "alone for A/B runs of two trees)")
    args = parser.parse_args()
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    for p in paths:
        if p not in PATHS:
            sys.exit(f"bench: unknown path {p!r}; choose from {', '.join(PATHS)}")
    if os.geteuid() != 0:
        sys.exit("bench: run as root (Postfix's master needs it)")
    dkimKey = None
    if "dkim" in paths:
        from smartrelay.engine.dkim import generateKey

        dkimKey = generateKey("rsa-sha256", 2048)[0].decode("ascii")
    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    for s in servers:
        if s not in ("smartrelay", "postfix"):
            sys.exit(f"bench: unknown server {s!r}; choose from smartrelay, postfix")
    results: dict = {(k, p): [] for k in servers for p in paths}
    for n in range(args.rounds):
        for p in paths:
            # Alternate who goes first, so neither always gets a warm cache.
            order = ("smartrelay", "postfix") if n % 2 == 0 else ("postfix", "smartrelay")
            for kind in order:
                if kind not in servers:
                    continue
                try:
                    r = oneRound(args, kind, p, dkimKey)
                except relay.BenchError as e:
                    sys.exit(f"bench: {e}")
                results[(kind, p)].append(r)
                print(f"round {n + 1} {p:5} {kind:10}: {r['rate']:7.0f} msg/s, "
                      f"{r['cpu_ms']:5.2f} ms CPU/msg, machine {100 * r['busy']:3.0f} % busy",
                      flush=True)
    print()

    def med(rs, key):
        return statistics.median(r[key] for r in rs)

    if servers == ["smartrelay", "postfix"]:
        print("| path | smartrelay msg/s | Postfix msg/s | ratio | smartrelay CPU/msg | "
              "Postfix CPU/msg | busy (smartrelay / Postfix) |")
        print("|---|---|---|---|---|---|---|")
        for p in paths:
            ours, theirs = results[("smartrelay", p)], results[("postfix", p)]
            print(f"| {p} | {med(ours, 'rate'):.0f} | {med(theirs, 'rate'):.0f} | "
                  f"{med(ours, 'rate') / med(theirs, 'rate'):.2f}x | "
                  f"{med(ours, 'cpu_ms'):.2f} ms | "
                  f"{med(theirs, 'cpu_ms'):.2f} ms | {100 * med(ours, 'busy'):.0f} % / "
                  f"{100 * med(theirs, 'busy'):.0f} % |")
    else:
        print("| path | server | msg/s | CPU/msg | busy |")
        print("|---|---|---|---|---|")
        for kind in servers:
            for p in paths:
                rs = results[(kind, p)]
                print(f"| {p} | {kind} | {med(rs, 'rate'):.0f} | {med(rs, 'cpu_ms'):.2f} ms | "
                      f"{100 * med(rs, 'busy'):.0f} % |")
    if "down" in paths and "hold" in paths:
        for kind in servers:
            down, hold = results[(kind, "down")], results[(kind, "hold")]
            print(f"{kind}: next hop down at {med(down, 'rate') / med(hold, 'rate'):.2f}x "
                  f"its hold rate, {med(down, 'cpu_ms') / med(hold, 'cpu_ms'):.2f}x its "
                  f"hold CPU/msg (per round: "
                  + ", ".join(f"{d['cpu_ms'] / h['cpu_ms']:.2f}" for d, h in zip(down, hold))
                  + ")")
    print(f"\n(medians of {args.rounds} rounds; {args.messages} x {args.size} B messages, "
          f"{args.sessions} sessions{', reused' if args.reuse else ''})")


if __name__ == "__main__":
    main()
