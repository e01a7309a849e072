"""
The durable on-disk queue.  (Interface draft: implementation in progress.)

Data types shared with the delivery side:

* L{Recipient}: one envelope recipient and its delivery state.
* L{SpoolEntry}: one accepted message (envelope + per-recipient state);
  the message bytes stay on disk and are read with L{Spool.readMessage}.
"""

from typing import Optional

import attrs

FINAL_STATES = frozenset(["delivered", "bounced", "expired"])


@attrs.define
class Recipient:
    """
    One envelope recipient of a spooled message.

    @ivar state: C{queued} (never tried), C{deferred} (tried, will retry),
        or a final state: C{delivered}, C{bounced}, C{expired}.
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
    """

    queue_id: str
    sender: str
    recipients: list
    received: float
    size: int
    client: dict = attrs.field(factory=dict)

    def pending(self) -> list:
        return [r for r in self.recipients if not r.final]

    @property
    def done(self) -> bool:
        return all(r.final for r in self.recipients)
