"""
One delivery attempt: one message, one hop, a list of recipients.

L{deliver} connects to a L{Hop}, speaks ESMTP (opportunistic STARTTLS when a
TLS context is given), and reports one L{Reply} per recipient in an
L{AttemptResult}.  SMTP answers and network trouble are results, never
failures: a refused connection, a timeout or a connection lost before the
final reply give every undecided recipient a synthetic temporary reply
(C{451 4.4.1} / C{451 4.4.2}).  The returned L{Deferred} fails only for
programming errors, or with L{CancelledError} when cancelled.

The protocol is a small subclass of L{twisted.mail.smtp.ESMTPClient}: the
state machine (greeting, EHLO/HELO fallback, STARTTLS) is Twisted's; the
transaction (MAIL, RCPT, DATA), the per-recipient bookkeeping and the DATA
encoding are ours.
"""

import re
from io import BytesIO
from typing import Any, Optional

import attrs
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, succeed
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.mail.smtp import SUCCESS, ESMTPClient, SMTPTimeoutError
from twisted.protocols.basic import FileSender
from twisted.python.failure import Failure

__all__ = ["Reply", "AttemptResult", "deliver", "opportunisticTLS", "encodeData"]

log = Logger()

#: After QUIT, wait at most this long for the server's answer.
QUIT_TIMEOUT = 10.0

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
    """

    code: int
    status: Optional[str]
    text: str

    @classmethod
    def fromResponse(cls, code: int, response: Any) -> "Reply":
        """
        Parse the text of a (possibly multi-line) reply as collected by
        L{twisted.mail.smtp.SMTPClient}: lines without their code, joined
        by newlines.
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


@attrs.frozen
class AttemptResult:
    """
    What came of one attempt.

    @ivar remote: the hop name.
    @ivar tls: whether the session (as far as it went) was encrypted.
    @ivar results: C{address → Reply} for every recipient of the attempt.
    @ivar tryNextHop: C{True} when no mail transaction was started (the
        connection, the greeting or EHLO/HELO failed): the caller may try
        the same recipients at the next hop.
    """

    remote: str
    tls: bool
    results: dict
    tryNextHop: bool = False


def encodeData(data: bytes) -> bytes:
    """
    The DATA payload for a stored message: line ends normalised to CRLF,
    lines starting with C{.} dot-stuffed (RFC 5321 section 4.5.2), a final
    CRLF, and the terminating C{.CRLF}.
    """
    data = re.sub(rb"\r\n|\r|\n", b"\r\n", data)
    if data.startswith(b"."):
        data = b"." + data
    data = data.replace(b"\r\n.", b"\r\n..")
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data + b".\r\n"


def opportunisticTLS() -> Any:
    """
    A TLS client context for opportunistic STARTTLS: encrypt, but do not
    verify the server's certificate (RFC 7435).
    """
    from twisted.internet.ssl import CertificateOptions

    return CertificateOptions(verify=False)


@attrs.define
class _Session:
    """
    The parameters of one attempt, shared by the protocols built for it.
    """

    clock: Any
    hop: Any
    sender: str
    recipients: list
    data: bytes
    heloName: str
    timeout: float
    tlsContext: Any


