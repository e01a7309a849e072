"""
A reusable outbound ESMTP session: one connection, many transactions.

L{openSession} connects to a L{Hop}, reads the greeting, says EHLO (HELO
when EHLO is refused), negotiates STARTTLS as the TLS policy asks, and
fires with an L{OpenResult}: a ready L{SMTPSession}, or the reply that
explains why there is none.  L{SMTPSession.send} then runs one mail
transaction and fires with an L{AttemptResult} (one L{Reply} per
recipient); the session can take the next transaction once the previous
one is over, which is what the connection pool in
L{smartrelay.outbound.pool} does.

The protocol is written for the delivery engine's hot path rather than on
top of L{twisted.mail.smtp.ESMTPClient}: replies are matched to commands
through a FIFO of handlers, which makes RFC 2920 pipelining (C{RSET},
C{MAIL}, every C{RCPT} and C{DATA} in one write) the same code as
lock-step operation.

SMTP answers and network trouble are results, never failures: a refused
connection, a timeout or a connection lost before the final reply give
every undecided recipient a synthetic temporary reply (C{451 4.4.1} /
C{451 4.4.2}).

TLS policies (L{TLSPolicy}): C{opportunistic} encrypts when the server
offers STARTTLS without checking its certificate (RFC 7435) and, if the
handshake fails, connects once more in the clear; C{required} defers the
mail rather than sending it in the clear; C{verify} also checks the
certificate against the host name (an MX host name, or a route's host).

8-bit content: L{SMTPSession.offers} says what the server takes beyond
7-bit ASCII.  A re-wrapped message arrives already made for it (a
L{Prepared}, downgraded and then DKIM-signed by the re-wrap engine) and is
sent byte for byte; a plain message (bytes, from a scheduler without a
re-wrap) is downgraded here where the server cannot take it.
"""

import re
from collections import deque
from typing import Any, Callable, Optional

import attrs
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.basic import FileSender
from twisted.python.failure import Failure
from zope.interface import implementer

from smartrelay.engine.downgrade import Offers, Prepared, prepare
from smartrelay.outbound.interfaces import IDeliverySession

__all__ = [
    "Reply",
    "AttemptResult",
    "TLSPolicy",
    "OpenResult",
    "SMTPSession",
    "openSession",
    "encodeData",
]

log = Logger()

#: After QUIT, wait at most this long for the server's answer.
QUIT_TIMEOUT = 10.0

#: Longest reply line and most lines in one reply we accept from a server.
MAX_REPLY_LINE = 4096
MAX_REPLY_LINES = 200

#: Messages bigger than this are streamed with a producer, resetting the
#: reply timeout as the data goes out.
STREAM_THRESHOLD = 256 * 1024

_STATUS = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?=\s|$)")


@attrs.frozen
class Reply:
    """
    One SMTP reply as it concerns one recipient.

    @ivar code: the three-digit reply code.
    @ivar status: the RFC 3463 enhanced status code (C{"5.1.1"}) if the
        reply carried one whose class matches C{code}, else L{None}.
    @ivar text: the reply text without the code and the enhanced status
        (multi-line replies joined with spaces).
    @ivar command: the SMTP command a refusal answered (C{"CONN"} for the
        greeting, C{"EHLO"}, C{"MAIL"}, C{"RCPT"}, C{"DATA"}), when the
        session knows it; the bounce classifier reads a "user unknown"
        differently at RCPT and after DATA.  Not part of equality.
    """

    code: int
    status: Optional[str]
    text: str
    command: Optional[str] = attrs.field(default=None, eq=False)

    @classmethod
    def fromResponse(cls, code: int, response: Any) -> "Reply":
        """
        Parse the text of a (possibly multi-line) reply: lines without
        their code, joined by newlines.
        """
        if isinstance(response, bytes):
            response = response.decode("utf-8", "replace")
        lines = [line.strip() for line in (response or "").split("\n")]
        status = None
        match = _STATUS.match(lines[0]) if lines else None
        if match and str(code)[:1] == match.group(1):
            status = match.group(0)
        if status:
            lines = [
                line[len(status) :].strip() if line.startswith(status) else line
                for line in lines
            ]
        return cls(code, status, " ".join(line for line in lines if line))

    @property
    def line(self) -> str:
        """
        The reply as one line: C{"550 5.1.1 user unknown"}.
        """
        return " ".join(str(p) for p in (self.code, self.status, self.text) if p)

    @property
    def positive(self) -> bool:
        return 200 <= self.code < 300

    @property
    def permanent(self) -> bool:
        return 500 <= self.code < 600

    @property
    def temporary(self) -> bool:
        return not (self.positive or self.permanent)


