"""
Tests for L{smartrelay.web.metrics} and L{smartrelay.web.health}: the event
counters, the store latency, the live-state collector, the health check
and the routes, in memory
(L{StubTreq}, L{Clock}); and the whole relay on a memory reactor.
"""

import json
import os
import shutil
import subprocess
from unittest import SkipTest

from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from treq.testing import StubTreq
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.internet.task import Clock
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest
from zope.interface.verify import verifyObject

from smartrelay.config import parseConfig
from smartrelay.engine.workers import WorkerPool
from smartrelay.events import EVENT_TYPES, Event, EventLog
from smartrelay.journal import EventJournal
from smartrelay.message import Recipient, SpoolEntry
from smartrelay.outbound.scheduler import DeliveryScheduler
from smartrelay.outbound.session import Reply
from smartrelay.outbound.testing import Delays, FakeDeliverer, FakeRouter, FakeSpool, RecordingEvents
from smartrelay.service import EVENT_WRITE_INTERVAL
from smartrelay.spool import Spool
from smartrelay.store.interfaces import IStore
from smartrelay.store.memory import MemoryStore
from smartrelay.web.health import (
    PROBE_FILE,
    PROBE_INTERVAL,
    PROBE_TIMEOUT,
    HealthCheck,
    probeSpool,
)
from smartrelay.web.metrics import (
    MAX_SERIES,
    OTHER,
    STORE_BUCKETS,
    EventCounts,
    MetricsApp,
    QueueSummary,
    RelayCollector,
    RelayMetrics,
    StoreLatency,
    TimedStore,
    clientIP,
    queueByDomain,
)

START = 1_700_000_000.0
LOOPBACK = parseConfig("").web.metrics_clients


def families(text: str) -> dict:
    """
    The metric families of a scrape, by name, parsed by prometheus_client.
    """
    return {family.name: family for family in text_string_to_metric_families(text)}


def sample(found: dict, name: str, **labels) -> float:
    """
    The value of the one sample C{name} with exactly C{labels}.
    """
    for family in found.values():
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return s.value
    raise AssertionError(f"no sample {name}{labels}")


def scrape(registry) -> dict:
    return families(generate_latest(registry).decode("utf-8"))


def synchronous(f, *args, **kwargs) -> Deferred:
    return maybeDeferred(f, *args, **kwargs)


def makeUnwritable(testCase, path: str) -> tuple:
    """
    Make the directory C{path} refuse new entries for this process and
    its children, undone at clean-up at the latest: C{(how, undo)}.

    Not root: mode 0555.  Root ignores permissions (C{os.access} and
    C{chmod} tell it nothing), so then the directory is made immutable
    (C{chattr +i}, which needs CAP_LINUX_IMMUTABLE and a file system
    that has the flag, such as ext4, xfs or btrfs): nobody, root
    included, can create a file in it, which is what the health probe
    must notice, while files already open in it stay writable (as for a
    directory made read-only under a running relay).  Where neither
    works, the test is skipped.
    """
    if os.geteuid() != 0:
        how, make, unmake = "mode 0555", ["chmod", "0555", path], ["chmod", "0700", path]
    else:
        chattr = shutil.which("chattr")
        if chattr is None:
            raise SkipTest("running as root without chattr: no way to make a directory unwritable")
        how, make, unmake = "immutable (chattr +i)", [chattr, "+i", path], [chattr, "-i", path]
    made = subprocess.run(make, capture_output=True, text=True)
    if made.returncode != 0:
        raise SkipTest(f"{' '.join(make)} failed: {made.stderr.strip()}")
    undone = []

    def undo() -> None:
        if not undone:
            undone.append(True)
            subprocess.run(unmake, check=True)

    testCase.addCleanup(undo)
    return how, undo


class _Only:
    """
    A registry of one collector, for L{generate_latest}.
    """

    def __init__(self, *collectors) -> None:
        self.collectors = collectors

    def collect(self):
        for collector in self.collectors:
            yield from collector.collect()



# -- counters --------------------------------------------------------------------


class EventCountsTests(SynchronousTestCase):
    """
    L{EventCounts}: every event the event log emits, by type and bounce kind.
    """

    def setUp(self):
        self.clock = Clock()
        self.counts = EventCounts()
        self.log = EventLog(MemoryStore(), self.clock, observe=self.counts.count)

    def scrape(self) -> dict:
        return families(generate_latest(_Only(self.counts)).decode("utf-8"))

    def test_everyTypeFromZero(self):
        """
        Before any event, every event type and every named counter is
        there with 0, so that rates can be taken from the first scrape.
        """
        found = self.scrape()
        for type in EVENT_TYPES:
            self.assertEqual(sample(found, "smartrelay_events_total", type=type), 0)
        for name in ("accepted", "rejected", "delivered", "deferred", "expired",
                     "suppressed", "complained", "unsubscribed"):
            self.assertEqual(sample(found, f"smartrelay_messages_{name}_total"), 0)
        self.assertEqual(sample(found, "smartrelay_messages_bounced_total", kind="hard"), 0)
        self.assertEqual(sample(found, "smartrelay_messages_bounced_total", kind="soft"), 0)
        self.assertEqual(found["smartrelay_events"].type, "counter")

    def test_counted(self):
        """
        Events emitted through the event log are counted by type, bounces
        also by kind (a kind that is neither hard nor soft as unknown).
        """
        self.log.emit("accepted", "Q1", "a@example.com")
        self.log.emit("accepted", "Q1", "b@example.com")
        self.log.emit("delivered", "Q1", "a@example.com")
        self.log.emit("bounced", "Q1", "b@example.com", detail={"kind": "hard"})
        self.log.emit("bounced", "Q2", "c@example.com", detail={"kind": "soft"})
        self.log.emit("bounced", "Q3", "d@example.com", detail={})
        self.log.emit("opened", "Q1", "a@example.com")
        self.clock.advance(0)
        found = self.scrape()
        self.assertEqual(sample(found, "smartrelay_events_total", type="accepted"), 2)
        self.assertEqual(sample(found, "smartrelay_events_total", type="bounced"), 3)
        self.assertEqual(sample(found, "smartrelay_events_total", type="opened"), 1)
        self.assertEqual(sample(found, "smartrelay_messages_accepted_total"), 2)
        self.assertEqual(sample(found, "smartrelay_messages_delivered_total"), 1)
        self.assertEqual(sample(found, "smartrelay_messages_bounced_total", kind="hard"), 1)
        self.assertEqual(sample(found, "smartrelay_messages_bounced_total", kind="soft"), 1)
        self.assertEqual(sample(found, "smartrelay_messages_bounced_total", kind="unknown"), 1)

    def test_sms(self):
        """
        SMS parts are counted by their events, from 0.
        """
        found = self.scrape()
        for name in ("submitted", "delivered", "failed"):
            self.assertEqual(sample(found, f"smartrelay_sms_parts_{name}_total"), 0)
        phone = "+4915112345678@sms.example"
        self.log.emit("sms_submitted", "Q1", phone, detail={"part": 1, "parts": 2})
        self.log.emit("sms_submitted", "Q1", phone, detail={"part": 2, "parts": 2})
        self.log.emit("sms_delivered", "Q1", phone, detail={"part": 1, "parts": 2})
        self.clock.advance(0)
        found = self.scrape()
        self.assertEqual(sample(found, "smartrelay_sms_parts_submitted_total"), 2)
        self.assertEqual(sample(found, "smartrelay_sms_parts_delivered_total"), 1)
        self.assertEqual(sample(found, "smartrelay_sms_parts_failed_total"), 0)


