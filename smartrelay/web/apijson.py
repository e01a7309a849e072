"""
The JSON documents of the HTTP API (L{smartrelay.web.api}) built from the
relay's objects: suppression entries, rates, a message's envelope and
recipients (from the spool's entry while it is queued, else from its
events), queue items.
"""

from typing import Optional

from smartrelay.events import rfc3339
from smartrelay.store.interfaces import SuppressionEntry

__all__ = [
    "envelope",
    "envelopeFromEvents",
    "headerBlock",
    "headersFromEvents",
    "optionalTime",
    "queueItem",
    "rates",
    "recipientsFromEvents",
    "suppressionJSON",
]


#: The recipient state an event leaves, for messages no longer queued.
_STATE_OF_EVENT = {
    "accepted": "queued",
    "deferred": "deferred",
    "delivered": "delivered",
    "bounced": "bounced",
    "expired": "expired",
    "suppressed": "suppressed",
    "rejected": "rejected",
}


def optionalTime(value: Optional[float]) -> Optional[str]:
    return None if value is None or not value else rfc3339(value)


def suppressionJSON(entry: SuppressionEntry) -> dict:
    return {
        "address": entry.address,
        "reason": entry.reason,
        "source_event": entry.source_event,
        "time": rfc3339(entry.time),
        "expires": None if entry.expires is None else rfc3339(entry.expires),
    }


def _rate(numerator: int, denominator: int) -> Optional[float]:
    return numerator / denominator if denominator else None


def rates(counts: dict, hard: int, soft: int, opens: int, clicks: int) -> dict:
    delivered = counts.get("delivered", 0)
    attempts = delivered + counts.get("bounced", 0) + counts.get("expired", 0)
    return {
        "delivery": _rate(delivered, attempts),
        "bounce": _rate(counts.get("bounced", 0), attempts),
        "hard_bounce": _rate(hard, attempts),
        "soft_bounce": _rate(soft, attempts),
        "complaint": _rate(counts.get("complained", 0), delivered),
        "unsubscribe": _rate(counts.get("unsubscribed", 0), delivered),
        "unique_open": _rate(opens, delivered),
        "unique_click": _rate(clicks, delivered),
        # SMS parts: delivered / (delivered + failed), from the SMSC's receipts.
        "sms_delivery": _rate(counts.get("sms_delivered", 0),
                              counts.get("sms_delivered", 0) + counts.get("sms_failed", 0)),
    }


def headerBlock(data: bytes) -> str:
    end = data.find(b"\r\n\r\n")
    block = data if end < 0 else data[: end + 2]
    return block.decode("utf-8", "replace")


def envelope(entry) -> dict:
    return {
        "sender": entry.sender,
        "recipients": [r.address for r in entry.recipients],
        "received": rfc3339(entry.received),
        "size": entry.size,
        "client": entry.client,
        "tag": entry.tag,
        "metadata": entry.metadata,
    }


def queueItem(entry, recipients: list) -> dict:
    return {
        "queue_id": entry.queue_id,
        "sender": entry.sender,
        "received": rfc3339(entry.received),
        "size": entry.size,
        "tag": entry.tag,
        "recipients": recipients,
    }


def envelopeFromEvents(events: list) -> dict:
    accepted = [e for e in events if e.type == "accepted"]
    first = accepted[0] if accepted else events[0]
    detail = first.detail or {}
    return {
        "sender": detail.get("sender"),
        "recipients": [e.recipient for e in accepted],
        "received": rfc3339(first.time) if accepted else None,
        "size": detail.get("size"),
        "client": detail.get("client"),
        "tag": first.tag,
        "metadata": first.metadata,
    }


def recipientsFromEvents(events: list) -> list:
    recipients: dict = {}
    for event in events:
        if event.recipient is None or event.type not in _STATE_OF_EVENT:
            continue
        recipient = recipients.setdefault(
            event.recipient,
            {
                "address": event.recipient,
                "state": "queued",
                "attempts": 0,
                "next_attempt": None,
                "attempting": False,
                "last_reply": None,
            },
        )
        recipient["state"] = _STATE_OF_EVENT[event.type]
        detail = event.detail or {}
        if event.type in ("deferred", "delivered") or (
            event.type == "bounced" and detail.get("source") != "dsn"
        ):
            recipient["attempts"] += 1
        if event.type == "deferred":
            recipient["next_attempt"] = detail.get("next_attempt")
        else:
            recipient["next_attempt"] = None
    return list(recipients.values())


def headersFromEvents(events: list) -> Optional[str]:
    for event in events:
        if event.type == "accepted" and isinstance((event.detail or {}).get("headers"), str):
            return event.detail["headers"]
    return None
