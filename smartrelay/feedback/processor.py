# -*- test-case-name: tests.test_feedback_processor -*-
"""
Reports that came back, turned into events and suppressions.

The feedback listener hands each report to L{FeedbackProcessor.received}
once it is on disk (C{new/} of the L{FeedbackInbox}); at start-up
L{FeedbackProcessor.recover} takes what an earlier run left there.  For
each report:

 1. the message is read as a report (C{readReport}, by a
    L{ReportReader}: in a worker process, else a thread; parsing is CPU
    work that must not hold up the reactor);
 2. every record is attributed to a message and a recipient: the VERP
    token of the address it came back to names the queue id and the
    recipient's index in the envelope (the address is the one of the
    message's C{accepted} event at that index; failing that, the record's
    own); a report sent to C{postmaster@} or an FBL address is attributed
    by the record's C{queue_id} (the returned message's
    C{X-SmartRelay-ID}) and its Final-Recipient / Original-Recipient.  The
    tag and metadata come from the message's C{accepted} event;
 3. events are emitted: C{bounced} (C{detail.source = "dsn"}), C{deferred}
    for a DSN's C{Action: delayed} (never a bounce), C{complained} (with
    C{feedback_type}), C{unsubscribed} (an ARF C{opt-out}, and any mail to
    C{unsub+TOKEN@}), C{auto_replied};
 4. once the events are written (to the store, or the event journal) the
    suppression list is updated: hard bounces and escalated soft bounces
    (L{BounceSuppressor}), complaints of type C{abuse}, C{fraud}, C{virus},
    C{other} or none given (reason C{complaint}), unsubscribes (reason
    C{unsubscribe}, unless the address is already on the list: then, as
    for the web's unsubscribe, no event either);
 5. the report moves to C{done/}.

A crash anywhere in there loses nothing (the report stays in C{new/} until
step 5) and duplicates nothing: every event id is derived from the report
id and the record, so processing a report again makes the same ids, and
the processor leaves out every event whose id the store already has (it
reads the message's events for the attribution anyway).  A report
processed again -- after a failure (the store down, say: tried again with
back-off) or at start-up -- first waits until the event log writes to the
store again and has written what it holds, so that the store's answer is
complete.  Suppressions are idempotent (the same entry, time included, is
added again).
"""

import hashlib
from typing import Any, Callable, Optional

import attrs
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.task import deferLater
from twisted.logger import Logger, LogLevel

from smartrelay.events import Event
from smartrelay.feedback.inbox import DamagedReport, Envelope, FeedbackInbox
from smartrelay.feedback.records import FeedbackRecord, Report
from smartrelay.feedback.report import readReport
from smartrelay.feedback.suppression import BounceSuppressor
from smartrelay.feedback.addresses import FeedbackAddresses, NotAFeedbackAddress, Target
from smartrelay.store.interfaces import MAX_LIMIT, SuppressionEntry, normaliseAddress

#: ARF feedback types that put the recipient on the suppression list
#: (C{None}: a complaint that names no type, as some provider forms do).
SUPPRESSING_FEEDBACK_TYPES = frozenset(["abuse", "fraud", "virus", "other", None])
#: Ones that are recorded and never suppress.
RECORDED_FEEDBACK_TYPES = frozenset(["not-spam", "auth-failure"])
#: DSN actions that are not a failure: nothing is recorded for them.
DELIVERED_ACTIONS = frozenset(["delivered", "relayed", "expanded"])


def feedbackEventID(reportID: str, part: str) -> str:
    """
    The id of the event that part C{part} of report C{reportID} makes: the
    same every time it is processed (128 bits, hex, like L{newEventID
    <smartrelay.events.newEventID>}).
    """
    return hashlib.sha256(f"feedback\0{reportID}\0{part}".encode("utf-8")).hexdigest()[:32]


@attrs.frozen
class Planned:
    """
    An event a report makes, and the suppression it asks for.

    @ivar suppress: C{None}; C{"bounce"} (the L{BounceSuppressor} decides);
        C{"complaint"} or C{"unsubscribe"} (added).
    """

    id: str
    type: str
    queue_id: Optional[str]
    recipient: Optional[str]
    tag: Optional[str]
    metadata: dict
    detail: dict
    suppress: Optional[str] = None


