# -*- test-case-name: tests.test_feedback_report -*-
"""
Read a message that came back to the relay as a L{Report}: a bounce (an
RFC 3464 DSN or a bounce in words), a complaint (ARF), an unsubscribe mail
or an auto-reply.

L{readReport} never raises: a message it cannot read is a report of type
C{"none"}.  It is pure CPU work on bytes and may run in a thread.
"""

import re
from typing import Iterator, Optional

from twisted.logger import Logger

from smartrelay import mime
from smartrelay.feedback import arf, dsn, jsonreport, lhost, mimescan
from smartrelay.feedback.mailtext import (
    MAX_TEXT,
    Headers,
    contentTypeOf,
    decodedBody,
    addressIn,
    addresses,
    headerText,
    partText,
    squeeze,
    statusIn,
)
from smartrelay.feedback.reasons import classify
from smartrelay.feedback.records import FeedbackRecord, Report

__all__ = ["readReport", "splitMailbox", "queueIdIn", "MAX_REPORT"]

log = Logger()

#: Only the first this many bytes of a message are read.
MAX_REPORT = 4 * 1024 * 1024

_QUEUE_ID = re.compile(
    rb"(?im)^[ \t>]*X-SmartRelay-ID[ \t]*:[ \t]*(?:\r?\n[ \t]+)?([0-9A-F]{2}/[0-9A-F]{2}-[0-9]{5}-[0-9A-F]{8})\b"
)
_UNSUBSCRIBE = re.compile(r"(?i)(?<![\w.+-])unsub\+[A-Za-z0-9_=-]+@")


def readReport(data: bytes) -> Report:
    """
    Read a returned message.

    @param data: the raw message (CRLF or LF line breaks), as received.
    @return: the L{Report}; type C{"none"} (no records) for anything that is
        no report, including input that is not mail at all.
    """
    try:
        return _read(bytes(data[:MAX_REPORT]))
    except Exception:
        log.failure("could not read a report of {size} bytes", size=len(data))
        return Report("none")


# An mbox "From " line that starts a message: "From SENDER DATE" (the
# date ends in a year), followed by a header field.
_MBOX_SEPARATOR = re.compile(
    rb"\r?\n(?=From \S+ [^\r\n]*\b\d{4}\b[^\r\n]*\r?\n[\x21-\x39\x3b-\x7e]+:)"
)


def splitMailbox(data: bytes) -> list:
    """
    Split a mailbox file (mbox: each message after a C{From } line) into
    its messages; anything else is one message.

    @return: the messages' bytes, in order (at least one element).
    """
    if not data.startswith(b"From "):
        return [data]
    return [chunk for chunk in _MBOX_SEPARATOR.split(data) if chunk.strip()] or [data]


def queueIdIn(data: bytes, tree: Optional[mime.Part] = None) -> Optional[str]:
    """
    @return: the relay's queue id from an C{X-SmartRelay-ID} header in
        C{data} (the returned message's, quoted or attached, also inside
        an encoded part of C{tree}), or L{None}.
    """
    if data.find(b"X-SmartRelay-ID") != -1 or data.lower().find(b"x-smartrelay-id") != -1:
        match = _QUEUE_ID.search(data)
        if match is not None:
            return match.group(1).decode("ascii")
    if tree is not None:
        for part in mime.leaves(tree):
            if contentTypeOf(part).startswith(("message/", "text/rfc822")) and mimescan.transferEncodingOf(
                part
            ) in ("base64", "quoted-printable"):
                found = _QUEUE_ID.search(decodedBody(part))
                if found is not None:
                    return found.group(1).decode("ascii")
    return None


def _ownParts(tree: mime.Part) -> Iterator[mime.Part]:
    """
    The parts of the report itself: C{tree} and its descendants, not
    descending into an attached message; a multipart whose C{boundary}
    parameter slipped onto a line of its own is split all the same.
    """
    tree = _withBoundary(tree)
    yield tree
    for child in tree.children:
        yield from _ownParts(child)


def _withBoundary(part: mime.Part) -> mime.Part:
    """
    @return: C{part}, or C{part} parsed again with a C{boundary=...} line
        that follows its C{Content-Type} (without the folding white space)
        taken as the parameter it was meant to be.
    """
    if part.isMultipart or not contentTypeOf(part).startswith("multipart/"):
        return part
    if not part.fields:
        return part
    raw = part.serialize()
    header = b"".join(part.fields)
    rest = raw[len(header) :]
    match = _BOUNDARY_LINE.match(rest)
    if match is None:
        return part
    repaired = mimescan.parse(header + b"\t" + rest[match.start(1) :], part.defaultType)
    return repaired if repaired.isMultipart else part


