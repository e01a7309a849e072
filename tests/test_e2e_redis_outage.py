"""
End to end: a Redis outage never sends blind.

A real C{redis-server} (started by the test on an OS-chosen port), a real
installed C{twistd smartrelay} with C{store = redis://...} and a real SMTP
sink.  An address is unsubscribed, the node's suppression replica syncs,
then C{redis-server} is killed with SIGKILL in the middle of the run: mail
is still accepted; the unsubscribed addresses (the one from before the
outage and one unsubscribed through the one-click link during it) are
never delivered; other mail is delivered while the replica is fresh and
held (451, retried) once it is older than C{suppression_max_staleness};
C{/metrics} says the store is unreachable.  Then C{redis-server} comes back
on the same port, without a relay restart, and every other message is
delivered exactly once:

  - L{RedisOutageTests.test_redisComesBackWithItsData}: with its
    append-only file, as an operator's Redis would;
  - L{RedisOutageTests.test_redisComesBackEmpty}: without any data (a new
    instance, or one that kept nothing): the unsubscribe made during the
    outage reaches it from the node's event journal, the one from before
    from the node's suppression replica.
"""

import json
import os
import re
import urllib.error
import urllib.request
from email import message_from_bytes, policy

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.redisserver import RedisServer, freePort
from tests.sink import RelayProcess, Sink, waitFor
from tests.test_e2e import submit
from tests.test_e2e_feedback import report

TOKEN = "e2e-outage-token-0123456789abcdef"

#: [smartrelay] suppression_max_staleness of the relay under test (the
#: replica is then synced every second).
STALENESS = 12.0

#: The address unsubscribed (through the API) before the outage.
EARLY = "early@example.org"

#: The address unsubscribed through its one-click link during the outage.
READER = "reader@example.org"