@attrs.define
class _Message:
    """
    What the store knows of one message: its C{accepted} recipients in
    envelope order, tag, metadata and the ids of all its events.
    """

    recipients: list
    tag: Optional[str]
    metadata: dict
    eventIDs: set

    @classmethod
    def fromEvents(cls, events: list) -> "_Message":
        accepted = [e for e in events if e.type == "accepted"]
        first = accepted[0] if accepted else None
        return cls(
            recipients=[e.recipient for e in accepted],
            tag=first.tag if first is not None else None,
            metadata=dict(first.metadata) if first is not None else {},
            eventIDs={e.id for e in events},
        )


@attrs.define(eq=False)
class FeedbackProcessor:
    """
    See the module docstring.

    @ivar read: C{read(bytes) -> Deferred[Report]}, off the reactor thread
        (a L{ReportReader}).
    @ivar retryDelays: seconds before each new try of a report whose
        processing failed (the last one repeats).
    """

    clock: object
    inbox: FeedbackInbox
    addresses: FeedbackAddresses
    store: object
    events: object
    suppressor: BounceSuppressor
    read: Callable[[bytes], Deferred]
    retryDelays: tuple = (5.0, 30.0, 60.0, 300.0, 900.0)
    #: One log line per processed report (C{[smartrelay] log_messages}).
    logReports: bool = True
    pollInterval: float = 1.0
    #: Where an unsubscribe by mail that cannot be attributed while the
    #: store cannot be reached is held meanwhile, for the address the mail
    #: names (C{holdProvisionally(report id, entry)},
    #: C{releaseProvisional(report id)}: the suppression replica), or
    #: L{None}.
    provisional: Any = None
    _inFlight: dict = attrs.field(factory=dict, init=False)
    _timers: dict = attrs.field(factory=dict, init=False)
    _stopped: bool = attrs.field(default=False, init=False)

    log = Logger()

    # -- the life of a report ------------------------------------------------

    def received(self, reportID: str, envelope: Envelope, data: bytes) -> None:
        """
        A report was written to the inbox: process it in the background.
        """
        self._start(reportID, envelope, data, careful=False, tries=0)

    def recover(self, reportIDs: list) -> None:
        """
        Process reports an earlier run left unprocessed (in C{new/}).
        """
        if reportIDs:
            self.log.info(
                "feedback: processing {count} report(s) left from the last run",
                count=len(reportIDs),
            )
        for reportID in reportIDs:
            self._start(reportID, None, None, careful=True, tries=0)

    def _start(self, reportID, envelope, data, careful: bool, tries: int) -> None:
        self._timers.pop(reportID, None)
        if self._stopped or reportID in self._inFlight:
            return
        d = Deferred.fromCoroutine(self._process(reportID, envelope, data, careful))
        self._inFlight[reportID] = d

        def done(result) -> None:
            del self._inFlight[reportID]
            if self.provisional is not None:
                self.provisional.releaseProvisional(reportID)

        def failed(failure) -> None:
            del self._inFlight[reportID]
            if self._stopped:
                self.log.warn(
                    "feedback: report {report} not processed before stopping ({why}); "
                    "it is processed at the next start",
                    report=reportID,
                    why=failure.getErrorMessage() or failure.type.__name__,
                )
                return
            delay = self.retryDelays[min(tries, len(self.retryDelays) - 1)]
            self.log.failure(
                "feedback: could not process report {report}; trying again in {delay}s",
                failure,
                report=reportID,
                delay=delay,
            )
            self._timers[reportID] = self.clock.callLater(
                delay, self._start, reportID, None, None, True, tries + 1
            )

        d.addCallbacks(done, failed)

    def stop(self) -> Deferred:
        """
        Start nothing more; fire once the reports being processed are done
        (those waiting for a retry stay in C{new/} for the next start).
        """
        self._stopped = True
        for timer in self._timers.values():
            if timer.active():
                timer.cancel()
        self._timers.clear()
        if not self._inFlight:
            return succeed(None)
        return DeferredList(list(self._inFlight.values())).addCallback(lambda _: None)

    def idle(self) -> bool:
        """
        Nothing is being processed or waits for a retry.
        """
        return not self._inFlight and not self._timers

    async def _process(
        self, reportID: str, envelope: Optional[Envelope], data: Optional[bytes], careful: bool
    ) -> list:
        if careful:
            await self._storeCaughtUp()
        if envelope is None or data is None:
            try:
                envelope, data = await self.inbox.read(reportID)
            except DamagedReport as e:
                # Kept (in done/) for the operator, not retried for ever.
                self.log.error("feedback: {why}; moved to done/ unprocessed", why=str(e))
                await self.inbox.markDone(reportID)
                return []
        report = await self.read(data)
        planned, skipped = await self.plan(reportID, envelope, report, careful)
        emitted = [
            self.events.emit(
                p.type,
                p.queue_id,
                p.recipient,
                tag=p.tag,
                metadata=p.metadata or None,
                detail=p.detail,
                id=p.id,
            )
            for p in planned
        ]
        # Suppressions only once the events are durable: on a second run
        # an entry on the list means its event is stored.
        await self.events.flushed()
        for p, event in zip(planned, emitted):
            await self._suppress(p, event, envelope.received)
        # Skipped events (already stored) still get their suppression.
        for p in skipped:
            await self._suppress(p, None, envelope.received)
        await self.inbox.markDone(reportID)
        if self.logReports:
            self._logReport(reportID, envelope, report, planned, skipped)
        return emitted

    def _logReport(self, reportID, envelope, report, planned, skipped) -> None:
        made = "; ".join(
            "%s %s %s%s" % (
                p.type, p.queue_id or "(no queue id)", p.recipient or "(no recipient)",
                _summary(p),
            )
            for p in planned
        ) or "no new event"
        text = "feedback: report {report} ({kind}) from {client} to {to}: {made}".format(
            report=reportID,
            kind=report.type,
            client=envelope.client.get("ip", "?"),
            to=", ".join(envelope.recipients),
            made=made + (" (%d already recorded)" % (len(skipped),) if skipped else ""),
        )
        # Formatted once (see smartrelay.logs.MessageLog): a busy listener
        # writes one line per report.
        self.log.emit(
            LogLevel.info, "{log_text}", log_text=text, report=reportID,
            report_type=report.type, events=len(planned),
        )

    async def _storeCaughtUp(self) -> None:
        """
        Wait until the event log writes to the store (not to its journal)
        and has written everything emitted so far.
        """
        while True:
            await self.events.flushed()
            if not self.events.degraded:
                return
            if self._stopped:
                raise RuntimeError("stopping while the store is unavailable")
            await deferLater(self.clock, self.pollInterval, lambda: None)

    # -- attribution and events ----------------------------------------------

    async def plan(
        self, reportID: str, envelope: Envelope, report: Report, careful: bool
    ) -> list:
        """
        The events report C{reportID} makes.

        @return: C{(fresh, stored)}: L{Planned} events the store does not
            have yet, and those it has (whose suppressions are added
            again).
        """
        messages: dict = {}

        async def message(queueID: Optional[str]) -> Optional[_Message]:
            if queueID is None:
                return None
            if queueID not in messages:
                messages[queueID] = _Message.fromEvents(
                    await self.store.eventsForMessage(queueID)
                )
            return messages[queueID]

        targets = []
        for n, address in enumerate(envelope.recipients):
            try:
                targets.append((n, self.addresses.target(address)))
            except NotAFeedbackAddress:
                # Accepted then, not now (the token key was retired).
                self.log.warn(
                    "feedback: report {report}: {address!r} is no feedback address any more",
                    report=reportID,
                    address=address,
                )
        # A report that came to a VERP address as well as to postmaster@ or
        # an FBL address is attributed by its token alone (once).
        fallbackDone = any(target.kind == "verp" for n, target in targets)
        planned = []
        for n, target in targets:
            if target.kind == "unsubscribe":
                try:
                    known = await message(target.queue_id)
                except Exception:
                    self._holdProvisionally(reportID, envelope, report)
                    raise
                planned += await self._unsubscribe(reportID, n, target, known, report)
            elif target.kind == "verp":
                known = await message(target.queue_id)
                for i, record in enumerate(report.records):
                    recipient = _recipientAt(known, target.index)
                    if recipient is None or (
                        len(report.records) > 1
                        and record.recipient is not None
                        and not _sameAddress(record.recipient, recipient)
                    ):
                        recipient = record.recipient or recipient
                    planned += self._forRecord(
                        reportID, f"{n}.{i}", record, target.queue_id, recipient, known
                    )
            elif not fallbackDone:
                fallbackDone = True
                for i, record in enumerate(report.records):
                    known = await message(record.queue_id)
                    planned += self._forRecord(
                        reportID, f"r.{i}", record, record.queue_id, record.recipient, known
                    )
        fresh, stored = [], []
        for p in planned:
            if await self._stored(p, messages, envelope, careful):
                stored.append(p)
            else:
                fresh.append(p)
        return fresh, stored

    def _holdProvisionally(self, reportID: str, envelope: Envelope, report: Report) -> None:
        """
        The store cannot say whom an unsubscribe by mail is for: until it
        can (the report is tried again), hold the address the mail names
        (its sender: the report's, else the envelope's) so that this node
        does not mail it meanwhile.
        """
        if self.provisional is None:
            return
        names = [record.recipient for record in report.records if record.recipient]
        for name in names + ([envelope.sender] if envelope.sender else []):
            try:
                address = normaliseAddress(name)
            except ValueError:
                continue
            self.provisional.holdProvisionally(
                reportID,
                SuppressionEntry(address=address, reason="unsubscribe", time=envelope.received),
            )
            self.log.info(
                "feedback: report {report}: unsubscribe for {address} held on this node"
                " until the store can attribute it",
                report=reportID,
                address=address,
            )
            return

    async def _stored(self, p: Planned, messages: dict, envelope: Envelope, careful: bool) -> bool:
        known = messages.get(p.queue_id)
        if known is not None:
            return p.id in known.eventIDs
        if not careful or p.recipient is None:
            return False
        cursor = None
        while True:
            page = await self.store.queryEvents(
                type=p.type, recipient=p.recipient, since=envelope.received,
                cursor=cursor, limit=MAX_LIMIT,
            )
            if any(e.id == p.id for e in page.events):
                return True
            cursor = page.cursor
            if cursor is None:
                return False

    async def _unsubscribe(
        self, reportID: str, n: int, target: Target, known: Optional[_Message], report: Report
    ) -> list:
        recipient = _recipientAt(known, target.index)
        if recipient is None:
            # The message's events are gone (retention): the report may
            # still name the address.
            names = [r.recipient for r in report.records if r.recipient]
            recipient = names[0] if names else None
        if recipient is None:
            self.log.warn(
                "feedback: report {report}: unsubscribe for {queue_id} #{index}, "
                "whose recipient is no longer known",
                report=reportID,
                queue_id=target.queue_id,
                index=target.index,
            )
            return []
        try:
            normaliseAddress(recipient)
        except ValueError:
            self.log.warn(
                "feedback: report {report}: not unsubscribing {recipient!r}: not an address",
                report=reportID,
                recipient=recipient,
            )
            return []
        eventID = feedbackEventID(reportID, f"{n}.u")
        if known is None or eventID not in known.eventIDs:
            found = await self.store.checkSuppressions([recipient], self.clock.seconds())
            if found:
                return []
        return [
            Planned(
                id=eventID,
                type="unsubscribed",
                queue_id=target.queue_id,
                recipient=recipient,
                tag=known.tag if known else None,
                metadata=known.metadata if known else {},
                detail={"method": "mailto", "source": "mail"},
                suppress="unsubscribe",
            )
        ]

    def _forRecord(
        self,
        reportID: str,
        part: str,
        record: FeedbackRecord,
        queueID: Optional[str],
        recipient: Optional[str],
        known: Optional[_Message],
    ) -> list:
        tag = known.tag if known else None
        metadata = known.metadata if known else {}

        def planned(type: str, detail: dict, suppress: Optional[str] = None) -> Planned:
            return Planned(
                id=feedbackEventID(reportID, part),
                type=type,
                queue_id=queueID,
                recipient=recipient,
                tag=tag,
                metadata=metadata,
                detail=detail,
                suppress=suppress,
            )

        if record.type == "bounce":
            if record.action in DELIVERED_ACTIONS:
                return []
            detail = {
                "kind": record.kind,
                "reason": record.reason,
                "status": record.status,
                "diagnostic": record.diagnostic,
                "remote": record.remote,
                "source": "dsn",
                "action": record.action,
            }
            if record.action == "delayed":
                # A delay warning: the message is still being tried.
                del detail["kind"]
                return [planned("deferred", detail)]
            return [planned("bounced", detail, "bounce")]
        if record.type == "complaint":
            detail = {
                "feedback_type": record.feedback_type,
                "source_ip": record.source_ip,
                "user_agent": record.user_agent,
                "source": "arf",
            }
            if record.feedback_type == "opt-out":
                return [planned("unsubscribed", {"method": "arf", **detail}, "unsubscribe")]
            suppress = (
                "complaint" if record.feedback_type in SUPPRESSING_FEEDBACK_TYPES else None
            )
            return [planned("complained", detail, suppress)]
        if record.type == "unsubscribe":
            return [planned("unsubscribed", {"method": "mailto", "source": "mail"}, "unsubscribe")]
        if record.type == "autoreply":
            return [planned("auto_replied", {"reason": record.reason, "source": "mail"})]
        return []

    # -- suppressions ------------------------------------------------------------

    async def _suppress(self, p: Planned, event: Optional[Event], received: float) -> None:
        if p.suppress is None or p.recipient is None:
            return
        if event is None:
            event = Event(
                type=p.type, queue_id=p.queue_id, recipient=p.recipient,
                time=received, tag=p.tag, metadata=p.metadata, detail=p.detail, id=p.id,
            )
        if p.suppress == "bounce":
            await self.suppressor.bounced(event, time=received)
            return
        try:
            entry = SuppressionEntry(
                address=p.recipient, reason=p.suppress, source_event=p.id, time=received
            )
        except ValueError:
            self.log.warn("feedback: not suppressing {recipient!r}: not an address",
                          recipient=p.recipient)
            return
        await self.store.addSuppression(entry)