# A boundary parameter on a line of its own just after the header.
_BOUNDARY_LINE = re.compile(rb"[ \t]*(?:\r?\n)?[ \t]*(boundary=)", re.I)


_MBOX_FROM = re.compile(rb"\A\s*(?:From [^\n]*\n|>From [^\n]*\n)+")


# A body that is MIME without the header saying so: a boundary line
# followed by a part header.
_LOST_BOUNDARY = re.compile(rb"(?m)^--([^\s]{1,200}?)[ \t]*\r?$")


def _parseTree(data: bytes) -> mime.Part:
    """
    Parse the message, also when it is multipart without saying so (no
    C{Content-Type} but boundary lines in the body).
    """
    tree = mimescan.parse(data)
    if tree.get("Content-Type") is None and tree.separator:
        # The first boundary comes at once (perhaps after a line saying
        # this is MIME), not after the bounce's text: that would be the
        # returned message's.
        start = len(tree.header)
        match = _LOST_BOUNDARY.search(data, start, start + 400)
        if match is not None and data.count(b"--" + match.group(1)) >= 2:
            boundary = match.group(1).decode("ascii", "replace")
            newline = tree.newline
            header = f'Content-Type: multipart/mixed; boundary="{boundary}"'.encode("ascii", "replace")
            repaired = mimescan.parse(header + newline + data)
            if repaired.isMultipart:
                return repaired
    return tree


def _read(data: bytes, depth: int = 0) -> Report:
    data = _MBOX_FROM.sub(b"", data, count=1)
    tree = _parseTree(data.lstrip(b"\r\n"))
    parts = list(_ownParts(tree))
    types = [contentTypeOf(part) for part in parts]
    queueId = queueIdIn(data, tree)
    head = Headers(tree)

    if _isUnsubscribe(head):
        return _unsubscribe(head)

    feedback = [part for part, ctype in zip(parts, types) if ctype == "message/feedback-report"]
    if feedback:
        return _withQueueId(Report("complaint", tuple(arf.readFeedbackReport(tree, feedback[0]))), queueId)

    statusParts = [
        part
        for part, ctype in zip(parts, types)
        if ctype in ("message/delivery-status", "message/global-delivery-status", "text/delivery-status")
    ]
    text = _bounceText(tree, parts, types)
    notification = jsonreport.readJSONReport(text)
    if notification is not None:
        return _withQueueId(_fromJSON(*notification), queueId)
    cut = lhost.bounceText(text)
    if _isAutoReply(head) and not statusParts and not _looksLikeBounce(head, cut, nullSender=False):
        return _withQueueId(_autoReply(tree, head), queueId)

    exclude = _senders(tree, head, text[len(cut) :])
    records: list[FeedbackRecord] = []
    if statusParts:
        records = _fromDeliveryStatus(head, statusParts, cut, exclude)
    else:
        embedded = lhost.deliveryStatusIn(text)
        if embedded is not None:
            records = _fromDeliveryStatus(head, [embedded], cut, exclude)
    bounceLike = bool(statusParts) or _looksLikeBounce(head, cut)
    if not records and bounceLike:
        records = _fromText(head, cut, exclude)
    if not records and depth < 2:
        # A report forwarded as an attachment.
        for part in parts:
            for child in (part.message,) if part.message is not None else ():
                inner = _read(child.serialize(), depth + 1)
                if inner.type in ("bounce", "complaint"):
                    return _withQueueId(inner, queueId)
    if not records and bounceLike:
        records = _fromReturnedRecipients(tree, head, text[len(cut) :], cut)
    if records:
        return _withQueueId(Report("bounce", tuple(records[:MAX_RECORDS])), queueId)

    complaint = arf.readProviderComplaint(tree)
    if complaint:
        return _withQueueId(Report("complaint", tuple(complaint)), queueId)
    if _isAutoReplySubject(head):
        return _withQueueId(_autoReply(tree, head), queueId)
    return Report("none")


def _withQueueId(report: Report, queueId: Optional[str]) -> Report:
    if queueId is None:
        return report
    return Report(
        report.type,
        tuple(_replace(record, queue_id=queueId) for record in report.records),
    )


