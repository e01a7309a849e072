"""
The per-recipient re-wrap (DESIGN section 1.5): what a stored message
becomes for one of its recipients just before delivery.

* the envelope sender becomes a VERP address,
  C{<verp_prefix>+<token>@<bounce_domain>}, whose token (signed, compact,
  lower-case) names the queue id and the recipient, so that a bounce coming
  back says exactly who bounced (a null sender stays null);
* C{List-Unsubscribe: <https://TRACKING/u/TOKEN>, <mailto:unsub+TOKEN@BOUNCE_DOMAIN>}
  and C{List-Unsubscribe-Post: List-Unsubscribe=One-Click} (RFC 8058) are
  added, unless C{[tracking] unsubscribe} or the message's
  C{X-SmartRelay-Unsubscribe} says off;
* C{Feedback-ID} (for the mailbox providers' feedback loops) is built from
  the tag and the sender's domain; C{Message-ID} and C{Date} are added if
  missing (the same for every recipient of the message);
* open and click tracking rewrite the HTML parts
  (L{smartrelay.engine.tracking}), when C{[tracking]} or the message asks;
* 8-bit content the next hop cannot take (no C{8BITMIME}, no C{SMTPUTF8})
  is downgraded to 7 bits (L{smartrelay.engine.downgrade}): the re-wrap
  runs once the delivery session is open, and is told what it offers;
* last, the message is DKIM-signed with the key of its From domain
  (L{smartrelay.engine.dkim}), so that the signature covers everything
  above, List-Unsubscribe and List-Unsubscribe-Post included, and exactly
  the bytes the session sends (L{Prepared}: the session sends it as it
  is).

A message whose From domain has keys is never sent unsigned: if signing
fails, for any reason, the re-wrap fails with L{SigningError} and the
scheduler defers the recipient.

The CPU work (parsing, HTML rewriting, downgrading, signing) runs in
worker processes or C{runInThread}, never on the reactor thread.  Control
headers were already removed when the message was accepted
(L{smartrelay.smtp.controls}).
"""

import re
from email.utils import formatdate
from typing import Any, Callable, Optional, Tuple

import attrs
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from smartrelay.engine.dkim import fromDomain, headerSection
from smartrelay.engine.downgrade import Offers, Prepared, prepare
from smartrelay.engine.workers import JobFailed, WorkerLost
from smartrelay.ids import fileName
from smartrelay.message import SpoolEntry
from smartrelay.mime import removeHeader

__all__ = [
    "Rewrapper",
    "RewrapRequest",
    "RewrapSettings",
    "RewrapJob",
    "RewrapError",
    "SigningError",
]


_TRACE = (b"received:", b"x-smartrelay-id:", b"return-path:")


def _afterTrace(data: bytes) -> int:
    """
    Where new header fields go: after the trace fields at the top
    (C{Received}, and our C{X-SmartRelay-ID}), which stay first.
    """
    offset = 0
    while data[offset : offset + 20].lower().startswith(_TRACE):
        end = data.find(b"\n", offset)
        while end >= 0 and data[end + 1 : end + 2] in (b" ", b"\t"):
            end = data.find(b"\n", end + 1)
        if end < 0:
            return offset
        offset = end + 1
    return offset


def _feedbackPart(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._@-]", "-", text)[:60] or "-"


class RewrapError(JobFailed):
    """
    A message cannot be prepared for delivery now.  The scheduler defers
    the recipient (C{451 4.3.0}) with C{str()} of the error, one line, as
    the reply's text.  Raised the same in a thread and in a worker process
    (a L{JobFailed} comes back from the worker as itself).
    """


class SigningError(RewrapError):
    """
    DKIM signing failed for a message whose From domain has keys; it is
    not sent unsigned.

    @ivar domain: the From domain.
    @ivar why: the signer's error, type and text.
    """

    def __init__(self, domain: str, why: str) -> None:
        super().__init__(domain, why)
        self.domain = domain
        self.why = why

    def __str__(self) -> str:
        return f"DKIM signing for {self.domain} failed ({self.why}); not sending it unsigned"


