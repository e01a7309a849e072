# -*- test-case-name: tests.test_web_metrics -*-
"""
C{GET /metrics} (Prometheus text format) and C{GET /healthz} (liveness and
readiness, JSON), on the C{[web]} site (DESIGN section 1.6).

The pieces, each built whole by the relay (L{smartrelay.service}):

  - L{RelayMetrics}: one private L{CollectorRegistry} per relay (tests
    build several relays in one process, so never the global one) with
    the counters that change where things happen: L{EventCounts} (one hook
    in L{smartrelay.events.EventLog.emit}: every event this node emits)
    and the store latency histogram that L{TimedStore} feeds.
  - L{RelayCollector}: a custom collector reading the live state at
    scrape time (queues, connections, SMTP sessions, spool, re-wrap
    workers, thread pools, event backlog), so that nothing on the hot
    path keeps gauges up to date.
  - L{MetricsApp}: the Klein routes, open without a token but only to
    the C{[web] metrics_clients} networks (others get C{403}); what
    C{/healthz} checks is L{smartrelay.web.health.HealthCheck}.

Every metric is listed, with its type, labels and meaning, in
C{docs/metrics.md}.
"""

import bisect
import heapq
import itertools
import ipaddress
import json
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Callable, Optional

import attrs
from klein import Klein
from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound
from zope.interface import implementer

import smartrelay
from smartrelay.events import EVENT_TYPES, Event
from smartrelay.message import FINAL_STATES
from smartrelay.store.interfaces import IStore
from smartrelay.web.health import HealthCheck

if TYPE_CHECKING:  # the SMTP modules install the global reactor on import
    from smartrelay.engine.workers import WorkerPool
    from smartrelay.events import EventLog
    from smartrelay.journal import EventJournal
    from smartrelay.outbound.scheduler import DeliveryScheduler
    from smartrelay.smtp.submission import SubmissionFactory
    from smartrelay.spool import Spool

__all__ = [
    "EventCounts",
    "MetricsApp",
    "QueueSummary",
    "RelayCollector",
    "RelayMetrics",
    "StoreLatency",
    "TimedStore",
    "clientIP",
]

#: Labelled series per metric at most for recipient domains and
#: destinations; the rest are summed into one series labelled L{OTHER}
#: (queues) or left out (idle destinations), so that mail to many domains
#: cannot blow up the scrape.
MAX_SERIES = 100
#: The label value of the series summing the domains beyond L{MAX_SERIES}
#: (never a domain name: parentheses are not allowed in one).
OTHER = "(other)"
#: Upper bounds (seconds) of the store latency histogram's buckets.
STORE_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)

#: The named convenience counters: (metric name, event type, help).
MESSAGE_COUNTERS = (
    ("smartrelay_messages_accepted", "accepted",
     "Recipients' messages accepted by SMTP submission (one per recipient)."),
    ("smartrelay_messages_rejected", "rejected",
     "Recipients refused at submission after their message was received."),
    ("smartrelay_messages_delivered", "delivered",
     "Messages the receiving server accepted (2xx), one per recipient."),
    ("smartrelay_messages_deferred", "deferred",
     "Delivery attempts that failed temporarily and will be retried."),
    ("smartrelay_messages_expired", "expired",
     "Recipients given up on (max_age reached, or deleted from the queue)."),
    ("smartrelay_messages_suppressed", "suppressed",
     "Recipients not delivered because they are on the suppression list."),
    ("smartrelay_messages_complained", "complained",
     "Complaints (feedback-loop reports) received."),
    ("smartrelay_messages_unsubscribed", "unsubscribed",
     "Unsubscribes (link, one-click or mail)."),
)
#: SMS, counted by part like their events (issue SMS, docs/sms.md).
SMS_COUNTERS = (
    ("smartrelay_sms_parts_submitted", "sms_submitted",
     "SMS parts the SMSC accepted (submit_sm answered ESME_ROK)."),
    ("smartrelay_sms_parts_delivered", "sms_delivered",
     "SMS parts whose delivery receipt says delivered."),
    ("smartrelay_sms_parts_failed", "sms_failed",
     "SMS parts refused by the SMSC or whose receipt says they failed."),
)
#: The values of C{kind} on L{BOUNCES} (what else a bounce says: C{unknown}).
BOUNCE_KINDS = ("hard", "soft")


