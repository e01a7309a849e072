"""
The tracking redirect under a real HTTP load generator: C{wrk} (Debian
package C{wrk}) against C{GET /t/c/TOKEN} of the installed C{twistd
smartrelay}, on loopback, both on this machine's cores.

    python3 bench/clicks.py                    # 3 runs of 10 s, 50 connections
    python3 bench/clicks.py --connections 100 --seconds 20 --runs 5
    python3 bench/clicks.py --access-log file  # [web] access_log = a file
    git archive HEAD~3 smartrelay | tar -x -C /tmp/old
    python3 bench/clicks.py --baseline /tmp/old  # and an older version, interleaved
    python3 bench/clicks.py --user-agent "Mozilla/5.0 ..."   # clicks from a browser
    python3 bench/clicks.py --tokens 1000      # 1,000 recipients' tokens in turn

The token is sealed with the relay's own key (a fixed C{[smartrelay]
secret}), so every request is a valid click (with C{--tokens N}, the
clicks of N recipients on the same link, in turn, through a C{wrk} Lua
script; the bare route gets the same paths): token opened, a C{clicked}
event recorded, a 302 to the link.  Prints requests/s and latency
percentiles of each run, and the medians.

Each run is followed by one against a bare Klein route on the same
machine (C{--bare}: a process of its own whose only route answers 302
with a C{Location}, on a plain Twisted Web C{Site}), so the relay's
figure can be read as a ratio to the framework's in the same conditions.

With C{--baseline TREE}, a second relay runs the C{smartrelay} package
found in C{TREE} (first on its C{PYTHONPATH}), and each run measures it
too, between the relay and the bare route: before and after a change, in
the same minutes.

Each run also reports the CPU time (user + system, all threads) the
server process spent per request: on a machine shared with other work
the rates move with the load, the CPU per request much less.
"""

import argparse
import http.client
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

import accept  # bench/accept.py: installedScript, installedEnvironment, freePort

SECRET = "bench-clicks-secret-0123456789abcdef"

_LATENCY = re.compile(r"^\s+(50|90|99)%\s+([\d.]+)(us|ms|s)\s*$", re.M)
_RATE = re.compile(r"^Requests/sec:\s+([\d.]+)", re.M)
_NON2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")
_UNIT = {"us": 0.001, "ms": 1.0, "s": 1000.0}


LINK = "https://www.example.org/offer?utm_source=mail"


def clickPaths(count: int) -> list:
    """
    The paths of C{count} clicks on one link of one message, each by
    another recipient (so each has a token of its own).
    """
    from smartrelay.tokens import Tokens, deriveKey

    tokens = Tokens([deriveKey(SECRET)])
    recipients = ["alice@example.org"] + [f"user{n}@example.org" for n in range(1, count)]
    return ["/t/c/" + tokens.make("c", "00/01-00001-6921A3F0", r, LINK) for r in recipients]


def clickURL(port: int) -> str:
    return f"http://127.0.0.1:{port}{clickPaths(1)[0]}"


def pathsScript(workdir: str, paths: list) -> str:
    """
    A C{wrk} Lua script that asks for C{paths} in turn (its file name).

    The requests are formatted once, in each thread's C{init} (with the
    headers of C{-H}), and C{request} returns them in turn, so that C{wrk}
    does not build each request in Lua (C{wrk.format} per request) on the
    cores it shares with the server.
    """
    script = os.path.join(workdir, "paths.lua")
    with open(script, "w") as f:
        f.write("paths = {\n" + "".join(f'  "{p}",\n' for p in paths) + "}\n"
                "requests = {}\n"
                "init = function(args)\n"
                "  for i, p in ipairs(paths) do requests[i] = wrk.format(nil, p) end\n"
                "end\n"
                "n = 0\n"
                "request = function()\n"
                "  n = n % #requests + 1\n"
                "  return requests[n]\n"
                "end\n")
    return script


