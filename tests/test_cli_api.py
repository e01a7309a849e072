"""
Tests for the C{smartrelay} commands over the relay's API
(L{smartrelay.commands.messages}, C{queue}, C{suppress}, C{console},
C{client}): against a
fake API server on a loopback port (a thread of this process) that answers
in the shapes of DESIGN 1.6 and docs/api.md, and, at the end, against the
real Klein application (L{smartrelay.web.api.ApiApp}) on the reactor.
"""

import io
import json
import os
import re
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from smartrelay.cli import Console, main
from smartrelay.commands.console import Progress, table
from smartrelay.commands.suppress import IMPORT_CHUNK
from smartrelay.commands.client import ApiSettings, listenURL
from smartrelay.cli import UsageError

TOKEN = "t" * 32

MESSAGE = {
    "queue_id": "2A/01-00000-6921A3F0",
    "queued": True,
    "envelope": {"sender": "app@example.com", "recipients": ["a@example.org"],
                 "received": "2026-12-07T10:00:00Z", "size": 1234, "client": "127.0.0.1",
                 "tag": "welcome", "metadata": {"user": "42"}},
    "recipients": [{"address": "a@example.org", "state": "deferred", "attempts": 2,
                    "next_attempt": "2026-12-07T10:30:00Z", "attempting": False,
                    "last_reply": {"code": 451, "status": "4.7.1", "reply": "try later",
                                   "remote": "mx.example.org"}}],
    "headers": "From: app@example.com\r\nSubject: hi\r\n",
    "events": [
        {"id": "e1", "time": "2026-12-07T10:00:00Z", "type": "accepted",
         "queue_id": "2A/01-00000-6921A3F0", "recipient": "a@example.org", "tag": "welcome",
         "metadata": {}, "detail": {}},
        {"id": "e2", "time": "2026-12-07T10:01:00Z", "type": "deferred",
         "queue_id": "2A/01-00000-6921A3F0", "recipient": "a@example.org", "tag": "welcome",
         "metadata": {}, "detail": {"code": 451, "status": "4.7.1", "remote": "mx.example.org",
                                    "reply": "try later"}},
    ],
}


def _error(status, code, message, parameter=None):
    error = {"code": code, "message": message}
    if parameter:
        error["parameter"] = parameter
    return status, {"error": error}