@attrs.define
class Rewrapper:
    """
    Turns a stored message into the one for one recipient.

    @ivar tokens: a L{smartrelay.tokens.Tokens}.
    @ivar hostname: the relay's name (Message-ID).
    @ivar bounceDomain: the domain of VERP and unsubscribe addresses.
    @ivar verpPrefix: the local part before C{+} in VERP addresses.
    @ivar baseURL: the public URL of the web endpoints (no trailing slash).
    @ivar opens: track opens unless the message says otherwise.
    @ivar clicks: track clicks unless the message says otherwise.
    @ivar unsubscribe: add List-Unsubscribe unless the message says
        otherwise.
    @ivar signer: a L{smartrelay.engine.dkim.DKIMSigner}, or L{None}.
    @ivar runInThread: C{f(*args) -> Deferred} for the CPU work.
    @ivar workers: a L{smartrelay.engine.workers.WorkerPool} started with
        C{(signer, tokens)} to do the CPU work instead, or L{None}.
    """

    tokens: Any
    hostname: str
    bounceDomain: str
    verpPrefix: str
    baseURL: str
    runInThread: Callable[..., Deferred]
    opens: bool = False
    clicks: bool = False
    unsubscribe: bool = True
    signer: Any = None
    workers: Any = None

    def _settings(self) -> "RewrapSettings":
        return RewrapSettings(
            self.hostname,
            self.bounceDomain,
            self.verpPrefix,
            self.baseURL,
            self.opens,
            self.clicks,
            self.unsubscribe,
        )

    def job(self, entry: SpoolEntry, index: int, data: bytes, offers: Offers) -> "RewrapRequest":
        """
        All that L{rewrap} needs, as plain data: a L{RewrapRequest} whose
        C{run(signer, tokens)} makes the envelope sender and the message,
        wherever it runs (a worker process holding the session that sends
        it).  Nothing is computed here.
        """
        options = entry.options
        return RewrapRequest(
            self._settings(),
            entry.queue_id,
            index,
            entry.recipients[index].address,
            bool(entry.sender),
            options.get("opens"),
            options.get("clicks"),
            options.get("unsubscribe"),
            entry.tag,
            entry.received,
            data,
            offers,
        )

    def rewrap(self, entry: SpoolEntry, index: int, data: bytes, offers: Offers) -> Deferred:
        """
        @param offers: what the session that will send it offers beyond
            7-bit ASCII.
        @return: L{Deferred} firing with C{(envelope sender, L{Prepared})}
            for C{entry.recipients[index]}, the message to be sent as it is
            on that session; failing with L{SigningError} when DKIM signing
            failed, with L{WorkerLost} or L{WorkerError} when the worker
            process went away twice or the job broke.
        """
        sender, job = self.job(entry, index, data, offers).split(self.tokens)
        if self.workers is not None and self.workers.available:
            d = self.workers.run(job)
            # A job whose worker died goes once more to another (or the
            # replacement): one crash, say an out-of-memory kill, should not
            # defer every message that worker held.  A message that kills
            # workers itself fails the second time and is deferred.
            d.addErrback(self._again, job)
        else:
            # No worker pool, or none of its processes running (they are
            # being replaced): the relay's own threads do the work.
            d = self._inThread(job)
        return d.addCallback(lambda prepared: (sender, prepared))

    def _inThread(self, job: "RewrapJob") -> Deferred:
        return self.runInThread(job.run, self.signer, self.tokens)

    def _again(self, failure: Failure, job: "RewrapJob") -> Deferred:
        failure.trap(WorkerLost)
        if self.workers.available:
            return self.workers.run(job)
        return self._inThread(job)


@attrs.frozen
class RewrapSettings:
    """
    The re-wrap's configuration (L{Rewrapper}'s), as plain data.
    """

    hostname: str
    bounceDomain: str
    verpPrefix: str
    baseURL: str
    opens: bool
    clicks: bool
    unsubscribe: bool