# -- counters fed where things happen ------------------------------------------


class EventCounts:
    """
    How many events of each type this node emitted, and its bounces by
    kind: L{count} is C{EventLog.emit}'s hook (plain integers bumped on
    the reactor thread; the collector reads them at scrape time).
    """

    def __init__(self) -> None:
        self.byType: dict = dict.fromkeys(sorted(EVENT_TYPES), 0)
        self.bounces: dict = dict.fromkeys(BOUNCE_KINDS, 0)

    def count(self, event: Event) -> None:
        """
        One more event of C{event.type} (and of its bounce kind).
        """
        self.byType[event.type] += 1
        if event.type == "bounced":
            kind = event.detail.get("kind")
            if kind not in self.bounces:
                kind = "unknown"
            self.bounces[kind] = self.bounces.get(kind, 0) + 1

    def collect(self) -> Iterable:
        events = CounterMetricFamily(
            "smartrelay_events",
            "Events emitted by this node, by type (DESIGN section 1.7).",
            labels=["type"],
        )
        for type, count in self.byType.items():
            events.add_metric([type], count)
        yield events
        for name, type, help in MESSAGE_COUNTERS + SMS_COUNTERS:
            yield CounterMetricFamily(name, help, value=self.byType[type])
        bounced = CounterMetricFamily(
            "smartrelay_messages_bounced",
            "Bounces (permanent failures in delivery sessions and DSNs), by kind.",
            labels=["kind"],
        )
        for kind, count in self.bounces.items():
            bounced.add_metric([kind], count)
        yield bounced


class StoreLatency:
    """
    The histogram C{smartrelay_store_call_duration_seconds} (by operation;
    buckets L{STORE_BUCKETS}) and the counter
    C{smartrelay_store_call_failures_total}, kept as plain numbers on the
    reactor thread (no lock, no wall clock) and read at scrape time.
    """

    def __init__(self, buckets: tuple = STORE_BUCKETS) -> None:
        self.buckets = tuple(sorted(buckets))
        #: operation -> [count per bucket (the last one: +Inf), sum]
        self._observed: dict = {}
        self.failures: dict = {}

    def observe(self, operation: str, seconds: float, failed: bool = False) -> None:
        observed = self._observed.get(operation)
        if observed is None:
            observed = self._observed[operation] = [[0] * (len(self.buckets) + 1), 0.0]
        observed[0][bisect.bisect_left(self.buckets, seconds)] += 1
        observed[1] += seconds
        if failed:
            self.failures[operation] = self.failures.get(operation, 0) + 1

    def collect(self) -> Iterable:
        histogram = HistogramMetricFamily(
            "smartrelay_store_call_duration_seconds",
            "Seconds from a store call by the event log or the scheduler to its result.",
            labels=["operation"],
        )
        bounds = [repr(float(b)) for b in self.buckets] + ["+Inf"]
        for operation, (counts, total) in sorted(self._observed.items()):
            cumulative = list(itertools.accumulate(counts))
            histogram.add_metric([operation], list(zip(bounds, cumulative)), total)
        yield histogram
        failures = CounterMetricFamily(
            "smartrelay_store_call_failures",
            "Store calls by the event log or the scheduler that failed, by operation.",
            labels=["operation"],
        )
        for operation in sorted(self._observed):
            failures.add_metric([operation], self.failures.get(operation, 0))
        yield failures


