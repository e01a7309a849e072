# -*- test-case-name: tests.test_service -*-
"""
Builds the relay from a L{smartrelay.config.Config} and a reactor.

L{makeRelayService} is what C{twistd smartrelay} runs; tests call it with a
memory reactor or, end to end, with the real one.
"""

import os
from functools import partial

from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet import endpoints
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from smartrelay.auth import HashedPasswordChecker, PasswordFile
from smartrelay.events import EventLog
from smartrelay.journal import EventJournal
from smartrelay.retention import Pruner
from smartrelay.ids import ID_STATE_FILE, IDState, loadIDState, renewLease, saveIDState, startRun
from smartrelay.engine.dkim import DKIMKey, DKIMSigner
from smartrelay.engine.rewrap import Rewrapper
from smartrelay.engine.workers import WorkerPool
from smartrelay.outbound.pool import Connector, DestinationPolicy, TLSContexts
from smartrelay.outbound.router import DomainRouter, MXRouter, SmarthostRouter, makeResolver
from smartrelay.outbound.scheduler import DeliveryScheduler
from smartrelay.smtp.submission import SubmissionFactory, SubmissionPolicy
from smartrelay.spool import Spool
from smartrelay.store.redis import RedisConnectionFailed, RedisStore
from smartrelay.store.sqlite import SQLiteStore
from smartrelay.tokens import Tokens
from smartrelay.web.tracking import TrackingApp, makeSite

