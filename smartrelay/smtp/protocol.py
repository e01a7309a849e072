# -*- test-case-name: tests.test_smtp_protocol -*-
"""
The hardened ESMTP server protocol.

L{HardenedESMTP} is C{twisted.mail.smtp.ESMTP} with the holes a security
review found in the stock server closed:

* commands are executed strictly one at a time: while a command waits for
  the policy (a Deferred), nothing after it in the input is looked at, so
  PIPELINING cannot reorder anything;
* the plaintext that follows C{STARTTLS} in the same packet is discarded,
  never answered inside TLS, and the session starts over (RFC 3207);
* an over-long line inside DATA does not drop the server back into
  command mode: the rest of DATA is consumed and only then answered with
  C{500 5.5.2}, so nothing after the long line is ever run as a command;
* only C{<CRLF>.<CRLF>} ends DATA; bare CR and bare LF are normalised to
  CRLF in what is stored, NUL is refused with C{554 5.6.0};
* a per-command inactivity timeout and a timeout for the whole DATA phase
  cut slow-loris clients off;
* too many bad commands or failed AUTH attempts end the session; the
  policy may also refuse AUTH for a while to a client that keeps failing
  (C{454 4.7.0}, then C{421 4.7.0} and the connection is closed).

When the relay stops, L{HardenedESMTP.shutDown} ends each session at its
next command with C{421 4.3.2}: a message being received is read to its
end and answered (its C{250} only once it is stored) first, so no client
loses a message it had nearly sent, and none gets a C{250} for one that is
not stored.

The protocol parses bytes and asks an L{ISubmissionPolicy} for every
decision; the policy answers with values or raises L{SMTPReply}.
"""

import base64
import binascii
import ipaddress
import re
from functools import lru_cache
from typing import Optional

import attrs
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.internet.interfaces import ITLSTransport
from twisted.logger import Logger
from twisted.mail import smtp
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface

from smartrelay.smtp.replies import (
    LINE_TOO_LONG,
    MESSAGE_TOO_BIG,
    NUL_IN_DATA,
    STORAGE_TROUBLE,
    SMTPReply,
    reply,
)

COMMAND, DATA, AUTH = "COMMAND", "DATA", "AUTH"

#: RFC 5321 4.1.2 Local-part: Dot-string or Quoted-string.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
MAILBOX_LOCAL_PART = re.compile(
    r'^(?:%s(?:\.%s)*|"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*")\Z' % (_ATEXT, _ATEXT)
)

#: RFC 5321 4.5.3.1.4 allows 512 octets; ESMTP parameters add to that.
MAX_COMMAND_LINE = 2048
#: RFC 5321 4.5.3.1: local part and domain lengths.
MAX_LOCAL_PART = 64
MAX_DOMAIN = 255
MAX_PATH = 256
MAX_ERRORS = 20
MAX_AUTH_FAILURES = 3
#: How much input may wait, unprocessed, while a command is pending.
MAX_PENDING_INPUT = 256 * 1024


@attrs.define
class Session:
    """
    What the policy may know about one SMTP connection.
    """

    peer: str
    loopback: bool
    helo: Optional[str] = None
    esmtp: bool = False
    tls: bool = False
    user: Optional[str] = None
    #: The policy's cached verdict on the client address (None: not asked).
    allowedClient: Optional[bool] = None
    #: How many AUTH attempts the policy refused without trying them.
    authRefused: int = 0


class ISubmissionPolicy(Interface):
    """
    Every decision of an SMTP session.  Methods may return a value or a
    Deferred and may raise (or fail with) L{SMTPReply}.
    """

    authAvailable = Attribute("True if SMTP AUTH is configured")

    def connectionMade(session):
        """
        A client connected; raise L{SMTPReply} (421) to refuse it.
        """

    def connectionLost(session):
        """
        The client is gone (called once per accepted connection).
        """

    def checkAuth(session):
        """
        The AUTH command, before its exchange: raise L{SMTPReply} to refuse
        it (C{454}, or C{421} to close the connection).
        """

    def authenticate(session, username, password):
        """
        Check credentials; fire with the user name or fail with L{SMTPReply}
        (C{535} for wrong credentials; C{454} or C{421} for an attempt
        refused without checking).  The Deferred may be cancelled when the
        connection is lost.
        """

    def checkSender(session, sender, size):
        """
        MAIL FROM; C{sender} is C{""} for the null reverse path, C{size} the
        SIZE parameter or None.
        """

    def checkRecipient(session, sender, recipient, accepted):
        """
        RCPT TO; C{accepted} is how many recipients were already accepted.
        """

    def messageReceived(session, sender, recipients, data):
        """
        End of DATA: fire with the queue id once the message is durable.
        """

    def messageRejected(session, sender, recipients, reply):
        """
        DATA was refused by the protocol (too big, long line, NUL...).
        """


