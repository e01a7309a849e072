"""
End-to-end tests of the HTTP API: a real C{twistd smartrelay} child
process on OS-chosen loopback ports, real SMTP submissions (smtplib), a
real SMTP sink, and HTTP requests with treq.
"""

import json
import re
from urllib.parse import quote

import treq
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool

from tests.sink import waitFor
from tests.test_e2e import RelayTestMixin, events, submit

TOKEN = "e2e-api-token-0123456789abcdef"


def webPort(relay) -> int:
    """
    The web port, from the relay's log line C{web endpoints on ...}.
    """
    match = re.search(r"web endpoints on .*port=(\d+)", relay.log())
    if match is None:
        raise AssertionError("no web port in the log:\n" + relay.log())
    return int(match.group(1))


class APITests(RelayTestMixin, TestCase):
    """
    The API of a running relay.
    """

    timeout = 120

    @inlineCallbacks
    def startRelay(self, extra=""):
        sinkPort = self.startSink()
        relay = self.makeRelay(
            self.relayConfig(sinkPort).replace(
                "[web]\n", f"[web]\napi_tokens = {TOKEN}\n{extra}", 1
            )
        )
        relay.start()
        yield relay.waitReady(reactor)
        self.relay = relay
        self.base = f"http://127.0.0.1:{webPort(relay)}/api/v1"

    @inlineCallbacks
    def call(self, method, path, token=TOKEN, **kwargs):
        headers = kwargs.pop("headers", {})
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        response = yield treq.request(
            method,
            self.base + path,
            headers=headers,
            reactor=reactor,
            pool=HTTPConnectionPool(reactor, persistent=False),
            **kwargs,
        )
        body = yield treq.content(response)
        return response.code, json.loads(body)

    @inlineCallbacks
    def submitted(self, recipients):
        (code, text), refused = yield deferToThread(submit, self.relay.port, recipients)
        self.assertEqual((code, refused), (250, []), text)
        return text.split()[-1]

    @inlineCallbacks
    def test_deliveredMessage(self):
        """
        401 without a token; a delivered message's document lists accepted
        and delivered; events paged with limit=2 return every event once;
        since=garbage is a 400; stats count the deliveries.
        """
        yield self.startRelay()
        code, body = yield self.call("GET", "/events", token=None)
        self.assertEqual((code, body["error"]["code"]), (401, "unauthorized"))
        code, body = yield self.call("GET", "/events", token="x" * 30)
        self.assertEqual((code, body["error"]["code"]), (401, "invalid_token"))

        queueIDs = []
        for n in range(3):
            queueIDs.append((yield self.submitted([f"ok{n}@example.org"])))
        yield waitFor(
            reactor,
            lambda: sum(1 for e in events(self.workdir) if e[0] == "delivered") == 3,
        )
        code, document = yield self.call("GET", "/messages/" + queueIDs[0])
        self.assertEqual(code, 200, document)
        self.assertEqual([e["type"] for e in document["events"]], ["accepted", "delivered"])
        self.assertFalse(document["queued"])
        self.assertEqual(document["recipients"][0]["state"], "delivered")
        self.assertEqual(document["envelope"]["sender"], "app@example.com")
        # The headers as received, from the accepted event now.
        self.assertIn(f"X-SmartRelay-ID: {queueIDs[0]}\r\n", document["headers"])
        self.assertIn("Subject: hello\r\n", document["headers"])
        # The slash of the id may also be sent encoded.
        code, again = yield self.call("GET", "/messages/" + quote(queueIDs[0], safe=""))
        self.assertEqual((code, again["queue_id"]), (200, queueIDs[0]))

        seen, cursor, pages = [], None, 0
        while True:
            path = "/events?limit=2" + ("" if cursor is None else "&cursor=" + cursor)
            code, page = yield self.call("GET", path)
            self.assertEqual(code, 200, page)
            self.assertLessEqual(len(page["items"]), 2)
            seen.extend(page["items"])
            pages += 1
            cursor = page["next_cursor"]
            if cursor is None:
                break
        stored = events(self.workdir)
        self.assertEqual(len(seen), len(stored))
        self.assertEqual(len({e["id"] for e in seen}), len(stored))
        self.assertEqual(pages, (len(stored) + 1) // 2)

        code, body = yield self.call("GET", "/events?since=garbage")
        self.assertEqual((code, body["error"]["parameter"]), (400, "since"))

        code, stats = yield self.call("GET", "/stats")
        self.assertEqual(code, 200, stats)
        self.assertEqual(stats["totals"]["counts"]["delivered"], 3)
        self.assertEqual(stats["rates"]["delivery"], 1.0)
        yield self.relay.stop()

    @inlineCallbacks
    def test_suppression(self):
        """
        A suppression added through the API stops the next message;
        removed, the one after is delivered.
        """
        yield self.startRelay()
        code, entry = yield self.call(
            "POST", "/suppressions",
            data=json.dumps({"address": "held@example.org", "reason": "manual"}).encode(),
            headers={"Content-Type": "application/json"},
        )
        self.assertEqual((code, entry["address"]), (201, "held@example.org"))
        first = yield self.submitted(["held@example.org"])
        yield waitFor(
            reactor, lambda: any(e[0] == "suppressed" and e[1] == first for e in events(self.workdir))
        )
        self.assertNotIn(first, self.sink.queueIDs())

        code, removed = yield self.call("DELETE", "/suppressions/held@example.org")
        self.assertEqual((code, removed["removed"]), (200, True))
        second = yield self.submitted(["held@example.org"])
        yield waitFor(reactor, lambda: second in self.sink.queueIDs())
        code, listed = yield self.call("GET", "/suppressions")
        self.assertEqual(listed["items"], [])
        # A body over 16 MiB is refused with 413 and nothing is imported.
        code, body = yield self.call(
            "POST", "/suppressions/import", data=b"a@example.org\n" * 1_300_000,
            headers={"Content-Type": "text/csv"},
        )
        self.assertEqual((code, body["error"]["code"]), (413, "too_large"))
        code, listed = yield self.call("GET", "/suppressions")
        self.assertEqual(listed["items"], [])
        yield self.relay.stop()

    @inlineCallbacks
    def test_queue(self):
        """
        A message held by a 451 server shows in the queue; retry makes
        another attempt; delete takes it out, with an expired event, and it
        is never attempted again.
        """
        yield self.startRelay()
        queueID = yield self.submitted(["defer@example.org"])

        def deferrals():
            return [e for e in events(self.workdir) if e[0] == "deferred" and e[1] == queueID]

        yield waitFor(reactor, lambda: len(deferrals()) == 1)
        code, summary = yield self.call("GET", "/queue")
        self.assertEqual(code, 200, summary)
        [domain] = summary["domains"]
        self.assertEqual((domain["domain"], domain["deferred"]), ("example.org", 1))
        self.assertIn("451", domain["reasons"][0]["reason"])
        code, listed = yield self.call("GET", "/queue/messages")
        self.assertEqual([m["queue_id"] for m in listed["items"]], [queueID])

        code, retried = yield self.call("POST", f"/queue/{queueID}/retry")
        self.assertEqual(code, 202, retried)
        yield waitFor(reactor, lambda: len(deferrals()) == 2)

        # Between attempts (a moment after one, it may still be recording).
        for _ in range(50):
            code, deleted = yield self.call("DELETE", "/queue/" + quote(queueID, safe=""))
            if code != 409:
                break
        self.assertEqual((code, deleted["deleted"]), (200, ["defer@example.org"]))
        code, summary = yield self.call("GET", "/queue")
        self.assertEqual(summary["domains"], [])
        code, document = yield self.call("GET", "/messages/" + queueID)
        self.assertFalse(document["queued"])
        self.assertEqual(document["events"][-1]["type"], "expired")
        self.assertEqual(document["events"][-1]["detail"]["reason"], "deleted")
        code, body = yield self.call("POST", f"/queue/{queueID}/retry")
        self.assertEqual(code, 404)
        self.assertEqual(len(deferrals()), 2)
        yield self.relay.stop()
