# -*- test-case-name: tests.test_feedback_reasons -*-
"""
Why a message failed: the one classifier for both paths, the synchronous
4xx/5xx reply in a delivery session and the DSN record that comes back
later (DESIGN 1.7).

L{classify} maps what a failure says -- the RFC 3463 status, the SMTP reply
code, the diagnostic text, the DSN action -- to a L{Verdict}: a reason in
Sisimai's vocabulary (C{userunknown}, C{mailboxfull}, C{hostunknown}, ...),
hard or soft, and the status (inferred from the text or the reply code when
the report gives none).

The rules are data, in four tables a maintainer reads and extends:

  - L{STATUS_REASONS}: enhanced status code -> reason (Sisimai's reading of
    RFC 3463 and the IANA registry);
  - L{PHRASES}: reason -> the lower-case phrases servers write for it
    (C{*} in a phrase matches any run of text within one diagnostic);
  - L{PRECEDENCE}: which reason wins when the status and the text, or two
    phrases, disagree;
  - L{HARD_REASONS}: the reasons that make a bounce hard.

All phrases are compiled into one regular expression, so a diagnostic is
scanned once whatever the size of the table.
"""

import re
from typing import Iterable, Optional

import attrs

__all__ = [
    "REASONS",
    "BOUNCE_REASONS",
    "HARD_REASONS",
    "STATUS_REASONS",
    "PHRASES",
    "PRECEDENCE",
    "Verdict",
    "classify",
    "classifyReply",
    "bounceKind",
]

# ---------------------------------------------------------------------------
# The vocabulary.

#: Every reason L{classify} can give: Sisimai's, of which C{delivered},
#: C{feedback} (a complaint) and C{vacation} (an auto-reply) are no bounce.
REASONS = frozenset(
    """
    authfailure badreputation blocked contenterror delivered exceedlimit
    expired failedstarttls feedback filtered hasmoved hostunknown
    mailboxfull mailererror mesgtoobig networkerror norelaying notaccept
    notcompliantrfc onhold policyviolation ratelimited rejected requireptr
    securityerror spamdetected speeding suppressed suspend syntaxerror
    systemerror systemfull toomanyconn undefined userunknown vacation
    virusdetected
    """.split()
)

#: The reasons that are bounces (have a kind).
BOUNCE_REASONS = REASONS - {"delivered", "feedback", "vacation"}

#: Reasons that make a bounce hard: the address or its domain does not
#: exist, so sending again can never work.  C{notaccept} (the domain takes
#: no mail: null MX, "does not accept mail") is hard when permanent, soft
#: when the server said 4xx.  Everything else -- a full mailbox, a block, a
#: policy -- is soft: this message failed, the address may work another
#: day.  This is Sisimai's rule.
HARD_REASONS = frozenset(["userunknown", "hostunknown", "hasmoved"])

# ---------------------------------------------------------------------------
# Table 1: enhanced status code -> reason.

