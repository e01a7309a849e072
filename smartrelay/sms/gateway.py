# -*- test-case-name: tests.test_sms_gateway -*-
"""
Between mail and SMS.

* L{SMSPolicy}: which recipients are SMS (C{+E164@<[sms] domain>}), what
  text an accepted mail becomes (the text/plain part decoded from its
  charset, else the HTML part's text; the signature cut at C{"-- "}; the
  subject in front with C{subject = prepend}), the sender id and its
  TON/NPI.  The submission policy asks it at RCPT and at the end of DATA;
  the gateway asks it again when sending, so both see one text.
* L{SMSGateway}: the delivery scheduler's transport for the SMS domain
  (L{smartrelay.outbound.transport}): the parts of one recipient's
  message go out as submit_sm with a delivery receipt requested; each
  part the SMSC accepts is remembered in the store (message id → queue id,
  recipient, part) and becomes an C{sms_submitted} event.  Parts already
  accepted in an earlier attempt (the store says so) are not sent again.
* Receipts (deliver_sm / data_sm with a receipt esm_class): the TLVs first,
  then the C{id:... stat:...} text; matched through the store (so a
  receipt that arrives after a restart, or at another node, finds its
  message; one that arrives before the store has the id is looked up
  again a few times) and turned into C{sms_delivered} / C{sms_failed}.
"""

import hashlib
import re
from typing import Any, Callable, Optional

import attrs
from twisted.internet.defer import CancelledError, Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from smartrelay import mime
from smartrelay.feedback.mailtext import decodeBytes, headerText, htmlText
from smartrelay.message import SpoolEntry
from smartrelay.outbound.session import Reply
from smartrelay.outbound.transport import TransportOutcome
from smartrelay.sms.alphabet import Split, TooLong, decodeText, split
from smartrelay.sms.codec import (
    DATA_CODING_UCS2,
    ESM_RECEIPT_MASK,
    ESM_UDHI,
    MessageState,
    PDU,
    Tag,
    networkErrorCode,
)
from smartrelay.store.interfaces import SMSSubmission, smsMessageIDCandidates

#: The control header naming the sender id of an SMS.
SMS_FROM_HEADER = "X-SmartRelay-SMS-From"

_E164 = re.compile(r"\+([1-9][0-9]{6,14})")
_NUMERIC_SOURCE = re.compile(r"\+?([0-9]{1,15})")
_ALPHANUMERIC_SOURCE = re.compile(r"[A-Za-z0-9 ._&'-]{1,11}")

#: TON / NPI of the address forms.
INTERNATIONAL = (1, 1)
ALPHANUMERIC = (5, 0)
SHORT_CODE = (3, 0)

SUBJECT_MODES = ("prepend", "ignore")


class SMSRefused(ValueError):
    """
    A message or address that cannot be an SMS.

    @ivar code, status: the SMTP reply that refuses it.
    """

    code = 554
    status = "5.6.0"


class BadNumber(SMSRefused):
    code, status = 553, "5.1.3"


class EmptyText(SMSRefused):
    code, status = 554, "5.6.0"


class TextTooLong(SMSRefused):
    code, status = 554, "5.3.4"


class BadSender(SMSRefused):
    code, status = 554, "5.6.0"


def sourceAddress(text: str) -> tuple:
    """
    A sender id as C{(ton, npi, address bytes)}: an E.164 number
    (C{+393331234567}, international 1/1, sent without the C{+}), a short
    code of up to 8 digits (network specific 3/0), or an alphanumeric id
    of at most 11 characters with a letter (5/0).

    @raise BadSender: none of these.
    """
    text = text.strip()
    numeric = _NUMERIC_SOURCE.fullmatch(text)
    if numeric is not None:
        digits = numeric.group(1)
        if text.startswith("+") or len(digits) > 8:
            return (*INTERNATIONAL, digits.encode("ascii"))
        return (*SHORT_CODE, digits.encode("ascii"))
    if _ALPHANUMERIC_SOURCE.fullmatch(text) and re.search(r"[A-Za-z]", text):
        return (*ALPHANUMERIC, text.encode("ascii"))
    raise BadSender(
        f"{SMS_FROM_HEADER} must be an E.164 number (+393331234567), a short code "
        f"or at most 11 letters and digits, not {text[:40]!r}"
    )


