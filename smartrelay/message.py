"""
The message model: an accepted message as submission, delivery and the
re-wrap engine share it.

* L{Recipient}: one envelope recipient and its delivery state.
* L{SpoolEntry}: one accepted message (envelope, facts about its client,
  the choices of its control headers, and per-recipient state).  The
  message bytes are not part of it: L{smartrelay.spool} keeps them on disk.

Plain data, with no behaviour beyond reading its own state: whoever stores
or changes it (the spool, the scheduler) lives elsewhere.
"""

from typing import Any, Optional

import attrs

#: The states a recipient never leaves.
FINAL_STATES = frozenset(["delivered", "bounced", "expired", "suppressed"])


class SharedDict(dict):
    """
    A dict that refuses to be changed, because one instance of it stands for
    the same value in many messages (see L{SpoolEntry}): copy it
    (C{dict(d)}) to change it.  It is a real C{dict} for everything else
    (JSON, equality, C{isinstance}).
    """

    __slots__ = ()

    def _refuse(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("this dict is shared by many messages: copy it to change it")

    __setitem__ = __delitem__ = __ior__ = _refuse  # type: ignore[assignment]
    clear = pop = popitem = setdefault = update = _refuse  # type: ignore[assignment]

    def __reduce__(self) -> tuple:
        return (SharedDict, (dict(self),))

    def __copy__(self) -> "SharedDict":
        return self

    def __deepcopy__(self, memo: dict) -> "SharedDict":
        return self


#: The one empty mapping of every message without metadata or options.
EMPTY = SharedDict()


class _Recent:
    """
    The values seen lately, each kept once: a queue of a million deferred
    messages from a few applications holds a few senders, clients and tags,
    not a million copies of each (every string and dict is tens to hundreds
    of bytes).  Bounded: forgets everything past C{size} values.
    """

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self._seen: dict = {}

    def string(self, value: Optional[str]) -> Optional[str]:
        if type(value) is not str:
            return value
        seen = self._seen
        if len(seen) >= self.size:
            seen.clear()
        return seen.setdefault(value, value)

    def mapping(self, value: Optional[dict]) -> dict:
        if not value:
            return EMPTY
        try:
            key = (dict, *sorted(value.items()))
            hash(key)
        except TypeError:  # unhashable or unorderable values: kept as given
            return value
        seen = self._seen
        shared = seen.get(key)
        if shared is None:
            if len(seen) >= self.size:
                seen.clear()
            shared = seen.setdefault(key, SharedDict(value))
        return shared


_recent = _Recent()


def _empty(value: Optional[dict]) -> dict:
    return value if value else EMPTY


@attrs.define(weakref_slot=False)
class Recipient:
    """
    One envelope recipient of an accepted message.

    @ivar state: C{queued} (never tried), C{deferred} (tried, will retry),
        or a final state (L{FINAL_STATES}): C{delivered}, C{bounced},
        C{expired}, C{suppressed}.
    @ivar attempts: delivery attempts made so far.
    @ivar next_attempt: POSIX seconds of the next attempt (0: as soon as
        possible).
    """

    address: str
    state: str = "queued"
    attempts: int = 0
    next_attempt: float = 0.0

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES


@attrs.define(eq=False, weakref_slot=False)
class SpoolEntry:
    """
    One accepted message.

    @ivar sender: envelope sender, C{""} for the null reverse path.
    @ivar received: POSIX seconds when the 250 was sent.
    @ivar size: size in bytes of the stored message (CRLF line ends).
    @ivar client: facts about the submitting client: C{ip}, C{helo},
        C{user} (SMTP AUTH name or None).
    @ivar tag: the message's statistics tag (C{X-SmartRelay-Tag}), or
        L{None}.
    @ivar metadata: C{X-SmartRelay-Metadata-*}: carried into every event.
    @ivar options: what the message's control headers chose instead of the
        relay's defaults: C{opens}, C{clicks}, C{unsubscribe} (booleans;
        missing keys: the default).

    The sender, tag, client and options of recent messages are shared with
    the messages that have the same ones, and an empty metadata or options
    is the one L{EMPTY}: C{client}, C{metadata} and C{options} may be
    L{SharedDict}s, which refuse changes (assign a new dict instead).

    @ivar spoolLocation: where L{smartrelay.spool} keeps the message (its
        own business, opaque to everyone else; L{None} until it is stored):
        held here rather than in a table of the spool's, a dict entry a
        queued message less.

    Neither a recipient nor an entry can be weakly referenced: a queue of
    a million deferred messages holds a million of each, and the slot
    costs 8 bytes an object.
    """

    queue_id: str
    sender: str = attrs.field(converter=_recent.string)
    recipients: list
    received: float
    size: int
    client: dict = attrs.field(factory=dict, converter=_recent.mapping)
    tag: Optional[str] = attrs.field(default=None, converter=_recent.string)
    metadata: dict = attrs.field(factory=dict, converter=_empty)
    options: dict = attrs.field(factory=dict, converter=_recent.mapping)
    spoolLocation: Any = attrs.field(default=None, init=False, repr=False)

    def pending(self) -> list:
        return [r for r in self.recipients if not r.final]

    @property
    def done(self) -> bool:
        return all(r.final for r in self.recipients)