class FakeAPI:
    """
    The routes the commands use, with a little state, answering as the
    real API does.
    """

    def __init__(self) -> None:
        self.requests: list = []
        self.suppressed = {f"user{i}@example.org": "manual" for i in range(5)}
        self.events = [
            {"id": f"e{i}", "time": f"2026-12-07T10:00:{i:02d}Z", "type": "delivered",
             "queue_id": "2A/01-00000-6921A3F0", "recipient": f"r{i}@example.org",
             "tag": None, "metadata": {}, "detail": {"code": 250, "remote": "mx.test"}}
            for i in range(5)
        ]
        self.imported: list = []
        #: Answer the queue views as a cluster with node 2B missing.
        self.cluster = False

    def page(self, items, query):
        limit = int(query.get("limit", 100))
        start = int(query.get("cursor", 0))
        chunk = items[start:start + limit]
        more = start + limit < len(items)
        return 200, dict({"items": chunk, "next_cursor": str(start + limit) if more else None},
                         **self.clusterFields())

    def clusterFields(self) -> dict:
        if not self.cluster:
            return {}
        return {"nodes": ["2A"], "partial": True, "missing_nodes": ["2B"],
                "node_errors": [{"node": "2B", "code": "node_timeout",
                                 "message": "node 2B did not answer within 5 s"}]}

    def handle(self, method, path, query, body, headers):
        if headers.get("Authorization") != f"Bearer {TOKEN}":
            return _error(401, "unauthorized", "a valid bearer token is needed")
        route = path[len("/api/v1/"):]
        if method == "GET" and route.startswith("messages/"):
            queue_id = urllib.parse.unquote(route[len("messages/"):])
            if queue_id == MESSAGE["queue_id"]:
                return 200, MESSAGE
            return _error(404, "not_found", f"no message {queue_id} (in the queue or the events)")
        if method == "GET" and route == "queue":
            summary = {"messages": 1, "recipients": 1, "domains": [
                {"domain": "example.org", "messages": 1, "recipients": 1, "queued": 0,
                 "deferred": 1, "attempting": 0, "oldest": "2026-12-07T10:00:00Z",
                 "next_attempt": "2026-12-07T10:30:00Z",
                 "reasons": [{"reason": "451 4.7.1 try later", "count": 1}]}]}
            if self.cluster:
                summary.update(self.clusterFields(), nodes=["2A", "2C"], per_node=[
                    {"node": "2A", "messages": 1, "recipients": 1},
                    {"node": "2C", "messages": 0, "recipients": 0}])
            return 200, summary
        if method == "GET" and route == "queue/messages":
            item = {k: MESSAGE["envelope"][k] for k in ("sender", "received", "size", "tag")}
            items = [dict(item, queue_id=f"2A/01-00000-0000000{i}",
                          recipients=MESSAGE["recipients"]) for i in range(3)]
            if self.cluster:
                items = [dict(i, node="2A") for i in items]
            return self.page(items, query)
        if method == "POST" and route == "queue/retry":
            if "domain" not in query:
                return _error(400, "bad_parameter", "domain: required", "domain")
            return 200, {"domain": query["domain"], "messages": 3}
        match = re.fullmatch(r"queue/(.+?)(/retry)?", route)
        if match and method in ("POST", "DELETE"):
            queue_id = urllib.parse.unquote(match.group(1))
            if not queue_id.startswith("2A/"):
                return _error(404, "not_found", f"{queue_id} is not in the queue")
            if match.group(2):
                return 202, {"queue_id": queue_id, "retrying": ["a@example.org"]}
            return 200, {"queue_id": queue_id, "deleted": True}
        if method == "GET" and route == "suppressions":
            items = [{"address": a, "reason": r, "source_event": None,
                      "time": "2026-12-07T09:00:00Z", "expires": None}
                     for a, r in sorted(self.suppressed.items())
                     if a.startswith(query.get("q", ""))]
            return self.page(items, query)
        if method == "POST" and route == "suppressions":
            document = json.loads(body)
            if "@" not in document.get("address", ""):
                return _error(400, "bad_parameter", "address: not an e-mail address", "address")
            self.suppressed[document["address"]] = document.get("reason", "manual")
            return 201, {"address": document["address"], "reason": document["reason"],
                         "source_event": None, "time": "2026-12-07T10:00:00Z",
                         "expires": document.get("expires")}
        if method == "POST" and route == "suppressions/import":
            items = json.loads(body)["items"]
            for number, item in enumerate(items, 1):
                address = item if isinstance(item, str) else item.get("address", "")
                if "@" not in address:
                    return _error(400, "bad_parameter", f"items[{number}].address: not an "
                                  "e-mail address", f"items[{number}].address")
            self.imported.extend(items)
            return 200, {"imported": len(items)}
        if method == "GET" and route == "suppressions/export":
            if query.get("format") == "csv":
                return 200, "address,reason\r\nuser0@example.org,manual\r\n"
            return 200, {"items": [{"address": "user0@example.org"}], "next_cursor": None}
        if method == "DELETE" and route.startswith("suppressions/"):
            address = urllib.parse.unquote(route[len("suppressions/"):])
            if self.suppressed.pop(address, None) is None:
                return _error(404, "not_found", f"{address} is not on the suppression list")
            return 200, {"address": address, "removed": True}
        if method == "GET" and route == "stats":
            if query.get("from") == "garbage":
                return _error(400, "bad_parameter", "from: expected an RFC 3339 time", "from")
            return 200, {
                "from": "2026-12-06T10:00:00Z", "to": "2026-12-07T10:00:00Z",
                "interval": "hour", "tag": None, "domain": None,
                "totals": {"counts": {"accepted": 10, "delivered": 9, "bounced": 1,
                                      "complained": 1, "sms_submitted": 3,
                                      "sms_delivered": 2},
                           "hard_bounces": 1, "soft_bounces": 0, "unique_opens": 0,
                           "unique_clicks": 0, "bounce_reasons": {"userunknown": 1}},
                "rates": {"delivery": 0.9, "bounce": 0.1, "complaint": 1 / 9,
                          "sms_delivery": 1.0},
                "complaint_rate_limit": 0.003, "complaint_rate_over_limit": True,
                "bounce_reasons_complete": True,
                "buckets": [{"start": "2026-12-07T09:00:00Z",
                             "counts": {"accepted": 10, "delivered": 9}}],
            }
        if method == "GET" and route == "events":
            since = query.get("since")
            items = self.events
            if since is not None and not since.replace(".", "").isdigit():
                return _error(400, "bad_parameter", "since: expected an RFC 3339 time", "since")
            return self.page(items, query)
        return _error(404, "not_found", f"no route {method} {path}")