class SlowStore(MemoryStore):
    """
    A L{MemoryStore} whose C{checkSuppressions} answers when the test fires
    it, and whose C{appendEvents} fails.
    """

    def __init__(self) -> None:
        super().__init__()
        self.waiting: list = []

    def checkSuppressions(self, addresses, now):
        d: Deferred = Deferred()
        self.waiting.append(d)
        return d

    def appendEvents(self, events):
        return fail(OSError("database is locked"))


class StoreLatencyTests(SynchronousTestCase):
    """
    L{TimedStore} and L{StoreLatency}: how long the store takes to answer,
    on the reactor's clock.
    """

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(START)
        self.latency = StoreLatency()
        self.store = SlowStore()
        self.timed = TimedStore(self.store, self.clock, self.latency)

    def test_providesIStore(self):
        """
        The timed store is an L{IStore}, and each of its methods reaches
        the store's own.
        """
        verifyObject(IStore, self.timed)
        timed = TimedStore(MemoryStore(), self.clock, self.latency)
        self.successResultOf(timed.start())
        self.assertEqual(self.successResultOf(timed.checkSuppressions(["a@b.example"], 0)), {})
        self.assertEqual(self.successResultOf(timed.eventsForMessage("Q")), [])
        self.assertEqual(self.successResultOf(timed.queryEvents(type="opened")).events, [])
        self.assertEqual(self.successResultOf(timed.listSuppressions(limit=5)).entries, [])
        self.assertEqual(self.successResultOf(timed.pruneEvents(0, 10)), 0)
        self.assertTrue(self.successResultOf(timed.takeTokens("k", 1.0, 1, START)).allowed)
        self.successResultOf(timed.close())
        found = families(generate_latest(_Only(self.latency)).decode())
        for operation in ("start", "checkSuppressions", "eventsForMessage", "queryEvents",
                          "listSuppressions", "pruneEvents", "takeTokens", "close"):
            self.assertEqual(
                sample(found, "smartrelay_store_call_duration_seconds_count",
                       operation=operation), 1
            )

    def test_duration(self):
        """
        A call answered 0.3 s later counts in the buckets from 0.5 s up,
        with 0.3 in the sum; the answer goes through unchanged.
        """
        d = self.timed.checkSuppressions(["a@b.example"], START)
        self.clock.advance(0.3)
        self.store.waiting.pop().callback({"x": 1})
        self.assertEqual(self.successResultOf(d), {"x": 1})
        found = families(generate_latest(_Only(self.latency)).decode())
        self.assertEqual(found["smartrelay_store_call_duration_seconds"].type, "histogram")
        buckets = {
            s.labels["le"]: s.value
            for s in found["smartrelay_store_call_duration_seconds"].samples
            if s.name.endswith("_bucket")
        }
        self.assertEqual(len(buckets), len(STORE_BUCKETS) + 1)
        self.assertEqual(buckets["0.25"], 0)
        self.assertEqual(buckets["0.5"], 1)
        self.assertEqual(buckets["+Inf"], 1)
        self.assertAlmostEqual(
            sample(found, "smartrelay_store_call_duration_seconds_sum",
                   operation="checkSuppressions"), 0.3, places=6
        )
        self.assertEqual(
            sample(found, "smartrelay_store_call_failures_total", operation="checkSuppressions"), 0
        )

    def test_failure(self):
        """
        A failed call is timed too, and counted as a failure; the failure
        reaches the caller.
        """
        self.failureResultOf(self.timed.appendEvents([]), OSError)
        found = families(generate_latest(_Only(self.latency)).decode())
        self.assertEqual(
            sample(found, "smartrelay_store_call_failures_total", operation="appendEvents"), 1
        )
        self.assertEqual(
            sample(found, "smartrelay_store_call_duration_seconds_count", operation="appendEvents"),
            1,
        )

    def test_clockBackwards(self):
        """
        A clock that went back during a call counts it as taking no time.
        """
        d = self.timed.checkSuppressions([], START)
        self.clock.rightNow -= 5
        self.store.waiting.pop().callback({})
        self.successResultOf(d)
        found = families(generate_latest(_Only(self.latency)).decode())
        self.assertEqual(
            sample(found, "smartrelay_store_call_duration_seconds_sum",
                   operation="checkSuppressions"), 0
        )


# -- the live state ----------------------------------------------------------------


def entry(queueID: str, received: float, *recipients) -> SpoolEntry:
    return SpoolEntry(
        queue_id=queueID,
        sender="app@example.com",
        recipients=[
            r if isinstance(r, Recipient) else Recipient(r) for r in recipients
        ],
        received=received,
        size=10,
    )


class QueueByDomainTests(SynchronousTestCase):
    """
    L{queueByDomain}: recipients still to deliver by domain, and the oldest.
    """

    def test_counts(self):
        """
        Waiting recipients are counted by lower-cased domain with the
        oldest message's time; finished ones are not.
        """
        entries = [
            entry("Q1", 100.0, "a@Example.COM", Recipient("b@example.com", state="delivered")),
            entry("Q2", 50.0, "c@example.com", "d@other.example"),
            entry("Q3", 70.0, Recipient("e@gone.example", state="bounced"),
                  Recipient("f@other.example", state="deferred")),
        ]
        self.assertEqual(
            queueByDomain(entries),
            {"example.com": (2, 50.0), "other.example": (2, 50.0)},
        )

    def test_limit(self):
        """
        Beyond C{limit} domains, the smaller ones are summed under
        L{OTHER}, with the oldest of them.
        """
        entries = [entry("Q1", 10.0, "a@big.example", "b@big.example", "c@big.example")]
        entries += [entry(f"Q{n}", float(n), f"x@d{n}.example") for n in range(2, 7)]
        entries.append(entry("Q9", 99.0, "a@mid.example", "b@mid.example"))
        found = queueByDomain(entries, limit=2)
        self.assertEqual(
            found, {"big.example": (3, 10.0), "mid.example": (2, 99.0), OTHER: (5, 2.0)}
        )