@implementer(IStore)
class TimedStore:
    """
    An L{IStore} that times every call of the store it wraps (seconds from
    the call to its result, failures included, on the reactor's clock)
    into a L{StoreLatency}.  The event log and the delivery scheduler are
    given one, so the latency is the one they see.
    """

    def __init__(self, store: IStore, clock: IReactorTime, latency: StoreLatency) -> None:
        self._store = store
        self._clock = clock
        self._latency = latency

    def _timed(self, operation: str, method: Callable, *args: Any, **kwargs: Any) -> Deferred:
        started = self._clock.seconds()
        d = maybeDeferred(method, *args, **kwargs)

        def done(result: Any) -> Any:
            self._latency.observe(
                operation,
                max(0.0, self._clock.seconds() - started),
                failed=isinstance(result, Failure),
            )
            return result

        return d.addBoth(done)

    def start(self):
        return self._timed("start", self._store.start)

    def close(self):
        return self._timed("close", self._store.close)

    def appendEvents(self, events):
        return self._timed("appendEvents", self._store.appendEvents, events)

    def eventsForMessage(self, queue_id):
        return self._timed("eventsForMessage", self._store.eventsForMessage, queue_id)

    def queryEvents(self, **filters):
        return self._timed("queryEvents", self._store.queryEvents, **filters)

    def addSuppression(self, entry):
        return self._timed("addSuppression", self._store.addSuppression, entry)

    def removeSuppression(self, address):
        return self._timed("removeSuppression", self._store.removeSuppression, address)

    def checkSuppressions(self, addresses, now):
        return self._timed("checkSuppressions", self._store.checkSuppressions, addresses, now)

    def listSuppressions(self, **options):
        return self._timed("listSuppressions", self._store.listSuppressions, **options)

    def statistics(self, **options):
        return self._timed("statistics", self._store.statistics, **options)

    def pruneEvents(self, before, limit=10000):
        return self._timed("pruneEvents", self._store.pruneEvents, before, limit)

    def takeTokens(self, key, rate, burst, now, count=1):
        return self._timed("takeTokens", self._store.takeTokens, key, rate, burst, now, count)


class RelayMetrics:
    """
    One relay's metrics: a private registry with the event counters, the
    store latency and the process metrics (CPU, memory, file descriptors,
    from C{/proc}); L{register} adds the relay's L{RelayCollector} once
    the pieces it reads are built.

    @ivar registry: the L{CollectorRegistry} C{/metrics} serves.
    @ivar events: the L{EventCounts} (give C{events.count} to the event log).
    @ivar storeLatency: the L{StoreLatency} that L{timedStore}s feed.
    """

    def __init__(self, process: bool = True) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.events = EventCounts()
        self.registry.register(self.events)
        self.storeLatency = StoreLatency()
        self.registry.register(self.storeLatency)
        if process:
            ProcessCollector(registry=self.registry)

    def timedStore(self, store: IStore, clock: IReactorTime) -> TimedStore:
        """
        C{store}, its calls timed into L{storeLatency}.
        """
        return TimedStore(store, clock, self.storeLatency)

    def register(self, collector: Collector) -> None:
        self.registry.register(collector)


# -- export files and webhooks (issue 16) ---------------------------------------


@attrs.define(eq=False)
class ExportCollector:
    """
    The exporter's and the webhook sender's counters
    (L{smartrelay.export}), read at scrape time; either may be L{None}
    (not configured), and then its series are left out.
    """

    exporter: Any = None
    webhooks: Any = None

    def collect(self) -> Iterable:
        e, w = self.exporter, self.webhooks
        if e is not None:
            for name, text, value in [
                ("smartrelay_export_files", "Export files written by this run.", e.files),
                ("smartrelay_export_events", "Events written to export files by this run.",
                 e.exported),
                ("smartrelay_export_failures", "Exports that failed (store or disk trouble).",
                 e.failures),
                ("smartrelay_export_command_failures", "Runs of [export] command that failed.",
                 e.commandFailures),
            ]:
                yield CounterMetricFamily(name, text, value=value)
            yield GaugeMetricFamily(
                "smartrelay_export_commands_pending",
                "Export files whose [export] command has not succeeded yet.",
                value=len(e.pendingCommands),
            )
        if w is not None:
            for name, text, value in [
                ("smartrelay_webhook_events_delivered", "Events delivered by webhooks (2xx).",
                 w.delivered),
                ("smartrelay_webhook_batches_delivered", "Webhook POSTs answered 2xx.",
                 w.batches),
                ("smartrelay_webhook_attempt_failures",
                 "Webhook POSTs that failed (not 2xx, timeout, refused).", w.failedAttempts),
                ("smartrelay_webhook_batches_dropped",
                 "Webhook batches given up after [webhooks] max_age.", w.dropped),
                ("smartrelay_webhook_events_dropped", "Events in dropped webhook batches.",
                 w.droppedEvents),
            ]:
                yield CounterMetricFamily(name, text, value=value)
            yield GaugeMetricFamily(
                "smartrelay_webhook_outbox_batches",
                "Batches waiting in the webhook outbox (all nodes), at the last look.",
                value=w.outboxSize,
            )
            yield GaugeMetricFamily(
                "smartrelay_webhook_posts_in_flight", "Webhook POSTs in progress.",
                value=w.inFlight,
            )


