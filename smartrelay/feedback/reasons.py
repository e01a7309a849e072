"""
Why a message failed: the one classifier for both paths, the synchronous
4xx/5xx reply in a delivery session and the DSN record that comes back
later (DESIGN 1.7).

L{classify} maps what a failure says -- the RFC 3463 status, the SMTP reply
code, the diagnostic text, the DSN action -- to a L{Verdict}: a reason in
Sisimai's vocabulary (C{userunknown}, C{mailboxfull}, C{hostunknown}, ...),
hard or soft, and the status (inferred from the text or the reply code when
the report gives none).

The rules are data, in L{smartrelay.feedback.phrases}: status code ->
reason, reply code -> reason, reason -> phrases, the providers' own wording
and codes, the precedence that settles disagreements and a few context
rules.  This module is the engine: every phrase of every reason is
compiled into one trie-shaped regular expression, so a diagnostic is
scanned once whatever the size of the table.

The decision, in order:

  1. a 2.x.x status or the action C{delivered}: C{delivered};
  2. a local delivery agent's message (C{LOCAL_AGENTS}: mail.local,
     procmail, dovecot, ...) unless the failed command is known and is not
     DATA: its words (C{LOCAL_AGENT_PHRASES}), else C{mailererror};
  3. the provider the recipient's domain, the remote host or a host name
     in the text names (C{RHOSTS}): its wording (C{RHOST_PHRASES}) decides
     by itself;
  4. a provider's documented wording or code that no one else writes
     (C{OVERRIDES}, C{PROVIDER_CODES}) decides by itself;
  5. a diagnostic of type X-Unix (a local program's) is read by its words,
     else by the status;
  6. ambiguous phrases count only in context (C{TEXT_CONTEXT}: a "user
     unknown" not said at RCPT nor beside a 5.1.1 is C{filtered}); the
     failed SMTP command comes from the caller or from the text
     (C{COMMAND_HINTS});
  7. the first reason of C{PRECEDENCE} that the text names, or that the
     status (or reply code) names unless the text names one it
     C{STATUS_YIELDS} to;
  8. when the status names nothing or something vague: the first of
     C{TEXT_ONLY} that the text names;
  9. the status's reason; then the status class (x.6 content, x.7
     security), a command-syntax reply code, C{delayed} -> C{expired}, a
     refusal at the greeting or EHLO -> C{blocked};
  10. C{onhold} when there was something to read but nothing said a
     reason, C{undefined} when there was nothing.

A report written by a program with words of its own (C{LHOSTS}: InterScan
MSS, IMail, au EZweb; L{reportingAgent}) is read by its table first
(L{agentVerdict}); what that finds decides, as Sisimai keeps the reason
an Lhost module gives.
"""

import re
from functools import lru_cache
from typing import Iterable, Optional

import attrs

from smartrelay.feedback.phrases import (
    BEFORE_DATA,
    BLOCKED_COMMANDS,
    COMMAND_HINTS,
    LHOSTS,
    LOCAL_AGENT_PHRASES,
    LOCAL_AGENTS,
    NEUTRAL,
    OVERRIDES,
    PHRASES,
    PROVIDER_CODES,
    PRECEDENCE,
    REPLY_REASONS,
    RHOST_PHRASES,
    RHOSTS,
    STATUS_OVERRULES,
    STATUS_NEEDS_TEXT,
    STATUS_REASONS,
    STATUS_YIELDS,
    TEXT_CONTEXT,
    SYNTAX_REPLIES,
    TEXT_ONLY,
    VAGUE,
)

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
    "textReasons",
    "bounceKind",
    "providerOf",
    "reportingAgent",
    "agentVerdict",
    "agentNotice",
    "agentTakesReturned",
    "commandIn",
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
_STATUS_IN_TEXT = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?!\d|\.\d)")
_REPLY_IN_TEXT = re.compile(r"(?<![\w.\-])([245][0-5]\d)(?:[ \-]|\Z)(?!\d)")
_SPACE = re.compile(r"\s+")
#: The code prefix of a continuation line of a multi-line reply, left in
#: the middle of a joined diagnostic ("... at a rate that 550-5.2.1
#: prevents additional messages ..."): removed before phrases are matched.
_CONTINUATION = re.compile(r"[245]\d\d-(?:[245]\.\d{1,3}\.\d{1,3}\s?)?")
#: How a Diagnostic-Code of type X-Unix starts when its type is kept.
_LOCAL_TYPE = "x-unix;"

