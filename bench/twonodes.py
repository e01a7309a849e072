#!/usr/bin/env python3
"""
Two relay nodes on one Redis against one node on the same Redis, end to
end, in interleaved rounds.

Each round starts a fresh set of installed C{twistd smartrelay} nodes (one,
or two with different C{node_id}s) with C{store = redis://...} on one
C{redis-server} (started by the bench on a free loopback port, emptied
with FLUSHALL before each round), all delivering to one Postfix
C{smtp-sink} as their smarthost.  Postfix's C{smtp-source} sends
C{--messages} messages: one client with C{--sessions} sessions to the
single node, or one such client per node with half the messages each.
The figure is messages per second from the first byte in to the last
message at the sink (the sink's running counter, as in C{bench/relay.py}).
Rounds alternate (one node, two nodes, one node, ...); the medians of the
rounds, their ratio, and for each round the machine's busy share and what
of it was this bench's processes (the relays with their re-wrap workers,
redis-server, smtp-source, smtp-sink) are printed, so that load from
other work on the machine shows, and the messages per CPU-second those
processes used (what a round costs, whatever share of the machine it
got).

    apt-get install -y postfix redis-server
    python3 bench/twonodes.py                      # 3 rounds each, 20 sessions per node, 10,000 x 2 KB
    python3 bench/twonodes.py --rounds 5 --messages 20000 --reuse
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.util import module_from_spec, spec_from_file_location

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import accept  # noqa: E402  (freePort, tool, installedScript, installedEnvironment)
import relay  # noqa: E402  (SinkCounter, BenchError, _tail, _stopRelay)
from postfix import machineTicks, treeCPU  # noqa: E402

NODE_IDS = ("0A", "0B")


def _redisServerClass():
    """
    L{tests.redisserver.RedisServer}, loaded by its path (the checkout is
    not put on C{sys.path}; the relays run the installed smartrelay).
    """
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "tests",
                        "redisserver.py")
    spec = spec_from_file_location("_smartrelay_bench_redisserver", path)
    module = module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.RedisServer


def oneRound(args, redis, nodes: int) -> dict:
    """
    One round with C{nodes} fresh nodes: send, wait for the sink, measure.
    """
    redis.command("FLUSHALL")
    workdirs = [tempfile.mkdtemp(prefix=f"bench-twonodes-{nodes}-", dir=args.tmp)
                for _ in range(nodes)]
    sinkPort = accept.freePort()
    sink = relay.SinkCounter(sinkPort, args.sink_concurrency)
    started = []
    try:
        time.sleep(0.2)
        if sink.process.poll() is not None:
            raise relay.BenchError(f"smtp-sink did not start: {sink.stderr()}")
        ports = []
        for workdir, node in zip(workdirs, NODE_IDS):
            port = accept.freePort()
            config = accept.writeConfig(
                workdir, port, sinkPort, args.extra, hold=False,
                relayLines=f"node_id = {node}\nstore = {redis.url(0)}",
            )
            started.append(relay.startConfigured(workdir, config))
            ports.append(port)
        share = args.messages // nodes
        counts = [share] * nodes
        counts[0] += args.messages - share * nodes
        cpuBefore = sum(treeCPU(p.pid) for p, _ in started)
        redisBefore = treeCPU(redis.process.pid)
        sinkBefore = treeCPU(sink.process.pid)
        totalBefore, idleBefore = machineTicks()
        begin = time.monotonic()
        sources = []
        for port, count in zip(ports, counts):
            command = [accept.tool("smtp-source"), "-s", str(args.sessions),
                       "-m", str(count), "-l", str(args.size),
                       "-f", "app@bench.test", "-t", "rcpt@sink.test"]
            if args.reuse:
                command.append("-d")
            command.append(f"127.0.0.1:{port}")
            sources.append(subprocess.Popen(command, stdout=subprocess.PIPE,
                                            stderr=subprocess.PIPE, text=True))
        sourceCPU = 0.0
        for source in sources:
            _, status, usage = os.wait4(source.pid, 0)
            source.returncode = os.waitstatus_to_exitcode(status)
            sourceCPU += usage.ru_utime + usage.ru_stime
            out, err = source.stdout.read(), source.stderr.read()
            source.stdout.close(), source.stderr.close()
            if source.returncode != 0 or err.strip():
                raise relay.BenchError(f"smtp-source: {out} {err}")
        try:
            sink.waitFor(args.messages, stall=args.stall, limit=args.timeout)
        except relay.BenchError as e:
            raise relay.BenchError(f"{e}; relay log:\n{relay._tail(started[0][1])}")
        elapsed = sink.lastMessageAt - begin
        totalAfter, idleAfter = machineTicks()
        relayCPU = sum(treeCPU(p.pid) for p, _ in started) - cpuBefore
        redisCPU = treeCPU(redis.process.pid) - redisBefore
        sinkCPU = treeCPU(sink.process.pid) - sinkBefore
        ticks = max(1, totalAfter - totalBefore)
        cores = os.cpu_count() or 1
        wall = (time.monotonic() - begin) * cores
        return {
            "rate": args.messages / elapsed,
            # Messages per CPU-second the bench's processes used.
            "per_cpu_second": args.messages / max(1e-9, relayCPU + redisCPU + sinkCPU + sourceCPU),
            "busy": 1 - (idleAfter - idleBefore) / ticks,
            "ours": (relayCPU + redisCPU + sinkCPU + sourceCPU) / wall,
            "relay_ms": 1000 * relayCPU / args.messages,
            "redis_ms": 1000 * redisCPU / args.messages,
            "load": os.getloadavg()[0],
        }
    finally:
        for process, _ in started:
            relay._stopRelay(process)
        sink.stop()
        for workdir in workdirs:
            if args.keep:
                print(f"bench: kept {workdir}", file=sys.stderr)
            else:
                shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each (>= 3)")
    parser.add_argument("--sessions", type=int, default=20,
                        help="smtp-source -s, per node")
    parser.add_argument("--messages", type=int, default=10000,
                        help="messages a round, split between the nodes")
    parser.add_argument("--size", type=int, default=2048, help="message size (bytes)")
    parser.add_argument("--reuse", action="store_true",
                        help="smtp-source -d: many messages per session")
    parser.add_argument("--extra", action="append", default=[],
                        help="a line for the nodes' [delivery] section (repeatable)")
    parser.add_argument("--sink-concurrency", type=int, default=1000, help="smtp-sink -m")
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--stall", type=float, default=60.0)
    parser.add_argument("--tmp", default=None, help="directory for the nodes' data")
    parser.add_argument("--keep", action="store_true", help="keep the nodes' data")
    args = parser.parse_args()
    args.extra = "\n".join(args.extra)
    accept.tool("smtp-source"), accept.tool("smtp-sink")  # fail early if missing

    redis = _redisServerClass()().start()
    results = {1: [], 2: []}
    try:
        for n in range(args.rounds):
            for nodes in (1, 2):
                try:
                    r = oneRound(args, redis, nodes)
                except relay.BenchError as e:
                    sys.exit(f"bench: round {n + 1} with {nodes} node(s) failed: {e}")
                results[nodes].append(r)
                print(
                    f"round {n + 1}, {nodes} node(s): {r['rate']:6.0f} msg/s end to end "
                    f"({r['per_cpu_second']:.0f} per CPU-second of the bench), "
                    f"relay CPU {r['relay_ms']:.2f} ms/msg, redis {r['redis_ms']:.3f} ms/msg, "
                    f"machine {100 * r['busy']:3.0f} % busy ({100 * r['ours']:3.0f} % this "
                    f"bench), load {r['load']:.1f}",
                    flush=True,
                )
    finally:
        redis.stop()

    def median(nodes, key):
        return statistics.median(r[key] for r in results[nodes])

    one, two = median(1, "rate"), median(2, "rate")
    print(
        f"one node: {one:.0f} msg/s (rounds: "
        f"{', '.join('%.0f' % r['rate'] for r in results[1])}); "
        f"two nodes: {two:.0f} msg/s (rounds: "
        f"{', '.join('%.0f' % r['rate'] for r in results[2])}); "
        f"ratio {two / one:.2f}x; msg per CPU-second of the bench {median(1, 'per_cpu_second'):.0f} / "
        f"{median(2, 'per_cpu_second'):.0f}; machine busy {100 * median(1, 'busy'):.0f} % / "
        f"{100 * median(2, 'busy'):.0f} % (this bench {100 * median(1, 'ours'):.0f} % / "
        f"{100 * median(2, 'ours'):.0f} %), {os.cpu_count()} cores",
        flush=True,
    )


if __name__ == "__main__":
    main()
