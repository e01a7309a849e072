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

from typing import Optional

import attrs

#: The states a recipient never leaves.
FINAL_STATES = frozenset(["delivered", "bounced", "expired", "suppressed"])


@attrs.define
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


@attrs.define(eq=False)
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
    """

    queue_id: str
    sender: str
    recipients: list
    received: float
    size: int
    client: dict = attrs.field(factory=dict)
    tag: Optional[str] = None
    metadata: dict = attrs.field(factory=dict)
    options: dict = attrs.field(factory=dict)

    def pending(self) -> list:
        return [r for r in self.recipients if not r.final]

    @property
    def done(self) -> bool:
        return all(r.final for r in self.recipients)