#: How much of a diagnostic is read: real ones are far shorter; this bounds
#: the cost of a pathological one.
MAX_TEXT = 4096

#: What C{*} in a phrase stands for: up to 120 characters, the fewest that
#: complete the phrase (bounded, so a hostile text cannot make a scan slow).
_WILD = r".{0,120}?"


def _atoms(phrase: str) -> Iterable[str]:
    """
    A phrase as trie atoms: each character, and each C{*} as one wildcard.
    """
    for part in re.split(r" ?(\*) ?", normalise(phrase)):
        if part == "*":
            yield "*"
        else:
            yield from part


def compilePhrases(phrases: dict, overrides: Optional[dict] = None) -> tuple:
    """
    Compile reason -> phrases tables into one regular expression: a trie,
    so each position of a text costs about one branch per character
    whatever the number of phrases, with an empty named group at the end
    of each phrase; longer phrases are tried before their prefixes.

    @param phrases: the ordinary phrases (L{PHRASES}).
    @param overrides: the phrases that decide by themselves (L{OVERRIDES}).
    @return: C{(pattern, groups)}: the compiled expression and a dict from
        its group names to C{(reason, overrides)} pairs.
    @raise ValueError: for an empty phrase or an unknown reason.
    """
    trie: dict = {}
    tables = [(phrases, False), (overrides or {}, True)]
    for table, overriding in tables:
        for reason, texts in table.items():
            if reason != NEUTRAL and reason not in REASONS:
                raise ValueError(f"unknown reason in the phrase table: {reason!r}")
            for text in texts:
                atoms = list(_atoms(text))
                if not [a for a in atoms if a != "*"]:
                    raise ValueError(f"empty phrase for {reason}: {text!r}")
                node = trie
                for atom in atoms:
                    node = node.setdefault(atom, {})
                if overriding or "" not in node:
                    node[""] = (reason, overriding)
    groups: dict = {}

    def emit(node: dict) -> str:
        branches = []
        # Literal text before a wildcard before the end: the longest,
        # most literal phrase wins at each position.
        for atom in sorted(node, key=lambda a: (a == "", a == "*")):
            if atom != "":
                head = _WILD if atom == "*" else re.escape(atom)
                branches.append(head + emit(node[atom]))
        if "" in node:
            name = f"p{len(groups)}"
            groups[name] = node[""]
            branches.append(f"(?P<{name}>)")
        if len(branches) == 1:
            return branches[0]
        return "(?:" + "|".join(branches) + ")"

    # A lookahead finds phrases at every position, overlapping ones too.
    pattern = "(?=" + emit(trie) + ")" if trie else "(?!)"
    return re.compile(pattern, re.DOTALL), groups


def normalise(text: str) -> str:
    """
    Text as phrases are matched: lower-case, each run of white space one
    space, no leading or trailing space.
    """
    return _SPACE.sub(" ", text.lower()).strip()


_SCAN, _GROUPS = compilePhrases(
    {r: p for r, p in PHRASES.items() if r != NEUTRAL}, OVERRIDES
)
_MASK, _ = compilePhrases({NEUTRAL: PHRASES.get(NEUTRAL, ())})


def textReasons(text: str) -> frozenset:
    """
    The reasons whose phrases occur in C{text}: at each position the
    longest phrase that starts there; a phrase inside a L{NEUTRAL} one does
    not count.
    """
    found, decided = _reasonsIn(normalise(text[:MAX_TEXT]))
    return frozenset(found | decided)


def _reasonsIn(text: str) -> tuple:
    """
    The reasons ordinary phrases name in C{text}, and those L{OVERRIDES}
    name: two sets.
    """
    masks = [(m.start(), m.end(m.lastgroup)) for m in _MASK.finditer(text)]
    found, decided = set(), set()
    for match in _SCAN.finditer(text):
        reason, overriding = _GROUPS[match.lastgroup]
        if overriding:
            decided.add(reason)
            continue
        if masks:
            start, end = match.start(), match.end(match.lastgroup)
            if any(s <= start and end <= e for s, e in masks):
                continue
        found.add(reason)
    return found, decided