def _replace(record: FeedbackRecord, **changes) -> FeedbackRecord:
    values = {
        name: getattr(record, name)
        for name in (
            "type",
            "recipient",
            "action",
            "status",
            "replycode",
            "diagnostic",
            "remote",
            "queue_id",
            "kind",
            "reason",
            "feedback_type",
            "source_ip",
            "user_agent",
        )
    }
    values.update(changes)
    return FeedbackRecord(**values)


# ---------------------------------------------------------------------------
# Bounces


def _bounceText(tree: mime.Part, parts: list, types: list) -> str:
    """
    The human-readable text of the report: its own C{text/plain} parts
    (else its HTML with the tags taken out), not the returned message's.
    """
    texts = [
        partText(part)
        for part, ctype in zip(parts, types)
        if ctype == "text/plain" and not part.isMultipart and not _isInlineMessage(part)
    ]
    if not texts:
        texts = [
            _htmlText(partText(part))
            for part, ctype in zip(parts, types)
            if ctype == "text/html" and not part.isMultipart
        ]
    if not texts and not tree.isMultipart and tree.message is None:
        texts = [partText(tree)]
    text = "\n\n".join(texts)[:MAX_TEXT].replace("\r\n", "\n")
    # No bounce writes lines this long; cutting them keeps every heuristic
    # linear in the size of the text.
    return _LONG_LINE.sub(lambda match: match.group(0)[:MAX_LINE], text)


#: Lines of a report's text are cut to this many characters.
MAX_LINE = 2000
_LONG_LINE = re.compile(r"[^\n]{%d,}" % (MAX_LINE + 1))
#: At most this many records are read from one message.
MAX_RECORDS = 1000


_TAG = re.compile(r"(?s)<(?:style|script)\b.*?</(?:style|script)\s*>|<br\s*/?>|</?(?:p|div|tr|li|h\d)\b[^>]*>|<[^>]*>")
_ENTITIES = {"&nbsp;": " ", "&lt;": "<", "&gt;": ">", "&amp;": "&", "&quot;": '"', "&#39;": "'"}


def _htmlText(html: str) -> str:
    def replace(match):
        tag = match.group(0).lower()
        if tag.startswith(("<br", "<p", "</p", "<div", "</div", "<tr", "</tr", "<li", "<h", "</h")):
            return "\n"
        return ""

    text = _TAG.sub(replace, html)
    for entity, char in _ENTITIES.items():
        text = text.replace(entity, char)
    return text


_TRACE_FIELDS = (b"received:", b"return-path:", b"message-id:", b"dkim-signature:")
_MESSAGE_FIELDS = (b"from:", b"to:", b"subject:", b"date:")


def _isInlineMessage(part: mime.Part) -> bool:
    """
    Whether C{part} is a returned message put in as a body part of its own
    (its header is a message's header: trace fields and From, To, Subject
    or Date; a bounce's own text parts have none of these).
    """
    if contentTypeOf(part) != "text/plain" or not part.fields:
        return False
    names = [raw[:16].lower() for raw in part.fields]
    return any(name.startswith(_TRACE_FIELDS) for name in names) and any(
        name.startswith(_MESSAGE_FIELDS) for name in names
    )


def _returnedHeaders(tree: mime.Part, quoted: str) -> Optional[mime.Part]:
    for part in mime.walk(tree):
        if part is tree:
            continue
        if part.message is not None:
            return part.message
        if _isInlineMessage(part):
            return part
        if contentTypeOf(part) in ("message/rfc822", "text/rfc822-headers", "message/rfc822-headers"):
            return mimescan.parse(decodedBody(part))
    if quoted:
        start = re.search(r"(?m)^[A-Za-z][\w-]*:[ \t]", quoted)
        if start is not None:
            return mimescan.parse(quoted[start.start() :].encode("utf-8", "replace"))
    return None


def _senders(tree: mime.Part, head: Headers, quoted: str) -> set:
    """
    The addresses that are certainly not failed recipients: the report's
    own addressee and sender, the returned message's sender.
    """
    found = set()
    returned = _returnedHeaders(tree, quoted)
    for part, names in (
        (head, ("To", "From", "Return-Path", "Reply-To", "Sender")),
        (Headers(returned) if returned is not None else None, ("From", "Return-Path", "Sender", "Reply-To")),
    ):
        if part is None:
            continue
        for name in names:
            for _, address in addresses(headerText(part.get(name))):
                found.add(address.lower())
    return found