class QueueSummaryTests(SynchronousTestCase):
    """
    L{QueueSummary}: a big queue is summed in slices between reactor turns.
    """

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(START)
        self.scheduler = DeliveryScheduler(
            spool=FakeSpool(), router=FakeRouter(), connector=FakeDeliverer(),
            events=RecordingEvents(), clock=self.clock, retry=Delays((60,)),
            maxAge=3600.0, maxConnections=1, hold=True,
        )
        self.scheduler.startService()
        self.summary = QueueSummary(self.clock, self.scheduler, syncLimit=4, sliceSize=2)

    def add(self, count: int, domain: str = "example.org") -> None:
        for n in range(count):
            self.scheduler.enqueue(
                entry(f"Q{domain}{n}", START - n, f"a{n}@{domain}")
            )

    def test_small(self):
        """
        Up to C{syncLimit} messages are summed at once, with no timer.
        """
        self.add(4)
        self.assertEqual(self.summary.current(), {"example.org": (4, START - 3)})
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_big(self):
        """
        The first scrape of a big queue sums it whole; later ones get the
        last pass and start the next, one slice of C{sliceSize} messages a
        reactor turn.
        """
        self.add(5)
        self.assertEqual(self.summary.current(), {"example.org": (5, START - 4)})
        self.add(2, "example.net")
        self.assertEqual(self.summary.current(), {"example.org": (5, START - 4)})
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        turns = 0
        while self.clock.getDelayedCalls():
            [call] = self.clock.getDelayedCalls()
            func = call.func
            call.cancel()
            func()
            turns += 1
        self.assertEqual(turns, 4)  # 7 messages, 2 a slice
        self.assertEqual(
            self.summary.current(),
            {"example.org": (5, START - 4), "example.net": (2, START - 1)},
        )
        self.summary.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_shrinks(self):
        """
        Once the queue is small again it is summed at once, and a pass in
        progress is dropped.
        """
        self.add(6)
        self.summary.current()
        self.summary.current()
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        for queueID in list(self.scheduler._queue.entries)[:3]:
            del self.scheduler._queue.entries[queueID]
        self.assertEqual(self.summary.current()["example.org"][0], 3)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class ProcessReactor(Clock):
    """
    A clock that spawns processes as L{StringTransport}s (for the worker
    pool): what is written to them stays unanswered.
    """

    def __init__(self) -> None:
        super().__init__()
        from twisted.internet.testing import StringTransport

        self._transport = StringTransport

    def spawn(self, reactor, protocol):
        transport = self._transport()
        protocol.makeConnection(transport)
        return transport


