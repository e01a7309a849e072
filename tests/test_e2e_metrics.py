"""
End-to-end tests of C{/metrics} and C{/healthz}: a real C{twistd
smartrelay} child process on OS-chosen loopback ports, real SMTP
submissions (smtplib) delivered to a real SMTP sink, and HTTP requests
(urllib, in a thread) to the relay's web port.
"""

import json
import os
import re
import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.sink import waitFor
from tests.test_e2e import RelayTestMixin, submit
from tests.test_web_metrics import makeUnwritable


def webPort(relay) -> int:
    """
    The web port, from the relay's log line C{web endpoints on ...}.
    """
    match = re.search(r"web endpoints on .*port=(\d+)", relay.log())
    if match is None:
        raise AssertionError("no web port in the log:\n" + relay.log())
    return int(match.group(1))


def fetch(url: str, headers: dict = {}) -> tuple:
    """
    C{GET url}: (status, content type, body); blocking, for a thread.
    """
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.headers["Content-Type"], error.read()


def samples(text: str) -> dict:
    """
    C{(name, sorted label items) -> value} of every sample of a scrape,
    parsed by prometheus_client's parser.
    """
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


class MetricsTests(RelayTestMixin, TestCase):
    """
    The metrics and health check of a running relay.
    """

    timeout = 120

    @inlineCallbacks
    def startRelay(self, extra=""):
        sinkPort = self.startSink()
        relay = self.makeRelay(self.relayConfig(sinkPort).replace("[web]\n", "[web]\n" + extra, 1))
        self.addCleanup(relay.stop)
        relay.start()
        yield relay.waitReady(reactor)
        self.relay = relay
        self.base = f"http://127.0.0.1:{webPort(relay)}"

    def get(self, path: str, **headers):
        return deferToThread(fetch, self.base + path, headers)

    @inlineCallbacks
    def scrape(self):
        status, contentType, body = yield self.get("/metrics")
        self.assertEqual(status, 200)
        self.assertTrue(contentType.startswith("text/plain; version="), contentType)
        return samples(body.decode("utf-8"))

    @inlineCallbacks
    def test_countsDeliveries(self):
        """
        After two messages reach the sink and one bounces, C{/metrics}
        parses with prometheus_client's parser and counts three accepted,
        two delivered and one hard bounce; the queue is empty again and
        the store latency of the event writes is there.
        """
        yield self.startRelay()
        for recipients in (["ok1@example.org"], ["ok2@example.org", "bounce@example.org"]):
            (code, _), refused = yield deferToThread(submit, self.relay.port, recipients)
            self.assertEqual((code, refused), (250, []))
        yield waitFor(reactor, lambda: len(self.sink.received) == 2)

        found = {}

        @inlineCallbacks
        def counted():
            found.update((yield self.scrape()))
            return found.get(("smartrelay_messages_bounced_total", (("kind", "hard"),))) == 1

        done = []

        @inlineCallbacks
        def poll():
            while not (yield counted()):
                yield deferLater(reactor, 0.1, lambda: None)
            done.append(True)

        poll().addErrback(done.append)
        yield waitFor(reactor, lambda: done, timeout=30)
        self.assertEqual(done, [True])
        self.assertEqual(found[("smartrelay_messages_accepted_total", ())], 3)
        self.assertEqual(found[("smartrelay_messages_delivered_total", ())], 2)
        self.assertEqual(found[("smartrelay_events_total", (("type", "delivered"),))], 2)
        self.assertEqual(found[("smartrelay_messages_bounced_total", (("kind", "soft"),))], 0)
        self.assertEqual(found[("smartrelay_queue_messages", ())], 0)
        self.assertGreaterEqual(
            found[("smartrelay_store_call_duration_seconds_count", (("operation", "appendEvents"),))],
            1,
        )
        self.assertEqual(
            found[("smartrelay_node_info", (("node_id", "2A"), ("version", "0.1.0")))], 1
        )
        self.assertGreater(found[("process_resident_memory_bytes", ())], 0)

    @inlineCallbacks
    def test_healthz(self):
        """
        C{/healthz} is 200 on a running relay, 503 naming the spool once
        its directory takes no new file, and 200 again once it does.

        Tests run as root, which ignores directory permissions, so the
        spool directory is made immutable (C{chattr +i}) instead of
        read-only: root cannot create a file in it either, as the relay
        could not in a read-only one (see L{makeUnwritable}; as another
        user it is mode 0555).  The relay's open segment stays writable,
        as it would under a directory remounted read-only.
        """
        yield self.startRelay()
        # A message first, so that the spool directory exists and is in use.
        (code, _), _ = yield deferToThread(submit, self.relay.port, ["ok@example.org"])
        self.assertEqual(code, 250)
        status, contentType, body = yield self.get("/healthz")
        self.assertEqual((status, contentType), (200, "application/json"))
        answer = json.loads(body)
        self.assertEqual((answer["status"], answer["problems"]), ("ok", []))

        spool = os.path.join(self.workdir, "var", "spool")
        how, undo = makeUnwritable(self, spool)
        answers = []

        @inlineCallbacks
        def until(wanted):
            while True:
                status, _, body = yield self.get("/healthz")
                answers.append((status, json.loads(body)))
                if status == wanted:
                    return
                # Probes are cached for 2 s.
                yield deferLater(reactor, 0.25, lambda: None)

        yield until(503)
        status, answer = answers[-1]
        self.assertEqual(answer["status"], "unavailable", how)
        [problem] = answer["problems"]
        # data_dir = var, relative to the relay's directory.
        self.assertEqual(problem, "spool: cannot write to var/spool: Operation not permitted"
                         if os.geteuid() == 0 else
                         "spool: cannot write to var/spool: Permission denied")
        self.assertFalse(answer["checks"]["spool"]["ok"])
        self.assertTrue(answer["checks"]["store"]["ok"])

        undo()
        yield until(200)
        self.assertEqual(answers[-1][1]["problems"], [])

    @inlineCallbacks
    def test_onlyMetricsClients(self):
        """
        With C{[web] metrics_clients} not including loopback, both routes
        answer 403 with a JSON error; the tracking links are unaffected.
        """
        yield self.startRelay("metrics_clients = 10.0.0.0/8\n")
        for path in ("/metrics", "/healthz"):
            status, contentType, body = yield self.get(path)
            self.assertEqual((status, contentType), (403, "application/json"), path)
            self.assertEqual(json.loads(body)["error"]["code"], "forbidden")
        status, _, _ = yield self.get("/t/c/not-a-token")
        self.assertEqual(status, 404)

    @inlineCallbacks
    def test_proxiedRefused(self):
        """
        By default a request that came through a proxy (X-Forwarded-For)
        is refused, even from loopback: the proxy's clients are not the
        machine's.
        """
        yield self.startRelay()
        status, _, body = yield self.get("/metrics", **{"X-Forwarded-For": "203.0.113.7"})
        self.assertEqual(status, 403)
        self.assertEqual(json.loads(body)["error"]["code"], "forbidden")