def _normalStatus(status) -> Optional[str]:
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
    subject, detail = int(subject), int(detail)
    if subject == 0 and detail >= 900:
        return None
    return f"{klass}.{subject}.{detail}"


def _isGeneric(status: Optional[str]) -> bool:
    """
    Does C{status} say no more than permanent or temporary (none, x.0.0)?
    """
    return status is None or status.endswith(".0.0")


def bounceKind(reason: str, status: Optional[str] = None, text: str = "") -> Optional[str]:
    """
    C{"hard"} / C{"soft"} for a bounce reason, L{None} for a reason that is
    no bounce (C{delivered}, C{feedback}, C{vacation}).

    @param status: the status (or C{"4.0.0"}/C{"5.0.0"} from the reply
        code), which decides C{notaccept}: hard unless temporary.
    @param text: the diagnostic (normalised): without a status, a
        C{notaccept} it calls temporary or persistent is soft
        (Sisimai::SMTP::Failure's hard-bounce rule).
    """
    if reason not in BOUNCE_REASONS:
        return None
    if reason in HARD_REASONS:
        return "hard"
    if reason == "notaccept":
        if status is not None:
            return "soft" if status.startswith("4") else "hard"
        return "soft" if " temporar" in text or " persistent" in text else "hard"
    return "soft"


def classify(
    status: Optional[str],
    replycode: Optional[int],
    diagnostic: Optional[str],
    action: Optional[str] = None,
    command: Optional[str] = None,
    remote: Optional[str] = None,
    recipient: Optional[str] = None,
    reporter: Optional[str] = None,
) -> Verdict:
    """
    Classify one failure (see the module's docstring for the rules).

    @param status: the RFC 3463 status (C{"5.1.1"}), or L{None}.
    @param replycode: the SMTP reply code (C{550}), or L{None}.
    @param diagnostic: the server's text (a DSN's Diagnostic-Code, an SMTP
        reply), or L{None}.
    @param action: the DSN action (C{failed}, C{delayed}, C{delivered},
        ...), or L{None}.
    @param command: the SMTP command the server answered (C{RCPT},
        C{DATA}, C{MAIL}, C{EHLO}, ...), when known; else it is looked for
        in the diagnostic ("in reply to RCPT TO command").
    @param remote: the host that refused (a DSN's Remote-MTA, the host a
        delivery session talked to), or L{None}: it names the provider
        whose own wording L{RHOST_PHRASES} reads.
    @param recipient: the failed address, or L{None}: its domain names the
        provider too (L{providerOf}).
    @param reporter: the host that wrote the report (a DSN's
        Reporting-MTA), or L{None}: the provider's name of last resort.
    @return: the L{Verdict}; never raises, whatever the input.
    """
    text = normalise(diagnostic[:MAX_TEXT]) if isinstance(diagnostic, str) else ""
    # A Diagnostic-Code of type X-Unix is a local delivery program's word.
    local = text.startswith(_LOCAL_TYPE)
    if local:
        text = text[len(_LOCAL_TYPE):].lstrip()
    given = _normalStatus(status)
    code = _replyCode(replycode)
    if code is None and text:
        match = _REPLY_IN_TEXT.search(text[:200])
        if match is not None:
            code = int(match.group(1))
    effective = preferStatus(given, _statusIn(text) if text else None, code)
    if effective is None and code is not None and code >= 400:
        effective = f"{code // 100}.0.0"
    action = action.strip().lower() if isinstance(action, str) else None
    if isinstance(command, str) and command.strip():
        command = command.strip().upper().split()[0]
        command = _COMMAND_NAMES.get(command, command)
        said = _SAID_IN_REPLY.get(command)
        if said is not None and text and " command)" not in text:
            # A phrase written with Postfix's "(in reply to ... command)"
            # counts when the command is known from elsewhere.
            text = f"{text} (in reply to {said} command)"
    else:
        command = _commandIn(text)
    reason = None
    if text and not (
        action == "delivered" or (effective is not None and effective.startswith("2."))
    ):
        if command is None or command == "DATA":
            reason = _localAgent(text)
        if reason is None:
            provider = providerOf(remote, recipient, text, reporter)
            if provider is not None:
                reason = _phraseIn(_PROVIDER_TABLES.get(provider, ()), text, effective, command)
    if reason is None:
        reason = _decide(effective, code, text, action, command, local)
    return Verdict(reason=reason, kind=bounceKind(reason, effective, text), status=effective)


