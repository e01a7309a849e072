# -*- test-case-name: tests.test_feedback_report -*-
"""
Bounce records from what the readers found: RFC 3464 recipient groups
(with the report's text filling in what they leave out), a bounce in
words, a JSON notification, or only the returned message's recipients;
each classified by L{smartrelay.feedback.reasons.classify}.
"""

import re
from typing import Optional

from smartrelay import mime
from smartrelay.feedback import dsn, lhost
from smartrelay.feedback.mailtext import (
    Headers,
    addresses,
    headerText,
    partText,
    squeeze,
    statusIn,
)
from smartrelay.feedback.reasons import (
    agentNotice,
    agentTakesReturned,
    agentVerdict,
    bounceKind,
    classify,
    commandIn,
    reportingAgent,
)
from smartrelay.feedback.records import FeedbackRecord, Report

__all__ = [
    "MAX_RECORDS",
    "bounceRecord",
    "failedRecipientsHeader",
    "reporterOf",
    "fromDeliveryStatus",
    "fromJSON",
    "fromNotice",
    "namesReturnedRecipients",
    "fromReturnedRecipients",
    "fromText",
]

#: At most this many records are read from one message.
MAX_RECORDS = 1000


def failedRecipientsHeader(tree: Headers) -> list[str]:
    """
    @return: the addresses of the C{X-Failed-Recipients} fields (Exim,
        Gmail), each once, in order.
    """
    found = []
    for value in tree.getAll("X-Failed-Recipients"):
        for _, address in addresses(headerText(value)):
            if address.lower() not in (each.lower() for each in found):
                found.append(address)
    return found


def _commandIn(text: Optional[str]) -> Optional[str]:
    """
    @return: the SMTP command the words of a recipient's block say the
        error answered (Postfix's "in reply to ... command" and "refused
        to talk to me", Exim's "after RCPT TO", qmail's "does not like
        recipient", Sendmail's ">>> RCPT"), or L{None}.
    """
    if not text:
        return None
    found = lhost.commandIn(text)
    if found is None:
        lowered = text.lower()
        if any(marker in lowered for marker in _OTHER_HINTS):
            found = commandIn(text)
    return found


# One word of each of the classifier's other command hints
# (phrases.COMMAND_HINTS), which may be folded over lines: its scan runs
# only on a text that has one.
_OTHER_HINTS = ("refused", "like", "rcpt", "command", "greeting", "initial")


def bounceRecord(
    recipient: Optional[str],
    action: Optional[str],
    status: Optional[str],
    replycode: Optional[int],
    diagnostic: Optional[str],
    remote: Optional[str],
    command: Optional[str] = None,
    reporter: Optional[str] = None,
    agentReason: Optional[str] = None,
) -> FeedbackRecord:
    """
    @param reporter: the host that wrote the report (L{reporterOf}), which
        names the provider whose wording the classifier reads when neither
        the recipient's domain nor the remote host does.
    @param agentReason: the reason the program that wrote the report gives
        in its own terms (L{_agentReason}), which decides.
    @return: a bounce record, classified; a delay warning is always soft,
        and a missing status is the one the classifier infers.
    """
    verdict = classify(status, replycode, diagnostic, action, command, remote, recipient, reporter)
    reason, kind = verdict.reason, verdict.kind
    if agentReason is not None and reason != "delivered":
        reason, kind = agentReason, bounceKind(agentReason, status or verdict.status)
    if action == "delayed":
        kind = "soft"
    return FeedbackRecord(
        type="bounce",
        recipient=recipient,
        action=action,
        status=status or verdict.status,
        replycode=replycode,
        diagnostic=diagnostic,
        remote=remote,
        kind=kind,
        reason=reason,
    )


def _agentOf(tree: Headers) -> Optional[str]:
    """
    @return: the program of L{LHOSTS} that wrote the report whose header is
        C{tree} (L{reportingAgent}), worked out once per header.
    """
    if "agent" not in tree.memo:
        tree.memo["agent"] = reportingAgent(tree.getAll)
    return tree.memo["agent"]


