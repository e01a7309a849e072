# -*- test-case-name: tests.test_service -*-
"""
Builds the relay from a L{smartrelay.config.Config} and a reactor.

L{makeRelayService} is what C{twistd smartrelay} runs; tests call it with a
memory reactor (and synchronous thread pools) or, end to end, with the real
one.
"""

import os
from functools import partial
from typing import Any, Optional

from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet import endpoints
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import Interface, implementer

from smartrelay.auth import HashedPasswordChecker, PasswordFile
from smartrelay.events import EventLog
from smartrelay.journal import EventJournal
from smartrelay.retention import Pruner
from smartrelay.ids import (
    ID_STATE_FILE,
    IDState,
    QueueIDGenerator,
    loadIDState,
    renewLease,
    saveIDState,
    startRun,
)
from smartrelay.config import ConfigError
from smartrelay.engine.dkim import DKIMKey, DKIMSigner, SelfTestError
from smartrelay.engine.rewrap import Rewrapper
from smartrelay.engine.workers import WorkerPool
from smartrelay.outbound.remote import WorkerConnector
from smartrelay.outbound.pool import Connector, DestinationPolicy, TLSContexts
from smartrelay.outbound.router import DomainRouter, MXRouter, SmarthostRouter, makeResolver
from smartrelay.outbound.scheduler import DeliveryScheduler
from smartrelay.cluster.leases import LeaseKeeper, leaseBackend
from smartrelay.cluster.nodes import NodeRegistry
from smartrelay.cluster.commands import NodeCommands, mailboxBackend
from smartrelay.cluster.throttle import ThrottleBoard, throttleBackend
from smartrelay.cluster.replica import REPLICA_FILE, SuppressionReplica
from smartrelay.cluster.suppressions import DurableSuppressions
from smartrelay.feedback.inbox import FeedbackInbox
from smartrelay.feedback.processor import FeedbackProcessor, ReportReader
from smartrelay.feedback.suppression import BounceSuppressor
from smartrelay.logs import MessageLog
from smartrelay.feedback.addresses import FeedbackAddresses
from smartrelay.smtp.feedback import FeedbackPolicy
from smartrelay.smtp.submission import SubmissionFactory, SubmissionPolicy, makeLoginLimiter
from smartrelay.sms.client import SMSClient
from smartrelay.sms.gateway import SMSGateway, SMSPolicy
from smartrelay.sms.protocol import SessionSettings
from smartrelay.spool import Spool
from smartrelay.store.redis import RedisConnectionFailed, RedisStore
from smartrelay.store.sqlite import SQLiteStore
from smartrelay.tokens import Tokens
from smartrelay.web.accesslog import AccessLogFile
from smartrelay.web.api import ApiApp
from smartrelay.web.health import HealthCheck
from smartrelay.web.metrics import ExportCollector, MetricsApp, RelayCollector, RelayMetrics
from smartrelay.web.queries import QueueActions
from smartrelay.export.services import checkWebhookTarget, makeExporter, makeWebhooks
from smartrelay.web.site import SiteRoot, makeSite
from smartrelay.web.tracking import TrackingApp
from smartrelay.web.ui.build import makeUiApp

#: Threads that write new messages to the spool: enough for the kernel to
#: merge their fsyncs.
SPOOL_THREADS = 4
#: Threads for the delivery side's spool I/O (reads, journal, removals).
DELIVERY_IO_THREADS = 2
#: Threads for re-wrapping (HTML rewriting, DKIM signing); the GIL keeps
#: Python work to one core, but the reactor thread stays responsive.
REWRAP_THREADS = 2
#: Threads that read reports that came back (CPU work, off the reactor).
FEEDBACK_THREADS = 2
#: Seconds between prunings of processed reports older than the retention.
FEEDBACK_PRUNE_INTERVAL = 3600
#: The tokens' key file under data_dir (when [smartrelay] secret is unset).
TOKEN_KEYS_FILE = "token-keys"
#: Seconds at least between two event writes to the store (EventLog's
#: minInterval): bigger batches, fewer hand-offs to the store's thread.
EVENT_WRITE_INTERVAL = 0.05
#: Seconds between checks that the queue id lease is far enough ahead.
LEASE_RENEWAL = 10


