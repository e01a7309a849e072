"""
What a request to the HTTP API (L{smartrelay.web.api}) may say, read and
checked: the errors (L{ApiError}, with the parameter to blame), times
(L{parseTime}), query strings (L{Query}: unknown or repeated parameters
refused, values by type), queue ids and addresses, the queue list's
cursors, and the CSV of a bulk import.  The OpenAPI document
(L{smartrelay.web.openapi}) uses the same patterns.
"""

import base64
import binascii
import csv
import io
import json
import re
from datetime import datetime, timezone
from typing import Optional

from smartrelay.events import EVENT_TYPES
from smartrelay.ids import QUEUE_ID_RE
from smartrelay.store.interfaces import (
    MAX_LIMIT,
    SUPPRESSION_REASONS,
    SuppressionEntry,
    normaliseAddress,
)

__all__ = [
    "ADDRESS_PATTERN",
    "DOMAIN_PATTERN",
    "MAX_SECONDS",
    "EVENT_FILTERS",
    "ApiError",
    "Query",
    "badParameter",
    "checkAddress",
    "checkQueueID",
    "csvItems",
    "decodeQueueCursor",
    "encodeQueueCursor",
    "eventFilters",
    "importEntries",
    "notFound",
    "parseTime",
    "suppressionEntry",
]


#: The largest POSIX seconds accepted as a number.
MAX_SECONDS = 99_999_999_999.0