@attrs.frozen
class AttemptResult:
    """
    What came of one attempt.

    @ivar remote: the hop name.
    @ivar tls: whether the session (as far as it went) was encrypted.
    @ivar results: C{address → Reply} for every recipient of the attempt.
    @ivar tryNextHop: C{True} when no mail transaction was started (the
        connection, the greeting, EHLO/HELO or the TLS policy failed): the
        caller may try the same recipients at the next hop.
    @ivar unanswered: C{True} when a reused connection went away before
        the server answered anything of this transaction (a server closing
        an idle connection): the same transaction may be tried again on a
        fresh connection.
    @ivar throttled: C{True} when the server signalled that it is closing
        the session (a C{421} reply).
    """

    remote: str
    tls: bool
    results: dict
    tryNextHop: bool = False
    unanswered: bool = False
    throttled: bool = False


class TLSPolicy:
    """
    The names of the TLS policies (C{[delivery] tls}, C{[domain:...] tls}).
    """

    NONE = "none"
    OPPORTUNISTIC = "opportunistic"
    REQUIRED = "required"
    VERIFY = "verify"


def encodeData(data: bytes) -> bytes:
    """
    The DATA payload for a stored message: line ends normalised to CRLF,
    lines starting with C{.} dot-stuffed (RFC 5321 section 4.5.2), a final
    CRLF, and the terminating C{.CRLF}.
    """
    if b"\r" in data.replace(b"\r\n", b"") or b"\n" in data.replace(b"\r\n", b""):
        data = re.sub(rb"\r\n|\r|\n", b"\r\n", data)
    if data.startswith(b"."):
        data = b"." + data
    data = data.replace(b"\r\n.", b"\r\n..")
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data + b".\r\n"


def _protocolError(remote: str, reply: Reply) -> Reply:
    return Reply(451, "4.5.0", f"unexpected reply from {remote}: {reply.line}")


def _refusal(remote: str, reply: Reply, command: Optional[str] = None) -> Reply:
    """
    The reply for a command that did not get the answer it expected.
    Anything but a 4xx or 5xx there is a protocol error (temporary), so
    that an odd 2xx or 3xx is never taken for acceptance.

    @param command: the command refused (L{Reply.command}).
    """
    if 400 <= reply.code < 600:
        return attrs.evolve(reply, command=command) if command else reply
    return _protocolError(remote, reply)


@attrs.define
class _Transaction:
    """
    The state of one mail transaction on a session.
    """

    sender: str
    recipients: list
    payload: bytes
    done: Deferred
    replies: dict = attrs.field(factory=dict)
    accepted: list = attrs.field(factory=list)
    mailRefused: Optional[Reply] = None
    answered: bool = False
    throttled: bool = False
    pending: deque = attrs.field(factory=deque)