class IThreadPools(Interface):
    """
    Where the relay's blocking work runs: named thread pools, made while the
    service is built and started only in C{startService} (twistd forks to
    daemonise in between, and threads do not survive a fork).
    """

    def runner(name, threads):
        """
        A new pool of at most C{threads} threads called C{name}.

        @return: C{run(f, *args, **kwargs) -> Deferred} firing (on the
            reactor thread) with C{f}'s result in one of its threads.
        """

    def start():
        """
        Start every pool.
        """

    def stop():
        """
        Stop every pool, waiting for the work already given to it.
        """


@implementer(IThreadPools)
class ThreadPools:
    """
    L{IThreadPools} with Twisted's L{ThreadPool}s, named
    C{smartrelay-<name>}.

    @ivar pools: name -> L{ThreadPool}, in the order they were made.
    """

    def __init__(self, reactor) -> None:
        self.reactor = reactor
        self.pools: dict = {}

    def runner(self, name: str, threads: int):
        pool = ThreadPool(minthreads=1, maxthreads=threads, name=f"smartrelay-{name}")
        self.pools[name] = pool
        return partial(deferToThreadPool, self.reactor, pool)

    def start(self) -> None:
        for pool in self.pools.values():
            pool.start()

    def stop(self) -> None:
        for pool in reversed(list(self.pools.values())):
            pool.stop()


def tlsContextFor(certificatePath: str, keyPath: str):
    """
    Server TLS options from PEM files (certificate chain and key).
    """
    from twisted.internet import ssl

    with open(certificatePath, "rb") as f:
        certificates = f.read()
    with open(keyPath, "rb") as f:
        key = f.read()
    certificate = ssl.PrivateCertificate.loadPEM(certificates + b"\n" + key)
    return certificate.options()


def makeSigner(config):
    """
    A L{DKIMSigner} for the C{[dkim:DOMAIN]} sections (their keys read
    now), or L{None} without any.  Before it is used, it signs and
    verifies a test message with every key (L{DKIMSigner.selfTest}), so
    that a signer that would make bad signatures, or none, never starts.

    @raise ConfigError: a key file cannot be read, or the self-test
        failed; one line naming the section.
    """
    keys = []
    for domain, section in config.dkim.items():
        for algorithm, selector, path in section.signingKeys():
            try:
                with open(path, "rb") as f:
                    keys.append(DKIMKey(domain, selector, algorithm, f.read()))
            except OSError as e:
                raise ConfigError(
                    f"cannot read {path}: {e.strerror or e}", section=f"dkim:{domain}"
                ) from None
    if not keys:
        return None
    try:
        signer = DKIMSigner(keys)
        signer.selfTest()
    except SelfTestError as e:
        raise ConfigError(str(e), section=f"dkim:{e.domain}") from None
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return signer


def makeSMS(config, reactor, store, events, nodes=None, leases=None) -> tuple:
    """
    The SMS side of C{[sms]}: C{(SMSPolicy, SMSClient, SMSGateway)}, or
    three L{None}s without an SMS domain.  The client keeps the session
    to the SMSC and hands receipts to the gateway; the gateway is the
    delivery scheduler's transport for the SMS domain.  C{[sms] rate}
    holds for every node sharing C{store} (its bucket C{sms:<smsc>});
    C{nodes} (the live-node registry, or L{None}) gives the C{rate / N}
    a node paces itself at while the store cannot be reached.  With
    C{[sms] max_binds} each bind first takes a lease on C{sms-bind:<smsc>}
    from C{leases} (the relay's L{LeaseKeeper}), at most that many held in
    the cluster.
    """
    sms = config.sms
    if sms.domain is None:
        return None, None, None
    policy = SMSPolicy(
        domain=sms.domain, maxParts=sms.max_parts, subject=sms.subject, source=sms.source_addr
    )
    settings = SessionSettings(
        system_id=sms.system_id.encode("ascii"),
        password=sms.password.encode("ascii"),
        system_type=sms.system_type.encode("ascii"),
        window=sms.window,
        rate=sms.rate,
        responseTimeout=sms.response_timeout,
        enquireLinkInterval=sms.enquire_link,
    )
    gateways: list = []
    client = SMSClient(
        endpoint=endpoints.clientFromString(reactor, sms.smsc),
        clock=reactor,
        settings=settings,
        receiver=lambda pdu: gateways[0].received(pdu),
        queueTimeout=sms.queue_timeout,
        description=sms.smsc,
        rates=store,
        nodes=nodes,
        leases=leases,
        maxBinds=sms.max_binds,
    )
    gateway = SMSGateway(
        policy=policy, submit=client.submit, store=store, events=events, clock=reactor,
        remote=sms.smsc,
    )
    gateways.append(gateway)
    return policy, client, gateway