def compileKeyed(tables: dict, keys: dict, name: str) -> dict:
    """
    Check and normalise a key -> reason -> phrases table
    (L{RHOST_PHRASES}, L{LOCAL_AGENT_PHRASES}).  A phrase is a string, or
    a C{(status, phrase)} pair that counts only beside that status (C{"5.4.1"})
    or a status starting so (C{"5.7."}); the status may be, or be followed
    by, a command (C{"DATA"}, C{"5.0.0 DATA"}): the phrase counts only in
    reply to it.

    @param keys: the known keys (L{RHOSTS}, L{LOCAL_AGENTS}).
    @param name: the table's name, for the error.
    @return: key -> [(reason, phrases)], in the table's order.
    @raise ValueError: for an unknown key or reason, or an empty phrase.
    """
    compiled = {}
    for key, table in tables.items():
        if key not in keys:
            raise ValueError(f"{name} names an unknown key: {key!r}")
        entries = []
        for reason, texts in table.items():
            if reason not in REASONS:
                raise ValueError(f"unknown reason in {name}[{key!r}]: {reason!r}")
            phrases = []
            for text in texts:
                status = command = None
                if isinstance(text, tuple):
                    condition, text = text
                    for each in condition.split() if isinstance(condition, str) else [condition]:
                        if each in _COMMAND_KEYS and command is None:
                            command = each
                        elif isinstance(each, str) and status is None and (
                            _STATUS.match(each) or re.fullmatch(r"[245]\.\d{1,3}\.", each)
                        ):
                            status = each
                        else:
                            raise ValueError(f"bad status in {name}[{key!r}][{reason!r}]: {condition!r}")
                phrase = normalise(text) if isinstance(text, str) else ""
                if not phrase:
                    raise ValueError(f"empty phrase in {name}[{key!r}][{reason!r}]")
                phrases.append((status, command, phrase))
            entries.append((reason, tuple(phrases)))
        compiled[key] = entries
    return compiled


#: The commands a keyed table's phrase may be said in reply to.
_COMMAND_KEYS = frozenset(["CONN", "EHLO", "STARTTLS", "AUTH", "MAIL", "RCPT", "DATA"])

#: Provider -> [(reason, phrases)], in the table's order.
_PROVIDER_TABLES = compileKeyed(RHOST_PHRASES, RHOSTS, "RHOST_PHRASES")
#: Local agent -> [(reason, phrases)].
_AGENT_TABLES = compileKeyed(LOCAL_AGENT_PHRASES, LOCAL_AGENTS, "LOCAL_AGENT_PHRASES")
_AGENT_MARKERS = [
    (agent, tuple(marker.lower() for marker in markers)) for agent, markers in LOCAL_AGENTS.items()
]


def _localAgent(text: str) -> Optional[str]:
    """
    The reason a local delivery agent's message in C{text} gives
    (L{LOCAL_AGENTS}), or L{None} when no agent speaks.
    """
    for agent, markers in _AGENT_MARKERS:
        if any(marker in text for marker in markers):
            return _phraseIn(_AGENT_TABLES.get(agent, ()), text) or "mailererror"
    return None

#: (suffix without its leading dot, whether it matched only names under it,
#: provider), longest first.
_SUFFIXES = sorted(
    (
        (suffix.lstrip(".").lower(), suffix.startswith("."), provider)
        for provider, suffixes in RHOSTS.items()
        for suffix in suffixes
    ),
    key=lambda entry: -len(entry[0]),
)
#: Suffix -> (whether it matches only names under it, provider).
_SUFFIX_TABLE = {suffix: (under, provider) for suffix, under, provider in reversed(_SUFFIXES)}
#: The top-level labels of the suffixes (".com", ".jp", ...): a host name
#: in a text is looked for where one of these ends a name.
_TAILS = tuple(sorted({"." + suffix.rsplit(".", 1)[-1] for suffix, _, _ in _SUFFIXES}))
_HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-")


