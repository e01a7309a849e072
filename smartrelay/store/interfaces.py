"""
The event store contract, shared by every back end.

L{IStore} is what the rest of the relay programs against; L{EventPage},
L{InvalidCursor} and L{StoreClosed} are part of that contract.  The helper
functions at the bottom (recipient normalisation, the cursor codec, argument
checks) are shared by the back ends so that they agree on the details the
contract test suite pins down.
"""

import base64
import binascii
import math
import re
import struct
from typing import Optional

import attrs
from zope.interface import Interface

from smartrelay.events import Event

MAX_LIMIT = 1000


class InvalidCursor(ValueError):
    """
    A pagination cursor was not one that the store handed out.
    """


class StoreClosed(Exception):
    """
    The store was used after L{IStore.close} was called.
    """


@attrs.frozen
class EventPage:
    """
    One page of a L{IStore.queryEvents} answer.

    @ivar events: the events of this page, ordered by (time, insertion order).
    @ivar cursor: an opaque, URL-safe string to pass back to
        C{queryEvents} for the next page, or L{None} when there is none.
    """

    events: list[Event]
    cursor: Optional[str]


class IStore(Interface):
    """
    Durable storage for relay events.

    Every method returns a L{Deferred}; failures (including those of the
    underlying database) are reported as failed Deferreds, never swallowed.
    Operations are applied in the order they are called: a query issued
    after an C{appendEvents} call sees that batch once it is written.
    """

    def start():
        """
        Open the store, creating or migrating its schema as needed.
        Calling it on an already migrated store changes nothing.

        @rtype: L{Deferred} firing with L{None}
        """

    def close():
        """
        Finish pending writes and release resources.  Safe to call more
        than once; every other operation fails with L{StoreClosed}
        afterwards.

        @rtype: L{Deferred} firing with L{None}
        """

    def appendEvents(events):
        """
        Write a batch of events atomically: either all of them are stored
        or, on failure, none.

        @type events: L{list} of L{Event}
        @rtype: L{Deferred} firing with L{None}
        """

    def eventsForMessage(queue_id):
        """
        All events of one message.

        @type queue_id: L{str}
        @rtype: L{Deferred} firing with a L{list} of L{Event} ordered by
            (time, insertion order)
        """

    def queryEvents(
        *,
        type=None,
        queue_id=None,
        recipient=None,
        tag=None,
        since=None,
        until=None,
        cursor=None,
        limit=100,
    ):
        """
        One page of the events matching every given filter, ordered by
        (time, insertion order).

        @param type: an event type (exact match).
        @param queue_id: a queue id (exact match).
        @param recipient: an address; the local part matches exactly, the
            domain case-insensitively (see L{normaliseRecipient}).
        @param tag: a tag (exact match).
        @param since: POSIX seconds, inclusive.
        @param until: POSIX seconds, exclusive.
        @param cursor: the C{cursor} of the previous L{EventPage}, to
            continue after its last event.  Events appended after that page
            was read show up on later pages if they sort after it.
        @param limit: page size, 1 to 1000.

        @rtype: L{Deferred} firing with an L{EventPage}; it fails with
            L{InvalidCursor} for a cursor the store did not hand out and
            with L{ValueError} for a limit out of range.
        """


def normaliseRecipient(recipient: Optional[str]) -> Optional[str]:
    """
    The form of an address that recipient queries match on: the domain
    (after the last C{@}) lower-cased, the local part untouched.
    """
    if recipient is None:
        return None
    local, at, domain = recipient.rpartition("@")
    if not at:
        return recipient
    return local + at + domain.lower()


def checkLimit(limit: int) -> int:
    """
    Validate a page size.

    @raise ValueError: unless C{limit} is an integer from 1 to L{MAX_LIMIT}.
    """
    if isinstance(limit, bool) or not isinstance(limit, int):
        raise ValueError(f"limit must be an integer, not {limit!r}")
    if not 1 <= limit <= MAX_LIMIT:
        raise ValueError(f"limit must be between 1 and {MAX_LIMIT}, not {limit}")
    return limit


def checkTime(name: str, value) -> Optional[float]:
    """
    Validate a C{since} / C{until} bound (POSIX seconds or L{None}).

    @raise ValueError: for anything but a number that is not NaN.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be POSIX seconds, not {value!r}")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{name} must not be NaN")
    return value


# A cursor is the position (time, sequence number) of the last event of a
# page: a version byte, an IEEE double and an unsigned 64-bit integer,
# base64url-encoded without padding.
_CURSOR_VERSION = 1
_CURSOR_FORMAT = struct.Struct(">BdQ")
_CURSOR_LENGTH = len(base64.urlsafe_b64encode(b"\0" * _CURSOR_FORMAT.size).rstrip(b"="))
_CURSOR_PATTERN = re.compile(r"[A-Za-z0-9_-]{%d}" % (_CURSOR_LENGTH,))


def encodeCursor(time: float, seq: int) -> str:
    """
    An opaque, URL-safe cursor for the position (C{time}, C{seq}).

    @param seq: the back end's insertion sequence number (0 to 2**64-1).
    """
    raw = _CURSOR_FORMAT.pack(_CURSOR_VERSION, float(time), seq)
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def decodeCursor(cursor: str) -> tuple[float, int]:
    """
    The position (time, seq) inside a cursor made by L{encodeCursor}.

    @raise InvalidCursor: if C{cursor} is not such a cursor.
    """
    if not isinstance(cursor, str) or not _CURSOR_PATTERN.fullmatch(cursor):
        raise InvalidCursor(f"malformed cursor {cursor!r}")
    padded = cursor + "=" * (-len(cursor) % 4)
    try:
        raw = base64.urlsafe_b64decode(padded)
    except (binascii.Error, ValueError):
        raise InvalidCursor(f"malformed cursor {cursor!r}") from None
    version, time, seq = _CURSOR_FORMAT.unpack(raw)
    if version != _CURSOR_VERSION or not math.isfinite(time):
        raise InvalidCursor(f"malformed cursor {cursor!r}")
    return time, seq