@attrs.frozen
class RewrapRequest:
    """
    What a re-wrap needs of a message and of the configuration, picklable
    (L{Rewrapper.job}).  The C{opens}, C{clicks} and C{unsubscribe} the
    message asked for (its control headers) are L{None} where it did not
    say.
    """

    settings: RewrapSettings
    queueID: str
    index: int
    recipient: str
    hasSender: bool
    opens: Optional[bool]
    clicks: Optional[bool]
    unsubscribe: Optional[bool]
    tag: Optional[str]
    received: float
    data: bytes
    offers: Offers

    def split(self, tokens: Any) -> tuple:
        """
        The cheap part, done with C{tokens}: C{(envelope sender, the
        L{RewrapJob} doing the CPU work)}.
        """
        settings = self.settings
        queueID, recipient = self.queueID, self.recipient
        sender = ""
        if self.hasSender:
            # VERP: the token names the queue id and the recipient.
            token = tokens.compact("v", queueID, self.index)
            sender = f"{settings.verpPrefix}+{token}@{settings.bounceDomain}"
        opens = settings.opens if self.opens is None else self.opens
        clicks = settings.clicks if self.clicks is None else self.clicks
        unsubscribe = settings.unsubscribe if self.unsubscribe is None else self.unsubscribe
        headers = []
        if unsubscribe:
            https = f"{settings.baseURL}/u/{tokens.make('u', queueID, recipient)}"
            mailto = (
                f"unsub+{tokens.compact('u', queueID, self.index)}@{settings.bounceDomain}"
            )
            headers.append(("List-Unsubscribe", f"<{https}>, <mailto:{mailto}>"))
            headers.append(("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"))
        # Those that depend on the message (Message-ID, Date) are added
        # only if missing, by the job.
        headers.append(("Message-ID", f"<{fileName(queueID)}@{settings.hostname}>"))
        headers.append(("Date", formatdate(self.received, localtime=False, usegmt=True)))
        headers.append(("Feedback-ID", self.tag or "default"))
        openURL = None
        if opens:
            openURL = f"{settings.baseURL}/t/o/{tokens.make('o', queueID, recipient)}.gif"
        job = RewrapJob(
            self.data,
            headers,
            openURL,
            (settings.baseURL, queueID, recipient) if clicks else None,
            self.offers,
        )
        return sender, job

    def run(self, signer: Any, tokens: Any) -> tuple:
        """
        Blocking and CPU-bound: C{(envelope sender, L{Prepared})}.

        @raise SigningError: DKIM signing failed.
        """
        sender, job = self.split(tokens)
        return sender, job.run(signer, tokens)


@attrs.frozen
class RewrapJob:
    """
    The CPU part of L{Rewrapper.rewrap}, picklable so that a worker process
    can do it (L{smartrelay.engine.workers}).

    @ivar data: the stored message.
    @ivar headers: (name, value) pairs to add where missing.
    @ivar openURL: the open pixel's URL, or L{None}: no open tracking.
    @ivar click: C{(base URL, queue id, recipient)} for click tracking, or
        L{None}: none.
    @ivar offers: what the next hop offers beyond 7-bit ASCII.
    """

    data: bytes
    headers: list
    openURL: Optional[str]
    click: Optional[Tuple[str, str, str]]
    offers: Offers

    def run(self, signer: Any, tokens: Any) -> Prepared:
        """
        Blocking and CPU-bound: in a thread or a worker process.

        @param signer: a L{smartrelay.engine.dkim.DKIMSigner}, or L{None}.
        @param tokens: the L{smartrelay.tokens.Tokens} for click links.
        @return: the message for the next hop, signed if its From domain
            has keys.
        @raise SigningError: DKIM signing failed.
        """
        clickURL = None
        if self.click is not None:
            base, queueID, recipient = self.click

            def clickURL(url: str) -> str:
                return f"{base}/t/c/{tokens.make('c', queueID, recipient, url)}"

        return _rewrapBlocking(
            self.data, self.headers, self.openURL, clickURL, self.offers, signer
        )


def _rewrapBlocking(
    data: bytes,
    headers: list,
    openURL: Optional[str],
    clickURL: Optional[Callable[[str], str]],
    offers: Offers,
    signer: Any,
) -> Prepared:
    """
    What L{RewrapJob.run} does.
    """
    # The SMS sender id is for the message's SMS recipients only.
    data = removeHeader(data, b"X-SmartRelay-SMS-From")
    header = headerSection(data)
    domain = fromDomain(header)
    present = b"\n" + header.lower()
    added = []
    for name, value in headers:
        # Every field is added only if the message has none of its own.
        if b"\n" + name.lower().encode("ascii") + b":" in present:
            continue
        if name == "Feedback-ID":
            value = f"{_feedbackPart(value)}:{_feedbackPart(domain or 'unknown')}:smartrelay"
        added.append(f"{name}: {value}\r\n".encode("utf-8"))
    at = _afterTrace(data)
    message = data[:at] + b"".join(added) + data[at:]
    if openURL is not None or clickURL is not None:
        from smartrelay.engine.tracking import rewriteTracking

        message = rewriteTracking(message, openURL, clickURL)
    # Downgraded before signing, so that the signature covers what is sent.
    prepared = prepare(message, offers)
    if signer is not None:
        try:
            signed = signer.sign(prepared.data, domain)
        except Exception as e:
            # Whatever went wrong (a header section dkimpy cannot parse, or
            # a dkimpy that changed under the fast path), a message of a
            # domain with keys is not sent unsigned: it is deferred.
            text = " ".join(str(e).split())
            why = f"{type(e).__name__}: {text}" if text else type(e).__name__
            raise SigningError(domain or "(no From domain)", why) from e
        prepared = attrs.evolve(prepared, data=signed)
    return prepared
