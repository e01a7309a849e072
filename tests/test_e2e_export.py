"""
End-to-end tests of the export files and C{smartrelay export}: a real
C{twistd smartrelay} child process, real SMTP submissions delivered to a
real SMTP sink, kill -9, and the files read back as a customer would.
"""

import collections
import csv
import gzip
import io
import json
import os
import subprocess
import time

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import LoopingCall, deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.sink import installedEnvironment, installedScript, waitFor
from tests.test_e2e import RelayTestMixin, submit
from tests.test_e2e_webhooks import storeEvents


def readExport(path: str) -> list:
    """
    The event ids of one export file (JSONL or CSV, maybe gzipped); fails
    if the file is not whole (a last line without its end, bad JSON).
    """
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", newline="") as f:
        text = f.read()
    if ".csv" in path:
        rows = list(csv.DictReader(io.StringIO(text, newline="")))
        assert text.endswith("\r\n"), path
        for row in rows:
            json.loads(row["detail"])
            json.loads(row["metadata"])
        return [row["id"] for row in rows]
    assert text.endswith("\n"), path
    return [json.loads(line)["id"] for line in text.splitlines()]


class ExportTests(RelayTestMixin, TestCase):
    """
    Export files from a running relay.
    """

    timeout = 180

    def startRelay(self, extra):
        relay = self.makeRelay(self.relayConfig(self.startSink()) + "\n[export]\n" + extra)
        relay.start()
        self.exportDir = os.path.join(self.workdir, "export")
        return relay

    def exported(self) -> collections.Counter:
        """
        How many times each event id is in the visible export files.
        """
        counts = collections.Counter()
        if os.path.isdir(self.exportDir):
            for name in sorted(os.listdir(self.exportDir)):
                if not name.startswith("."):
                    counts.update(readExport(os.path.join(self.exportDir, name)))
        return counts

    def watchAtomicity(self):
        """
        Read every visible file every 20 ms while the test runs: none may
        ever be seen half-written.
        """
        self.torn = []

        def look():
            try:
                self.exported()
            except (AssertionError, ValueError, EOFError, OSError) as e:
                self.torn.append(repr(e))

        loop = LoopingCall(look)
        loop.clock = reactor
        loop.start(0.02)
        self.addCleanup(loop.stop)

    @inlineCallbacks
    def submitAll(self, relay, names):
        for name in names:
            (code, _), refused = yield deferToThread(submit, relay.port, [f"{name}@example.org"])
            self.assertEqual((code, refused), (250, []))

    @inlineCallbacks
    def test_everyEventOnceAcrossKill(self):
        """
        Files appear whole (never seen half-written); across a kill -9 and
        a restart every stored event is in exactly one file.
        """
        relay = self.startRelay("directory = export\ninterval = 1s\n")
        yield relay.waitReady(reactor)
        self.watchAtomicity()
        yield self.submitAll(relay, ["a1", "a2", "a3"])
        yield waitFor(reactor, lambda: len(self.exported()) >= 6, timeout=30)
        yield self.submitAll(relay, ["b1", "b2", "b3"])
        relay.kill()
        self.addCleanup(relay.stop)
        relay.start()
        yield relay.waitReady(reactor)
        yield self.submitAll(relay, ["c1", "c2"])
        yield waitFor(reactor, lambda: len(self.sink.received) >= 8, timeout=60)
        stored = []

        @inlineCallbacks
        def allExported():
            stored[:] = yield deferToThread(storeEvents, self.workdir)
            return {e["id"] for e in stored} <= set(self.exported())

        done = []

        @inlineCallbacks
        def poll():
            while not (yield allExported()):
                yield deferLater(reactor, 0.5, lambda: None)
            done.append(True)

        poll().addErrback(done.append)
        yield waitFor(reactor, lambda: done, timeout=60)
        self.assertEqual(done, [True])
        yield relay.stop()
        counts = self.exported()
        self.assertEqual(set(counts), {e["id"] for e in stored})
        self.assertEqual([i for i, n in counts.items() if n > 1], [])
        # The a and c messages' accepted and delivered events at least (a
        # kill -9 may take events of the b messages not yet in the store:
        # the spool, not the store, is what a 250 promises).
        self.assertGreaterEqual(len(stored), 10)
        self.assertEqual(self.torn, [])
        self.assertEqual([n for n in os.listdir(self.exportDir) if n.endswith(".tmp")], [])

    @inlineCallbacks
    def test_csvGzipCommand(self):
        """
        C{format = csv}, C{gzip = on} and a command: each file is gzipped
        CSV that Python's csv module reads, and the command got each new
        file (here it copies it); C{smartrelay export --format csv
        --config} prints the same events as CSV.
        """
        script = os.path.abspath(self.mktemp())
        uploaded = os.path.abspath(self.mktemp())
        os.makedirs(uploaded)
        with open(script, "w") as f:
            f.write(f'#!/bin/sh\ncp "$1" {uploaded}/\n')
        os.chmod(script, 0o755)
        relay = self.startRelay(
            f"directory = export\ninterval = 1s\nformat = csv\ngzip = on\ncommand = {script}\n"
        )
        self.addCleanup(relay.stop)
        yield relay.waitReady(reactor)
        yield self.submitAll(relay, ["x1", "x2"])
        yield waitFor(reactor, lambda: len(self.exported()) >= 4, timeout=30)
        names = [n for n in os.listdir(self.exportDir) if not n.startswith(".")]
        self.assertTrue(all(n.endswith(".csv.gz") for n in names), names)
        yield waitFor(reactor, lambda: sorted(os.listdir(uploaded)) == sorted(names), timeout=30)
        result = yield deferToThread(
            subprocess.run,
            [installedScript("smartrelay"), "export", "--config", "smartrelay.ini",
             "--format", "csv", "--until", "%.3f" % (time.time() + 60)],
            cwd=self.workdir, env=installedEnvironment(), capture_output=True, text=True,
            timeout=60,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        rows = list(csv.DictReader(io.StringIO(result.stdout, newline="")))
        self.assertEqual(
            list(rows[0]),
            ["id", "time", "type", "queue_id", "recipient", "tag", "metadata", "detail"],
        )
        self.assertEqual({r["id"] for r in rows}, set(self.exported()))
        self.assertEqual({r["type"] for r in rows}, {"accepted", "delivered"})
