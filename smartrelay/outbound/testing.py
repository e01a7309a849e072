"""
In-memory fakes for testing the delivery side without sockets or disks:
a spool, an event log, a router, a connector with fake pooled sessions, and a scripted SMTP server
reachable through an endpoint that connects with L{twisted.test.iosim}.
"""

from typing import Any, Callable, Optional

import attrs
from twisted.internet.defer import Deferred, DeferredList, fail, maybeDeferred, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.protocols.basic import LineReceiver
from twisted.test import iosim
from zope.interface import implementer

from smartrelay.events import Event
from smartrelay.engine.downgrade import Offers
from smartrelay.message import Recipient, SpoolEntry
from smartrelay.outbound.interfaces import IConnector, IDeliverySession, IDeliverySpool, IEventSink
from smartrelay.outbound.router import Hop, IRouter
from smartrelay.outbound.session import AttemptResult, OpenResult, Reply

__all__ = [
    "Delays",
    "FakeSpool",
    "RecordingEvents",
    "FakeRouter",
    "FakeDeliverer",
    "FakeSession",
    "SMTPScript",
    "ScriptedSMTPServer",
    "ScriptedEndpoint",
    "makeEntry",
]


def makeEntry(
    queue_id: str,
    recipients: list,
    sender: str = "app@sender.example",
    received: float = 0.0,
    next_attempt: float = 0.0,
) -> SpoolEntry:
    """
    A L{SpoolEntry} whose recipients are all C{queued}.
    """
    return SpoolEntry(
        queue_id=queue_id,
        sender=sender,
        recipients=[Recipient(a, next_attempt=next_attempt) for a in recipients],
        received=received,
        size=0,
    )


@attrs.frozen
class Delays:
    """
    A retry schedule: C{delay(n)} is the n-th delay (1-based), the last one
    repeating (the convention of L{smartrelay.config.RetrySchedule}).
    """

    delays: tuple

    def delay(self, attempt: int) -> float:
        if attempt < 1:
            raise ValueError(f"attempts are numbered from 1, got {attempt!r}")
        return float(self.delays[min(attempt, len(self.delays)) - 1])


@implementer(IDeliverySpool)
@attrs.define
class FakeSpool:
    """
    The spool API of L{smartrelay.spool} in memory.

    @ivar messages: queue id → message bytes.
    @ivar records: every successful C{record} call as C{(queue_id, changes)}.
    @ivar failRecords: how many of the next C{record} calls fail.
    @ivar hold: when true, C{record} returns an unfired L{Deferred} kept in
        C{held} as C{(deferred, entry, changes)}; fire it with
        L{releaseRecord}.
    @ivar journal: shared list receiving C{("record", queue_id, address,
        state)} entries, to check ordering against events.
    """

    messages: dict = attrs.field(factory=dict)
    records: list = attrs.field(factory=list)
    failRecords: int = 0
    #: How many of the next C{recordMany} calls raise (the whole batch).
    failBulk: int = 0
    hold: bool = False
    held: list = attrs.field(factory=list)
    journal: list = attrs.field(factory=list)
    removed: list = attrs.field(factory=list)
    reads: list = attrs.field(factory=list)

    def add(self, entry: SpoolEntry, data: bytes = b"Subject: hi\r\n\r\nhello\r\n") -> SpoolEntry:
        self.messages[entry.queue_id] = data
        return entry

    def readMessage(self, entry: SpoolEntry) -> Deferred:
        self.reads.append(entry.queue_id)
        if entry.queue_id not in self.messages:
            return fail(FileNotFoundError(entry.queue_id))
        return succeed(self.messages[entry.queue_id])

    def record(self, entry: SpoolEntry, changes: list) -> Deferred:
        if self.failRecords:
            self.failRecords -= 1
            return fail(OSError("disk on fire"))
        if self.hold:
            d: Deferred = Deferred()
            self.held.append((d, entry, changes))
            return d
        self._apply(entry, changes)
        return succeed(None)

    def recordMany(self, batch: list) -> Deferred:
        """
        L{record} for each C{(entry, changes)}: one L{Deferred} firing with
        C{(ok, failure or None)} per message, as the spool's.
        """
        if self.failBulk:
            self.failBulk -= 1
            raise OSError("disk on fire")
        records = [maybeDeferred(self.record, entry, changes) for entry, changes in batch]
        return DeferredList(records, consumeErrors=True)

    def releaseRecord(self, index: int = 0) -> None:
        d, entry, changes = self.held.pop(index)
        self._apply(entry, changes)
        d.callback(None)

    def _apply(self, entry: SpoolEntry, changes: list) -> None:
        byAddress = {c.address: c for c in changes}
        entry.recipients[:] = [byAddress.get(r.address, r) for r in entry.recipients]
        self.records.append((entry.queue_id, list(changes)))
        for change in changes:
            self.journal.append(("record", entry.queue_id, change.address, change.state))
        if entry.done:
            self.removed.append(entry.queue_id)
            self.messages.pop(entry.queue_id, None)


