# -*- test-case-name: tests.test_feedback_report -*-
"""
Bounces in words: the human-readable text that MTAs send instead of (or
beside) an RFC 3464 report, read without knowing which MTA wrote it.

The shapes are few, whatever the MTA: a preamble ("This message was created
automatically by mail delivery software", "Hi. This is the qmail-send
program", "Delivery to the following recipient failed permanently"), then
each failed recipient on a line of its own, or as C{<address>:} before its
error, or in C{RCPT TO:<address>}, each followed by the remote server's
reply; then a marker line and the returned message.  L{bounceText} cuts the
text at that marker, L{failedRecipients} finds each recipient and the text
that belongs to it, and L{details} reads the status, reply code and remote
MTA out of that text.
"""

import re
from typing import Iterable, Optional

import attrs

from smartrelay.feedback.mailtext import addresses, replyCodeIn, squeeze, statusIn

__all__ = ["TextRecipient", "bounceText", "failedRecipients", "details", "isDelay", "deliveryStatusIn", "commandIn"]

# A line that starts the returned message: dashes (or similar) and words
# that announce a copy of the original, or one of the sentences MTAs write
# before it.
_ORIGINAL_MARKER = re.compile(
    r"^[ \t>]*(?:"
    r"[-=_*#]{2,}+[ \t]*+(?:[^\n]{0,20}?)(?:this is a copy|below this line|(?:the )?original"
    r"|returned|undelivered|unsent|header of|headers of|headers? follows?|forwarded|copy of|message follows"
    r"|attached message|rfc822|message text|text of)"
    r"|(?:original (?:message|mail)(?: as follows| follows)?|original message headers|returned message|message headers follow"
    r"|the original message(?: headers)? (?:is|are|was|were) (?:below|attached|included|as follows)"
    r"|below is a copy of|here is a copy of|a copy of the original message|"
    r"included is a copy|headers of the original|the header of the original)[^\n]{0,40}:?[ \t]*$"
    r"|content-type:[ \t]*(?:message/rfc822|text/rfc822-headers)|message hops[ \t]*$"
    r")",
    re.I | re.M,
)
# A paragraph that is the header of the returned message.
_HEADER_PARAGRAPH = re.compile(
    r"\n\s*\n(?:"
    r"(?:Return-Path|Received|DKIM-Signature|Message-I[dD]|Delivered-To|X-[\w-]+|ARC-[\w-]+"
    r"|Authentication-Results|MIME-Version|Content-Type):[ \t]*\S[^\n]*\n"
    r"(?:[ \t]+\S[^\n]*\n)*"
    r"[A-Za-z][\w-]*:[ \t]"
    # or four fields in a row, whichever they are
    r"|(?:[A-Za-z][\w-]*:[ \t]*\S[^\n]*\n(?:[ \t]+\S[^\n]*\n)*){4})",
)


def bounceText(text: str) -> str:
    """
    @return: the part of a bounce's text before the returned message.
    """
    cut = len(text)
    match = _ORIGINAL_MARKER.search(text)
    if match is not None:
        cut = match.start()
    for match in _HEADER_PARAGRAPH.finditer(text, 0, cut + 1):
        if match.start() >= cut:
            break
        if not _DSN_FIELD.match(text, match.start() + len(match.group(0)) - len(match.group(0).lstrip())):
            cut = match.start() + 1
            break
    return text[:cut]


# The fields of a delivery-status part, when a report's text holds them.
_DSN_FIELD = re.compile(
    r"(?i)(?:Reporting-MTA|Received-From-MTA|Arrival-Date|Final-Recipient|Original-Recipient"
    r"|Action|Status|Remote-MTA|Diagnostic-Code|Last-Attempt-Date|X-[\w-]*Queue-ID|X-Postfix-Sender)[ \t]*:"
)
_DSN_IN_TEXT = re.compile(r"(?im)^(?:Reporting-MTA|Final-Recipient|Original-Recipient)[ \t]*:[ \t]*\S")