def _hostProvider(host: str) -> Optional[str]:
    """
    The provider whose L{RHOSTS} suffix C{host} (lower case, no trailing
    dot) ends with, or L{None}.
    """
    entry = _SUFFIX_TABLE.get(host)
    if entry is not None and not entry[0]:
        return entry[1]  # the name itself
    at = host.find(".")
    while at >= 0:
        entry = _SUFFIX_TABLE.get(host[at + 1:])
        if entry is not None:
            return entry[1]  # a name under the suffix
        at = host.find(".", at + 1)
    return None


@lru_cache(maxsize=4096)
def _remoteProvider(remote: str) -> Optional[str]:
    host = remote.strip().lower()
    if host.startswith("dns;"):
        host = host[4:].strip()
    host = host.split(None, 1)[0].strip("[]()").rstrip(".") if host else ""
    return _hostProvider(host) if host else None


@lru_cache(maxsize=4096)
def _domainProvider(domain: str) -> Optional[str]:
    """
    The provider one of whose host names is C{domain} or lies under it
    (Sisimai's reading of the destination).
    """
    if "." not in domain:
        return None
    for suffix, _, provider in _SUFFIXES:
        if suffix == domain or suffix.endswith("." + domain):
            return provider
    return None


def providerOf(
    remote: Optional[str],
    recipient: Optional[str] = None,
    text: str = "",
    reporter: Optional[str] = None,
) -> Optional[str]:
    """
    The mail provider (a key of L{RHOSTS}) a failure came from: by the
    recipient's domain, else by the remote host, else by a host name of
    the (normalised) diagnostic, else by the reporting host (Sisimai's
    order: destination, remote host, local host); L{None} when none is
    known.
    """
    if isinstance(recipient, str) and "@" in recipient:
        domain = recipient.rsplit("@", 1)[1].strip().strip(">").rstrip(".").lower()
        provider = _domainProvider(domain) if domain else None
        if provider is not None:
            return provider
    if isinstance(remote, str) and remote.strip():
        provider = _remoteProvider(remote[:255])
        if provider is not None:
            return provider
    if text:
        for tail in _TAILS:
            at = text.find(tail)
            while at >= 0:
                end = at + len(tail)
                provider = _hostAt(text, at, end)
                if provider is not None:
                    return provider
                at = text.find(tail, end)
    if isinstance(reporter, str) and reporter.strip():
        return _remoteProvider(reporter[:255])
    return None


def _hostAt(text: str, start: int, end: int) -> Optional[str]:
    """
    The provider of the host name that ends with C{text[start:end]} (a
    top-level label), or L{None} when that is no host name of a provider
    (it goes on, or it is an address's domain).
    """
    if end < len(text) and (
        text[end] in _HOST_CHARS
        or (text[end] == "." and end + 1 < len(text) and text[end + 1] in _HOST_CHARS)
    ):
        return None  # the suffix goes on: another name
    while start and (text[start - 1] in _HOST_CHARS or text[start - 1] == "."):
        start -= 1
    if start and text[start - 1] == "@":
        return None  # an address's domain: the destination rule's
    return _hostProvider(text[start:end].strip("."))


def _phraseIn(
    table, text: str, status: Optional[str] = None, command: Optional[str] = None
) -> Optional[str]:
    """
    The first reason of a compiled keyed C{table} one of whose phrases is
    in C{text} (beside C{status}, or in reply to C{command}, for a phrase
    that names one), or L{None}.
    """
    for reason, phrases in table:
        for wanted, after, phrase in phrases:
            if after is not None and command != after:
                continue
            if wanted is not None and (
                status is None
                or (status != wanted if wanted[-1] != "." else not status.startswith(wanted))
            ):
                continue
            if phrase in text:
                return reason
    return None


def _statusIn(text: str) -> Optional[str]:
    """
    The status a diagnostic gives (Sisimai::SMTP::Status's find): the
    codes in their order, those saying only the class (x.0.0) or the
    ambiguous 4.4.7 last, settled pairwise by L{preferStatus}.
    """
    found = []
    another = None
    for match in _STATUS_IN_TEXT.finditer(text):
        start = match.start()
        if start and (text[start - 1].isalnum() or text[start - 1] in "._/"):
            continue  # inside an address, a version or a longer number
        code = _normalStatus(".".join(match.groups()))
        if code is None:
            continue
        if code.endswith(".0.0") or code == "4.4.7":
            another = code
            continue
        found.append(code)
    if another is not None:
        found.append(another)
    chosen = None
    for code in found:
        chosen = code if chosen is None else preferStatus(chosen, code, None)
    return chosen