class FakeServer:
    """
    L{FakeAPI} behind a real HTTP server on a loopback port, in a thread.
    """

    def __init__(self, api: FakeAPI) -> None:
        self.api = api

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do(self):
                parts = urllib.parse.urlsplit(self.path)
                query = dict(urllib.parse.parse_qsl(parts.query))
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                api.requests.append((self.command, parts.path, query, body))
                if not parts.path.startswith("/api/v1/"):
                    self.send_response(404)
                    self.send_header("Content-Type", "text/html")
                    self.send_header("Content-Length", "9")
                    self.end_headers()
                    self.wfile.write(b"<p>no</p>")
                    return
                status, document = api.handle(self.command, parts.path, query, body,
                                              self.headers)
                if isinstance(document, str):
                    data, kind = document.encode(), "text/csv; charset=utf-8"
                else:
                    data, kind = json.dumps(document).encode(), "application/json"
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = do

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = "http://127.0.0.1:%d" % self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,),
                                       daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


class _TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


class CommandTestsMixin:
    def setUp(self) -> None:
        self.api = FakeAPI()
        self.server = FakeServer(self.api)
        self.addCleanup(self.server.stop)
        self.environ = {}

    def run_(self, *argv: str, stdin: str = "", tty: bool = False, token: str = TOKEN):
        """
        C{smartrelay ARGV} with the fake server's URL and the token in the
        environment; returns (status, stdout, stderr).
        """
        console = Console(stdin=io.StringIO(stdin), stdout=io.StringIO(),
                          stderr=_TTY() if tty else io.StringIO())
        saved = {k: os.environ.get(k) for k in ("SMARTRELAY_URL", "SMARTRELAY_TOKEN")}
        os.environ["SMARTRELAY_URL"] = self.server.url
        if token is None:
            os.environ.pop("SMARTRELAY_TOKEN", None)
        else:
            os.environ["SMARTRELAY_TOKEN"] = token
        try:
            status = main(list(argv), console)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        return status, console.stdout.getvalue(), console.stderr.getvalue()