def deliveryStatusIn(text: str) -> Optional[str]:
    """
    @return: the part of C{text} from its first delivery-status field on,
        when the text holds the fields of a DSN (a report whose MIME
        structure was lost), else L{None}.
    """
    match = _DSN_IN_TEXT.search(text)
    if match is None or not re.search(r"(?im)^(?:Final|Original)-Recipient[ \t]*:", text[match.start() :]):
        return None
    return text[match.start() :]


@attrs.frozen
class TextRecipient:
    """
    A failed recipient found in a bounce's text and the text about it.
    """

    address: str
    text: str


_LINE_ALONE = re.compile(
    r"^[ \t]*(?:(?:>+|\*+|-+|\d+[.)])[ \t]*)?(?:(?:recipient(?: address)?|rcpt|address|original-recipient|final-recipient)"
    r"[ \t]*:?[ \t]*)?(?:rfc822;[ \t]*)?<?([^\s<>@]+@[^\s<>]+?)>?[ \t]*"
    r"(?::|\.\.\.|,)?[ \t]*(?:\([^)\n]*\)|<[^>\n]*>|\[[^\]\n]*\]|on [^\n]*\d[^\n]*)?[ \t]*:?[ \t]*$",
    re.I | re.M,
)
_LINE_LEADING = re.compile(r"^[ \t]*<([^\s<>@]+@[^\s<>]+)>[ \t]*:?[ \t]+\S", re.M)
_LINE_LEADING_BARE = re.compile(r"^[ \t]*([^\s<>@:]+@[^\s<>:]+?)[ \t]*:[ \t]+\S", re.M)
# Sendmail's transcript: "550 5.1.1 <user@example.net>... User unknown".
_TRANSCRIPT = re.compile(
    r"^[ \t]*(?:<<<[ \t]*)?[245]\d\d[ -](?:[245]\.\d{1,3}\.\d{1,3}[ \t]+)?<([^\s<>@]+@[^\s<>]+)>\.\.\.", re.M
)
_RCPT = re.compile(r"RCPT[ \t]+TO[ \t]*:[ \t]*<?([^\s<>@]+@[^\s<>]+?)>?(?=[\s>]|$)", re.I)
_NAMED = re.compile(
    r"\b(?:(?:deliver(?:y|ed|ing)?|sen[dt]|message|mail|e-?mail|forward(?:ed|ing)?|relay(?:ed|ing)?)"
    r"[^\n.]{0,40}?\bto|recipient(?:\s+address)?|addressee|address(?:es)?|user|mailbox|"
    r"destinataire|empf\S{1,4}nger|destinatario)"
    r"[ \t]*(?::|is|was|\()?[ \t\n]*[\"'(]?<?(?<![\w.+-])([^\s<>@\"'(),;]+@[^\s<>\"'(),;]+?)>?"
    r"(?=[\s>\"'),;:]|\.\s|\.?$)",
    re.I | re.M,
)
# Matched against lower-cased text (case-insensitive alternations are slow).
_FAILURE = re.compile(
    r"fail|could ?n[o']t|cannot|can't|unable|undeliver|not (?:be )?deliver|reject"
    r"|unknown|no such|does not exist|doesn't exist|invalid|error|bounce|refused|denied"
    r"|full|quota|blocked|returned|problem|permanent|not found|disabled|expired|delay"
    r"|exceed|not a member|suspend|inactive"
)
_SENDER_CONTEXT = re.compile(r"(?i)(?:mail from|from|sender|envelope-from|return-path|reply-to)[ \t]*:?[ \t]*<?$")
_NOT_RECIPIENTS = re.compile(
    r"(?i)^(?:postmaster|mailer-daemon|mailer_daemon|mailerdaemon|mail-daemon|maildaemon"
    r"|mdaemon|double-bounce|noreply|no-reply)@"
)


#: At most this many recipients are taken from a bounce's text.
MAX_RECIPIENTS = 1000