#: Threads that write new messages to the spool: enough for the kernel to
#: merge their fsyncs.
SPOOL_THREADS = 4
#: Threads for the delivery side's spool I/O (reads, journal, removals).
DELIVERY_IO_THREADS = 2
#: Threads for re-wrapping (HTML rewriting, DKIM signing); the GIL keeps
#: Python work to one core, but the reactor thread stays responsive.
REWRAP_THREADS = 2
#: The tokens' key file under data_dir (when [smartrelay] secret is unset).
TOKEN_KEYS_FILE = "token-keys"


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
    now), or L{None} without any.
    """
    keys = []
    for domain, section in config.dkim.items():
        for algorithm, selector, path in section.signingKeys():
            with open(path, "rb") as f:
                keys.append(DKIMKey(domain, selector, algorithm, f.read()))
    return DKIMSigner(keys) if keys else None


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


class RelayService(MultiService):
    """
    The whole relay.  Start-up runs in order, off the reactor thread where
    it touches the disk: open the store, start a new id run (persisted before
    the first id), recover the spool and queue what it holds, and only then
    listen for SMTP.  C{ready} fires when the relay accepts mail.
    """

    log = Logger()

    def __init__(self, config, reactor):
        MultiService.__init__(self)
        self.config = config
        self.reactor = reactor
        relay, smtp, delivery = config.relay, config.smtp, config.delivery
        self.dataDir = relay.data_dir

        self.spoolPool = ThreadPool(minthreads=1, maxthreads=SPOOL_THREADS, name="smartrelay-spool")
        self.runInSpoolThread = partial(deferToThreadPool, reactor, self.spoolPool)
        # Thread pools are started in startService, not here: twistd forks
        # (daemon mode) between building and starting the service, and
        # threads do not survive a fork.
        if relay.store == "sqlite":
            self.storePool = ThreadPool(minthreads=1, maxthreads=1, name="smartrelay-sqlite")
            self.store = SQLiteStore(
                os.path.join(self.dataDir, "smartrelay.sqlite"),
                partial(deferToThreadPool, reactor, self.storePool),
            )
        else:
            self.storePool = None
            self.store = RedisStore.fromURL(relay.store, reactor)
        self.journalPool = ThreadPool(minthreads=1, maxthreads=1, name="smartrelay-journal")
        self.journal = EventJournal(
            os.path.join(self.dataDir, "event-journal"),
            partial(deferToThreadPool, reactor, self.journalPool),
        )
        # One SQLite writer thread gains nothing from a second write in
        # flight (batches just get smaller); Redis overlaps them.
        self.events = EventLog(
            self.store,
            reactor,
            journal=self.journal,
            maxInFlight=1 if self.storePool is not None else 2,
        )
        self.pruner = Pruner(self.store, reactor, retention=config.store.retention)
        self.deliveryIOPool = ThreadPool(
            minthreads=1, maxthreads=DELIVERY_IO_THREADS, name="smartrelay-delivery-io"
        )
        self.runDeliveryIO = partial(deferToThreadPool, reactor, self.deliveryIOPool)
        self.spool = Spool(
            os.path.join(self.dataDir, "spool"),
            self.runInSpoolThread,
            runDeliveryIO=self.runDeliveryIO,
            clock=reactor,
        )

        # Re-wrapping (HTML rewriting, DKIM) is CPU work: off the reactor.
        self.rewrapPool = ThreadPool(
            minthreads=1, maxthreads=REWRAP_THREADS, name="smartrelay-rewrap"
        )
        tracking, feedback = config.tracking, config.feedback
        # The tokens' keys are read (or made) at start-up, in _startUp.
        self.rewrapper = Rewrapper(
            tokens=None,
            hostname=relay.hostname,
            bounceDomain=feedback.bounce_domain or relay.hostname,
            verpPrefix=feedback.verp_prefix,
            baseURL=tracking.base_url,
            runInThread=partial(deferToThreadPool, reactor, self.rewrapPool),
            opens=tracking.opens,
            clicks=tracking.clicks,
            unsubscribe=tracking.unsubscribe,
            signer=makeSigner(config),
        )
        # In worker processes (the default) the CPU work runs beside the
        # reactor rather than taking turns with it for the interpreter lock;
        # they are started once the token keys are known, in _startUp.
        self.workers = None
        if delivery.rewrap_workers:
            self.workers = WorkerPool(reactor, delivery.rewrap_workers)
        self.web = TrackingApp(tokens=None, events=self.events, store=self.store, clock=reactor)
        self.webSite = makeSite(self.web)
        self.webEndpoint = endpoints.serverFromString(reactor, config.web.listen)
        self.webPort = None
        self.scheduler = DeliveryScheduler(
            spool=self.spool,
            router=makeRouter(config, reactor),
            connector=Connector(
                clock=reactor,
                heloName=relay.hostname,
                timeout=delivery.timeout,
                contexts=TLSContexts(delivery.tls_ca_certificates),
            ),
            events=self.events,
            clock=reactor,
            retry=delivery.retry,
            maxAge=delivery.max_age,
            maxConnections=delivery.max_connections,
            policy=DestinationPolicy.fromConfig(config),
            store=self.store,
            throttlePatterns=delivery.throttle_patterns,
            throttleCooldown=delivery.throttle_cooldown,
            idleTimeout=delivery.idle_timeout,
            jitter=delivery.retry_jitter,
            shutdownTimeout=delivery.shutdown_timeout,
            hold=delivery.hold,
            rewrapper=self.rewrapper,
            suppress=True,
        )
        self.scheduler.setServiceParent(self)
        leaseTimer = TimerService(10, self._renewLease)
        leaseTimer.clock = reactor
        leaseTimer.setServiceParent(self)

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
            ids=None,
            events=self.events,
            enqueue=self.scheduler.enqueue,
            allowedClients=smtp.allowed_clients,
            checker=checker,
            maxConnections=smtp.max_connections,
            maxConnectionsPerClient=smtp.max_connections_per_client,
            maxRecipients=smtp.max_recipients,
            renewLease=self._renewLease,
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
        self._readyWaiters = []
        self._readyResult = None

    def _renewLease(self):
        if self.policy.ids is not None:
            return renewLease(self.policy.ids, self.reactor.seconds(), self._persistIDState)

    def _persistIDState(self, state: IDState) -> Deferred:
        return self.runInSpoolThread(saveIDState, self.idStatePath, state)

    def startService(self):
        self.rewrapPool.start()
        self.spoolPool.start()
        self.deliveryIOPool.start()
        if self.storePool is not None:
            self.storePool.start()
        self.journalPool.start()
        MultiService.startService(self)
        self._startUp().addBoth(self._started)

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
            self.log.failure("smartrelay could not start", result)
        self._readyResult = result
        waiters, self._readyWaiters = self._readyWaiters, []
        for waiter in waiters:
            self._fire(waiter, result)

    @inlineCallbacks
    def _startUp(self):
        yield self.runInSpoolThread(os.makedirs, self.dataDir, 0o700, True)
        tokens = yield self.runInSpoolThread(
            Tokens.load, self.config.relay.secret, os.path.join(self.dataDir, TOKEN_KEYS_FILE)
        )
        self.rewrapper.tokens = self.web.tokens = tokens
        if self.workers is not None:
            self.workers.start(self.rewrapper.signer, tokens)
            self.rewrapper.workers = self.workers
            self.log.info(
                "{count} re-wrap worker process(es) started", count=self.workers.count
            )
        storeStarted = True
        try:
            yield self.store.start()
        except RedisConnectionFailed as e:
            # The spool, not the store, is the source of truth: accept mail
            # anyway; events wait in the journal until the store answers.
            self.log.warn(
                "{why}; accepting mail anyway, events wait in the journal", why=str(e)
            )
            storeStarted = False
        yield self.events.start(storeStarted=storeStarted)
        self.pruner.setServiceParent(self)
        previous = yield self.runInSpoolThread(loadIDState, self.idStatePath)
        state, generator = startRun(
            previous, self.reactor.seconds(), self.config.relay.node_id
        )
        yield self._persistIDState(state)
        self.policy.ids = generator
        entries = yield self.spool.recover()
        for entry in entries:
            self.scheduler.enqueue(entry)
        if entries:
            self.log.info("recovered {count} queued message(s) from the spool", count=len(entries))
        self.webPort = yield self.webEndpoint.listen(self.webSite)
        self.log.info("web endpoints on {address}", address=self.webPort.getHost())
        port = self.smtpPort = yield self.smtpEndpoint.listen(self.smtpFactory)
        self.log.info("smartrelay accepting mail on {address}", address=port.getHost())
        return port

    @inlineCallbacks
    def stopService(self):
        # Stop accepting first; then let delivery finish what is in flight;
        # then write the last events and close the store.
        if self.smtpPort is not None:
            port, self.smtpPort = self.smtpPort, None
            yield port.stopListening()
            # Open sessions finish the message they are sending (stored
            # and answered) and are closed with 421.
            yield self.smtpFactory.shutDown(self.config.delivery.shutdown_timeout)
        yield MultiService.stopService(self)
        if self.webPort is not None:
            port, self.webPort = self.webPort, None
            yield port.stopListening()
        # Unsubscribes, opens and clicks still being written.
        yield self.web.drained()
        yield self.events.flushed()
        self.events.stop()
        yield self.store.close()
        if self.storePool is not None:
            self.storePool.stop()
        self.journalPool.stop()
        self.deliveryIOPool.stop()
        self.spoolPool.stop()
        self.rewrapPool.stop()
        if self.workers is not None:
            yield self.workers.stop()


def makeRelayService(config, reactor) -> RelayService:
    """
    The relay for C{config}, not yet started.
    """
    return RelayService(config, reactor)
