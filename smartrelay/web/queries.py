"""
What the HTTP API (L{smartrelay.web.api}) and the reports UI
(L{smartrelay.web.ui}) read and do, in one place: a message's document,
pages of events, statistics with rates, the suppression list, this node's
queue and its destinations.

L{Queries} takes checked arguments (the callers read and check their
requests: the API its query strings, the UI its forms) and answers plain
JSON-able documents, the ones C{docs/api.md} describes.  A failure the
caller must show (no such message, a delivery in progress) is an
L{ApiError}; the API writes it as JSON, the UI as a page.
"""

import csv
import io
import json
from typing import Any, Optional, Protocol

import attrs
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from smartrelay.cluster.commands import (
    NodeTimeout,
    NodeUnavailable,
    StoreUnreachable,
    ownerOf,
)
from smartrelay.events import rfc3339
from smartrelay.message import SpoolEntry
from smartrelay.outbound.scheduler import DeliveryInProgress
from smartrelay.store.interfaces import (
    INTERVALS,
    IStore,
    MAX_LIMIT,
    MAX_MAILBOX_MESSAGE,
    SuppressionEntry,
    bucketStart,
    recipientDomain,
)
from smartrelay.web.apijson import (
    envelope,
    envelopeFromEvents,
    headerBlock,
    headersFromEvents,
    optionalTime,
    queueItem,
    rates,
    recipientsFromEvents,
    suppressionJSON,
)
from smartrelay.web.apirequest import (
    ApiError,
    checkQueueID,
    decodeQueueCursor,
    encodeQueueCursor,
    notFound,
)

__all__ = [
    "COMPLAINT_RATE_LIMIT",
    "MAX_REASON_SCAN",
    "MAX_SCAN",
    "MessageReader",
    "PAGE_BUDGET",
    "QUEUE_SLICE",
    "QueueActions",
    "QueueControl",
    "Queries",
    "VIEW_TIMEOUT",
    "answerOrError",
    "mergePages",
    "mergeSummaries",
    "SUPPRESSION_CSV_FIELDS",
    "suppressionCSV",
]

#: The complaint rate Gmail and Yahoo require senders to stay below
#: (their 2024 sender requirements): 0.3 %.
COMPLAINT_RATE_LIMIT = 0.003

#: A filter the store cannot apply (C{domain} on events) is applied here,
#: reading at most this many events per request; the page may then hold
#: fewer than C{limit} items, with a C{next_cursor} to go on.
MAX_SCAN = 20_000

#: Bounced events read per statistics request to count bounce reasons.
MAX_REASON_SCAN = 100_000

#: Queued messages looked at per reactor turn by the queue walks.
QUEUE_SLICE = 2000

#: Seconds a queue view waits for the other nodes' parts.
VIEW_TIMEOUT = 5.0

#: Characters of queue items another node sends for one page (its answer
#: must fit in a mailbox message).
PAGE_BUDGET = MAX_MAILBOX_MESSAGE - 8192

#: The columns of the suppression list's CSV export.
SUPPRESSION_CSV_FIELDS = ("address", "reason", "source_event", "time", "expires")


class QueueControl(Protocol):
    """
    What the API and the UI read and do to this node's queue: the methods
    of L{smartrelay.outbound.scheduler.DeliveryScheduler} they use.
    """

    def queuedMessages(self) -> list: ...

    def queuedMessage(self, queue_id: str) -> Optional[SpoolEntry]: ...

    def attempting(self, queue_id: str) -> set: ...

    def lastDeferral(self, queue_id: str, address: str) -> Optional[dict]: ...

    def retryNow(self, queue_id: str) -> bool: ...

    def retryDomain(self, domain: str) -> int: ...

    def delete(self, queue_id: str, reason: str = "deleted") -> Deferred: ...

    def destinations(self) -> list: ...


class MessageReader(Protocol):
    """
    The spool's reading side: a queued message's bytes.
    """

    def readMessage(self, entry: SpoolEntry) -> Deferred: ...


def suppressionCSV(entries: list) -> bytes:
    """
    Suppression entries (as L{suppressionJSON} documents) as CSV with a
    header row, CRLF line ends, UTF-8.
    """
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(SUPPRESSION_CSV_FIELDS)
    for entry in entries:
        writer.writerow(["" if entry[f] is None else entry[f] for f in SUPPRESSION_CSV_FIELDS])
    return out.getvalue().encode("utf-8")