class MessageTests(CommandTestsMixin, SynchronousTestCase):
    """
    C{smartrelay message ID}.
    """

    def test_human(self) -> None:
        """
        The envelope, a recipients table and the timeline.
        """
        status, out, err = self.run_("message", MESSAGE["queue_id"])
        self.assertEqual((status, err), (0, ""))
        self.assertIn("message 2A/01-00000-6921A3F0 (in the queue)", out)
        self.assertIn("  sender:   app@example.com", out)
        self.assertRegex(out, r"a@example.org +deferred +2 +2026-12-07T10:30:00Z +451 4.7.1 try later")
        self.assertRegex(out, r"2026-12-07T10:01:00Z +deferred +a@example.org +code=451")
        self.assertNotIn("Subject: hi", out)
        method, path, _, _ = self.api.requests[-1]
        self.assertEqual((method, path), ("GET", "/api/v1/messages/2A/01-00000-6921A3F0"))

    def test_headers(self) -> None:
        """
        C{--headers} adds the headers as received.
        """
        status, out, err = self.run_("message", MESSAGE["queue_id"], "--headers")
        self.assertIn("  Subject: hi\n", out)

    def test_json(self) -> None:
        """
        C{--json} prints the API's document.
        """
        status, out, err = self.run_("message", MESSAGE["queue_id"], "--json")
        self.assertEqual(json.loads(out), MESSAGE)

    def test_unknown(self) -> None:
        """
        An unknown id: exit status 1 and the API's message on one line.
        """
        status, out, err = self.run_("message", "2A/01-00000-FFFFFFFF")
        self.assertEqual(status, 1)
        self.assertEqual(out, "")
        self.assertEqual(err, "smartrelay: error: no message 2A/01-00000-FFFFFFFF "
                              "(in the queue or the events) (404 not_found)\n")

    def test_noToken(self) -> None:
        """
        No token anywhere: one line, exit status 2, and no request.
        """
        status, out, err = self.run_("message", "x", token=None)
        self.assertEqual(status, 2)
        self.assertEqual(err, "smartrelay: no API token: give --token, set SMARTRELAY_TOKEN, "
                              "or --config FILE with [web] api_tokens\n")
        self.assertEqual(self.api.requests, [])

    def test_wrongToken(self) -> None:
        """
        A refused token: one line naming where the token comes from.
        """
        status, out, err = self.run_("message", "x", "--token", "wrong-token")
        self.assertEqual(status, 1)
        self.assertIn("a valid bearer token is needed (401 unauthorized): the API refused "
                      "the token", err)
        self.assertEqual(len(err.splitlines()), 1)

    def test_connectionRefused(self) -> None:
        """
        Nothing listening: one line saying so.
        """
        self.server.stop()
        status, out, err = self.run_("message", "x", "--url", self.server.url)
        self.assertEqual(status, 1)
        self.assertIn("connection refused", err)
        self.assertEqual(len(err.splitlines()), 1)

    def test_noAnswer(self) -> None:
        """
        A server that takes the connection but never answers: one line
        after C{--timeout}.
        """
        import socket

        silent = socket.socket()
        silent.bind(("127.0.0.1", 0))
        silent.listen(5)
        self.addCleanup(silent.close)
        url = "http://127.0.0.1:%d" % silent.getsockname()[1]
        status, out, err = self.run_("message", "x", "--url", url, "--timeout", "0.2")
        self.assertEqual(status, 1)
        self.assertEqual(err, f"smartrelay: error: no answer from {url} within 0.2 s\n")

    def test_notTheAPI(self) -> None:
        """
        A server that answers something else than the API's errors.
        """
        url = self.server.url + "/nothing"
        status, out, err = self.run_("message", "x", "--url", url)
        self.assertEqual(status, 1)
        self.assertEqual(err, f"smartrelay: error: {url} answered 404 Not Found (not a "
                              "smartrelay API answer: is --url right?)\n")

    def test_badURL(self) -> None:
        """
        A URL that is not http(s) is a usage error.
        """
        status, out, err = self.run_("message", "x", "--url", "ftp://x")
        self.assertEqual(status, 2)
        self.assertIn("expected http://HOST:PORT", err)