def startRelay(workdir: str, webPort: int, accessLog: str = "log",
               tree: str = None) -> subprocess.Popen:
    config = os.path.join(workdir, "smartrelay.ini")
    with open(config, "w") as f:
        f.write(f"""[smartrelay]
data_dir = {workdir}/var
hostname = relay.bench.test
secret = {SECRET}

[smtp]
listen = tcp:0:interface=127.0.0.1

[feedback]
listen = tcp:0:interface=127.0.0.1

[web]
listen = tcp:{webPort}:interface=127.0.0.1
access_log = {accessLog}

[tracking]
base_url = http://127.0.0.1:{webPort}

[delivery]
hold = on
""")
    env = accept.installedEnvironment()
    if tree is not None:
        env["PYTHONPATH"] = os.path.abspath(tree)
    process = subprocess.Popen(
        [accept.installedScript("twistd"), "-n", "--pidfile=", "--logfile",
         os.path.join(workdir, "twistd.log"), "smartrelay", "--config", config],
        cwd=workdir, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{webPort}/healthz", timeout=1).read()
            return process
        except Exception:
            time.sleep(0.2)
    process.kill()
    sys.exit("bench: the relay did not start; see " + os.path.join(workdir, "twistd.log"))


def serveBare(port: int) -> None:
    """
    The comparison: a Klein app whose one route answers 302 and nothing
    else, served on C{port} until killed.
    """
    from klein import Klein
    from twisted.internet import endpoints, reactor
    from twisted.web.server import Site

    app = Klein()

    @app.route("/t/c/<string:token>", methods=["GET", "HEAD"])
    def click(request, token):
        request.setResponseCode(302)
        request.setHeader(b"Location", b"https://www.example.org/offer?utm_source=mail")
        return b""

    endpoints.serverFromString(reactor, f"tcp:{port}:interface=127.0.0.1").listen(
        Site(app.resource()))
    reactor.run()


def startBare(port: int) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--bare", str(port)])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            connection.request("GET", "/t/c/x")
            connection.getresponse().read()
            return process
        except OSError:
            time.sleep(0.2)
    process.kill()
    sys.exit("bench: the bare Klein server did not start")


def cpuSeconds(pid: int) -> float:
    """
    User + system CPU seconds of process C{pid} so far (all its threads).
    """
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wrk(url: str, connections: int, seconds: int, pid: int, userAgent: str = None,
        script: str = None) -> dict:
    before = cpuSeconds(pid)
    headers = [] if userAgent is None else ["-H", f"User-Agent: {userAgent}"]
    if script is not None:
        headers += ["-s", script]
    output = subprocess.run(
        [shutil.which("wrk") or sys.exit("bench: apt-get install -y wrk"), "-t2",
         f"-c{connections}", f"-d{seconds}s", "--latency", *headers, url],
        capture_output=True, text=True, check=True,
    ).stdout
    cpu = cpuSeconds(pid) - before
    latencies = {p: float(v) * _UNIT[u] for p, v, u in _LATENCY.findall(output)}
    bad = _NON2XX.search(output)
    rate = float(_RATE.search(output).group(1))
    return {
        "rate": rate,
        "cpu": cpu / (rate * seconds) * 1e6,
        "p50": latencies.get("50"),
        "p99": latencies.get("99"),
        "bad": int(bad.group(1)) if bad else 0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--access-log", default="log", choices=["log", "file", "off"],
                        help="[web] access_log: the relay's log (default), a file, off")
    parser.add_argument("--tokens", type=int, default=1, metavar="N",
                        help="clicks by N recipients in turn, each with its own token "
                             "(default 1: every click has the same token)")
    parser.add_argument("--user-agent", metavar="TEXT",
                        help="the clicks' User-Agent (default: none, as wrk sends)")
    parser.add_argument("--baseline", metavar="TREE",
                        help="also measure the smartrelay package in TREE, interleaved")
    parser.add_argument("--bare", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare:
        return serveBare(args.bare)
    workdir = tempfile.mkdtemp(prefix="bench-clicks-")
    port = accept.freePort()
    accessLog = os.path.join(workdir, "access.log") if args.access_log == "file" else args.access_log
    relay = startRelay(workdir, port, accessLog)
    baseline = None
    if args.baseline:
        baseDir = os.path.join(workdir, "baseline")
        os.makedirs(baseDir)
        basePort = accept.freePort()
        baseLog = os.path.join(baseDir, "access.log") if args.access_log == "file" else accessLog
        baseline = startRelay(baseDir, basePort, baseLog, args.baseline)
    barePort = accept.freePort()
    bare = startBare(barePort)
    try:
        url = clickURL(port)
        script = pathsScript(workdir, clickPaths(args.tokens)) if args.tokens > 1 else None
        for checked in [url] + ([clickURL(basePort)] if baseline else []):
            parts = urllib.parse.urlsplit(checked)
            connection = http.client.HTTPConnection("127.0.0.1", parts.port, timeout=10)
            connection.request("GET", parts.path)
            answer = connection.getresponse()
            if answer.status != 302:
                sys.exit(f"bench: the click answered {answer.status}, not 302")
            connection.close()
        results, bares, bases = [], [], []
        for run in range(args.runs):
            result = wrk(url, args.connections, args.seconds, relay.pid, args.user_agent, script)
            results.append(result)
            print(f"run {run + 1}: {result['rate']:,.0f} requests/s, p50 {result['p50']:.1f} ms, "
                  f"p99 {result['p99']:.1f} ms, non-3xx {result['bad']}, "
                  f"{result['cpu']:.0f} us CPU/request", flush=True)
            if baseline is not None:
                result = wrk(clickURL(basePort), args.connections, args.seconds, baseline.pid,
                             args.user_agent, script)
                bases.append(result)
                print(f"       baseline: {result['rate']:,.0f} requests/s, "
                      f"p99 {result['p99']:.1f} ms, {result['cpu']:.0f} us CPU/request", flush=True)
            result = wrk(f"http://127.0.0.1:{barePort}/t/c/x", args.connections, args.seconds,
                         bare.pid, args.user_agent, script)
            bares.append(result)
            print(f"       bare Klein route: {result['rate']:,.0f} requests/s, "
                  f"p99 {result['p99']:.1f} ms, {result['cpu']:.0f} us CPU/request", flush=True)
        rate = statistics.median(r["rate"] for r in results)
        bareRate = statistics.median(r["rate"] for r in bares)
        print(f"median: {rate:,.0f} requests/s, "
              f"p99 {statistics.median(r['p99'] for r in results):.1f} ms "
              f"({args.connections} connections, {args.seconds} s x {args.runs}); "
              f"bare Klein route {bareRate:,.0f} requests/s; ratio {rate / bareRate:.2f}")
        cpu = statistics.median(r["cpu"] for r in results)
        bareCPU = statistics.median(r["cpu"] for r in bares)
        print(f"CPU per request: {cpu:.0f} us, bare Klein route {bareCPU:.0f} us; "
              f"ratio (bare / relay) {bareCPU / cpu:.2f}")
        if bases:
            baseRate = statistics.median(r["rate"] for r in bases)
            print(f"baseline: {baseRate:,.0f} requests/s, "
                  f"p99 {statistics.median(r['p99'] for r in bases):.1f} ms, ratio to bare "
                  f"{baseRate / bareRate:.2f}; CPU per request "
                  f"{statistics.median(r['cpu'] for r in bases):.0f} us")
    finally:
        bare.kill()
        bare.wait()
        for process in [relay] + ([baseline] if baseline else []):
            process.send_signal(signal.SIGTERM)
            process.wait(60)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