class CollectorTests(SynchronousTestCase):
    """
    L{RelayCollector} reads the queues, destinations, spool, workers,
    thread pools and event backlog when scraped.
    """

    def setUp(self):
        self.clock = ProcessReactor()
        self.clock.advance(START)
        self.deliverer = FakeDeliverer()
        self.fakeSpool = FakeSpool()
        self.scheduler = DeliveryScheduler(
            spool=self.fakeSpool,
            router=FakeRouter(),
            connector=self.deliverer,
            events=RecordingEvents(),
            clock=self.clock,
            retry=Delays((60,)),
            maxAge=3600.0,
            maxConnections=7,
        )
        self.scheduler.startService()
        self.addCleanup(lambda: self.scheduler.running and self.scheduler.stopService())
        self.spool = Spool(os.path.abspath(self.mktemp()), synchronous, clock=self.clock)
        self.successResultOf(self.spool.recover())
        self.journal = EventJournal(os.path.abspath(self.mktemp()), synchronous)
        self.events = EventLog(MemoryStore(), self.clock, journal=self.journal)
        self.successResultOf(self.events.start())
        self.workers = WorkerPool(self.clock, 2, spawn=self.clock.spawn)
        self.workers.start("context")
        self.pool = ThreadPool(minthreads=0, maxthreads=1, name="test-rewrap")
        self.collector = RelayCollector(
            clock=self.clock,
            scheduler=self.scheduler,
            spool=self.spool,
            events=self.events,
            journal=self.journal,
            listeners={},
            workers=self.workers,
            threadPools={"rewrap": self.pool},
            nodeID="2A",
        )

    def scrape(self) -> dict:
        return families(generate_latest(_Only(self.collector)).decode("utf-8"))

    def test_idle(self):
        """
        An idle relay: empty queues, no connections, an empty spool, no
        backlog; the node's id is in C{smartrelay_node_info}.
        """
        found = self.scrape()
        self.assertEqual(sample(found, "smartrelay_queue_messages"), 0)
        self.assertEqual(found["smartrelay_queue_recipients"].samples, [])
        self.assertEqual(sample(found, "smartrelay_connections"), 0)
        self.assertEqual(sample(found, "smartrelay_connections_limit"), 7)
        self.assertEqual(sample(found, "smartrelay_spool_bytes"), 0)
        self.assertEqual(sample(found, "smartrelay_event_backlog"), 0)
        self.assertEqual(sample(found, "smartrelay_event_store_degraded"), 0)
        self.assertEqual(sample(found, "smartrelay_rewrap_workers"), 2)
        self.assertEqual(sample(found, "smartrelay_rewrap_worker_jobs"), 0)
        self.assertEqual(sample(found, "smartrelay_worker_sessions"), 0)
        [info] = found["smartrelay_node_info"].samples
        self.assertEqual(info.labels["node_id"], "2A")
        for family in found.values():
            self.assertTrue(family.name.startswith("smartrelay_"), family.name)
            self.assertIn(family.type, ("gauge", "counter"), family.name)

    def test_workerSessions(self):
        """The sessions the workers hold, from the scheduler's connector."""

        class Connector:
            sessions = 3

        self.collector.connector = Connector()
        self.assertEqual(sample(self.scrape(), "smartrelay_worker_sessions"), 3)

    def test_queuesAndConnections(self):
        """
        Queued recipients by domain with the age of the oldest; the
        destination's open and busy connections while a transaction runs.
        """
        older = entry("Q1", START - 90, "a@example.org", "b@example.net")
        newer = entry("Q2", START - 30, "c@example.org")
        for e in (older, newer):
            self.fakeSpool.add(e)
            self.scheduler.enqueue(e)
        self.clock.advance(0)
        found = self.scrape()
        self.assertEqual(sample(found, "smartrelay_queue_messages"), 2)
        self.assertEqual(sample(found, "smartrelay_queue_recipients", domain="example.org"), 2)
        self.assertEqual(sample(found, "smartrelay_queue_recipients", domain="example.net"), 1)
        self.assertEqual(
            sample(found, "smartrelay_queue_oldest_age_seconds", domain="example.org"), 90
        )
        # Every job went to the smarthost's destination: sessions opened.
        destination = self.scheduler.destinations()[0]["destination"]
        connections = sample(found, "smartrelay_destination_connections", destination=destination)
        self.assertGreaterEqual(connections, 1)
        self.assertEqual(sample(found, "smartrelay_connections"), connections)
        self.assertEqual(
            sample(found, "smartrelay_destination_connections_busy", destination=destination),
            connections,
        )
        self.assertEqual(
            sample(found, "smartrelay_destination_throttle_factor", destination=destination), 1
        )
        self.clock.advance(10)
        found = self.scrape()
        self.assertEqual(
            sample(found, "smartrelay_queue_oldest_age_seconds", domain="example.org"), 100
        )

    def test_parkedDestination(self):
        """
        A destination that cannot be connected to shows its parked
        recipients and when it is tried again; they are still queued
        recipients of their domain.
        """
        self.deliverer.refuse["smarthost.test:25"] = Reply(451, "4.4.1", "cannot connect")
        for n in range(4):
            e = entry(f"Q{n}", START, f"r{n}@example.org")
            self.fakeSpool.add(e)
            self.scheduler.enqueue(e)
            self.clock.advance(0)
        found = self.scrape()
        destination = "relay:smarthost.test:25"
        self.assertEqual(
            sample(found, "smartrelay_destination_recipients_parked", destination=destination), 3
        )
        self.assertEqual(
            sample(found, "smartrelay_destination_suspended_until_seconds", destination=destination),
            START + 60,
        )
        self.assertEqual(sample(found, "smartrelay_queue_recipients", domain="example.org"), 4)

    def test_domainsCapped(self):
        """
        However many domains are queued, at most L{MAX_SERIES} (and the sum
        of the rest) are labelled.
        """
        for n in range(MAX_SERIES + 20):
            self.scheduler.enqueue(entry(f"Q{n}", START, f"a@d{n}.example"))
        found = self.scrape()
        samples = found["smartrelay_queue_recipients"].samples
        self.assertEqual(len(samples), MAX_SERIES + 1)
        self.assertEqual(sum(s.value for s in samples), MAX_SERIES + 20)
        self.assertEqual(sample(found, "smartrelay_queue_recipients", domain=OTHER), 20)

    def test_spool(self):
        """
        The spool's bytes on disk and those of messages still queued.
        """
        stored = entry("2A/01-00001-00000001", START, "a@example.org")
        self.successResultOf(self.spool.store(stored, b"Subject: hi\r\n\r\nhello\r\n"))
        found = self.scrape()
        size = os.path.getsize(self.spool._segmentPath(1))
        self.assertEqual(sample(found, "smartrelay_spool_bytes"), size)
        self.assertEqual(sample(found, "smartrelay_spool_segments"), 1)
        self.assertGreater(sample(found, "smartrelay_spool_live_bytes"), 0)
        self.assertLessEqual(sample(found, "smartrelay_spool_live_bytes"), size)

    def test_rewrapJobs(self):
        """
        Jobs sent to worker processes and not answered, and jobs waiting
        for a thread of a pool.
        """
        self.workers.run("job one")
        self.workers.run("job two")
        self.workers.run("job three")
        self.pool.callInThread(lambda: None)
        found = self.scrape()
        self.assertEqual(sample(found, "smartrelay_rewrap_worker_jobs"), 3)
        self.assertEqual(sample(found, "smartrelay_thread_pool_jobs", pool="rewrap", state="waiting"), 1)
        self.assertEqual(sample(found, "smartrelay_thread_pool_jobs", pool="rewrap", state="running"), 0)

    def test_eventBacklog(self):
        """
        Events not yet written, writes in flight, and the journal while the
        store is down.
        """
        self.events.store = SlowStore()
        self.events.emit("accepted", "Q1", "a@example.org")
        self.events.emit("accepted", "Q1", "b@example.org")
        found = self.scrape()
        self.assertEqual(sample(found, "smartrelay_event_backlog"), 2)
        self.clock.advance(0)  # the write fails: into the journal
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        found = self.scrape()
        self.assertEqual(sample(found, "smartrelay_event_backlog"), 0)
        self.assertEqual(sample(found, "smartrelay_event_store_degraded"), 1)
        self.assertGreater(sample(found, "smartrelay_event_journal_bytes"), 0)
        self.events.stop()

    def test_sms(self):
        """
        With C{[sms]}: the SMPP session's state and its window.
        """
        found = self.scrape()
        self.assertNotIn("smartrelay_smpp_bound", found)

        class Client:
            bound, inFlight, waiting = True, 3, 2

        self.collector.sms = Client()
        found = self.scrape()
        self.assertEqual(sample(found, "smartrelay_smpp_bound"), 1)
        self.assertEqual(sample(found, "smartrelay_smpp_submits_in_flight"), 3)
        self.assertEqual(sample(found, "smartrelay_smpp_submits_waiting"), 2)
        self.events.stop()

    def test_smsRateLocal(self):
        """
        C{smartrelay_sms_rate_local} is 1 while the SMS client paces its
        submits at C{rate / N} because the store's bucket cannot be reached
        (its C{ratesLocal}), else 0; the store counts as unreachable then.
        """
        from smartrelay.sms.client import SMSClient

        found = self.scrape()
        self.assertNotIn("smartrelay_sms_rate_local", found)

        class Client:
            bound, inFlight, waiting, ratesLocal = True, 0, 0, False

        self.collector.sms = client = Client()
        found = self.scrape()
        self.assertEqual(sample(found, "smartrelay_sms_rate_local"), 0)
        self.assertEqual(sample(found, "smartrelay_store_unreachable"), 0)
        client.ratesLocal = True
        found = self.scrape()
        self.assertEqual(sample(found, "smartrelay_sms_rate_local"), 1)
        self.assertEqual(sample(found, "smartrelay_store_unreachable"), 1)
        self.assertEqual(sample(found, "smartrelay_limits_fallback", kind="rates"), 0)
        # The attribute read is the real client's.
        self.assertIn("ratesLocal", {a.name for a in SMSClient.__attrs_attrs__})
        self.events.stop()

    def test_throttlesUnwritten(self):
        """
        C{smartrelay_throttles_unwritten}: the adaptive throttle triggers
        this node holds because the store could not take them, back to 0
        once they are written (replayed) when it answers again.
        """
        from smartrelay.cluster.throttle import LocalThrottles, ThrottleBoard
        from tests.test_cluster_throttle import FlakyThrottles

        found = self.scrape()
        self.assertEqual(sample(found, "smartrelay_throttles_unwritten"), 0)
        backend = FlakyThrottles(LocalThrottles())
        self.collector.throttles = board = ThrottleBoard(
            backend, self.clock, cooldown=60.0, shared=True
        )
        backend.down = True
        board.throttle("provider:google").trigger("421 slow down")
        board.throttle("example.org").trigger("421 slow down")
        found = self.scrape()
        self.assertEqual(sample(found, "smartrelay_throttles_unwritten"), 2)
        self.assertEqual(sample(found, "smartrelay_store_unreachable"), 1)
        backend.down = False
        self.successResultOf(board.read())
        found = self.scrape()
        self.assertEqual(sample(found, "smartrelay_throttles_unwritten"), 0)
        self.assertEqual(sample(found, "smartrelay_store_unreachable"), 0)
        self.events.stop()

    def test_storeOutage(self):
        """
        While the store cannot be reached: the outage, the 1/N fallback of
        connection slots and rates, N, the replica's age, what was checked
        against it and held, the suppressions waiting in the journal.
        """
        from smartrelay.cluster.leases import LeaseKeeper
        from smartrelay.cluster.replica import SuppressionReplica
        from smartrelay.store.interfaces import SuppressionEntry
        from tests.test_cluster_leases import FixedNodes, UnreachableLeases
        from tests.test_cluster_replica import FlakyStore

        backend, store = UnreachableLeases(), FlakyStore()
        self.collector.leases = keeper = LeaseKeeper(
            backend, self.clock, shared=True, nodes=FixedNodes(3)
        )
        self.collector.replica = replica = SuppressionReplica(
            store, self.clock, self.mktemp(), pending=self.events.pendingSuppressions
        )
        found = self.scrape()
        self.assertEqual(sample(found, "smartrelay_store_unreachable"), 0)
        self.assertEqual(sample(found, "smartrelay_limits_fallback", kind="connections"), 0)
        self.assertEqual(sample(found, "smartrelay_suppression_replica_age_seconds"), float("inf"))
        self.successResultOf(replica.sync())
        backend.down = store.down = True
        self.successResultOf(keeper.acquire("conn:a", 6))
        self.scheduler._dispatcher.ratesLocal = True
        self.clock.advance(42)
        self.successResultOf(replica.sync())
        replica.check(["a@example.org", "b@example.org"], self.clock.seconds())
        replica.held += 1
        self.events.store = FlakyStore()
        self.events.store.addSuppression = lambda entry: fail(ConnectionRefusedError())
        self.successResultOf(
            self.events.suppress(
                SuppressionEntry(address="u@example.org", reason="unsubscribe", time=START)
            )
        )
        found = self.scrape()
        self.assertEqual(sample(found, "smartrelay_store_unreachable"), 1)
        self.assertEqual(sample(found, "smartrelay_limits_fallback", kind="connections"), 1)
        self.assertEqual(sample(found, "smartrelay_limits_fallback", kind="rates"), 1)
        self.assertEqual(sample(found, "smartrelay_cluster_nodes"), 3)
        self.assertEqual(sample(found, "smartrelay_suppression_replica_age_seconds"), 42)
        self.assertEqual(sample(found, "smartrelay_suppression_replica_entries"), 0)
        self.assertEqual(sample(found, "smartrelay_suppression_replica_checked_total"), 2)
        self.assertEqual(sample(found, "smartrelay_suppression_replica_held_total"), 1)
        self.assertEqual(sample(found, "smartrelay_suppressions_pending"), 1)
        self.events.stop()