@implementer(IEventSink)
@attrs.define
class RecordingEvents:
    """
    An event log that remembers what was emitted.
    """

    emitted: list = attrs.field(factory=list)
    journal: list = attrs.field(factory=list)

    def emit(self, type, queue_id, recipient=None, *, tag=None, metadata=None, detail=None):
        self.emitted.append((type, queue_id, recipient, detail or {}))
        self.journal.append(("emit", queue_id, recipient, type))
        return Event(
            type=type, queue_id=queue_id, recipient=recipient, time=0.0,
            tag=tag, metadata=metadata or {}, detail=detail or {},
        )

    def flushed(self) -> Deferred:
        return succeed(None)

    def ofType(self, type: str) -> list:
        return [e for e in self.emitted if e[0] == type]


@implementer(IRouter)
@attrs.define
class FakeRouter:
    """
    Routes from a table: domain → list of hop names, or an exception.
    Unknown domains go to C{default}, a smarthost (relay hops).
    """

    table: dict = attrs.field(factory=dict)
    default: list = attrs.field(factory=lambda: ["smarthost.test:25"])
    routed: list = attrs.field(factory=list)

    def route(self, domain: str) -> Deferred:
        self.routed.append(domain)
        value = self.table.get(domain, self.default)
        if isinstance(value, Exception):
            return fail(value)
        relay = domain not in self.table
        return succeed([Hop(name=name, endpoint=None, relay=relay) for name in value])


@attrs.define(eq=False)
class DeliveryCall:
    """
    One transaction on a L{FakeSession}; fire C{d} with an
    L{AttemptResult} (or use L{answer}).
    """

    session: "FakeSession"
    sender: str
    recipients: list
    data: bytes
    d: Deferred

    @property
    def hop(self) -> Hop:
        return self.session.hop

    def answer(
        self,
        code: int,
        text: str = "",
        status: Optional[str] = None,
        tls: bool = False,
        overrides: Optional[dict] = None,
        closing: bool = False,
        unanswered: bool = False,
    ) -> None:
        """
        Fire with the same reply for every recipient, except those in
        C{overrides} (address → L{Reply}).  C{closing} (implied by a 421)
        closes the session, as a server saying 421 does.
        """
        reply = Reply(code, status, text)
        overrides = overrides or {}
        results = {a: overrides.get(a, reply) for a in self.recipients}
        if closing or unanswered or code == 421:
            self.session.closeByServer()
        self.d.callback(
            AttemptResult(
                self.hop.name,
                tls,
                results,
                unanswered=unanswered,
                throttled=code == 421,
            )
        )


@implementer(IDeliverySession)
@attrs.define(eq=False)
class FakeSession:
    """
    A pooled session of a L{FakeDeliverer}: every L{send} is a
    L{DeliveryCall} for the test to answer.

    @ivar offers: what the fake server takes beyond 7-bit ASCII (by
        default nothing, as a server without C{8BITMIME} and C{SMTPUTF8}).
    """

    deliverer: "FakeDeliverer"
    hop: Hop
    tlsPolicy: str
    offers: Offers = attrs.field(factory=Offers)
    connected: bool = True
    busy: bool = False
    transactions: int = 0
    closed: Deferred = attrs.field(factory=Deferred)
    #: C{True}: a re-wrapping scheduler gives L{send} the L{RewrapJob
    #: <smartrelay.engine.rewrap.RewrapJob>} (as to a session in a worker
    #: process), which the test may run.
    rewrapsInPlace: bool = False

    @property
    def remote(self) -> str:
        return self.hop.name

    @property
    def usable(self) -> bool:
        return self.connected and not self.busy

    def send(self, sender: str, recipients: list, data: bytes) -> Deferred:
        if not self.usable:
            raise RuntimeError(f"{self!r} cannot take a transaction now")
        self.busy = True
        self.transactions += 1
        d: Deferred = Deferred(lambda d: self.deliverer.cancelled.append(call))
        call = DeliveryCall(self, sender, list(recipients), data, d)
        self.deliverer.calls.append(call)

        def idle(result):
            self.busy = False
            return result

        d.addBoth(idle)
        if self.deliverer.auto is not None:
            d.callback(self.deliverer.auto(call))
        return d

    def closeByServer(self) -> None:
        if self.connected:
            self.connected = False
            self.closed.callback(None)

    def quit(self) -> Deferred:
        if self.connected:
            self.deliverer.quits.append(self)
        self.closeByServer()
        return self.closed

    def abort(self) -> None:
        for call in self.deliverer.pending():
            if call.session is self:
                call.answer(451, "connection lost", "4.4.2")
        self.closeByServer()