#: Given statuses that a more specific code in the text replaces
#: (L{preferStatus}): 4.4.7 and 4.7.0 say little, 5.3.x is any system
#: error, x.5.1/2/4/5 a protocol complaint.
_WEAK_GIVEN = ("4.4.7", "4.7.0")
_WEAK_GIVEN_SUBJECTS = (".5.1", ".5.2", ".5.4", ".5.5")


def preferStatus(
    given: Optional[str], inText: Optional[str], code: Optional[int] = None
) -> Optional[str]:
    """
    Which of two statuses to believe (Sisimai::SMTP::Status's prefer):
    the report's own C{given} one, or the one its diagnostic holds.

    The one whose class the reply code shares when their classes differ;
    a code saying only the class (x.0.0, or a x.y.0 beside a precise one)
    yields to the other; a weak given code (4.4.7, 4.7.0, 5.3.x, x.5.1,
    x.5.2, x.5.4, x.5.5) yields to the text's; a 5.1.1 yields to a precise
    code in the text that is not 5.5.x; a 5.1.3 to a 5.7.x.  Otherwise the
    given one.
    """
    if given is None:
        return inText
    if inText is None or given == inText:
        return given
    if given[0] != inText[0] and code is not None:
        klass = str(code)[0]
        if klass == given[0]:
            return given
        if klass == inText[0]:
            return inText
    givenZero, textZero = ".0" in given, ".0" in inText
    if given.endswith(".0.0") or given[1:5] == ".0.0":
        return given if inText.endswith(".0.0") else inText
    if givenZero and not textZero:
        return inText
    if inText[1:5] == ".0.0":
        return given
    if given in _WEAK_GIVEN or given.startswith("5.3.") or given[1:5] in _WEAK_GIVEN_SUBJECTS:
        return inText
    if given == "5.1.1":
        return given if textZero or inText.startswith("5.5.") else inText
    if given == "5.1.3" and inText.startswith("5.7."):
        return inText
    return given


def _unprefix(match: "re.Match[str]") -> str:
    """
    Drop a continuation line's code, unless it is part of a longer token.
    """
    start = match.start()
    if start == 0 or match.string[start - 1] == " ":
        return ""
    return match.group(0)


def _replyCode(replycode) -> Optional[int]:
    if isinstance(replycode, str) and replycode.strip().isdigit():
        replycode = int(replycode)
    if isinstance(replycode, bool) or not isinstance(replycode, int):
        return None
    return replycode if 200 <= replycode < 600 else None


#: Every reason in the order it wins ties.
_ORDER = tuple(dict.fromkeys(PRECEDENCE + TEXT_ONLY + tuple(sorted(REASONS))))

#: How Postfix names each command in "(in reply to ... command)".
_SAID_IN_REPLY = {"MAIL": "mail from", "RCPT": "rcpt to", "DATA": "end of data"}

#: How callers may name a command, and the name the rules use.
_COMMAND_NAMES = {"HELO": "EHLO", "BDAT": "DATA", "END": "DATA", ".": "DATA", "CONNECT": "CONN"}

_PROVIDER_CODES = [
    ((marker,) if isinstance(marker, str) else tuple(marker), re.compile(pattern), codes)
    for marker, pattern, codes in PROVIDER_CODES
]

_COMMANDS = [(re.compile(pattern), command) for pattern, command in COMMAND_HINTS]


def commandIn(text: Optional[str]) -> Optional[str]:
    """
    The SMTP command a failure's words (raw, not normalised) say it
    answered (L{COMMAND_HINTS}: "in reply to RCPT TO command", "refused
    to talk to me", "does not like recipient", ...), or L{None}.
    """
    return _commandIn(normalise(text[:MAX_TEXT])) if text else None


def _commandIn(text: str) -> Optional[str]:
    """
    The SMTP command a diagnostic says it answered (L{COMMAND_HINTS}; the
    first hint of the table that matches).
    """
    if text:
        for pattern, command in _COMMANDS:
            if pattern.search(text):
                return command
    return None