# -- the live state, read at scrape time ----------------------------------------


def _countByDomain(entries: Iterable, counts: dict, oldest: dict) -> None:
    """
    Add the waiting recipients of C{entries} to C{counts} (domain -> how
    many) and C{oldest} (domain -> earliest C{received}).
    """
    final = FINAL_STATES
    for entry in entries:
        received = entry.received
        for recipient in entry.recipients:
            if recipient.state in final:
                continue
            domain = recipient.address.rpartition("@")[2].lower()
            count = counts.get(domain)
            if count is None:
                counts[domain] = 1
                oldest[domain] = received
            else:
                counts[domain] = count + 1
                if received < oldest[domain]:
                    oldest[domain] = received


def _topDomains(counts: dict, oldest: dict, limit: int) -> dict:
    if len(counts) <= limit:
        return {domain: (counts[domain], oldest[domain]) for domain in counts}
    top = heapq.nlargest(limit, counts, key=counts.__getitem__)
    result = {domain: (counts.pop(domain), oldest.pop(domain)) for domain in top}
    result[OTHER] = (sum(counts.values()), min(oldest.values()))
    return result


def queueByDomain(entries: Iterable, limit: int = MAX_SERIES) -> dict:
    """
    The recipients still to deliver, by recipient domain (lower-case):
    C{{domain: (count, oldest received)}} for the C{limit} domains with
    most of them, and the rest summed under L{OTHER}.

    @param entries: L{SpoolEntry} objects.
    """
    counts: dict = {}
    oldest: dict = {}
    _countByDomain(entries, counts, oldest)
    return _topDomains(counts, oldest, limit)


@attrs.define(eq=False)
class QueueSummary:
    """
    L{queueByDomain} of the scheduler's queue for each scrape, without
    keeping the reactor thread busy for long: a queue of up to
    C{syncLimit} messages is summed there and then (about 0.5 microseconds
    a recipient); a bigger one is summed in slices of C{sliceSize}
    messages, one slice per reactor turn, from a snapshot of the queue
    taken when the scrape asks, and the scrape gets the last complete
    pass (so per-domain series lag by up to one scrape interval).  Only
    the very first scrape of a big queue waits for a whole pass.
    """

    clock: IReactorTime
    scheduler: "DeliveryScheduler"
    syncLimit: int = 10_000
    sliceSize: int = 5_000
    limit: int = MAX_SERIES
    _last: Optional[dict] = None
    _snapshot: list = attrs.field(factory=list)
    _position: int = 0
    _counts: dict = attrs.field(factory=dict)
    _oldest: dict = attrs.field(factory=dict)
    _call: Any = None

    def current(self) -> dict:
        """
        C{{domain: (count, oldest received)}} as L{queueByDomain}.
        """
        scheduler = self.scheduler
        if scheduler.queued() <= self.syncLimit:
            self.stop()
            self._last = None
            return queueByDomain(scheduler.pendingEntries, self.limit)
        if self._last is None:
            self.stop()
            self._last = queueByDomain(scheduler.pendingEntries, self.limit)
            return self._last
        if self._call is None:
            self._snapshot = list(scheduler.pendingEntries)
            self._position = 0
            self._counts, self._oldest = {}, {}
            self._call = self.clock.callLater(0, self._slice)
        return self._last

    def _slice(self) -> None:
        end = self._position + self.sliceSize
        _countByDomain(self._snapshot[self._position : end], self._counts, self._oldest)
        self._position = end
        if end < len(self._snapshot):
            self._call = self.clock.callLater(0, self._slice)
            return
        self._call = None
        self._last = _topDomains(self._counts, self._oldest, self.limit)
        self._snapshot, self._counts, self._oldest = [], {}, {}

    def stop(self) -> None:
        """
        Abandon a pass in progress (the relay is stopping).
        """
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        self._snapshot = []