def makeRouter(config, reactor):
    """
    The router for C{config}: C{[domain:...] route}s first, then the
    C{[delivery] smarthost} or, without one, MX lookups.
    """
    delivery = config.delivery
    options = dict(connectTimeout=delivery.connect_timeout, bindAddress=delivery.bind_address)
    if delivery.smarthost is not None:
        default = SmarthostRouter(reactor, delivery.smarthost, **options)
    else:
        default = MXRouter(
            reactor,
            makeResolver(delivery.nameservers, reactor),
            port=delivery.mx_port,
            nameservers=delivery.nameservers,
            **options,
        )
    routes = {
        name: SmarthostRouter(reactor, domain.route, relay=False, **options)
        for name, domain in config.domains.items()
        if domain.route is not None
    }
    if not routes:
        return default
    return DomainRouter(routes, default)


class StartUpInterrupted(Exception):
    """
    The relay was stopped before it was ready: start-up ended without
    listening.
    """


class RelayService(MultiService):
    """
    The whole relay, every piece built whole from the config and what
    L{makeRelayService} loaded.  C{startService} starts the thread pools
    and re-wrap workers, then runs the start-up in order, off the reactor
    thread where it touches the disk: open the store, make this run's id
    state durable (before the first id), recover the spool and queue what
    it holds, listen for HTTP, then for feedback (bounces, complaints,
    unsubscribe mail; the reports an earlier run left unprocessed are
    processed), and only then for SMTP submission.  L{whenReady} fires
    when the relay accepts mail.
    """

    log = Logger()

    def __init__(
        self,
        config,
        reactor,
        *,
        tokens: Tokens,
        ids: QueueIDGenerator,
        idState: IDState,
        threads: IThreadPools,
    ):
        """
        @param tokens: the token keys, already loaded.
        @param ids: this run's queue ids; hands out none that could repeat
            once C{idState} is durable, which start-up sees to before
            anything listens.
        @param idState: the id state of this run, persisted at start-up.
        @param threads: where the blocking work runs (started in
            C{startService}).
        """
        MultiService.__init__(self)
        self.config = config
        self.reactor = reactor
        self.threads = threads
        relay, smtp, delivery = config.relay, config.smtp, config.delivery
        self.dataDir = relay.data_dir

        self.runInSpoolThread = threads.runner("spool", SPOOL_THREADS)
        if relay.store == "sqlite":
            self.store = SQLiteStore(
                os.path.join(self.dataDir, "smartrelay.sqlite"),
                threads.runner("sqlite", 1),
            )
        else:
            self.store = RedisStore.fromURL(relay.store, reactor)
        self.journal = EventJournal(
            os.path.join(self.dataDir, "event-journal"), threads.runner("journal", 1)
        )
        # One SQLite writer thread gains nothing from a second write in
        # flight (batches just get smaller); Redis overlaps them.
        # /metrics: a registry of this relay's own (docs/metrics.md); the
        # event log and the scheduler call the store through a TimedStore,
        # which measures its latency.
        self.metrics = RelayMetrics()
        timedStore = self.metrics.timedStore(self.store, reactor)
        self.events = EventLog(
            timedStore,
            reactor,
            journal=self.journal,
            maxInFlight=1 if relay.store == "sqlite" else 2,
            minInterval=EVENT_WRITE_INTERVAL,
            observe=self.metrics.events.count,
        )
        self.pruner = Pruner(self.store, reactor, retention=config.store.retention)
        # Every event leaves the relay (smartrelay/export/): export files
        # and signed webhooks, both reading the store's event streams;
        # started once the store is open (None when not configured).
        self.exporter = makeExporter(config, reactor, self.store, threads.runner)
        self.webhooks = makeWebhooks(config, reactor, self.store)
        self.runDeliveryIO = threads.runner("delivery-io", DELIVERY_IO_THREADS)
        self.spool = Spool(
            os.path.join(self.dataDir, "spool"),
            self.runInSpoolThread,
            runDeliveryIO=self.runDeliveryIO,
            clock=reactor,
        )

        # Re-wrapping (HTML rewriting, DKIM) is CPU work: off the reactor,
        # in worker processes (the default: the work runs beside the reactor
        # rather than taking turns with it for the interpreter lock), else
        # in threads (also while no worker runs).  The workers are started
        # in startService.
        self.tokens = tokens
        self.signer = makeSigner(config)
        self.workers = None
        if delivery.rewrap_workers:
            # They hold the delivery sessions (outbound/remote.py) and
            # re-wrap: those modules are imported as each starts.
            self.workers = WorkerPool(
                reactor,
                delivery.rewrap_workers,
                preload=("smartrelay.outbound.remote", "smartrelay.engine.rewrap"),
            )
        tracking, feedback = config.tracking, config.feedback
        self.rewrapper = Rewrapper(
            tokens=tokens,
            hostname=relay.hostname,
            bounceDomain=feedback.bounce_domain or relay.hostname,
            verpPrefix=feedback.verp_prefix,
            baseURL=tracking.base_url,
            runInThread=threads.runner("rewrap", REWRAP_THREADS),
            opens=tracking.opens,
            clicks=tracking.clicks,
            unsubscribe=tracking.unsubscribe,
            signer=self.signer,
            workers=self.workers,
        )
        # With Redis, a local durable copy of the suppression list, checked
        # while Redis cannot be reached (never deliver unchecked); it also
        # holds what this node kept in the journal for the store.
        self.suppressionReplica = (
            SuppressionReplica(
                self.store,
                reactor,
                os.path.join(self.dataDir, REPLICA_FILE),
                maxStaleness=relay.suppression_max_staleness,
                interval=max(1.0, min(60.0, relay.suppression_max_staleness / 10)),
                runInThread=self.runInSpoolThread,
                pending=self.events.pendingSuppressions,
            )
            if leaseBackend(self.store)[1]
            else None
        )
        if self.suppressionReplica is not None:
            # A Redis back without its data gets this node's copy back.
            self.store.observeDataLoss(self.suppressionReplica.storeLostData)
        # Unsubscribes, complaints and bounces (feedback, the unsubscribe
        # links, the API) go on the list through this: into the store or,
        # while it cannot be reached, into the event journal (replayed when
        # it is back) and the replica at once.
        self.suppressions = DurableSuppressions(
            self.store, self.events, self.suppressionReplica
        )
        self.web = TrackingApp(
            tokens=tokens,
            events=self.events,
            store=self.suppressions,
            clock=reactor,
            trustedProxies=config.web.trusted_proxies,
        )
        self.webEndpoint = endpoints.serverFromString(reactor, config.web.listen)
        self.webPort = None
        # Hard bounces (and soft ones past the limit) onto the suppression
        # list, from delivery sessions and from DSNs alike.
        self.bounceSuppressor = BounceSuppressor(
            store=self.suppressions,
            events=self.events,
            softLimit=feedback.soft_bounce_limit,
            softWindow=feedback.soft_bounce_window,
        )
        # Connection limits that hold across the nodes sharing a Redis store
        # (one node's own leases on SQLite); started once the store is open.
        leaseStore, sharedLeases = leaseBackend(self.store)
        holder = "%02X-%s" % (relay.node_id, os.urandom(4).hex())
        self.nodeRegistry = (
            NodeRegistry(leaseStore, reactor, holder, ttl=relay.lease_ttl)
            if sharedLeases
            else None
        )
        self.leaseKeeper = LeaseKeeper(
            leaseStore,
            reactor,
            holder=holder,
            shared=sharedLeases,
            ttl=relay.lease_ttl,
            nodes=self.nodeRegistry,
        )
        # Adaptive throttles kept with the other nodes on a Redis store (this
        # node's own on SQLite); read periodically once the store is open.
        throttleStore, sharedThrottles = throttleBackend(self.store)
        self.throttleBoard = ThrottleBoard(
            throttleStore,
            reactor,
            cooldown=delivery.throttle_cooldown,
            shared=sharedThrottles,
        )
        # [sms]: mail to +E164@domain goes out over SMPP; the client is
        # started once the store is open (receipts are matched through it)
        # and stopped after delivery.
        self.smsPolicy, self.smsClient, self.smsGateway = makeSMS(
            config,
            reactor,
            self.store,
            self.events,
            nodes=self.nodeRegistry,
            leases=self.leaseKeeper,
        )
        # The per-message lines of the scheduler and the submission policy,
        # written in batches (smartrelay/logs.py), the last at stop.
        self.messageLog = MessageLog(relay.log_messages, clock=reactor)
        # The SMTP sessions run in the worker processes when there are any
        # (smartrelay/outbound/remote.py), else on this reactor.
        self.connector = Connector(
            clock=reactor,
            heloName=relay.hostname,
            timeout=delivery.timeout,
            contexts=TLSContexts(delivery.tls_ca_certificates),
        )
        if self.workers is not None:
            self.connector = WorkerConnector(self.workers, self.connector)
        self.scheduler = DeliveryScheduler(
            spool=self.spool,
            router=makeRouter(config, reactor),
            connector=self.connector,
            events=self.events,
            clock=reactor,
            retry=delivery.retry,
            maxAge=delivery.max_age,
            maxConnections=delivery.max_connections,
            policy=DestinationPolicy.fromConfig(config),
            store=DurableSuppressions(
                timedStore, self.events, self.suppressionReplica, provisional=True
            ),
            throttlePatterns=delivery.throttle_patterns,
            throttleCooldown=delivery.throttle_cooldown,
            idleTimeout=delivery.idle_timeout,
            jitter=delivery.retry_jitter,
            shutdownTimeout=delivery.shutdown_timeout,
            hold=delivery.hold,
            rewrapper=self.rewrapper,
            suppress=True,
            bounces=self.bounceSuppressor,
            messageLog=self.messageLog,
            leases=self.leaseKeeper,
            throttles=self.throttleBoard,
            replica=self.suppressionReplica,
            transports=() if self.smsGateway is None else (self.smsGateway,),
        )
        self.scheduler.setServiceParent(self)
        # The one web site: each application by the first segment of its
        # paths (smartrelay/web/site.py), the tracking links for the rest.
        # Retries and deletes of messages queued on another node sharing the
        # store go to that node's mailbox; this node runs those sent to it.
        mailboxes, sharedMailboxes = mailboxBackend(self.store)
        self.nodeCommands = (
            NodeCommands(
                mailboxes,
                leaseStore,
                reactor,
                node="%02X" % relay.node_id,
                handler=QueueActions(self.scheduler).answer,
            )
            if sharedMailboxes and sharedLeases
            else None
        )
        self.api = ApiApp(
            store=self.suppressions,
            scheduler=self.scheduler,
            spool=self.spool,
            clock=reactor,
            tokens=config.web.api_tokens,
            trustedProxies=config.web.trusted_proxies,
            remote=self.nodeCommands,
        )
        # /healthz probes the spool directory in the delivery-io threads
        # (never queued behind the group commits of new messages).
        self.health = HealthCheck(
            reactor,
            spoolDirectory=self.spool.directory,
            runInThread=self.runDeliveryIO,
            store=self.store,
            listeners=self.listening,
            events=self.events,
        )
        self.metricsApp = MetricsApp(
            self.metrics.registry,
            self.health,
            allowed=config.web.metrics_clients,
            trustedProxies=config.web.trusted_proxies,
        )
        # [web] access_log: the relay's log, off, or a file written in batches.
        accessLog: Any = config.web.access_log
        if accessLog == "off":
            accessLog = None
        elif accessLog != "log":
            accessLog = AccessLogFile(accessLog, reactor)
            accessLog.setServiceParent(self)
        self.accessLog = accessLog
        # The reports UI (smartrelay/web/ui/) answers / and below, over the
        # API's query layer; the tracking links keep /t/ and /u/.
        self.ui = makeUiApp(config, reactor, self.api.queries, self.runDeliveryIO)
        tracking = self.web.resource()
        self.webSite = makeSite(
            SiteRoot(
                self.ui.resource(),
                {
                    b"t": tracking,
                    b"u": tracking,
                    b"api": self.api.resource(),
                    **dict.fromkeys(MetricsApp.PATHS, self.metricsApp.resource()),
                },
            ),
            reactor,
            accessLog,
        )
        # Started by start-up once this run's id state is durable.
        self.ids = ids
        self.idState = idState
        self.leaseTimer = TimerService(LEASE_RENEWAL, self._renewLease)
        self.leaseTimer.clock = reactor

        checker = None
        if smtp.auth_file is not None:
            checker = HashedPasswordChecker(
                # scrypt takes tens of milliseconds: keep it off the threads
                # that group-commit new messages.
                PasswordFile.load(smtp.auth_file), self.runDeliveryIO
            )
        self.idStatePath = os.path.join(self.dataDir, ID_STATE_FILE)
        self.policy = SubmissionPolicy(
            clock=reactor,
            hostname=relay.hostname,
            spool=self.spool,
            ids=ids,
            events=self.events,
            enqueue=self.scheduler.enqueue,
            allowedClients=smtp.allowed_clients,
            checker=checker,
            maxConnections=smtp.max_connections,
            maxConnectionsPerClient=smtp.max_connections_per_client,
            maxRecipients=smtp.max_recipients,
            renewLease=self._renewLease,
            limiter=makeLoginLimiter(smtp, reactor),
            messageLog=self.messageLog,
            sms=self.smsPolicy,
        )
        tlsContext = None
        if smtp.tls_certificate is not None:
            tlsContext = tlsContextFor(smtp.tls_certificate, smtp.tls_key)
        self.smtpFactory = SubmissionFactory(
            policy=self.policy,
            clock=reactor,
            hostname=relay.hostname,
            maxMessageSize=smtp.max_message_size,
            maxLineLength=smtp.max_line_length,
            commandTimeout=smtp.command_timeout,
            dataTimeout=smtp.data_timeout,
            tlsContext=tlsContext,
        )
        self.smtpEndpoint = endpoints.serverFromString(reactor, smtp.listen)
        self.smtpPort = None

        # The feedback listener: the public MX of bounce_domain, on the
        # submission protocol with its own policy; the [smtp] certificate,
        # line length and timeouts.
        self.feedbackInbox = FeedbackInbox(
            os.path.join(self.dataDir, "feedback"), self.runInSpoolThread
        )
        feedbackAddresses = FeedbackAddresses(
            tokens=tokens,
            bounceDomain=feedback.bounce_domain or relay.hostname.lower(),
            verpPrefix=feedback.verp_prefix,
            fblAddresses=frozenset(feedback.fbl_addresses),
        )
        self.feedbackProcessor = FeedbackProcessor(
            clock=reactor,
            inbox=self.feedbackInbox,
            addresses=feedbackAddresses,
            store=self.suppressions,
            events=self.events,
            suppressor=self.bounceSuppressor,
            read=ReportReader(
                runInThread=threads.runner("feedback", FEEDBACK_THREADS), workers=self.workers
            ),
            logReports=relay.log_messages,
            provisional=self.suppressionReplica,
        )
        self.feedbackFactory = SubmissionFactory(
            policy=FeedbackPolicy(
                clock=reactor,
                addresses=feedbackAddresses,
                inbox=self.feedbackInbox,
                received=self.feedbackProcessor.received,
                maxConnections=feedback.max_connections,
                maxConnectionsPerClient=feedback.max_connections_per_client,
            ),
            clock=reactor,
            hostname=relay.hostname,
            maxMessageSize=feedback.max_message_size,
            maxLineLength=smtp.max_line_length,
            commandTimeout=smtp.command_timeout,
            dataTimeout=smtp.data_timeout,
            tlsContext=tlsContext,
        )
        self.feedbackEndpoint = endpoints.serverFromString(reactor, feedback.listen)
        self.feedbackPort = None
        # What /metrics reads at scrape time.
        self.metricsCollector = RelayCollector(
            clock=reactor,
            scheduler=self.scheduler,
            spool=self.spool,
            events=self.events,
            journal=self.journal,
            listeners={"submission": self.smtpFactory, "feedback": self.feedbackFactory},
            workers=self.workers,
            connector=self.connector,
            threadPools=threads.pools if isinstance(threads, ThreadPools) else {},
            nodeID="%02X" % relay.node_id,
            leases=self.leaseKeeper,
            throttles=self.throttleBoard,
            replica=self.suppressionReplica,
            sms=self.smsClient,
        )
        self.metrics.register(self.metricsCollector)
        if self.exporter is not None or self.webhooks is not None:
            self.metrics.register(ExportCollector(self.exporter, self.webhooks))
        # Processed reports are kept for the events' retention.
        self.feedbackPruner = TimerService(FEEDBACK_PRUNE_INTERVAL, self._pruneFeedback)
        self.feedbackPruner.clock = reactor
        self._readyWaiters = []
        self._readyResult = None
        # The start-up step once started (until then nothing to wait for),
        # and whether a stop was asked for: start-up never listens after it.
        self._starting: Deferred = succeed(None)
        self._stopping = False

    def listening(self) -> dict:
        """
        Whether each listener is up (for C{/healthz}): not before start-up
        has opened it, nor once stopping has closed it.
        """
        return {
            "submission": self.smtpPort is not None,
            "feedback": self.feedbackPort is not None,
            "web": self.webPort is not None,
        }

    def _pruneFeedback(self) -> Deferred:
        d = self.feedbackInbox.prune(self.reactor.seconds() - self.config.store.retention)

        def pruned(count: int) -> None:
            if count:
                self.log.info("feedback: removed {count} processed report(s) past the retention",
                              count=count)

        def failed(failure: Failure) -> None:
            self.log.failure("feedback: could not prune processed reports", failure)

        return d.addCallbacks(pruned, failed)

    def _renewLease(self) -> Optional[Deferred]:
        return renewLease(self.ids, self.reactor.seconds(), self._persistIDState)

    def _persistIDState(self, state: IDState) -> Deferred:
        return self.runInSpoolThread(saveIDState, self.idStatePath, state)

    def startService(self):
        self.threads.start()
        if self.workers is not None:
            self.workers.start(self.signer, self.tokens)
            self.log.info(
                "{count} re-wrap worker process(es) started", count=self.workers.count
            )
        MultiService.startService(self)
        self._starting = Deferred.fromCoroutine(self._startUp()).addBoth(self._started)

    def whenReady(self) -> Deferred:
        """
        Fires with the listening SMTP port once the relay accepts mail, or
        fails with the reason it could not start.
        """
        d = Deferred()
        if self._readyResult is None:
            self._readyWaiters.append(d)
        else:
            self._fire(d, self._readyResult)
        return d

    @staticmethod
    def _fire(d: Deferred, result) -> None:
        if isinstance(result, Failure):
            d.errback(result)
        else:
            d.callback(result)

    def _started(self, result):
        if isinstance(result, Failure):
            if result.check(StartUpInterrupted):
                self.log.info("smartrelay stopped before it was ready")
            elif result.check(CannotListenError):
                # The usual reason (another program on the port) in one
                # line naming the key, not a traceback.
                error = result.value
                self.log.critical(
                    "smartrelay could not start: {key}: cannot listen on "
                    "{interface}:{port}: {why}",
                    key=getattr(self, "_listening", "listen"),
                    interface=error.interface or "*",
                    port=error.port,
                    why=getattr(error.socketError, "strerror", None) or error.socketError,
                )
            else:
                self.log.failure("smartrelay could not start", result)
        self._readyResult = result
        waiters, self._readyWaiters = self._readyWaiters, []
        for waiter in waiters:
            self._fire(waiter, result)

    async def _startUp(self):
        """
        What must be done, in order, before the relay listens: the steps
        that touch the disk run in threads.  C{MultiService.startService}
        waits for none of this (children's Deferreds are not waited for),
        hence this step of its own, and C{whenReady}.

        @return: the listening SMTP port.
        """
        storeStarted = True
        try:
            await self.store.start()
        except RedisConnectionFailed as e:
            # The spool, not the store, is the source of truth: accept mail
            # anyway; events wait in the journal until the store answers.
            self.log.warn(
                "{why}; accepting mail anyway, events wait in the journal", why=str(e)
            )
            storeStarted = False
        await self.events.start(storeStarted=storeStarted)
        self.pruner.setServiceParent(self)
        self.leaseKeeper.setServiceParent(self)
        self.throttleBoard.setServiceParent(self)
        if self.nodeRegistry is not None:
            self.nodeRegistry.setServiceParent(self)
        if self.nodeCommands is not None:
            self.nodeCommands.setServiceParent(self)
        if self.suppressionReplica is not None:
            await self.suppressionReplica.load()
            self.suppressionReplica.setServiceParent(self)
        for exporting in (self.exporter, self.webhooks):
            if exporting is not None:
                exporting.setServiceParent(self)
        if self.smsClient is not None:
            self.smsClient.startService()
        # No queue id before this run's state is durable; then the lease is
        # kept ahead of the clock.
        await self._persistIDState(self.idState)
        self.leaseTimer.setServiceParent(self)
        entries = await self.spool.recover()
        for entry in entries:
            self.scheduler.enqueue(entry)
        if entries:
            self.log.info("recovered {count} queued message(s) from the spool", count=len(entries))
        pendingReports = await self.feedbackInbox.open()
        self._stopIfStopping()
        self._listening = "[web] listen"
        self.webPort = await self.webEndpoint.listen(self.webSite)
        self.log.info("web endpoints on {address}", address=self.webPort.getHost())
        self._stopIfStopping()
        self._listening = "[feedback] listen"
        self.feedbackPort = await self.feedbackEndpoint.listen(self.feedbackFactory)
        self.log.info(
            "feedback: receiving reports on {address}", address=self.feedbackPort.getHost()
        )
        self.feedbackProcessor.recover(pendingReports)
        self.feedbackPruner.setServiceParent(self)
        self._stopIfStopping()
        self._listening = "[smtp] listen"
        port = self.smtpPort = await self.smtpEndpoint.listen(self.smtpFactory)
        self.log.info("smartrelay accepting mail on {address}", address=port.getHost())
        return port

    def _stopIfStopping(self) -> None:
        """
        @raise StartUpInterrupted: a stop was asked for.
        """
        if self._stopping:
            raise StartUpInterrupted("stopped before it was ready")

    @inlineCallbacks
    def stopService(self):
        # A stop during start-up lets it end first (it then stops short of
        # listening): what it started must be stopped below, and nothing
        # may be opened after the store is closed.
        self._stopping = True
        yield self._starting
        # Stop accepting first; then let delivery finish what is in flight;
        # then write the last events and close the store.
        if self.smtpPort is not None:
            port, self.smtpPort = self.smtpPort, None
            yield port.stopListening()
            # Open sessions finish the message they are sending (stored
            # and answered) and are closed with 421.
            yield self.smtpFactory.shutDown(self.config.delivery.shutdown_timeout)
        if self.feedbackPort is not None:
            port, self.feedbackPort = self.feedbackPort, None
            yield port.stopListening()
            yield self.feedbackFactory.shutDown(self.config.delivery.shutdown_timeout)
        # Reports being turned into events finish (their events and
        # suppressions written); those waiting for a retry stay in new/.
        yield self.feedbackProcessor.stop()
        yield MultiService.stopService(self)
        # The last per-message lines (delivery has stopped); any later one
        # is written at once.
        self.messageLog.stop()
        # Delivery has stopped: nothing more to submit; unbind.  Receipts
        # still being matched are written below with the other events.
        if self.smsClient is not None and self.smsClient.running:
            yield self.smsClient.stopService()
            self.smsGateway.stop()
        if self.webPort is not None:
            port, self.webPort = self.webPort, None
            yield port.stopListening()
        # Unsubscribes, opens and clicks still being written.
        yield self.web.drained()
        self.health.stop()
        self.metricsCollector.stop()
        yield self.events.flushed()
        self.events.stop()
        yield self.store.close()
        self.threads.stop()
        if self.workers is not None:
            yield self.workers.stop()