def _decide(
    status: Optional[str],
    code: Optional[int],
    text: str,
    action: Optional[str],
    command: Optional[str],
    local: bool = False,
) -> str:
    """
    The reason, by the rules of the module's docstring.
    """
    if action == "delivered" or (status is not None and status.startswith("2.")):
        return "delivered"
    said, decided = _reasonsIn(_CONTINUATION.sub(_unprefix, text)) if text else (set(), set())
    decided |= _providerCodes(text)
    if local:
        # A local program's failure: what it printed, else the status.
        for reason in TEXT_ONLY + PRECEDENCE:
            if reason in said or reason in decided:
                return reason
        return STATUS_REASONS.get(status) or "mailererror"
    if decided:
        return _first(_ORDER, decided)
    named = STATUS_REASONS.get(status) if status is not None else None
    _inContext(said, named, command)
    if named is not None:
        said -= STATUS_OVERRULES.get(named, frozenset())
        if STATUS_YIELDS.get(named, frozenset()) & said:
            named = None
    specific = named is not None and named not in VAGUE
    early = named
    needs = STATUS_NEEDS_TEXT.get(named)
    if needs is not None and not needs & said:
        early = None
    byReply = REPLY_REASONS.get(code)
    first = byReply[1] if byReply is not None and byReply[0] == "first" else None
    for reason in PRECEDENCE:
        if reason in said or reason == early or reason == first:
            return reason
    if not specific:
        reason = _first(TEXT_ONLY, said)
        if reason is not None:
            return reason
        if byReply is not None:
            return byReply[1]
    if named is not None:
        return named
    return _fallback(status, code, text, action, command, said)


def _first(order: Iterable[str], found: set) -> Optional[str]:
    """
    The first reason of C{order} that is in C{found}, or L{None}.
    """
    for reason in order:
        if reason in found:
            return reason
    return None


def _providerCodes(text: str) -> set:
    """
    The reasons the providers' own codes in C{text} name (L{PROVIDER_CODES}).
    """
    decided = set()
    for markers, pattern, codes in _PROVIDER_CODES:
        if not any(marker in text for marker in markers):
            continue
        for match in pattern.finditer(text):
            start = match.start()
            if start and (text[start - 1].isalnum() or text[start - 1] in "._"):
                continue  # not where a token starts
            reason = codes.get(match.group(1))
            if reason is not None:
                decided.add(reason)
    return decided


def _inContext(said: set, named: Optional[str], command: Optional[str]) -> None:
    """
    Drop from C{said} the ambiguous reasons its context does not bear out
    (L{TEXT_CONTEXT}), reading them as their C{otherwise} where that says so.
    """
    specific = named is not None and named not in VAGUE
    weak = {"never": False, "generic": named is None, "vague": not specific}
    yields = STATUS_YIELDS.get(named, frozenset())
    for reason, context in TEXT_CONTEXT.items():
        if reason not in said or reason == named:
            continue
        if command in context["commands"]:
            continue
        unknown = command is None or context.get("anyCommand", False)
        if unknown and (weak[context["status"]] or reason in yields):
            continue
        said.discard(reason)
        otherwise = context["otherwise"]
        if otherwise is not None and not specific and command not in BEFORE_DATA:
            said.add(otherwise)


def _fallback(
    status: Optional[str],
    code: Optional[int],
    text: str,
    action: Optional[str],
    command: Optional[str],
    said: set,
) -> str:
    """
    The reason when neither the status nor a phrase names one.
    """
    if status is not None:
        subject = status[:3]
        if subject in ("5.6", "4.6"):
            return "contenterror"
        if subject in ("5.7", "4.7"):
            return "securityerror"
    if code in SYNTAX_REPLIES:
        return "syntaxerror"
    if action in ("delayed", "expired"):
        return "expired"
    if command in BLOCKED_COMMANDS:
        return "blocked"
    if "vacation" in said:
        return "vacation"
    if text:
        return "onhold"
    return "undefined"