@implementer(IDeliverySession)
class SMTPSession(Protocol):
    """
    The client side of one ESMTP connection.

    @ivar ready: fires once with L{None} when the session is ready for
        L{send}, or with C{(Reply, tlsFailed)} explaining why it never
        will be.
    @ivar closed: fires with L{None} when the connection is gone.
    @ivar extensions: EHLO keywords (upper-case bytes) → parameters.
    @ivar tls: the session is encrypted.
    @ivar transactions: transactions started on this session.
    """

    #: The message is made for this session by the caller (L{send} takes
    #: bytes or a L{Prepared}).
    rewrapsInPlace = False

    def __init__(
        self,
        clock: IReactorTime,
        remote: str,
        heloName: str,
        timeout: float,
        tlsContext: Any = None,
        tlsRequired: bool = False,
    ) -> None:
        self.clock = clock
        self.remote = remote
        self.heloName = heloName.encode("ascii")
        self.timeout = timeout
        self.tlsContext = tlsContext
        self.tlsRequired = tlsRequired
        self.ready: Deferred = Deferred()
        self.closed: Deferred = Deferred()
        self.extensions: dict = {}
        self.tls = False
        self.transactions = 0
        self._handlers: deque = deque()
        self._buffer = b""
        self._lines: list = []
        self._lastLines: list = []
        self._timer: Any = None
        self._tlsStarted = False
        self._transaction: Optional[_Transaction] = None
        self._connected = False
        self._closing = False
        self._quitting = False
        self._needReset = False

    def __repr__(self) -> str:
        return f"<SMTPSession {self.remote} tls={self.tls} transactions={self.transactions}>"

    # -- state ------------------------------------------------------------

    @property
    def usable(self) -> bool:
        """
        The session is open, ready, and not in a transaction.
        """
        return (
            self._connected
            and self.ready.called
            and self._transaction is None
            and not self._closing
        )

    @property
    def pipelining(self) -> bool:
        return b"PIPELINING" in self.extensions

    @property
    def offers(self) -> Offers:
        """
        What the server takes beyond 7-bit ASCII (C{8BITMIME},
        C{SMTPUTF8}), from its EHLO answer: what a message for this
        session must be prepared for.
        """
        return Offers(
            eightBitMIME=b"8BITMIME" in self.extensions,
            smtpUTF8=b"SMTPUTF8" in self.extensions,
        )

    # -- the wire ---------------------------------------------------------

    def connectionMade(self) -> None:
        self._connected = True
        self._expect(self._greeting)

    def _write(self, commands: list, handlers: list) -> None:
        self.transport.write(b"".join(c + b"\r\n" for c in commands))
        self._handlers.extend(handlers)
        self._armTimer()

    def _expect(self, handler: Callable) -> None:
        self._handlers.append(handler)
        self._armTimer()

    def _armTimer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.reset(self._timeoutFor())
        else:
            self._timer = self.clock.callLater(self._timeoutFor(), self._timedOut)

    def _timeoutFor(self) -> float:
        if self._quitting:
            return min(self.timeout, QUIT_TIMEOUT)
        return self.timeout

    def _stopTimer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def dataReceived(self, data: bytes) -> None:
        buffer = self._buffer + data if self._buffer else data
        start = 0
        while True:
            end = buffer.find(b"\n", start)
            if end < 0:
                break
            line = buffer[start:end]
            start = end + 1
            if line.endswith(b"\r"):
                line = line[:-1]
            if not self._lineReceived(line):
                return
        self._buffer = buffer[start:]
        if len(self._buffer) > MAX_REPLY_LINE:
            self._garbled("a reply line longer than %d octets" % (MAX_REPLY_LINE,))

    def _lineReceived(self, line: bytes) -> bool:
        """
        Collect reply lines; dispatch complete replies.  Return C{False}
        once the connection is being dropped.
        """
        code = line[:3]
        separator = line[3:4]
        if len(line) > MAX_REPLY_LINE or not code.isdigit() or separator not in (b"", b" ", b"-"):
            self._garbled(f"a malformed reply line {line[:80]!r}")
            return False
        self._lines.append(line[4:])
        if separator == b"-":
            if len(self._lines) > MAX_REPLY_LINES:
                self._garbled("a reply of more than %d lines" % (MAX_REPLY_LINES,))
                return False
            return True
        reply = Reply.fromResponse(int(code), b"\n".join(self._lines))
        # The EHLO handler needs the raw lines (the keywords).
        self._lastLines, self._lines = self._lines, []
        if self._handlers:
            handler = self._handlers.popleft()
            if self._handlers:
                self._armTimer()
            else:
                self._stopTimer()
            handler(reply)
        else:
            self._unsolicited(reply)
        return self._connected and not (self._closing and not self._quitting)

    def _unsolicited(self, reply: Reply) -> None:
        """
        A reply nobody asked for: typically C{421} before a server drops an
        idle connection.
        """
        log.debug("unsolicited reply from {remote}: {reply}", remote=self.remote, reply=reply.line)
        self._closing = True
        if reply.code == 421:
            self.transport.loseConnection()
        else:
            self._abort()

    def _garbled(self, what: str) -> None:
        self._fail(Reply(451, "4.5.0", f"SMTP protocol error with {self.remote}: {what}"))
        self._abort()

    def _timedOut(self) -> None:
        self._timer = None
        if self._quitting:
            self._abort()
            return
        self._fail(
            Reply(
                451,
                "4.4.2",
                f"timeout: no response from {self.remote} within {self.timeout:g}s",
            )
        )
        self._abort()

    def abort(self) -> None:
        """
        Drop the connection now; a transaction in progress gets a
        temporary "connection lost" reply.
        """
        self._abort()

    def _abort(self) -> None:
        self._closing = True
        self._handlers.clear()
        self._stopTimer()
        if self.transport is not None:
            self.transport.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._connected = False
        self._closing = True
        self._handlers.clear()
        self._stopTimer()
        if self._tlsStarted and not self.tls:
            why = f"TLS session with {self.remote} failed"
        else:
            why = f"connection to {self.remote} lost"
        self._fail(Reply(451, "4.4.2", f"{why}: {reason.getErrorMessage()}"))
        self.closed.callback(None)

    # -- failing what is in progress ---------------------------------------

    def _fail(self, reply: Reply) -> None:
        """
        The session cannot go on: whatever waits on it gets C{reply}.
        """
        self._closing = True
        if not self.ready.called:
            tlsFailed = self._tlsStarted and not self.tls
            self.ready.callback((reply, tlsFailed))
        if self._transaction is not None:
            self._finish(reply)

    def _notReady(self, reply: Reply) -> None:
        """
        Greeting, EHLO/HELO, STARTTLS or the TLS policy failed: nothing was
        attempted.  Say goodbye politely.
        """
        self.ready.callback((reply, False))
        self.quit()

    # -- greeting, EHLO/HELO, STARTTLS ---------------------------------------

    def _greeting(self, reply: Reply) -> None:
        if reply.code != 220:
            self._notReady(_refusal(self.remote, reply, "CONN"))
            return
        self._ehlo()

    def _ehlo(self) -> None:
        self._write([b"EHLO " + self.heloName], [self._ehloAnswered])

    def _ehloAnswered(self, reply: Reply) -> None:
        if reply.code == 250:
            self.extensions = self._extensionsFrom(self._lastLines)
            if self._tlsStarted:
                self.tls = True
            self._afterHello()
        elif 500 <= reply.code < 600 and not self._tlsStarted and reply.code != 554:
            # Not an ESMTP server (or it does not like our EHLO): try HELO.
            self._write([b"HELO " + self.heloName], [self._heloAnswered])
        else:
            self._notReady(_refusal(self.remote, reply, "EHLO"))

    def _heloAnswered(self, reply: Reply) -> None:
        if reply.code == 250:
            self.extensions = {}
            self._afterHello()
        else:
            self._notReady(_refusal(self.remote, reply, "EHLO"))

    def _afterHello(self) -> None:
        if self.tls:
            self.ready.callback(None)
            return
        if self.tlsContext is not None and b"STARTTLS" in self.extensions:
            self._write([b"STARTTLS"], [self._startTLSAnswered])
            return
        if self.tlsRequired:
            self._notReady(
                Reply(
                    451,
                    "4.7.10",
                    f"{self.remote} does not offer STARTTLS and TLS is required",
                )
            )
            return
        self.ready.callback(None)

    def _startTLSAnswered(self, reply: Reply) -> None:
        if reply.code == 220:
            self._tlsStarted = True
            try:
                self.transport.startTLS(self.tlsContext)
            except Exception:
                log.failure("could not start TLS with {remote}", remote=self.remote)
                self._fail(Reply(451, "4.7.0", f"could not start TLS with {self.remote}"))
                self._abort()
                return
            self._ehlo()
        elif reply.code == 421 or self.tlsRequired:
            self._notReady(
                Reply(
                    reply.code if reply.code >= 400 else 451,
                    reply.status or "4.7.10",
                    f"{self.remote} refused STARTTLS and TLS is required: {reply.line}",
                )
                if reply.code != 421
                else reply
            )
        else:
            # Opportunistic: carry on in the clear.
            self.ready.callback(None)

    def _extensionsFrom(self, lines: list) -> dict:
        items = {}
        for line in lines[1:]:
            parts = line.split(None, 1)
            if parts:
                items[parts[0].upper()] = parts[1] if len(parts) > 1 else b""
        return items

    # -- the mail transaction ------------------------------------------------

    def send(self, sender: str, recipients: list, data: "bytes | Prepared") -> Deferred:
        """
        Run one mail transaction.

        @param sender: envelope sender; C{""} sends C{MAIL FROM:<>}.
        @param recipients: addresses (duplicates are sent once).
        @param data: the message (CRLF line ends, not dot-stuffed): a
            L{Prepared} made for this session's L{offers} is sent byte for
            byte; plain bytes are downgraded first where the server cannot
            take their 8-bit content.
        @return: L{Deferred} firing with an L{AttemptResult} covering every
            recipient; never failing.
        @raise RuntimeError: if the session is not L{usable}.
        @raise ValueError: if C{data} is a L{Prepared} for a server that
            offers more than this one (it would have to be altered).
        """
        if not self.usable:
            raise RuntimeError(f"{self!r} cannot take a transaction now")
        if isinstance(data, Prepared) and not data.fits(self.offers):
            raise ValueError(
                f"a message prepared for a server offering 8BITMIME={data.eightBitMIME} "
                f"SMTPUTF8={data.smtpUTF8} cannot go to {self.remote}, which does not"
            )
        recipients = list(dict.fromkeys(recipients))
        done: Deferred = Deferred(canceller=self._cancelTransaction)
        params, data = self._prepare(data)
        transaction = _Transaction(sender, recipients, data, done)
        self._transaction = transaction
        reused = self.transactions > 0
        self.transactions += 1
        mail = b"MAIL FROM:<" + sender.encode("utf-8") + b">" + params
        rcpts = [b"RCPT TO:<" + a.encode("utf-8") + b">" for a in recipients]
        commands, handlers = [], []
        if reused or self._needReset:
            commands.append(b"RSET")
            handlers.append(self._resetAnswered)
        if self.pipelining:
            commands += [mail, *rcpts, b"DATA"]
            handlers += [self._mailAnswered]
            handlers += [self._rcptHandler(a, pipelined=True) for a in recipients]
            handlers.append(self._dataAnswered)
        else:
            commands.append(mail)
            handlers.append(self._mailAnswered)
            transaction.pending.extend(zip(recipients, rcpts))
        self._write(commands, handlers)
        return done

    def _cancelTransaction(self, done: Deferred) -> None:
        self._transaction = None
        self._abort()

    def _prepare(self, data: "bytes | Prepared") -> tuple:
        """
        MAIL parameters, and the payload: a L{Prepared} message as it is,
        plain bytes downgraded to 7 bits where the server cannot take what
        they contain (on the reactor thread: only for messages sent
        without a re-wrap).
        """
        prepared = data if isinstance(data, Prepared) else prepare(data, self.offers)
        params = b""
        if b"SIZE" in self.extensions:
            params += b" SIZE=%d" % (len(prepared.data),)
        if prepared.eightBitMIME:
            params += b" BODY=8BITMIME"
        if prepared.smtpUTF8:
            params += b" SMTPUTF8"
        return params, encodeData(prepared.data)

    def _resetAnswered(self, reply: Reply) -> None:
        transaction = self._transaction
        if transaction is None:
            return
        transaction.answered = True
        if reply.code == 421:
            self._serverClosing(reply)
        elif reply.code != 250 and not self.pipelining:
            self._finish(_refusal(self.remote, reply))
            self.quit()
        else:
            self._needReset = False

    def _serverClosing(self, reply: Reply) -> None:
        """
        A 421: the server is closing the session; nobody else gets in.
        """
        transaction = self._transaction
        if transaction is not None:
            transaction.throttled = True
        self._closing = True
        self._handlers.clear()
        self._finish(reply)
        self.quit()

    def _mailAnswered(self, reply: Reply) -> None:
        transaction = self._transaction
        transaction.answered = True
        if reply.code == 421:
            self._serverClosing(reply)
            return
        if not reply.positive:
            transaction.mailRefused = _refusal(self.remote, reply, "MAIL")
            if not self.pipelining:
                self._needReset = True
                self._finish(transaction.mailRefused)
            return
        if not self.pipelining:
            self._nextRecipient()

    def _rcptHandler(self, address: str, pipelined: bool) -> Callable:
        def answered(reply: Reply) -> None:
            transaction = self._transaction
            if reply.code == 421:
                transaction.replies.setdefault(address, reply)
                self._serverClosing(reply)
                return
            if transaction.mailRefused is None:
                if reply.positive:
                    transaction.accepted.append(address)
                else:
                    transaction.replies[address] = _refusal(self.remote, reply, "RCPT")
            if not pipelined:
                self._nextRecipient()

        return answered

    def _nextRecipient(self) -> None:
        transaction = self._transaction
        if transaction.pending:
            address, command = transaction.pending.popleft()
            self._write([command], [self._rcptHandler(address, pipelined=False)])
        elif transaction.accepted:
            self._write([b"DATA"], [self._dataAnswered])
        else:
            self._needReset = True
            self._finish(None)

    def _dataAnswered(self, reply: Reply) -> None:
        transaction = self._transaction
        if reply.code == 421:
            self._serverClosing(reply)
            return
        if reply.code != 354:
            self._needReset = True
            if transaction.mailRefused is not None:
                self._finish(transaction.mailRefused)
            else:
                self._finish(_refusal(self.remote, reply, "DATA"))
            return
        if transaction.mailRefused is not None or not transaction.accepted:
            # A pipelining server said 354 although nobody was accepted:
            # end DATA at once, and forget whatever it says about it.
            self._write([b"."], [self._emptyDataAnswered])
            return
        self._handlers.append(self._finalAnswered)
        payload = transaction.payload
        if len(payload) <= STREAM_THRESHOLD:
            self.transport.write(payload)
            self._armTimer()
        else:
            from io import BytesIO

            self._armTimer()
            sending = FileSender().beginFileTransfer(BytesIO(payload), self.transport, self._progress)
            sending.addErrback(lambda f: None)  # connectionLost reports it

    def _progress(self, chunk: bytes) -> bytes:
        self._armTimer()
        return chunk

    def _emptyDataAnswered(self, reply: Reply) -> None:
        transaction = self._transaction
        self._needReset = True
        self._finish(transaction.mailRefused or Reply(554, "5.5.1", "no valid recipients"))

    def _finalAnswered(self, reply: Reply) -> None:
        if reply.code == 421:
            self._serverClosing(reply)
            return
        if reply.positive:
            self._finish(reply)
        elif 400 <= reply.code < 600:
            self._finish(attrs.evolve(reply, command="DATA"))
        else:
            self._needReset = True
            self._finish(_protocolError(self.remote, reply))

    def _finish(self, reply: Optional[Reply]) -> None:
        """
        End the transaction: every recipient without a reply yet gets
        C{reply} (the accepted ones included).
        """
        transaction = self._transaction
        if transaction is None:
            return
        self._transaction = None
        results = {}
        for address in transaction.recipients:
            own = transaction.replies.get(address)
            results[address] = own if own is not None else reply
        unanswered = (
            not transaction.answered and self.transactions > 1 and not self._connected
        )
        transaction.done.callback(
            AttemptResult(
                remote=self.remote,
                tls=self.tls,
                results=results,
                unanswered=unanswered,
                throttled=transaction.throttled,
            )
        )

    # -- the end ---------------------------------------------------------------

    def quit(self) -> Deferred:
        """
        Say QUIT and close (abort if the server does not answer within
        L{QUIT_TIMEOUT}).  Safe to call more than once.

        @return: L{closed}.
        """
        if self._connected and not self._quitting:
            self._quitting = True
            self._closing = True
            self._handlers.clear()
            try:
                self._write([b"QUIT"], [lambda reply: self.transport.loseConnection()])
            except Exception:
                self._abort()
        return self.closed