@attrs.define(slots=False)
class QueueActions:
    """
    What may be done to this node's own queue (retry now and delete), and
    this node's parts of the queue views, as other nodes ask for them
    (L{answer}).

    @ivar scheduler: this node's queue (L{QueueControl}).
    @ivar clock: an L{IReactorTime} to let the reactor run during long
        walks over the queue; L{None}: the global reactor.
    """

    scheduler: QueueControl
    clock: Any = None

    def retry(self, queue_id: str) -> dict:
        """
        Attempt a queued message's waiting recipients now.

        @raise ApiError: 404 if it is not queued, 409 if every waiting
            recipient is being attempted already.
        """
        entry = self.scheduler.queuedMessage(queue_id)
        if entry is None:
            raise notFound(f"{queue_id} is not in the queue")
        if not self.scheduler.retryNow(queue_id):
            raise ApiError(
                409,
                "in_progress",
                f"{queue_id}: every waiting recipient is being attempted already",
            )
        return {"queue_id": queue_id, "retrying": sorted(self.scheduler.attempting(queue_id))}

    async def delete(self, queue_id: str) -> dict:
        """
        Take a message out of the queue (its waiting recipients end
        C{expired}, reason C{deleted}).

        @raise ApiError: 404 if it is not queued, 409 while a delivery of
            it is in progress.
        """
        try:
            deleted = await self.scheduler.delete(queue_id)
        except KeyError:
            raise notFound(f"{queue_id} is not in the queue") from None
        except DeliveryInProgress as e:
            raise ApiError(
                409,
                "in_progress",
                f"{e}; try again when the attempt is over",
            ) from None
        return {"queue_id": queue_id, "deleted": deleted}

    def retryDomain(self, domain: str) -> dict:
        """
        Attempt every waiting recipient at C{domain} now.
        """
        return {"domain": domain, "messages": self.scheduler.retryDomain(domain)}

    # -- this node's parts of the queue views ----------------------------------

    async def breathe(self, count: int) -> None:
        """
        Every L{QUEUE_SLICE} messages of a walk over the queue, let the
        reactor run (a big queue is summed in many reactor turns, not one
        long one; the walk reads the list taken at its start).
        """
        if count and not count % QUEUE_SLICE:
            clock = self.clock
            if clock is None:  # pragma: no cover (the service's handler)
                from twisted.internet import reactor as clock
            await deferLater(clock, 0, lambda: None)

    def queuedRecipients(self, entry, events: tuple = ()) -> list:
        """
        The recipients of a queued message; the last deferral of each from
        the scheduler, else (after a restart) from its C{events} if given.
        """
        attempting = self.scheduler.attempting(entry.queue_id)
        deferrals = {
            event.recipient: event.detail
            for event in events
            if event.type == "deferred" and isinstance(event.detail, dict)
        }
        recipients = []
        for recipient in entry.recipients:
            deferral = self.scheduler.lastDeferral(entry.queue_id, recipient.address)
            if deferral is None and recipient.state == "deferred":
                deferral = deferrals.get(recipient.address)
            recipients.append(
                {
                    "address": recipient.address,
                    "state": recipient.state,
                    "attempts": recipient.attempts,
                    "next_attempt": None
                    if recipient.final
                    else rfc3339(max(recipient.next_attempt, entry.received)),
                    "attempting": recipient.address in attempting,
                    "last_reply": None
                    if deferral is None
                    else {
                        k: deferral.get(k) for k in ("code", "status", "reply", "remote")
                    },
                }
            )
        return recipients

    async def summaryPart(self, only: Optional[str] = None) -> dict:
        """
        This node's queue per recipient domain (C{only}: that domain), raw:
        C{{"messages": n, "domains": {domain: {"messages", "recipients",
        "queued", "deferred", "attempting", "oldest" (seconds),
        "next_attempt" (seconds or None), "reasons": {text: count}}}}}
        (L{mergeSummaries} writes it, and sums those of several nodes).
        """
        domains: dict = {}
        messages = 0
        for count, entry in enumerate(self.scheduler.queuedMessages()):
            await self.breathe(count)
            attempting = self.scheduler.attempting(entry.queue_id)
            seen: set = set()
            for recipient in entry.pending():
                domain = recipientDomain(recipient.address) or ""
                if only is not None and domain != only:
                    continue
                summary = domains.setdefault(
                    domain,
                    {
                        "messages": 0,
                        "recipients": 0,
                        "queued": 0,
                        "deferred": 0,
                        "attempting": 0,
                        "oldest": entry.received,
                        "next_attempt": None,
                        "reasons": {},
                    },
                )
                if not seen:
                    messages += 1
                if domain not in seen:
                    seen.add(domain)
                    summary["messages"] += 1
                summary["recipients"] += 1
                summary["oldest"] = min(summary["oldest"], entry.received)
                if recipient.address in attempting:
                    summary["attempting"] += 1
                else:
                    due = max(recipient.next_attempt, entry.received)
                    if summary["next_attempt"] is None or due < summary["next_attempt"]:
                        summary["next_attempt"] = due
                if recipient.state == "deferred":
                    summary["deferred"] += 1
                    deferral = self.scheduler.lastDeferral(entry.queue_id, recipient.address)
                    text = "unknown (deferred before the relay restarted)"
                    if deferral is not None:
                        text = (
                            f"{deferral.get('code')} {deferral.get('status')} "
                            f"{deferral.get('reply')}"
                        )
                    summary["reasons"][text] = summary["reasons"].get(text, 0) + 1
                else:
                    summary["queued"] += 1
        return {"messages": messages, "domains": domains}

    async def pagePart(
        self,
        domain: Optional[str],
        state: Optional[str],
        limit: int,
        after: Optional[tuple],
        budget: Optional[int] = None,
    ) -> dict:
        """
        This node's queued messages with a recipient waiting (at C{domain},
        in C{state}) that come after the position C{after} (C{(received,
        queue_id)}), oldest first: at most C{limit}, and (with C{budget})
        no more than fit in C{budget} characters of JSON, at least one.

        @return: C{{"items": [...], "positions": [[received, queue_id],
            ...], "more": whether messages were left out}} (L{mergePages}).
        """
        items: list = []
        positions: list = []
        size = 0
        more = False
        for count, entry in enumerate(self.scheduler.queuedMessages()):
            await self.breathe(count)
            position = (entry.received, entry.queue_id)
            if after is not None and position <= after:
                continue
            if not any(
                (domain is None or recipientDomain(r.address) == domain)
                and (state is None or r.state == state)
                for r in entry.pending()
            ):
                continue
            if len(items) >= limit:
                more = True
                break
            item = queueItem(entry, self.queuedRecipients(entry))
            if budget is not None:
                length = len(json.dumps(item)) + 64
                if items and size + length > budget:
                    more = True
                    break
                size += length
            items.append(item)
            positions.append(list(position))
        return {"items": items, "positions": positions, "more": more}

    def destinationsPart(self) -> list:
        """
        This node's destinations' state, as the scheduler has it.
        """
        return [dict(state) for state in self.scheduler.destinations()]

    def queuedPart(self, queue_id: str) -> dict:
        """
        Whether C{queue_id} is in this node's queue; if so its envelope and
        recipients (the message document's parts that are not in the
        store).
        """
        entry = self.scheduler.queuedMessage(queue_id)
        if entry is None:
            return {"queued": False}
        return {
            "queued": True,
            "envelope": envelope(entry),
            "recipients": self.queuedRecipients(entry),
        }

    async def answer(self, op: str, args: dict) -> dict:
        """
        A command another node sent, answered as C{{"status": 202 or 200,
        "body": the document}} or the error's status and body; never
        fails:

          - C{retry} or C{delete} of C{args["queue_id"]}, C{retryDomain}
            of C{args["domain"]};
          - C{queueSummary} (C{args["domain"]} or null): L{summaryPart};
          - C{queuePage} (C{domain}, C{state}, C{limit}, C{after}):
            L{pagePart}, within what a mailbox message holds;
          - C{destinations}: L{destinationsPart};
          - C{queued} (C{queue_id}): L{queuedPart}.
        """
        try:
            if not isinstance(args, dict):
                args = {}
            if op == "retryDomain":
                domain = args.get("domain")
                if not isinstance(domain, str) or not domain:
                    raise ApiError(400, "bad_request", "retryDomain needs a domain")
                return {"status": 200, "body": self.retryDomain(domain)}
            if op == "queueSummary":
                only = args.get("domain")
                if only is not None and not isinstance(only, str):
                    raise ApiError(400, "bad_request", "queueSummary: bad domain")
                return {"status": 200, "body": await self.summaryPart(only)}
            if op == "queuePage":
                domain, state, limit = args.get("domain"), args.get("state"), args.get("limit")
                after = _position(args.get("after"))
                if (
                    (domain is not None and not isinstance(domain, str))
                    or state not in (None, "queued", "deferred")
                    or isinstance(limit, bool)
                    or not isinstance(limit, int)
                    or not 1 <= limit <= MAX_LIMIT
                ):
                    raise ApiError(400, "bad_request", "queuePage: bad arguments")
                body = await self.pagePart(domain, state, limit, after, PAGE_BUDGET)
                return {"status": 200, "body": body}
            if op == "destinations":
                return {"status": 200, "body": {"items": self.destinationsPart()}}
            queue_id = args.get("queue_id")
            checkQueueID(queue_id if isinstance(queue_id, str) else "")
            if op == "queued":
                return {"status": 200, "body": self.queuedPart(queue_id)}
            if op == "retry":
                return {"status": 202, "body": self.retry(queue_id)}
            if op == "delete":
                return {"status": 200, "body": await self.delete(queue_id)}
            raise ApiError(400, "bad_request", f"no such command: {op!r}")
        except ApiError as e:
            return {"status": e.status, "body": e.body()}


