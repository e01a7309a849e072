# -*- test-case-name: tests.test_feedback_report -*-
"""
Reports that are JSON documents mailed as the message body: Amazon SES
notifications (C{notificationType} / C{eventType} C{Bounce}, C{Complaint},
C{Delivery}), bare or wrapped in an SNS envelope (C{"Message": "{...}"}).
"""

import json
import re
from typing import Any, Optional

from smartrelay.feedback.mailtext import addressIn, replyCodeIn, squeeze, statusIn

__all__ = ["readJSONReport"]

# Some mailers break long lines with "!" + line break + space.
_BROKEN_LINE = re.compile(r"!\r?\n ")
_KINDS = ("Bounce", "Complaint", "Delivery")


def _document(text: str) -> Optional[dict]:
    start = text.find("{")
    if start == -1 or start > 200:
        return None
    end = text.rfind("}")
    if end <= start:
        return None
    chunk = text[start : end + 1]
    for candidate in (chunk, _BROKEN_LINE.sub("", chunk)):
        try:
            value = json.loads(candidate)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None


def _unwrap(value: dict) -> Optional[dict]:
    for _ in range(3):
        kind = value.get("notificationType") or value.get("eventType")
        if kind in _KINDS:
            return value
        inner = value.get("Message")
        if not isinstance(inner, str):
            return None
        try:
            value = json.loads(inner)
        except ValueError:
            return None
        if not isinstance(value, dict):
            return None
    return None


def _text(value: Any, limit: int = 1000) -> Optional[str]:
    return squeeze(value, limit) if isinstance(value, str) else None


def _remote(value: Any) -> Optional[str]:
    text = _text(value, 300)
    if not text:
        return None
    text = text.partition(";")[2].strip() if ";" in text else text
    return text.split()[0].lower() if text else None


def _diagnostic(value: Any) -> Optional[str]:
    text = _text(value)
    if text and re.match(r"(?i)smtp;\s*", text):
        text = text.split(";", 1)[1].strip()
    return text


def readJSONReport(text: str) -> Optional[tuple[str, list[dict]]]:
    """
    Read a JSON notification.

    @param text: the message's text.
    @return: C{(type, records)} with C{type} C{"bounce"} or
        C{"complaint"} and each record a dict of L{FeedbackRecord} fields
        (without C{type}, C{kind} and C{reason}), or L{None} if C{text} is no
        such notification.
    """
    if "{" not in text[:200]:
        return None
    document = _document(text)
    if document is None:
        return None
    document = _unwrap(document)
    if document is None:
        return None
    kind = document.get("notificationType") or document.get("eventType")
    records: list[dict] = []
    if kind == "Bounce":
        bounce = document.get("bounce") if isinstance(document.get("bounce"), dict) else {}
        remote = _remote(bounce.get("reportingMTA"))
        transient = bounce.get("bounceType") == "Transient"
        for each in bounce.get("bouncedRecipients") or []:
            if not isinstance(each, dict):
                continue
            diagnostic = _diagnostic(each.get("diagnosticCode"))
            status = statusIn(_text(each.get("status"), 20)) or statusIn(diagnostic)
            action = _text(each.get("action"), 20)
            records.append(
                dict(
                    recipient=addressIn(_text(each.get("emailAddress"), 300)),
                    action=(action or ("delayed" if transient else "failed")).lower(),
                    status=status,
                    replycode=replyCodeIn((diagnostic or "")[:8]),
                    diagnostic=diagnostic,
                    remote=remote,
                )
            )
        return "bounce", records
    if kind == "Complaint":
        complaint = document.get("complaint") if isinstance(document.get("complaint"), dict) else {}
        feedbackType = (_text(complaint.get("complaintFeedbackType"), 40) or "abuse").lower()
        for each in complaint.get("complainedRecipients") or []:
            if isinstance(each, dict):
                records.append(
                    dict(
                        recipient=addressIn(_text(each.get("emailAddress"), 300)),
                        feedback_type=feedbackType,
                        user_agent=_text(complaint.get("userAgent"), 200),
                    )
                )
        return "complaint", records
    delivery = document.get("delivery") if isinstance(document.get("delivery"), dict) else {}
    response = _text(delivery.get("smtpResponse"))
    for each in delivery.get("recipients") or []:
        address = addressIn(each) if isinstance(each, str) else None
        records.append(
            dict(
                recipient=address,
                action="delivered",
                status=statusIn(response),
                replycode=replyCodeIn((response or "")[:8]),
                diagnostic=response,
                remote=_remote(delivery.get("reportingMTA")),
            )
        )
    return "bounce", records