class _DeliveryClient(ESMTPClient):
    """
    ESMTP client for one transaction; reports through L{done}.
    """

    debug = False
    # ESMTPClient routes every attribute assignment through a Python
    # __setattr__ that only exists to warn about the deprecated tlsMode
    # (which this class never uses): about 130 calls per message.
    __setattr__ = object.__setattr__

    def __init__(self, session: _Session) -> None:
        ESMTPClient.__init__(
            self,
            secret=None,
            contextFactory=session.tlsContext,
            identity=session.heloName,
        )
        self.session = session
        self.timeout = session.timeout
        self.callLater = session.clock.callLater
        self.done: Deferred = Deferred()
        self._replies: dict = {}
        self._accepted: list = []
        self._extensions: dict = {}
        self._transaction = False
        self._tryNextHop = False
        self._tlsStarted = False
        self._tlsUp = False
        self._quitting = False
        self._current: Optional[str] = None
        self._toSend: Any = iter(())

    # -- outcome bookkeeping ------------------------------------------------

    def _decide(self, reply: Reply, tryNextHop: bool = False) -> None:
        """
        Give C{reply} to every recipient that has no reply yet.
        """
        undecided = [a for a in self.session.recipients if a not in self._replies]
        for address in undecided:
            self._replies[address] = reply
        if undecided and tryNextHop:
            self._tryNextHop = True

    @property
    def tlsFailed(self) -> bool:
        """
        STARTTLS was accepted but the session never got to an encrypted EHLO.
        """
        return self._tlsStarted and not self._tlsUp

    def result(self) -> AttemptResult:
        return AttemptResult(
            remote=self.session.hop.name,
            tls=bool(self._tlsMode) and (self._tlsUp or not self._tlsStarted),
            results={a: self._replies[a] for a in self.session.recipients},
            tryNextHop=self._tryNextHop,
        )

    def _quit(self) -> None:
        self._quitting = True
        self._expected = range(0, 1000)
        self._okresponse = self.smtpState_disconnect
        self._failresponse = self.smtpState_disconnect
        self.sendLine(b"QUIT")
        self.setTimeout(min(self.timeout or QUIT_TIMEOUT, QUIT_TIMEOUT))

    def _failure(self, code: int, resp: bytes) -> Reply:
        """
        The reply for a command that did not get the answer it expected.
        Anything but a 4xx or 5xx there is a protocol error (temporary),
        so that an odd 2xx or 3xx is never taken for acceptance.
        """
        reply = Reply.fromResponse(code, resp)
        if 400 <= code < 600:
            return reply
        return Reply(
            451,
            "4.5.0",
            f"unexpected reply from {self.session.hop.name}: {reply.line}",
        )

    def _sessionFailed(self, code: int, resp: bytes) -> None:
        """
        Greeting, EHLO, HELO or STARTTLS failed: nothing was attempted.
        """
        self._decide(self._failure(code, resp), tryNextHop=True)
        self._quit()

    # -- greeting, EHLO/HELO, STARTTLS ---------------------------------------

    def smtpConnectionFailed(self, code: int, resp: bytes) -> None:
        self._sessionFailed(code, resp)

    def esmtpState_ehlo(self, code: int, resp: bytes) -> None:
        ESMTPClient.esmtpState_ehlo(self, code, resp)
        self._failresponse = self._ehloFailed

    def _ehloFailed(self, code: int, resp: bytes) -> None:
        if code >= 500 and not self._tlsStarted:
            # Not an ESMTP server (or it does not like our EHLO): try HELO.
            self.smtpState_helo(code, resp)
        else:
            self._sessionFailed(code, resp)

    def smtpState_helo(self, code: int, resp: bytes) -> None:
        ESMTPClient.smtpState_helo(self, code, resp)
        self._failresponse = self._sessionFailed

    def esmtpState_serverConfig(self, code: int, resp: bytes) -> None:
        items = {}
        for line in resp.splitlines():
            parts = line.split(None, 1)
            if parts:
                items[parts[0].upper()] = parts[1] if len(parts) > 1 else None
        self._extensions = items
        if self._tlsStarted:
            self._tlsUp = True
        self.tryTLS(code, resp, items)

    def tryTLS(self, code: int, resp: bytes, items: dict) -> None:
        if self._tlsMode or self.context is None or b"STARTTLS" not in items:
            self.smtpState_from(code, resp)
            return
        self._expected = [220]
        self._okresponse = self.esmtpState_starttls
        self._failresponse = self._startTLSRefused
        self.sendLine(b"STARTTLS")

    def _startTLSRefused(self, code: int, resp: bytes) -> None:
        if code == 421:
            self._sessionFailed(code, resp)
        else:
            # Opportunistic: carry on in the clear.
            self.smtpState_from(code, resp)

    def esmtpState_starttls(self, code: int, resp: bytes) -> None:
        self._tlsStarted = True
        try:
            self.transport.startTLS(self.context)
        except Exception:
            log.failure("could not start TLS with {remote}", remote=self.session.hop.name)
            self._decide(
                Reply(451, "4.7.0", "could not start TLS"), tryNextHop=True
            )
            self.transport.abortConnection()
            return
        self._tlsMode = True
        self.esmtpState_ehlo(code, resp)

    # -- the mail transaction ------------------------------------------------

    def smtpState_from(self, code: int, resp: bytes) -> None:
        session = self.session
        self._from = session.sender
        line = b"MAIL FROM:<" + session.sender.encode("utf-8") + b">"
        if b"SIZE" in self._extensions:
            line += b" SIZE=%d" % (len(session.data),)
        if b"8BITMIME" in self._extensions and re.search(rb"[\x80-\xff]", session.data):
            line += b" BODY=8BITMIME"
        self.sendLine(line)
        self._expected = SUCCESS
        self._okresponse = self.smtpState_to
        self._failresponse = self._mailRefused

    def _mailRefused(self, code: int, resp: bytes) -> None:
        self._decide(self._failure(code, resp))
        self._quit()

    def smtpState_to(self, code: int, resp: bytes) -> None:
        self._transaction = True
        self._toSend = iter(self.session.recipients)
        self._expected = range(0, 1000)
        self._okresponse = self._rcptAnswered
        self._failresponse = self._rcptAnswered
        self._nextRecipient()

    def _rcptAnswered(self, code: int, resp: bytes) -> None:
        if code in SUCCESS:
            self._accepted.append(self._current)
        else:
            reply = self._failure(code, resp)
            self._replies[self._current] = reply
            if code == 421:
                # The server is closing the session: nobody else gets in.
                self._decide(reply)
                self._quit()
                return
        self._nextRecipient()

    def _nextRecipient(self) -> None:
        self._current = next(self._toSend, None)
        if self._current is not None:
            self.sendLine(b"RCPT TO:<" + self._current.encode("utf-8") + b">")
        elif self._accepted:
            self.sendLine(b"DATA")
            self._expected = [354]
            self._okresponse = self.smtpState_data
            self._failresponse = self._dataRefused
        else:
            self._quit()

    def smtpState_data(self, code: int, resp: bytes) -> None:
        self._expected = SUCCESS
        self._okresponse = self._dataAnswered
        self._failresponse = self._dataRefused
        payload = BytesIO(encodeData(self.session.data))
        d = FileSender().beginFileTransfer(payload, self.transport, self._progress)
        d.addErrback(self._transferStopped)

    def _progress(self, chunk: bytes) -> bytes:
        self.resetTimeout()
        return chunk

    def _transferStopped(self, failure: Failure) -> None:
        # The connection went away while sending; connectionLost reports it.
        log.debug(
            "DATA transfer to {remote} stopped: {why}",
            remote=self.session.hop.name,
            why=failure.getErrorMessage(),
        )

    def _dataRefused(self, code: int, resp: bytes) -> None:
        self._settleAccepted(self._failure(code, resp))

    def _dataAnswered(self, code: int, resp: bytes) -> None:
        self._settleAccepted(Reply.fromResponse(code, resp))

    def _settleAccepted(self, reply: Reply) -> None:
        for address in self._accepted:
            self._replies.setdefault(address, reply)
        self._decide(reply)
        self._quit()

    # -- errors and the end of the connection --------------------------------

    def sendError(self, exc: Exception) -> None:
        if self._quitting:
            self.transport.abortConnection()
            return
        if isinstance(exc, SMTPTimeoutError):
            reply = Reply(
                451,
                "4.4.2",
                f"timeout: no response from {self.session.hop.name} "
                f"within {self.timeout:g}s",
            )
        else:
            reply = Reply(
                451, "4.5.0", f"SMTP protocol error with {self.session.hop.name}: {exc}"
            )
        self._decide(reply, tryNextHop=not self._transaction)
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        ESMTPClient.connectionLost(self, reason)
        if self.tlsFailed:
            why = f"TLS session with {self.session.hop.name} failed"
        else:
            why = f"connection to {self.session.hop.name} lost"
        self._decide(
            Reply(451, "4.4.2", f"{why}: {reason.getErrorMessage()}"),
            tryNextHop=not self._transaction,
        )
        if not self.done.called:
            self.done.callback(self.result())


