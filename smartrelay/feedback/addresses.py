# -*- test-case-name: tests.test_smtp_feedback -*-
"""
The addresses mail comes back to (DESIGN 1.5, 1.7a), and what each one is:
a VERP return path or a mailto unsubscribe address (both naming a queue id
and a recipient index by their signed token), C{postmaster@} of the bounce
domain, or one of C{[feedback] fbl_addresses}.

The feedback listener's policy turns the errors raised here into its
C{550} replies; the processor reads the addresses a stored report came to.
"""

from typing import Optional

import attrs

from smartrelay.tokens import BadToken, Tokens

__all__ = [
    "UNSUBSCRIBE_PREFIX",
    "NotAFeedbackAddress",
    "UnknownAddress",
    "ForgedToken",
    "Target",
    "FeedbackAddresses",
]


class NotAFeedbackAddress(ValueError):
    """
    The address takes no reports.
    """


class UnknownAddress(NotAFeedbackAddress):
    """
    The address is none of ours.
    """


class ForgedToken(NotAFeedbackAddress):
    """
    The address has the form of ours, but its token does not verify.
    """


#: The local part of mailto unsubscribe addresses (DESIGN 1.5).
UNSUBSCRIBE_PREFIX = "unsub"


@attrs.frozen
class Target:
    """
    What a feedback recipient address is.

    @ivar kind: C{"verp"}, C{"unsubscribe"}, C{"postmaster"} or C{"fbl"}.
    @ivar queue_id: for C{verp} and C{unsubscribe}: the message's queue id.
    @ivar index: for those: the recipient's index in its envelope.
    """

    kind: str
    queue_id: Optional[str] = None
    index: Optional[int] = None


@attrs.frozen
class FeedbackAddresses:
    """
    Reads the feedback listener's recipient addresses.

    @ivar bounceDomain: lower-case.
    @ivar verpPrefix: the local part before C{+TOKEN} of return paths.
    @ivar fblAddresses: lower-case addresses.
    """

    tokens: Tokens
    bounceDomain: str
    verpPrefix: str
    fblAddresses: frozenset = frozenset()

    def target(self, address: str) -> Target:
        """
        @raise ForgedToken: a token that does not verify (forged,
            damaged, truncated).
        @raise UnknownAddress: an address that is none of ours.
        """
        local, at, domain = address.rpartition("@")
        domain = domain.lower()
        if (local.lower() + at + domain) in self.fblAddresses:
            return Target("fbl")
        if not at or domain.rstrip(".") != self.bounceDomain:
            raise UnknownAddress(address)
        lowered = local.lower()
        if lowered == "postmaster":
            return Target("postmaster")
        prefix, plus, token = lowered.partition("+")
        if plus:
            if prefix == self.verpPrefix.lower():
                kind, tokenKind = "verp", "v"
            elif prefix == UNSUBSCRIBE_PREFIX:
                kind, tokenKind = "unsubscribe", "u"
            else:
                raise UnknownAddress(address)
            try:
                queueID, index = self.tokens.readCompact(tokenKind, token)
            except BadToken:
                raise ForgedToken(address) from None
            return Target(kind, queueID, index)
        raise UnknownAddress(address)