class _SessionFactory(Factory):
    noisy = False

    def __init__(self, build: Callable[[], SMTPSession]) -> None:
        self._build = build

    def buildProtocol(self, addr: Any) -> SMTPSession:
        protocol = self._build()
        protocol.factory = self
        return protocol


@attrs.frozen
class OpenResult:
    """
    What came of opening a session.

    @ivar session: a ready L{SMTPSession}, or L{None}.
    @ivar reply: why there is no session (a temporary or permanent reply
        for every recipient that would have used it).
    @ivar tryNextHop: the failure is about this hop only.
    """

    session: Optional[SMTPSession]
    reply: Optional[Reply] = None
    tryNextHop: bool = True


def _openOnce(
    clock: IReactorTime,
    hop: Any,
    heloName: str,
    timeout: float,
    tlsContext: Any,
    tlsRequired: bool,
) -> Deferred:
    """
    Connect and get to the point of sending MAIL; fires with
    C{(OpenResult, tlsFailed)}.
    """
    state: dict = {}

    def cancel(d: Deferred) -> None:
        connecting.cancel()
        protocol = state.get("protocol")
        if protocol is not None and protocol.transport is not None:
            protocol.transport.abortConnection()

    finished: Deferred = Deferred(canceller=cancel)

    def report(value: Any) -> None:
        if not finished.called:
            finished.callback(value)

    def build() -> SMTPSession:
        return SMTPSession(clock, hop.name, heloName, timeout, tlsContext, tlsRequired)

    connecting = hop.endpoint.connect(_SessionFactory(build))
    connecting.addTimeout(timeout, clock)

    def connected(protocol: SMTPSession) -> None:
        state["protocol"] = protocol

        def isReady(outcome: Any) -> None:
            if outcome is None:
                report((OpenResult(protocol), False))
            else:
                reply, tlsFailed = outcome
                report((OpenResult(None, reply), tlsFailed))

        protocol.ready.addCallback(isReady)

    def connectFailed(failure: Failure) -> None:
        if finished.called:
            return
        why = failure.getErrorMessage() or failure.type.__name__
        if failure.check(TimeoutError, CancelledError):
            why = f"connection attempt timed out after {timeout:g}s"
        report((OpenResult(None, Reply(451, "4.4.1", f"cannot connect to {hop.name}: {why}")), False))

    connecting.addCallbacks(connected, connectFailed)
    connecting.addErrback(
        lambda f: log.failure("unexpected error connecting to {remote}", f, remote=hop.name)
    )
    return finished