class QueueTests(CommandTestsMixin, SynchronousTestCase):
    """
    C{smartrelay queue ...}.
    """

    def test_summary(self) -> None:
        """
        C{queue} alone is the per-domain summary with the deferral reasons.
        """
        for argv in (["queue"], ["queue", "summary"]):
            status, out, err = self.run_(*argv)
            self.assertEqual(status, 0, err)
            self.assertIn("1 message(s), 1 recipient(s) queued", out)
            self.assertRegex(out, r"example.org +1 +1 +1 +0 +2026-12-07T10:00:00Z")
            self.assertIn("example.org: 1 x 451 4.7.1 try later", out)

    def test_domain(self) -> None:
        """
        C{--domain} is passed on wherever it is given.
        """
        self.run_("queue", "--domain", "example.org")
        self.assertEqual(self.api.requests[-1][2], {"domain": "example.org"})
        self.run_("queue", "summary", "--domain", "example.net")
        self.assertEqual(self.api.requests[-1][2], {"domain": "example.net"})

    def test_list(self) -> None:
        """
        C{queue list} follows the cursor through every page.
        """
        self.patch(__import__("smartrelay.commands.queue", fromlist=["x"]), "PAGE", 1)
        status, out, err = self.run_("queue", "list", "--json")
        self.assertEqual(json.loads(out), {"items": json.loads(out)["items"]})
        self.assertEqual(len([r for r in self.api.requests if r[1].endswith("queue/messages")]), 3)
        self.assertEqual([i["queue_id"] for i in json.loads(out)["items"]],
                         [f"2A/01-00000-0000000{i}" for i in range(3)])
        status, out, err = self.run_("queue", "list")
        self.assertIn("3 message(s)", out)
        self.assertRegex(out, r"2A/01-00000-00000001 +2026-12-07T10:00:00Z +1234 +app@example.com +1 +deferred")

    def test_cluster(self) -> None:
        """
        A cluster-wide answer shows the nodes, each node's count and a
        node column; a node that did not answer is a warning on stderr
        (the table stays the same) and in the --json document, which is
        the API's.
        """
        self.api.cluster = True
        status, out, err = self.run_("queue")
        self.assertEqual(status, 0, err)
        self.assertIn("1 message(s), 1 recipient(s) queued on 2 node(s) (2A, 2C)", out)
        self.assertIn("  node 2C: 0 message(s), 0 recipient(s)", out)
        self.assertEqual(
            err, "warning: incomplete: node 2B: node_timeout: node 2B did not answer within 5 s\n")
        status, out, err = self.run_("queue", "--json")
        self.assertEqual((json.loads(out)["missing_nodes"], err), (["2B"], ""))
        status, out, err = self.run_("queue", "list")
        self.assertRegex(out, r"queue id .* node\n")
        self.assertRegex(out, r"2A/01-00000-00000001 .* deferred .* 2A\n")
        self.assertIn("warning: incomplete: node 2B: node_timeout", err)
        status, out, err = self.run_("queue", "list", "--json")
        self.assertEqual(json.loads(out)["missing_nodes"], ["2B"])

    def test_limit(self) -> None:
        """
        C{--limit} stops after N.
        """
        status, out, err = self.run_("queue", "list", "--limit", "2", "--json")
        self.assertEqual(len(json.loads(out)["items"]), 2)
        status, out, err = self.run_("queue", "list", "--limit", "0")
        self.assertEqual(status, 2)

    def test_show(self) -> None:
        """
        C{queue show ID} is the message with its headers.
        """
        status, out, err = self.run_("queue", "show", MESSAGE["queue_id"])
        self.assertEqual(status, 0)
        self.assertIn("Subject: hi", out)

    def test_retry(self) -> None:
        """
        C{queue retry ID} asks for an attempt now.
        """
        status, out, err = self.run_("queue", "retry", MESSAGE["queue_id"])
        self.assertEqual((status, out), (0, "2A/01-00000-6921A3F0: retrying a@example.org\n"))
        self.assertEqual(self.api.requests[-1][:2],
                         ("POST", "/api/v1/queue/2A/01-00000-6921A3F0/retry"))

    def test_retryDomain(self) -> None:
        """
        C{queue retry --domain D} retries the whole domain in one request.
        """
        status, out, err = self.run_("queue", "retry", "--domain", "example.org")
        self.assertEqual((status, out), (0, "retrying 3 message(s) to example.org\n"))

    def test_retryNothing(self) -> None:
        """
        Neither ids nor a domain, or both, is a usage error.
        """
        self.assertEqual(self.run_("queue", "retry")[0], 2)
        self.assertEqual(self.run_("queue", "retry", "x", "--domain", "d.test")[0], 2)

    def test_deleteSome(self) -> None:
        """
        C{queue delete} deletes each; an unknown one is an error line and
        exit status 1, the others are still deleted.
        """
        status, out, err = self.run_("queue", "delete", MESSAGE["queue_id"], "XX/nope")
        self.assertEqual(status, 1)
        self.assertEqual(out, "2A/01-00000-6921A3F0: deleted\n")
        self.assertEqual(err, "smartrelay: error: XX/nope is not in the queue (404 not_found)\n")

    def test_progress(self) -> None:
        """
        Many ids show a progress bar on a terminal's standard error.
        """
        ids = [f"2A/01-00000-{i:08X}" for i in range(12)]
        status, out, err = self.run_("queue", "retry", *ids, tty=True)
        self.assertEqual(status, 0)
        self.assertIn("12/12", err)
        self.assertTrue(err.endswith("\n"))
        status, out, err = self.run_("queue", "retry", *ids)
        self.assertEqual(err, "")


def _smallPages(self, path, query, limit=None):
    """
    L{ApiClient.pages} with pages of one item, to walk the cursor.
    """
    query = dict(query, limit=1)
    count = 0
    while True:
        page = self.json("GET", path, query)
        for item in page["items"]:
            yield item
            count += 1
        if not page["next_cursor"]:
            return
        query["cursor"] = page["next_cursor"]