def request(url: str, method: str = "GET", body: bytes = None, headers: dict = {}) -> tuple:
    """
    One HTTP request: C{(status, body)}; blocking, for a thread.
    """
    r = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(r, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.read()


def sleep(seconds: float) -> Deferred:
    """
    Wait C{seconds} on the real reactor (end-to-end tests only).
    """
    return deferLater(reactor, seconds, lambda: None)


class RedisOutageTests(TestCase):
    """
    One node on one Redis that dies and comes back.
    """

    timeout = 240

    async def startAll(self, persistent: bool) -> None:
        self.redis = RedisServer(persistent=persistent).start()
        self.addCleanup(self.redis.stop)
        self.sink = Sink()
        port = reactor.listenTCP(0, self.sink, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.webPort = freePort()
        config = (
            "[smartrelay]\ndata_dir = var\nhostname = relay.test\nnode_id = 3C\n"
            f"store = {self.redis.url(0)}\nsuppression_max_staleness = {STALENESS:g}s\n"
            "secret = an-outage-test-secret-of-some-length\n\n"
            f"[web]\nlisten = tcp:{self.webPort}:interface=127.0.0.1\napi_tokens = {TOKEN}\n\n"
            f"[tracking]\nbase_url = http://127.0.0.1:{self.webPort}\n\n"
            "[smtp]\nlisten = tcp:0:interface=127.0.0.1\n\n"
            f"[delivery]\nsmarthost = tcp:host=127.0.0.1:port={port.getHost().port}\n"
            "retry = 2s*...\nretry_jitter = 0%\n"
        )
        self.workdir = os.path.abspath(self.mktemp())
        self.relay = RelayProcess(self.workdir, config)
        self.addCleanup(self.relay.kill)
        self.relay.start()
        await self.relay.waitReady(reactor)

    # -- talking to the relay ----------------------------------------------

    async def send(self, recipient: str) -> str:
        """
        Submit one message to C{recipient}; it must be accepted (250).

        @return: its queue id.
        """
        (code, text), refused = await deferToThread(submit, self.relay.port, [recipient])
        self.assertEqual((code, refused), (250, []), text)
        return text.split()[-1]

    async def api(self, method: str, path: str, document=None) -> tuple:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        body = None
        if document is not None:
            body = json.dumps(document).encode()
            headers["Content-Type"] = "application/json"
        status, answer = await deferToThread(
            request, f"http://127.0.0.1:{self.webPort}/api/v1{path}", method, body, headers
        )
        return status, json.loads(answer) if answer else None

    async def metrics(self) -> dict:
        """
        C{/metrics}: sample name (without labels) -> value.
        """
        status, body = await deferToThread(request, f"http://127.0.0.1:{self.webPort}/metrics")
        self.assertEqual(status, 200)
        return {
            s.name: s.value
            for family in text_string_to_metric_families(body.decode())
            for s in family.samples
            if not s.labels
        }

    async def until(self, condition, timeout: float = 60.0, what="") -> None:
        """
        Poll the coroutine function C{condition} until it returns true.

        @param what: what is waited for, for the failure message (or a
            function that says it then).
        """
        deadline = reactor.seconds() + timeout
        while not await condition():
            if reactor.seconds() > deadline:
                what = what() if callable(what) else what
                raise AssertionError(
                    f"not within {timeout:.0f}s: {what}\n--- relay log ---\n{self.relay.log()}"
                )
            await sleep(0.1)

    async def metric(self, name: str, predicate, timeout: float = 60.0) -> dict:
        """
        Scrape until C{predicate(value of name)}; the last scrape.
        """
        found = {}

        async def check():
            found.update(await self.metrics())
            return name in found and predicate(found[name])

        await self.until(check, timeout, lambda: f"{name} (last {found.get(name)})")
        return found

    def delivered(self, recipient: str) -> int:
        """
        How many copies of mail to C{recipient} the sink has.
        """
        return sum(r.recipients == [recipient] for r in self.sink.received)

    async def waitDelivered(self, recipients, timeout: float = 60.0) -> None:
        await waitFor(
            reactor, lambda: all(self.delivered(r) for r in recipients), timeout=timeout
        )

    async def state(self, queueID: str) -> str:
        """
        The state of the only recipient of C{queueID}, from the API.
        """
        status, document = await self.api("GET", "/messages/" + queueID)
        return document["recipients"][0]["state"] if status == 200 else None

    def replicaFile(self) -> str:
        """
        The node's suppression replica file as its last sync wrote it.
        """
        path = os.path.join(self.workdir, "var", "suppression-replica.jsonl")
        try:
            with open(path, encoding="utf-8") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    # -- the scenario --------------------------------------------------------

    async def beforeTheOutage(self) -> str:
        """
        Unsubscribe L{EARLY} through the API and wait for the replica to
        have it on disk (a sync, not only this node's own note of it);
        deliver one message to L{READER}.

        @return: L{READER}'s one-click unsubscribe URL.
        """
        status, entry = await self.api(
            "POST", "/suppressions", {"address": EARLY, "reason": "unsubscribe"}
        )
        self.assertEqual(status, 201, entry)
        await waitFor(reactor, lambda: EARLY in self.replicaFile(), timeout=30)
        await self.send(READER)
        await self.waitDelivered([READER])
        [received] = [r for r in self.sink.received if r.recipients == [READER]]
        message = message_from_bytes(received.data, policy=policy.default)
        url = message["List-Unsubscribe"].split(",")[0].strip(" <>")
        self.assertTrue(url.startswith(f"http://127.0.0.1:{self.webPort}/u/"), url)
        return url

    async def duringTheOutage(self, url: str) -> tuple:
        """
        Kill Redis; while it is down, mail is accepted, L{EARLY} and
        L{READER} (unsubscribed by its link meanwhile) are never
        delivered, other mail is delivered while the replica is fresh and
        held once it is stale.

        @return: C{(queue ids of the suppressed messages, recipients
            held)}.
        """
        self.redis.kill()
        suppressed = [await self.send(EARLY)]
        fresh = ["fresh1@example.org", "fresh2@example.org"]
        for recipient in fresh:
            await self.send(recipient)
        await self.metric("smartrelay_store_unreachable", lambda v: v == 1)

        # The one-click unsubscribe works with the store down.
        status, body = await deferToThread(
            request,
            url,
            "POST",
            b"List-Unsubscribe=One-Click",
            {"Content-Type": "application/x-www-form-urlencoded"},
        )
        self.assertEqual((status, body), (200, b"Unsubscribed.\n"))
        await self.metric("smartrelay_suppressions_pending", lambda v: v >= 1)
        suppressed.append(await self.send(READER))
        fresh.append("fresh3@example.org")
        await self.send(fresh[-1])

        # Checked against the fresh replica: delivered with Redis down.
        await self.waitDelivered(fresh, timeout=STALENESS)
        found = await self.metrics()
        self.assertEqual(found["smartrelay_store_unreachable"], 1)
        self.assertGreaterEqual(found["smartrelay_suppression_replica_checked_total"], 5)
        self.assertLess(found["smartrelay_suppression_replica_age_seconds"], STALENESS)

        # Once the replica is too old, recipients are held, not delivered.
        await self.metric(
            "smartrelay_suppression_replica_age_seconds", lambda v: v > STALENESS + 1
        )
        held = ["held1@example.org", "held2@example.org"]
        for recipient in held:
            await self.send(recipient)
        suppressed.append(await self.send(EARLY))
        suppressed.append(await self.send(READER))
        found = await self.metric("smartrelay_suppression_replica_held_total", lambda v: v >= 4)
        await sleep(3)  # at least one retry (2 s), still held
        self.assertEqual([self.delivered(r) for r in held], [0, 0])
        self.assertIn("holding recipients", self.relay.log())
        self.assertEqual(found["smartrelay_store_unreachable"], 1)
        return suppressed, fresh + held

    async def afterTheOutage(self, suppressed: list, others: list) -> None:
        """
        Redis is back: the store is reachable again, the held mail and new
        mail are delivered exactly once, the unsubscribed addresses never;
        the suppressions kept on the node are in the store.
        """
        await self.metric("smartrelay_store_unreachable", lambda v: v == 0, timeout=90)
        await self.metric("smartrelay_suppressions_pending", lambda v: v == 0, timeout=90)
        status, entry = await self.api("GET", "/suppressions/" + READER)
        self.assertEqual(status, 200, entry)
        self.assertEqual(entry["reason"], "unsubscribe")

        others.append("after@example.org")
        await self.send(others[-1])
        suppressed.append(await self.send(READER))
        await self.waitDelivered(others, timeout=90)
        for queueID in suppressed:
            await self.until(
                lambda: self._isSuppressed(queueID), timeout=90, what=f"{queueID} suppressed"
            )
        # Nothing more comes (retries every 2 s would show a duplicate).
        await sleep(5)
        self.assertEqual({r: self.delivered(r) for r in others}, dict.fromkeys(others, 1))
        self.assertEqual(self.delivered(EARLY), 0)
        self.assertEqual(self.delivered(READER), 1)  # before it unsubscribed
        self.assertEqual(len(self.sink.received), len(others) + 1)

    async def _isSuppressed(self, queueID: str) -> bool:
        return await self.state(queueID) == "suppressed"

    async def test_redisComesBackWithItsData(self):
        """
        SIGKILL of a Redis that keeps an append-only file, and a restart
        with it, with the relay running throughout: no unsubscribed address
        is mailed, the rest is delivered once, before (fresh replica) or
        after (held) Redis is back.
        """
        await self.startAll(persistent=True)
        url = await self.beforeTheOutage()
        suppressed, others = await self.duringTheOutage(url)
        self.redis.start(port=self.redis.port)
        await self.afterTheOutage(suppressed, others)
        # The entry from before the outage was kept by Redis itself.
        status, entry = await self.api("GET", "/suppressions/" + EARLY)
        self.assertEqual(status, 200, entry)
        self.assertNotIn("came back without its data", self.relay.log())
        await self.relay.stop()

    async def test_redisComesBackEmpty(self):
        """
        SIGKILL of a Redis without persistence and a new, empty one on the
        same port: the unsubscribe made during the outage reaches it from
        the node's journal, the one from before from its replica; no
        unsubscribed address is mailed and the rest is delivered once.
        """
        await self.startAll(persistent=False)
        url = await self.beforeTheOutage()
        suppressed, others = await self.duringTheOutage(url)
        self.redis.start(port=self.redis.port)
        await self.afterTheOutage(suppressed, others)
        # The node saw the loss and put its copy of the list back.
        self.assertIn("came back without its data", self.relay.log())
        status, entry = await self.api("GET", "/suppressions/" + EARLY)
        self.assertEqual(status, 200, entry)
        await self.relay.stop()

    async def test_mailtoUnsubscribeDuringOutage(self):
        """
        Mail to a message's C{unsub+TOKEN@} address while Redis is down is
        accepted and kept; the node does not mail its sender during the
        outage (held provisionally: the token's recipient is known only to
        the store); once Redis is back the unsubscribe is in the store and
        later mail is suppressed.
        """
        await self.startAll(persistent=True)
        leaver = "leaver@example.org"
        await self.send(leaver)
        await self.waitDelivered([leaver])
        [received] = [r for r in self.sink.received if r.recipients == [leaver]]
        mailto = re.search(rb"mailto:(unsub\+[a-z2-7]+@relay\.test)", received.data)
        self.assertTrue(mailto, received.data[:2000])
        await waitFor(reactor, lambda: leaver not in self.replicaFile() and self.replicaFile())
        self.redis.kill()
        address = mailto.group(1).decode()
        (rcpt, data) = await deferToThread(
            report, self.relay.feedbackPort, address,
            f"From: {leaver}\r\nTo: {address}\r\nSubject: unsubscribe\r\n\r\nunsubscribe\r\n",
            leaver,
        )
        self.assertEqual((rcpt[0], data[0]), (250, 250))
        await sleep(1)
        duringOutage = await self.send(leaver)
        await self.send("other@example.org")
        await self.waitDelivered(["other@example.org"], timeout=STALENESS)
        await sleep(2)
        deliveredDuringOutage = self.delivered(leaver) - 1

        self.redis.start(port=self.redis.port)
        await self.metric("smartrelay_store_unreachable", lambda v: v == 0, timeout=90)

        async def inStore():
            status, entry = await self.api("GET", "/suppressions/" + leaver)
            return status == 200

        await self.until(inStore, timeout=90, what=f"{leaver} in the store")
        after = await self.send(leaver)
        await self.until(lambda: self._isSuppressed(after), timeout=60, what="suppressed")
        self.assertEqual(self.delivered(leaver), 1 + deliveredDuringOutage)
        await self.relay.stop()
        self.assertEqual(deliveredDuringOutage, 0, duringOutage)
