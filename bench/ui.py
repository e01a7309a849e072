"""
How long the reports UI takes to answer its two busiest pages, the
dashboard (every range) and a message page, with N events in the SQLite
store: a real C{twistd smartrelay} on a loopback port, a logged-in
session, one client on a kept-alive connection, time from the request to
the last byte of the page.

    python3 bench/ui.py                      # 1,000,000 events
    python3 bench/ui.py --events 100000 --requests 50

The events: about 320,000 messages for 1,000,000 (3.1 events each:
accepted, then delivered after one deferral, or one in fifty bounced;
one in ten opened, one in twenty clicked) over the last 30 days, five
tags, twenty recipient domains.  Prints the median, 95th percentile and
worst time of each page.
"""

import argparse
import http.client
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from urllib.parse import quote, urlencode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from twisted.internet.defer import maybeDeferred  # noqa: E402

from smartrelay.auth import hashPassword  # noqa: E402
from smartrelay.events import Event  # noqa: E402
from smartrelay.store.sqlite import SQLiteStore  # noqa: E402
from accept import installedEnvironment, installedScript  # noqa: E402

USER, PASSWORD = "bench", "bench password"
TAGS = ("welcome", "reset", "receipt", "digest", "alert")


def queueID(n: int) -> str:
    return "2A/01-%05d-%08X" % (n // 100000, n)


def fill(path: str, count: int) -> str:
    """
    About C{count} events into the SQLite store at C{path}; the queue id
    of a message in the middle (for the message page).
    """
    store = SQLiteStore(path, lambda f, *a, **k: maybeDeferred(f, *a, **k))
    errors: list = []
    store.start().addErrback(errors.append)
    now = time.time()
    start = now - 30 * 86400
    # 3.1 events a message on average (see the module docstring).
    messages = max(1, count * 10 // 31)
    step = (now - 60 - start) / messages
    batch: list = []
    written = 0
    for n in range(messages):
        when = start + n * step
        qid = queueID(n)
        recipient = f"r{n % 5000}@d{n % 20}.example"
        tag = TAGS[n % len(TAGS)]
        events = [
            Event("accepted", qid, recipient, when, tag=tag,
                  detail={"sender": "app@example.com", "size": 2048,
                          "client": {"ip": "127.0.0.1", "helo": "app", "user": None,
                                     "tls": False},
                          "headers": f"From: app@example.com\r\nSubject: message {n}\r\n"}),
        ]
        if n % 50 == 0:
            events.append(Event("bounced", qid, recipient, when + 2, tag=tag,
                                detail={"kind": "hard", "reason": "userunknown",
                                        "status": "5.1.1", "diagnostic": "550 5.1.1 no",
                                        "remote": "mx.example", "source": "smtp"}))
        else:
            events.append(Event("delivered", qid, recipient, when + 1, tag=tag,
                                detail={"remote": "mx.example", "reply": "ok", "code": 250,
                                        "tls": True}))
            events.append(Event("deferred", qid, recipient, when + 0.5, tag=tag,
                                detail={"code": 451, "status": "4.7.1", "reply": "later",
                                        "remote": "mx.example", "attempts": 1}))
            if n % 10 == 0:
                events.append(Event("opened", qid, recipient, when + 30, tag=tag,
                                    detail={"ip": "192.0.2.1", "user_agent": "x",
                                            "machine": False}))
            if n % 20 == 0:
                events.append(Event("clicked", qid, recipient, when + 40, tag=tag,
                                    detail={"url": "https://example.com/", "ip": "192.0.2.1",
                                            "user_agent": "x", "machine": False}))
        events.sort(key=lambda e: e.time)
        batch.extend(events)
        if len(batch) >= 5000:
            store.appendEvents(batch).addErrback(errors.append)
            written += len(batch)
            batch = []
    if batch:
        store.appendEvents(batch).addErrback(errors.append)
        written += len(batch)
    store.close()
    if errors:
        raise SystemExit(f"could not fill the store: {errors[0]}")
    print(f"{written:,} events of {messages:,} messages in the store")
    return queueID(messages // 2)


def cookiesOf(response, jar: dict) -> None:
    for value in response.msg.get_all("Set-Cookie") or []:
        name, _, rest = value.partition("=")
        jar[name] = rest.split(";")[0]


def login(port: int) -> tuple:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    jar: dict = {}
    connection.request("GET", "/login")
    response = connection.getresponse()
    body = response.read().decode()
    cookiesOf(response, jar)
    token = re.search(r'name="csrf" value="([^"]+)"', body).group(1)
    form = urlencode({"csrf": token, "user": USER, "password": PASSWORD, "next": "/"})
    connection.request("POST", "/login", body=form, headers={
        "Content-Type": "application/x-www-form-urlencoded",
        "Origin": f"http://127.0.0.1:{port}",
        "Host": f"127.0.0.1:{port}",
        "Cookie": "; ".join(f"{k}={v}" for k, v in jar.items()),
    })
    response = connection.getresponse()
    response.read()
    cookiesOf(response, jar)
    if response.status != 303 or "smartrelay_session" not in jar:
        raise SystemExit(f"login failed: {response.status}")
    return connection, {"Cookie": f"smartrelay_session={jar['smartrelay_session']}"}


def timed(connection, headers, path: str, requests: int) -> list:
    times = []
    for _ in range(requests):
        began = time.perf_counter()
        connection.request("GET", path, headers=headers)
        response = connection.getresponse()
        body = response.read()
        times.append((time.perf_counter() - began) * 1000)
        if response.status != 200:
            raise SystemExit(f"{path}: {response.status} {body[:500]!r}")
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--requests", type=int, default=30)
    options = parser.parse_args()

    with tempfile.TemporaryDirectory() as work:
        os.makedirs(os.path.join(work, "var"))
        began = time.perf_counter()
        middle = fill(os.path.join(work, "var", "smartrelay.sqlite"), options.events)
        print(f"filled in {time.perf_counter() - began:.0f} s")
        users = os.path.join(work, "ui-users")
        with open(users, "w") as f:
            f.write(f"{USER}:{hashPassword(PASSWORD)}\n")
        config = os.path.join(work, "relay.ini")
        with open(config, "w") as f:
            f.write(
                "[smartrelay]\ndata_dir = var\nhostname = relay.test\nnode_id = 2A\n\n"
                f"[web]\nlisten = tcp:0:interface=127.0.0.1\nusers_file = {users}\n\n"
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
            text = ""
            for _ in range(600):
                time.sleep(0.1)
                text = open(log).read() if os.path.exists(log) else ""
                match = re.search(r"web endpoints on .*port=(\d+)", text)
                if match and "accepting mail" in text:
                    port = int(match.group(1))
                    break
            if port is None:
                raise SystemExit("the relay did not start:\n" + text)
            connection, headers = login(port)
            pages = [
                ("dashboard, last hour", "/?range=hour"),
                ("dashboard, 24 hours", "/?range=day"),
                ("dashboard, 30 days", "/?range=month"),
                ("dashboard, 30 days, one tag", "/?range=month&tag=welcome"),
                ("dashboard, 30 days, one domain", "/?range=month&domain=d3.example"),
                ("message page", "/messages/" + quote(middle, safe="")),
            ]
            for name, path in pages:
                timed(connection, headers, path, 3)  # warm up
                times = sorted(timed(connection, headers, path, options.requests))
                p95 = times[min(len(times) - 1, int(len(times) * 0.95))]
                print(f"{name:32} median {statistics.median(times):6.1f} ms, "
                      f"p95 {p95:6.1f} ms, worst {times[-1]:6.1f} ms")
        finally:
            relay.terminate()
            relay.wait(30)


if __name__ == "__main__":
    main()
