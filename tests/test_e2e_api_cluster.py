"""
The HTTP API of two real C{twistd smartrelay} nodes on one redis-server
(started by the test on an OS-chosen port): what one node accepted and
delivered is visible through the other's API, a suppression added
through one stops mail on the other, a retry or delete sent to one for a
message queued on the other reaches its owner, and a C{421} to one
throttles the other.
"""

import json
import os

import treq
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool

from tests.redisserver import RedisServer
from twisted.mail import smtp

from tests.sink import RelayProcess, Sink, _Delivery, waitFor
from tests.test_e2e import submit
from tests.test_e2e_api import webPort

TOKEN = "e2e-cluster-token-0123456789abcdef"


class _ThrottlingDelivery(_Delivery):
    def validateTo(self, user):
        if user.dest.local.decode().startswith("slowdown"):
            raise smtp.SMTPBadRcpt(user, code=421, resp="4.7.0 Try again later, slow down")
        return _Delivery.validateTo(self, user)


class ThrottlingSink(Sink):
    """
    The test sink, answering C{421 4.7.0} to recipients whose local part
    starts with C{slowdown} (a provider asking senders to slow down).
    """

    def buildProtocol(self, addr):
        p = Sink.buildProtocol(self, addr)
        p.delivery = _ThrottlingDelivery(self)
        return p


