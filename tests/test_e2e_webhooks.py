"""
End-to-end tests of the webhooks: a real C{twistd smartrelay} child
process, real SMTP submissions delivered to a real SMTP sink, and a real
HTTP receiver on a loopback port of this process (twisted.web) that checks
each POST's signature as docs/webhooks.md shows.
"""

import hashlib
import hmac
import json
import os
import subprocess
import time

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from tests.sink import installedEnvironment, installedScript, waitFor
from tests.test_e2e import RelayTestMixin, submit

SECRET = "e2e-webhook-secret-0123456789"


def verified(secret: bytes, header: str, body: bytes, now: float) -> bool:
    """
    The receiver's check of docs/webhooks.md: HMAC-SHA256 of "t." + body,
    and t within 5 minutes.
    """
    parts = dict(item.split("=", 1) for item in header.split(","))
    expected = hmac.new(secret, parts["t"].encode() + b"." + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, parts["v1"]) and abs(now - int(parts["t"])) <= 300


class Receiver(Resource):
    """
    Records every POST; answers with the next of C{codes}, then 200.
    """

    isLeaf = True

    def __init__(self, codes=()):
        Resource.__init__(self)
        self.codes = list(codes)
        self.requests = []
        self.down = False

    def render_POST(self, request):
        body = request.content.read()
        code = 503 if self.down else (self.codes.pop(0) if self.codes else 200)
        header = request.getHeader("X-SmartRelay-Signature") or ""
        self.requests.append({
            "code": code, "body": body, "signature": header,
            "type": request.getHeader("Content-Type"), "path": request.path,
        })
        request.setResponseCode(code)
        return b"thanks" if code == 200 else b"no" * 100000

    def delivered(self) -> list:
        """
        The ids of the events of every POST answered 200, in order.
        """
        return [e["id"] for r in self.requests if r["code"] == 200
                for e in json.loads(r["body"])["events"]]


def storeEvents(workdir: str) -> list:
    """
    The relay's events, read from its store by C{smartrelay export
    --config} (blocking: for a thread).
    """
    result = subprocess.run(
        [installedScript("smartrelay"), "export", "--config", "smartrelay.ini",
         "--until", "%.3f" % (time.time() + 3600)],
        cwd=workdir, env=installedEnvironment(), capture_output=True, text=True, timeout=60,
    )
    if result.returncode != 0:
        raise AssertionError(result.stderr)
    return [json.loads(line) for line in result.stdout.splitlines()]


