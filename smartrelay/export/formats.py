"""
How events are written out, for the export files and C{smartrelay
export}: JSON lines (one DESIGN section 1.7 object a line, keys in that
order) or CSV (RFC 4180: a header row of the section 1.7 keys, CRLF line
ends, C{metadata} and C{detail} as JSON text, C{null} as an empty field).

Pure functions, safe in any thread.
"""

import csv
import io
import json
import math
from datetime import datetime, timezone
from typing import Iterable

from smartrelay.events import Event

FORMATS = ("jsonl", "csv")

#: The CSV columns: the keys of DESIGN section 1.7, in its order.
COLUMNS = ("id", "time", "type", "queue_id", "recipient", "tag", "metadata", "detail")

_compact = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_string = json.encoder.encode_basestring

# rfc3339() of the last whole second seen: events of a page mostly share
# their second, and strftime is a good part of an event's cost.
_second = [None, ""]


def rfc3339(seconds: float) -> str:
    """
    L{smartrelay.events.rfc3339}, faster: the same text for every time
    (datetime's own rounding to microseconds, then milliseconds).
    """
    frac, whole = math.modf(seconds)
    micro = round(frac * 1e6)
    if micro >= 1000000:
        micro -= 1000000
        whole += 1.0
    elif micro < 0:
        micro += 1000000
        whole -= 1.0
    if _second[0] != whole:
        _second[1] = datetime.fromtimestamp(whole, tz=timezone.utc).strftime(
            "%Y-%m-%dT%H:%M:%S."
        )
        _second[0] = whole
    return _second[1] + "%03dZ" % (micro // 1000)


def _asDict(event) -> dict:
    return event if isinstance(event, dict) else event.asDict()


def _text(value) -> str:
    return "null" if value is None else _string(value)


def _object(value) -> str:
    return "{}" if not value else _compact(value)


def jsonLine(event) -> str:
    """
    One event (an L{Event}, or its section 1.7 object as the API gives it)
    as a line of JSON (with its newline): the section 1.7 keys in order,
    no spaces.
    """
    if isinstance(event, dict):
        return _compact(event) + "\n"
    return (
        '{"id":' + _string(event.id)
        + ',"time":"' + rfc3339(event.time)
        + '","type":' + _string(event.type)
        + ',"queue_id":' + _text(event.queue_id)
        + ',"recipient":' + _text(event.recipient)
        + ',"tag":' + _text(event.tag)
        + ',"metadata":' + _object(event.metadata)
        + ',"detail":' + _object(event.detail)
        + "}\n"
    )


def csvRow(event) -> list:
    """
    One event (as for L{jsonLine}) as CSV fields.
    """
    if isinstance(event, dict):
        row = []
        for key in COLUMNS:
            value = event.get(key)
            if key in ("metadata", "detail"):
                value = _compact(value)
            row.append("" if value is None else value)
        return row
    return [
        event.id, rfc3339(event.time), event.type,
        "" if event.queue_id is None else event.queue_id,
        "" if event.recipient is None else event.recipient,
        "" if event.tag is None else event.tag,
        _object(event.metadata), _object(event.detail),
    ]


def header(format: str) -> str:
    """
    What a file (or an output stream) of C{format} starts with.
    """
    if format == "csv":
        return encodeRows([list(COLUMNS)])
    return ""


def encodeRows(rows: list) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator="\r\n").writerows(rows)
    return out.getvalue()


def encode(format: str, events: Iterable[Event]) -> str:
    """
    C{events} as text of C{format} (without the header).
    """
    if format == "csv":
        return encodeRows([csvRow(event) for event in events])
    if format == "jsonl":
        return "".join(jsonLine(event) for event in events)
    raise ValueError(f"unknown format {format!r}")


def extension(format: str, gzip: bool) -> str:
    """
    The file name extension of an export file.
    """
    return "." + format + (".gz" if gzip else "")