def openSession(
    clock: IReactorTime,
    hop: Any,
    heloName: str,
    timeout: float,
    tlsPolicy: str = TLSPolicy.NONE,
    tlsContext: Any = None,
) -> Deferred:
    """
    Connect to C{hop} and make a session ready for transactions.

    @param clock: for timeouts (connecting is the hop endpoint's business).
    @param timeout: seconds to wait for the connection and for each reply.
    @param tlsPolicy: one of the L{TLSPolicy} names.
    @param tlsContext: the client TLS context for STARTTLS (ignored with
        L{TLSPolicy.NONE}).  With L{TLSPolicy.OPPORTUNISTIC} a failed
        handshake is followed by one more connection in the clear.
    @return: L{Deferred} firing with an L{OpenResult}; cancelling it
        aborts the connection.
    """
    if tlsPolicy == TLSPolicy.NONE:
        tlsContext = None
    required = tlsPolicy in (TLSPolicy.REQUIRED, TLSPolicy.VERIFY)
    current: dict = {}

    def cancel(d: Deferred) -> None:
        attempt = current.get("attempt")
        if attempt is not None:
            attempt.cancel()

    result: Deferred = Deferred(canceller=cancel)

    def first(outcome: tuple) -> None:
        opened, tlsFailed = outcome
        if tlsFailed and not required:
            log.info("TLS with {remote} failed; retrying without TLS", remote=hop.name)
            current["attempt"] = _openOnce(clock, hop, heloName, timeout, None, False)
            current["attempt"].addCallbacks(
                lambda outcome: result.callback(outcome[0]), _cancelled
            )
            return
        if tlsFailed:
            reply = opened.reply
            opened = OpenResult(
                None,
                Reply(451, "4.7.5", f"{reply.text} (TLS is required, so not trying in the clear)"),
            )
        result.callback(opened)

    def _cancelled(failure: Failure) -> None:
        failure.trap(CancelledError)

    current["attempt"] = _openOnce(clock, hop, heloName, timeout, tlsContext, required)
    current["attempt"].addCallbacks(first, _cancelled)
    return result
