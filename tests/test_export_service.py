"""
The exporter and the webhooks in the whole relay (L{smartrelay.service}):
built from the configuration, started once the store is open, on
C{/metrics}; on a L{MemoryReactorClock} with synchronous thread pools.
"""

import os

from prometheus_client.exposition import generate_latest
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from smartrelay.export.exporter import Exporter
from smartrelay.export.webhooks import WebhookSender
from smartrelay.service import makeRelayService
from tests.test_service import SynchronousThreads, wiringConfig

WEBHOOKS = (
    "[webhooks]\nurl = http://127.0.0.1:9/hook\nsecret = 0123456789abcdef\n"
    "allow_private = on\n"
)


class ExportWiringTests(SynchronousTestCase):
    """
    C{[export]} and C{[webhooks]} in the relay.
    """

    def setUp(self):
        self.dataDir = os.path.abspath(self.mktemp())
        self.reactor = MemoryReactorClock()
        self.threads = SynchronousThreads()

    def relay(self, extra=""):
        return makeRelayService(wiringConfig(self.dataDir, extra=extra), self.reactor,
                                self.threads)

    def test_off(self):
        """
        Without the sections there is neither, and no metric of theirs.
        """
        relay = self.relay()
        self.assertIsNone(relay.exporter)
        self.assertIsNone(relay.webhooks)
        self.assertNotIn(b"smartrelay_export", generate_latest(relay.metrics.registry))

    def test_startedWithTheStore(self):
        """
        Both are built from the configuration (owner: the node id), not
        started before the store is open, started by start-up, and stopped
        with the relay; their metrics are on C{/metrics}.
        """
        directory = os.path.join(self.dataDir, "export")
        relay = self.relay(f"[export]\ndirectory = {directory}\nformat = csv\n" + WEBHOOKS)
        self.assertIsInstance(relay.exporter, Exporter)
        self.assertIsInstance(relay.webhooks, WebhookSender)
        self.assertEqual((relay.exporter.owner, relay.exporter.format), ("2A", "csv"))
        self.assertEqual(relay.webhooks.url, "http://127.0.0.1:9/hook")
        self.assertIn("export", self.threads.names)
        self.assertFalse(relay.exporter.running)
        relay.startService()
        self.successResultOf(relay.whenReady())
        self.assertTrue(relay.exporter.running)
        self.assertTrue(relay.webhooks.running)
        self.reactor.advance(0)
        self.assertTrue(os.path.isdir(directory))
        scrape = generate_latest(relay.metrics.registry).decode()
        for name in ("smartrelay_export_files_total", "smartrelay_webhook_outbox_batches",
                     "smartrelay_webhook_events_delivered_total"):
            self.assertIn(name, scrape)
        self.successResultOf(relay.stopService())
        self.assertFalse(relay.exporter.running)
        self.assertFalse(relay.webhooks.running)