def _position(value: Any) -> Optional[tuple]:
    """
    A C{[received, queue_id]} position sent by another node, or L{None}.

    @raise ApiError: 400 for anything else.
    """
    if value is None:
        return None
    if (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], (int, float))
        and not isinstance(value[0], bool)
        and isinstance(value[1], str)
    ):
        return (float(value[0]), value[1])
    raise ApiError(400, "bad_request", "queuePage: bad position")


def mergeSummaries(parts: list) -> dict:
    """
    The queue summary document (C{docs/api.md}) of the raw parts
    (L{QueueActions.summaryPart}) of one or more nodes: counts added per
    domain, the oldest and the next attempt the earliest, the reasons'
    counts added (most frequent first).

    @raise KeyError, TypeError, ValueError: for a malformed part.
    """
    domains: dict = {}
    messages = 0
    for part in parts:
        messages += int(part["messages"])
        for domain, raw in part["domains"].items():
            summary = domains.get(domain)
            if summary is None:
                summary = domains[domain] = {
                    "domain": domain,
                    "messages": 0,
                    "recipients": 0,
                    "queued": 0,
                    "deferred": 0,
                    "attempting": 0,
                    "oldest": float(raw["oldest"]),
                    "next_attempt": None,
                    "reasons": {},
                }
            for key in ("messages", "recipients", "queued", "deferred", "attempting"):
                summary[key] += int(raw[key])
            summary["oldest"] = min(summary["oldest"], float(raw["oldest"]))
            due = raw["next_attempt"]
            if due is not None and (
                summary["next_attempt"] is None or float(due) < summary["next_attempt"]
            ):
                summary["next_attempt"] = float(due)
            for text, count in raw["reasons"].items():
                summary["reasons"][str(text)] = summary["reasons"].get(str(text), 0) + int(count)
    items = []
    for domain in sorted(domains):
        summary = domains[domain]
        summary["oldest"] = rfc3339(summary["oldest"])
        summary["next_attempt"] = optionalTime(summary["next_attempt"])
        summary["reasons"] = [
            {"reason": text, "count": count}
            for text, count in sorted(summary["reasons"].items(), key=lambda kv: -kv[1])
        ]
        items.append(summary)
    return {
        "messages": messages,
        "recipients": sum(d["recipients"] for d in items),
        "domains": items,
    }