class SuppressTests(CommandTestsMixin, SynchronousTestCase):
    """
    C{smartrelay suppress ...}.
    """

    def test_list(self) -> None:
        """
        A table of the entries, C{--search} passed as C{q}.
        """
        status, out, err = self.run_("suppress", "list")
        self.assertIn("5 address(es)", out)
        self.assertRegex(out, r"user3@example.org +manual +2026-12-07T09:00:00Z +- +-")
        self.run_("suppress", "list", "--search", "user1")
        self.assertEqual(self.api.requests[-1][2]["q"], "user1")

    def test_add(self) -> None:
        """
        C{suppress add} posts each address with the reason.
        """
        status, out, err = self.run_("suppress", "add", "x@example.org", "--reason", "complaint")
        self.assertEqual((status, out), (0, "suppressed x@example.org (complaint)\n"))
        self.assertEqual(json.loads(self.api.requests[-1][3]),
                         {"reason": "complaint", "address": "x@example.org"})

    def test_addBad(self) -> None:
        """
        An address the API refuses: its message, exit status 1.
        """
        status, out, err = self.run_("suppress", "add", "not-an-address")
        self.assertEqual(status, 1)
        self.assertIn("address: not an e-mail address (400 bad_parameter)", err)

    def test_badReason(self) -> None:
        """
        A reason that is none of the store's is a usage error.
        """
        self.assertEqual(self.run_("suppress", "add", "x@example.org", "--reason", "nope")[0], 2)

    def test_remove(self) -> None:
        """
        C{suppress remove}: removed, or the API's 404 message.
        """
        status, out, err = self.run_("suppress", "remove", "user1@example.org")
        self.assertEqual((status, out), (0, "removed user1@example.org\n"))
        status, out, err = self.run_("suppress", "remove", "user1@example.org")
        self.assertEqual(status, 1)
        self.assertIn("is not on the suppression list", err)

    def test_importCSV(self) -> None:
        """
        C{suppress import FILE} reads CSV with or without a header, in
        chunks, with a progress bar on a terminal.
        """
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("address,reason\n")
            for i in range(IMPORT_CHUNK + 5):
                f.write(f"bulk{i}@example.org,complaint\n")
        status, out, err = self.run_("suppress", "import", path, tty=True)
        self.assertEqual(status, 0, err)
        self.assertEqual(out, f"imported {IMPORT_CHUNK + 5} address(es) from {path}\n")
        self.assertIn(f"{IMPORT_CHUNK + 5}/{IMPORT_CHUNK + 5}", err)
        posts = [r for r in self.api.requests if r[1] == "/api/v1/suppressions/import"]
        self.assertEqual(len(posts), 2)
        self.assertEqual(self.api.imported[0], {"address": "bulk0@example.org",
                                                "reason": "complaint"})

    def test_importJSONStdin(self) -> None:
        """
        A JSON array on standard input; C{--reason} goes with the request.
        """
        status, out, err = self.run_("suppress", "import", "-", "--reason", "unsubscribe",
                                     stdin='["a@example.org", {"address": "b@example.org"}]')
        self.assertEqual(status, 0, err)
        self.assertEqual(self.api.requests[-1][2], {"reason": "unsubscribe"})

    def test_importBad(self) -> None:
        """
        A bad entry: which entries were refused and how many were
        imported before them; a missing file is one line.
        """
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("".join(f"ok{i}@example.org\n" for i in range(IMPORT_CHUNK)) + "broken\n")
        status, out, err = self.run_("suppress", "import", path)
        self.assertEqual(status, 1)
        self.assertEqual(err, f"smartrelay: error: entry {IMPORT_CHUNK + 1}.address: not an "
                              "e-mail address (400 bad_parameter); entries 1 to "
                              f"{IMPORT_CHUNK} were imported, entries {IMPORT_CHUNK + 1} to "
                              f"{IMPORT_CHUNK + 1} were not\n")
        status, out, err = self.run_("suppress", "import", "/nonexistent/file")
        self.assertEqual((status, err), (1, "smartrelay: error: /nonexistent/file: no such file\n"))
        with open(path, "w") as f:
            f.write("[1, 2")
        status, out, err = self.run_("suppress", "import", path)
        self.assertEqual(status, 1)
        self.assertIn("not JSON", err)

    def test_export(self) -> None:
        """
        C{suppress export} prints CSV, or JSON, or writes C{--output}.
        """
        status, out, err = self.run_("suppress", "export")
        self.assertEqual(out, "address,reason\r\nuser0@example.org,manual\r\n")
        status, out, err = self.run_("suppress", "export", "--format", "json")
        self.assertEqual(json.loads(out), [{"address": "user0@example.org"}])
        path = self.mktemp()
        status, out, err = self.run_("suppress", "export", "--output", path)
        self.assertEqual((status, out), (0, ""))
        with open(path) as f:
            self.assertIn("user0@example.org", f.read())