@attrs.define(eq=False)
class RelayCollector:
    """
    Reads the relay's live state when C{/metrics} is scraped, on the
    reactor thread: nothing here is kept up to date between scrapes.

    @ivar scheduler: queues, destinations and their connections.
    @ivar spool: bytes on disk.
    @ivar events: the event log (its backlog); C{journal} its journal.
    @ivar listeners: name (C{submission}, C{feedback}) -> SMTP factory,
        whose C{sessions} are the open SMTP sessions.
    @ivar workers: the re-wrap worker processes, or L{None} (threads only).
    @ivar connector: the scheduler's connector; a C{WorkerConnector}'s
        C{sessions} are those the workers hold.
    @ivar threadPools: name -> Twisted L{ThreadPool}.
    @ivar nodeID: the C{[smartrelay] node_id}.
    """

    clock: IReactorTime
    scheduler: "DeliveryScheduler"
    spool: "Spool"
    events: "EventLog"
    journal: Optional["EventJournal"]
    listeners: Mapping[str, "SubmissionFactory"]
    workers: Optional["WorkerPool"] = None
    connector: Any = None
    threadPools: Mapping = attrs.field(factory=dict)
    nodeID: str = ""
    #: The connection-slot keeper (C{LeaseKeeper.state()}), or L{None}.
    leases: Any = None
    #: The throttles kept with the cluster
    #: (L{smartrelay.cluster.throttle.ThrottleBoard}), or L{None}.
    throttles: Any = None
    #: The suppression replica (on Redis), or L{None}.
    replica: Any = None
    #: The SMPP client (C{[sms]}), or L{None}.
    sms: Any = None
    _queue: QueueSummary = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._queue = QueueSummary(self.clock, self.scheduler)

    def stop(self) -> None:
        """
        Abandon the queue pass in progress, if any (the relay is stopping).
        """
        self._queue.stop()

    def collect(self) -> Iterable:
        now = self.clock.seconds()
        info = GaugeMetricFamily(
            "smartrelay_node_info", "This relay node (value always 1).",
            labels=["node_id", "version"],
        )
        info.add_metric([self.nodeID, smartrelay.__version__], 1)
        yield info
        yield from self._queues(now)
        yield from self._destinations()
        sessions = GaugeMetricFamily(
            "smartrelay_smtp_sessions", "SMTP sessions open, by listener.",
            labels=["listener"],
        )
        for name, factory in self.listeners.items():
            sessions.add_metric([name], len(factory.sessions))
        yield sessions
        spool = self.spool
        yield GaugeMetricFamily(
            "smartrelay_spool_bytes", "Bytes of the spool's segment files.",
            value=spool.diskBytes,
        )
        yield GaugeMetricFamily(
            "smartrelay_spool_live_bytes",
            "Bytes of the spooled messages that still have recipients to deliver.",
            value=spool.liveBytes,
        )
        yield GaugeMetricFamily(
            "smartrelay_spool_segments", "Segment files in the spool.",
            value=spool.segmentCount,
        )
        yield from self._rewrap()
        yield from self._eventBacklog()
        yield from self._outage(now)
        yield from self._smpp()

    def _smpp(self) -> Iterable:
        """
        The session to the SMSC, with C{[sms]} only.
        """
        client = self.sms
        if client is None:
            return
        yield GaugeMetricFamily(
            "smartrelay_smpp_bound",
            "1 while the SMPP session to [sms] smsc is bound, else 0.",
            value=1 if client.bound else 0,
        )
        yield GaugeMetricFamily(
            "smartrelay_smpp_submits_in_flight",
            "submit_sm sent and not answered yet (at most [sms] window).",
            value=client.inFlight,
        )
        yield GaugeMetricFamily(
            "smartrelay_smpp_submits_waiting",
            "Submits waiting for a bound session (or to be sent again).",
            value=client.waiting,
        )
        yield GaugeMetricFamily(
            "smartrelay_sms_rate_local",
            "1 while this node paces its submits at 1/N of [sms] rate because the "
            "store's bucket cannot be reached, else 0.",
            value=1 if getattr(client, "ratesLocal", False) else 0,
        )

    def _queues(self, now: float) -> Iterable:
        scheduler = self.scheduler
        yield GaugeMetricFamily(
            "smartrelay_queue_messages", "Messages with recipients still to deliver.",
            value=scheduler.queued(),
        )
        recipients = GaugeMetricFamily(
            "smartrelay_queue_recipients",
            f"Recipients still to deliver, by recipient domain (the {MAX_SERIES} "
            f"largest; the rest as domain=\"{OTHER}\").",
            labels=["domain"],
        )
        age = GaugeMetricFamily(
            "smartrelay_queue_oldest_age_seconds",
            "Age of the oldest message with recipients still to deliver, by "
            "recipient domain.",
            labels=["domain"],
        )
        for domain, (count, oldest) in sorted(self._queue.current().items()):
            recipients.add_metric([domain], count)
            age.add_metric([domain], max(0.0, now - oldest))
        yield recipients
        yield age

    def _destinations(self) -> Iterable:
        states = self.scheduler.destinations()
        yield GaugeMetricFamily(
            "smartrelay_connections", "Outbound SMTP connections open or opening.",
            value=sum(s["connections"] for s in states),
        )
        yield GaugeMetricFamily(
            "smartrelay_connections_limit", "[delivery] max_connections.",
            value=self.scheduler.maxConnections,
        )
        active = [
            s for s in states
            if s["connections"] or s["queued"] or s["throttled"] or s.get("parked")
        ]
        if len(active) > MAX_SERIES:
            active = heapq.nlargest(
                MAX_SERIES, active, key=lambda s: (s["connections"], s["queued"])
            )
        families = [
            ("connections", "smartrelay_destination_connections",
             "Outbound connections open or opening, by destination."),
            ("busy", "smartrelay_destination_connections_busy",
             "Outbound connections in a transaction, by destination."),
            ("max_connections", "smartrelay_destination_connections_limit",
             "The connection limit in force (throttled or not), by destination."),
            ("queued", "smartrelay_destination_jobs_waiting",
             "Recipients routed and waiting for a connection, by destination."),
            ("throttle_factor", "smartrelay_destination_throttle_factor",
             "Share of the configured limits in force (1: not throttled), by destination."),
            ("parked", "smartrelay_destination_recipients_parked",
             "Recipients parked at a suspended destination (it could not be connected "
             "to) until its next retry, by destination."),
        ]
        active.sort(key=lambda s: s["destination"])
        for key, name, help in families:
            family = GaugeMetricFamily(name, help, labels=["destination"])
            for state in active:
                family.add_metric([state["destination"]], state.get(key, 0))
            yield family
        family = GaugeMetricFamily(
            "smartrelay_destination_suspended_until_seconds",
            "When a suspended destination (no connection could be opened) is tried "
            "again, as Unix time, by destination.",
            labels=["destination"],
        )
        for state in active:
            if state.get("suspended_until"):
                family.add_metric([state["destination"]], state["suspended_until"])
        yield family

    def _rewrap(self) -> Iterable:
        workers = self.workers
        yield GaugeMetricFamily(
            "smartrelay_rewrap_workers", "Re-wrap worker processes running.",
            value=0 if workers is None else workers.running,
        )
        yield GaugeMetricFamily(
            "smartrelay_rewrap_worker_jobs",
            "Re-wrap jobs sent to worker processes and not answered yet.",
            value=0 if workers is None else workers.inFlight,
        )
        yield GaugeMetricFamily(
            "smartrelay_worker_sessions",
            "Outbound SMTP sessions held by the worker processes.",
            value=getattr(self.connector, "sessions", 0),
        )
        jobs = GaugeMetricFamily(
            "smartrelay_thread_pool_jobs",
            "Jobs in the relay's thread pools, by pool and state (waiting for a "
            "thread, running).",
            labels=["pool", "state"],
        )
        for name, pool in self.threadPools.items():
            jobs.add_metric([name, "waiting"], pool.q.qsize())
            jobs.add_metric([name, "running"], len(pool.working))
        yield jobs

    def _eventBacklog(self) -> Iterable:
        events = self.events
        yield GaugeMetricFamily(
            "smartrelay_event_backlog",
            "Events emitted and not yet handed to the store (or the journal).",
            value=events.backlog,
        )
        yield GaugeMetricFamily(
            "smartrelay_event_writes_in_flight",
            "Batches of events being written to the store or the journal.",
            value=events.writesInFlight,
        )
        yield GaugeMetricFamily(
            "smartrelay_event_journal_bytes",
            "Bytes of events waiting in the journal for the store to be back.",
            value=0 if self.journal is None else self.journal.size,
        )
        yield GaugeMetricFamily(
            "smartrelay_event_store_degraded",
            "1 while events go to the journal because the store failed, else 0.",
            value=1 if events.degraded else 0,
        )


    def _outage(self, now: float) -> Iterable:
        """
        What a node does while the store cannot be reached: limits at its
        share, suppressions checked against the replica or held.
        """
        leases = None if self.leases is None else self.leases.state()
        connectionsLocal = leases is not None and leases["shared"] and not leases["reachable"]
        ratesLocal = bool(getattr(self.scheduler, "ratesLocal", False))
        replica = self.replica
        throttlesLocal = self.throttles is not None and not self.throttles.reachable
        smsRatesLocal = self.sms is not None and bool(getattr(self.sms, "ratesLocal", False))
        unreachable = (
            connectionsLocal
            or ratesLocal
            or smsRatesLocal
            or throttlesLocal
            or self.events.degraded
            or (replica is not None and replica.failing)
        )
        yield GaugeMetricFamily(
            "smartrelay_store_unreachable",
            "1 while this node's last calls to the store failed (connection slots, "
            "rate tokens, throttles, the replica's sync or event writes), else 0.",
            value=1 if unreachable else 0,
        )
        fallback = GaugeMetricFamily(
            "smartrelay_limits_fallback",
            "1 while this node applies its 1/N share of the cluster's limits "
            "because the store cannot be reached, by kind (connections, rates).",
            labels=["kind"],
        )
        fallback.add_metric(["connections"], 1 if connectionsLocal else 0)
        fallback.add_metric(["rates"], 1 if ratesLocal else 0)
        yield fallback
        yield GaugeMetricFamily(
            "smartrelay_cluster_nodes",
            "N: the live nodes this node last counted (its share of a limit is 1/N).",
            value=1 if leases is None else leases["nodes"],
        )
        yield GaugeMetricFamily(
            "smartrelay_suppressions_pending",
            "Suppressions kept in the event journal for the store, not in it yet.",
            value=len(self.events.pendingSuppressions),
        )
        yield GaugeMetricFamily(
            "smartrelay_throttles_unwritten",
            "Adaptive throttle triggers held on this node because the store could "
            "not take them, to be written when it answers again.",
            value=0 if self.throttles is None else len(self.throttles.unwritten()),
        )
        if replica is None:
            return
        age = replica.age(now)
        yield GaugeMetricFamily(
            "smartrelay_suppression_replica_age_seconds",
            "Age of the local copy of the suppression list (+Inf: none yet).",
            value=float("inf") if age is None else age,
        )
        yield GaugeMetricFamily(
            "smartrelay_suppression_replica_entries",
            "Entries in the local copy of the suppression list.",
            value=len(replica),
        )
        yield CounterMetricFamily(
            "smartrelay_suppression_replica_checked",
            "Recipients checked against the local copy because the store failed.",
            value=replica.checkedLocally,
        )
        yield CounterMetricFamily(
            "smartrelay_suppression_replica_held",
            "Recipients held (451, retried) because the store failed and the copy "
            "was missing or older than suppression_max_staleness.",
            value=replica.held,
        )