def loadTokens(config) -> Tokens:
    """
    The token keys: derived from C{[smartrelay] secret}, else read from
    C{data_dir/token-keys} (made on the first start: one small file and an
    fsync).

    @raise ConfigError: the key file is damaged, or cannot be read or made;
        one line.
    """
    path = os.path.join(config.relay.data_dir, TOKEN_KEYS_FILE)
    try:
        return Tokens.load(config.relay.secret, path)
    except ValueError as e:
        raise ConfigError(str(e), section="smartrelay", key="data_dir") from None


def beginIDRun(config, reactor) -> tuple:
    """
    This run's queue ids from the persisted id state (a few bytes).

    @return: C{(IDState, QueueIDGenerator)}: the state to make durable
        before the first id, and the generator.
    @raise ConfigError: the state file cannot be read or is damaged (it is
        never reset silently: ids could repeat); one line.
    """
    path = os.path.join(config.relay.data_dir, ID_STATE_FILE)
    try:
        previous = loadIDState(path)
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"{path} is damaged or unreadable ({e}): it keeps queue ids unique "
            f"across restarts",
            section="smartrelay",
            key="data_dir",
        ) from None
    return startRun(previous, reactor.seconds(), config.relay.node_id)


def makeRelayService(
    config, reactor, threads: Optional[IThreadPools] = None
) -> RelayService:
    """
    The relay for C{config}, built whole and not yet started.

    What its pieces need from the disk and is cheap to read (the token keys,
    the id state; the DKIM keys, the AUTH users and the TLS certificate) is
    read now, synchronously: C{twistd} calls this before it runs the
    reactor (and before it forks to daemonise), where a small read blocks
    nothing.  What is slow or must not happen before the fork waits for
    C{startService}: threads and worker processes, opening the store,
    making the id run durable, recovering the spool, listening.

    @param threads: where blocking work runs: Twisted thread pools unless
        given (tests pass a synchronous stand-in).
    @raise ConfigError: something it reads is unusable; one line.
    """
    try:
        os.makedirs(config.relay.data_dir, 0o700, exist_ok=True)
    except OSError as e:
        raise ConfigError(
            f"cannot create {config.relay.data_dir}: {e.strerror or e}",
            section="smartrelay",
            key="data_dir",
        ) from None
    checkWebhookTarget(config)
    idState, ids = beginIDRun(config, reactor)
    return RelayService(
        config,
        reactor,
        tokens=loadTokens(config),
        ids=ids,
        idState=idState,
        threads=ThreadPools(reactor) if threads is None else threads,
    )