#: RFC 3463 / IANA enhanced status codes with a meaning specific enough to
#: name a reason.  Codes not listed (x.0.0, 4.3.0, 5.5.1, ...) say nothing
#: beyond permanent/temporary; the text decides then.
STATUS_REASONS = {
    "2.1.5": "delivered",
    # 4.x.x: temporary.
    "4.1.6": "hasmoved",
    "4.1.7": "rejected",
    "4.1.8": "rejected",
    "4.1.9": "systemerror",
    "4.2.1": "blocked",
    "4.2.2": "mailboxfull",
    "4.2.3": "exceedlimit",
    "4.2.4": "filtered",
    "4.3.1": "systemfull",
    "4.3.2": "notaccept",
    "4.3.3": "systemerror",
    "4.3.5": "systemerror",
    "4.4.1": "expired",
    "4.4.2": "networkerror",
    "4.4.3": "systemerror",
    "4.4.4": "networkerror",
    "4.4.5": "systemfull",
    "4.4.6": "networkerror",
    "4.4.7": "expired",
    "4.4.8": "networkerror",
    "4.5.3": "systemerror",
    "4.5.5": "systemerror",
    "4.6.0": "contenterror",
    "4.6.2": "contenterror",
    "4.6.5": "contenterror",
    "4.7.1": "blocked",
    "4.7.2": "blocked",
    "4.7.5": "securityerror",
    "4.7.6": "securityerror",
    "4.7.7": "securityerror",
    "4.7.12": "securityerror",
    "4.7.15": "securityerror",
    "4.7.16": "mesgtoobig",
    "4.7.24": "authfailure",
    "4.7.25": "requireptr",
    "4.7.26": "authfailure",
    # 5.x.x: permanent.
    "5.1.0": "userunknown",
    "5.1.1": "userunknown",
    "5.1.2": "hostunknown",
    "5.1.3": "userunknown",
    "5.1.4": "filtered",
    "5.1.6": "hasmoved",
    "5.1.7": "rejected",
    "5.1.8": "rejected",
    "5.1.9": "systemerror",
    "5.1.10": "notaccept",
    "5.2.0": "filtered",
    "5.2.1": "filtered",
    "5.2.2": "mailboxfull",
    "5.2.3": "exceedlimit",
    "5.2.4": "filtered",
    "5.3.0": "systemerror",
    "5.3.1": "systemfull",
    "5.3.2": "notaccept",
    "5.3.3": "systemerror",
    "5.3.4": "mesgtoobig",
    "5.3.5": "systemerror",
    "5.4.0": "networkerror",
    "5.4.3": "systemerror",
    "5.4.4": "hostunknown",
    "5.5.2": "syntaxerror",
    "5.5.3": "toomanyconn",
    "5.5.4": "systemerror",
    "5.5.5": "systemerror",
    "5.5.6": "syntaxerror",
    "5.6.0": "contenterror",
    "5.6.1": "contenterror",
    "5.6.2": "contenterror",
    "5.6.3": "contenterror",
    "5.6.5": "contenterror",
    "5.6.6": "contenterror",
    "5.6.7": "contenterror",
    "5.6.8": "contenterror",
    "5.6.9": "contenterror",
    "5.7.0": "securityerror",
    "5.7.1": "securityerror",
    "5.7.2": "securityerror",
    "5.7.3": "securityerror",
    "5.7.4": "securityerror",
    "5.7.5": "securityerror",
    "5.7.6": "securityerror",
    "5.7.7": "securityerror",
    "5.7.8": "securityerror",
    "5.7.9": "securityerror",
    "5.7.10": "securityerror",
    "5.7.11": "securityerror",
    "5.7.13": "suspend",
    "5.7.14": "securityerror",
    "5.7.15": "securityerror",
    "5.7.16": "mesgtoobig",
    "5.7.17": "hasmoved",
    "5.7.18": "hasmoved",
    "5.7.19": "securityerror",
    "5.7.20": "authfailure",
    "5.7.21": "authfailure",
    "5.7.22": "authfailure",
    "5.7.23": "authfailure",
    "5.7.24": "authfailure",
    "5.7.25": "requireptr",
    "5.7.26": "authfailure",
    "5.7.27": "notaccept",
    "5.7.28": "spamdetected",
    "5.7.29": "authfailure",
    "5.7.30": "failedstarttls",
}

# ---------------------------------------------------------------------------
# Table 2: reason -> phrases.

#: What servers write, per reason: lower-case, single-spaced text searched
#: for in the lower-cased, single-spaced diagnostic.  C{*} stands for any
#: text (up to a few hundred characters) between two parts of a phrase.
#: Where two phrases of different reasons match, L{PRECEDENCE} decides;
#: a longer phrase beats a shorter one starting at the same place.
PHRASES = {
    "userunknown": (
        "user unknown",
        "unknown user",
        "no such user",
        "no such mailbox",
        "no such recipient",
        "no such address",
        "unknown mailbox",
        "unknown recipient",
        "unknown address",
        "address unknown",
        "recipient unknown",
        "user does not exist",
        "user not found",
        "mailbox not found",
        "mailbox does not exist",
        "mailbox * does not exist",
        "address does not exist",
        "recipient does not exist",
        "recipient not found",
        "invalid recipient",
        "invalid mailbox",
        "the email account that you tried to reach does not exist",
        "no mailbox here by that name",
    ),
    "mailboxfull": (
        "mailbox full",
        "mailbox is full",
        "over quota",
        "overquota",
        "quota exceeded",
        "exceeded storage allocation",
        "exceeded the storage",
        "insufficient disk space",
        "is over quota",
    ),
    "hostunknown": (
        "host unknown",
        "unknown host",
        "domain not found",
        "domain does not exist",
        "no such domain",
        "host or domain name not found",
        "name or service not known",
    ),
    "mesgtoobig": (
        "message too big",
        "message too large",
        "message is too big",
        "message is too large",
        "message size exceeds",
        "exceeds size limit",
    ),
    "suspend": (
        "mailbox disabled",
        "mailbox is disabled",
        "account disabled",
        "account is disabled",
        "account has been disabled",
        "account is suspended",
        "account suspended",
        "the email account that you tried to reach is disabled",
    ),
    "spamdetected": (
        "spam",
        "junk mail",
        "unsolicited",
        "bulk mail",
    ),
    "blocked": (
        "blocklist",
        "blacklist",
        "denylist",
        "dnsbl",
        "spamhaus",
        "spamcop",
        "blocked using",
        "client host rejected",
        "client host * rejected",
        "connection refused by policy",
        "access denied",
    ),
    "badreputation": (
        "poor reputation",
        "bad reputation",
        "low reputation",
    ),
    "filtered": (
        "message filtered",
        "content filter",
        "rejected by filter",
    ),
    "systemerror": (
        "system error",
        "internal error",
        "internal server error",
        "local error",
    ),
    "expired": (
        "delivery time expired",
        "retry time exceeded",
        "retry timeout exceeded",
    ),
    "vacation": (
        "out of office",
        "on vacation",
    ),
}