class ApiError(Exception):
    """
    An answer other than success: the status, a stable machine-readable
    C{code}, a sentence, and the bad parameter if there is one.
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        parameter: Optional[str] = None,
        headers: Optional[dict] = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.parameter = parameter
        self.headers = headers or {}

    def body(self) -> dict:
        error = {"code": self.code, "message": self.message}
        if self.parameter is not None:
            error["parameter"] = self.parameter
        return {"error": error}


def badParameter(name: str, message: str) -> ApiError:
    return ApiError(400, "bad_parameter", f"{name}: {message}", parameter=name)


def notFound(message: str) -> ApiError:
    return ApiError(404, "not_found", message)


_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


#: What a domain parameter may be (before a trailing dot is dropped and it
#: is lower-cased); the OpenAPI document says the same.
DOMAIN_PATTERN = r"[^\x00-\x20\x7f@/]{1,255}"


#: What an address may be: a local part and a domain with no control
#: characters (and the domain no C{@}); the OpenAPI document says the same.
ADDRESS_PATTERN = r"[^\x00-\x1f\x7f]+@[^\x00-\x1f\x7f@]+"


_NUMBER = re.compile(r"[0-9]{1,11}(?:\.[0-9]{1,9})?")


def parseTime(text: str) -> float:
    """
    POSIX seconds from an RFC 3339 date-time with its offset
    (C{2026-12-07T10:00:00Z}, C{...+01:00}, fractions allowed), a date
    (C{2026-12-07}: UTC midnight) or POSIX seconds (up to 11 digits, a
    fraction of up to 9).

    @raise ValueError: for anything else.
    """
    text = text.strip()
    if _NUMBER.fullmatch(text):
        return float(text)
    if _DATE.fullmatch(text):
        when = datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=timezone.utc)
        return _checkRange(when.timestamp())
    if not re.fullmatch(
        r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(?:\.\d{1,9})?(?:[Zz]|[+-]\d{2}:\d{2})", text
    ):
        raise ValueError(
            "expected an RFC 3339 time such as 2026-12-07T10:00:00Z, a date"
            " such as 2026-12-07, or POSIX seconds"
        )
    fraction = re.search(r"\.(\d+)", text)
    if fraction is not None and len(fraction.group(1)) > 6:
        text = text.replace(fraction.group(0), "." + fraction.group(1)[:6])
    when = datetime.fromisoformat(text.replace("z", "Z").replace("t", "T"))
    return _checkRange(when.timestamp())


def _checkRange(seconds: float) -> float:
    if not 0 <= seconds <= MAX_SECONDS:
        raise ValueError("must be from 1970 to the year 5138")
    return seconds


class Query:
    """
    The query string of a request, checked: no unknown or repeated
    parameters; values by type, each error naming its parameter.
    """

    def __init__(self, request, allowed: tuple) -> None:
        self.values: dict = {}
        for raw, values in request.args.items():
            try:
                name = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise badParameter(repr(raw)[2:-1], "not UTF-8") from None
            if name not in allowed:
                raise ApiError(
                    400,
                    "unknown_parameter",
                    f"unknown parameter {name!r}; this route takes: "
                    + (", ".join(allowed) or "none"),
                    parameter=name,
                )
            if len(values) > 1:
                raise badParameter(name, "given more than once")
            try:
                self.values[name] = values[0].decode("utf-8")
            except UnicodeDecodeError:
                raise badParameter(name, "not UTF-8") from None

    def text(self, name: str, default: Optional[str] = None) -> Optional[str]:
        value = self.values.get(name)
        if value is None or value == "":
            return default
        if _CONTROL.search(value):
            raise badParameter(name, "contains control characters")
        return value

    def choice(self, name: str, choices, default: Optional[str] = None) -> Optional[str]:
        value = self.text(name, default)
        if value is not None and value not in choices:
            raise badParameter(name, f"must be one of {', '.join(sorted(choices))}, not {value!r}")
        return value

    def time(self, name: str, default: Optional[float] = None) -> Optional[float]:
        value = self.text(name)
        if value is None:
            return default
        try:
            return parseTime(value)
        except ValueError as e:
            raise badParameter(name, f"{e}; got {value!r}") from None

    def limit(self) -> int:
        value = self.text("limit")
        if value is None:
            return 100
        if not re.fullmatch(r"[0-9]{1,7}", value) or not 1 <= int(value) <= MAX_LIMIT:
            raise badParameter("limit", f"must be an integer from 1 to {MAX_LIMIT}, not {value!r}")
        return int(value)

    def cursor(self) -> Optional[str]:
        value = self.text("cursor")
        if value is not None and not re.fullmatch(r"[A-Za-z0-9_-]{1,2048}", value):
            raise badParameter("cursor", "not a cursor this API handed out")
        return value

    def domain(self, name: str = "domain") -> Optional[str]:
        value = self.text(name)
        if value is None:
            return None
        if not re.fullmatch(DOMAIN_PATTERN, value) or not value.rstrip("."):
            raise badParameter(name, f"not a domain name: {value!r}")
        return value.rstrip(".").lower()


def checkQueueID(queue_id: str) -> str:
    if not QUEUE_ID_RE.fullmatch(queue_id):
        raise badParameter(
            "queue_id",
            f"not a queue id (like 79/BC-12331-5C348706): {queue_id!r}",
        )
    return queue_id


def checkAddress(address: str, parameter: str = "address") -> str:
    if not re.fullmatch(ADDRESS_PATTERN, address):
        raise badParameter(parameter, f"not an e-mail address: {address!r}")
    return normaliseAddress(address)


def encodeQueueCursor(received: float, queue_id: str) -> str:
    raw = json.dumps([received, queue_id]).encode("utf-8")
    return "q" + base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def decodeQueueCursor(cursor: str) -> tuple:
    try:
        if not cursor.startswith("q"):
            raise ValueError(cursor)
        body = cursor[1:]
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        received, queue_id = json.loads(raw)
        if not isinstance(received, (int, float)) or not isinstance(queue_id, str):
            raise ValueError(cursor)
        return (float(received), queue_id)
    except (ValueError, TypeError, binascii.Error):
        raise badParameter("cursor", "not a cursor this API handed out") from None


def csvItems(data: bytes) -> list:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ApiError(400, "bad_csv", "the CSV is not UTF-8") from None
    rows = list(csv.reader(io.StringIO(text)))
    if not rows:
        return []
    header = [h.strip().lower() for h in rows[0]]
    if "address" not in header:
        # No header row: one address (and optionally a reason) a line.
        header = ["address", "reason", "expires"][: max(len(r) for r in rows)]
        body = rows
    else:
        body = rows[1:]
    items = []
    for number, row in enumerate(body, 1):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) > len(header):
            raise ApiError(400, "bad_csv", f"line {number}: more fields than the header has")
        item = {
            name: cell.strip()
            for name, cell in zip(header, row)
            if name in ("address", "reason", "expires") and cell.strip()
        }
        items.append(item)
    return items


def suppressionEntry(item: dict, now: float, reason: str, where: str = "") -> SuppressionEntry:
    """
    A suppression entry from what a client sent (C{address}, optional
    C{reason} and C{expires}: RFC 3339, a date, POSIX seconds or null),
    added at C{now}; C{where} prefixes the parameter an error names
    (C{items[3].}).

    @raise ApiError: 400 naming the bad field.
    """
    unknown = set(item) - {"address", "reason", "expires"}
    if unknown:
        raise badParameter(f"{where}{sorted(unknown)[0]}", "unknown field")
    address = item.get("address")
    if not isinstance(address, str):
        raise badParameter(f"{where}address", "required: an e-mail address")
    address = checkAddress(address, f"{where}address")
    reason = item.get("reason", reason)
    if not isinstance(reason, str) or reason not in SUPPRESSION_REASONS:
        raise badParameter(
            f"{where}reason",
            f"must be one of {', '.join(sorted(SUPPRESSION_REASONS))}, not {reason!r}",
        )
    expires = item.get("expires")
    if expires is not None:
        try:
            if isinstance(expires, bool) or not isinstance(expires, (int, float, str)):
                raise ValueError("expected a time, POSIX seconds or null")
            if isinstance(expires, str):
                expires = parseTime(expires)
            elif not 0 <= expires <= MAX_SECONDS:
                raise ValueError(f"POSIX seconds from 0 to {MAX_SECONDS:.0f}")
            expires = float(expires)
        except ValueError as e:
            raise badParameter(f"{where}expires", str(e)) from None
    return SuppressionEntry(address=address, reason=reason, time=now, expires=expires)


def importEntries(items: list, now: float, reason: str, maximum: int) -> list:
    """
    The entries of a bulk import (objects or bare addresses), every one
    checked before any is used: a bad line imports nothing.

    @raise ApiError: 413 for more than C{maximum}, 400 naming the bad item.
    """
    if len(items) > maximum:
        raise ApiError(413, "too_large", f"at most {maximum} entries per import")
    entries = []
    for number, item in enumerate(items, 1):
        if isinstance(item, str):
            item = {"address": item}
        if not isinstance(item, dict):
            raise badParameter(f"items[{number}]", "must be an object or an address")
        entries.append(suppressionEntry(item, now, reason, f"items[{number}]."))
    return entries


#: The filters of an events query.
EVENT_FILTERS = ("type", "queue_id", "recipient", "tag", "domain", "since", "until")


def eventFilters(query: Query) -> tuple:
    """
    The store's filters and the recipient domain of an events query (the
    API's C{/api/v1/events} and the UI's events pages): each value checked,
    the recipient normalised.
    """
    filters = {
        "type": query.choice("type", EVENT_TYPES),
        "queue_id": query.text("queue_id"),
        "recipient": query.text("recipient"),
        "tag": query.text("tag"),
        "since": query.time("since"),
        "until": query.time("until"),
    }
    if filters["queue_id"] is not None:
        checkQueueID(filters["queue_id"])
    if filters["recipient"] is not None:
        filters["recipient"] = checkAddress(filters["recipient"], "recipient")
    return filters, query.domain()