class ClusterAPITests(TestCase):
    """
    Two nodes, one Redis store, one API view.
    """

    timeout = 180

    @inlineCallbacks
    def setUp(self):
        self.redis = RedisServer().start()
        self.addCleanup(self.redis.stop)
        self.sink = ThrottlingSink()
        port = reactor.listenTCP(0, self.sink, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.nodes = {}
        for node in ("01", "02"):
            relay = RelayProcess(os.path.abspath(self.mktemp()), (
                f"[smartrelay]\ndata_dir = var\nhostname = node{node}.test\nnode_id = {node}\n"
                f"store = {self.redis.url(db=0)}\n\n"
                f"[web]\nlisten = tcp:0:interface=127.0.0.1\napi_tokens = {TOKEN}\n\n"
                "[smtp]\nlisten = tcp:0:interface=127.0.0.1\n\n"
                f"[delivery]\nsmarthost = tcp:host=127.0.0.1:port={port.getHost().port}\n"
            ))
            self.addCleanup(relay.kill)
            relay.start()
            self.nodes[node] = relay
        for relay in self.nodes.values():
            yield relay.waitReady(reactor)

    @inlineCallbacks
    def call(self, node, method, path, **kwargs):
        headers = kwargs.pop("headers", {})
        headers["Authorization"] = f"Bearer {TOKEN}"
        response = yield treq.request(
            method,
            f"http://127.0.0.1:{webPort(self.nodes[node])}/api/v1" + path,
            headers=headers,
            reactor=reactor,
            pool=HTTPConnectionPool(reactor, persistent=False),
            **kwargs,
        )
        body = yield treq.content(response)
        return response.code, json.loads(body)

    @inlineCallbacks
    def submitted(self, node, recipient):
        (code, text), refused = yield deferToThread(submit, self.nodes[node].port, [recipient])
        self.assertEqual((code, refused), (250, []), text)
        return text.split()[-1]

    @inlineCallbacks
    def document(self, node, queueID, state):
        """
        The message document from C{node}'s API once its recipient is in
        C{state}.
        """
        found = {}

        @inlineCallbacks
        def check():
            code, document = yield self.call(node, "GET", "/messages/" + queueID)
            found["document"] = document
            return code == 200 and document["recipients"][0]["state"] == state

        deadline = reactor.seconds() + 60
        while not (yield check()):
            self.assertLess(reactor.seconds(), deadline, found)
            yield deferLater(reactor, 0.05)
        return found["document"]

    @inlineCallbacks
    def test_oneView(self):
        """
        A message accepted and delivered by node 01 has its document,
        events and statistics in node 02's API; the event list pages over
        both nodes' events; a suppression added through node 02 stops the
        next message to that address on node 01, and removing it lets the
        one after through.
        """
        first = yield self.submitted("01", "one@example.org")
        second = yield self.submitted("02", "two@example.org")
        document = yield self.document("02", first, "delivered")
        self.assertEqual([e["type"] for e in document["events"]], ["accepted", "delivered"])
        self.assertEqual(document["envelope"]["sender"], "app@example.com")
        yield self.document("01", second, "delivered")

        seen, cursor = [], None
        while True:
            path = "/events?limit=1" + ("" if cursor is None else "&cursor=" + cursor)
            code, page = yield self.call("01", "GET", path)
            self.assertEqual(code, 200, page)
            seen.extend((e["queue_id"], e["type"]) for e in page["items"])
            cursor = page["next_cursor"]
            if cursor is None:
                break
        self.assertEqual(sorted(seen), sorted([
            (first, "accepted"), (first, "delivered"), (second, "accepted"), (second, "delivered"),
        ]))
        for node in ("01", "02"):
            code, stats = yield self.call(node, "GET", "/stats")
            self.assertEqual(stats["totals"]["counts"]["delivered"], 2, (node, stats))

        code, entry = yield self.call(
            "02", "POST", "/suppressions",
            data=json.dumps({"address": "held@example.org", "reason": "manual"}).encode(),
            headers={"Content-Type": "application/json"},
        )
        self.assertEqual(code, 201, entry)
        held = yield self.submitted("01", "held@example.org")
        yield self.document("02", held, "suppressed")
        self.assertNotIn(held, self.sink.queueIDs())
        code, removed = yield self.call("01", "DELETE", "/suppressions/held@example.org")
        self.assertEqual((code, removed["removed"]), (200, True))
        again = yield self.submitted("01", "held@example.org")
        yield waitFor(reactor, lambda: again in self.sink.queueIDs(), timeout=60)
        for relay in self.nodes.values():
            yield relay.stop()

    @inlineCallbacks
    def events(self, node, queueID, type, count):
        """
        The C{type} events of C{queueID} through C{node}'s API, once there
        are C{count} of them.
        """
        found = {}

        @inlineCallbacks
        def check():
            code, document = yield self.call(node, "GET", "/messages/" + queueID)
            found["events"] = [e for e in document.get("events", ()) if e["type"] == type]
            return len(found["events"]) >= count

        deadline = reactor.seconds() + 30
        while not (yield check()):
            self.assertLess(reactor.seconds(), deadline, found)
            yield deferLater(reactor, 0.05)
        return found["events"]

    @inlineCallbacks
    def test_retryAndDeleteReachTheOwner(self):
        """
        A message deferred on node 01 is retried at once (by its queue id,
        then by its domain) and then deleted through node 02's API, answered
        as node 01 would answer; once node 01 has stopped, node 02 answers
        503 C{node_unavailable} for its messages.
        """
        queueID = yield self.submitted("01", "defer-me@example.org")
        self.assertTrue(queueID.startswith("01/"), queueID)
        yield self.events("02", queueID, "deferred", 1)

        # Node 02's queue views hold node 01's message.
        code, summary = yield self.call("02", "GET", "/queue")
        self.assertEqual(code, 200, summary)
        self.assertEqual(
            (summary["messages"], summary["nodes"], summary["partial"], summary["missing_nodes"]),
            (1, ["01", "02"], False, []),
            summary,
        )
        [domain] = summary["domains"]
        self.assertEqual((domain["domain"], domain["deferred"]), ("example.org", 1), domain)
        self.assertEqual(
            summary["per_node"],
            [{"node": "01", "messages": 1, "recipients": 1},
             {"node": "02", "messages": 0, "recipients": 0}],
        )
        code, page = yield self.call("02", "GET", "/queue/messages?limit=1")
        self.assertEqual(code, 200, page)
        self.assertEqual(
            [(i["queue_id"], i["node"]) for i in page["items"]], [(queueID, "01")], page
        )
        code, document = yield self.call("02", "GET", "/messages/" + queueID)
        self.assertEqual((code, document["queued"], document["node"]), (200, True, "01"), document)
        self.assertEqual(document["recipients"][0]["state"], "deferred")
        self.assertEqual(document["envelope"]["sender"], "app@example.com")

        started = reactor.seconds()
        code, answer = yield self.call("02", "POST", f"/queue/{queueID}/retry")
        self.assertEqual((code, answer["queue_id"]), (202, queueID), answer)
        # The retry schedule's next attempt is minutes away: this one is
        # the retry asked for.
        deferred = yield self.events("02", queueID, "deferred", 2)
        self.assertEqual(deferred[1]["detail"]["attempts"], 2)
        self.assertLess(reactor.seconds() - started, 10)
        code, answer = yield self.call("02", "POST", "/queue/retry?domain=example.org")
        self.assertEqual(
            (code, answer),
            (200, {"domain": "example.org", "messages": 1, "nodes": {"01": 1, "02": 0},
                   "unanswered": []}),
        )
        yield self.events("02", queueID, "deferred", 3)

        code, answer = yield self.call("02", "DELETE", f"/queue/{queueID}")
        self.assertEqual((code, answer), (200, {"queue_id": queueID, "deleted": ["defer-me@example.org"]}))
        document = yield self.document("01", queueID, "expired")
        self.assertFalse(document["queued"])
        code, answer = yield self.call("02", "DELETE", f"/queue/{queueID}")
        self.assertEqual((code, answer["error"]["code"]), (404, "not_found"), answer)

        yield self.nodes["01"].stop()
        code, answer = yield self.call("02", "POST", f"/queue/{queueID}/retry")
        self.assertEqual((code, answer["error"]["code"]), (503, "node_unavailable"), answer)
        self.assertIn("node 01", answer["error"]["message"])
        # Stopped cleanly, node 01 left the registry at once: no longer
        # asked, nor missing.
        code, summary = yield self.call("02", "GET", "/queue")
        self.assertEqual((code, summary["nodes"], summary["partial"]), (200, ["02"], False))
        yield self.nodes["02"].stop()

    @inlineCallbacks
    def test_throttleOnOneNodeSlowsTheOther(self):
        """
        A C{421} to node 01 halves the smarthost's budget on node 02 too,
        within a couple of seconds, with node 01's reply as the reason.
        """
        first = yield self.submitted("02", "warm-up@example.org")
        yield self.document("02", first, "delivered")
        code, before = yield self.call("02", "GET", "/destinations")
        [destination] = [d for d in before["items"] if d["node"] == "02"]
        self.assertFalse(destination["throttled"], destination)
        slowed = yield self.submitted("01", "slowdown@example.org")
        yield self.events("01", slowed, "deferred", 1)
        started = reactor.seconds()
        found = {}

        @inlineCallbacks
        def throttled():
            code, items = yield self.call("02", "GET", "/destinations")
            items = [d for d in items["items"] if d["node"] == "02"]
            found["items"] = items
            return bool(items) and items[0]["throttled"]

        while not (yield throttled()):
            self.assertLess(reactor.seconds() - started, 5, found)
            yield deferLater(reactor, 0.05)
        [after] = found["items"]
        self.assertEqual(after["destination"], destination["destination"])
        self.assertEqual(after["throttle_factor"], 0.5)
        self.assertEqual(after["max_connections"], destination["configured_max_connections"] // 2)
        self.assertIn("slow down", after["throttle_reason"])
        self.assertIn("throttled in the cluster", self.nodes["02"].log())
        for relay in self.nodes.values():
            yield relay.stop()

    @inlineCallbacks
    def test_killedNode(self):
        """
        Node 01 killed (no clean stop) with a message deferred: node 02's
        queue summary still answers at once, 200, naming node 01 as
        missing; within two heartbeat intervals (20 s) a retry of its
        message is 503 node_unavailable at once instead of waiting, and the
        message document comes from the events, queued, partial.
        """
        queueID = yield self.submitted("01", "defer-me@example.org")
        yield self.events("02", queueID, "deferred", 1)
        self.nodes["01"].kill()
        killed = reactor.seconds()

        code, summary = yield self.call("02", "GET", "/queue")
        self.assertEqual(code, 200, summary)
        self.assertEqual(
            (summary["partial"], summary["missing_nodes"], summary["nodes"]),
            (True, ["01"], ["02"]),
            summary,
        )
        self.assertIn(summary["node_errors"][0]["code"], ("node_timeout", "node_unavailable"))

        while True:
            started = reactor.seconds()
            code, answer = yield self.call("02", "POST", f"/queue/{queueID}/retry")
            if code == 503:
                break
            self.assertEqual((code, answer["error"]["code"]), (504, "node_timeout"), answer)
            self.assertLess(reactor.seconds() - killed, 40)
        self.assertEqual(answer["error"]["code"], "node_unavailable", answer)
        self.assertLess(reactor.seconds() - started, 2)
        # Two heartbeat intervals (20 s) after its last beat, seen by the
        # first retry sent after them (each 504 takes the 10 s timeout).
        self.assertLess(reactor.seconds() - killed, 20 + 10 + 3)

        started = reactor.seconds()
        code, summary = yield self.call("02", "GET", "/queue")
        self.assertLess(reactor.seconds() - started, 2)
        self.assertEqual(summary["node_errors"][0]["code"], "node_unavailable", summary)
        code, document = yield self.call("02", "GET", "/messages/" + queueID)
        self.assertEqual(
            (code, document["queued"], document["partial"], document["missing_nodes"]),
            (200, True, True, ["01"]),
            document,
        )
        yield self.nodes["02"].stop()
