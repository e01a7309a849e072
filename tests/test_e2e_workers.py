"""
End-to-end tests of the delivery sessions in the worker processes: the
installed C{twistd smartrelay}, a real SMTP sink, and a worker killed with
SIGKILL in the middle of a transaction.
"""

import json
import os
import re
import signal

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.sink import childrenOf, running, waitFor
from tests.test_e2e_metrics import fetch, samples, webPort
from tests.test_e2e import RelayTestMixin, events, submit


def connectionOwners(port):
    """
    The process ids holding an established TCP connection to
    C{127.0.0.1:port} (from C{/proc/net/tcp} and the processes' file
    descriptors).
    """
    inodes = set()
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            remote, state, inode = fields[2], fields[3], fields[9]
            if state == "01" and int(remote.split(":")[1], 16) == port:
                inodes.add(f"socket:[{inode}]")
    owners = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            for fd in os.listdir(f"/proc/{name}/fd"):
                if os.readlink(f"/proc/{name}/fd/{fd}") in inodes:
                    owners.add(int(name))
        except OSError:
            continue
    return owners


class WorkerSessionTests(RelayTestMixin, TestCase):
    timeout = 120

    def config(self, sinkPort):
        return self.relayConfig(sinkPort).replace(
            "retry = 5m\n", "retry = 1s, 1s, 1s, 1m\nretry_jitter = 0\nrewrap_workers = 1\n"
        )

    @inlineCallbacks
    def submitOne(self, holding=0):
        """
        Start a sink (answering nothing after the data of the first
        C{holding} messages) and the relay, and submit one message; fires
        with the sink's port, the relay, its worker's pid and the queue id.
        """
        sinkPort = self.startSink()
        self.sink.holding = holding
        relay = self.makeRelay(self.config(sinkPort))
        relay.start()
        yield relay.waitReady(reactor)
        [worker] = childrenOf(relay.process.pid)
        (code, text), refused = yield deferToThread(submit, relay.port, ["ok@example.org"])
        self.assertEqual(code, 250, text)
        queueID = re.match(r"2\.0\.0 OK (\S+)$", text).group(1)
        return sinkPort, relay, worker, queueID

    @inlineCallbacks
    def test_sessionInWorker(self):
        """
        The connection to the next hop is held by the worker process, not
        by the relay; the message is delivered re-wrapped (VERP sender).
        """
        sinkPort, relay, worker, _ = yield self.submitOne()
        yield waitFor(reactor, lambda: self.sink.received)
        # The session stays open (idle) after its transaction.
        self.assertEqual(connectionOwners(sinkPort) - {os.getpid()}, {worker})
        # /metrics says so too.
        status, _, body = yield deferToThread(
            fetch, f"http://127.0.0.1:{webPort(relay)}/metrics"
        )
        found = samples(body.decode("utf-8"))
        self.assertEqual(found[("smartrelay_worker_sessions", ())], 1)
        self.assertEqual(found[("smartrelay_connections", ())], 1)
        [received] = self.sink.received
        self.assertRegex(received.sender, r"^bounce\+[a-z2-7]{37}@relay\.test$")
        yield relay.stop()
        self.assertFalse(running(worker))

    @inlineCallbacks
    def test_workerKilledMidTransaction(self):
        """
        A worker killed (SIGKILL) while its session waits for the answer to
        a message's data: the message is deferred with 451 4.4.2, the
        worker replaced, and the message delivered at its retry; nothing is
        lost.
        """
        _, relay, worker, queueID = yield self.submitOne(holding=1)
        yield waitFor(reactor, lambda: self.sink.held)
        os.kill(worker, signal.SIGKILL)
        yield waitFor(reactor, lambda: queueID in self.sink.queueIDs(), timeout=60)
        kinds = [e[0] for e in events(self.workdir) if e[1] == queueID]
        self.assertEqual(kinds[0], "accepted")
        self.assertIn("deferred", kinds)
        [deferred] = [json.loads(e[3]) for e in events(self.workdir) if e[0] == "deferred"]
        self.assertEqual((deferred["code"], deferred["status"]), (451, "4.4.2"))
        yield waitFor(reactor, lambda: "delivered" in [e[0] for e in events(self.workdir)])
        self.assertIn("re-wrap worker process 0 ended", relay.log())
        # A new worker took its place.
        yield waitFor(reactor, lambda: [p for p in childrenOf(relay.process.pid) if p != worker])
        yield relay.stop()