def _positions(text: str, exclude: frozenset) -> list[tuple[int, str]]:
    """
    @return: C{(offset, address)} for each place C{text} names a failed
        recipient, strongest evidence first in each kind, in text order.
    """
    found: list[tuple[int, str]] = []
    for pattern in (_LINE_ALONE, _LINE_LEADING, _LINE_LEADING_BARE, _TRANSCRIPT, _RCPT):
        for match in pattern.finditer(text):
            found.append((match.start(), match.group(1)))
    if not found:
        for match in _NAMED.finditer(text):
            found.append((match.start(), match.group(1)))
    result = []
    for offset, raw in found:
        for _, address in addresses(raw):
            before = text[max(0, offset - 20) : offset]
            if _SENDER_CONTEXT.search(before):
                continue
            if address.lower() in exclude:
                continue
            result.append((offset, address))
            break
        if len(result) >= MAX_RECIPIENTS:
            break
    result.sort()
    return result


def _weakPositions(text: str, exclude: frozenset) -> list[tuple[int, str]]:
    """
    @return: every address in C{text} on a line that speaks of a failure,
        but the senders and the mail system's own addresses.
    """
    result = []
    for offset, address in addresses(text):
        if len(result) >= MAX_RECIPIENTS:
            break
        if address.lower() in exclude or _NOT_RECIPIENTS.match(address):
            continue
        lineStart = text.rfind("\n", 0, offset) + 1
        lineEnd = text.find("\n", offset)
        line = text[lineStart : lineEnd if lineEnd != -1 else len(text)]
        if _SENDER_CONTEXT.search(text[max(lineStart, offset - 20) : offset]):
            continue
        if len(line.strip()) <= len(address) + 4 or _FAILURE.search(line.lower()):
            result.append((offset, address))
    return result


def failedRecipients(
    text: str, exclude: Iterable[str] = (), known: Iterable[str] = (), trusted: bool = False
) -> list[TextRecipient]:
    """
    Find the failed recipients in a bounce's text (see L{bounceText}).

    @param exclude: addresses that are not recipients (the bounce's own
        addressee, the returned message's sender).
    @param known: recipients already known (C{X-Failed-Recipients}, a
        DSN's); the text's own recipients are narrowed to them.
    @param trusted: whether C{known} is the whole list (a DSN's): then
        only their text is looked for.
    @return: each recipient once, in the order the text names them, with
        the text from its first mention to the next recipient's.
    """
    excluded = frozenset(address.lower() for address in exclude)
    knownList: list[str] = []
    for address in known:
        if address.lower() not in (each.lower() for each in knownList):
            knownList.append(address)
    if trusted and knownList:
        lowered = text.lower()
        positions = []
        for address in knownList:
            offset = lowered.find(address.lower())
            if offset != -1:
                positions.append((offset, address))
        positions.sort()
    else:
        positions = _candidates(text, excluded, knownList)
    return _segments(text, positions)


def _candidates(text: str, excluded: frozenset, knownList: list) -> list[tuple[int, str]]:
    positions = (
        _positions(text, excluded)
        or _weakPositions(text, excluded)
        # The sender may have written to itself.
        or _positions(text, frozenset())
    )
    # postmaster@ and the like are recipients only when nobody else is
    # (else they are the notice's "write to postmaster@...").
    others = [pair for pair in positions if not _NOT_RECIPIENTS.match(pair[1])]
    if others:
        positions = others
    if knownList:
        wanted = {address.lower() for address in knownList}
        named = [pair for pair in positions if pair[1].lower() in wanted]
        if named or not positions:
            positions = named
            lowered = text.lower()
            for address in knownList:
                if not any(pair[1].lower() == address.lower() for pair in named):
                    offset = lowered.find(address.lower())
                    positions.append((offset if offset != -1 else len(text), address))
            positions.sort(key=lambda pair: pair[0])
    return positions