# ---------------------------------------------------------------------------
# Table 3: precedence.

#: Order of the reasons that the text or the status may name alike: the
#: first of these that either names wins.  A reason the status names is
#: ignored when the text names one of its L{STATUS_VETO}es.
PRECEDENCE = (
    "mailboxfull",
    "mesgtoobig",
    "exceedlimit",
    "suspend",
    "hasmoved",
    "norelaying",
    "authfailure",
    "userunknown",
    "filtered",
    "requireptr",
    "notcompliantrfc",
    "badreputation",
    "contenterror",
    "rejected",
    "hostunknown",
    "spamdetected",
    "speeding",
    "toomanyconn",
    "blocked",
)

#: Reasons only the text can name, tried (in this order) when the above
#: found nothing and the status names no reason or only a vague one
#: (L{VAGUE}).
TEXT_ONLY = (
    "mailboxfull",
    "authfailure",
    "badreputation",
    "speeding",
    "spamdetected",
    "virusdetected",
    "policyviolation",
    "norelaying",
    "systemerror",
    "networkerror",
    "suspend",
    "contenterror",
    "systemfull",
    "notaccept",
    "expired",
    "failedstarttls",
    "securityerror",
    "suppressed",
    "mailererror",
)

#: Status-named reasons that a phrase of another reason overrides.
VAGUE = frozenset(
    ["systemerror", "securityerror", "networkerror", "expired", "onhold", "undefined"]
)

#: When the status says the first, the text naming any of the second wins
#: (a 5.1.1 "blocked using zen.spamhaus.org" is a block, not a bad address).
STATUS_VETO = {
    "userunknown": frozenset(
        ["blocked", "mailboxfull", "hasmoved", "rejected", "notaccept", "securityerror"]
    ),
}

# ---------------------------------------------------------------------------
# The engine.


@attrs.frozen
class Verdict:
    """
    What a failure means.

    @ivar reason: one of L{REASONS}.
    @ivar kind: C{"hard"} or C{"soft"} for a bounce, L{None} for a
        delivery, a complaint or an auto-reply.
    @ivar status: the RFC 3463 status (C{"5.1.1"}): the one given, else one
        found in the diagnostic, else C{"4.0.0"}/C{"5.0.0"} from the reply
        code; L{None} when nothing says.
    """

    reason: str
    kind: Optional[str]
    status: Optional[str]


_STATUS = re.compile(r"\A([245])\.(\d{1,3})\.(\d{1,3})\Z")
_STATUS_IN_TEXT = re.compile(r"(?<![\d.])([245])\.(\d{1,3})\.(\d{1,3})(?![\d]|\.\d)")
_REPLY_IN_TEXT = re.compile(r"\A\W*(?:smtp\s*;\s*)?([245]\d\d)(?![\d.])")
_SPACE = re.compile(r"\s+")

#: How much of a diagnostic is read (real ones are far shorter; this
#: bounds the cost of a pathological one).
MAX_TEXT = 4096
_WILD = r".{0,300}?"


def _atoms(text: str) -> Iterable[str]:
    """
    A phrase as trie atoms: each character, and C{*} as one wildcard.
    """
    text = _SPACE.sub(" ", text.strip().lower())
    for part in re.split(r"(\*)", text):
        if part == "*":
            yield "*"
        else:
            yield from part


def _compile(phrases: dict) -> tuple:
    """
    Compile L{PHRASES}: the scanning regular expression and the map from
    its group names to reasons.
    """
    trie: dict = {}
    for reason, texts in phrases.items():
        for text in texts:
            node = trie
            for atom in _atoms(text):
                node = node.setdefault(atom, {})
            node.setdefault("", reason)
    groups: dict = {}

    def emit(node: dict) -> str:
        branches = []
        for atom, child in node.items():
            if atom != "":
                head = _WILD if atom == "*" else re.escape(atom)
                branches.append(head + emit(child))
        if "" in node:
            name = f"p{len(groups)}"
            groups[name] = node[""]
            branches.append(f"(?P<{name}>)")
        if len(branches) == 1:
            return branches[0]
        return "(?:" + "|".join(branches) + ")"

    pattern = emit(trie) if trie else "(?!)"
    return re.compile(pattern, re.DOTALL), groups


