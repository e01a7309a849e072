# -*- test-case-name: tests.test_smtp_submission -*-
"""
The submission policy: who may connect and submit, what is accepted, and
what happens to an accepted message (queue id, trace headers, spool,
events, hand-off to delivery).
"""

import ipaddress
from functools import lru_cache
from email.utils import formatdate
from typing import Any, Callable, Optional

import attrs
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, DeferredList, fail, maybeDeferred, succeed
from twisted.internet.protocol import ServerFactory
from twisted.logger import Logger
from zope.interface import implementer

from smartrelay.ids import LeaseExpired, QueueIDGenerator
from smartrelay.logs import MessageLog
from smartrelay.mime import removeHeader
from smartrelay.message import Recipient, SpoolEntry
from smartrelay.smtp.connections import ConnectionLimits
from smartrelay.smtp.controls import InvalidControlHeader, readControls
from smartrelay.smtp.protocol import HardenedESMTP, ISubmissionPolicy, Session
from smartrelay.smtp.replies import (
    ACCESS_DENIED,
    STORAGE_TROUBLE,
    TOO_MANY_RECIPIENTS,
    SMTPReply,
    reply,
)
from smartrelay.ratelimit import LoginLimited, LoginLimiter
from smartrelay.sms.gateway import SMSPolicy, SMSRefused
from smartrelay.spool import SpoolError

AUTH_FAILED = reply(535, "5.7.8", "Authentication credentials invalid")
#: AUTH refused without checking: the client (or the user name) failed too
#: often lately.  The second refusal in a session closes it.
AUTH_LIMITED = reply(454, "4.7.0", "Too many failed authentications, try again later")
AUTH_LIMITED_CLOSING = reply(
    421, "4.7.0", "Too many failed authentications, try again later; closing connection"
)
#: The longest wait before a failed AUTH is answered (Dovecot's cap).
MAX_AUTH_DELAY = 15.0


@lru_cache(maxsize=4096)
def clientAddress(host: str):
    """
    The client's IP address (IPv4-mapped IPv6 addresses as IPv4), or None
    for a non-IP peer (a UNIX socket).
    """
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    mapped = getattr(address, "ipv4_mapped", None)
    return mapped if mapped is not None else address


@lru_cache(maxsize=4)
def _rfc5322Date(second: int) -> str:
    return formatdate(second, localtime=False).replace("-0000", "+0000")


def traceHeaders(
    queueID: str, session: Session, hostname: str, recipients: list, now: float
) -> bytes:
    """
    The C{Received} (RFC 5321 4.4) and C{X-SmartRelay-ID} headers that the
    relay prepends to every accepted message.
    """
    protocol = "ESMTP" if session.esmtp else "SMTP"
    if session.tls:
        protocol += "S"
    if session.user is not None:
        protocol += "A"
    date = _rfc5322Date(int(now))
    forClause = " for <%s>" % (recipients[0],) if len(recipients) == 1 else ""
    received = "Received: from %s ([%s])\r\n\tby %s (smartrelay) with %s id %s%s;\r\n\t%s\r\n" % (
        session.helo or "unknown",
        session.peer,
        hostname,
        protocol,
        queueID,
        forClause,
        date,
    )
    return (received + "X-SmartRelay-ID: %s\r\n" % (queueID,)).encode("utf-8", "replace")


