"""
The event store contract, shared by every back end.

L{IStore} is what the rest of the relay programs against: events, the
suppression list, statistics kept as events are appended, and rate-limit
token buckets.  L{EventPage}, L{SuppressionEntry}, L{SuppressionPage},
L{Statistics}, L{StatisticsBucket}, L{TokenResult}, L{InvalidCursor} and
L{StoreClosed} are part of that contract.  The helper functions at the
bottom (address normalisation, the cursor codecs, argument checks, counter
keys, the token bucket arithmetic) are shared by the back ends so that they
agree on the details the contract test suite pins down.
"""

import base64
import binascii
import json
import math
import re
import struct
from collections import Counter
from collections.abc import Iterable
from typing import Optional

import attrs
from zope.interface import Interface

from smartrelay.events import Event

MAX_LIMIT = 1000

# The most records one IStore.pruneEvents call may delete.
MAX_PRUNE_LIMIT = 100000


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


SUPPRESSION_REASONS = frozenset(["bounce", "complaint", "unsubscribe", "manual"])

INTERVALS = {"hour": 3600, "day": 86400}


def normaliseAddress(address: str) -> str:
    """
    The stored form of a suppressed address: the local part exactly as
    given, the domain (after the last C{@}) lower-cased.

    @raise ValueError: if C{address} is not a string with a non-empty local
        part, an C{@} and a non-empty domain.
    """
    if not isinstance(address, str):
        raise ValueError(f"address must be a string, not {address!r}")
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        raise ValueError(f"not an e-mail address: {address!r}")
    return local + at + domain.lower()


def _checkReason(instance, attribute, value) -> None:
    if value not in SUPPRESSION_REASONS:
        raise ValueError(
            f"suppression reason must be one of {sorted(SUPPRESSION_REASONS)},"
            f" not {value!r}"
        )


def _checkOptionalString(instance, attribute, value) -> None:
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{attribute.name} must be a string or None, not {value!r}")


def _requiredTime(value) -> float:
    if value is None:
        raise ValueError("time must be POSIX seconds, not None")
    return checkTime("time", value)


def _optionalTime(value) -> Optional[float]:
    return checkTime("expires", value)


@attrs.frozen(kw_only=True)
class SuppressionEntry:
    """
    One address on the suppression list.

    @ivar address: the address, normalised by L{normaliseAddress} (the
        local part exact, the domain lower-cased).
    @ivar reason: one of L{SUPPRESSION_REASONS}.
    @ivar source_event: the id of the event that caused it, if any.
    @ivar time: POSIX seconds when it was added; of two adds for one
        address the one with the later time wins.
    @ivar expires: POSIX seconds from which it no longer applies, or
        L{None} for never.
    """

    address: str = attrs.field(converter=normaliseAddress)
    reason: str = attrs.field(validator=_checkReason)
    source_event: Optional[str] = attrs.field(
        default=None, validator=_checkOptionalString
    )
    time: float = attrs.field(converter=_requiredTime)
    expires: Optional[float] = attrs.field(default=None, converter=_optionalTime)

    def activeAt(self, now: float) -> bool:
        """
        Does this entry suppress mail at time C{now}?
        """
        return self.expires is None or self.expires > now


@attrs.frozen
class SuppressionPage:
    """
    One page of a L{IStore.listSuppressions} answer.

    @ivar entries: L{SuppressionEntry} objects ordered by address.
    @ivar cursor: an opaque, URL-safe string to pass back for the next
        page, or L{None} when there is none.
    """

    entries: list[SuppressionEntry]
    cursor: Optional[str]


@attrs.frozen
class StatisticsBucket:
    """
    The counts of one hour or one day.

    @ivar start: the bucket's first second (POSIX seconds, a UTC hour or
        day start).
    @ivar counts: events per event type; types without events are left
        out.
    @ivar hard_bounces: C{bounced} events whose detail C{kind} is C{hard}.
    @ivar soft_bounces: C{bounced} events whose detail C{kind} is C{soft}.
    @ivar unique_opens: (queue id, recipient) pairs opened for the first
        time in this bucket.
    @ivar unique_clicks: (queue id, recipient) pairs that clicked for the
        first time in this bucket.
    """

    start: int
    counts: dict[str, int]
    hard_bounces: int = 0
    soft_bounces: int = 0
    unique_opens: int = 0
    unique_clicks: int = 0


@attrs.frozen
class Statistics:
    """
    The answer of L{IStore.statistics}.

    @ivar buckets: the buckets that had events, ordered by start.
    @ivar totals: events per type over all of C{buckets}.
    @ivar delivery_rate: delivered / (delivered + bounced + expired).
    @ivar hard_bounce_rate: hard bounces / (delivered + bounced + expired).
    @ivar soft_bounce_rate: soft bounces / (delivered + bounced + expired).
    @ivar complaint_rate: complained / delivered.
    @ivar unique_open_rate: unique opens / delivered.
    @ivar unique_click_rate: unique clicks / delivered.

    Every rate is L{None} when its denominator is zero.
    """

    interval: str
    since: float
    until: float
    tag: Optional[str]
    domain: Optional[str]
    buckets: list[StatisticsBucket]
    totals: dict[str, int]
    hard_bounces: int
    soft_bounces: int
    unique_opens: int
    unique_clicks: int
    delivery_rate: Optional[float]
    hard_bounce_rate: Optional[float]
    soft_bounce_rate: Optional[float]
    complaint_rate: Optional[float]
    unique_open_rate: Optional[float]
    unique_click_rate: Optional[float]


