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
from typing import Iterable

from smartrelay.events import Event

FORMATS = ("jsonl", "csv")

#: The CSV columns: the keys of DESIGN section 1.7, in its order.
COLUMNS = ("id", "time", "type", "queue_id", "recipient", "tag", "metadata", "detail")

_compact = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def _asDict(event) -> dict:
    return event if isinstance(event, dict) else event.asDict()


def jsonLine(event) -> str:
    """
    One event (an L{Event}, or its section 1.7 object as the API gives it)
    as a line of JSON (with its newline).
    """
    return _compact(_asDict(event)) + "\n"


def csvRow(event) -> list:
    """
    One event (as for L{jsonLine}) as CSV fields.
    """
    d = _asDict(event)
    row = []
    for key in COLUMNS:
        value = d.get(key)
        if key in ("metadata", "detail"):
            value = _compact(value)
        row.append("" if value is None else value)
    return row


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