def _addressParts(address: str) -> tuple:
    local, at, domain = address.rpartition("@")
    return (local, domain) if at else (address, "")


def checkAddressLengths(address: str, what: str) -> None:
    """
    RFC 5321 4.5.3.1 size limits.

    @raise SMTPReply: 501 5.1.3 (MAIL) / 553 5.1.3 (RCPT).
    """
    local, domain = _addressParts(address)
    code = 501 if what == "sender" else 553
    if len(local) > MAX_LOCAL_PART:
        raise reply(
            code, "5.1.3", f"The {what}'s local part is longer than 64 octets"
        )
    if len(domain) > MAX_DOMAIN:
        raise reply(code, "5.1.3", f"The {what}'s domain is longer than 255 octets")
    if len(address) + 2 > MAX_PATH:
        raise reply(code, "5.1.3", f"The {what} address is longer than 256 octets")


def normaliseLine(line: bytes) -> bytes:
    """
    Turn every bare CR and bare LF inside a line into CRLF.
    """
    return line.replace(b"\r", b"\n").replace(b"\n", b"\r\n")


class HardenedESMTP(smtp.ESMTP):
    """
    The submission server protocol.  See the module docstring.

    @ivar policy: the L{ISubmissionPolicy} deciding everything.
    @ivar clock: an C{IReactorTime} for every timeout.
    """

    log = Logger()
    noisy = False

    def __init__(
        self,
        policy,
        clock,
        hostname: str,
        maxMessageSize: int,
        maxLineLength: int = 998,
        commandTimeout: float = 300.0,
        dataTimeout: float = 600.0,
        tlsContext=None,
    ):
        smtp.ESMTP.__init__(self, contextFactory=tlsContext)
        self.policy = policy
        self.clock = clock
        self.callLater = clock.callLater
        self.host = hostname.encode("ascii")
        self.timeout = commandTimeout
        self.dataTimeout = dataTimeout
        self.maxMessageSize = maxMessageSize
        self.maxLineLength = maxLineLength
        self.session: Optional[Session] = None
        self._buffer = b""
        self._blocked = False
        self._paused = False
        self._skipLine = False
        self._admitted = False
        self._errors = 0
        self._authFailures = 0
        self._pendingAuth: Optional[Deferred] = None
        self._shuttingDown = False
        self._connected = False
        self._doneWaiters: list = []
        self._resetTransaction()

    # -- connection --------------------------------------------------------

    def connectionMade(self):
        self._connected = True
        peer = self.transport.getPeer()
        host = getattr(peer, "host", str(peer))
        self.session = Session(peer=host, loopback=_isLoopback(host))
        # Replies are small and the client waits for each one: never let
        # Nagle's algorithm hold one back.
        setNoDelay = getattr(self.transport, "setTcpNoDelay", None)
        if setNoDelay is not None:
            setNoDelay(True)
        self.canStartTLS = (
            ITLSTransport.providedBy(self.transport) and self.ctx is not None
        )
        try:
            self.policy.connectionMade(self.session)
        except SMTPReply as refusal:
            self._send(refusal)
            self.transport.loseConnection()
            return
        self._admitted = True
        self.transport.write(b"220 %s ESMTP smartrelay\r\n" % (self.host,))
        self.setTimeout(self.timeout)

    def connectionLost(self, reason):
        self._connected = False
        self.setTimeout(None)
        self._cancelDataTimer()
        if self._pendingAuth is not None:
            # Nobody is left to answer (the policy may be delaying a 535).
            self._pendingAuth.cancel()
        if self._admitted:
            self._admitted = False
            self.policy.connectionLost(self.session)
        self._checkDone()

    def shutDown(self) -> Deferred:
        """
        End the session for a stopping relay: at once with C{421 4.3.2}
        between commands, or, if a message is being received or a command
        waits for the policy (the store of a message, say), once that is
        answered.  Nothing the client sent after it is run.

        @return: a L{Deferred} firing once the connection is closed and
            nothing waits for the policy any more (also when the connection
            is aborted meanwhile).
        """
        self._shuttingDown = True
        done: Deferred = Deferred()
        self._doneWaiters.append(done)
        if self._connected:
            self._process()
        self._checkDone()
        return done

    def _checkDone(self) -> None:
        if not self._connected and not self._blocked:
            ended = getattr(self.factory, "sessionEnded", None)
            if ended is not None:
                ended(self)
            waiters, self._doneWaiters = self._doneWaiters, []
            for d in waiters:
                d.callback(None)

    def timeoutConnection(self):
        self._sendCode(421, "4.4.2", self.host.decode("ascii") + " Timeout, closing connection")
        self.transport.loseConnection()

    # -- input -------------------------------------------------------------

    def dataReceived(self, data):
        self._buffer += data
        self._process()

    def _process(self):
        while not self._blocked and not self.transport.disconnecting:
            if self.mode == DATA:
                if not self._processData():
                    break
                continue
            if self._shuttingDown:
                self._sendCode(
                    421,
                    "4.3.2",
                    self.host.decode("ascii") + " Service shutting down, closing connection",
                )
                self.transport.loseConnection()
                break
            index = self._buffer.find(b"\n")
            if index < 0:
                if len(self._buffer) > MAX_COMMAND_LINE:
                    self._buffer = b""
                    self._skipLine = True
                    self._error(reply(500, "5.5.2", "Command line too long"))
                break
            line = self._buffer[:index]
            self._buffer = self._buffer[index + 1 :]
            if self._skipLine:
                self._skipLine = False
                continue
            if line.endswith(b"\r"):
                line = line[:-1]
            self.resetTimeout()
            if len(line) > MAX_COMMAND_LINE:
                self._error(reply(500, "5.5.2", "Command line too long"))
                continue
            result = self._dispatch(line)
            if isinstance(result, Deferred):
                self._block(result)
        self._applyBackpressure()

    def _block(self, d: Deferred) -> None:
        """
        Stop looking at input until C{d} fires.
        """
        self._blocked = True

        def unblock(result):
            self._blocked = False
            if self._connected and not self.transport.disconnecting:
                self._process()
            self._checkDone()
            return result

        d.addBoth(unblock)
        d.addErrback(
            lambda f: self.log.failure("unhandled failure in SMTP session", f)
        )

    def _applyBackpressure(self) -> None:
        """
        Stop reading from a client that keeps sending while we are busy.
        """
        wantPause = self._blocked and len(self._buffer) > MAX_PENDING_INPUT
        if wantPause and not self._paused:
            self._paused = True
            self.transport.pauseProducing()
        elif self._paused and not wantPause:
            self._paused = False
            self.transport.resumeProducing()

    def _dispatch(self, line: bytes):
        if self.mode == AUTH:
            return self._authResponse(line)
        parts = line.strip().split(None, 1)
        if not parts:
            return self._error(reply(500, "5.5.2", "Empty command"))
        verb = parts[0].upper()
        argument = parts[1] if len(parts) == 2 else b""
        handler = self._commands.get(verb)
        if handler is None:
            return self._error(
                reply(500, "5.5.1", "Command not recognised: %s" % _printable(verb))
            )
        try:
            return handler(self, argument)
        except SMTPReply as answer:
            return self._error(answer)

    # -- replies -----------------------------------------------------------

    def _sendCode(self, code: int, status: Optional[str], text: str) -> None:
        prefix = "" if status is None else status + " "
        texts = text.split("\n")
        lines = [
            ("%03d%s%s%s" % (code, "-" if i < len(texts) - 1 else " ", prefix, t)).encode(
                "utf-8", "replace"
            )
            for i, t in enumerate(texts)
        ]
        self.transport.write(b"\r\n".join(lines) + b"\r\n")

    def _send(self, answer: SMTPReply) -> None:
        self.transport.write(b"\r\n".join(answer.lines()) + b"\r\n")

    def _error(self, answer: SMTPReply) -> None:
        """
        Answer a refused command; too many of them end the session.
        """
        self._send(answer)
        if answer.code >= 500 or answer.code in (421,):
            self._errors += 1
        if answer.code == 421:
            self.transport.loseConnection()
        elif self._errors >= MAX_ERRORS:
            self._sendCode(421, "4.7.0", "Too many errors, closing connection")
            self.transport.loseConnection()

    def _replyFor(self, failure: Failure, what: str) -> None:
        """
        The one place where a failed decision becomes an SMTP reply.
        """
        if failure.check(SMTPReply):
            self._error(failure.value)
        else:
            self.log.failure("error while handling {what}", failure, what=what)
            self._send(reply(451, "4.3.0", "Local error in processing, try again later"))

    # -- commands ----------------------------------------------------------

    def _resetTransaction(self) -> None:
        self._sender: Optional[str] = None
        self._recipients: list = []

    def do_HELO(self, argument: bytes, esmtp: bool = False):
        helo = argument.strip().decode("ascii", "replace")
        if not helo or len(helo) > 255 or " " in helo:
            raise reply(501, "5.5.4", "HELO/EHLO needs your host name")
        self.session.helo = helo
        self.session.esmtp = esmtp
        self._resetTransaction()
        greeting = "%s Hello %s [%s]" % (self.host.decode("ascii"), helo, self.session.peer)
        if not esmtp:
            self._sendCode(250, None, greeting)
            return
        self._sendCode(250, None, "\n".join([greeting] + self._extensions()))

    def do_EHLO(self, argument: bytes):
        return self.do_HELO(argument, esmtp=True)

    def _extensions(self) -> list:
        ext = [
            "PIPELINING",
            "SIZE %d" % (self.maxMessageSize,),
            "8BITMIME",
            "ENHANCEDSTATUSCODES",
        ]
        if self.canStartTLS and not self.session.tls:
            ext.append("STARTTLS")
        if self._authAllowedNow():
            ext.append("AUTH PLAIN LOGIN")
        return ext

    def _authAllowedNow(self) -> bool:
        return (
            self.policy.authAvailable
            and self.session.user is None
            and (self.session.tls or self.session.loopback)
        )

    def do_NOOP(self, argument: bytes):
        self._sendCode(250, "2.0.0", "OK")

    def do_RSET(self, argument: bytes):
        self._resetTransaction()
        self._sendCode(250, "2.0.0", "OK")

    def do_VRFY(self, argument: bytes):
        self._sendCode(252, "2.5.0", "Cannot VRFY user, but will accept the message")

    def do_HELP(self, argument: bytes):
        self._sendCode(
            214,
            "2.0.0",
            "Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT STARTTLS AUTH VRFY HELP",
        )

    def do_QUIT(self, argument: bytes):
        self._sendCode(221, "2.0.0", "Bye")
        self.transport.loseConnection()

    def _needHelo(self) -> None:
        if self.session.helo is None:
            raise reply(503, "5.5.1", "Send HELO or EHLO first")

    def do_STARTTLS(self, argument: bytes):
        if self.session.tls:
            raise reply(503, "5.5.1", "TLS already active")
        if not self.canStartTLS:
            raise reply(454, "4.7.0", "TLS not available")
        if argument.strip():
            raise reply(501, "5.5.4", "STARTTLS takes no arguments")
        self._sendCode(220, "2.0.0", "Ready to start TLS")
        # RFC 3207 section 4.2 and the STARTTLS command-injection hole:
        # anything the client sent after STARTTLS in plaintext is discarded,
        # and the session starts over.
        self._buffer = b""
        self._skipLine = False
        self.transport.startTLS(self.ctx)
        self.session.tls = True
        self.session.helo = None
        self.session.esmtp = False
        self.session.user = None
        self._resetTransaction()

    def do_AUTH(self, argument: bytes):
        self._needHelo()
        if self.session.user is not None:
            raise reply(503, "5.5.1", "Already authenticated")
        if self._sender is not None:
            raise reply(503, "5.5.1", "AUTH not allowed during a mail transaction")
        if not self.policy.authAvailable:
            raise reply(502, "5.5.1", "AUTH not available")
        if not (self.session.tls or self.session.loopback):
            raise reply(
                538, "5.7.11", "Encryption required for requested authentication mechanism"
            )
        self.policy.checkAuth(self.session)
        parts = argument.split(None, 1)
        mechanism = parts[0].upper() if parts else b""
        initial = parts[1] if len(parts) == 2 else None
        if mechanism == b"PLAIN":
            self._auth = _PlainExchange()
        elif mechanism == b"LOGIN":
            self._auth = _LoginExchange()
        else:
            raise reply(504, "5.5.4", "Unrecognised authentication mechanism")
        self.mode = AUTH
        if initial is None:
            self._sendCode(334, None, base64.b64encode(self._auth.challenge()).decode())
            return None
        return self._authResponse(initial)

    def _authResponse(self, line: bytes):
        exchange = self._auth
        if line.strip() == b"*":
            self.mode = COMMAND
            return self._error(reply(501, "5.7.0", "Authentication cancelled"))
        try:
            decoded = base64.b64decode(line.strip() if line.strip() != b"=" else b"", validate=True)
            exchange.respond(decoded)
        except (binascii.Error, ValueError):
            self.mode = COMMAND
            return self._error(reply(501, "5.5.2", "Cannot decode the AUTH response"))
        if not exchange.done:
            self._sendCode(334, None, base64.b64encode(exchange.challenge()).decode())
            return None
        self.mode = COMMAND
        d = maybeDeferred(
            self.policy.authenticate, self.session, exchange.username, exchange.password
        )

        self._pendingAuth = d

        def succeeded(user):
            self._pendingAuth = None
            self.session.user = user
            self._sendCode(235, "2.7.0", "Authentication successful")

        def failed(failure):
            self._pendingAuth = None
            if failure.check(CancelledError):
                return  # the connection is gone
            if failure.check(SMTPReply) and failure.value.code >= 500:
                self._authFailures += 1
                if self._authFailures >= MAX_AUTH_FAILURES:
                    self._send(failure.value)
                    self._sendCode(421, "4.7.0", "Too many failed authentications")
                    self.transport.loseConnection()
                    return
            self._replyFor(failure, "AUTH")

        return d.addCallbacks(succeeded, failed)

    def do_MAIL(self, argument: bytes):
        self._needHelo()
        if self._sender is not None:
            raise reply(503, "5.5.1", "Nested MAIL command")
        match = self.mail_re.match(argument)
        if match is None:
            raise reply(501, "5.5.4", "Syntax: MAIL FROM:<address>")
        sender = self._parsePath(match.group("path"), "sender")
        size = self._mailParameters(match.group("opts"))

        def accepted(_):
            self._sender = sender
            self._recipients = []
            self.transport.write(b"250 2.1.0 Sender OK\r\n")

        return self._ask("MAIL", accepted, self.policy.checkSender, self.session, sender, size)

    def _ask(self, what: str, accepted, decide, *args):
        """
        Ask the policy (C{decide(*args)}) and call C{accepted} with its
        answer, at once if it answers at once (the usual case, without
        Deferred overhead), else when its Deferred fires (the caller then
        returns that Deferred, which blocks further input).  Refusals become
        replies through L{_replyFor}.
        """
        try:
            answer = decide(*args)
        except Exception:
            self._replyFor(Failure(), what)
            return None
        if isinstance(answer, Deferred):
            return answer.addCallbacks(accepted, self._replyFor, errbackArgs=(what,))
        accepted(answer)
        return None

    def _parsePath(self, path: bytes, what: str) -> str:
        path = path.strip()
        if path.startswith(b"<") and path.endswith(b">"):
            path = path[1:-1]
        if b":" in path and path.startswith(b"@"):
            # RFC 5321 source route: ignore it.
            path = path.split(b":", 1)[1]
        try:
            address = path.decode("ascii")
        except UnicodeDecodeError:
            raise reply(553, "5.6.7", f"Non-ASCII {what} address needs SMTPUTF8, not offered")
        if what == "sender" and address == "":
            return ""
        checkAddressLengths(address, what)
        local, at, domain = address.rpartition("@")
        if not at or not local or not domain:
            raise reply(553, "5.1.3", f"The {what} address must be user@domain")
        if MAILBOX_LOCAL_PART.match(local) is None:
            raise reply(553, "5.1.3", f"Bad {what} address syntax")
        if not _validDomain(domain):
            raise reply(553, "5.1.3", f"Bad {what} domain {domain!r}")
        return address

    def _mailParameters(self, opts: Optional[bytes]) -> Optional[int]:
        size = None
        for parameter in (opts or b"").split():
            key, _, value = parameter.partition(b"=")
            key = key.upper()
            if key == b"SIZE":
                if not value.isdigit() or len(value) > 20:
                    raise reply(501, "5.5.4", "Bad SIZE parameter")
                size = int(value)
                if size > self.maxMessageSize:
                    raise reply(
                        552, "5.3.4", "Message size exceeds the limit of %d bytes" % (self.maxMessageSize,)
                    )
            elif key == b"BODY":
                if value.upper() not in (b"7BIT", b"8BITMIME"):
                    raise reply(501, "5.5.4", "BODY must be 7BIT or 8BITMIME")
            elif key == b"AUTH":
                pass  # RFC 4954 section 5: we may ignore it.
            else:
                raise reply(555, "5.5.4", "Unsupported MAIL parameter %s" % _printable(key))
        return size

    def do_RCPT(self, argument: bytes):
        self._needHelo()
        if self._sender is None:
            raise reply(503, "5.5.1", "Need MAIL before RCPT")
        match = self.rcpt_re.match(argument)
        if match is None:
            raise reply(501, "5.5.4", "Syntax: RCPT TO:<address>")
        if match.group("opts"):
            raise reply(555, "5.5.4", "RCPT parameters are not supported")
        recipient = self._parsePath(match.group("path"), "recipient")

        def accepted(_):
            self._recipients.append(recipient)
            self.transport.write(b"250 2.1.5 Recipient OK\r\n")

        return self._ask(
            "RCPT",
            accepted,
            self.policy.checkRecipient,
            self.session,
            self._sender,
            recipient,
            len(self._recipients),
        )

    def do_DATA(self, argument: bytes):
        self._needHelo()
        if self._sender is None:
            raise reply(503, "5.5.1", "Need MAIL before DATA")
        if not self._recipients:
            raise reply(554, "5.5.1", "No valid recipients")
        self.mode = DATA
        self._chunks: list = []
        self._size = 0
        self._dataError: Optional[SMTPReply] = None
        self._dataTimer = self.clock.callLater(self.dataTimeout, self._dataTimedOut)
        self.transport.write(b"354 End data with <CR><LF>.<CR><LF>\r\n")

    _commands = {
        b"HELO": do_HELO,
        b"EHLO": do_EHLO,
        b"MAIL": do_MAIL,
        b"RCPT": do_RCPT,
        b"DATA": do_DATA,
        b"RSET": do_RSET,
        b"NOOP": do_NOOP,
        b"QUIT": do_QUIT,
        b"VRFY": do_VRFY,
        b"HELP": do_HELP,
        b"STARTTLS": do_STARTTLS,
        b"AUTH": do_AUTH,
    }

    # -- DATA --------------------------------------------------------------

    def _processData(self) -> bool:
        """
        Consume complete lines of DATA from the buffer.  Returns True if the
        end of DATA was reached (and handled), False if more input is needed.
        """
        if self._skipLine or self._dataError is not None:
            return self._processDataLines()
        finished = self._processDataBlock()
        if finished is None:
            return self._processDataLines()
        return finished

    def _processDataBlock(self) -> Optional[bool]:
        """
        The fast path for the usual case: take every complete line in the
        buffer as one block and check it with whole-block operations.  If
        the block has anything unusual (a bare CR or LF, NUL, a line that
        may be too long, the size limit) return None and let
        L{_processDataLines} handle it line by line with the same rules.
        """
        buf = self._buffer
        if buf.startswith(b".\r\n"):
            block, rest, finished = b"", buf[3:], True
        else:
            end = buf.find(b"\r\n.\r\n")
            if end >= 0:
                block, rest, finished = buf[: end + 2], buf[end + 5 :], True
            else:
                end = buf.rfind(b"\r\n")
                if end < 0 or len(buf) - end > self.maxLineLength + 2:
                    return None
                block, rest, finished = buf[: end + 2], buf[end + 2 :], False
        if block:
            lines = block.count(b"\n")
            if (
                block.count(b"\r\n") != lines
                or block.count(b"\r") != lines
                or b"\0" in block
                or self._size + len(block) > self.maxMessageSize
            ):
                return None
            if len(block) > self.maxLineLength + 2 and (
                max(map(len, block.split(b"\r\n"))) > self.maxLineLength
            ):
                return None
            if block[:1] == b"." or b"\n." in block:
                block = (b"\n" + block).replace(b"\n.", b"\n")[1:]
            self._size += len(block)
            self._chunks.append(block)
        self._buffer = rest
        if finished:
            self._endOfData()
        else:
            self.resetTimeout()
        return finished

    def _processDataLines(self) -> bool:
        """
        Consume DATA line by line (the general path; see L{_processData}).
        """
        buf = self._buffer
        pos = 0
        maxLength = self.maxLineLength
        chunks = self._chunks
        while True:
            end = buf.find(b"\r\n", pos)
            if end < 0:
                break
            line = buf[pos:end]
            pos = end + 2
            if self._skipLine:
                # The tail of an over-long line: never a terminator.
                self._skipLine = False
                continue
            if line == b".":
                self._buffer = buf[pos:]
                self._endOfData()
                return True
            if self._dataError is not None:
                continue
            if len(line) > maxLength:
                self._failData(LINE_TOO_LONG)
                continue
            if line[:1] == b".":
                line = line[1:]
            if b"\r" in line or b"\n" in line:
                line = normaliseLine(line)
            if b"\0" in line:
                self._failData(NUL_IN_DATA)
                continue
            self._size += len(line) + 2
            if self._size > self.maxMessageSize:
                self._failData(MESSAGE_TOO_BIG)
                continue
            chunks.append(line + b"\r\n")
        rest = buf[pos:]
        if len(rest) > maxLength + 1:
            # No line end within the limit: the line is too long whatever
            # follows.  Keep a trailing CR, it may start the CRLF.
            if self._dataError is None:
                self._failData(LINE_TOO_LONG)
            self._skipLine = True
            rest = rest[-1:] if rest.endswith(b"\r") else b""
        self._buffer = rest
        self.resetTimeout()
        return False

    def _failData(self, answer: SMTPReply) -> None:
        self._dataError = answer
        self._chunks = []
        self._size = 0

    def _endOfData(self):
        self.mode = COMMAND
        self._cancelDataTimer()
        self.resetTimeout()
        sender, recipients = self._sender, self._recipients
        chunks, error = self._chunks, self._dataError
        self._chunks = []
        self._resetTransaction()
        if error is not None:
            self._send(error)
            self.policy.messageRejected(self.session, sender, recipients, error)
            return
        data = b"".join(chunks)
        d = maybeDeferred(self.policy.messageReceived, self.session, sender, recipients, data)

        def stored(queueID):
            self.transport.write(b"250 2.0.0 OK %s\r\n" % (queueID.encode("ascii"),))

        def failed(failure):
            if failure.check(SMTPReply):
                self._send(failure.value)
            else:
                self.log.failure("could not accept a message", failure)
                self._send(STORAGE_TROUBLE)

        self._block(d.addCallbacks(stored, failed))

    def _dataTimedOut(self):
        self._dataTimer = None
        self._sendCode(
            421, "4.4.2", self.host.decode("ascii") + " DATA phase took too long, closing connection"
        )
        self.transport.loseConnection()

    def _cancelDataTimer(self):
        timer = getattr(self, "_dataTimer", None)
        if timer is not None and timer.active():
            timer.cancel()
        self._dataTimer = None