class StatsTests(CommandTestsMixin, SynchronousTestCase):
    """
    C{smartrelay stats}.
    """

    def test_human(self) -> None:
        """
        Counts, rates, the complaint rate against the limit, bounce
        reasons and the buckets with traffic.
        """
        status, out, err = self.run_("stats")
        self.assertEqual(status, 0, err)
        self.assertRegex(out, r"delivered +9")
        self.assertRegex(out, r"complaint +11.11%")
        self.assertIn("complaint rate 11.11%: OVER the limit (0.30%, Gmail and Yahoo)", out)
        self.assertRegex(out, r"userunknown +1")
        self.assertRegex(out, r"2026-12-07T09:00:00Z +10 +9")
        self.assertRegex(out, r"sms_submitted +3")
        self.assertRegex(out, r"sms_delivered +2")
        self.assertNotIn("sms_failed", out)
        self.assertRegex(out, r"sms_delivery +100.00%")

    def test_durations(self) -> None:
        """
        C{--from 7d} is sent as the POSIX time seven days ago.
        """
        import time

        self.run_("stats", "--from", "7d", "--interval", "day")
        query = self.api.requests[-1][2]
        self.assertLess(abs(float(query["from"]) - (time.time() - 7 * 86400)), 60)
        self.assertEqual(query["interval"], "day")

    def test_badTime(self) -> None:
        """
        A time the API refuses is a usage error with its message.
        """
        status, out, err = self.run_("stats", "--from", "garbage")
        self.assertEqual(status, 2)
        self.assertEqual(err, "smartrelay: from: expected an RFC 3339 time (400 bad_parameter)\n")


class EventsTests(CommandTestsMixin, SynchronousTestCase):
    """
    C{smartrelay events}.
    """

    def test_lines(self) -> None:
        """
        One line per event, every page.
        """
        status, out, err = self.run_("events", "--type", "delivered")
        self.assertEqual(status, 0)
        self.assertEqual(len(out.splitlines()), 5)
        self.assertEqual(out.splitlines()[0],
                         "2026-12-07T10:00:00Z  delivered  2A/01-00000-6921A3F0  "
                         "r0@example.org  code=250 remote=mx.test")
        self.assertEqual(self.api.requests[-1][2]["type"], "delivered")

    def test_json(self) -> None:
        """
        C{--json}: one JSON object a line.
        """
        status, out, err = self.run_("events", "--json", "--limit", "3")
        self.assertEqual([json.loads(line)["id"] for line in out.splitlines()], ["e0", "e1", "e2"])

    def test_follow(self) -> None:
        """
        C{--follow} shows the new events once each, until interrupted.
        """
        from smartrelay.commands import messages as module

        naps = []

        def sleep(seconds):
            naps.append(seconds)
            if len(naps) == 1:
                self.api.events.append(dict(self.api.events[-1], id="e9",
                                            time="2026-12-07T10:00:09Z"))
            elif len(naps) == 3:
                raise KeyboardInterrupt()

        self.patch(module, "events", lambda o, c: _realEvents(o, c, sleep))

        status, out, err = self.run_("events", "--follow", "--interval", "0.5")
        self.assertEqual(status, 0)
        self.assertEqual([line.split()[3] for line in out.splitlines()],
                         [f"r{i}@example.org" for i in range(5)] + ["r4@example.org"])
        self.assertEqual(naps, [0.5, 0.5, 0.5])
        self.assertIn("since", self.api.requests[-1][2])

    def test_badSince(self) -> None:
        """
        C{--since garbage}: the API's message, exit status 2.
        """
        status, out, err = self.run_("events", "--since", "garbage")
        self.assertEqual(status, 2)
        self.assertIn("since: expected an RFC 3339 time", err)