# -- /healthz -----------------------------------------------------------------------


class HangingStore(MemoryStore):
    """
    A L{MemoryStore} whose suppression look-ups never answer (until fired),
    or fail with C{error}.
    """

    def __init__(self) -> None:
        super().__init__()
        self.calls: list = []
        self.error = None
        self.hang = False

    def checkSuppressions(self, addresses, now):
        self.calls.append(addresses)
        if self.error is not None:
            return fail(self.error)
        if self.hang:
            return Deferred()
        return super().checkSuppressions(addresses, now)


class AppTestsMixin:
    """
    A L{MetricsApp} on fakes, requested through L{StubTreq} (from loopback).
    """

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(START)
        self.spoolDir = os.path.abspath(self.mktemp())
        os.makedirs(self.spoolDir)
        self.store = HangingStore()
        self.up = {"submission": True, "feedback": True, "web": True}
        self.probes: list = []
        self.metrics = RelayMetrics(process=False)
        self.health = HealthCheck(
            self.clock,
            spoolDirectory=self.spoolDir,
            runInThread=self.runInThread,
            store=self.store,
            listeners=lambda: self.up,
        )
        self.app = self.makeApp()
        self.treq = StubTreq(self.app.resource())

    def makeApp(self, **kwargs) -> MetricsApp:
        return MetricsApp(self.metrics.registry, self.health, kwargs.pop("allowed", LOOPBACK), **kwargs)

    def runInThread(self, f, *args):
        self.probes.append(args)
        return maybeDeferred(f, *args)

    def request(self, method: str, path: str, **kwargs):
        d = self.treq.request(method, "http://relay.test" + path, **kwargs)
        self.treq.flush()
        response = self.successResultOf(d)
        body = self.successResultOf(response.content())
        return response, body

    def getJSON(self, path: str, **kwargs):
        response, body = self.request("GET", path, **kwargs)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/json"])
        return response.code, json.loads(body)