def _agentReason(tree: Headers, agent: Optional[str], *texts: Optional[str]) -> Optional[str]:
    """
    @return: the reason the program C{agent} that wrote the report
        (L{reportingAgent}) gives for a record whose words are C{texts}
        (L{agentVerdict}), or L{None}.
    """
    if agent is None:
        return None
    return agentVerdict(agent, tree.getAll, "\n".join(text for text in texts if text))


# "from HOST" and "by HOST" of a Received field (RFC 5321 section 4.4).
_RECEIVED_BY = re.compile(r"(?i)\bby\s+([A-Za-z0-9][A-Za-z0-9.-]*\.[A-Za-z]{2,})")
_RECEIVED_FROM = re.compile(r"(?i)^\s*from\s+([A-Za-z0-9][A-Za-z0-9.-]*\.[A-Za-z]{2,})")


def reporterOf(tree: Headers, perMessage: Optional[dict] = None) -> Optional[str]:
    """
    The host that wrote a report: the DSN's C{Reporting-MTA} (RFC 3464
    section 2.2.2), else the host that first handled the report (the C{by}
    host of its oldest C{Received} field, which the writing MTA or its
    outbound relay adds), else the domain of its C{From}.

    @return: a lower-case host name, or L{None}.
    """
    if perMessage:
        host = dsn.remoteHost(perMessage.get("reporting-mta"))
        if host and "." in host:
            return host
    received = tree.getAll("Received")
    if received:
        oldest = headerText(received[-1])
        match = _RECEIVED_BY.search(oldest) or _RECEIVED_FROM.search(oldest)
        if match is not None:
            return match.group(1).lower().rstrip(".")
    for _, address in addresses(headerText(tree.get("From"))):
        return address.rsplit("@", 1)[-1].lower().rstrip(".>") or None
    return None


# Delivery-status fields quoted in a report's text are no diagnostic.
_DSN_LINES = re.compile(
    r"(?im)^[ \t]*(?:Final-Recipient|Original-Recipient|Action|Status|Remote-MTA|Reporting-MTA"
    r"|Received-From-MTA|Arrival-Date|Last-Attempt-Date|Will-Retry-Until|X-Actual-Recipient"
    r"|Diagnostic-Code|X-[\w-]*Queue-ID|X-Postfix-Sender)[ \t]*:[^\n]*(?:\n[ \t]+[^\n]*)*\n?"
)
_USABLE = re.compile(r"[^\s@<>:]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+\.?")


def _usable(address: Optional[str]) -> Optional[str]:
    """
    @return: C{address} if it is a whole e-mail address (a local part, a
        domain with a dot; no source route), else L{None}.
    """
    if address and _USABLE.fullmatch(address.strip('"')) or address and address.startswith('"') and "@" in address:
        return address
    return None