@implementer(IConnector)
@attrs.define
class FakeDeliverer:
    """
    A connector (C{open(hop, tlsPolicy)}) whose sessions record their
    transactions; each returns an unfired L{Deferred} unless C{auto} is
    set (C{auto(call) -> AttemptResult}).

    @ivar refuse: hop name → L{Reply} for hops that cannot be connected to.
    @ivar hang: opening a session never completes (until fired by the test:
        see C{opening}).
    @ivar offers: what its sessions' server takes beyond 7-bit ASCII.
    @ivar rewrapsInPlace: its sessions take the re-wrap's job, as those
        in worker processes do.
    """

    calls: list = attrs.field(factory=list)
    auto: Optional[Callable] = None
    cancelled: list = attrs.field(factory=list)
    refuse: dict = attrs.field(factory=dict)
    hang: bool = False
    opens: list = attrs.field(factory=list)
    opening: list = attrs.field(factory=list)
    sessions: list = attrs.field(factory=list)
    quits: list = attrs.field(factory=list)
    offers: Offers = attrs.field(factory=Offers)
    rewrapsInPlace: bool = False

    def open(self, hop: Hop, tlsPolicy: str) -> Deferred:
        self.opens.append((hop.name, tlsPolicy))
        if hop.name in self.refuse:
            return succeed(OpenResult(None, self.refuse[hop.name], tryNextHop=True))
        session = FakeSession(
            self, hop, tlsPolicy, self.offers, rewrapsInPlace=self.rewrapsInPlace
        )
        if self.hang:
            d: Deferred = Deferred()
            self.opening.append((d, session))
            return d
        self.sessions.append(session)
        return succeed(OpenResult(session))

    def pending(self) -> list:
        return [c for c in self.calls if not c.d.called]

    def connected(self) -> list:
        """
        The sessions still open.
        """
        return [s for s in self.sessions if s.connected]


# -- a scripted SMTP server ---------------------------------------------------


@attrs.define
class SMTPScript:
    """
    What a L{ScriptedSMTPServer} answers.  Replies are full lines without
    CRLF; C{ehlo} is a list of lines.  C{rcpt} maps addresses to replies.
    With C{tlsContext} (for iosim: an object with C{iosimVerify(other)})
    STARTTLS is accepted and negotiated.
    """

    greeting: bytes = b"220 mx.test ESMTP scripted"
    closeAfterGreeting: bool = False
    ehlo: list = attrs.field(factory=lambda: [b"250-mx.test", b"250-SIZE 1000000", b"250 8BITMIME"])
    helo: bytes = b"250 mx.test"
    starttls: bytes = b"454 4.7.0 TLS not available"
    tlsContext: Any = None
    mail: bytes = b"250 2.1.0 sender ok"
    rcpt: dict = attrs.field(factory=dict)
    rcptDefault: bytes = b"250 2.1.5 recipient ok"
    data: bytes = b"354 go ahead"
    final: bytes = b"250 2.0.0 queued as 4711"
    dropMidData: bool = False
    silentAt: Optional[bytes] = None
    #: Close the connection, without a reply, on the n-th command with
    #: this verb: C{(b"RSET", 1)}.
    dropAt: Optional[tuple] = None