class _PlainExchange:
    """
    RFC 4616 PLAIN: one response, C{authzid NUL authcid NUL password}.
    """

    done = False
    username = password = ""

    def challenge(self) -> bytes:
        return b""

    def respond(self, response: bytes) -> None:
        parts = response.split(b"\0")
        if len(parts) != 3:
            raise ValueError("PLAIN response needs three parts")
        self.username = parts[1].decode("utf-8")
        self.password = parts[2].decode("utf-8")
        self.done = True


class _LoginExchange:
    """
    The LOGIN mechanism: user name, then password, each base64.
    """

    done = False
    username = password = ""

    def __init__(self):
        self._step = 0

    def challenge(self) -> bytes:
        return b"Username:" if self._step == 0 else b"Password:"

    def respond(self, response: bytes) -> None:
        text = response.decode("utf-8")
        if self._step == 0:
            self.username = text
            self._step = 1
        else:
            self.password = text
            self.done = True


@lru_cache(maxsize=4096)
def _isLoopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@lru_cache(maxsize=4096)
def _validDomain(domain: str) -> bool:
    if domain.startswith("[") and domain.endswith("]"):
        literal = domain[1:-1]
        if literal.lower().startswith("ipv6:"):
            literal = literal[5:]
        try:
            ipaddress.ip_address(literal)
        except ValueError:
            return False
        return True
    labels = domain.rstrip(".").split(".")
    return all(
        0 < len(label) <= 63
        and label[0] != "-"
        and label[-1] != "-"
        and all(c.isalnum() or c == "-" for c in label)
        for label in labels
    ) and bool(labels)


def _printable(value: bytes) -> str:
    return value[:32].decode("ascii", "replace").encode("ascii", "backslashreplace").decode()