_BOUNCE_SENDER = re.compile(
    r"(?i)mailer-daemon|mailer_daemon|post_?master|mail delivery|mail-daemon|maildaemon|mdaemon"
    r"|delivery subsystem|mail administrator|mail system|bounce|nicht zustellbar|^\s*<?>?\s*$"
)
_BOUNCE_SUBJECT = re.compile(
    r"(?i)undeliver|undelivered|deliver(?:y|ed)? (?:status|fail|failure|problem|report|notification)"
    r"|returned mail|return(?:ed)? to sender|failure notice|delivery (?:has )?failed|non[- ]?delivery"
    r"|could not be delivered|couldn't be delivered|not delivered|mail delivery|bounce|rejected"
    r"|nondeliverable|unzustellbar|unable to deliver|delivery error|error sending|mail system error"
    r"|delayed mail|delivery delayed|warning: could not send|message not delivered|undeliverable"
    r"|permanent error|fatal error|mail failure|\bnotification\b|retry time|unknown user|user unknown"
    # ... and in other languages
    r"|nicht zustellbar|zustellung fehlgeschlagen|non remis|[ée]chec de (?:la )?(?:remise|distribution)"
    r"|non distribuable|no se (?:puede|pudo) entregar|no entregado|devuelto|n[ãa]o[ _]entregue"
    r"|falha na entrega|onbestelbaar|mancata consegna|non recapitabile|не доставлен|недоставлен"
    r"|エラー|不達|配信不能|返送|送信できません|退信|未送达|无法投递|傳送失敗"
)
_BOUNCE_WORDS = re.compile(  # against lower-cased text
    r"could not be delivered|couldn't be delivered|not be delivered|was not delivered"
    r"|delivery (?:to the following|has failed|failed)|unable to deliver|permanent (?:error|fatal)"
    r"|following address(?:es)? failed|undeliverable|mail delivery software|qmail-send|"
    r"wasn't able to deliver|delivery (?:status|failure)|returned to (?:the )?sender|failed permanently"
)


def _looksLikeBounce(tree: Headers, text: str, nullSender: bool = True) -> bool:
    """
    Whether a message looks like a bounce: from the mail system, a bounce's
    subject or words, C{X-Failed-Recipients}, or (when C{nullSender}) the
    null return path (which auto-replies use too).
    """
    sender = headerText(tree.get("From"))
    subject = headerText(tree.get("Subject"))
    returnPath = tree.get("Return-Path")
    return bool(
        _BOUNCE_SENDER.search(sender)
        or _BOUNCE_SUBJECT.search(subject)
        or nullSender
        and returnPath is not None
        and returnPath.strip() in ("<>", "")
        or tree.get("X-Failed-Recipients")
        # A person's mail may say "could not be delivered" too: the words
        # count when the message says it was generated by software.
        or _isGenerated(tree)
        and _BOUNCE_WORDS.search(text[:3000].lower())
    )


def _isGenerated(tree: Headers) -> bool:
    """
    Whether a message says it was generated by software (C{Auto-Submitted}
    other than C{no}, a C{Precedence} of bulk, junk or list), or has no
    C{From} at all.
    """
    submitted = (tree.get("Auto-Submitted") or "no").strip().lower()
    precedence = (tree.get("Precedence") or "").strip().lower()
    return (
        not submitted.startswith("no")
        or precedence in ("bulk", "junk", "list")
        or tree.get("From") is None
    )


def _failedRecipientsHeader(tree: Headers) -> list[str]:
    found = []
    for value in tree.getAll("X-Failed-Recipients"):
        for _, address in addresses(headerText(value)):
            if address.lower() not in (each.lower() for each in found):
                found.append(address)
    return found


def _bounceRecord(
    recipient: Optional[str],
    action: Optional[str],
    status: Optional[str],
    replycode: Optional[int],
    diagnostic: Optional[str],
    remote: Optional[str],
    command: Optional[str] = None,
) -> FeedbackRecord:
    verdict = classify(status, replycode, diagnostic, action, command)
    kind = verdict.kind
    if action == "delayed":
        kind = "soft"
    return FeedbackRecord(
        type="bounce",
        recipient=recipient,
        action=action,
        status=status or verdict.status,
        replycode=replycode,
        diagnostic=diagnostic,
        remote=remote,
        kind=kind,
        reason=verdict.reason,
    )