def _bodyPart(part: mime.Part, kind: str) -> Optional[mime.Part]:
    """
    The first leaf of type text/C{kind} that is not an attachment.
    """
    if part.message is not None:
        return None
    if part.isMultipart:
        for child in part.children:
            found = _bodyPart(child, kind)
            if found is not None:
                return found
        return None
    disposition = (part.get("Content-Disposition") or "").strip().lower()
    if disposition.startswith("attachment"):
        return None
    return part if part.contentType[0] == f"text/{kind}" else None


def _cutSignature(text: str) -> str:
    lines = text.split("\n")
    for index, line in enumerate(lines):
        if line == "-- ":
            lines = lines[:index]
            break
    return "\n".join(line.rstrip() for line in lines).strip()


def mailText(data: bytes, subject: str = "ignore") -> str:
    """
    The text of an SMS for the stored message C{data}: its text/plain
    part (else its HTML part's text) decoded from its charset, line ends
    made C{\\n}, the signature cut at a C{"-- "} line; with C{subject =
    "prepend"} the decoded Subject first, on a line of its own.
    """
    message = mime.parse(data)
    part = _bodyPart(message, "plain")
    text = ""
    if part is not None:
        text = decodeBytes(part.decodedBody(), part.charset)
    else:
        html = _bodyPart(message, "html")
        if html is not None:
            text = htmlText(decodeBytes(html.decodedBody(), html.charset))
            text = re.sub(r"\n[ \t]*(?:\n[ \t]*)+", "\n", text.replace("\r", ""))
            text = re.sub(r"[ \t]+", " ", text)
    text = _cutSignature(text.replace("\r\n", "\n").replace("\r", "\n"))
    if subject == "prepend":
        title = " ".join(headerText(message.get("Subject")).split())
        if title:
            text = f"{title}\n{text}" if text else title
    return text


