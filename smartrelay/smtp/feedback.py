# -*- test-case-name: tests.test_smtp_feedback -*-
"""
The feedback listener's policy: the public MX of C{[feedback]
bounce_domain}, where bounces, complaints and unsubscribe mail come back.

It runs on the submission listener's hardened protocol
(L{HardenedESMTP <smartrelay.smtp.protocol.HardenedESMTP>}, built by
L{SubmissionFactory <smartrelay.smtp.submission.SubmissionFactory>}) with
its own decisions: anyone may connect (within the connection limits) and
send, from any sender, C{<>} included; no AUTH; only these recipients are
taken, nothing is ever relayed:

  - C{VERP_PREFIX+TOKEN@BOUNCE_DOMAIN} with a valid C{"v"} token,
  - C{unsub+TOKEN@BOUNCE_DOMAIN} with a valid C{"u"} token,
  - C{postmaster@BOUNCE_DOMAIN},
  - each of C{[feedback] fbl_addresses};

a token that does not verify (forged, truncated) gets C{550 5.7.1}, any
other address C{550 5.1.1}.  A report is answered C{250} only once it is
on disk (L{FeedbackInbox <smartrelay.feedback.inbox.FeedbackInbox>}); then
it is handed to the processor.
"""

from typing import Callable, Optional

import attrs
from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger
from zope.interface import implementer

from smartrelay.feedback.addresses import FeedbackAddresses, ForgedToken, NotAFeedbackAddress
from smartrelay.feedback.inbox import Envelope, FeedbackInbox, InboxError
from smartrelay.smtp.connections import ConnectionLimits
from smartrelay.smtp.protocol import ISubmissionPolicy, Session
from smartrelay.smtp.replies import STORAGE_TROUBLE, TOO_MANY_RECIPIENTS, SMTPReply, reply

UNKNOWN_RECIPIENT = reply(550, "5.1.1", "No such recipient here: this server only takes reports")
BAD_TOKEN = reply(
    550, "5.7.1", "The address's token does not verify: it is forged, damaged or truncated"
)
AUTH_UNAVAILABLE = reply(502, "5.5.1", "AUTH not available")


def refusalFor(error: NotAFeedbackAddress) -> SMTPReply:
    """
    The reply to a RCPT naming an address that takes no reports.
    """
    return BAD_TOKEN if isinstance(error, ForgedToken) else UNKNOWN_RECIPIENT
@implementer(ISubmissionPolicy)
@attrs.define(eq=False)
class FeedbackPolicy(ConnectionLimits):
    """
    Decides for the feedback listener (see the module docstring).

    @ivar addresses: reads RCPT addresses.
    @ivar inbox: where reports are written before their C{250}.
    @ivar received: called with (report id, L{Envelope}, message) once a
        report is on disk: the processor takes it from there.
    """

    clock: object
    addresses: FeedbackAddresses
    inbox: FeedbackInbox
    received: Callable[[str, Envelope, bytes], object]
    maxConnections: int = 200
    maxConnectionsPerClient: int = 20
    maxRecipients: int = 100
    connections: int = 0
    perClient: dict = attrs.field(factory=dict)

    log = Logger()

    authAvailable = False

    def checkAuth(self, session: Session) -> None:
        raise AUTH_UNAVAILABLE

    def authenticate(self, session: Session, username: str, password: str) -> Deferred:
        return fail(AUTH_UNAVAILABLE)

    def checkSender(self, session: Session, sender: str, size: Optional[int]) -> None:
        """
        Any sender: reports come from C{<>} mostly, complaints and
        unsubscribe mail from anyone.
        """

    def checkRecipient(
        self, session: Session, sender: str, recipient: str, accepted: int
    ) -> None:
        if accepted >= self.maxRecipients:
            raise TOO_MANY_RECIPIENTS
        try:
            self.addresses.target(recipient)
        except NotAFeedbackAddress as error:
            refusal = refusalFor(error)
            self.log.info(
                "feedback: refused RCPT {recipient!r} from {client}: {reply}",
                recipient=recipient[:300],
                client=session.peer,
                reply=str(refusal),
            )
            raise refusal from None

    def messageReceived(
        self, session: Session, sender: str, recipients: list, data: bytes
    ) -> Deferred:
        envelope = Envelope(
            sender=sender,
            recipients=tuple(recipients),
            received=self.clock.seconds(),
            client={"ip": session.peer, "helo": session.helo, "tls": session.tls},
        )
        d = self.inbox.store(envelope, data)

        def stored(reportID: str) -> str:
            # The processor logs the report once it is processed.
            self.received(reportID, envelope, data)
            return reportID

        def failed(failure) -> None:
            failure.trap(InboxError)
            self.log.error(
                "feedback: {why}; answered 451", why=failure.getErrorMessage()
            )
            raise STORAGE_TROUBLE

        return d.addCallbacks(stored, failed)

    def messageRejected(
        self, session: Session, sender: str, recipients: list, answer: SMTPReply
    ) -> None:
        self.log.info(
            "feedback: refused a report from {client} to {recipients}: {reply}",
            client=session.peer,
            recipients=", ".join(recipients),
            reply=str(answer),
        )