@implementer(ISubmissionPolicy)
@attrs.define(eq=False)
class SubmissionPolicy(ConnectionLimits):
    """
    Decides for the submission listener.

    @ivar allowedClients: networks that may submit without AUTH.
    @ivar checker: an C{ICredentialsChecker} for user names and passwords,
        or None when SMTP AUTH is not configured.
    @ivar spool: stores accepted messages durably.
    @ivar ids: the run's L{QueueIDGenerator}.
    @ivar renewLease: called after each id; extends the id lease in the
        background when due.
    @ivar events: an L{smartrelay.events.EventLog}.
    @ivar enqueue: hands a stored L{SpoolEntry} to delivery.
    @ivar limiter: the failed-AUTH policy (L{LoginLimiter}), or L{None} for
        no limit but the protocol's per-connection one.
    @ivar messageLog: writes the C{accepted} line of each stored message.
    @ivar sms: the rules of C{[sms]} (L{SMSPolicy}), or L{None} without
        SMS: a recipient at its domain that is not an E.164 number is
        refused at RCPT, and a message for an SMS recipient whose text is
        empty, too long or without a sender at the end of DATA.
    """

    clock: object
    hostname: str
    spool: object
    ids: QueueIDGenerator
    events: object
    enqueue: Callable[[SpoolEntry], object]
    allowedClients: tuple = ()
    checker: Optional[object] = None
    maxConnections: int = 1000
    maxConnectionsPerClient: int = 100
    maxRecipients: int = 1000
    renewLease: Callable[[], object] = lambda: None
    limiter: Optional[LoginLimiter] = None
    messageLog: MessageLog = attrs.field(factory=MessageLog)
    sms: Optional[SMSPolicy] = None
    connections: int = 0
    perClient: dict = attrs.field(factory=dict)

    log = Logger()

    @property
    def authAvailable(self) -> bool:
        return self.checker is not None

    def _allowed(self, session: Session) -> bool:
        if session.user is not None:
            return True
        if session.allowedClient is None:
            address = clientAddress(session.peer)
            session.allowedClient = address is not None and any(
                address in network for network in self.allowedClients
            )
        return session.allowedClient

    def _refused(self, session: Session) -> SMTPReply:
        session.authRefused += 1
        return AUTH_LIMITED if session.authRefused == 1 else AUTH_LIMITED_CLOSING

    def checkAuth(self, session: Session) -> None:
        if self.limiter is not None and self.limiter.clientRetryAfter(session.peer) > 0:
            raise self._refused(session)

    def authenticate(self, session: Session, username: str, password: str) -> Deferred:
        """
        Check the credentials, unless the limiter refuses the attempt
        (C{454 4.7.0}, the second time in a session C{421 4.7.0}; no
        password hash is computed).  A wrong password is answered
        C{535 5.7.8} after the limiter's delay; cancelling the returned
        Deferred during the delay drops the answer, never the count.
        """
        attempt = None
        if self.limiter is not None:
            try:
                attempt = self.limiter.begin(session.peer, username)
            except LoginLimited:
                return fail(self._refused(session))
        checked = maybeDeferred(
            self.checker.requestAvatarId, UsernamePassword(username, password)
        )
        timers: list = []

        def cancel(d: Deferred) -> None:
            # Only the delay is cancelled: the password check goes on and
            # is counted (an attacker must not get checks for free by
            # hanging up).
            for timer in timers:
                if timer.active():
                    timer.cancel()

        answer: Deferred = Deferred(canceller=cancel)

        def succeeded(avatarID) -> None:
            if attempt is not None:
                attempt.succeeded()
            if not answer.called:
                answer.callback(
                    avatarID.decode("utf-8") if isinstance(avatarID, bytes) else avatarID
                )

        def failed(failure) -> None:
            if not failure.check(UnauthorizedLogin):
                if attempt is not None:
                    attempt.abandoned()
                if not answer.called:
                    answer.errback(failure)
                return
            delay = attempt.failed() if attempt is not None else 0.0
            self.log.info(
                "failed SMTP AUTH for {user!r} from {client} (answered after {delay:g}s)",
                user=username[:100],
                client=session.peer,
                delay=delay,
            )
            if answer.called:
                return
            if delay > 0:
                timers.append(self.clock.callLater(delay, answer.errback, AUTH_FAILED))
            else:
                answer.errback(AUTH_FAILED)

        checked.addCallbacks(succeeded, failed)
        checked.addErrback(
            lambda f: self.log.failure("unexpected error after an SMTP AUTH check", f)
        )
        return answer

    def checkSender(self, session: Session, sender: str, size: Optional[int]) -> None:
        if not self._allowed(session):
            self.log.info("refused submission from {peer}", peer=session.peer)
            raise ACCESS_DENIED

    def checkRecipient(
        self, session: Session, sender: str, recipient: str, accepted: int
    ) -> None:
        if not self._allowed(session):
            raise ACCESS_DENIED
        if accepted >= self.maxRecipients:
            raise TOO_MANY_RECIPIENTS
        if self.sms is not None:
            try:
                self.sms.number(recipient)
            except SMSRefused as e:
                raise reply(e.code, e.status, str(e)) from None

    def _checkSMS(self, recipients: list, data: bytes) -> Optional[SMTPReply]:
        """
        The refusal of a message with SMS recipients that cannot become an
        SMS (no text, too many parts, no sender), or L{None}.
        """
        if self.sms is None or not any(self.sms.isSMS(r) for r in recipients):
            return None
        try:
            self.sms.prepare(data)
        except SMSRefused as e:
            return reply(e.code, e.status, str(e))
        except Exception:
            self.log.failure("could not read the text of an SMS")
            return reply(554, "5.6.0", "the message could not be read as an SMS")
        return None

    def messageReceived(
        self, session: Session, sender: str, recipients: list, data: bytes
    ) -> Deferred:
        now = self.clock.seconds()
        try:
            controls, data = readControls(data)
        except InvalidControlHeader as e:
            refusal = reply(554, "5.6.0", str(e))
            self.messageRejected(session, sender, recipients, refusal)
            return fail(refusal)
        refusal = self._checkSMS(recipients, data)
        if refusal is not None:
            self.messageRejected(session, sender, recipients, refusal)
            return fail(refusal)
        try:
            queueID = self.ids.next(now)
        except LeaseExpired as e:
            self.log.error("cannot hand out queue ids: {why}", why=str(e))
            return fail(STORAGE_TROUBLE)
        finally:
            self.renewLease()
        message = traceHeaders(queueID, session, self.hostname, recipients, now) + removeHeader(
            data, b"X-SmartRelay-ID"
        )
        entry = SpoolEntry(
            queue_id=queueID,
            sender=sender,
            recipients=[Recipient(address=r) for r in recipients],
            received=now,
            size=len(message),
            client={
                "ip": session.peer,
                "helo": session.helo,
                "user": session.user,
                "tls": session.tls,
            },
            tag=controls.tag,
            metadata=controls.metadata,
            options={
                name: value
                for name, value in (
                    ("opens", controls.opens),
                    ("clicks", controls.clicks),
                    ("unsubscribe", controls.unsubscribe),
                )
                if value is not None
            },
        )
        d = self.spool.store(entry, message)

        def stored(entry):
            detail = {"sender": sender, "size": entry.size, "client": entry.client}
            # The header block as stored, once per message (in the first
            # recipient's event): the API shows it after the spool has
            # let the message go.
            first = {**detail, "headers": eventHeaders(message)}
            self.messageLog.accepted(
                queueID,
                sender,
                entry.size,
                len(recipients),
                session.peer,
                session.user,
                session.helo,
                session.tls,
                entry.tag,
            )
            for number, recipient in enumerate(recipients):
                self.events.emit(
                    "accepted",
                    queueID,
                    recipient,
                    tag=entry.tag,
                    metadata=entry.metadata or None,
                    detail=detail if number else first,
                )
            self.enqueue(entry)
            return queueID

        def failed(failure):
            failure.trap(SpoolError)
            raise STORAGE_TROUBLE

        return d.addCallbacks(stored, failed)

    def messageRejected(
        self, session: Session, sender: str, recipients: list, answer: SMTPReply
    ) -> None:
        detail = {
            "sender": sender,
            "code": answer.code,
            "status": answer.status,
            "reason": answer.text,
            "client": {"ip": session.peer, "helo": session.helo, "user": session.user},
        }
        for recipient in recipients:
            self.events.emit("rejected", None, recipient, detail=detail)