def _checkAgents(table: dict) -> dict:
    """
    Check L{LHOSTS} and normalise its tests and phrases to lower case.

    @raise ValueError: for an unknown test or reason, or an empty phrase.
    """
    checked = {}
    for agent, entry in table.items():
        tests = []
        for name, test, value in entry["recognise"]:
            if test not in ("prefix", "contains", "equals", "present") or not value:
                raise ValueError(f"bad test in LHOSTS[{agent!r}]: {(name, test, value)!r}")
            tests.append((name, test, value.lower()))
        headers = []
        for name, test, value, reason in entry.get("headers", ()):
            if test not in ("prefix", "contains", "equals") or reason not in BOUNCE_REASONS:
                raise ValueError(f"bad header rule in LHOSTS[{agent!r}]: {name!r}")
            headers.append((name, test, value.lower(), reason))
        tables = []
        for key in ("reasons", "subjects"):
            reasons = []
            for reason, phrases in entry.get(key, {}).items():
                if reason not in BOUNCE_REASONS or not all(isinstance(p, str) and p for p in phrases):
                    raise ValueError(f"bad reason in LHOSTS[{agent!r}]: {reason!r}")
                reasons.append((reason, tuple(phrase.lower() for phrase in phrases)))
            tables.append(tuple(reasons))
        # Trace fields last: they are many and long, and are read only
        # when the other tests leave the program still possible.
        tests.sort(key=lambda each: each[0].lower() == "received")
        checked[agent] = (tuple(tests), int(entry.get("needs", 1)), tuple(headers), tables[0], tables[1])
    return checked


_AGENTS = _checkAgents(LHOSTS)


def _holds(values: list, test: str, wanted: str) -> bool:
    for value in values:
        value = value.strip().lower()
        if (
            test == "present"
            or test == "equals"
            and value == wanted
            or test == "prefix"
            and value.startswith(wanted)
            or test == "contains"
            and wanted in value
        ):
            return True
    return False


def reportingAgent(getAll) -> Optional[str]:
    """
    The program that wrote a report, when it is one of L{LHOSTS}.

    @param getAll: the report's header: name -> the unfolded values of
        the fields of that name (a list).
    @return: the key of L{LHOSTS}, or L{None}.
    """
    values: dict = {}
    for agent, (tests, needs, _, _, _) in _AGENTS.items():
        held = 0
        for index, (name, test, wanted) in enumerate(tests):
            if held + len(tests) - index < needs:
                break  # the tests left cannot make up the number
            found = values.get(name)
            if found is None:
                found = values[name] = getAll(name)
            if found and _holds(found, test, wanted):
                held += 1
                if held >= needs:
                    return agent
    return None


def agentVerdict(agent: Optional[str], getAll, text: str) -> Optional[str]:
    """
    The reason the program C{agent} (L{reportingAgent}) gives for a
    record whose own words are C{text}, or L{None} when its table says
    nothing of them.
    """
    entry = _AGENTS.get(agent) if agent is not None else None
    if entry is None:
        return None
    _, _, headers, reasons, subjects = entry
    for name, test, wanted, reason in headers:
        if _holds(getAll(name), test, wanted):
            return reason
    for table, said in ((reasons, text or ""), (subjects, " ".join(getAll("Subject")) if subjects else "")):
        if said:
            lowered = said.lower()
            for reason, phrases in table:
                if any(phrase in lowered for phrase in phrases):
                    return reason
    return None


def agentTakesReturned(agent: Optional[str]) -> bool:
    """
    @return: whether the program C{agent}'s notices that name no address
        are about the returned message's recipients (L{LHOSTS}' C{returned}).
    """
    entry = LHOSTS.get(agent) if agent is not None else None
    return bool(entry is not None and entry.get("returned"))


def agentNotice(agent: Optional[str]) -> Optional[str]:
    """
    @return: the line that ends the notice's own words, when the program
        C{agent}'s notices name their addresses in angle brackets
        (L{LHOSTS}' C{notice}), else L{None}.
    """
    entry = LHOSTS.get(agent) if agent is not None else None
    return entry.get("notice") if entry is not None else None


def classifyReply(
    status: Optional[str],
    code: int,
    text: Optional[str],
    command: Optional[str] = None,
    remote: Optional[str] = None,
    recipient: Optional[str] = None,
) -> Verdict:
    """
    Classify a negative reply in a delivery session (the C{bounced}
    event's C{source = "smtp"} path): L{classify} with the reply's parts.
    """
    return classify(status, code, text, "failed", command, remote, recipient)