class HealthTests(AppTestsMixin, SynchronousTestCase):
    """
    C{GET /healthz}: 200 when the spool takes a file, the store answers and
    the listeners are up; 503 naming each thing that is wrong.
    """

    def test_healthy(self):
        """
        All well: 200, status ok, no problems, each check with its time;
        the probe file is gone again.
        """
        code, body = self.getJSON("/healthz")
        self.assertEqual(code, 200)
        self.assertEqual(body["status"], "ok")
        self.assertEqual(body["problems"], [])
        self.assertTrue(body["checks"]["spool"]["ok"])
        self.assertTrue(body["checks"]["store"]["ok"])
        self.assertEqual(
            body["checks"]["listeners"],
            {"ok": True, "submission": True, "feedback": True, "web": True},
        )
        self.assertEqual(body["checks"]["spool"]["checked_at"], "2023-11-14T22:13:20.000Z")
        self.assertEqual(os.listdir(self.spoolDir), [])

    def test_spoolUnwritable(self):
        """
        A spool directory that takes no new file (read-only, or immutable
        for root): 503 naming the spool and the directory.
        """
        how, _ = makeUnwritable(self, self.spoolDir)
        code, body = self.getJSON("/healthz")
        self.assertEqual(code, 503, how)
        self.assertEqual(body["status"], "unavailable")
        [problem] = body["problems"]
        self.assertTrue(problem.startswith(f"spool: cannot write to {self.spoolDir}: "), problem)
        self.assertFalse(body["checks"]["spool"]["ok"])
        self.assertTrue(body["checks"]["store"]["ok"])

    def test_spoolGone(self):
        """
        A spool directory that is not there: 503, "No such file or directory".
        """
        os.rmdir(self.spoolDir)
        code, body = self.getJSON("/healthz")
        self.assertEqual(code, 503)
        self.assertEqual(
            body["problems"],
            [f"spool: cannot write to {self.spoolDir}: No such file or directory"],
        )

    def test_staleProbeFile(self):
        """
        A probe file left by a crash is replaced, and removed again.
        """
        with open(os.path.join(self.spoolDir, PROBE_FILE), "w") as f:
            f.write("old")
        code, _ = self.getJSON("/healthz")
        self.assertEqual(code, 200)
        self.assertEqual(os.listdir(self.spoolDir), [])

    def test_probeCreatesAFile(self):
        """
        The probe makes a new directory entry each time, so a directory
        that stopped taking new files fails it even if an old probe file
        were writable.
        """
        calls = []
        real = os.open

        def recording(path, flags, *args):
            calls.append((path, flags))
            return real(path, flags, *args)

        self.patch(os, "open", recording)
        probeSpool(self.spoolDir)
        [(path, flags)] = calls
        self.assertEqual(path, os.path.join(self.spoolDir, PROBE_FILE))
        self.assertTrue(flags & os.O_CREAT and flags & os.O_EXCL)

    def test_storeTimesOut(self):
        """
        A store that does not answer within L{PROBE_TIMEOUT} seconds: 503
        naming the store; until the call ends, later requests do not ask
        the store again and say how long it has been waiting.
        """
        self.store.hang = True
        d = self.treq.get("http://relay.test/healthz")
        self.treq.flush()
        self.assertNoResult(d)
        self.clock.advance(PROBE_TIMEOUT)
        self.treq.flush()
        response = self.successResultOf(d)
        body = json.loads(self.successResultOf(response.content()))
        self.assertEqual(response.code, 503)
        self.assertEqual(body["problems"], ["store: no answer after 2.0 s"])
        self.assertTrue(body["checks"]["spool"]["ok"])
        self.clock.advance(3)
        code, body = self.getJSON("/healthz")
        self.assertEqual(code, 503)
        self.assertEqual(body["problems"], ["store: no answer after 5.0 s"])
        self.assertEqual(len(self.store.calls), 1)

    def test_storeFails(self):
        """
        A store call that fails: 503 with the store's error.
        """
        self.store.error = ConnectionRefusedError("connection refused")
        code, body = self.getJSON("/healthz")
        self.assertEqual(code, 503)
        self.assertEqual(body["problems"], ["store: the store failed: connection refused"])

    def test_listenerDown(self):
        """
        A listener that is not up: 503 naming it.
        """
        self.up["submission"] = False
        code, body = self.getJSON("/healthz")
        self.assertEqual(code, 503)
        self.assertEqual(body["problems"], ["listener submission: not listening"])
        self.assertFalse(body["checks"]["listeners"]["ok"])

    def test_everythingWrong(self):
        """
        Every problem is named at once.
        """
        os.rmdir(self.spoolDir)
        self.store.error = OSError("gone")
        self.up["feedback"] = False
        code, body = self.getJSON("/healthz")
        self.assertEqual(code, 503)
        self.assertEqual(
            [p.split(":")[0] for p in body["problems"]],
            ["spool", "store", "listener feedback"],
        )

    def test_cached(self):
        """
        However often it is asked, the spool and the store are probed at
        most once every L{PROBE_INTERVAL} seconds.
        """
        for _ in range(5):
            self.assertEqual(self.getJSON("/healthz")[0], 200)
        self.assertEqual((len(self.probes), len(self.store.calls)), (1, 1))
        self.clock.advance(PROBE_INTERVAL)
        self.assertEqual(self.getJSON("/healthz")[0], 200)
        self.assertEqual((len(self.probes), len(self.store.calls)), (2, 2))

    def test_recovers(self):
        """
        Once the problem is gone, the next probe after the interval says so.
        """
        self.store.error = OSError("gone")
        self.assertEqual(self.getJSON("/healthz")[0], 503)
        self.store.error = None
        self.assertEqual(self.getJSON("/healthz")[0], 503)
        self.clock.advance(PROBE_INTERVAL)
        self.assertEqual(self.getJSON("/healthz")[0], 200)

    def test_eventLogReported(self):
        """
        The event log's state is reported, and does not make the relay
        unhealthy (mail flows while events wait in the journal).
        """
        events = EventLog(MemoryStore(), self.clock)
        events.emit("accepted", "Q1", "a@example.org")
        self.health.events = events
        code, body = self.getJSON("/healthz")
        self.assertEqual(code, 200)
        self.assertEqual(
            body["checks"]["events"], {"degraded": False, "backlog": 1, "journal_bytes": 0}
        )
        self.clock.advance(0)

    def test_head(self):
        """
        C{HEAD /healthz} answers the status without a body.
        """
        self.up["web"] = False
        response, body = self.request("HEAD", "/healthz")
        self.assertEqual((response.code, body), (503, b""))

    def test_noTimerLeft(self):
        """
        A probe that answered leaves no timer; one still running is
        cancelled by C{stop}.
        """
        self.getJSON("/healthz")
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(PROBE_INTERVAL)
        self.store.hang = True
        self.treq.get("http://relay.test/healthz")
        self.treq.flush()
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.health.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])