# -- the routes ----------------------------------------------------------------


class Forbidden(Exception):
    """
    The client may not see the metrics or the health check.
    """


def _mapped(address: ipaddress._BaseAddress) -> ipaddress._BaseAddress:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def clientIP(request, trustedProxies: tuple = ()) -> Optional[ipaddress._BaseAddress]:
    """
    The address of the client that made C{request}, or L{None} if it is not
    known.

    The peer is the client, unless the request came through a proxy (it
    has C{X-Forwarded-For} or C{Forwarded}): then the client is the last
    C{X-Forwarded-For} address not in C{trustedProxies}, if the peer is
    one of them, and unknown otherwise (a reverse proxy on the same host
    makes every client look like loopback).  A peer on a UNIX socket is
    loopback (C{127.0.0.1}).
    """
    peer = request.getClientAddress()
    host = getattr(peer, "host", None)
    if host is None:
        address: Optional[ipaddress._BaseAddress] = ipaddress.ip_address("127.0.0.1")
    else:
        try:
            address = _mapped(ipaddress.ip_address(host.split("%", 1)[0]))
        except ValueError:
            return None
    forwarded = request.requestHeaders.getRawHeaders(b"x-forwarded-for")
    proxied = forwarded is not None or request.requestHeaders.hasHeader(b"forwarded")
    if not proxied:
        return address
    if not any(address in network for network in trustedProxies) or forwarded is None:
        return None
    hops = [hop.strip() for value in forwarded for hop in value.decode("latin-1").split(",")]
    for hop in reversed(hops):
        try:
            address = _mapped(ipaddress.ip_address(hop))
        except ValueError:
            return None
        if not any(address in network for network in trustedProxies):
            return address
    return address


