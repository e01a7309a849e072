"""
Classify a remote SMTP reply into a bounce reason (DESIGN section 1.7).

The vocabulary is Sisimai's (C{userunknown}, C{mailboxfull}, C{hostunknown},
...).  L{classify} is a pure function of the enhanced status code and the
reply text so that the delivery scheduler and the DSN parser (feedback) can
share and extend it.  Rules are tried in order; the first match wins.
"""

import re
from typing import Callable, Optional

__all__ = ["classify", "bounceKind", "REASONS", "HARD_REASONS", "RULES"]

REASONS = frozenset(
    [
        "userunknown",
        "mailboxfull",
        "hostunknown",
        "filtered",
        "blocked",
        "spamdetected",
        "policyviolation",
        "mesgtoobig",
        "suspend",
        "expired",
        "networkerror",
        "systemerror",
        "rejected",
        "hasmoved",
        "notaccept",
    ]
)

#: Reasons that make a bounce hard: the address (or its domain) does not
#: exist or takes no mail, so sending again can never work and the address
#: goes on the suppression list.  Every other permanent failure (a full
#: mailbox, a block, a policy) is soft: the message failed, the address
#: may work another day.  This is Sisimai's split.
HARD_REASONS = frozenset(["userunknown", "hostunknown", "hasmoved", "notaccept"])


def _words(*patterns: str) -> "re.Pattern[str]":
    return re.compile("|".join(patterns), re.IGNORECASE)


_USERUNKNOWN = _words(
    r"user unknown",
    r"unknown user",
    r"no such user",
    r"no such (?:mailbox|recipient|address)",
    r"unknown (?:mailbox|recipient|address)",
    r"(?:mailbox|recipient|address|user|account)\b[^.]{0,40}"
    r"\b(?:does not|doesn't|not) exist",
    r"mailbox (?:not found|unavailable)",
    r"recipient (?:not found|rejected: user)",
    r"invalid (?:recipient|mailbox)",
)
_MAILBOXFULL = _words(
    r"mailbox (?:is )?full",
    r"over ?quota",
    r"quota exceeded",
    r"exceeded (?:the )?(?:storage|quota)",
    r"insufficient (?:storage|disk space)",
)
_HOSTUNKNOWN = _words(
    r"host unknown",
    r"unknown host",
    r"domain (?:not found|does not exist|unknown)",
    r"no such domain",
    r"null mx",
    r"host or domain name not found",
)
_MESGTOOBIG = _words(
    r"message (?:is )?too (?:big|large)",
    r"message size exceeds",
    r"size limit",
    r"exceeds (?:the )?(?:maximum )?(?:message )?size",
)
_SUSPEND = _words(
    r"mailbox (?:is )?(?:disabled|inactive|suspended)",
    r"account (?:is )?(?:disabled|inactive|suspended|deactivated)",
)
_SPAM = _words(
    r"\bspam\b",
    r"\bjunk mail\b",
    r"unsolicited",
    r"bulk mail",
    r"content (?:looks|is) like spam",
)
_LISTED = _words(
    r"\bblocklist(?:ed)?\b",
    r"\bblacklist(?:ed)?\b",
    r"\bdenylist(?:ed)?\b",
    r"\brbl\b",
    r"\bdnsbl\b",
    r"listed (?:in|on|at)",
    r"spamhaus",
    r"spamcop",
    r"(?:poor|bad|low) (?:ip )?reputation",
    r"client host (?:\S+ )?rejected",
    r"connection refused by policy",
)
_BLOCKED = _words(r"\bblocked\b", r"access denied")
_FILTERED = _words(r"\bfiltered\b", r"content filter", r"rejected by (?:a )?filter")
_SYSTEMERROR = _words(
    r"system error",
    r"internal (?:server )?error",
    r"local error",
    r"system (?:not accepting|full)",
)


def _status(status: Optional[str]) -> tuple:
    """
    C{"5.1.1"} → C{(5, 1, 1)}; anything unparsable → C{()}.
    """
    if not status:
        return ()
    try:
        return tuple(int(part) for part in status.split("."))
    except ValueError:
        return ()


Rule = Callable[[tuple, str], bool]

#: Ordered (reason, rule) pairs; a rule gets the parsed status tuple (may be
#: empty) and the reply text.  Extend by inserting rules (the feedback code
#: may prepend more specific ones).
RULES: list = [
    ("blocked", lambda s, t: bool(_LISTED.search(t))),
    (
        "spamdetected",
        lambda s, t: bool(_SPAM.search(t)) and (not s or s[1:2] in ((7,), (0,))),
    ),
    ("userunknown", lambda s, t: s[:3] == (5, 1, 1) or bool(_USERUNKNOWN.search(t))),
    ("hostunknown", lambda s, t: s[:3] in ((5, 1, 2), (5, 1, 10), (5, 4, 4))),
    ("mailboxfull", lambda s, t: s[1:3] == (2, 2) or bool(_MAILBOXFULL.search(t))),
    (
        "mesgtoobig",
        lambda s, t: s[:3] in ((5, 3, 4), (5, 2, 3)) or bool(_MESGTOOBIG.search(t)),
    ),
    ("suspend", lambda s, t: s[:3] == (5, 2, 1) or bool(_SUSPEND.search(t))),
    ("hostunknown", lambda s, t: bool(_HOSTUNKNOWN.search(t))),
    ("blocked", lambda s, t: bool(_BLOCKED.search(t))),
    ("filtered", lambda s, t: bool(_FILTERED.search(t))),
    ("expired", lambda s, t: s[1:3] == (4, 7)),
    ("policyviolation", lambda s, t: s[1:2] == (7,)),
    ("networkerror", lambda s, t: s[1:2] == (4,)),
    ("systemerror", lambda s, t: s[1:2] == (3,) or bool(_SYSTEMERROR.search(t))),
]


def classify(status: Optional[str], text: str) -> str:
    """
    The bounce reason for a reply.

    @param status: the enhanced status code (C{"5.1.1"}) or L{None}.
    @param text: the reply text (without the numeric reply code).
    @return: one of L{REASONS}; C{"rejected"} when no rule matches.
    """
    parsed = _status(status)
    text = text or ""
    for reason, rule in RULES:
        if rule(parsed, text):
            return reason
    return "rejected"


def bounceKind(reason: str) -> str:
    """
    C{"hard"} or C{"soft"} for a bounce reason (see L{HARD_REASONS}).
    """
    return "hard" if reason in HARD_REASONS else "soft"