class ScriptedSMTPServer(LineReceiver):
    """
    An SMTP server that answers from an L{SMTPScript} and records what it
    got: C{commands} (every command line), C{dataLines} (DATA lines as
    sent, still dot-stuffed) and C{message} (the unstuffed message).
    """

    def __init__(self, script: SMTPScript) -> None:
        self.script = script
        self.commands: list = []
        self.dataLines: list = []
        self.message: Optional[bytes] = None
        self.inData = False
        self.silent = False
        self.accepted = 0

    def connectionMade(self) -> None:
        self.sendLine(self.script.greeting)
        if self.script.closeAfterGreeting:
            self.transport.loseConnection()

    def reply(self, *lines: bytes) -> None:
        if not self.silent:
            for line in lines:
                self.sendLine(line)

    def lineReceived(self, line: bytes) -> None:
        if self.inData:
            if line == b".":
                self.inData = False
                self.message = b"".join(
                    (l[1:] if l.startswith(b".") else l) + b"\r\n" for l in self.dataLines
                )
                self.reply(self.script.final)
                return
            self.dataLines.append(line)
            if self.script.dropMidData:
                self.transport.loseConnection()
            return
        self.commands.append(line)
        verb = line.split(b" ", 1)[0].split(b":", 1)[0].upper()
        if self.script.dropAt is not None and self.script.dropAt[0] == verb:
            seen = sum(1 for c in self.commands if c.upper().startswith(verb))
            if seen == self.script.dropAt[1]:
                self.transport.loseConnection()
                return
        if self.script.silentAt is not None and verb == self.script.silentAt:
            self.silent = True
        if verb == b"EHLO":
            self.reply(*self.script.ehlo)
        elif verb == b"HELO":
            self.reply(self.script.helo)
        elif verb == b"STARTTLS":
            if self.script.tlsContext is not None:
                self.reply(b"220 2.0.0 ready to start TLS")
                self.transport.startTLS(self.script.tlsContext)
            else:
                self.reply(self.script.starttls)
        elif verb == b"MAIL":
            self.reply(self.script.mail)
        elif verb == b"RCPT":
            address = line.split(b"<", 1)[-1].split(b">", 1)[0].decode()
            answer = self.script.rcpt.get(address, self.script.rcptDefault)
            self.accepted += answer.startswith(b"2")
            self.reply(answer)
        elif verb == b"DATA":
            if not self.accepted:
                self.reply(b"554 5.5.1 no valid recipients")
                return
            self.accepted = 0
            self.dataLines = []
            self.reply(self.script.data)
            self.inData = self.script.data.startswith(b"354") and not self.silent
        elif verb == b"QUIT":
            self.reply(b"221 2.0.0 bye")
            self.transport.loseConnection()
        elif verb == b"RSET":
            self.accepted = 0
            self.reply(b"250 2.0.0 ok")
        elif verb == b"NOOP":
            self.reply(b"250 2.0.0 ok")
        else:
            self.reply(b"500 5.5.1 unknown command")


@attrs.define
class ScriptedEndpoint:
    """
    A client endpoint whose connections reach a L{ScriptedSMTPServer} over
    an L{iosim} pump (call C{flush()}), or fail with C{failure}, or never
    complete when C{hang} is set.
    """

    script: SMTPScript = attrs.field(factory=SMTPScript)
    clock: Any = None
    failure: Optional[Exception] = None
    hang: bool = False
    servers: list = attrs.field(factory=list)
    pumps: list = attrs.field(factory=list)
    connecting: list = attrs.field(factory=list)

    def connect(self, factory: Any) -> Deferred:
        if self.failure is not None:
            return fail(self.failure)
        if self.hang:
            d: Deferred = Deferred()
            self.connecting.append(d)
            return d
        client = factory.buildProtocol(None)
        server = ScriptedSMTPServer(self.script)
        self.servers.append(server)
        pump = iosim.connect(
            server,
            iosim.makeFakeServer(server),
            client,
            iosim.makeFakeClient(client),
            greet=False,
            clock=self.clock,
        )
        self.pumps.append(pump)
        return succeed(client)

    def flush(self) -> None:
        for pump in self.pumps:
            pump.flush()

    @property
    def server(self) -> ScriptedSMTPServer:
        return self.servers[-1]


def refusingEndpoint() -> ScriptedEndpoint:
    return ScriptedEndpoint(failure=ConnectionRefusedError("refused"))