class MetricsRouteTests(AppTestsMixin, SynchronousTestCase):
    """
    C{GET /metrics}: the registry in Prometheus text format.
    """

    def test_parses(self):
        """
        The answer is Prometheus text that prometheus_client's parser reads,
        with the event counters and the store latency.
        """
        self.metrics.events.count(Event("delivered", "Q1", "a@example.org", START))
        response, body = self.request("GET", "/metrics")
        self.assertEqual(response.code, 200)
        [contentType] = response.headers.getRawHeaders(b"content-type")
        self.assertTrue(contentType.startswith(b"text/plain; version="), contentType)
        found = families(body.decode("utf-8"))
        self.assertEqual(sample(found, "smartrelay_messages_delivered_total"), 1)
        self.assertIn("smartrelay_store_call_duration_seconds", found)

    def test_openMetrics(self):
        """
        A scraper that asks for OpenMetrics gets it.
        """
        response, body = self.request(
            "GET", "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
        )
        [contentType] = response.headers.getRawHeaders(b"content-type")
        self.assertTrue(contentType.startswith(b"application/openmetrics-text"), contentType)
        self.assertTrue(body.endswith(b"# EOF\n"))

    def test_head(self):
        """
        C{HEAD /metrics}: 200 and no body.
        """
        response, body = self.request("HEAD", "/metrics")
        self.assertEqual((response.code, body), (200, b""))

    def test_badMethods(self):
        """
        Other methods get 405 with C{Allow} and a JSON error.
        """
        for path in ("/metrics", "/healthz"):
            for method in ("POST", "PUT", "DELETE"):
                response, body = self.request(method, path)
                self.assertEqual(response.code, 405, (method, path))
                self.assertEqual(
                    json.loads(body)["error"]["code"], "method_not_allowed", (method, path)
                )
                [allow] = response.headers.getRawHeaders(b"allow")
                self.assertEqual(sorted(allow.decode().split(", ")), ["GET", "HEAD"])

    def test_unknownPath(self):
        """
        A path below C{/metrics} is a JSON 404.
        """
        code, body = self.getJSON("/metrics/more")
        self.assertEqual((code, body["error"]["code"]), (404, "not_found"))

    def test_forbidden(self):
        """
        A client outside C{metrics_clients} gets a JSON 403 on both routes,
        and the health check is not run for it.
        """
        self.treq = StubTreq(
            self.makeApp(allowed=parseConfig("[web]\nmetrics_clients = 10.0.0.0/8\n")
                         .web.metrics_clients).resource()
        )
        for path in ("/metrics", "/healthz"):
            code, body = self.getJSON(path)
            self.assertEqual(code, 403, path)
            self.assertEqual(body["error"]["code"], "forbidden")
        self.assertEqual((self.probes, self.store.calls), ([], []))

    def test_nobody(self):
        """
        An empty C{metrics_clients} lets nobody in.
        """
        self.treq = StubTreq(self.makeApp(allowed=()).resource())
        self.assertEqual(self.getJSON("/metrics")[0], 403)

    def test_proxied(self):
        """
        A request through a proxy (X-Forwarded-For) is refused unless the
        proxy is trusted and the client it names is allowed.
        """
        headers = {"X-Forwarded-For": "203.0.113.9"}
        self.assertEqual(self.getJSON("/metrics", headers=headers)[0], 403)
        self.assertEqual(self.getJSON("/healthz", headers={"Forwarded": "for=1.2.3.4"})[0], 403)
        trusting = parseConfig("[web]\ntrusted_proxies = 127.0.0.1/32\n").web.trusted_proxies
        self.treq = StubTreq(self.makeApp(trustedProxies=trusting).resource())
        self.assertEqual(self.getJSON("/metrics", headers=headers)[0], 403)
        response, _ = self.request("GET", "/metrics", headers={"X-Forwarded-For": "127.0.0.5"})
        self.assertEqual(response.code, 200)


class ClientIPTests(SynchronousTestCase):
    """
    L{clientIP}: who asks, for C{metrics_clients}.
    """

    def request(self, peer, **headers) -> DummyRequest:
        request = DummyRequest([b"metrics"])
        request.client = peer
        for name, value in headers.items():
            request.requestHeaders.addRawHeader(name.replace("_", "-").encode(), value.encode())
        return request

    def test_peer(self):
        """
        Without proxy headers the peer is the client; IPv4-mapped IPv6
        addresses are IPv4; a UNIX socket is loopback.
        """
        self.assertEqual(str(clientIP(self.request(IPv4Address("TCP", "192.0.2.1", 5)))), "192.0.2.1")
        self.assertEqual(
            str(clientIP(self.request(IPv6Address("TCP", "::ffff:10.1.2.3", 5)))), "10.1.2.3"
        )
        self.assertEqual(str(clientIP(self.request(IPv6Address("TCP", "fe80::1%eth0", 5)))), "fe80::1")
        self.assertEqual(str(clientIP(self.request(UNIXAddress(b"/run/relay.sock")))), "127.0.0.1")

    def test_untrustedProxy(self):
        """
        A proxied request from a peer that is not a trusted proxy has no
        known client.
        """
        peer = IPv4Address("TCP", "127.0.0.1", 5)
        self.assertIsNone(clientIP(self.request(peer, X_Forwarded_For="10.0.0.1")))
        self.assertIsNone(clientIP(self.request(peer, Forwarded="for=10.0.0.1")))

    def test_trustedProxies(self):
        """
        Through trusted proxies, the last hop that is not one is the client;
        garbage in the header means no known client.
        """
        proxies = parseConfig("[web]\ntrusted_proxies = 127.0.0.0/8, 10.0.0.0/8\n").web.trusted_proxies
        peer = IPv4Address("TCP", "127.0.0.1", 5)
        request = self.request(peer, X_Forwarded_For="198.51.100.7, 203.0.113.1, 10.0.0.2")
        self.assertEqual(str(clientIP(request, proxies)), "203.0.113.1")
        request = self.request(peer, X_Forwarded_For="10.0.0.3")
        self.assertEqual(str(clientIP(request, proxies)), "10.0.0.3")
        request = self.request(peer, X_Forwarded_For="unknown")
        self.assertIsNone(clientIP(request, proxies))
        request = self.request(peer, Forwarded="for=10.0.0.1")
        self.assertIsNone(clientIP(request, proxies))


class ConfigTests(SynchronousTestCase):
    """
    C{[web] metrics_clients}.
    """

    def test_default(self):
        """
        By default only loopback clients may read the metrics and the
        health check.
        """
        self.assertEqual([str(n) for n in LOOPBACK], ["127.0.0.0/8", "::1/128"])

    def test_value(self):
        """
        Networks, comma-separated; empty is nobody; a bad one is a clear
        one-line error naming the key.
        """
        web = parseConfig("[web]\nmetrics_clients = 10.0.0.0/8, 2001:db8::/32\n").web
        self.assertEqual([str(n) for n in web.metrics_clients], ["10.0.0.0/8", "2001:db8::/32"])
        self.assertEqual(parseConfig("[web]\nmetrics_clients =\n").web.metrics_clients, ())
        from smartrelay.config import ConfigError

        with self.assertRaises(ConfigError) as caught:
            parseConfig("[web]\nmetrics_clients = 10.0.0.1/8\n")
        self.assertIn("metrics_clients", str(caught.exception))
        self.assertIn("did you mean '10.0.0.0/8'", str(caught.exception))