_realEvents = __import__("smartrelay.commands.messages", fromlist=["events"]).events


class ImportFileTests(SynchronousTestCase):
    """
    L{smartrelay.commands.suppress._readImport} on arbitrary files.
    """

    @given(st.text(alphabet=st.sampled_from('ab@.,"\n\r []{}:x1-'), max_size=80))
    def test_anyText(self, text) -> None:
        """
        Any text gives a list of entries or a one-line L{CommandError}.
        """
        from smartrelay.cli import CommandError
        from smartrelay.commands.suppress import _readImport

        console = Console(stdin=io.StringIO(text), stdout=io.StringIO(), stderr=io.StringIO())
        try:
            items = _readImport("-", console)
        except CommandError as e:
            self.assertNotIn("\n", str(e))
        else:
            self.assertIsInstance(items, list)


class HelperTests(SynchronousTestCase):
    """
    The table, the progress bar and the settings.
    """

    def test_table(self) -> None:
        """
        Columns padded to the widest cell, None as -.
        """
        self.assertEqual(table([["a", None, "x"], ["long", 2, "y"]], ["h1", "h2", "h3"]),
                         "h1    h2  h3\na     -   x\nlong  2   y\n")

    def test_progressNotOnAFile(self) -> None:
        """
        No bar when standard error is no terminal.
        """
        stream = io.StringIO()
        progress = Progress(stream, 10, "x")
        progress.update(5, force=True)
        progress.finish(10)
        self.assertEqual(stream.getvalue(), "")

    def test_progressBar(self) -> None:
        """
        A bar redrawn at most ten times a second, and at the end.
        """
        stream, now = _TTY(), [0.0]
        progress = Progress(stream, 4, "import", clock=lambda: now[0])
        progress.update(1)
        progress.update(2)
        now[0] = 1.0
        progress.update(3)
        progress.finish(4)
        self.assertEqual(stream.getvalue().split("\r")[1:], [
            "import [#######.......................]  25% 1/4",
            "import [######################........]  75% 3/4",
            "import [##############################] 100% 4/4\n"])

    def test_listenURL(self) -> None:
        """
        The URL of a listen endpoint, on loopback for a wildcard.
        """
        self.assertEqual(listenURL("tcp:8080:interface=127.0.0.1"), "http://127.0.0.1:8080")
        self.assertEqual(listenURL("tcp:port=80:interface=0.0.0.0"), "http://127.0.0.1:80")
        self.assertEqual(listenURL("tcp6:8443:interface=\\:\\:"), "http://[::1]:8443")
        self.assertEqual(listenURL("ssl:443:privateKey=k.pem"), "https://127.0.0.1:443")
        self.assertRaises(UsageError, listenURL, "unix:/run/web.sock")

    def test_settingsOrder(self) -> None:
        """
        Flags before the environment before the configuration.
        """
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("[web]\nlisten = tcp:9090:interface=127.0.0.2\napi_tokens = " + "c" * 24
                    + ", " + "d" * 24 + "\n[smtp]\nauth_file = /unreadable/users\n")
        settings = ApiSettings.resolve(None, None, path, environ={})
        self.assertEqual((settings.url, settings.token), ("http://127.0.0.2:9090", "c" * 24))
        settings = ApiSettings.resolve(None, None, path, environ={
            "SMARTRELAY_URL": "https://relay.example/", "SMARTRELAY_TOKEN": "e" * 24})
        self.assertEqual((settings.url, settings.token), ("https://relay.example", "e" * 24))
        settings = ApiSettings.resolve("http://h:1", "f" * 24, path, environ={
            "SMARTRELAY_URL": "https://relay.example/", "SMARTRELAY_TOKEN": "e" * 24})
        self.assertEqual((settings.url, settings.token), ("http://h:1", "f" * 24))

    def test_badConfig(self) -> None:
        """
        A bad [web] section is one usage line; a missing file too.
        """
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("[web]\napi_tokens = short\n")
        with self.assertRaises(UsageError) as raised:
            ApiSettings.resolve(None, None, path, environ={})
        self.assertIn("[web] api_tokens", str(raised.exception))
        with self.assertRaises(UsageError) as raised:
            ApiSettings.resolve(None, None, "/nonexistent.ini", environ={})
        self.assertIn("/nonexistent.ini: cannot read", str(raised.exception))