def fromDeliveryStatus(
    tree: Headers, statusParts: list, text: str, exclude: set
) -> list[FeedbackRecord]:
    """
    Records from RFC 3464 recipient groups.

    @param tree: the report's header.
    @param statusParts: the C{message/delivery-status} parts (or the text
        of delivery-status fields found in the report's words).
    @param text: the report's own words, which fill in a missing
        diagnostic, reply code, remote MTA or SMTP command.
    @param exclude: addresses that are no recipients.
    """
    records = []
    textual = None
    hinted = _commandIn(text) is not None
    ownReporter = None
    agent = _agentOf(tree)
    for part in statusParts:
        if isinstance(part, str):
            body = part
        else:
            body = partText(part)
            if not body.strip() and part.message is not None:
                body = part.message.serialize().decode("utf-8", "replace")
        perMessage, recipients = dsn.readDeliveryStatus(body)
        reporter = dsn.remoteHost(perMessage.get("reporting-mta"))
        if not reporter or "." not in reporter:
            if ownReporter is None:
                ownReporter = reporterOf(tree) or ""
            reporter = ownReporter or None
        fallback: Optional[list] = None
        for index, each in enumerate(recipients[:MAX_RECORDS]):
            recipient = _usable(each.recipient) or _usable(each.original)
            if recipient is None:
                if fallback is None:
                    fallback = [
                        found.address for found in lhost.failedRecipients(text, exclude)
                    ] or failedRecipientsHeader(tree)
                if index < len(fallback):
                    recipient = fallback[index]
                else:
                    recipient = each.recipient or each.original
            diagnostic, status, replycode, remote = (
                each.diagnostic,
                each.status,
                each.replycode,
                each.remote,
            )
            command = None
            wantsHint = hinted and _commandIn(diagnostic or "") is None
            if not diagnostic or replycode is None or remote is None or wantsHint:
                if textual is None:
                    known = [r.recipient for r in recipients if r.recipient]
                    textual = {
                        found.address.lower(): found
                        for found in lhost.failedRecipients(text, exclude, known, trusted=True)
                    }
                found = textual.get((recipient or "").lower())
                if found is None and len(recipients) == 1 and len(textual) == 1:
                    found = next(iter(textual.values()))
                if found is not None:
                    extra = lhost.details(_DSN_LINES.sub("", found.text), found.address)
                    if wantsHint:
                        command = _commandIn(found.text)
                    diagnostic = diagnostic or extra["diagnostic"]
                    replycode = replycode or (extra["replycode"] if not each.diagnostic else None)
                    remote = remote or extra["remote"]
                    status = status or extra["status"]
            if diagnostic and each.diagnostic:
                diagnostic = _completedReply(diagnostic, text)
            if not diagnostic and len(recipients) == 1 and (status is None or status.endswith(".0.0")):
                # A status that names no reason and no words about the
                # address: the report's words are all there is.
                diagnostic = squeeze(_DSN_LINES.sub("", text), 1000)
            if not each.diagnostic and each.statusText:
                # "Status: 4.0.0 (host name lookup failure)" says more
                # than the text around the address.
                diagnostic = each.statusText
            if status is None:
                status = statusIn(diagnostic)
            action = each.action
            if action is None:
                action = "delayed" if status and status.startswith("4") and lhost.isDelay(
                    headerText(tree.get("Subject")), text
                ) else "failed"
            if action in ("delivered", "relayed", "expanded") and not status:
                continue
            agentReason = _agentReason(tree, agent, diagnostic, text if len(recipients) == 1 else None)
            records.append(
                bounceRecord(
                    recipient, action, status, replycode, diagnostic, remote, command, reporter, agentReason
                )
            )
    return records


_FIRST_OF_MANY = re.compile(r"([245]\d\d)-")


def _completedReply(diagnostic: str, text: str) -> str:
    """
    A Diagnostic-Code that is the first line of a multi-line reply
    ("550-5.7.1 ...", RFC 5321 section 4.2.1: more lines follow), as
    Sendmail writes it, completed from the session transcript of the
    report's words, where the whole reply is quoted ("<<< 550-...",
    "<<< 550 ...").

    @return: the whole reply, or C{diagnostic} when the transcript does
        not quote it.
    """
    match = _FIRST_OF_MANY.match(diagnostic)
    if match is None or "<<< " not in text:
        return diagnostic
    code = match.group(1)
    wanted = squeeze(diagnostic)
    lines = text.split("\n")
    for index, line in enumerate(lines):
        stripped = line.strip()
        if not stripped.startswith("<<< " + code + "-") or squeeze(stripped[4:]) != wanted:
            continue
        whole = [stripped[4:]]
        for following in lines[index + 1 :]:
            following = following.strip()
            if not following.startswith("<<< " + code):
                break
            whole.append(following[4:])
            if following[7:8] == " ":
                break  # the last line of the reply
        return squeeze(" ".join(whole)) or diagnostic
    return diagnostic