def _json(request, code: int, body: dict) -> bytes:
    data = json.dumps(body, sort_keys=True).encode("utf-8") + b"\n"
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Content-Length", b"%d" % (len(data),))
    request.setHeader(b"Cache-Control", b"no-store")
    request.setHeader(b"X-Content-Type-Options", b"nosniff")
    return data


def _error(request, code: int, name: str, message: str) -> bytes:
    return _json(request, code, {"error": {"code": name, "message": message}})


@attrs.define(slots=False)
class MetricsApp:
    """
    C{GET /metrics} and C{GET /healthz} (and C{HEAD}), for the clients in
    C{allowed} (C{[web] metrics_clients}); no token.

    @ivar registry: what C{/metrics} serves.
    @ivar health: the L{HealthCheck}.
    @ivar allowed: networks of the clients that may ask.
    @ivar trustedProxies: C{[web] trusted_proxies} (see L{clientIP}).
    """

    registry: CollectorRegistry
    health: HealthCheck
    allowed: tuple
    trustedProxies: tuple = ()

    app = Klein()
    log = Logger()

    #: The first path segments this app answers (for the site's dispatch).
    PATHS = (b"metrics", b"healthz")

    def resource(self) -> Resource:
        return self.app.resource()

    def _allow(self, request) -> None:
        address = clientIP(request, self.trustedProxies)
        if address is None or not any(address in network for network in self.allowed):
            raise Forbidden()

    @app.route("/metrics", methods=["GET", "HEAD"])
    def metrics(self, request) -> bytes:
        """
        The Prometheus text format (OpenMetrics if the scraper asks for it).
        """
        self._allow(request)
        accept = request.getHeader(b"accept")
        encoder, contentType = choose_encoder(accept.decode("latin-1") if accept else "")
        data = encoder(self.registry)
        request.setHeader(b"Content-Type", contentType.encode("ascii"))
        request.setHeader(b"Content-Length", b"%d" % (len(data),))
        request.setHeader(b"Cache-Control", b"no-store")
        return data

    @app.route("/healthz", methods=["GET", "HEAD"])
    def healthz(self, request) -> Deferred:
        """
        200 and the checks when all is well, 503 naming what is wrong.
        """
        self._allow(request)

        def answer(result: tuple) -> bytes:
            healthy, body = result
            return _json(request, 200 if healthy else 503, body)

        return Deferred.fromCoroutine(self.health.check()).addCallback(answer)

    @app.handle_errors(Forbidden)
    def forbidden(self, request, failure) -> bytes:
        return _error(
            request, 403, "forbidden",
            "this client may not read the metrics or the health check "
            "([web] metrics_clients)",
        )

    @app.handle_errors(MethodNotAllowed)
    def methodNotAllowed(self, request, failure) -> bytes:
        allowed = failure.value.valid_methods or []
        if allowed:
            request.setHeader(b"Allow", ", ".join(allowed).encode("ascii"))
        return _error(
            request, 405, "method_not_allowed",
            f"use {' or '.join(allowed) or 'another method'}",
        )

    @app.handle_errors(NotFound)
    def notFound(self, request, failure) -> bytes:
        return _error(request, 404, "not_found", "no such resource")

    @app.handle_errors(HTTPException)
    def otherHTTPError(self, request, failure) -> bytes:
        error = failure.value
        return _error(request, error.code, "http_error", error.name)

    @app.handle_errors
    def internalError(self, request, failure) -> bytes:
        self.log.failure("error serving {path}", failure, path=request.path.decode("latin-1"))
        return _error(request, 500, "internal_error", "something went wrong")