def mergePages(parts: list, limit: int) -> tuple:
    """
    One page of the queued messages of several nodes, from each node's
    part (L{QueueActions.pagePart}: its messages after the cursor, oldest
    first, C{more} if some were left out), in the order of C{(received,
    queue_id)}.

    A node that left messages out has sent every one of its messages up to
    its last position; so the page stops at the earliest such last
    position (and at C{limit}), and holds every message of every node up
    to its own end: the next page, after that position, repeats none and
    skips none.

    @param parts: C{(node, part)} pairs; C{node} is written into each item
        unless it is L{None}.
    @return: C{(items, position after which the next page starts, or
        None: no more)}.
    @raise KeyError, TypeError, ValueError: for a malformed part.
    """
    cut = None
    merged = []
    for node, part in parts:
        positions = [(float(r), str(q)) for r, q in part["positions"]]
        items = list(part["items"])
        if len(positions) != len(items):
            raise ValueError("positions and items differ")
        if part["more"]:
            if not positions:
                raise ValueError("more without items")
            if cut is None or positions[-1] < cut:
                cut = positions[-1]
        for position, item in zip(positions, items):
            if node is not None:
                item = dict(item, node=node)
            merged.append((position, item))
    merged.sort(key=lambda pair: pair[0])
    if cut is not None:
        merged = [pair for pair in merged if pair[0] <= cut]
    page = merged[:limit]
    more = cut is not None or len(merged) > limit
    return [item for _, item in page], (page[-1][0] if more and page else None)


def answerOrError(answer: Any) -> dict:
    """
    The body of a command's answer (L{QueueActions.answer}).

    @raise ApiError: for an error answer, with its status, code and text.
    """
    try:
        status, body = int(answer["status"]), answer["body"]
        if status < 400:
            return body
        error = body["error"]
        code, message = str(error["code"]), str(error["message"])
    except (KeyError, TypeError, ValueError):
        raise ApiError(500, "internal_error", "the owning node answered nonsense") from None
    raise ApiError(status, code, message)