def fromJSON(kind: str, found: list) -> Report:
    """
    @return: the report of a JSON notification's records
        (L{smartrelay.feedback.jsonreport.readJSONReport}).
    """
    if kind == "complaint":
        records = [FeedbackRecord(type="complaint", reason="feedback", **each) for each in found]
    else:
        records = [
            bounceRecord(
                each["recipient"],
                each["action"],
                each["status"],
                each["replycode"],
                each["diagnostic"],
                each["remote"],
            )
            for each in found
        ]
    return Report(kind if records else "none", tuple(records))


def fromReturnedRecipients(returned: Optional[mime.Part], head: Headers, text: str) -> list[FeedbackRecord]:
    """
    For a bounce whose text names no recipient: the recipients the returned
    message was addressed to, with the bounce's text as the diagnostic.
    """
    if returned is None:
        return []
    found: list[str] = []
    for name in ("To", "Cc"):
        for _, address in addresses(headerText(returned.get(name))):
            if address.lower() not in (each.lower() for each in found):
                found.append(address)
    if not found:
        return []
    extra = lhost.details(text, "")
    action = "delayed" if lhost.isDelay(headerText(head.get("Subject")), text) else "failed"
    reporter = reporterOf(head)
    agent = _agentOf(head)
    return [
        bounceRecord(
            address,
            action,
            extra["status"],
            extra["replycode"],
            extra["diagnostic"],
            extra["remote"],
            reporter=reporter,
            agentReason=_agentReason(head, agent, extra["diagnostic"], text if len(found) == 1 else None),
        )
        for address in found
    ]


_BRACKETED = re.compile(r"<([^<>\s@]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+)>")


def fromNotice(tree: Headers, text: str) -> list[FeedbackRecord]:
    """
    The records of a notice by a program of L{LHOSTS} that writes no bounce
    in form (a mailing-list manager's): each line naming an address in
    angle brackets, before the line that ends the notice's words, starts
    a record, its words running to the next such line.

    @return: the records, or C{[]} when the report is no such notice.
    """
    agent = _agentOf(tree)
    end = agentNotice(agent)
    if end is None:
        return []
    blocks: list[list] = []
    for line in text.split("\n"):
        if line.strip().lower().startswith(end):
            break
        match = _BRACKETED.search(line)
        if match is not None and (not blocks or blocks[-1][0].lower() != match.group(1).lower()):
            blocks.append([match.group(1), [line.strip()]])
        elif blocks and line.strip():
            blocks[-1][1].append(line.strip())
    records = []
    for address, lines in blocks[:MAX_RECORDS]:
        diagnostic = squeeze(" ".join(lines), 2000)
        records.append(
            bounceRecord(
                address,
                "failed",
                None,
                None,
                diagnostic,
                None,
                reporter=reporterOf(tree),
                agentReason=_agentReason(tree, agent, diagnostic),
            )
        )
    return records


def namesReturnedRecipients(tree: Headers, text: str, exclude: set) -> bool:
    """
    Whether a report is about the returned message's recipients rather
    than its C{X-Failed-Recipients}: a notice of a program that says so
    (L{agentTakesReturned}) whose words name no address.
    """
    return agentTakesReturned(_agentOf(tree)) and not lhost.failedRecipients(text, exclude)


def fromText(tree: Headers, text: str, exclude: set) -> list[FeedbackRecord]:
    """
    @return: the records of a bounce in words (see
        L{smartrelay.feedback.lhost}), narrowed to C{X-Failed-Recipients}
        where the text names more.
    """
    subject = headerText(tree.get("Subject"))
    known = failedRecipientsHeader(tree)
    found = lhost.failedRecipients(text, exclude, known)
    if not found:
        return []
    action = "delayed" if lhost.isDelay(subject, text) else "failed"
    reporter = reporterOf(tree)
    agent = _agentOf(tree)
    records = []
    for each in found:
        extra = lhost.details(each.text, each.address)
        context = text if len(found) == 1 else each.text
        records.append(
            bounceRecord(
                each.address,
                action,
                extra["status"],
                extra["replycode"],
                extra["diagnostic"],
                extra["remote"],
                _commandIn(each.text),
                reporter,
                _agentReason(tree, agent, extra["diagnostic"], context),
            )
        )
    return records