class _SessionFactory(Factory):
    noisy = False

    def __init__(self, session: _Session) -> None:
        self.session = session

    def buildProtocol(self, addr: Any) -> _DeliveryClient:
        protocol = _DeliveryClient(self.session)
        protocol.factory = self
        return protocol


def _attemptOnce(reactor: Any, session: _Session) -> Deferred:
    """
    Connect and run one session; fires with C{(AttemptResult, tlsFailed)}.
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

    connecting = session.hop.endpoint.connect(_SessionFactory(session))
    connecting.addTimeout(session.timeout, reactor)

    def connected(protocol: _DeliveryClient) -> None:
        state["protocol"] = protocol
        protocol.done.addCallback(lambda result: report((result, protocol.tlsFailed)))
        protocol.done.addErrback(
            lambda f: log.failure("delivery session to {remote} failed",
                                  f, remote=session.hop.name)
        )

    def connectFailed(failure: Failure) -> None:
        if finished.called:
            return
        why = failure.getErrorMessage() or failure.type.__name__
        if failure.check(TimeoutError, CancelledError):
            why = f"connection attempt timed out after {session.timeout:g}s"
        reply = Reply(451, "4.4.1", f"cannot connect to {session.hop.name}: {why}")
        report(
            (
                AttemptResult(
                    remote=session.hop.name,
                    tls=False,
                    results={a: reply for a in session.recipients},
                    tryNextHop=True,
                ),
                False,
            )
        )

    connecting.addCallbacks(connected, connectFailed)
    connecting.addErrback(
        lambda f: log.failure("unexpected error connecting to {remote}",
                              f, remote=session.hop.name)
    )
    return finished


def deliver(
    reactor: Any,
    hop: Any,
    sender: str,
    recipients: list,
    data: bytes,
    heloName: str,
    timeout: float,
    tlsContext: Any = None,
) -> Deferred:
    """
    Try to deliver C{data} from C{sender} to C{recipients} at C{hop}.

    @param reactor: provides C{IReactorTime} (timeouts); connecting is the
        hop endpoint's business.
    @param hop: a L{smartrelay.outbound.router.Hop}.
    @param sender: envelope sender; C{""} sends C{MAIL FROM:<>}.
    @param data: the stored message (CRLF line ends, not dot-stuffed).
    @param timeout: seconds to wait for the connection and for each reply.
    @param tlsContext: C{None}: never STARTTLS; otherwise a TLS client
        context (see L{opportunisticTLS}) used when the server offers
        STARTTLS.  If the TLS handshake fails the attempt is repeated once
        in the clear.
    @return: L{Deferred} firing with an L{AttemptResult} covering every
        recipient.
    """
    recipients = list(dict.fromkeys(recipients))

    def session(context: Any) -> _Session:
        return _Session(reactor, hop, sender, recipients, data, heloName, timeout, context)

    async def run() -> AttemptResult:
        result, tlsFailed = await _attemptOnce(reactor, session(tlsContext))
        if tlsFailed:
            log.info(
                "TLS with {remote} failed; retrying without TLS", remote=hop.name
            )
            result, _ = await _attemptOnce(reactor, session(None))
        return result

    if not recipients:
        return succeed(AttemptResult(remote=hop.name, tls=False, results={}))
    return Deferred.fromCoroutine(run())