#: The most of a message's header block kept in its C{accepted} event.
MAX_EVENT_HEADERS = 16 * 1024


def eventHeaders(message: bytes) -> str:
    """
    The header block of a stored message (up to the blank line, CRLFs
    kept) as text for an event: UTF-8 (anything else replaced), at most
    L{MAX_EVENT_HEADERS} bytes of it.
    """
    end = message.find(b"\r\n\r\n")
    block = message if end < 0 else message[: end + 2]
    return block[:MAX_EVENT_HEADERS].decode("utf-8", "replace")


@attrs.define(eq=False, slots=False, repr=False)
class SubmissionFactory(ServerFactory):
    """
    Builds a L{HardenedESMTP} per connection with the listener's settings.
    """

    noisy = False
    log = Logger()

    policy: SubmissionPolicy
    clock: object
    hostname: str
    maxMessageSize: int
    maxLineLength: int = 998
    commandTimeout: float = 300.0
    dataTimeout: float = 600.0
    tlsContext: Optional[object] = None

    sessions: set = attrs.field(factory=set, init=False)

    def buildProtocol(self, addr):
        protocol = HardenedESMTP(
            self.policy,
            self.clock,
            hostname=self.hostname,
            maxMessageSize=self.maxMessageSize,
            maxLineLength=self.maxLineLength,
            commandTimeout=self.commandTimeout,
            dataTimeout=self.dataTimeout,
            tlsContext=self.tlsContext,
        )
        protocol.factory = self
        self.sessions.add(protocol)
        return protocol

    def sessionEnded(self, protocol) -> None:
        """
        C{protocol}'s connection is closed and it waits for nothing.
        """
        self.sessions.discard(protocol)

    def shutDown(self, timeout: float) -> Deferred:
        """
        End every open session (L{HardenedESMTP.shutDown}): each finishes
        the message it is receiving and gets C{421 4.3.2}.  Connections
        still open after C{timeout} seconds are aborted (their client got
        no C{250} for the message in progress, so it keeps it).

        @return: a L{Deferred} firing once every session has ended and no
            message is still being stored.
        """
        sessions = list(self.sessions)
        if not sessions:
            return succeed(None)
        self.log.info(
            "waiting up to {timeout}s for {count} SMTP sessions to finish",
            timeout=timeout,
            count=len(sessions),
        )

        def abort() -> None:
            for protocol in sessions:
                if protocol in self.sessions and protocol.transport is not None:
                    protocol.transport.abortConnection()

        timer = self.clock.callLater(timeout, abort)
        done = DeferredList([protocol.shutDown() for protocol in sessions])

        def finished(result: Any) -> None:
            if timer.active():
                timer.cancel()

        return done.addCallback(finished)


def makeLoginLimiter(smtp, clock) -> Optional[LoginLimiter]:
    """
    The failed-AUTH policy for an C{[smtp]} section (L{SMTPConfig
    <smartrelay.config.SMTPConfig>}): its C{auth_client_failures},
    C{auth_user_failures}, C{auth_lockout} and C{auth_failure_delay}; or
    L{None} when both limits are C{off} and there is no delay.
    """
    client, user = smtp.auth_client_failures, smtp.auth_user_failures
    if client is None and user is None and not smtp.auth_failure_delay:
        return None
    return LoginLimiter(
        clock,
        clientRate=None if client is None else (client.count, client.period),
        userRate=None if user is None else (user.count, user.period),
        lockout=smtp.auth_lockout,
        delay=smtp.auth_failure_delay,
        maxDelay=max(MAX_AUTH_DELAY, smtp.auth_failure_delay),
        service="SMTP AUTH",
    )