# Delivery-status fields quoted in a report's text are no diagnostic.
_DSN_LINES = re.compile(
    r"(?im)^[ \t]*(?:Final-Recipient|Original-Recipient|Action|Status|Remote-MTA|Reporting-MTA"
    r"|Received-From-MTA|Arrival-Date|Last-Attempt-Date|Will-Retry-Until|X-Actual-Recipient"
    r"|Diagnostic-Code|X-[\w-]*Queue-ID|X-Postfix-Sender)[ \t]*:[^\n]*(?:\n[ \t]+[^\n]*)*\n?"
)
_USABLE = re.compile(r"[^\s@<>:]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+\.?")


def _usable(address: Optional[str]) -> Optional[str]:
    """
    @return: C{address} if it is a whole e-mail address (a local part, a
        domain with a dot; no source route), else L{None}.
    """
    if address and _USABLE.fullmatch(address.strip('"')) or address and address.startswith('"') and "@" in address:
        return address
    return None


def _fromDeliveryStatus(
    tree: Headers, statusParts: list, text: str, exclude: set
) -> list[FeedbackRecord]:
    records = []
    textual = None
    hinted = lhost.commandIn(text) is not None
    for part in statusParts:
        if isinstance(part, str):
            body = part
        else:
            body = partText(part)
            if not body.strip() and part.message is not None:
                body = part.message.serialize().decode("utf-8", "replace")
        perMessage, recipients = dsn.readDeliveryStatus(body)
        fallback: Optional[list] = None
        for index, each in enumerate(recipients[:MAX_RECORDS]):
            recipient = _usable(each.recipient) or _usable(each.original)
            if recipient is None:
                if fallback is None:
                    fallback = [
                        found.address for found in lhost.failedRecipients(text, exclude)
                    ] or _failedRecipientsHeader(tree)
                if index < len(fallback):
                    recipient = fallback[index]
                else:
                    recipient = each.recipient or each.original
            diagnostic, status, replycode, remote = (
                each.diagnostic,
                each.status,
                each.replycode,
                each.remote,
            )
            command = None
            wantsHint = hinted and lhost.commandIn(diagnostic or "") is None
            if not diagnostic or replycode is None or remote is None or wantsHint:
                if textual is None:
                    known = [r.recipient for r in recipients if r.recipient]
                    textual = {
                        found.address.lower(): found
                        for found in lhost.failedRecipients(text, exclude, known, trusted=True)
                    }
                found = textual.get((recipient or "").lower())
                if found is None and len(recipients) == 1 and len(textual) == 1:
                    found = next(iter(textual.values()))
                if found is not None:
                    extra = lhost.details(_DSN_LINES.sub("", found.text), found.address)
                    if wantsHint:
                        command = lhost.commandIn(found.text)
                    diagnostic = diagnostic or extra["diagnostic"]
                    replycode = replycode or (extra["replycode"] if not each.diagnostic else None)
                    remote = remote or extra["remote"]
                    status = status or extra["status"]
            if not diagnostic and len(recipients) == 1 and (status is None or status.endswith(".0.0")):
                # A status that names no reason and no words about the
                # address: the report's words are all there is.
                diagnostic = squeeze(_DSN_LINES.sub("", text), 1000)
            if not each.diagnostic and each.statusText:
                # "Status: 4.0.0 (host name lookup failure)" says more
                # than the text around the address.
                diagnostic = each.statusText
            if status is None:
                status = statusIn(diagnostic)
            action = each.action
            if action is None:
                action = "delayed" if status and status.startswith("4") and lhost.isDelay(
                    headerText(tree.get("Subject")), text
                ) else "failed"
            if action in ("delivered", "relayed", "expanded") and not status:
                continue
            records.append(
                _bounceRecord(recipient, action, status, replycode, diagnostic, remote, command)
            )
    return records


def _fromJSON(kind: str, found: list) -> Report:
    if kind == "complaint":
        records = [FeedbackRecord(type="complaint", reason="feedback", **each) for each in found]
    else:
        records = [
            _bounceRecord(
                each["recipient"],
                each["action"],
                each["status"],
                each["replycode"],
                each["diagnostic"],
                each["remote"],
            )
            for each in found
        ]
    return Report(kind if records else "none", tuple(records))


