# -*- test-case-name: tests.test_feedback_report -*-
"""
The machine-readable part of a delivery status notification (RFC 3464
section 2): the per-message fields and one group of fields per recipient.

Real MTAs bend the format: groups without the blank line between them,
C{Final-Recipient} without its address type, addresses in angle brackets,
a status followed by words, a diagnostic folded over many lines.
L{readDeliveryStatus} takes all of these.
"""

import re
from typing import Optional

import attrs

from smartrelay.feedback.mailtext import (
    addressIn,
    fieldBlocks,
    normalAddress,
    replyCodeIn,
    squeeze,
    statusIn,
)

__all__ = ["RecipientStatus", "readDeliveryStatus", "remoteHost", "typedValue"]


@attrs.frozen
class RecipientStatus:
    """
    What a DSN says of one recipient; any field may be missing.
    """

    recipient: Optional[str] = None
    original: Optional[str] = None
    action: Optional[str] = None
    status: Optional[str] = None
    replycode: Optional[int] = None
    diagnostic: Optional[str] = None
    remote: Optional[str] = None
    #: the words after the status code ("4.0.0 (host name lookup
    #: failure)"), which some MTAs write instead of a Diagnostic-Code.
    statusText: Optional[str] = None


_ACTIONS = ("failed", "delayed", "delivered", "relayed", "expanded")
_ACTION_WORDS = {
    "failure": "failed",
    "fail": "failed",
    "undeliverable": "failed",
    "delay": "delayed",
    "deferred": "delayed",
    "success": "delivered",
    "deliverable": "delivered",
    "delivery": "delivered",
}


def typedValue(value: Optional[str]) -> str:
    """
    @return: the value of a typed DSN field (C{"rfc822; a@b"},
        C{"smtp; 550 ..."}, C{"dns; mx.example"}) without its type.
    """
    if not value:
        return ""
    head, semicolon, rest = value.partition(";")
    if semicolon and re.fullmatch(r"\s*[A-Za-z][\w.-]{0,20}\s*", head):
        return rest.strip()
    return value.strip()


def _action(value: Optional[str]) -> Optional[str]:
    if not value:
        return None
    word = value.strip().split(None, 1)[0].lower().strip("();.,") if value.strip() else ""
    if word in _ACTIONS:
        return word
    return _ACTION_WORDS.get(word)


def _address(value: Optional[str]) -> Optional[str]:
    """
    @return: the address of a C{Final-Recipient} / C{Original-Recipient}
        value, or L{None}.
    """
    bare = typedValue(value)
    if not bare:
        return None
    found = addressIn(bare)
    if found is not None:
        return found
    bare = normalAddress(bare)
    return bare or None


def remoteHost(value: Optional[str]) -> Optional[str]:
    """
    @return: the host name of a C{Remote-MTA} / C{Reporting-MTA} value
        (C{"dns; mx.example.net (192.0.2.1)"}), lower case, or L{None}.
    """
    bare = typedValue(value).strip("[]<> ")
    if not bare:
        return None
    # "dns; mx.example.net (192.0.2.1)" or "mx.example.net [192.0.2.1]"
    host = bare.split()[0].strip("[]()<>").rstrip(".")
    return host.lower() or None


def diagnosticValue(value: Optional[str]) -> Optional[str]:
    """
    @return: a C{Diagnostic-Code} value without its C{smtp;} type; other
        types (C{X-Unix; 255}, C{X-Postfix; ...}) are kept, as they say
        where the error came from.
    """
    if not value:
        return None
    head, semicolon, rest = value.partition(";")
    if semicolon and head.strip().lower() in ("smtp", "esmtp", "lmtp"):
        value = rest
    return squeeze(value)


def _recipientStatus(fields: dict) -> RecipientStatus:
    diagnostic = diagnosticValue(fields.get("diagnostic-code"))
    status = statusIn(fields.get("status"))
    replycode = replyCodeIn(diagnostic[:8]) if diagnostic else None
    if replycode is None and diagnostic:
        replycode = replyCodeIn(diagnostic[:200])
    remote = remoteHost(fields.get("remote-mta"))
    rawStatus = fields.get("status") or ""
    statusText = squeeze(re.sub(r"^\s*[245]\.\d{1,3}\.\d{1,3}", "", rawStatus).strip(" ()"), 500)
    return RecipientStatus(
        statusText=statusText,
        recipient=_address(fields.get("final-recipient")),
        original=_address(fields.get("original-recipient")),
        action=_action(fields.get("action")),
        status=status,
        replycode=replycode,
        diagnostic=diagnostic,
        remote=remote,
    )


_RECIPIENT_FIELDS = ("final-recipient", "original-recipient")
_PER_RECIPIENT = frozenset(
    [
        "final-recipient",
        "original-recipient",
        "action",
        "status",
        "remote-mta",
        "diagnostic-code",
        "last-attempt-date",
        "will-retry-until",
        "final-log-id",
        "x-actual-recipient",
    ]
)


def readDeliveryStatus(text: str) -> tuple[dict, list[RecipientStatus]]:
    """
    Read the body of a C{message/delivery-status} part.

    @return: the per-message fields (lower-cased names) and a
        L{RecipientStatus} per recipient group that names a recipient (or at
        least a status or action), in order.
    """
    perMessage: dict = {}
    groups: list[dict] = []
    current: Optional[dict] = None
    for block in fieldBlocks(text):
        if current is not None:
            groups.append(current)
            current = None
        for name, value in block:
            if name not in _PER_RECIPIENT:
                if current is None and not groups:
                    perMessage.setdefault(name, value)
                continue
            if current is None:
                current = {}
            elif name in current and name in _RECIPIENT_FIELDS:
                # A new recipient without the blank line between groups.
                groups.append(current)
                current = {}
            elif name in current and name in ("action", "status") and (
                "final-recipient" in current
            ):
                groups.append(current)
                current = {}
            current.setdefault(name, value)
    if current is not None:
        groups.append(current)
    result = []
    for group in groups:
        if not any(key in group for key in ("final-recipient", "original-recipient", "status", "action")):
            continue
        result.append(_recipientStatus(group))
    return perMessage, result
