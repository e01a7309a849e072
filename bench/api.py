"""
Listing events through the HTTP API's cursor: a real C{twistd smartrelay}
on a loopback port over a SQLite store holding N events, walked page by
page (C{GET /api/v1/events?limit=L&cursor=...}) by one client on a kept-
alive connection.

    python3 bench/api.py                         # 100,000 events, pages of 1,000
    python3 bench/api.py --events 20000 --limit 100 --query '&domain=example.org'

Prints the events, pages, seconds and events per second of each walk
(--runs walks, after the store is filled once).
"""

import argparse
import http.client
import json
import os
import re
import subprocess
import sys
import tempfile
import time

# bench/accept.py's helpers; smartrelay itself is the installed one (the
# checkout is never put on sys.path).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from twisted.internet.defer import maybeDeferred  # noqa: E402

from smartrelay.events import Event  # noqa: E402
from smartrelay.store.sqlite import SQLiteStore  # noqa: E402
from accept import installedEnvironment, installedScript  # noqa: E402

TOKEN = "bench-api-token-0123456789abcdef"


def fill(path: str, count: int) -> None:
    """
    C{count} delivered events of the last two days into the SQLite store
    at C{path} (statements run on this thread: nothing else is running).
    """
    store = SQLiteStore(path, lambda f, *a, **k: maybeDeferred(f, *a, **k))
    errors: list = []
    store.start().addErrback(errors.append)
    start = time.time() - 2 * 86400
    step = 86400 / max(count, 1)
    for first in range(0, count, 1000):
        batch = [
            Event(
                "delivered",
                "2A/01-%05d-%08X" % (n // 100000, n),
                "r%d@example.org" % (n % 5000),
                start + n * step,
                tag="bench",
                detail={"remote": "mx.example.org", "reply": "ok", "code": 250, "tls": True},
            )
            for n in range(first, min(first + 1000, count))
        ]
        store.appendEvents(batch).addErrback(errors.append)
    store.close()
    if errors:
        raise SystemExit(f"could not fill the store: {errors[0]}")


def walk(port: int, limit: int, query: str) -> tuple:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    events = pages = 0
    cursor = None
    began = time.perf_counter()
    while True:
        path = f"/api/v1/events?limit={limit}{query}"
        if cursor is not None:
            path += "&cursor=" + cursor
        connection.request("GET", path, headers=headers)
        response = connection.getresponse()
        page = json.loads(response.read())
        if response.status != 200:
            raise SystemExit(f"{response.status}: {page}")
        events += len(page["items"])
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    connection.close()
    return events, pages, time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--limit", type=int, default=1000)
    parser.add_argument("--query", default="", help="more parameters, e.g. '&domain=example.org'")
    parser.add_argument("--runs", type=int, default=3)
    options = parser.parse_args()

    with tempfile.TemporaryDirectory() as work:
        os.makedirs(os.path.join(work, "var"))
        fill(os.path.join(work, "var", "smartrelay.sqlite"), options.events)
        config = os.path.join(work, "relay.ini")
        with open(config, "w") as f:
            f.write(
                "[smartrelay]\ndata_dir = var\nhostname = relay.test\nnode_id = 2A\n\n"
                f"[web]\nlisten = tcp:0:interface=127.0.0.1\napi_tokens = {TOKEN}\n\n"
                "[smtp]\nlisten = tcp:0:interface=127.0.0.1\n\n"
                "[feedback]\nlisten = tcp:0:interface=127.0.0.1\n\n"
                "[delivery]\nsmarthost = tcp:host=127.0.0.1:port=9\n"
            )
        log = os.path.join(work, "twistd.log")
        relay = subprocess.Popen(
            [installedScript("twistd"), "-n", "--pidfile=", "--logfile", log,
             "smartrelay", "--config", config],
            cwd=work,
            env=installedEnvironment(),
        )
        try:
            port = None
            for _ in range(300):
                time.sleep(0.1)
                text = open(log).read() if os.path.exists(log) else ""
                match = re.search(r"web endpoints on .*port=(\d+)", text)
                if match and "accepting mail" in text:
                    port = int(match.group(1))
                    break
            if port is None:
                raise SystemExit("the relay did not start:\n" + text)
            for _ in range(options.runs):
                events, pages, seconds = walk(port, options.limit, options.query)
                print(
                    f"{events:,} events in {pages:,} pages of {options.limit}: "
                    f"{seconds:.2f} s, {events / seconds:,.0f} events/s"
                )
        finally:
            relay.terminate()
            relay.wait(30)


if __name__ == "__main__":
    main()
