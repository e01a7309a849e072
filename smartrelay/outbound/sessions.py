# -*- test-case-name: tests.test_outbound_scheduler -*-
"""
The session loop: one delivery session's life, from opening it (trying the
job's hops in order) through its transactions (the message read from the
spool, re-wrapped for the server if there is a rewrapper, sent) to its
QUIT — when it has been idle too long, carried C{messagesPerConnection}
transactions, lost its lease, or must make room for another destination.
"""

from typing import Any, Callable, Optional

import attrs
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from smartrelay.engine.rewrap import RewrapError
from smartrelay.engine.workers import WorkerError
from smartrelay.outbound.dispatch import Dispatcher, Job, Slot
from smartrelay.outbound.outcomes import Verdict
from smartrelay.outbound.pool import Destination
from smartrelay.outbound.session import Reply

__all__ = ["SessionLoop", "DEAD_DESTINATION_TIME"]

#: After no session could be opened to a destination (and none is open),
#: mail for it is deferred without trying for this many seconds.
DEAD_DESTINATION_TIME = 60.0


@attrs.define(eq=False)
class SessionLoop:
    """
    Runs the delivery sessions.

    @ivar connector: an L{IConnector <smartrelay.outbound.interfaces.IConnector>}.
    @ivar spool: an L{IDeliverySpool <smartrelay.outbound.interfaces.IDeliverySpool>}.
    @ivar rewrapper: an L{IRewrapper <smartrelay.outbound.interfaces.IRewrapper>},
        or L{None}: messages go out as stored.
    @ivar throttling: the L{Throttling <smartrelay.outbound.throttling.Throttling>}.
    @ivar parking: the L{Parking <smartrelay.outbound.parking.Parking>}.
    @ivar settleJob: C{settleJob(job, verdicts)}: a job's outcome (one
        L{Verdict} for all its recipients, or a dict by address).
    @ivar parkJob: C{parkJob(destination, job)}.
    @ivar releaseJob: C{releaseJob(job)}: a job abandoned in flight.
    """

    dispatcher: Dispatcher
    connector: Any
    spool: Any
    throttling: Any
    parking: Any
    settleJob: Callable
    parkJob: Callable
    releaseJob: Callable
    running: Callable[[], bool]
    rewrapper: Any = None

    #: Sessions open now.
    sessions: set = attrs.field(factory=set, init=False)
    #: The session coroutines running now.
    workers: set = attrs.field(factory=set, init=False)

    log = Logger()

    def start(self, destination: Destination, job: Job, slot: Slot) -> None:
        """
        Run a new session of C{destination} for C{job}, in C{slot}.
        """
        worker = Deferred.fromCoroutine(self._worker(destination, job, slot))
        self.workers.add(worker)

        def finished(result: Any) -> None:
            self.workers.discard(worker)
            if isinstance(result, Failure):
                if result.check(CancelledError):
                    self.log.info(
                        "abandoned a delivery session to {destination}",
                        destination=destination.key,
                    )
                else:
                    self.log.failure(
                        "delivery session to {destination} failed unexpectedly",
                        result,
                        destination=destination.key,
                    )

        worker.addBoth(finished)

    def abandon(self) -> None:
        """
        Stop waiting for the sessions: cancel them, abort their connections.
        """
        for worker in list(self.workers):
            worker.cancel()
        for session in list(self.sessions):
            session.abort()

    async def _worker(self, destination: Destination, job: Optional[Job], slot: Slot) -> None:
        """
        One session's life: open it for the first job, then run jobs of
        the destination until it is idle too long, has carried
        C{messagesPerConnection} transactions, or must make room.
        """
        session = None
        transactions = 0
        dispatcher = self.dispatcher
        established = False
        try:
            while job is not None:
                if session is None or not session.usable or session.remote not in job.hopNames:
                    if session is not None:
                        self.sessions.discard(session)
                        session.quit()
                    session = await self._open(destination, job)
                    if session is None:
                        return
                    self.sessions.add(session)
                    transactions = 0
                    if not established:
                        established = True
                        destination.established += 1
                        # More sessions may be opened now (one at a time
                        # while none was open).
                        dispatcher.pump()
                destination.busy += 1
                try:
                    await self._transact(destination, session, job)
                finally:
                    destination.busy -= 1
                transactions += 1
                job = None
                if (
                    not self.running()
                    or not session.usable
                    or transactions >= destination.limits.messagesPerConnection
                    or destination.sessions > destination.maxConnections
                    or dispatcher.yieldSlot(destination)
                    or slot.lost
                ):
                    break
                job = await dispatcher.nextJob(destination, session, slot)
        finally:
            if established:
                destination.established -= 1
            if session is not None:
                self.sessions.discard(session)
                # The slot is free once the connection is closed (QUIT is
                # answered, or aborted after a short timeout), so that
                # the peer never sees more sessions than the limit.
                await session.quit()
            slot.release()
            dispatcher.pump()

    def _requeue(self, destination: Destination, job: Job) -> bool:
        """
        Put C{job} back at the front of its destination's queue, once: it
        was turned away, and other sessions may take it.
        """
        if job.requeued == 0 and self.running():
            job.requeued += 1
            self.dispatcher.queue(destination, job, first=True)
            return True
        return False

    async def _open(self, destination: Destination, job: Job) -> Any:
        """
        Open a session for C{job}, trying its hops in order.  If none can
        be opened the job gets the last failure as its verdict (or, when
        other sessions to the destination work, goes back to the queue);
        returns L{None} then.
        """
        opened = None
        remote = None
        throttling = self.throttling
        for index, hop in enumerate(job.hops):
            remote = hop.name
            opened = await self.connector.open(hop, destination.limits.tls)
            if opened.session is not None:
                destination.deadUntil = 0.0
                self.parking.recovered(destination.key)
                return opened.session
            if throttling.isThrottling(opened.reply):
                throttling.trigger(destination, opened.reply)
            if not (opened.tryNextHop and index + 1 < len(job.hops) and self.running()):
                break
            self.log.info(
                "{destination}: {remote} unavailable ({reply}), trying {next}",
                destination=destination.key,
                remote=hop.name,
                reply=opened.reply.line,
                next=job.hops[index + 1].name,
            )
        reply = opened.reply
        # Other sessions to this destination work: this one was turned away
        # (too many connections, a flaky MX); the job waits for one of them
        # instead of a retry later.
        if not reply.permanent and destination.sessions > 1 and self._requeue(destination, job):
            return None
        verdict = Verdict(reply, remote, throttle=throttling.detail(destination, reply))
        self.settleJob(job, verdict)
        if destination.sessions <= 1 and not reply.permanent and self.running():
            # Nothing to this destination works: park what waits for it
            # and what comes until its next retry.
            self.parking.suspend(destination.key, reply, remote, job.addresses)
            while destination.queue:
                self.parkJob(destination, destination.queue.popleft())
        elif destination.sessions <= 1:
            # A dead destination: what waits for it, or comes in the next
            # moments, would only fail the same way.
            self.parking.refused(destination.key, reply)
            destination.deadUntil = self.dispatcher.clock.seconds() + DEAD_DESTINATION_TIME
            destination.deadVerdict = attrs.evolve(
                verdict,
                reply=attrs.evolve(reply, text=f"delivery temporarily suspended: {reply.text}"),
            )
            while destination.queue:
                self.settleJob(destination.queue.popleft(), verdict)
        return None

    def _rewrapFailed(self, job: Job, error: Exception) -> None:
        """
        The message could not be re-wrapped for C{job}: deferred, with a
        reason of its own when it has one (DKIM signing failed).
        """
        entry = job.entry
        if isinstance(error, RewrapError):
            self.log.error(
                "could not re-wrap {queue_id} for {recipient}: {why}",
                queue_id=entry.queue_id,
                recipient=job.addresses[0],
                why=str(error),
            )
            reply = Reply(451, "4.3.0", f"local error: {error}")
        else:
            self.log.failure(
                "could not re-wrap {queue_id} for {recipient}",
                Failure(error),
                queue_id=entry.queue_id,
                recipient=job.addresses[0],
            )
            reply = Reply(451, "4.3.0", "local error: could not prepare the message")
        self.settleJob(job, Verdict(reply, None))

    async def _transact(self, destination: Destination, session: Any, job: Job) -> None:
        entry = job.entry
        try:
            data = await maybeDeferred(self.spool.readMessage, entry)
        except CancelledError:
            raise
        except Exception:
            self.log.failure("could not read {queue_id} from the spool", queue_id=entry.queue_id)
            reply = Reply(451, "4.3.0", "local error: could not read the spooled message")
            self.settleJob(job, Verdict(reply, None))
            return
        sender = entry.sender
        if self.rewrapper is not None:
            try:
                index = [r.address for r in entry.recipients].index(job.addresses[0])
                # Made for this session's server: downgraded where it cannot
                # take 8-bit content, then signed; sent as it is.  A session
                # in a worker process does all of it there (the envelope
                # sender too), just before sending.
                if session.rewrapsInPlace:
                    sender, data = None, self.rewrapper.job(entry, index, data, session.offers)
                else:
                    sender, data = await self.rewrapper.rewrap(entry, index, data, session.offers)
            except CancelledError:
                raise
            except Exception as e:
                self._rewrapFailed(job, e)
                return
            if not session.usable:
                # The session went away while the message was prepared.
                if self._requeue(destination, job):
                    return
                reply = Reply(451, "4.4.2", f"connection to {session.remote} lost")
                self.settleJob(job, Verdict(reply, session.remote))
                return
        try:
            result = await session.send(sender, list(job.addresses), data)
        except CancelledError:
            self.releaseJob(job)
            raise
        except (RewrapError, WorkerError) as e:
            # The re-wrap failed where the session is (a worker process).
            self._rewrapFailed(job, e)
            return
        except Exception:
            self.log.failure(
                "transaction for {queue_id} with {remote} failed unexpectedly",
                queue_id=entry.queue_id,
                remote=session.remote,
            )
            reply = Reply(451, "4.3.0", "local error during the SMTP transaction")
            self.settleJob(job, Verdict(reply, session.remote))
            return
        # A reused connection that the server had closed meanwhile: nothing
        # was attempted, so try again on a fresh one.
        if result.unanswered and self._requeue(destination, job):
            return
        throttle = None
        for reply in result.results.values():
            if self.throttling.isThrottling(reply):
                self.throttling.trigger(destination, reply)
                throttle = self.throttling.detail(destination, reply)
                break
        missing = Reply(451, "4.3.0", "local error: the attempt gave no result")
        verdicts = {}
        for address in job.addresses:
            reply = result.results.get(address, missing)
            verdicts[address] = Verdict(
                reply,
                result.remote or None,
                result.tls,
                throttle=throttle if not reply.positive else None,
            )
        self.settleJob(job, verdicts)