def _segments(text: str, positions: list[tuple[int, str]]) -> list[TextRecipient]:
    firsts: list[tuple[int, str]] = []
    seen: set = set()
    for offset, address in positions:
        if address.lower() in seen:
            continue
        seen.add(address.lower())
        firsts.append((offset, address))
    result = []
    for index, (offset, address) in enumerate(firsts):
        start = _withExchange(text, _lineStart(text, min(offset, len(text))))
        if index + 1 < len(firsts):
            end = _lineStart(text, firsts[index + 1][0])
            if end <= start:
                end = firsts[index + 1][0]
        else:
            end = len(text)
            # The last recipient's words end with their paragraph when it
            # holds the server's reply (a reply or status code) and what
            # follows names the other recipients again: a second copy of
            # the list (in another language), not this one's transcript.
            blank = _BLANK_LINE.search(text, min(offset, len(text))) if len(firsts) > 1 else None
            if (
                blank is not None
                and _REPLY_WORDS.search(text, start, blank.start()) is not None
                and _namesAny(text[blank.start() :], [other for _, other in firsts[:-1]])
            ):
                end = blank.start()
        segment = text[start:end]
        if not _hasReply(segment):
            # The error may be written before the addresses or after the
            # whole list of them.
            tail = text[firsts[-1][0] :] if firsts else ""
            head = text[: firsts[0][0]] if firsts else text
            for extra in (tail, head):
                if _hasReply(extra):
                    segment = segment + "\n" + extra
                    break
            else:
                if len(squeeze(segment) or "") <= len(address) + 4:
                    segment = segment + "\n" + head
        result.append(TextRecipient(address=address, text=segment))
    return result


_BLANK_LINE = re.compile(r"\n[ \t]*\n")


def _withExchange(text: str, start: int) -> int:
    """
    @return: C{start} moved back over the SMTP exchange (">>> MAIL
        From:...", "<<< 501 ...") written just above that line: a
        Sendmail transcript gives the exchange, then the address's own
        line ("554 <addr>... Remote protocol error"), so the exchange is
        that address's.
    """
    while start > 0:
        previous = _lineStart(text, start - 1)
        line = text[previous : start - 1].lstrip()
        if not line.startswith((">>> ", "<<< ")):
            break
        start = previous
    return start


def _namesAny(text: str, wanted: list) -> bool:
    lowered = text.lower()
    return any(address.lower() in lowered for address in wanted)


def _lineStart(text: str, offset: int) -> int:
    return text.rfind("\n", 0, offset) + 1


_REPLY_WORDS = re.compile(r"(?<![\d.])[245]\d\d(?:[ -]|$)|(?<![\d.])[245]\.\d{1,3}\.\d{1,3}", re.M)


_NOISE = re.compile(r"^[\s<>:;,.()\[\]\"'*>-]+|[\s<>:;,.()\[\]\"']+$")


def _hasReply(text: str) -> bool:
    """
    Whether C{text} holds an error: a reply or status code, or failure
    words beside the addresses it names.
    """
    if _REPLY_WORDS.search(text) is not None:
        return True
    words = text.lower()
    for address in {address.lower() for _, address in addresses(text)}:
        words = words.replace(address, " ")
    return _FAILURE.search(words) is not None


_REMOTE = [
    re.compile(r"(?i)\bhost[ \t]+([\w-]+(?:\.[\w-]+)+)\.?[ \t]*\[[0-9a-f.:]+\]"),
    re.compile(r"(?i)remote host[ \t]+\[?([\w.:-]+?)\]?[ \t]+said"),
    re.compile(r"(?i)while talking to[ \t]+([\w-]+(?:\.[\w-]+)*)\.?[ \t]*:"),
    re.compile(r"(?i)\bby[ \t]+([\w-]+(?:\.[\w-]+)+)\.?[ \t]+\[[0-9a-f.:]+\]"),
    re.compile(r"(?i)remote[ -]?(?:mta|server|host)[ \t]*(?:is|:|=)?[ \t]*(?:dns;[ \t]*)?\[?([\w-]+(?:\.[\w-]+)+)"),
    re.compile(r"(?i)(?:connect(?:ion)? to|connecting to)[ \t]+([\w-]+(?:\.[\w-]+)+)\.?[ \t]*\["),
    re.compile(r"(?i)\bmx(?: host)?[ \t]+([\w-]+(?:\.[\w-]+)+)"),
    re.compile(r"(?i)\bhost:[ \t]*([\w-]+(?:\.[\w-]+)+)\.?[ \t]*[(\[,]"),
    re.compile(r"(?im)^[ \t]*([\w-]+(?:\.[\w-]+)+)\.?[ \t]*\[[0-9a-f.:]+\]:?[ \t]*$"),
]
_DIAGNOSTIC_START = re.compile(
    r"(?im)(?:said|returned|response|reply|responded|error|answer)[^\n]{0,20}?:[ \t\n]*"
    r"(?=[245]\d\d\b|<|[A-Za-z])|^[ \t]*(?:<<<[ \t]*)?(?=[245]\d\d[ -])"
)