def _fromReturnedRecipients(tree: mime.Part, head: Headers, quoted: str, text: str) -> list[FeedbackRecord]:
    """
    For a bounce whose text names no recipient: the recipients the returned
    message was addressed to, with the bounce's text as the diagnostic.
    """
    returned = _returnedHeaders(tree, quoted)
    if returned is None:
        return []
    found: list[str] = []
    for name in ("To", "Cc"):
        for _, address in addresses(headerText(returned.get(name))):
            if address.lower() not in (each.lower() for each in found):
                found.append(address)
    if not found:
        return []
    extra = lhost.details(text, "")
    action = "delayed" if lhost.isDelay(headerText(head.get("Subject")), text) else "failed"
    return [
        _bounceRecord(address, action, extra["status"], extra["replycode"], extra["diagnostic"], extra["remote"])
        for address in found
    ]


def _fromText(tree: Headers, text: str, exclude: set) -> list[FeedbackRecord]:
    subject = headerText(tree.get("Subject"))
    known = _failedRecipientsHeader(tree)
    found = lhost.failedRecipients(text, exclude, known)
    if not found:
        return []
    action = "delayed" if lhost.isDelay(subject, text) else "failed"
    records = []
    for each in found:
        extra = lhost.details(each.text, each.address)
        records.append(
            _bounceRecord(
                each.address,
                action,
                extra["status"],
                extra["replycode"],
                extra["diagnostic"],
                extra["remote"],
                lhost.commandIn(each.text),
            )
        )
    return records


# ---------------------------------------------------------------------------
# Auto-replies and unsubscribe mail

_AUTO_SUBJECT = re.compile(
    r"(?i)^\s*(?:\[?auto(?:matic|matische)?[ -]?(?:reply|response|responder|antwort|answer)\]?"
    r"|autoreply|auto-reply|out of (?:the )?office|ooo\b|vacation|away from (?:the|my) office"
    r"|abwesenheit|absence|r[ée]ponse automatique|risposta automatica|respuesta autom[áa]tica"
    r"|automatisch antwoord|fuera de la oficina|on (?:annual )?leave|i am (?:currently )?(?:away|out)"
    r"|i'm (?:currently )?(?:away|out)|\u81ea\u52d5\u5fdc\u7b54|\u4e0d\u5728)"
)
_AUTO_BODY = re.compile(
    r"(?i)out of (?:the )?office|on vacation|i am (?:currently )?(?:away|out)|i'm (?:currently )?(?:away|out)"
    r"|away from (?:the|my) office|limited access to (?:my )?e-?mail|will be back|returning on"
)


def _isAutoReply(tree: Headers) -> bool:
    submitted = (tree.get("Auto-Submitted") or "").strip().lower()
    if submitted.startswith("auto-replied") or submitted.startswith("auto-notified"):
        return True
    for name in ("X-Autoreply", "X-Autorespond", "X-Autoresponder", "X-Mail-Autoreply", "X-Vacation"):
        value = tree.get(name)
        if value is not None and value.strip().lower() not in ("no", "false", "0"):
            return True
    if (tree.get("Precedence") or "").strip().lower() == "auto_reply":
        return True
    if (tree.get("X-Autogenerated") or "").strip().lower() == "reply":
        return True
    if (tree.get("X-Auto-Response-Suppress") or "") and _AUTO_SUBJECT.search(headerText(tree.get("Subject"))):
        return True
    return False


def _isAutoReplySubject(tree: Headers) -> bool:
    return _AUTO_SUBJECT.search(headerText(tree.get("Subject"))) is not None


def _autoReply(tree: mime.Part, head: Headers) -> Report:
    text = ""
    for part in mime.leaves(tree):
        ctype = contentTypeOf(part)
        if ctype == "text/plain":
            text = partText(part, 4000)
            break
        if ctype == "text/html" and not text:
            text = _htmlText(partText(part, 8000))
    sender = addressIn(headerText(head.get("From"))) or addressIn(head.get("Return-Path"))
    return Report(
        "autoreply",
        (
            FeedbackRecord(
                type="autoreply",
                recipient=sender,
                reason="vacation",
                diagnostic=squeeze(text, 500),
            ),
        ),
    )


def _isUnsubscribe(tree: Headers) -> bool:
    for name in ("To", "Delivered-To", "X-Original-To", "Envelope-To", "X-Envelope-To", "Cc"):
        for value in tree.getAll(name):
            if _UNSUBSCRIBE.search(value):
                return True
    return False


def _unsubscribe(tree: Headers) -> Report:
    sender = addressIn(headerText(tree.get("From"))) or addressIn(tree.get("Return-Path"))
    return Report(
        "unsubscribe",
        (
            FeedbackRecord(
                type="unsubscribe",
                recipient=sender,
                diagnostic=squeeze(headerText(tree.get("Subject")), 200),
            ),
        ),
    )