class WebhookTests(RelayTestMixin, TestCase):
    """
    Signed webhooks from a running relay.
    """

    timeout = 180

    def startReceiver(self, receiver):
        port = reactor.listenTCP(0, Site(receiver), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port

    def config(self, receiverPort, extra=""):
        return self.relayConfig(self.startSink()) + (
            f"\n[webhooks]\nurl = http://127.0.0.1:{receiverPort}/hook\nsecret = {SECRET}\n"
            f"allow_private = on\nbatch = 3\ntimeout = 5s\n{extra}"
        )

    @inlineCallbacks
    def submitAll(self, relay, count):
        for n in range(count):
            (code, _), refused = yield deferToThread(submit, relay.port, [f"u{n}@example.org"])
            self.assertEqual((code, refused), (250, []))

    @inlineCallbacks
    def test_signedAfterTwoFailures(self):
        """
        Every event reaches the receiver in signed {"events": [...]}
        batches of at most C{batch}; two 500s first only delay them.
        """
        receiver = Receiver([500, 500])
        relay = self.makeRelay(self.config(self.startReceiver(receiver)))
        self.addCleanup(relay.stop)
        relay.start()
        yield relay.waitReady(reactor)
        yield self.submitAll(relay, 4)
        yield waitFor(reactor, lambda: len(self.sink.received) == 4)
        # 4 accepted + 4 delivered.
        yield waitFor(reactor, lambda: len(set(receiver.delivered())) >= 8, timeout=60)
        events = yield deferToThread(storeEvents, self.workdir)
        self.assertEqual(set(receiver.delivered()), {e["id"] for e in events})
        self.assertEqual([r["code"] for r in receiver.requests[:2]], [500, 500])
        for request in receiver.requests:
            self.assertEqual(request["path"], b"/hook")
            self.assertEqual(request["type"], "application/json")
            self.assertTrue(verified(SECRET.encode(), request["signature"], request["body"],
                                     time.time()), request["signature"])
            document = json.loads(request["body"])
            self.assertEqual(list(document), ["events"])
            self.assertLessEqual(len(document["events"]), 3)
            for e in document["events"]:
                self.assertEqual(
                    set(e), {"id", "time", "type", "queue_id", "recipient", "tag", "metadata",
                             "detail"})
        self.assertIn("webhooks: POST of batch", relay.log())

    @inlineCallbacks
    def test_killWhileReceiverDown(self):
        """
        kill -9 while the receiver answers 503: after a restart, with the
        receiver back, every event is delivered (at least once).
        """
        receiver = Receiver()
        receiver.down = True
        relay = self.makeRelay(self.config(self.startReceiver(receiver), "events = delivered\n"))
        relay.start()
        yield relay.waitReady(reactor)
        yield self.submitAll(relay, 5)
        yield waitFor(reactor, lambda: len(self.sink.received) == 5)
        yield waitFor(reactor, lambda: len(receiver.requests) >= 2, timeout=30)
        relay.kill()
        receiver.down = False
        self.addCleanup(relay.stop)
        relay.start()
        yield relay.waitReady(reactor)
        events = yield deferToThread(storeEvents, self.workdir)
        wanted = {e["id"] for e in events if e["type"] == "delivered"}
        self.assertEqual(len(wanted), 5)
        yield waitFor(reactor, lambda: wanted <= set(receiver.delivered()), timeout=90)
        self.assertEqual(
            {e["type"] for r in receiver.requests for e in json.loads(r["body"])["events"]},
            {"delivered"},
        )


class WebhookStartupTests(SynchronousTestCase):
    """
    The webhook URL is checked before the relay starts.
    """

    def test_loopbackRefused(self):
        """
        A url on 127.0.0.1 without allow_private stops start-up: exit
        status 1 and one line naming [webhooks] url.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = os.path.join(directory, "relay.ini")
        with open(path, "w") as f:
            f.write(f"[webhooks]\nurl = http://127.0.0.1:9000/hook\nsecret = {SECRET}\n")
        result = subprocess.run(
            [installedScript("twistd"), "-n", "--pidfile=", "smartrelay", "--config", path],
            cwd=directory, env=installedEnvironment(), capture_output=True, text=True,
            timeout=60,
        )
        self.assertEqual(result.returncode, 1)
        self.assertEqual(
            result.stderr,
            f"smartrelay: {path}: [webhooks] url: http://127.0.0.1:9000/hook is a loopback"
            " address (127.0.0.1); set allow_private = on to allow it\n",
        )


class TwoNodeTests(TestCase):
    """
    Two relay processes sharing one Redis store: every event is POSTed by
    one node, once, and is in one export file of one node.
    """

    timeout = 180
    DB = 12

    @inlineCallbacks
    def test_eachEventOnce(self):
        """
        Mail submitted to both nodes at once: the receiver gets every
        stored event exactly once, and the two nodes' export files hold
        every stored event exactly once between them.
        """
        import collections
        import threading

        from smartrelay.store.redis import RedisStore
        from tests.redisserver import sharedRedisServer
        from tests.sink import RelayProcess, Sink
        from tests.test_e2e_export import readExport
        from tests.test_multinode import submitMany

        server = sharedRedisServer()
        url = server.url(db=self.DB)
        sink = Sink()
        sinkPort = reactor.listenTCP(0, sink, interface="127.0.0.1")
        self.addCleanup(sinkPort.stopListening)
        receiver = Receiver()
        hookPort = reactor.listenTCP(0, Site(receiver), interface="127.0.0.1")
        self.addCleanup(hookPort.stopListening)
        relays = []
        for node in ("0A", "0B"):
            relay = RelayProcess(os.path.abspath(self.mktemp()), (
                f"[smartrelay]\ndata_dir = var\nhostname = node{node}.test\nnode_id = {node}\n"
                f"store = {url}\n\n[web]\nlisten = tcp:0:interface=127.0.0.1\n\n"
                "[smtp]\nlisten = tcp:0:interface=127.0.0.1\n\n"
                f"[delivery]\nsmarthost = tcp:host=127.0.0.1:port={sinkPort.getHost().port}\n\n"
                "[export]\ndirectory = export\ninterval = 1s\n\n"
                f"[webhooks]\nurl = http://127.0.0.1:{hookPort.getHost().port}/hook\n"
                f"secret = {SECRET}\nallow_private = on\nbatch = 7\n"
            ))
            self.addCleanup(relay.kill)
            relay.start()
            relays.append(relay)
        for relay in relays:
            yield relay.waitReady(reactor)
        results = {"0A": [], "0B": []}
        threads = [threading.Thread(target=submitMany, args=(relay.port, node, 20, results[node]))
                   for relay, node in zip(relays, results)]
        for t in threads:
            t.start()
        yield deferToThread(lambda: [t.join(60) for t in threads])
        yield waitFor(reactor, lambda: len(sink.received) >= 40, timeout=90)

        store = RedisStore.fromURL(url, reactor)
        yield store.start()
        self.addCleanup(store.close)
        # The last delivered events are written within the event log's
        # write interval after the sink has the mail: read until all are.
        for _ in range(100):
            stored = set()
            cursor = None
            while True:
                page = yield store.queryEvents(cursor=cursor, limit=1000)
                stored.update(e.id for e in page.events)
                cursor = page.cursor
                if cursor is None:
                    break
            if len(stored) >= 80:
                break
            yield deferLater(reactor, 0.1, lambda: None)
        self.assertEqual(len(stored), 80)

        def exported():
            counts = collections.Counter()
            for relay in relays:
                directory = os.path.join(relay.workdir, "export")
                if os.path.isdir(directory):
                    for name in os.listdir(directory):
                        if not name.startswith("."):
                            counts.update(readExport(os.path.join(directory, name)))
            return counts

        yield waitFor(reactor, lambda: set(receiver.delivered()) >= stored
                      and set(exported()) >= stored, timeout=60)
        for relay in relays:
            yield relay.stop()
        delivered = collections.Counter(receiver.delivered())
        self.assertEqual(set(delivered), stored)
        self.assertEqual([i for i, n in delivered.items() if n > 1], [])
        files = exported()
        self.assertEqual(set(files), stored)
        self.assertEqual([i for i, n in files.items() if n > 1], [])