def details(segment: str, address: str) -> dict:
    """
    Read what a bounce's text says of one recipient.

    @return: C{status}, C{replycode}, C{remote} and C{diagnostic} (any may
        be L{None}).
    """
    remote = None
    for pattern in _REMOTE:
        match = pattern.search(segment)
        if match is not None and "@" not in match.group(1):
            remote = match.group(1).lower().rstrip(".")
            break
    text = segment
    # Drop the line that only names the address.
    first, newline, rest = text.partition("\n")
    alone = _LINE_ALONE.match(first)
    if newline and alone is not None and alone.end() >= len(first.rstrip()):
        # ... unless it says more than the address: "a@b [User unknown]"
        residue = _NOISE.sub("", first.replace(alone.group(1), ""))
        if not residue or residue.lower().startswith(("expanded from", "generated from", "on ")):
            text = rest
    diagnostic = squeeze(text, 1000)
    status = statusIn(diagnostic)
    reply = None
    match = _DIAGNOSTIC_START.search(text)
    if match is not None:
        reply = replyCodeIn(text[match.end() : match.end() + 8])
    if reply is None:
        reply = replyCodeIn(diagnostic)
    return dict(status=status, replycode=reply, remote=remote, diagnostic=diagnostic)


# Where in the SMTP dialogue an error came: "in reply to RCPT TO
# command" (Postfix), "after RCPT TO" (Exim), ">>> DATA" (Sendmail).
_COMMAND = re.compile(
    r"in reply to (?:the )?(end of data|data|rcpt to|mail from|ehlo|helo|starttls|rcpt|mail)\b"
    r"|\bafter (?:pipelined )?(rcpt to|mail from|end of data|data|ehlo|helo|starttls)\b"
    r"|>>> (rcpt to|mail from|data|ehlo|helo)\b"
)
_COMMAND_NAMES = {
    "rcpt to": "RCPT",
    "rcpt": "RCPT",
    "mail from": "MAIL",
    "mail": "MAIL",
    "end of data": "DATA",
    "data": "DATA",
    "ehlo": "EHLO",
    "helo": "EHLO",
    "starttls": "STARTTLS",
}


def commandIn(text: str) -> Optional[str]:
    """
    @return: the SMTP command (C{RCPT}, C{MAIL}, C{DATA}, C{EHLO},
        C{STARTTLS}) that C{text} says an error answered, or L{None}.
    """
    match = _COMMAND.search(text.lower())
    if match is None:
        return None
    said = next(group for group in match.groups() if group)
    return _COMMAND_NAMES[said.lower()]


_DELAY = re.compile(
    r"delivery (?:status notification \()?delay|\bdelayed\b|has not (?:yet )?been delivered"
    r"|not yet been delivered|will (?:continue to )?(?:re)?try|still (?:be )?(?:trying|retrying|being retried)"
    r"|warning: could not send|temporar(?:y|ily) (?:failure|unable)[^\n]{0,80}retry"
    r"|no action is required on your part|warning message only|you do not need to resend"
    r"|technical details of temporary failure|will be retried"
)


def isDelay(subject: str, text: str) -> bool:
    """
    @return: whether a bounce in words is a delay warning (the MTA will try
        again) rather than a failure.
    """
    if re.search(r"(?i)delay|warning", subject) and not re.search(r"(?i)fail|undeliver|returned", subject):
        return True
    head = text[:1500].lower()
    if re.search(r"permanent|given up|giving up|gave up|could not be delivered|failed permanently", head):
        return False
    return _DELAY.search(head) is not None
