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

import attrs

from twisted.logger import Logger

from smartrelay import mime
from smartrelay.feedback import arf, autoreply, bounces, jsonreport, lhost, mimescan
from smartrelay.feedback.mailtext import (
    MAX_TEXT,
    Headers,
    addresses,
    contentTypeOf,
    decodedBody,
    headerText,
    htmlText,
    partText,
)
from smartrelay.feedback.records import FeedbackRecord, Report

__all__ = ["readReport", "splitMailbox", "queueIdIn", "MAX_REPORT"]

log = Logger()

#: Only the first this many bytes of a message are read.
MAX_REPORT = 4 * 1024 * 1024

_QUEUE_ID = re.compile(
    rb"(?im)^[ \t>]*X-SmartRelay-ID[ \t]*:[ \t]*(?:\r?\n[ \t]+)?([0-9A-F]{2}/[0-9A-F]{2}-[0-9]{5}-[0-9A-F]{8})\b"
)


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
            return match.group(1).decode("ascii").upper()
    if tree is not None:
        for part in mime.leaves(tree):
            if contentTypeOf(part).startswith(("message/", "text/rfc822")) and mimescan.transferEncodingOf(
                part
            ) in ("base64", "quoted-printable"):
                found = _QUEUE_ID.search(decodedBody(part))
                if found is not None:
                    return found.group(1).decode("ascii").upper()
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
    """
    Read C{data} as a report (see L{readReport}): an unsubscribe mail, an
    ARF complaint, a JSON notification, an auto-reply, a DSN, a bounce in
    words, a report attached to a report (up to C{depth} 2), a provider's
    complaint form or an out-of-office reply, tried in that order.
    """
    data = _MBOX_FROM.sub(b"", data, count=1)
    tree = _parseTree(data.lstrip(b"\r\n"))
    parts = list(_ownParts(tree))
    types = [contentTypeOf(part) for part in parts]
    queueId = queueIdIn(data, tree)
    head = Headers(tree)

    if autoreply.isUnsubscribe(head):
        return autoreply.unsubscribe(head)

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
        return _withQueueId(bounces.fromJSON(*notification), queueId)
    cut = lhost.bounceText(text)
    if autoreply.isAutoReply(head) and not statusParts and not _fromMailSystem(head):
        return _withQueueId(autoreply.autoReply(tree, head), queueId)

    exclude = _senders(tree, head, text[len(cut) :])
    records: list[FeedbackRecord] = []
    if statusParts:
        records = bounces.fromDeliveryStatus(head, statusParts, cut, exclude)
    else:
        embedded = lhost.deliveryStatusIn(text)
        if embedded is not None:
            records = bounces.fromDeliveryStatus(head, [embedded], cut, exclude)
    bounceLike = bool(statusParts) or _looksLikeBounce(head, cut)
    returnedRecipients = bounceLike and not records and bounces.namesReturnedRecipients(head, cut, exclude)
    if not records and bounceLike and not returnedRecipients:
        records = bounces.fromText(head, cut, exclude)
    if not records and not returnedRecipients:
        # A mailing-list manager's notice that names the list refusing.
        records = bounces.fromNotice(head, text)
    if not records and depth < 2:
        # A report forwarded as an attachment.
        for part in parts:
            for child in (part.message,) if part.message is not None else ():
                inner = _read(child.serialize(), depth + 1)
                if inner.type in ("bounce", "complaint"):
                    return _withQueueId(inner, queueId)
    if not records and bounceLike:
        records = bounces.fromReturnedRecipients(_returnedHeaders(tree, text[len(cut) :]), head, cut)
    if records:
        return _withQueueId(Report("bounce", tuple(records[: bounces.MAX_RECORDS])), queueId)

    complaint = arf.readProviderComplaint(tree)
    if complaint:
        return _withQueueId(Report("complaint", tuple(complaint)), queueId)
    if autoreply.isAutoReplySubject(head):
        return _withQueueId(autoreply.autoReply(tree, head), queueId)
    return Report("none")


def _withQueueId(report: Report, queueId: Optional[str]) -> Report:
    """
    @return: C{report} with C{queueId} on each of its records.
    """
    if queueId is None:
        return report
    return Report(report.type, tuple(attrs.evolve(record, queue_id=queueId) for record in report.records))


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
            htmlText(partText(part))
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


# What only a mail system's notices say in their subject.
_NOTICE_SUBJECT = re.compile(
    r"(?i)undeliver|returned mail|delivery status notification|mail delivery failed|failure notice"
    r"|non[- ]?delivery|delivery (?:failure|has failed)|nicht zustellbar|unzustellbar|non remis"
)


def _fromMailSystem(tree: Headers) -> bool:
    """
    Whether a message that calls itself an auto-reply (Exim's bounces say
    C{Auto-Submitted: auto-replied}) is in fact a mail system's notice: its
    sender, C{X-Failed-Recipients} or a notice's subject.
    """
    return bool(
        _BOUNCE_SENDER.search(headerText(tree.get("From")))
        or tree.get("X-Failed-Recipients")
        or _NOTICE_SUBJECT.search(headerText(tree.get("Subject")))
    )


def _looksLikeBounce(tree: Headers, text: str) -> bool:
    """
    Whether a message looks like a bounce: from the mail system, a bounce's
    subject or words, C{X-Failed-Recipients}, or the null return path.
    """
    sender = headerText(tree.get("From"))
    subject = headerText(tree.get("Subject"))
    returnPath = tree.get("Return-Path")
    return bool(
        _BOUNCE_SENDER.search(sender)
        or _BOUNCE_SUBJECT.search(subject)
        or returnPath is not None
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