@attrs.define(slots=False)
class Queries:
    """
    The reads and actions shared by the API and the UI.

    @ivar store: an L{IStore}.
    @ivar scheduler: this node's queue (L{QueueControl}).
    @ivar spool: reads a queued message (L{MessageReader}).
    @ivar clock: an L{IReactorTime}.
    @ivar remote: sends retries and deletes of messages that belong to
        another node to it (L{smartrelay.cluster.commands.NodeCommands}:
        C{isElsewhere(queue_id)}, C{request(node, op, args)}), or L{None}
        (one node).
    """

    store: IStore
    scheduler: QueueControl
    spool: MessageReader
    clock: IReactorTime
    remote: Any = None
    actions: QueueActions = attrs.field(
        default=attrs.Factory(
            lambda self: QueueActions(self.scheduler, self.clock), takes_self=True
        )
    )

    log = Logger()

    # -- messages ----------------------------------------------------------

    async def message(self, queue_id: str) -> dict:
        """
        The document of one message: envelope, recipients, headers and
        every event; from the spool's entry while queued, else from its
        events.

        @raise ApiError: 404 if neither the queue nor the store knows it.
        """
        entry = self.scheduler.queuedMessage(queue_id)
        events = await maybeDeferred(self.store.eventsForMessage, queue_id)
        if entry is None and self._isRemote(queue_id):
            return await self._messageElsewhere(queue_id, events)
        if entry is None and not events:
            raise notFound(f"no message {queue_id} (in the queue or the events)")
        eventJSON = [event.asDict() for event in events]
        if entry is not None:
            headers = None
            try:
                data = await maybeDeferred(self.spool.readMessage, entry)
            except Exception:
                self.log.failure("could not read {queue_id} from the spool", queue_id=queue_id)
            else:
                headers = headerBlock(data)
            return {
                "queue_id": queue_id,
                "queued": True,
                "envelope": envelope(entry),
                "recipients": self.queuedRecipients(entry, events),
                "headers": headers,
                "events": eventJSON,
            }
        return {
            "queue_id": queue_id,
            "queued": False,
            "envelope": envelopeFromEvents(events),
            "recipients": recipientsFromEvents(events),
            "headers": headersFromEvents(events),
            "events": eventJSON,
        }

    async def _messageElsewhere(self, queue_id: str, events: list) -> dict:
        """
        The document of a message another node accepted: C{queued},
        envelope and recipients from that node while it holds it (C{node}
        names it), else from the events; if the node does not answer,
        from the events, C{queued} true if a recipient is still waiting
        there, with C{partial} and C{missing_nodes}.
        """
        node = ownerOf(queue_id)
        recipients = recipientsFromEvents(events)
        eventJSON = [event.asDict() for event in events]
        if events and recipients and not any(
            r["state"] in ("queued", "deferred") for r in recipients
        ):
            # Every recipient has its final event: nothing to ask.
            part, error = None, None
        else:
            part, error = await self._partOf(node, "queued", {"queue_id": queue_id}, True)
        if isinstance(part, dict) and part.get("queued") is True:
            return {
                "queue_id": queue_id,
                "queued": True,
                "envelope": part["envelope"],
                "recipients": part["recipients"],
                "headers": headersFromEvents(events),
                "events": eventJSON,
                "node": node,
            }
        if not events:
            if error is None:
                raise notFound(f"no message {queue_id} (in the queue or the events)")
            raise ApiError(
                504 if error["code"] == "node_timeout" else 503,
                error["code"],
                f"{queue_id} belongs to node {node}, which did not answer, and the "
                f"store has no events of it: {error['message']}",
            )
        document = {
            "queue_id": queue_id,
            "queued": False,
            "envelope": envelopeFromEvents(events),
            "recipients": recipients,
            "headers": headersFromEvents(events),
            "events": eventJSON,
        }
        if error is not None:
            document["queued"] = any(r["state"] in ("queued", "deferred") for r in recipients)
            document.update(
                {
                    "node": node,
                    "partial": True,
                    "missing_nodes": [node],
                    "node_errors": [dict(error, node=node)],
                }
            )
        return document

    def queuedRecipients(self, entry, events: tuple = ()) -> list:
        """
        The recipients of a queued message; the last deferral of each from
        the scheduler, else (after a restart) from its C{events} if given.
        """
        return self.actions.queuedRecipients(entry, events)

    # -- events ------------------------------------------------------------

    async def events(
        self, filters: dict, domain: Optional[str], limit: int, cursor: Optional[str]
    ) -> dict:
        """
        One page of events: C{filters} are L{IStore.queryEvents}'s
        (C{type}, C{queue_id}, C{recipient}, C{tag}, C{since}, C{until});
        C{domain} (the recipient's) is applied here, reading at most
        L{MAX_SCAN} events.

        @return: C{{"items": [...], "next_cursor": ...}}.
        """
        items: list = []
        scanned = 0
        while True:
            # With a domain filter, pages of what is still wanted: each ends
            # where the store's cursor does, so none is skipped or repeated.
            want = limit - len(items)
            page = await maybeDeferred(
                self.store.queryEvents, cursor=cursor, limit=want, **filters
            )
            scanned += len(page.events)
            cursor = page.cursor
            for event in page.events:
                if domain is None or recipientDomain(event.recipient) == domain:
                    items.append(event.asDict())
            if cursor is None or len(items) >= limit or domain is None or scanned >= MAX_SCAN:
                break
        return {"items": items, "next_cursor": cursor}

    # -- statistics --------------------------------------------------------

    async def stats(
        self,
        since: float,
        until: float,
        interval: str,
        tag: Optional[str] = None,
        domain: Optional[str] = None,
        bounceReasons: bool = True,
    ) -> dict:
        """
        Counts and rates per bucket and in total, from the store's
        counters.  With C{bounceReasons} the bounced events of the range
        are also read (at most L{MAX_REASON_SCAN}) to count their reasons;
        without, nothing but counters is read (the dashboard).
        """
        size = INTERVALS[interval]
        stats = await maybeDeferred(
            self.store.statistics,
            since=since,
            until=until,
            interval=interval,
            tag=tag,
            domain=domain,
        )
        if bounceReasons:
            reasons, complete = await self.bounceReasons(since, until, size, tag, domain)
        else:
            reasons, complete = {}, False
        buckets = []
        for bucket in stats.buckets:
            buckets.append(
                {
                    "start": rfc3339(bucket.start),
                    "counts": bucket.counts,
                    "hard_bounces": bucket.hard_bounces,
                    "soft_bounces": bucket.soft_bounces,
                    "unique_opens": bucket.unique_opens,
                    "unique_clicks": bucket.unique_clicks,
                    "bounce_reasons": reasons.get(bucket.start, {}),
                    "rates": rates(
                        bucket.counts,
                        bucket.hard_bounces,
                        bucket.soft_bounces,
                        bucket.unique_opens,
                        bucket.unique_clicks,
                    ),
                }
            )
        totalReasons: dict = {}
        for perBucket in reasons.values():
            for reason, count in perBucket.items():
                totalReasons[reason] = totalReasons.get(reason, 0) + count
        totalRates = rates(
            stats.totals,
            stats.hard_bounces,
            stats.soft_bounces,
            stats.unique_opens,
            stats.unique_clicks,
        )
        complaint = totalRates["complaint"]
        return {
            "from": rfc3339(since),
            "to": rfc3339(until),
            "interval": interval,
            "tag": tag,
            "domain": domain,
            "totals": {
                "counts": stats.totals,
                "hard_bounces": stats.hard_bounces,
                "soft_bounces": stats.soft_bounces,
                "unique_opens": stats.unique_opens,
                "unique_clicks": stats.unique_clicks,
                "bounce_reasons": dict(sorted(totalReasons.items())),
            },
            "rates": totalRates,
            "complaint_rate_limit": COMPLAINT_RATE_LIMIT,
            "complaint_rate_over_limit": None
            if complaint is None
            else complaint >= COMPLAINT_RATE_LIMIT,
            "bounce_reasons_complete": complete,
            "buckets": buckets,
        }

    async def bounceReasons(self, since, until, size, tag, domain) -> tuple:
        """
        Bounced events per bucket and reason, read from the events still
        kept (C{[store] retention}), at most L{MAX_REASON_SCAN}.

        @return: ({bucket start: {reason: count}}, whether every bounce in
            the range was read).
        """
        reasons: dict = {}
        async for event, complete in self.bounces(bucketStart(since, size), until, tag):
            if event is None:
                return reasons, complete
            if domain is not None and recipientDomain(event.recipient) != domain:
                continue
            reason = (event.detail or {}).get("reason") or "undefined"
            counts = reasons.setdefault(bucketStart(event.time, size), {})
            counts[reason] = counts.get(reason, 0) + 1
        return reasons, True  # pragma: no cover (bounces always ends with None)

    async def bounces(self, since: float, until: float, tag: Optional[str] = None):
        """
        The bounced events from C{since} to C{until}, oldest first, at most
        L{MAX_REASON_SCAN}: yields C{(event, None)} for each, then
        C{(None, complete)} once (whether every one in the range was read).
        """
        cursor = None
        scanned = 0
        while True:
            page = await maybeDeferred(
                self.store.queryEvents,
                type="bounced",
                tag=tag,
                since=since,
                until=until,
                cursor=cursor,
                limit=MAX_LIMIT,
            )
            for event in page.events:
                yield event, None
            scanned += len(page.events)
            cursor = page.cursor
            if cursor is None:
                yield None, True
                return
            if scanned >= MAX_REASON_SCAN:
                yield None, False
                return

    # -- suppressions ------------------------------------------------------

    async def suppressions(
        self,
        prefix: Optional[str],
        reason: Optional[str],
        cursor: Optional[str],
        limit: int,
    ) -> dict:
        """
        One page of the suppression list (addresses starting with
        C{prefix}, of C{reason}).
        """
        page = await maybeDeferred(
            self.store.listSuppressions,
            prefix=prefix,
            reason=reason,
            cursor=cursor,
            limit=limit,
        )
        return {
            "items": [suppressionJSON(entry) for entry in page.entries],
            "next_cursor": page.cursor,
        }

    async def allSuppressions(self, prefix: Optional[str], reason: Optional[str]) -> list:
        """
        Every entry of the suppression list (for an export).
        """
        entries = []
        cursor = None
        while True:
            page = await self.suppressions(prefix, reason, cursor, MAX_LIMIT)
            entries.extend(page["items"])
            cursor = page["next_cursor"]
            if cursor is None:
                return entries

    async def suppression(self, address: str) -> dict:
        """
        The entry of one (normalised) address, expired or not.

        @raise ApiError: 404 if it is not on the list.
        """
        found = await maybeDeferred(self.store.checkSuppressions, [address], float("-inf"))
        if address not in found:
            raise notFound(f"{address} is not on the suppression list")
        return suppressionJSON(found[address])

    async def addSuppressions(self, entries: list) -> int:
        """
        Put checked L{SuppressionEntry} objects on the list, a hundred at
        a time (the store takes them in order).

        @return: how many.
        """
        for start in range(0, len(entries), 100):
            await gatherResults(
                [
                    maybeDeferred(self.store.addSuppression, entry)
                    for entry in entries[start : start + 100]
                ],
                consumeErrors=True,
            )
        return len(entries)

    async def addSuppression(self, entry: SuppressionEntry) -> dict:
        """
        Put one entry on the list; its document.
        """
        await maybeDeferred(self.store.addSuppression, entry)
        return suppressionJSON(entry)

    async def removeSuppression(self, address: str) -> dict:
        """
        Take a (normalised) address off the list.

        @raise ApiError: 404 if it was not on it.
        """
        removed = await maybeDeferred(self.store.removeSuppression, address)
        if not removed:
            raise notFound(f"{address} is not on the suppression list")
        return {"address": address, "removed": True}

    # -- queue -------------------------------------------------------------

    async def _breathe(self, count: int) -> None:
        await self.actions.breathe(count)

    def queueSize(self) -> dict:
        """
        How many messages wait in this node's queue and when the oldest
        was received (no walk over their recipients: for the dashboard).
        """
        entries = self.scheduler.queuedMessages()
        return {
            "messages": len(entries),
            "oldest": optionalTime(entries[0].received) if entries else None,
        }

    async def gather(self, op: str, args: dict, here: Any) -> tuple:
        """
        The parts of a queue view of this node (C{here}) and, with other
        nodes sharing the store, of every other registered node: C{op}
        with C{args} sent to each (L{QueueActions.answer}), waiting at most
        L{VIEW_TIMEOUT} seconds.  A node without a heartbeat within the
        last two heartbeat intervals is not asked.

        @return: C{(parts, cluster)}: C{parts} the C{(node, body)} of the
            nodes that answered, this one first (C{node} L{None} on one
            node); C{cluster} L{None} on one node, else the fields every
            cluster-wide view adds (C{nodes}, C{partial},
            C{missing_nodes}, C{node_errors}).
        """
        if self.remote is None:
            return [(None, here)], None
        me = self.remote.node
        parts = [(me, here)]
        errors = []
        try:
            registered, fresh = await self.remote.nodeStates()
        except Exception as e:
            registered, fresh = set(), set()
            errors.append(
                {
                    "node": None,
                    "code": "store_unreachable",
                    "message": "cannot read the live nodes from the store "
                    f"({str(e) or type(e).__name__}): this node's part only",
                }
            )
        others = sorted(n for n in registered if n != me)
        answers = await gatherResults(
            [
                Deferred.fromCoroutine(self._partOf(node, op, args, node in fresh))
                for node in others
            ]
        )
        for node, (body, error) in zip(others, answers):
            if error is None:
                parts.append((node, body))
            else:
                errors.append(dict(error, node=node))
        return parts, {
            "nodes": sorted(node for node, _ in parts),
            "partial": bool(errors),
            "missing_nodes": [e["node"] for e in errors if e["node"] is not None],
            "node_errors": errors,
        }

    async def _partOf(self, node: str, op: str, args: dict, fresh: bool) -> tuple:
        if not fresh:
            return None, {
                "code": "node_unavailable",
                "message": f"node {node} has not renewed its heartbeat for two "
                "heartbeat intervals",
            }
        try:
            answer = await self.remote.request(node, op, args, timeout=VIEW_TIMEOUT)
            return answerOrError(answer), None
        except NodeUnavailable:
            error = {"code": "node_unavailable", "message": f"node {node} is not running"}
        except NodeTimeout as e:
            error = {
                "code": "node_timeout",
                "message": f"node {node} did not answer within {e.timeout:g} s",
            }
        except StoreUnreachable as e:
            error = {
                "code": "store_unreachable",
                "message": f"cannot reach the store to ask node {node}: {e}",
            }
        except ApiError as e:
            error = {"code": e.code, "message": f"node {node}: {e.message}"}
        self.log.warn(
            "queue view {op}: no part from node {node}: {why}",
            op=op,
            node=node,
            why=error["message"],
        )
        return None, error

    def _malformed(self, cluster: dict, node: str, op: str) -> None:
        self.log.warn("queue view {op}: node {node} answered nonsense", op=op, node=node)
        cluster["partial"] = True
        cluster["nodes"].remove(node)
        cluster["missing_nodes"].append(node)
        cluster["node_errors"].append(
            {
                "node": node,
                "code": "internal_error",
                "message": f"node {node} answered nonsense to {op}",
            }
        )

    async def queueSummary(self, only: Optional[str] = None) -> dict:
        """
        The queue per recipient domain (C{only}: that domain): messages,
        recipients, queued / deferred / attempting, the oldest, the next
        attempt and the deferral replies; with other nodes sharing the
        store, summed over every node that answered (L{gather}), with the
        totals of each in C{per_node}.
        """
        here = await self.actions.summaryPart(only)
        parts, cluster = await self.gather("queueSummary", {"domain": only}, here)
        if cluster is None:
            return mergeSummaries([here])
        good, perNode = [], []
        for node, part in parts:
            try:
                summary = mergeSummaries([part])
            except (KeyError, TypeError, ValueError, AttributeError):
                self._malformed(cluster, node, "queueSummary")
                continue
            good.append(part)
            perNode.append(
                {
                    "node": node,
                    "messages": summary["messages"],
                    "recipients": summary["recipients"],
                }
            )
        document = mergeSummaries(good)
        document.update(cluster)
        document["per_node"] = sorted(perNode, key=lambda n: n["node"])
        return document

    async def queueMessages(
        self,
        domain: Optional[str],
        state: Optional[str],
        limit: int,
        cursor: Optional[str],
    ) -> dict:
        """
        One page of the queued messages with a recipient waiting (at
        C{domain}, in C{state}), oldest first (by received time, then
        queue id); with other nodes sharing the store, of every node that
        answered, each item naming its C{node} (L{mergePages}: the cursor
        is the last position, so that paging visits each message once).
        """
        after = None if cursor is None else decodeQueueCursor(cursor)
        here = await self.actions.pagePart(domain, state, limit, after)
        args = {
            "domain": domain,
            "state": state,
            "limit": limit,
            "after": None if after is None else list(after),
        }
        parts, cluster = await self.gather("queuePage", args, here)
        good = []
        for node, part in parts:
            try:
                mergePages([(node, part)], limit)
            except (KeyError, TypeError, ValueError, AttributeError):
                self._malformed(cluster, node, "queuePage")
                continue
            good.append((node, part))
        items, last = mergePages(good, limit)
        document = {
            "items": items,
            "next_cursor": None if last is None else encodeQueueCursor(last[0], last[1]),
        }
        if cluster is not None:
            document.update(cluster)
        return document

    async def retryDomain(self, domain: str) -> dict:
        """
        Attempt every waiting recipient at C{domain} now, here and, with
        other nodes sharing the store, on each of them: C{messages} is the
        sum, C{nodes} what each node woke and C{unanswered} the live nodes
        that did not answer in time (both only with other nodes).
        """
        here = self.actions.retryDomain(domain)
        if self.remote is None:
            return here
        try:
            live = await self.remote.liveNodes()
        except Exception as e:
            live = set()
            self.log.warn(
                "retrying {domain} on this node only: cannot read the live nodes ({why})",
                domain=domain,
                why=str(e) or type(e).__name__,
            )
        others = sorted(n for n in live if n != self.remote.node)
        answers = await gatherResults(
            [
                Deferred.fromCoroutine(self._retryDomainOn(node, domain))
                for node in others
            ]
        )
        nodes = {self.remote.node: here["messages"]}
        unanswered = []
        for node, count in zip(others, answers):
            if count is None:
                unanswered.append(node)
            else:
                nodes[node] = count
        return {
            "domain": domain,
            "messages": sum(nodes.values()),
            "nodes": nodes,
            "unanswered": unanswered,
        }

    async def _retryDomainOn(self, node: str, domain: str) -> Optional[int]:
        try:
            answer = await self.remote.request(node, "retryDomain", {"domain": domain})
            return int(answerOrError(answer)["messages"])
        except Exception as e:
            self.log.warn(
                "node {node} did not retry {domain}: {why}",
                node=node,
                domain=domain,
                why=str(e) or type(e).__name__,
            )
            return None

    async def retry(self, queue_id: str) -> dict:
        """
        Attempt a queued message's waiting recipients now, on the node
        that owns it (L{forward}).

        @raise ApiError: 404 if it is not queued, 409 if every waiting
            recipient is being attempted already; see L{forward}.
        """
        if self._isRemote(queue_id):
            return await self.forward(queue_id, "retry")
        return self.actions.retry(queue_id)

    async def delete(self, queue_id: str) -> dict:
        """
        Take a message out of the queue (its waiting recipients end
        C{expired}, reason C{deleted}), on the node that owns it.

        @raise ApiError: 404 if it is not queued, 409 while a delivery of
            it is in progress; see L{forward}.
        """
        if self._isRemote(queue_id):
            return await self.forward(queue_id, "delete")
        return await self.actions.delete(queue_id)

    def _isRemote(self, queue_id: str) -> bool:
        # A message in this node's queue is this node's, whatever its id
        # says (a node whose node_id was changed keeps its spool).
        return (
            self.remote is not None
            and self.scheduler.queuedMessage(queue_id) is None
            and self.remote.isElsewhere(queue_id)
        )

    async def forward(self, queue_id: str, op: str) -> dict:
        """
        Run C{op} (C{retry}, C{delete}) on the node whose id C{queue_id}
        starts with, through the store, and answer what it answers.

        @raise ApiError: what the owner answered, or 503 C{node_unavailable}
            (no live heartbeat of the owner), 504 C{node_timeout} (no answer
            in time), 503 C{store_unreachable}.
        """
        node = ownerOf(queue_id)
        try:
            answer = await self.remote.request(node, op, {"queue_id": queue_id})
        except NodeUnavailable:
            raise ApiError(
                503,
                "node_unavailable",
                f"{queue_id} belongs to node {node}, which is not running (no heartbeat "
                f"in the store): only that node can {op} it",
            ) from None
        except NodeTimeout as e:
            raise ApiError(
                504,
                "node_timeout",
                f"node {node}, which owns {queue_id}, did not answer within "
                f"{e.timeout:g} s; the {op} may still happen there",
            ) from None
        except StoreUnreachable as e:
            raise ApiError(
                503,
                "store_unreachable",
                f"cannot reach the store to ask node {node}, which owns {queue_id}: {e}",
            ) from None
        return answerOrError(answer)

    async def localCommand(self, op: str, args: dict) -> dict:
        """
        Run a command another node sent for this node's queue
        (L{smartrelay.cluster.commands.NodeCommands}'s handler): the answer
        the same request made here would get, as C{{"status", "body"}}.
        """
        return await self.actions.answer(op, args)

    def destinations(self) -> list:
        """
        This node's destinations' state (limits, adaptive throttle), sorted.
        """
        return sorted(
            (_destination(state) for state in self.actions.destinationsPart()),
            key=lambda d: d["destination"],
        )

    async def clusterDestinations(self) -> dict:
        """
        The destinations' state of this node and, with other nodes sharing
        the store, of every node that answered (L{gather}): each item names
        its C{node}; sorted by destination, then node.
        """
        here = self.actions.destinationsPart()
        parts, cluster = await self.gather("destinations", {}, {"items": here})
        if cluster is None:
            return {"items": self.destinations(), "next_cursor": None}
        items = []
        for node, part in parts:
            try:
                mine = [dict(_destination(state), node=node) for state in part["items"]]
            except (KeyError, TypeError, ValueError, AttributeError):
                self._malformed(cluster, node, "destinations")
                continue
            items.extend(mine)
        items.sort(key=lambda d: (d["destination"], d["node"]))
        document = {"items": items, "next_cursor": None}
        document.update(cluster)
        return document


def _destination(state: dict) -> dict:
    state = dict(state)
    state["destination"] = str(state["destination"])
    state["throttle_until"] = optionalTime(state.get("throttle_until"))
    state["suspended_until"] = optionalTime(state.get("suspended_until"))
    return state