@attrs.frozen
class TokenResult:
    """
    The answer of L{IStore.takeTokens}.

    @ivar allowed: whether the tokens were taken.
    @ivar remaining: tokens left in the bucket afterwards.
    @ivar retry_after: seconds until the bucket will hold enough tokens
        (0 when allowed).
    """

    allowed: bool
    remaining: float
    retry_after: float


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

    def addSuppression(entry):
        """
        Put an address on the suppression list, replacing an entry for the
        same address unless that one has a later C{time} (of two adds the
        newer wins, whatever order they arrive in; on equal times the later
        call wins).

        @type entry: L{SuppressionEntry}
        @rtype: L{Deferred} firing with L{None}
        """

    def removeSuppression(address):
        """
        Take an address off the suppression list.

        @param address: an address, normalised by L{normaliseAddress}.
        @rtype: L{Deferred} firing with L{True} if it was on the list
            (expired or not), L{False} otherwise; it fails with
            L{ValueError} for a malformed address.
        """

    def checkSuppressions(addresses, now):
        """
        Which of C{addresses} are suppressed at time C{now}: one round trip
        for all the recipients of a message.  Entries that have expired
        (C{expires <= now}) do not count.

        @type addresses: L{list} of L{str}
        @param now: POSIX seconds.
        @rtype: L{Deferred} firing with a L{dict} mapping each suppressed
            address, as given by the caller, to its L{SuppressionEntry};
            it fails with L{ValueError} if any address is malformed.
        """

    def listSuppressions(*, prefix=None, reason=None, cursor=None, limit=100):
        """
        One page of the suppression list (expired entries included),
        ordered by address.

        @param prefix: only addresses that start with it, compared with the
            normalised address (what follows an C{@} in the prefix is
            lower-cased).
        @param reason: only entries with that reason.
        @param cursor: the C{cursor} of the previous page.
        @param limit: page size, 1 to 1000.
        @rtype: L{Deferred} firing with a L{SuppressionPage}; it fails with
            L{InvalidCursor} for a cursor the store did not hand out and
            with L{ValueError} for a bad reason or limit.
        """

    def statistics(*, since, until, interval="hour", tag=None, domain=None):
        """
        Event counts and rates from counters kept as events are appended
        (no scan of the events).

        @param since: POSIX seconds; the bucket holding it is the first.
        @param until: POSIX seconds, exclusive; buckets starting at or after
            it are left out.
        @param interval: C{"hour"} or C{"day"} (UTC).
        @param tag: count only events with this tag.
        @param domain: count only events whose recipient is at this domain
            (case-insensitive).
        @rtype: L{Deferred} firing with L{Statistics}; it fails with
            L{ValueError} for a bad interval or time.
        """

    def pruneEvents(before, limit=10000):
        """
        Retention: delete a bounded number of the events older than
        C{before}, so that a caller can prune in small steps (calling again
        until it answers 0) without holding up other operations for long.

        Every trace of a deleted event that event queries read goes with it
        (on the durable back ends: its row or body and all its index
        entries), so neither L{queryEvents} (whatever the filters) nor
        L{eventsForMessage} returns it again.  The bookkeeping of unique
        opens and clicks older than C{before} (the (queue id, recipient)
        pairs already counted) is pruned too, once no event older than
        C{before} is left; an open or click of such a pair after it was
        pruned counts as unique again.

        The statistics counters are B{not} touched: they are aggregates that
        the dashboard needs beyond the retention of the events, and what
        they have counted stays counted.

        @param before: POSIX seconds, a finite number; events (and unique
            open and click records) with a time strictly before it go.
        @param limit: at most this many records (events first, then unique
            open and click records) are deleted by one call, 1 to
            L{MAX_PRUNE_LIMIT}.
        @rtype: L{Deferred} firing with the number of records deleted
            (events plus unique open and click records), 0 once nothing
            older than C{before} is left; it fails with L{ValueError} for
            bad arguments.
        """

    def takeTokens(key, rate, burst, now, count=1):
        """
        Take C{count} tokens from the token bucket C{key}, atomically.

        A bucket seen for the first time is full.  It refills at C{rate}
        tokens per second up to C{burst}; time never runs backwards for a
        bucket (a C{now} before its last update refills nothing).

        @param rate: tokens per second, positive.
        @param burst: the bucket's capacity, positive.
        @param now: POSIX seconds, passed in by the caller's clock.
        @param count: tokens wanted, positive and at most C{burst}.
        @rtype: L{Deferred} firing with a L{TokenResult}; nothing is taken
            unless it is allowed.  It fails with L{ValueError} for bad
            arguments.
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


def checkPruneArguments(before, limit) -> tuple[float, int]:
    """
    Validate the arguments of C{pruneEvents}.

    @return: (before as a float, limit).
    @raise ValueError: unless C{before} is a finite number and C{limit} an
        integer from 1 to L{MAX_PRUNE_LIMIT}.
    """
    if isinstance(before, bool) or not isinstance(before, (int, float)):
        raise ValueError(f"before must be POSIX seconds, not {before!r}")
    try:
        before = float(before)
    except OverflowError:
        raise ValueError(f"before must be finite, not {before!r}") from None
    if not math.isfinite(before):
        raise ValueError(f"before must be finite, not {before!r}")
    if isinstance(limit, bool) or not isinstance(limit, int):
        raise ValueError(f"limit must be an integer, not {limit!r}")
    if not 1 <= limit <= MAX_PRUNE_LIMIT:
        raise ValueError(
            f"limit must be between 1 and {MAX_PRUNE_LIMIT}, not {limit}"
        )
    return before, limit


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


# -- suppression list ------------------------------------------------------

# A suppression cursor is the last address of a page: a version byte (not
# the event cursors' one, so neither kind is mistaken for the other) and
# the address in UTF-8, base64url-encoded without padding.
_SUPPRESSION_CURSOR_VERSION = 0x53
_URLSAFE = re.compile(r"[A-Za-z0-9_-]+")


def normalisePrefix(prefix: Optional[str]) -> Optional[str]:
    """
    A C{listSuppressions} prefix in the form it is compared in: what
    follows the last C{@}, if there is one, lower-cased.

    @raise ValueError: if C{prefix} is not a string.
    """
    if prefix is None:
        return None
    if not isinstance(prefix, str):
        raise ValueError(f"prefix must be a string, not {prefix!r}")
    local, at, domain = prefix.rpartition("@")
    if not at:
        return prefix
    return local + at + domain.lower()


def prefixUpperBound(prefix: str) -> Optional[str]:
    """
    The smallest string greater than every string that starts with
    C{prefix} (in code point order, which is also SQLite's UTF-8 byte
    order), or L{None} if there is none.
    """
    chars = list(prefix)
    while chars:
        last = ord(chars.pop()) + 1
        if 0xD800 <= last <= 0xDFFF:
            last = 0xE000
        if last <= 0x10FFFF:
            return "".join(chars) + chr(last)
    return None


def checkReason(reason: Optional[str]) -> Optional[str]:
    """
    Validate a suppression reason filter.

    @raise ValueError: unless C{reason} is L{None} or one of
        L{SUPPRESSION_REASONS}.
    """
    if reason is not None and reason not in SUPPRESSION_REASONS:
        raise ValueError(
            f"suppression reason must be one of {sorted(SUPPRESSION_REASONS)},"
            f" not {reason!r}"
        )
    return reason


def checkAddresses(addresses) -> list[tuple[str, str]]:
    """
    Validate the addresses of a C{checkSuppressions} call.

    @return: (address as given, normalised address) pairs.
    @raise ValueError: if C{addresses} is a string, or holds an address
        that L{normaliseAddress} refuses.
    """
    if isinstance(addresses, (str, bytes)):
        raise ValueError("addresses must be a list of addresses, not one string")
    return [(address, normaliseAddress(address)) for address in addresses]


def encodeSuppressionCursor(address: str) -> str:
    """
    An opaque, URL-safe cursor positioned after C{address}.
    """
    raw = bytes([_SUPPRESSION_CURSOR_VERSION]) + address.encode("utf-8")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def decodeSuppressionCursor(cursor: str) -> str:
    """
    The address inside a cursor made by L{encodeSuppressionCursor}.

    @raise InvalidCursor: if C{cursor} is not such a cursor.
    """
    if not isinstance(cursor, str) or not _URLSAFE.fullmatch(cursor):
        raise InvalidCursor(f"malformed cursor {cursor!r}")
    padded = cursor + "=" * (-len(cursor) % 4)
    try:
        raw = base64.urlsafe_b64decode(padded)
        if raw[:1] != bytes([_SUPPRESSION_CURSOR_VERSION]):
            raise ValueError("wrong version")
        address = raw[1:].decode("utf-8")
        if encodeSuppressionCursor(address) != cursor:
            raise ValueError("not canonical")
    except (binascii.Error, ValueError):
        raise InvalidCursor(f"malformed cursor {cursor!r}") from None
    return address


# -- statistics ------------------------------------------------------------

# Counter "types" besides the event types: bounces by kind and first opens
# and clicks of a (queue id, recipient).
HARD_BOUNCES = "bounced.hard"
SOFT_BOUNCES = "bounced.soft"
UNIQUE_OPENS = "opened.unique"
UNIQUE_CLICKS = "clicked.unique"
UNIQUE_TYPES = {"opened": UNIQUE_OPENS, "clicked": UNIQUE_CLICKS}

# Counter dimensions: everything, per tag, per recipient domain, per both.
DIM_ALL = ""
DIM_TAG = "tag"
DIM_DOMAIN = "domain"
DIM_TAG_DOMAIN = "tag+domain"


def checkInterval(interval: str) -> int:
    """
    The length in seconds of a statistics interval.

    @raise ValueError: unless C{interval} is C{"hour"} or C{"day"}.
    """
    if not isinstance(interval, str) or interval not in INTERVALS:
        raise ValueError(f"interval must be 'hour' or 'day', not {interval!r}")
    return INTERVALS[interval]


def bucketStart(time: float, size: int) -> int:
    """
    The start (POSIX seconds) of the UTC hour or day of C{time}.
    """
    return int(math.floor(time / size)) * size


def recipientDomain(recipient: Optional[str]) -> Optional[str]:
    """
    The lower-cased domain of a recipient, or L{None} if it has none.
    """
    if recipient is None:
        return None
    local, at, domain = recipient.rpartition("@")
    if not at or not domain:
        return None
    return domain.lower()


def dimensionKey(tag: Optional[str], domain: Optional[str]) -> tuple[str, str]:
    """
    The counter dimension and key that statistics for C{tag} and C{domain}
    read.
    """
    if tag is not None and domain is not None:
        return DIM_TAG_DOMAIN, tag + "\0" + domain.lower()
    if tag is not None:
        return DIM_TAG, tag
    if domain is not None:
        return DIM_DOMAIN, domain.lower()
    return DIM_ALL, ""


def eventDimensions(event: Event) -> list[tuple[str, str]]:
    """
    The (dimension, key) pairs whose counters an event bumps.
    """
    domain = recipientDomain(event.recipient)
    tag = event.tag
    keys = [dimensionKey(None, None)]
    if tag is not None:
        keys.append(dimensionKey(tag, None))
    if domain is not None:
        keys.append(dimensionKey(None, domain))
    if tag is not None and domain is not None:
        keys.append(dimensionKey(tag, domain))
    return keys


def eventCounterTypes(event: Event) -> list[str]:
    """
    The counter types an event bumps, besides unique opens and clicks
    (which depend on what the store has seen before).
    """
    types = [event.type]
    if event.type == "bounced" and isinstance(event.detail, dict):
        kind = event.detail.get("kind")
        if kind == "hard":
            types.append(HARD_BOUNCES)
        elif kind == "soft":
            types.append(SOFT_BOUNCES)
    return types


def uniqueKey(event: Event) -> Optional[tuple[str, str, str]]:
    """
    The (queue id, normalised recipient, type) that makes an open or click
    unique, or L{None} for other events (and those without queue id or
    recipient).
    """
    if event.type not in UNIQUE_TYPES:
        return None
    if event.queue_id is None or event.recipient is None:
        return None
    return (event.queue_id, normaliseRecipient(event.recipient), event.type)


def counterBumps(
    event: Event, types: Iterable[str]
) -> list[tuple[str, int, str, str, str]]:
    """
    The counters to bump by one for C{event} under each of C{types}: (interval,
    bucket start, dimension, key, type) tuples.
    """
    bumps = []
    dimensions = eventDimensions(event)
    for interval, size in INTERVALS.items():
        bucket = bucketStart(event.time, size)
        for dim, key in dimensions:
            for type in types:
                bumps.append((interval, bucket, dim, key, type))
    return bumps


class BatchJSON:
    """
    The JSON of the C{metadata} and C{detail} dicts of one batch of events,
    each dict encoded once however many events share it (the scheduler
    gives every parked recipient of one suspension the same detail); an
    empty dict is C{"{}"}.  Each dict is kept for the batch's life, so that
    its id cannot be reused by another.
    """

    def __init__(self) -> None:
        self._known: dict = {}

    def __call__(self, value: Optional[dict]) -> str:
        if type(value) is dict and not value:
            return "{}"
        known = self._known.get(id(value))
        if known is None:
            known = self._known[id(value)] = (value, json.dumps(value))
        return known[1]


def counterKey(event: Event) -> Optional[tuple]:
    """
    What the counters L{counterBumps} gives an event depend on: its type,
    tag, recipient domain and buckets; L{None} for bounces (their detail
    counts too), which are counted one by one.
    """
    if event.type == "bounced":
        return None
    return (event.type, event.tag, recipientDomain(event.recipient)) + tuple(
        [bucketStart(event.time, size) for size in INTERVALS.values()]
    )


class BatchCounters:
    """
    The counters a batch of events bumps (L{counterBumps} under
    L{eventCounterTypes}), computed once for the events alike
    (L{counterKey}) and counted.
    """

    def __init__(self) -> None:
        self._alike: dict = {}  # counter key -> [how many, the bumps of one]
        self._each: list = []  # the bumps of events counted one by one

    def add(self, event: Event) -> Optional[tuple]:
        """
        Count C{event}'s counters.

        @return: its L{counterKey}.
        """
        key = counterKey(event)
        if key is None:
            self._each.append(counterBumps(event, eventCounterTypes(event)))
            return None
        known = self._alike.get(key)
        if known is None:
            self._alike[key] = [1, counterBumps(event, eventCounterTypes(event))]
        else:
            known[0] += 1
        return key

    def total(self) -> "Counter":
        """
        Every counter the batch bumps, and by how much.
        """
        bumps: Counter = Counter()
        for count, counters in self._alike.values():
            for counter in counters:
                bumps[counter] += count
        for counters in self._each:
            bumps.update(counters)
        return bumps


def checkStatisticsArguments(since, until, interval, tag, domain):
    """
    Validate the arguments of C{statistics}.

    @return: (since, until, bucket size, dimension, key, first bucket).
    @raise ValueError: for a bad value.
    """
    size = checkInterval(interval)
    if since is None or until is None:
        raise ValueError("since and until are required")
    since = checkTime("since", since)
    until = checkTime("until", until)
    if not (math.isfinite(since) and math.isfinite(until)):
        raise ValueError("since and until must be finite")
    for name, value in [("tag", tag), ("domain", domain)]:
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{name} must be a string, not {value!r}")
    dim, key = dimensionKey(tag, domain)
    return since, until, size, dim, key, bucketStart(since, size)


def _rate(numerator: int, denominator: int) -> Optional[float]:
    return numerator / denominator if denominator else None


def buildStatistics(
    *,
    since: float,
    until: float,
    interval: str,
    tag: Optional[str],
    domain: Optional[str],
    counters: Iterable[tuple[int, str, int]],
) -> Statistics:
    """
    Assemble L{Statistics} from counter rows (bucket start, counter type,
    count) of the selected buckets.
    """
    byBucket: dict[int, dict[str, int]] = {}
    for bucket, type, count in counters:
        if count:
            counts = byBucket.setdefault(int(bucket), {})
            counts[type] = counts.get(type, 0) + int(count)

    extras = {HARD_BOUNCES, SOFT_BOUNCES, UNIQUE_OPENS, UNIQUE_CLICKS}
    buckets = []
    totals: dict[str, int] = {}
    for start in sorted(byBucket):
        counts = byBucket[start]
        for type, count in counts.items():
            totals[type] = totals.get(type, 0) + count
        buckets.append(
            StatisticsBucket(
                start=start,
                counts={t: c for t, c in sorted(counts.items()) if t not in extras},
                hard_bounces=counts.get(HARD_BOUNCES, 0),
                soft_bounces=counts.get(SOFT_BOUNCES, 0),
                unique_opens=counts.get(UNIQUE_OPENS, 0),
                unique_clicks=counts.get(UNIQUE_CLICKS, 0),
            )
        )
    delivered = totals.get("delivered", 0)
    attempts = delivered + totals.get("bounced", 0) + totals.get("expired", 0)
    hard = totals.pop(HARD_BOUNCES, 0)
    soft = totals.pop(SOFT_BOUNCES, 0)
    opens = totals.pop(UNIQUE_OPENS, 0)
    clicks = totals.pop(UNIQUE_CLICKS, 0)
    return Statistics(
        interval=interval,
        since=since,
        until=until,
        tag=tag,
        domain=None if domain is None else domain.lower(),
        buckets=buckets,
        totals=dict(sorted(totals.items())),
        hard_bounces=hard,
        soft_bounces=soft,
        unique_opens=opens,
        unique_clicks=clicks,
        delivery_rate=_rate(delivered, attempts),
        hard_bounce_rate=_rate(hard, attempts),
        soft_bounce_rate=_rate(soft, attempts),
        complaint_rate=_rate(totals.get("complained", 0), delivered),
        unique_open_rate=_rate(opens, delivered),
        unique_click_rate=_rate(clicks, delivered),
    )


# -- token buckets ---------------------------------------------------------


def _positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, not {value!r}")
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be positive and finite, not {value!r}")
    return value


def checkTokenArguments(key, rate, burst, now, count) -> tuple:
    """
    Validate the arguments of C{takeTokens}.

    @return: (key, rate, burst, now, count) with the numbers as floats.
    @raise ValueError: for a bad value.
    """
    if not isinstance(key, str) or not key:
        raise ValueError(f"key must be a non-empty string, not {key!r}")
    rate = _positive("rate", rate)
    burst = _positive("burst", burst)
    count = _positive("count", count)
    if count > burst:
        raise ValueError(f"count {count} is more than the burst {burst}")
    now = checkTime("now", now)
    if now is None or not math.isfinite(now):
        raise ValueError(f"now must be finite POSIX seconds, not {now!r}")
    return key, rate, burst, now, count


def takeFromBucket(
    state: Optional[tuple[float, float]],
    rate: float,
    burst: float,
    now: float,
    count: float,
) -> tuple[tuple[float, float], TokenResult]:
    """
    The token bucket arithmetic, shared by the back ends.

    @param state: the stored (tokens, updated) of the bucket, or L{None}
        for a new (full) one.
    @return: the new state to store and the answer.
    """
    if state is None:
        tokens, updated = burst, now
    else:
        tokens, updated = state
        if now > updated:
            tokens += (now - updated) * rate
            updated = now
        tokens = min(tokens, burst)
    if tokens >= count:
        tokens -= count
        return (tokens, updated), TokenResult(True, tokens, 0.0)
    # Time to refill the difference, counted from now even when the
    # bucket's last update lies ahead of it.
    wait = (count - tokens) / rate + max(0.0, updated - now)
    return (tokens, updated), TokenResult(False, tokens, wait)


# -- event streams and outboxes (the exporter and the webhooks) -------------
#
# A consumer that must see every event exactly once (an export file, a
# webhook outbox) reads the store in insertion order through a named
# *stream*: a cursor over the back end's event sequence numbers, kept in
# the store.  A consumer *claims* the next range of sequence numbers; the
# claim is durable and belongs to one owner (a node), so that after a crash
# the same owner gets the same range back, and several nodes sharing a
# store never claim one event twice.

#: Where a stream seen for the first time starts.
STREAM_BEGINNINGS = ("oldest", "newest")

_STREAM_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")


@attrs.frozen
class EventClaim:
    """
    A range of events one owner of a stream has taken (L{IEventStreams}).

    @ivar stream: the stream's name.
    @ivar owner: who claimed it (a node).
    @ivar after: the claim covers the sequence numbers after this one...
    @ivar last: ...up to and including this one.
    @ivar time: POSIX seconds (the caller's clock) when it was claimed.
    """

    stream: str
    owner: str
    after: int
    last: int
    time: float


@attrs.frozen
class OutboxBatch:
    """
    One batch waiting in an outbox (L{IEventStreams}).

    @ivar id: unique in its outbox; adding an id again changes nothing.
    @ivar body: the text to deliver, fixed once added.
    @ivar created: POSIX seconds when it was added.
    @ivar due: POSIX seconds from which it may be taken.
    @ivar attempts: how many times it was deferred.
    """

    id: str
    body: str
    created: float
    due: float
    attempts: int = 0


class IEventStreams(Interface):
    """
    Streams over the events in insertion order, and outboxes of batches:
    what a consumer needs to see every event once across crashes and
    across nodes.  Every back end provides it with L{IStore}; every method
    returns a L{Deferred}.
    """

    def claimEvents(stream, owner, now, limit=None, begin="oldest"):
        """
        The events of C{stream} that C{owner} is to handle next.

        If C{owner} holds a claim on C{stream} that it has not finished,
        that claim comes back (whatever C{limit}): a consumer that crashed
        gets its range again.  Otherwise, if events were appended after the
        stream's cursor, a new claim covers them (at most C{limit}
        sequence numbers, all of them if L{None}) and the cursor moves past
        it, atomically, so that no other owner claims them.  A stream
        seen for the first time starts before the oldest event stored
        (C{begin="oldest"}) or after the newest (C{"newest"}).

        @param stream: a name (lower-case letters, digits, C{_.-}).
        @param owner: a non-empty string.
        @param now: POSIX seconds, the claim's L{EventClaim.time}.
        @rtype: L{Deferred} firing with an L{EventClaim}, or L{None} when
            there is nothing to claim; it fails with L{ValueError} for bad
            arguments.
        """

    def claimedEvents(claim, cursor=None, limit=1000):
        """
        One page of the events of C{claim}, in insertion order.  A page may
        hold fewer than C{limit} events (events pruned meanwhile are
        skipped); follow C{cursor} until it is L{None}.

        @rtype: L{Deferred} firing with an L{EventPage}.
        """

    def finishClaim(claim):
        """
        C{claim} is handled: forget it.

        @rtype: L{Deferred} firing with L{True} if it was the owner's open
            claim, L{False} otherwise (nothing changes then).
        """

    def addToOutbox(outbox, batches, claim=None):
        """
        Add L{OutboxBatch}es to C{outbox} and, in the same atomic step,
        finish C{claim} (if given): the events of a claim become batches
        once.  A batch whose id is already in the outbox is left as it is.

        @rtype: L{Deferred} firing with L{None}.
        """

    def takeFromOutbox(outbox, now, lease, limit=10):
        """
        Take up to C{limit} batches due at C{now} (oldest due first): each
        is due again only at C{now + lease}, so no other taker gets it
        meanwhile, and it comes back if the taker dies.

        @rtype: L{Deferred} firing with a L{list} of L{OutboxBatch} (with
            their new C{due}).
        """

    def deferInOutbox(outbox, id, due):
        """
        A batch could not be delivered: it is due again at C{due}, with
        one more attempt counted.

        @rtype: L{Deferred} firing with L{True} if the batch was there.
        """

    def removeFromOutbox(outbox, id):
        """
        A batch is done (delivered, or given up): remove it.

        @rtype: L{Deferred} firing with L{True} if it was there.
        """

    def outboxSize(outbox):
        """
        @rtype: L{Deferred} firing with the number of batches in C{outbox}.
        """


def checkStreamName(name) -> str:
    """
    @raise ValueError: unless C{name} is a valid stream or outbox name.
    """
    if not isinstance(name, str) or not _STREAM_NAME.fullmatch(name):
        raise ValueError(f"not a stream name: {name!r}")
    return name


def checkClaimArguments(stream, owner, now, limit, begin) -> tuple:
    """
    Validate the arguments of C{claimEvents}.

    @return: (stream, owner, now, limit, begin).
    @raise ValueError: for a bad value.
    """
    checkStreamName(stream)
    if not isinstance(owner, str) or not owner or len(owner) > 200:
        raise ValueError(f"owner must be a non-empty string, not {owner!r}")
    now = checkTime("now", now)
    if now is None or not math.isfinite(now):
        raise ValueError(f"now must be finite POSIX seconds, not {now!r}")
    if limit is not None and (
        isinstance(limit, bool) or not isinstance(limit, int) or limit < 1
    ):
        raise ValueError(f"limit must be a positive integer or None, not {limit!r}")
    if begin not in STREAM_BEGINNINGS:
        raise ValueError(f"begin must be one of {STREAM_BEGINNINGS}, not {begin!r}")
    return stream, owner, now, limit, begin


def checkClaim(claim) -> EventClaim:
    """
    @raise TypeError: unless C{claim} is an L{EventClaim}.
    """
    if not isinstance(claim, EventClaim):
        raise TypeError(f"not an EventClaim: {claim!r}")
    return claim


def claimPage(claim: EventClaim, cursor: Optional[str], limit: int) -> tuple[int, int]:
    """
    The sequence numbers (first exclusive, last inclusive) one
    C{claimedEvents} page may cover.

    @raise InvalidCursor: for a cursor not made by L{claimCursor} for this
        claim.
    """
    checkClaim(claim)
    limit = checkLimit(limit)
    after = claim.after
    if cursor is not None:
        _, after = decodeCursor(cursor)
        if not claim.after <= after < claim.last:
            raise InvalidCursor(f"cursor {cursor!r} is not within the claim")
    return after, min(claim.last, after + limit)


def claimCursor(claim: EventClaim, upTo: int) -> Optional[str]:
    """
    The cursor of a C{claimedEvents} page that covered the claim's
    sequence numbers up to C{upTo}: L{None} at the end of the claim.
    """
    if upTo >= claim.last:
        return None
    return encodeCursor(0.0, upTo)


def checkBatches(batches) -> list[OutboxBatch]:
    """
    @raise TypeError: unless C{batches} is a list of L{OutboxBatch}.
    """
    batches = list(batches)
    for batch in batches:
        if not isinstance(batch, OutboxBatch):
            raise TypeError(f"not an OutboxBatch: {batch!r}")
        if not isinstance(batch.id, str) or not batch.id:
            raise ValueError(f"batch id must be a non-empty string, not {batch.id!r}")
        if not isinstance(batch.body, str):
            raise ValueError("batch body must be text")
    return batches


def checkTakeArguments(outbox, now, lease, limit) -> tuple:
    """
    Validate the arguments of C{takeFromOutbox}.
    """
    checkStreamName(outbox)
    now = checkTime("now", now)
    if now is None or not math.isfinite(now):
        raise ValueError(f"now must be finite POSIX seconds, not {now!r}")
    lease = _positive("lease", lease)
    limit = checkLimit(limit)
    return outbox, now, lease, limit


# -- SMS submissions (issue 15) ----------------------------------------------

#: The longest SMSC message id SMPP 3.4 allows (65 octets with the NUL).
MAX_SMS_MESSAGE_ID = 64

_SMS_ID_RE = re.compile(r"[\x21-\x7e]{1,64}")


def normaliseSMSMessageID(message_id) -> str:
    """
    An SMSC message id as the SMS stores key it: stripped, lower-case,
    leading zeros dropped (so C{"00A1"} and C{"a1"} are one id).

    @raise ValueError: empty, longer than L{MAX_SMS_MESSAGE_ID}, or with
        characters other than printable ASCII.
    """
    if not isinstance(message_id, str):
        raise ValueError(f"an SMSC message id is text, not {type(message_id).__name__}")
    text = message_id.strip()
    if not _SMS_ID_RE.fullmatch(text):
        raise ValueError(f"not an SMSC message id: {message_id[:80]!r}")
    text = text.lower().lstrip("0")
    return text or "0"


def smsMessageIDCandidates(message_id: str) -> list:
    """
    The normalised ids a receipt's id may stand for, most likely first:
    itself, then its other base (SMSCs answer submit_sm in hex and write
    receipts in decimal, or the other way round): decimal digits written
    in hex, hex digits written in decimal.  Empty for an id that is not
    one.
    """
    try:
        first = normaliseSMSMessageID(message_id)
    except ValueError:
        return []
    candidates = [first]
    if first.isdigit() and len(first) <= 20:
        candidates.append(format(int(first), "x"))
    if re.fullmatch(r"[0-9a-f]{1,16}", first):
        candidates.append(str(int(first, 16)))
    return list(dict.fromkeys(candidates))


def _checkPart(instance, attribute, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 255:
        raise ValueError(f"{attribute.name} must be 1 to 255, not {value!r}")


@attrs.frozen(kw_only=True)
class SMSSubmission:
    """
    One short message the SMSC accepted: its message id and what it was
    part of, so that a receipt (at any node, after any restart) finds the
    message and recipient it reports on.

    @ivar message_id: the SMSC's id, normalised (L{normaliseSMSMessageID}).
    @ivar part: 1-based number of this part; L{parts} in all.
    @ivar time: POSIX seconds of the submit_sm_resp.
    """

    message_id: str = attrs.field(converter=normaliseSMSMessageID)
    queue_id: str
    recipient: str
    part: int = attrs.field(validator=_checkPart)
    parts: int = attrs.field(validator=_checkPart)
    time: float = attrs.field(converter=_requiredTime)
    tag: Optional[str] = None
    metadata: dict = attrs.field(factory=dict)

    def __attrs_post_init__(self) -> None:
        if self.part > self.parts:
            raise ValueError(f"part {self.part} of {self.parts}")
        if not isinstance(self.queue_id, str) or not self.queue_id:
            raise ValueError("queue_id is required")
        if not isinstance(self.recipient, str) or not self.recipient:
            raise ValueError("recipient is required")

    def asDict(self) -> dict:
        return attrs.asdict(self)


class ISMSSubmissions(Interface):
    """
    Which SMSC message id belongs to which message, recipient and part
    (L{SMSSubmission}); shared by the nodes that share the store.
    """

    def addSMSSubmission(submission):
        """
        Remember a submission; one with the same message id is replaced.

        @type submission: L{SMSSubmission}
        @rtype: L{Deferred} firing with L{None}
        """

    def findSMSSubmission(message_id):
        """
        The submission with this message id (normalised first), or L{None}.

        @rtype: L{Deferred} firing with an L{SMSSubmission} or L{None}; it
            fails with L{ValueError} for a malformed id.
        """

    def smsSubmissions(queue_id, recipient):
        """
        The parts of one message to one recipient already submitted.

        @rtype: L{Deferred} firing with a L{list} of L{SMSSubmission}
            ordered by part (then time).
        """

    def pruneSMSSubmissions(before, limit=10000):
        """
        Delete at most C{limit} submissions with a C{time} before
        C{before}.

        @rtype: L{Deferred} firing with the number deleted.
        """


# -- connection-slot leases (issue 17: one cluster, one set of limits) --------
#
# A connection limit that holds across the nodes sharing a store is a set of
# *leases* per resource (a destination such as "limited.test" or
# "provider:google"): a node takes one before it opens a session and gives
# it back when the session ends.  Every lease expires C{ttl} seconds after it
# was taken or last renewed, so the slots of a node that died come back on
# their own.  Times are POSIX seconds from the caller's clock, as for the
# token buckets.

_LEASE_TEXT = re.compile(r"[^\x00-\x20\x7f]{1,200}")


@attrs.frozen
class LeaseGrant:
    """
    The answer of L{ILeases.acquireLease}.

    @ivar granted: whether the lease is now held.
    @ivar held: live leases of the resource afterwards (this one included
        when granted).
    @ivar retry_after: seconds until the earliest live lease expires (0
        when granted): the longest a refused caller needs to wait for a
        slot of a dead holder; a live holder may give one back sooner.
    """

    granted: bool
    held: int
    retry_after: float


@attrs.frozen
class SlotAndTokenGrant:
    """
    The answer of L{ILeases.acquireLeaseAndTokens}: a lease and rate tokens
    taken together, or neither.

    @ivar granted: whether both the lease and the tokens were taken.
    @ivar missing: L{None} when granted; C{"slot"} when C{limit} live
        leases were held by others (the bucket is then not looked at, and
        nothing is taken from it); C{"token"} when a slot was free but the
        bucket did not hold the tokens (no lease is then taken).
    @ivar held: live leases of the resource afterwards (this one included
        when granted).
    @ivar retry_after: 0 when granted; for a missing slot, seconds until
        the earliest live lease expires (as L{LeaseGrant.retry_after}); for
        a missing token, seconds until the bucket holds the tokens (as
        L{TokenResult.retry_after}).
    @ivar remaining: tokens in the bucket afterwards, L{None} when it was
        not looked at (C{missing == "slot"}).
    """

    granted: bool
    missing: Optional[str]
    held: int
    retry_after: float
    remaining: Optional[float]


class ILeases(Interface):
    """
    Counted, expiring leases on named resources, atomic across every node
    that shares the store.  Every method returns a L{Deferred}.
    """

    def acquireLeaseAndTokens(resource, lease, limit, now, ttl, key, rate, burst, count=1):
        """
        Take the lease C{lease} on C{resource} (as L{acquireLease}) and
        C{count} tokens from the bucket C{key} (as L{IStore.takeTokens},
        the same buckets) in one atomic step: both or neither.  A refused
        call changes neither the lease set nor the bucket.

        @rtype: L{Deferred} firing with a L{SlotAndTokenGrant}; it fails
            with L{ValueError} for bad arguments (nothing taken).
        """

    def acquireLease(resource, lease, limit, now, ttl):
        """
        Take the lease C{lease} on C{resource} if fewer than C{limit} live
        leases are held on it; leases whose expiry is at or before C{now}
        are dead and not counted.  Taking a lease already held renews it
        (and is granted whatever C{limit}).

        @param resource: a name (printable, no spaces, at most 200).
        @param lease: the caller's unique name for this lease (same rules).
        @param limit: a positive integer.
        @param ttl: seconds the lease lives unless renewed, positive.
        @rtype: L{Deferred} firing with a L{LeaseGrant}; it fails with
            L{ValueError} for bad arguments.
        """

    def renewLeases(leases, now, ttl):
        """
        Extend each live lease of C{leases} (C{(resource, lease)} pairs) to
        C{now + ttl}.

        @rtype: L{Deferred} firing with the L{list} of the pairs that were
            not live any more (expired or released), in the given order;
            those stay released.
        """

    def releaseLease(resource, lease):
        """
        Give C{lease} on C{resource} back (nothing happens if it is not
        held any more).

        @rtype: L{Deferred} firing with L{None}.
        """

    def liveLeases(resource, now):
        """
        @rtype: L{Deferred} firing with the sorted L{list} of the names of
            the live leases on C{resource}.
        """


def checkLeaseName(name: str, value) -> str:
    """
    @raise ValueError: C{value} is not a lease or resource name.
    """
    if not isinstance(value, str) or not _LEASE_TEXT.fullmatch(value):
        raise ValueError(
            f"{name} must be 1 to 200 printable characters without spaces, not {value!r}"
        )
    return value


def checkLeaseArguments(resource, lease, limit, now, ttl) -> tuple:
    """
    Validate the arguments of C{acquireLease}.

    @return: (resource, lease, limit, now, ttl).
    @raise ValueError: for a bad value.
    """
    checkLeaseName("resource", resource)
    checkLeaseName("lease", lease)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit must be a positive integer, not {limit!r}")
    now = checkTime("now", now)
    if now is None or not math.isfinite(now):
        raise ValueError(f"now must be finite POSIX seconds, not {now!r}")
    ttl = _positive("ttl", ttl)
    return resource, lease, limit, now, ttl


def checkLeaseAndTokenArguments(resource, lease, limit, now, ttl, key, rate, burst, count) -> tuple:
    """
    Validate the arguments of C{acquireLeaseAndTokens}.

    @return: (resource, lease, limit, now, ttl, key, rate, burst, count).
    @raise ValueError: for a bad value.
    """
    resource, lease, limit, now, ttl = checkLeaseArguments(resource, lease, limit, now, ttl)
    key, rate, burst, now, count = checkTokenArguments(key, rate, burst, now, count)
    return resource, lease, limit, now, ttl, key, rate, burst, count


def checkLeasePairs(leases) -> list:
    """
    Validate the C{(resource, lease)} pairs of C{renewLeases}.
    """
    pairs = []
    for pair in leases:
        resource, lease = pair
        pairs.append((checkLeaseName("resource", resource), checkLeaseName("lease", lease)))
    return pairs


# -- adaptive throttles shared by the nodes (issue 17) -------------------------

#: The deepest a throttle goes: C{2 ** -4}, 1/16 of a destination's
#: configured connections and rate.
MAX_THROTTLE_LEVEL = 4

#: The longest reason a throttle state keeps (the reply that triggered it).
MAX_THROTTLE_REASON = 300


@attrs.frozen
class ThrottleState:
    """
    A destination's adaptive throttle as the nodes share it.

    The budget is C{2 ** -level} of the configured one until C{until};
    from then on it is one level less (twice the budget) every C{cooldown}
    seconds, down to level 0, the whole budget.  The state is a function
    of time: every node reading it recovers in the same steps at the same
    moments, and nobody writes a recovery step (so no step is taken twice).

    @ivar level: halvings in force, 1 to L{MAX_THROTTLE_LEVEL}.
    @ivar until: when the first recovery step is due (POSIX seconds).
    @ivar cooldown: seconds between two steps.
    @ivar reason: the reply that triggered it last.
    """

    level: int
    until: float
    cooldown: float
    reason: str = ""

    def levelAt(self, now: float) -> int:
        """
        The halvings in force at C{now}.
        """
        if now < self.until:
            return self.level
        steps = 1 + math.floor((now - self.until) / self.cooldown)
        return max(0, self.level - steps)

    def nextStep(self, now: float) -> Optional[float]:
        """
        When the level in force at C{now} next drops by one, or L{None} if
        it is 0.
        """
        if self.levelAt(now) == 0:
            return None
        if now < self.until:
            return self.until
        return self.until + (math.floor((now - self.until) / self.cooldown) + 1) * self.cooldown

    @property
    def end(self) -> float:
        """
        When the level reaches 0.
        """
        return self.until + (self.level - 1) * self.cooldown


def triggered(
    current: Optional[ThrottleState], seen: int, reason: str, now: float, cooldown: float
) -> ThrottleState:
    """
    The state after a "slow down" reply received under C{seen} halvings:
    one halving more than C{seen} (or the current level, if deeper: the
    reply answered a budget another node has already lowered), the
    cool-down started again.  What every back end's trigger computes.
    """
    level = 0 if current is None else current.levelAt(now)
    level = min(MAX_THROTTLE_LEVEL, max(level, seen + 1))
    return ThrottleState(level, now + cooldown, cooldown, reason)


def merged(
    current: Optional[ThrottleState], state: ThrottleState, now: float
) -> Optional[ThrottleState]:
    """
    The state after replaying C{state} (a node's own trigger that could not
    be written while the store was unreachable) into C{current} at C{now}:
    at every moment from C{now} at least as deep as both, and over no
    later than the later of the two (a replay never makes a throttle last
    longer than it would have had the trigger been written at its time).
    What every back end's replay computes.

    Either one when it is as deep as the other now and ends no sooner;
    else the deeper level now with the later end (and that one's
    cool-down and reason).  L{None} when neither is throttled at C{now}.
    """
    live = [s for s in (current, state) if s is not None and s.levelAt(now) > 0]
    if not live:
        return None
    if len(live) == 1:
        return live[0]
    a, b = live
    if a.levelAt(now) >= b.levelAt(now) and a.end >= b.end:
        return a
    if b.levelAt(now) >= a.levelAt(now) and b.end >= a.end:
        return b
    level = max(a.levelAt(now), b.levelAt(now))
    later = a if a.end >= b.end else b
    return ThrottleState(
        level, later.end - (level - 1) * later.cooldown, later.cooldown, later.reason
    )


def checkThrottleState(name: str, state) -> ThrottleState:
    """
    @raise ValueError: C{state} is not a L{ThrottleState} a store can keep.
    """
    if not isinstance(state, ThrottleState):
        raise ValueError(f"{name} must be a ThrottleState, not {state!r}")
    level = state.level
    if isinstance(level, bool) or not isinstance(level, int) or not 1 <= level <= MAX_THROTTLE_LEVEL:
        raise ValueError(f"level must be an integer from 1 to {MAX_THROTTLE_LEVEL}, not {level!r}")
    until = checkTime("until", state.until)
    if until is None or not math.isfinite(until):
        raise ValueError(f"until must be finite POSIX seconds, not {state.until!r}")
    cooldown = _positive("cooldown", state.cooldown)
    if not isinstance(state.reason, str):
        raise ValueError(f"reason must be text, not {state.reason!r}")
    return ThrottleState(level, until, cooldown, state.reason[:MAX_THROTTLE_REASON])


class IThrottles(Interface):
    """
    The destinations' adaptive throttles (L{ThrottleState}), shared by
    every node of the store.  Every method returns a L{Deferred}; a state
    is forgotten once its level is 0 (Redis also drops it by a TTL).
    """

    def triggerThrottle(destination, seen, reason, now, cooldown):
        """
        Record a "slow down" reply for C{destination} (L{triggered}),
        atomically.

        @param destination: a destination key (the lease name rules).
        @param seen: the halvings the caller had in force (0 to
            L{MAX_THROTTLE_LEVEL}).
        @param reason: the reply, text (cut to L{MAX_THROTTLE_REASON}).
        @param cooldown: seconds, positive.
        @rtype: L{Deferred} firing with the new L{ThrottleState}; it fails
            with L{ValueError} for bad arguments.
        """

    def throttleStates(now):
        """
        @rtype: L{Deferred} firing with a L{dict} of the destinations
            throttled at C{now} (level above 0) to their L{ThrottleState}.
        """

    def replayThrottle(destination, state, now):
        """
        Write C{state}, a trigger of this node's that could not reach the
        store when it happened, into C{destination}'s state at C{now}
        (L{merged}), atomically.

        @rtype: L{Deferred} firing with the state afterwards, or L{None}
            when neither is throttled at C{now} (nothing is written); it
            fails with L{ValueError} for bad arguments.
        """


def checkThrottleArguments(destination, seen, reason, now, cooldown) -> tuple:
    """
    Validate the arguments of C{triggerThrottle}.

    @return: (destination, seen, reason, now, cooldown).
    @raise ValueError: for a bad value.
    """
    checkLeaseName("destination", destination)
    if isinstance(seen, bool) or not isinstance(seen, int) or not 0 <= seen <= MAX_THROTTLE_LEVEL:
        raise ValueError(f"seen must be an integer from 0 to {MAX_THROTTLE_LEVEL}, not {seen!r}")
    if not isinstance(reason, str):
        raise ValueError(f"reason must be text, not {reason!r}")
    now = checkTime("now", now)
    if now is None or not math.isfinite(now):
        raise ValueError(f"now must be finite POSIX seconds, not {now!r}")
    cooldown = _positive("cooldown", cooldown)
    return destination, seen, reason[:MAX_THROTTLE_REASON], now, cooldown


# -- mailboxes between the nodes (issue 17) ------------------------------------

#: The longest message a mailbox takes (characters).
MAX_MAILBOX_MESSAGE = 65536


class IMailboxes(Interface):
    """
    Named queues of text messages between the nodes sharing the store
    (commands for the node that owns a message, and their answers).  A
    mailbox nobody posts to expires; every method returns a L{Deferred}.
    """

    def postToMailbox(mailbox, message, ttl):
        """
        Append C{message} to C{mailbox}; the mailbox, with whatever is
        still in it, is dropped C{ttl} seconds after this post unless
        posted to again.

        @param mailbox: a name (the lease name rules).
        @param message: text, at most L{MAX_MAILBOX_MESSAGE} characters.
        @rtype: L{Deferred} firing with L{None}; it fails with
            L{ValueError} for bad arguments.
        """

    def takeFromMailbox(mailbox, limit):
        """
        Remove and return the oldest C{limit} messages of C{mailbox}: each
        is taken by one caller only.

        @rtype: L{Deferred} firing with a L{list} of text, oldest first
            (empty when there is none).
        """


def checkMailboxPost(mailbox, message, ttl) -> tuple:
    """
    Validate the arguments of C{postToMailbox}.

    @return: (mailbox, message, ttl).
    @raise ValueError: for a bad value.
    """
    checkLeaseName("mailbox", mailbox)
    if not isinstance(message, str) or len(message) > MAX_MAILBOX_MESSAGE:
        raise ValueError(f"message must be text of at most {MAX_MAILBOX_MESSAGE} characters")
    return mailbox, message, _positive("ttl", ttl)


def checkMailboxTake(mailbox, limit) -> tuple:
    """
    Validate the arguments of C{takeFromMailbox}.

    @return: (mailbox, limit).
    @raise ValueError: for a bad value.
    """
    checkLeaseName("mailbox", mailbox)
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise ValueError(f"limit must be an integer from 1 to {MAX_LIMIT}, not {limit!r}")
    return mailbox, limit