_SCAN, _GROUPS = _compile(PHRASES)


def _textReasons(text: str) -> frozenset:
    """
    The reasons whose phrases occur in C{text} (already normalised).
    """
    found = set()
    for match in _SCAN.finditer(text):
        found.add(_GROUPS[match.lastgroup])
    return frozenset(found)


def _normalStatus(status: Optional[str]) -> Optional[str]:
    """
    C{status} if it is a well-formed RFC 3463 code and not one of Sisimai's
    invented C{x.0.9xx}; else L{None}.
    """
    if not isinstance(status, str):
        return None
    match = _STATUS.match(status.strip())
    if match is None:
        return None
    klass, subject, detail = match.groups()
    if subject == "0" and len(detail) == 3 and detail.startswith("9"):
        return None
    return f"{klass}.{int(subject)}.{int(detail)}"


def _isVague(status: Optional[str]) -> bool:
    return status is None or status.endswith(".0.0")


def bounceKind(reason: str, status: Optional[str] = None) -> Optional[str]:
    """
    C{"hard"} / C{"soft"} for a bounce reason, L{None} for a reason that is
    no bounce (C{delivered}, C{feedback}, C{vacation}).

    @param status: the status (or C{"4.0.0"}/C{"5.0.0"} from the reply
        code), which decides C{notaccept}: hard unless temporary.
    """
    if reason not in BOUNCE_REASONS:
        return None
    if reason in HARD_REASONS:
        return "hard"
    if reason == "notaccept":
        return "soft" if status is not None and status.startswith("4") else "hard"
    return "soft"


def classify(
    status: Optional[str],
    replycode: Optional[int],
    diagnostic: Optional[str],
    action: Optional[str] = None,
) -> Verdict:
    """
    Classify one failure.

    @param status: the RFC 3463 status (C{"5.1.1"}), or L{None}.
    @param replycode: the SMTP reply code (C{550}), or L{None}.
    @param diagnostic: the server's text (a DSN's Diagnostic-Code, an SMTP
        reply), or L{None}.
    @param action: the DSN action (C{failed}, C{delayed}, C{delivered},
        ...), or L{None}.
    @return: the L{Verdict}; never raises, whatever the input.
    """
    text = diagnostic if isinstance(diagnostic, str) else ""
    text = _SPACE.sub(" ", text[:MAX_TEXT].lower()).strip()
    given = _normalStatus(status)
    code = replycode if isinstance(replycode, int) and 200 <= replycode < 600 else None
    if code is None:
        match = _REPLY_IN_TEXT.match(text)
        if match is not None:
            code = int(match.group(1))
    effective = given
    if _isVague(effective):
        match = _STATUS_IN_TEXT.search(text)
        if match is not None:
            found = _normalStatus(".".join(match.groups()))
            if found is not None and (effective is None or not _isVague(found)):
                effective = found
    if effective is None and code is not None and code >= 400:
        effective = f"{code // 100}.0.0"
    action = action.strip().lower() if isinstance(action, str) else None

    reason = _decide(effective, code, text, action)
    return Verdict(reason=reason, kind=bounceKind(reason, effective), status=effective)


def _decide(
    status: Optional[str], code: Optional[int], text: str, action: Optional[str]
) -> str:
    if action == "delivered" or (status is not None and status.startswith("2.")):
        return "delivered"
    said = _textReasons(text) if text else frozenset()
    named = STATUS_REASONS.get(status) if status is not None else None
    vetoed = STATUS_VETO.get(named, frozenset()) & said
    for reason in PRECEDENCE:
        if reason in said or (reason == named and not vetoed):
            return reason
    if named is None or named in VAGUE:
        for reason in TEXT_ONLY:
            if reason in said:
                return reason
    if named is not None:
        return named
    if status is not None:
        subject = status[:3]
        if subject in ("5.6", "4.6"):
            return "contenterror"
        if subject in ("5.7", "4.7"):
            return "securityerror"
    if action in ("delayed", "expired"):
        return "expired"
    if "vacation" in said:
        return "vacation"
    if text or status is not None:
        return "onhold"
    return "undefined"


def classifyReply(status: Optional[str], code: int, text: Optional[str]) -> Verdict:
    """
    Classify a negative reply in a delivery session (the C{bounced}
    event's C{source = "smtp"} path): L{classify} with the reply's parts.
    """
    return classify(status, code, text, "failed")