@attrs.frozen(kw_only=True)
class SMSPolicy:
    """
    The rules of C{[sms]} that submission and sending share.

    @ivar domain: recipients at it are SMS (lower-case).
    @ivar maxParts: most parts one SMS may take.
    @ivar subject: C{prepend} or C{ignore}.
    @ivar source: the default sender id (C{[sms] source_addr}), or L{None}.
    """

    domain: str
    maxParts: int = 5
    subject: str = "ignore"
    source: Optional[str] = None

    def isSMS(self, address: str) -> bool:
        return address.rpartition("@")[2].lower().rstrip(".") == self.domain

    def number(self, address: str) -> Optional[str]:
        """
        The E.164 digits of an SMS recipient, or L{None} for a recipient at
        another domain.

        @raise BadNumber: at the SMS domain but not C{+} and 7 to 15 digits.
        """
        local, _, domain = address.rpartition("@")
        if domain.lower().rstrip(".") != self.domain:
            return None
        match = _E164.fullmatch(local)
        if match is None:
            raise BadNumber(
                f"an SMS recipient is +<E.164 number>@{self.domain} "
                f"(7 to 15 digits, e.g. +393331234567@{self.domain})"
            )
        return match.group(1)

    def sender(self, data: bytes) -> tuple:
        """
        The C{(ton, npi, address)} the SMS of C{data} is sent from.

        @raise BadSender: a bad C{X-SmartRelay-SMS-From}, or none and no
            C{[sms] source_addr}.
        """
        header = mime.parse(data.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n").get(SMS_FROM_HEADER)
        text = header if header is not None else self.source
        if text is None or not text.strip():
            raise BadSender(f"an SMS needs a sender: {SMS_FROM_HEADER} or [sms] source_addr")
        return sourceAddress(text)

    def prepare(self, data: bytes) -> tuple:
        """
        The text, its parts and the sender of the SMS for C{data}.

        @raise EmptyText: nothing to send.
        @raise TextTooLong: more than L{maxParts} parts.
        @raise BadSender: see L{sender}.
        @return: C{(text, Split, (ton, npi, address))}
        """
        text = mailText(data, self.subject)
        if not text:
            raise EmptyText("the message has no text for an SMS (an empty text/plain part)")
        try:
            parts = split(text, self.maxParts)
        except TooLong as e:
            raise TextTooLong(
                f"the text needs {e.parts} SMS parts; at most {e.limit} are allowed"
            ) from None
        return text, parts, self.sender(data)


def concatenationReference(queue_id: str, address: str) -> int:
    """
    The concatenation reference of one recipient's SMS: the same on every
    attempt, so parts sent again join the ones sent before.
    """
    return hashlib.sha256(f"{queue_id}\0{address}".encode("utf-8")).digest()[0]


# -- receipts ---------------------------------------------------------------

_RECEIPT_FIELDS = re.compile(
    r"(?i)\b(id|sub|dlvrd|submit date|done date|stat|err):\s*([^\s]*)"
)

#: Receipt states by the TLV's number and the text's word.
_STATE_NAMES = {
    MessageState.ENROUTE: "enroute",
    MessageState.DELIVERED: "delivered",
    MessageState.EXPIRED: "expired",
    MessageState.DELETED: "deleted",
    MessageState.UNDELIVERABLE: "undeliverable",
    MessageState.ACCEPTED: "accepted",
    MessageState.UNKNOWN: "unknown",
    MessageState.REJECTED: "rejected",
}
_STATE_WORDS = {
    "DELIVRD": "delivered",
    "DELIVERED": "delivered",
    "EXPIRED": "expired",
    "DELETED": "deleted",
    "UNDELIV": "undeliverable",
    "UNDELIVERABLE": "undeliverable",
    "ACCEPTD": "accepted",
    "ACCEPTED": "accepted",
    "UNKNOWN": "unknown",
    "REJECTD": "rejected",
    "REJECTED": "rejected",
    "ENROUTE": "enroute",
}
_FINAL = {
    "delivered": "sms_delivered",
    "expired": "sms_failed",
    "deleted": "sms_failed",
    "undeliverable": "sms_failed",
    "rejected": "sms_failed",
}


@attrs.frozen
class Receipt:
    """
    A delivery receipt as read from a deliver_sm or data_sm.

    @ivar state: C{delivered}, C{expired}, C{deleted}, C{undeliverable},
        C{accepted}, C{unknown}, C{rejected} or C{enroute}; L{None} if
        neither the TLV nor the text gave one.
    """

    message_id: str
    state: Optional[str]
    error: Optional[str] = None
    network_error: Optional[str] = None
    text: str = ""

    @property
    def eventType(self) -> Optional[str]:
        return _FINAL.get(self.state or "")


def isReceipt(pdu: PDU) -> bool:
    """
    Whether a deliver_sm / data_sm is a receipt (SMSC delivery receipt,
    SME acknowledgement or intermediate notification) rather than a
    message from a phone.
    """
    return bool(pdu.get("esm_class", 0) & ESM_RECEIPT_MASK)


def readReceipt(pdu: PDU) -> Optional[Receipt]:
    """
    The receipt in C{pdu}: receipted_message_id and message_state TLVs
    first, the C{id:... stat:... err:...} text for what they leave out.
    L{None} if no message id can be found.
    """
    raw = pdu.get("short_message", b"") or pdu.tlv(Tag.message_payload) or b""
    text = decodeText(pdu.get("data_coding", 0), raw) if raw else ""
    fields = {name.lower(): value for name, value in _RECEIPT_FIELDS.findall(text)}
    messageID = pdu.tlvString(Tag.receipted_message_id)
    messageID = messageID.decode("ascii", "replace") if messageID else fields.get("id")
    if not messageID:
        return None
    number = pdu.tlvInt(Tag.message_state)
    state = _STATE_NAMES.get(number) if number is not None else None
    if state is None:
        state = _STATE_WORDS.get(fields.get("stat", "").upper())
    network = networkErrorCode(pdu)
    return Receipt(
        message_id=messageID,
        state=state,
        error=fields.get("err"),
        network_error=None if network is None else "%d:%d" % network,
        text=text[:300],
    )


# -- the transport ------------------------------------------------------------


@attrs.define(eq=False)
class SMSGateway:
    """
    The delivery scheduler's transport for the SMS domain, and the
    receiver of receipts.

    @ivar submit: C{submit(fields) -> Deferred[message id]}
        (L{SMSClient.submit <smartrelay.sms.client.SMSClient.submit>}).
    @ivar store: an L{ISMSSubmissions <smartrelay.store.interfaces.ISMSSubmissions>}.
    @ivar events: C{emit(type, queue_id, recipient, tag=, metadata=, detail=)}.
    @ivar remote: the SMSC's name in events and log lines.
    @ivar lookupDelays: seconds between look-ups of a receipt whose id the
        store does not know (yet).
    """

    policy: SMSPolicy
    submit: Callable[..., Deferred]
    store: Any
    events: Any
    clock: IReactorTime
    remote: str = "smsc"
    lookupDelays: tuple = (1.0, 5.0, 30.0, 120.0, 600.0)
    _timers: set = attrs.field(factory=set, init=False)
    _pending: set = attrs.field(factory=set, init=False)

    log = Logger()

    def handles(self, domain: str) -> bool:
        return domain.lower().rstrip(".") == self.policy.domain

    # -- sending ----------------------------------------------------------

    def deliver(self, entry: SpoolEntry, address: str, data: bytes) -> Deferred:
        return Deferred.fromCoroutine(self._deliver(entry, address, data))

    def _refused(self, error: SMSRefused) -> TransportOutcome:
        return TransportOutcome(
            Reply(error.code, error.status, str(error)),
            remote=None,
            event="sms_failed",
            detail={"reason": "rejected", "status": error.status, "diagnostic": str(error)},
        )

    async def _deliver(self, entry: SpoolEntry, address: str, data: bytes) -> TransportOutcome:
        try:
            number = self.policy.number(address)
            _, parts, (ton, npi, source) = self.policy.prepare(data)
        except SMSRefused as e:
            return self._refused(e)
        total = len(parts.parts)
        done = await self._submittedBefore(entry, address)
        messages = parts.shortMessages(concatenationReference(entry.queue_id, address))
        todo = [(n, sm) for n, sm in enumerate(messages, 1) if n not in done]
        esm = ESM_UDHI if parts.concatenated else 0
        attempts = [
            self.submit(
                {
                    "source_addr_ton": ton,
                    "source_addr_npi": npi,
                    "source_addr": source,
                    "dest_addr_ton": INTERNATIONAL[0],
                    "dest_addr_npi": INTERNATIONAL[1],
                    "destination_addr": number.encode("ascii"),
                    "esm_class": esm,
                    "registered_delivery": 1,
                    "data_coding": parts.data_coding,
                    "short_message": sm,
                }
            )
            for _, sm in todo
        ]
        results = await DeferredList(attempts, consumeErrors=True)
        ids = {n: s.message_id for n, s in done.items()}
        refused, trouble = None, None
        for (n, _), (ok, value) in zip(todo, results):
            if ok:
                ids[n] = value
                await self._submitted(entry, address, n, total, value, parts)
            elif value.check(CancelledError):
                trouble = trouble or (n, "cancelled")
            elif getattr(value.value, "temporary", True):
                trouble = trouble or (n, value.getErrorMessage() or value.type.__name__)
            else:
                refused = refused or (n, value.value)
        if refused is not None:
            n, error = refused
            name = getattr(error, "name", str(error))
            return TransportOutcome(
                Reply(550, "5.0.0", f"the SMSC refused part {n} of {total}: {name}"),
                remote=self.remote,
                event="sms_failed",
                detail={"reason": "rejected", "smpp_status": name, "part": n, "parts": total},
            )
        if trouble is not None:
            n, why = trouble
            return TransportOutcome(
                Reply(451, "4.4.2", f"part {n} of {total} not submitted: {why}"),
                remote=self.remote,
            )
        listed = ", ".join(ids[n] for n in sorted(ids))
        return TransportOutcome(
            Reply(250, "2.0.0", f"submitted in {total} part{'s' if total > 1 else ''}: {listed}"),
            remote=self.remote,
            event="",
        )

    async def _submittedBefore(self, entry: SpoolEntry, address: str) -> dict:
        try:
            found = await self.store.smsSubmissions(entry.queue_id, address)
        except Exception:
            self.log.failure(
                "could not read the parts of {queue_id} already submitted to {recipient}; "
                "sending them all",
                queue_id=entry.queue_id,
                recipient=address,
            )
            return {}
        return {s.part: s for s in found}

    async def _submitted(self, entry: SpoolEntry, address: str, part: int, total: int,
                         messageID: str, parts: Split) -> None:
        now = self.clock.seconds()
        try:
            submission = SMSSubmission(
                message_id=messageID, queue_id=entry.queue_id, recipient=address,
                part=part, parts=total, time=now, tag=entry.tag,
                metadata=dict(entry.metadata),
            )
        except ValueError:
            self.log.warn(
                "the SMSC gave {queue_id} part {part} an id that cannot be kept: {id!r}",
                queue_id=entry.queue_id, part=part, id=messageID[:80],
            )
            submission = None
        if submission is not None:
            try:
                await self.store.addSMSSubmission(submission)
            except Exception:
                self.log.failure(
                    "could not remember SMSC message id {id} of {queue_id}; "
                    "its receipt will not be matched",
                    id=messageID, queue_id=entry.queue_id,
                )
        self.events.emit(
            "sms_submitted",
            entry.queue_id,
            address,
            tag=entry.tag,
            metadata=entry.metadata or None,
            detail={
                "message_id": messageID,
                "part": part,
                "parts": total,
                "encoding": "ucs2" if parts.data_coding == DATA_CODING_UCS2 else "gsm",
                "remote": self.remote,
            },
        )

    # -- receipts ---------------------------------------------------------

    def received(self, pdu: PDU) -> None:
        """
        A deliver_sm or data_sm from the SMSC (already answered).
        """
        if not isReceipt(pdu):
            self.log.info(
                "ignoring a {name} from {source!r} that is not a delivery receipt",
                name=pdu.name, source=pdu.get("source_addr"),
            )
            return
        receipt = readReceipt(pdu)
        if receipt is None:
            self.log.warn("a delivery receipt without a message id: {text!r}",
                          text=pdu.get("short_message")[:200])
            return
        if receipt.eventType is None:
            self.log.info(
                "receipt for {id}: {state} (not final)", id=receipt.message_id,
                state=receipt.state,
            )
            return
        d = Deferred.fromCoroutine(self._match(receipt, 0))
        self._pending.add(d)
        d.addErrback(lambda f: self.log.failure("handling a receipt for {id}", f,
                                                 id=receipt.message_id))
        d.addBoth(lambda _: self._pending.discard(d))

    async def _find(self, messageID: str) -> Optional[SMSSubmission]:
        for candidate in smsMessageIDCandidates(messageID):
            found = await self.store.findSMSSubmission(candidate)
            if found is not None:
                return found
        return None

    async def _match(self, receipt: Receipt, tries: int) -> None:
        try:
            submission = await self._find(receipt.message_id)
        except Exception as e:
            submission = None
            self.log.warn("could not look up receipt {id}: {why}", id=receipt.message_id,
                          why=str(e) or type(e).__name__)
        if submission is None:
            if tries < len(self.lookupDelays):
                timer = self.clock.callLater(self.lookupDelays[tries], self._again, receipt, tries + 1)
                self._timers.add(timer)
            else:
                self.log.warn(
                    "a receipt for SMSC message id {id} ({state}) matches no message sent",
                    id=receipt.message_id, state=receipt.state,
                )
            return
        detail = {
            "message_id": receipt.message_id,
            "part": submission.part,
            "parts": submission.parts,
            "state": receipt.state,
            "remote": self.remote,
        }
        if receipt.error is not None:
            detail["error"] = receipt.error
        if receipt.network_error is not None:
            detail["network_error"] = receipt.network_error
        self.events.emit(
            receipt.eventType,
            submission.queue_id,
            submission.recipient,
            tag=submission.tag,
            metadata=submission.metadata or None,
            detail=detail,
        )

    def _again(self, receipt: Receipt, tries: int) -> None:
        self._timers = {t for t in self._timers if t.active()}
        d = Deferred.fromCoroutine(self._match(receipt, tries))
        self._pending.add(d)
        d.addBoth(lambda _: self._pending.discard(d))

    def stop(self) -> None:
        """
        Give up waiting to look up receipts again (they are logged).
        """
        for timer in self._timers:
            if timer.active():
                timer.cancel()
                self.log.warn("stopping before a receipt could be matched")
        self._timers.clear()