# -- the whole relay ------------------------------------------------------------


class RelayTests(SynchronousTestCase):
    """
    The relay on a L{MemoryReactorClock} with synchronous thread pools
    (as in L{tests.test_service}): C{/metrics} and C{/healthz} on its one
    web site count and see what it does.
    """

    def setUp(self):
        from twisted.internet.testing import MemoryReactorClock

        from tests.test_service import SynchronousThreads

        self.dataDir = os.path.abspath(self.mktemp())
        self.reactor = MemoryReactorClock()
        self.reactor.advance(START)
        self.threads = SynchronousThreads()

    def makeRelay(self, extra: str = ""):
        from smartrelay.service import makeRelayService
        from tests.test_service import wiringConfig

        relay = makeRelayService(wiringConfig(self.dataDir, extra=extra), self.reactor, self.threads)
        self.treq = StubTreq(relay.webSite.resource)
        return relay

    def get(self, path: str):
        d = self.treq.get("http://relay.test" + path)
        self.treq.flush()
        response = self.successResultOf(d)
        return response.code, self.successResultOf(response.content())

    def scrape(self) -> dict:
        code, body = self.get("/metrics")
        self.assertEqual(code, 200)
        return families(body.decode("utf-8"))

    def submit(self, relay, recipient: bytes = b"reader@example.org") -> list:
        """
        One message on the SMTP listener from loopback; the client's replies.
        """
        from twisted.test.iosim import FakeTransport, connect

        from tests.test_service import Submitter

        [factory] = [s[1] for s in self.reactor.tcpServers if s[0] == 2525]
        peer = IPv4Address("TCP", "127.0.0.1", 40000)
        server = factory.buildProtocol(peer)
        client = Submitter(b"From: app@example.com\r\nSubject: hi\r\n\r\nhello\r\n", recipient)
        connect(
            server,
            FakeTransport(server, True, IPv4Address("TCP", "127.0.0.1", 2525), peer),
            client,
            FakeTransport(client, False, peer, IPv4Address("TCP", "127.0.0.1", 2525)),
            clock=self.reactor,
        ).flush()
        return client.replies

    def test_countsDelivery(self):
        """
        A message submitted and delivered to the smarthost is counted as
        accepted and delivered, and the store latency of the event writes
        is measured; the SMTP session is gone once closed.
        """
        from twisted.internet.protocol import Factory
        from twisted.test.iosim import ConnectionCompleter

        from smartrelay.outbound.testing import ScriptedSMTPServer, SMTPScript

        self.reactor.listenTCP(
            2599, Factory.forProtocol(lambda: ScriptedSMTPServer(SMTPScript())),
            interface="127.0.0.1",
        )
        relay = self.makeRelay()
        relay.startService()
        self.successResultOf(relay.whenReady())
        replies = self.submit(relay)
        self.assertTrue(any(r.startswith(b"250 2.0.0 OK") for r in replies), replies)
        delivery = ConnectionCompleter(self.reactor).succeedOnce()
        for _ in range(10):
            delivery.flush()
        found = self.scrape()
        self.assertEqual(sample(found, "smartrelay_messages_accepted_total"), 1)
        self.assertEqual(sample(found, "smartrelay_messages_delivered_total"), 1)
        self.assertEqual(sample(found, "smartrelay_events_total", type="delivered"), 1)
        self.assertGreaterEqual(
            sample(found, "smartrelay_store_call_duration_seconds_count", operation="appendEvents"),
            1,
        )
        self.assertGreaterEqual(
            sample(found, "smartrelay_store_call_duration_seconds_count",
                   operation="checkSuppressions"),
            1,
        )
        self.assertEqual(sample(found, "smartrelay_queue_messages"), 0)
        self.assertEqual(sample(found, "smartrelay_smtp_sessions", listener="submission"), 0)
        self.assertEqual(sample(found, "smartrelay_smtp_sessions", listener="feedback"), 0)
        [info] = found["smartrelay_node_info"].samples
        self.assertEqual(info.labels["node_id"], "2A")
        stopped = relay.stopService()
        for _ in range(10):
            delivery.flush()
        # The last events' write waits up to EVENT_WRITE_INTERVAL.
        self.reactor.advance(EVENT_WRITE_INTERVAL)
        self.successResultOf(stopped)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_queueWhileHeld(self):
        """
        A message accepted while delivery is on hold shows in the queue of
        its domain, getting older, and in the spool's bytes.
        """
        relay = self.makeRelay(extra="hold = on\n")
        relay.startService()
        self.successResultOf(relay.whenReady())
        self.submit(relay, b"someone@Example.ORG")
        self.reactor.advance(42)
        found = self.scrape()
        self.assertEqual(sample(found, "smartrelay_queue_messages"), 1)
        self.assertEqual(sample(found, "smartrelay_queue_recipients", domain="example.org"), 1)
        self.assertEqual(
            sample(found, "smartrelay_queue_oldest_age_seconds", domain="example.org"), 42
        )
        self.assertGreater(sample(found, "smartrelay_spool_bytes"), 0)
        self.assertEqual(sample(found, "smartrelay_spool_segments"), 1)
        self.assertEqual(sample(found, "smartrelay_event_backlog"), 0)
        self.successResultOf(relay.stopService())

    def test_healthz(self):
        """
        C{/healthz}: 503 until start-up has opened the listeners, 200 once
        the relay accepts mail (the spool directory takes a file, the
        store answers), 503 again once stopped.
        """
        relay = self.makeRelay()
        code, body = self.get("/healthz")
        self.assertEqual(code, 503)
        self.assertIn("listener submission: not listening", json.loads(body)["problems"])
        relay.startService()
        self.successResultOf(relay.whenReady())
        self.reactor.advance(PROBE_INTERVAL)
        code, body = self.get("/healthz")
        self.assertEqual((code, json.loads(body)["problems"]), (200, []))
        self.successResultOf(relay.stopService())
        code, body = self.get("/healthz")
        self.assertEqual(code, 503)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_sameSite(self):
        """
        The metrics share the site with the tracking links and the API:
        each still answers its own paths.
        """
        self.makeRelay()
        self.assertEqual(self.get("/metrics")[0], 200)
        self.assertEqual(self.get("/t/c/nonsense")[0], 404)
        self.assertIn(self.get("/api/v1/queue")[0], (401, 403))
