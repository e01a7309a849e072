# -*- test-case-name: tests.test_feedback_report -*-
"""
Complaints: the Abuse Reporting Format (RFC 5965, RFC 6591 for
authentication failures, RFC 6650 for its use) and the provider variants
that send the complained-about message without a machine-readable part
(Microsoft's JMRP and the old Hotmail forms, AOL's "Client TOS
Notification").
"""

import re
from typing import Optional

from smartrelay import mime
from smartrelay.feedback import mimescan
from smartrelay.feedback.mailtext import (
    addressIn,
    addresses,
    contentTypeOf,
    decodedBody,
    fieldBlocks,
    headerText,
    partText,
    squeeze,
)
from smartrelay.feedback.records import FeedbackRecord

__all__ = ["readFeedbackReport", "readProviderComplaint", "FEEDBACK_TYPES"]

#: The feedback types of RFC 5965 and RFC 6650 (and the "dmarc" some send).
FEEDBACK_TYPES = frozenset(
    ["abuse", "fraud", "virus", "other", "not-spam", "auth-failure", "opt-out", "dmarc"]
)


def _feedbackType(value: Optional[str]) -> str:
    word = (value or "").strip().split(None, 1)[0].lower().strip(";,.") if (value or "").strip() else ""
    if word in FEEDBACK_TYPES:
        return word
    if word in ("opt_out", "unsubscribe", "optout"):
        return "opt-out"
    if word in ("spam", "complaint"):
        return "abuse"
    return "other" if word else "abuse"


def _embeddedHeaders(tree: mime.Part) -> Optional[mime.Part]:
    """
    @return: the returned message (C{message/rfc822}) or its headers
        (C{text/rfc822-headers}) inside C{tree}, parsed, or L{None}.
    """
    for part in mime.walk(tree):
        if part is tree:
            continue
        ctype = contentTypeOf(part)
        if part.message is not None:
            return part.message
        if ctype in ("message/rfc822", "text/rfc822-headers", "message/rfc822-headers"):
            return mimescan.parse(decodedBody(part))
    return None


def _embeddedRecipients(inner: Optional[mime.Part]) -> list[str]:
    if inner is None:
        return []
    # Microsoft's reports name the complaining mailbox in
    # X-HmXmrOriginalRecipient (the To may be anyone's or redacted).
    for name in ("X-HmXmrOriginalRecipient", "To", "X-Original-To", "Delivered-To"):
        found = [address for _, address in addresses(headerText(inner.get(name)))]
        if found:
            return found
    return []


def _ip(value: Optional[str]) -> Optional[str]:
    value = (value or "").strip().strip("[]")
    return value.split()[0] if value else None


def readFeedbackReport(tree: mime.Part, report: mime.Part) -> list[FeedbackRecord]:
    """
    Read an RFC 5965 report.

    @param tree: the whole message.
    @param report: its C{message/feedback-report} part.
    @return: one record per C{Original-Rcpt-To} (else per recipient of the
        embedded message, else one record without a recipient).
    """
    fields: dict = {}
    recipients: list[str] = []
    for block in fieldBlocks(partText(report)):
        for name, value in block:
            if name in ("original-rcpt-to", "removal-recipient"):
                address = addressIn(value)
                if address and address not in recipients:
                    recipients.append(address)
            else:
                fields.setdefault(name, value)
    if not recipients:
        recipients = _embeddedRecipients(_embeddedHeaders(tree))
    feedbackType = _feedbackType(fields.get("feedback-type"))
    common = dict(
        type="complaint",
        reason="feedback",
        feedback_type=feedbackType,
        source_ip=_ip(fields.get("source-ip")),
        user_agent=squeeze(fields.get("user-agent"), 200),
        diagnostic=_humanText(tree),
        remote=_host(fields.get("reporting-mta")),
    )
    return [FeedbackRecord(recipient=each, **common) for each in recipients or [None]]


def _host(value: Optional[str]) -> Optional[str]:
    value = (value or "").partition(";")[2] or (value or "")
    value = value.strip()
    return value.split()[0].lower() if value else None


def _humanText(tree: mime.Part) -> Optional[str]:
    for part in mime.leaves(tree):
        if contentTypeOf(part) == "text/plain":
            return squeeze(partText(part, 4000), 500)
    return None


_PROVIDER_MARKERS = re.compile(
    r"(?i)^(?:X-HmXmrOriginalRecipient|X-MS-Exchange-Organization-FeedbackLoop"
    r"|X-AOL-IP|X-Original-Rcpt-To)\s*:",
    re.M,
)
_COMPLAINT_SUBJECT = re.compile(
    r"(?i)complaint about message from|client tos notification|abuse report"
    r"|\bfbl\b|spam report|feedback loop|junk mail report",
)


def readProviderComplaint(tree: mime.Part) -> Optional[list[FeedbackRecord]]:
    """
    Read a complaint without a C{message/feedback-report} part: a JMRP or
    Hotmail report (the complained-about message attached, the recipient in
    C{X-HmXmrOriginalRecipient}) or an AOL notification.

    @return: the records, or L{None} if C{tree} is no such complaint.
    """
    subject = headerText(tree.get("Subject"))
    inner = _embeddedHeaders(tree)
    if inner is None:
        return None
    original = inner.get("X-HmXmrOriginalRecipient") or tree.get("X-HmXmrOriginalRecipient")
    if original is None and not _COMPLAINT_SUBJECT.search(subject):
        return None
    recipients = [addressIn(original)] if addressIn(original) else _embeddedRecipients(inner)
    common = dict(
        type="complaint",
        reason="feedback",
        feedback_type="abuse",
        source_ip=None,
        user_agent=squeeze(tree.get("X-Mailer") or tree.get("User-Agent"), 200),
        diagnostic=_humanText(tree),
    )
    return [FeedbackRecord(recipient=each, **common) for each in recipients or [None]]