@attrs.frozen
class ReadReportJob:
    """
    L{readReport} as a job for the worker processes
    (L{smartrelay.engine.workers}).
    """

    data: bytes

    def run(self, *context) -> Report:
        return readReport(self.data)


def _safely(readReport: Callable[[bytes], Report], data: bytes) -> Report:
    try:
        return readReport(data)
    except Exception:
        # readReport must never raise; if it does, the report is logged and
        # kept (in done/), not retried for ever.
        FeedbackProcessor.log.failure("feedback: the report parser failed")
        return Report("none")


@attrs.define(eq=False)
class ReportReader:
    """
    Reads reports off the reactor thread: in a worker process when one is
    running (parsing is CPU work; there it runs beside the reactor instead
    of taking turns with it for the interpreter lock), else, or if the
    worker fails, in a thread.

    @ivar runInThread: C{run(f, *args) -> Deferred}, a thread pool.
    @ivar workers: a started L{WorkerPool
        <smartrelay.engine.workers.WorkerPool>}, or L{None}.
    @ivar readReport: what the thread runs (the workers always run
        L{smartrelay.feedback.report.readReport}).
    """

    runInThread: Callable[..., Deferred]
    workers: object = None
    readReport: Callable[[bytes], Report] = readReport

    def __call__(self, data: bytes) -> Deferred:
        if self.workers is not None and self.workers.available:
            d = self.workers.run(ReadReportJob(data))
            return d.addErrback(lambda failure: self._inThread(data))
        return self._inThread(data)

    def _inThread(self, data: bytes) -> Deferred:
        return self.runInThread(_safely, self.readReport, data)


def _recipientAt(known: Optional[_Message], index: Optional[int]) -> Optional[str]:
    if known is None or index is None or not 0 <= index < len(known.recipients):
        return None
    return known.recipients[index]


def _sameAddress(a: str, b: str) -> bool:
    return a.lower() == b.lower()


def _summary(p: Planned) -> str:
    detail = p.detail
    parts = [
        str(detail[key])
        for key in ("kind", "reason", "status", "feedback_type")
        if detail.get(key) is not None
    ]
    return (" (" + " ".join(parts) + ")") if parts else ""
