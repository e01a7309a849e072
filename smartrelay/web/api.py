"""
The operator's HTTP API under C{/api/v1/} (DESIGN section 1.6; every route,
parameter and answer is in C{docs/api.md}, and C{GET /api/v1/openapi.json}
describes them as OpenAPI 3.1).

Every answer is JSON (the CSV export aside); an error is C{{"error":
{"code": ..., "message": ...}}} with a 4xx or 5xx status, and a bad query
value names the parameter (C{"parameter"} in the error object).  Every route
but C{openapi.json} needs C{Authorization: Bearer <token>}, one of C{[web]
api_tokens}, compared in constant time; wrong tokens are counted per client
address (L{smartrelay.ratelimit.FailureLimiter}) and a client with too many
is refused for a while with C{429}.  With no tokens configured the API
answers C{403} C{api_disabled}.

Lists take C{limit} (default 100, at most 1000) and C{cursor}, and answer
C{{"items": [...], "next_cursor": ... | null}}.

What comes from the store (events, statistics, the suppression list) is
the same on every node sharing a Redis store; the queue is this node's
spool.

Mount it with the other applications of the site
(L{smartrelay.web.site.SiteRoot}): C{{b"api": app.resource()}}.
"""

import csv
import functools
import hmac
import io
import json
import math
import re
from typing import Any, Optional, Protocol

import attrs
from klein import Klein
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.web.resource import Resource
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound
from werkzeug.routing import BaseConverter

from smartrelay.events import EVENT_TYPES, rfc3339
from smartrelay.message import SpoolEntry
from smartrelay.outbound.scheduler import DeliveryInProgress
from smartrelay.ratelimit import FailureLimiter, clientKey
from smartrelay.store.interfaces import (
    INTERVALS,
    IStore,
    MAX_LIMIT,
    SUPPRESSION_REASONS,
    InvalidCursor,
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
    MAX_SECONDS,
    ApiError,
    Query,
    badParameter,
    checkAddress,
    checkQueueID,
    csvItems,
    decodeQueueCursor,
    encodeQueueCursor,
    notFound,
    parseTime,
)
from smartrelay.web.proxies import clientAddress

__all__ = ["ApiApp", "ApiError", "COMPLAINT_RATE_LIMIT", "parseTime"]

#: The complaint rate Gmail and Yahoo require senders to stay below
#: (their 2024 sender requirements): 0.3 %.
COMPLAINT_RATE_LIMIT = 0.003

#: Largest request body (a bulk import), in bytes.
MAX_BODY = 16 * 1024 * 1024


#: Most entries one bulk import may hold.
MAX_IMPORT = 100_000

#: Wrong tokens from one client within the window that lock it out.
AUTH_FAILURES = 10
AUTH_WINDOW = 60.0
AUTH_LOCKOUT = 300.0

#: A filter the store cannot apply (C{domain} on events) is applied here,
#: reading at most this many events per request; the page may then hold
#: fewer than C{limit} items, with a C{next_cursor} to go on.
MAX_SCAN = 20_000

#: Bounced events read per statistics request to count bounce reasons.
MAX_REASON_SCAN = 100_000

class QueueControl(Protocol):
    """
    What the API reads and does to this node's queue: the methods of
    L{smartrelay.outbound.scheduler.DeliveryScheduler} it uses.
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


#: Queued messages looked at per reactor turn by the queue routes.
QUEUE_SLICE = 2000

#: The widest statistics range, in buckets.
MAX_BUCKETS = 24 * 400


_JSON = b"application/json; charset=utf-8"

_HEADERS = {
    b"Cache-Control": b"no-store",
    b"X-Content-Type-Options": b"nosniff",
}


@attrs.frozen
class Answer:
    """
    A successful answer that is not a plain C{200} JSON document.
    """

    status: int = 200
    body: Any = None
    contentType: bytes = _JSON
    headers: dict = attrs.field(factory=dict)


class _QueueIDConverter(BaseConverter):
    """
    A queue id in a path: two characters, a slash (as it is or C{%2F}),
    and more; checked in the handler, so that a malformed id is a C{400}
    naming it.  Static routes such as C{/queue/retry} never match it.
    """

    regex = r"[^/]{2}/[^/]+"
    part_isolating = False


class _AddressConverter(BaseConverter):
    """
    An address in a path: something with an C{@} (slashes allowed, plain
    or C{%2F}), checked in the handler.  C{/suppressions/import} and
    C{/suppressions/export} never match it.
    """

    regex = r".*@.*"
    part_isolating = False


#: The routes of L{ApiApp} (its C{app}).
_app = Klein()
_app.url_map.converters["queueid"] = _QueueIDConverter
_app.url_map.converters["address"] = _AddressConverter


def endpoint(path: str, methods=("GET",), public: bool = False):
    """
    Register an C{async} handler as an API route: authorised first (unless
    C{public}), its result (a JSON-able value or an L{Answer}) encoded,
    every failure turned into a JSON error.
    """

    def decorate(handler):
        @functools.wraps(handler)
        def route(self, request, **kwargs):
            return self._serve(request, handler, kwargs, public)

        return _app.route(path, methods=list(methods))(route)

    return decorate


@attrs.define(slots=False)
class ApiApp:
    """
    The Klein application of C{/api/v1/}.

    @ivar store: an L{smartrelay.store.interfaces.IStore}.
    @ivar scheduler: the L{smartrelay.outbound.scheduler.DeliveryScheduler}
        (C{queuedMessages}, C{queuedMessage}, C{attempting},
        C{lastDeferral}, C{retryNow}, C{retryDomain}, C{delete},
        C{destinations}).
    @ivar spool: C{readMessage(entry) -> Deferred[bytes]} (the headers of a
        queued message).
    @ivar clock: an L{IReactorTime}.
    @ivar tokens: the accepted bearer tokens; empty: the API is disabled.
    @ivar trustedProxies: networks whose C{X-Forwarded-For} is believed.
    @ivar limiter: counts wrong tokens per client address.
    """

    store: IStore
    scheduler: QueueControl
    spool: MessageReader
    clock: IReactorTime
    tokens: tuple = ()
    trustedProxies: tuple = ()
    limiter: FailureLimiter = attrs.field(
        default=attrs.Factory(
            lambda self: FailureLimiter(self.clock, AUTH_FAILURES, AUTH_WINDOW, AUTH_LOCKOUT),
            takes_self=True,
        )
    )
    maxBody: int = MAX_BODY

    app = _app
    log = Logger()

    def resource(self) -> Resource:
        """
        The Twisted Web resource serving this application.
        """
        return _GuardedResource(self.app.resource())

    # -- serving -----------------------------------------------------------

    def _serve(self, request, handler, kwargs: dict, public: bool) -> Deferred:
        async def run():
            if not public:
                self._authorize(request)
            return await handler(self, request, **kwargs)

        d = Deferred.fromCoroutine(run())
        return d.addCallbacks(
            lambda result: self._answer(request, result),
            lambda failure: self._failed(request, failure),
        )

    def _answer(self, request, result) -> bytes:
        if not isinstance(result, Answer):
            result = Answer(body=result)
        for name, value in result.headers.items():
            request.setHeader(name, value)
        if result.contentType == _JSON:
            return _write(request, result.status, result.body)
        request.setResponseCode(result.status)
        for name, value in _HEADERS.items():
            request.setHeader(name, value)
        request.setHeader(b"Content-Type", result.contentType)
        body = result.body
        request.setHeader(b"Content-Length", b"%d" % (len(body),))
        return body

    def _failed(self, request, failure) -> bytes:
        if failure.check(ApiError):
            error = failure.value
        elif failure.check(InvalidCursor):
            error = badParameter("cursor", "not a cursor this API handed out")
        else:
            self.log.failure(
                "API error serving {method} {path}",
                failure,
                method=request.method.decode("ascii", "replace"),
                path=request.path.decode("ascii", "replace"),
            )
            error = ApiError(500, "internal_error", "internal error; see the relay's log")
        for name, value in error.headers.items():
            request.setHeader(name, value)
        return _write(request, error.status, error.body())

    def _authorize(self, request) -> None:
        if not self.tokens:
            raise ApiError(
                403,
                "api_disabled",
                "the API is disabled: no [web] api_tokens are configured",
            )
        client = clientAddress(request, self.trustedProxies) or "unknown"
        key = clientKey(client)
        wait = self.limiter.retryAfter(key)
        if wait > 0:
            raise ApiError(
                429,
                "too_many_failures",
                "too many requests with a wrong token from this address; try later",
                headers={b"Retry-After": b"%d" % (math.ceil(wait),)},
            )
        challenge = {b"WWW-Authenticate": b'Bearer realm="smartrelay"'}
        header = request.getHeader(b"authorization")
        if header is None:
            raise ApiError(
                401,
                "unauthorized",
                "this API needs an Authorization: Bearer <token> header",
                headers=challenge,
            )
        scheme, _, given = header.strip().partition(b" ")
        given = given.strip()
        if scheme.lower() != b"bearer" or not given:
            raise ApiError(
                401,
                "unauthorized",
                "the Authorization header must be: Bearer <token>",
                headers=challenge,
            )
        # Compare with every token, in constant time each.
        matched = False
        for token in self.tokens:
            matched |= hmac.compare_digest(given, token.encode("utf-8"))
        if not matched:
            self.limiter.attempt(key)
            counted = self.limiter.failed(key)
            if counted.locked:
                self.log.warn(
                    "API: {client} locked out for {lockout:g}s after {count} wrong tokens",
                    client=client,
                    lockout=self.limiter.lockout,
                    count=counted.failures,
                )
            raise ApiError(
                401,
                "invalid_token",
                "the bearer token is not one of [web] api_tokens",
                headers=challenge,
            )

    def _body(self, request) -> bytes:
        if getattr(request, "bodyTooLarge", False):
            # The site dropped it (smartrelay.web.site.BoundedRequest).
            raise self._tooLarge()
        declared = request.getHeader(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.maxBody:
            raise self._tooLarge()
        content = request.content
        if content is None:
            return b""
        content.seek(0)
        data = content.read(self.maxBody + 1)
        if len(data) > self.maxBody:
            raise self._tooLarge()
        return data

    def _tooLarge(self) -> ApiError:
        return ApiError(
            413,
            "too_large",
            f"the request body is larger than {self.maxBody} bytes",
        )

    def _json(self, request) -> Any:
        data = self._body(request)
        try:
            return json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise ApiError(400, "bad_json", f"the body is not JSON: {e}") from None

    # -- messages ----------------------------------------------------------

    @endpoint("/api/v1/messages/<queueid:queue_id>")
    async def message(self, request, queue_id: str):
        Query(request, ())
        checkQueueID(queue_id)
        entry = self.scheduler.queuedMessage(queue_id)
        events = await maybeDeferred(self.store.eventsForMessage, queue_id)
        if entry is None and not events:
            raise notFound(f"no message {queue_id} (in the queue or the events)")
        eventJSON = [event.asDict() for event in events]
        if entry is not None:
            headers = None
            try:
                data = await maybeDeferred(self.spool.readMessage, entry)
            except Exception:
                self.log.failure("API: could not read {queue_id} from the spool", queue_id=queue_id)
            else:
                headers = headerBlock(data)
            return {
                "queue_id": queue_id,
                "queued": True,
                "envelope": envelope(entry),
                "recipients": self._queuedRecipients(entry, events),
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

    def _queuedRecipients(self, entry, events: tuple = ()) -> list:
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

    # -- events ------------------------------------------------------------

    @endpoint("/api/v1/events")
    async def events(self, request):
        query = Query(
            request,
            ("type", "queue_id", "recipient", "tag", "domain", "since", "until", "cursor", "limit"),
        )
        filters = {
            "type": query.choice("type", EVENT_TYPES),
            "queue_id": query.text("queue_id"),
            "recipient": query.text("recipient"),
            "tag": query.text("tag"),
            "since": query.time("since"),
            "until": query.time("until"),
        }
        if filters["queue_id"] is not None:
            checkQueueID(filters["queue_id"])
        if filters["recipient"] is not None:
            checkAddress(filters["recipient"], "recipient")
        domain = query.domain()
        limit = query.limit()
        cursor = query.cursor()
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

    @endpoint("/api/v1/stats")
    async def stats(self, request):
        query = Query(request, ("from", "to", "interval", "tag", "domain"))
        interval = query.choice("interval", INTERVALS, "hour")
        size = INTERVALS[interval]
        now = self.clock.seconds()
        until = query.time("to", now)
        since = query.time("from", until - (86400 if interval == "hour" else 30 * 86400))
        if since >= until:
            raise badParameter("from", "must be before to")
        if (until - since) / size > MAX_BUCKETS:
            raise badParameter(
                "from", f"the range holds more than {MAX_BUCKETS} {interval}s; use interval=day"
            )
        tag = query.text("tag")
        domain = query.domain()
        stats = await maybeDeferred(
            self.store.statistics,
            since=since,
            until=until,
            interval=interval,
            tag=tag,
            domain=domain,
        )
        reasons, complete = await self._bounceReasons(since, until, size, tag, domain)
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

    async def _bounceReasons(self, since, until, size, tag, domain) -> tuple:
        """
        Bounced events per bucket and reason, read from the events still
        kept (C{[store] retention}), at most L{MAX_REASON_SCAN}.

        @return: ({bucket start: {reason: count}}, whether every bounce in
            the range was read).
        """
        reasons: dict = {}
        cursor = None
        scanned = 0
        start = bucketStart(since, size)
        while True:
            page = await maybeDeferred(
                self.store.queryEvents,
                type="bounced",
                tag=tag,
                since=start,
                until=until,
                cursor=cursor,
                limit=MAX_LIMIT,
            )
            for event in page.events:
                if domain is not None and recipientDomain(event.recipient) != domain:
                    continue
                reason = (event.detail or {}).get("reason") or "undefined"
                counts = reasons.setdefault(bucketStart(event.time, size), {})
                counts[reason] = counts.get(reason, 0) + 1
            scanned += len(page.events)
            cursor = page.cursor
            if cursor is None:
                return reasons, True
            if scanned >= MAX_REASON_SCAN:
                return reasons, False

    # -- suppressions ------------------------------------------------------

    @endpoint("/api/v1/suppressions")
    async def suppressions(self, request):
        query = Query(request, ("q", "reason", "cursor", "limit"))
        page = await maybeDeferred(
            self.store.listSuppressions,
            prefix=query.text("q"),
            reason=query.choice("reason", SUPPRESSION_REASONS),
            cursor=query.cursor(),
            limit=query.limit(),
        )
        return {
            "items": [suppressionJSON(entry) for entry in page.entries],
            "next_cursor": page.cursor,
        }

    @endpoint("/api/v1/suppressions", methods=("POST",))
    async def addSuppression(self, request):
        Query(request, ())
        body = self._json(request)
        if not isinstance(body, dict):
            raise ApiError(400, "bad_json", "the body must be a JSON object")
        entry = self._entryFrom(body, self.clock.seconds(), "manual")
        await maybeDeferred(self.store.addSuppression, entry)
        return Answer(201, suppressionJSON(entry))

    def _entryFrom(self, item: dict, now: float, reason: str, where: str = "") -> SuppressionEntry:
        unknown = set(item) - {"address", "reason", "expires"}
        if unknown:
            raise badParameter(f"{where}{sorted(unknown)[0]}", "unknown field")
        address = item.get("address")
        if not isinstance(address, str):
            raise badParameter(f"{where}address", "required: an e-mail address")
        address = checkAddress(address, f"{where}address")
        reason = item.get("reason", reason)
        if not isinstance(reason, str) or reason not in SUPPRESSION_REASONS:
            raise badParameter(
                f"{where}reason",
                f"must be one of {', '.join(sorted(SUPPRESSION_REASONS))}, not {reason!r}",
            )
        expires = item.get("expires")
        if expires is not None:
            try:
                if isinstance(expires, bool) or not isinstance(expires, (int, float, str)):
                    raise ValueError("expected a time, POSIX seconds or null")
                if isinstance(expires, str):
                    expires = parseTime(expires)
                elif not 0 <= expires <= MAX_SECONDS:
                    raise ValueError(f"POSIX seconds from 0 to {MAX_SECONDS:.0f}")
                expires = float(expires)
            except ValueError as e:
                raise badParameter(f"{where}expires", str(e)) from None
        return SuppressionEntry(address=address, reason=reason, time=now, expires=expires)

    @endpoint("/api/v1/suppressions/import", methods=("POST",))
    async def importSuppressions(self, request):
        query = Query(request, ("reason",))
        reason = query.choice("reason", SUPPRESSION_REASONS, "manual")
        contentType = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
        now = self.clock.seconds()
        if contentType in (b"text/csv", b"application/csv"):
            items = csvItems(self._body(request))
        elif contentType in (b"application/json", b""):
            body = self._json(request)
            if isinstance(body, dict) and set(body) == {"items"}:
                body = body["items"]
            if not isinstance(body, list):
                raise ApiError(
                    400, "bad_json", 'the body must be a JSON array or {"items": [...]}'
                )
            items = body
        else:
            raise ApiError(
                415,
                "unsupported_media_type",
                "send text/csv or application/json",
            )
        if len(items) > MAX_IMPORT:
            raise ApiError(413, "too_large", f"at most {MAX_IMPORT} entries per import")
        entries = []
        for number, item in enumerate(items, 1):
            if isinstance(item, str):
                item = {"address": item}
            if not isinstance(item, dict):
                raise badParameter(f"items[{number}]", "must be an object or an address")
            entries.append(self._entryFrom(item, now, reason, f"items[{number}]."))
        # Every entry is checked before the first is added: a bad line
        # imports nothing.  A few at a time: the store takes them in order.
        for start in range(0, len(entries), 100):
            await gatherResults(
                [
                    maybeDeferred(self.store.addSuppression, entry)
                    for entry in entries[start : start + 100]
                ],
                consumeErrors=True,
            )
        return {"imported": len(entries)}

    @endpoint("/api/v1/suppressions/export")
    async def exportSuppressions(self, request):
        query = Query(request, ("format", "q", "reason"))
        form = query.choice("format", ("json", "csv"), "json")
        prefix = query.text("q")
        reason = query.choice("reason", SUPPRESSION_REASONS)
        entries = []
        cursor = None
        while True:
            page = await maybeDeferred(
                self.store.listSuppressions,
                prefix=prefix,
                reason=reason,
                cursor=cursor,
                limit=MAX_LIMIT,
            )
            entries.extend(suppressionJSON(entry) for entry in page.entries)
            cursor = page.cursor
            if cursor is None:
                break
        if form == "json":
            return {"items": entries, "next_cursor": None}
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\r\n")
        fields = ["address", "reason", "source_event", "time", "expires"]
        writer.writerow(fields)
        for entry in entries:
            writer.writerow(["" if entry[f] is None else entry[f] for f in fields])
        return Answer(
            200,
            out.getvalue().encode("utf-8"),
            b"text/csv; charset=utf-8",
            {b"Content-Disposition": b'attachment; filename="suppressions.csv"'},
        )

    @endpoint("/api/v1/suppressions/<address:address>")
    async def suppression(self, request, address: str):
        Query(request, ())
        normalised = checkAddress(address)
        found = await maybeDeferred(
            self.store.checkSuppressions, [normalised], float("-inf")
        )
        if normalised not in found:
            raise notFound(f"{normalised} is not on the suppression list")
        return suppressionJSON(found[normalised])

    @endpoint("/api/v1/suppressions/<address:address>", methods=("DELETE",))
    async def removeSuppression(self, request, address: str):
        Query(request, ())
        normalised = checkAddress(address)
        removed = await maybeDeferred(self.store.removeSuppression, normalised)
        if not removed:
            raise notFound(f"{normalised} is not on the suppression list")
        return {"address": normalised, "removed": True}

    # -- queue -------------------------------------------------------------

    async def _breathe(self, count: int) -> None:
        """
        Every L{QUEUE_SLICE} messages of a walk over the queue, let the
        reactor run (a big queue is summed in many reactor turns, not one
        long one; the walk reads the list taken at its start).
        """
        if count and not count % QUEUE_SLICE:
            await deferLater(self.clock, 0, lambda: None)

    @endpoint("/api/v1/queue")
    async def queueSummary(self, request):
        query = Query(request, ("domain",))
        only = query.domain()
        domains: dict = {}
        messages = 0
        for count, entry in enumerate(self.scheduler.queuedMessages()):
            await self._breathe(count)
            attempting = self.scheduler.attempting(entry.queue_id)
            seen: set = set()
            for recipient in entry.pending():
                domain = recipientDomain(recipient.address) or ""
                if only is not None and domain != only:
                    continue
                summary = domains.setdefault(
                    domain,
                    {
                        "domain": domain,
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
                        text = f"{deferral.get('code')} {deferral.get('status')} {deferral.get('reply')}"
                    summary["reasons"][text] = summary["reasons"].get(text, 0) + 1
                else:
                    summary["queued"] += 1
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

    @endpoint("/api/v1/queue/messages")
    async def queueMessages(self, request):
        query = Query(request, ("domain", "state", "cursor", "limit"))
        domain = query.domain()
        state = query.choice("state", ("queued", "deferred"))
        limit = query.limit()
        cursor = query.cursor()
        after = None if cursor is None else decodeQueueCursor(cursor)
        items = []
        nextCursor = None
        for count, entry in enumerate(self.scheduler.queuedMessages()):
            await self._breathe(count)
            position = (entry.received, entry.queue_id)
            if after is not None and position <= after:
                continue
            pending = [
                r
                for r in entry.pending()
                if (domain is None or recipientDomain(r.address) == domain)
                and (state is None or r.state == state)
            ]
            if not pending:
                continue
            if len(items) == limit:
                last = items[-1]
                nextCursor = encodeQueueCursor(last["_position"][0], last["_position"][1])
                break
            item = queueItem(entry, self._queuedRecipients(entry))
            item["_position"] = position
            items.append(item)
        for item in items:
            del item["_position"]
        return {"items": items, "next_cursor": nextCursor}

    @endpoint("/api/v1/queue/retry", methods=("POST",))
    async def retryDomain(self, request):
        query = Query(request, ("domain",))
        domain = query.domain()
        if domain is None:
            raise badParameter("domain", "required: the recipient domain to retry")
        return {"domain": domain, "messages": self.scheduler.retryDomain(domain)}

    @endpoint("/api/v1/queue/<queueid:queue_id>/retry", methods=("POST",))
    async def retry(self, request, queue_id: str):
        Query(request, ())
        checkQueueID(queue_id)
        entry = self.scheduler.queuedMessage(queue_id)
        if entry is None:
            raise notFound(f"{queue_id} is not in the queue")
        if not self.scheduler.retryNow(queue_id):
            raise ApiError(
                409,
                "in_progress",
                f"{queue_id}: every waiting recipient is being attempted already",
            )
        return Answer(
            202,
            {
                "queue_id": queue_id,
                "retrying": sorted(self.scheduler.attempting(queue_id)),
            },
        )

    @endpoint("/api/v1/queue/<queueid:queue_id>", methods=("DELETE",))
    async def delete(self, request, queue_id: str):
        Query(request, ())
        checkQueueID(queue_id)
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

    @endpoint("/api/v1/destinations")
    async def destinations(self, request):
        Query(request, ())
        items = []
        for state in self.scheduler.destinations():
            state = dict(state)
            state["throttle_until"] = optionalTime(state.get("throttle_until"))
            items.append(state)
        items.sort(key=lambda d: d["destination"])
        return {"items": items, "next_cursor": None}

    # -- the description ---------------------------------------------------

    @endpoint("/api/v1/openapi.json", public=True)
    async def openapi(self, request):
        Query(request, ())
        from smartrelay.web.openapi import document

        return document()

    # -- errors outside the handlers ---------------------------------------

    @app.handle_errors(NotFound)
    def notFoundError(self, request, failure) -> bytes:
        return _write(request, 404, notFound("no such API route").body())

    @app.handle_errors(MethodNotAllowed)
    def methodNotAllowed(self, request, failure) -> bytes:
        allowed = failure.value.valid_methods or []
        if allowed:
            request.setHeader(b"Allow", ", ".join(allowed).encode("ascii"))
        error = ApiError(
            405,
            "method_not_allowed",
            f"this route takes {', '.join(allowed)}",
        )
        return _write(request, 405, error.body())

    @app.handle_errors(HTTPException)
    def otherHTTPError(self, request, failure) -> bytes:
        error = failure.value
        code = re.sub(r"[^a-z]+", "_", (error.name or "error").lower()).strip("_")
        return _write(request, error.code, ApiError(error.code, code, error.name).body())

    @app.handle_errors
    def internalError(self, request, failure) -> bytes:
        self.log.failure("API error", failure)
        return _write(
            request,
            500,
            ApiError(500, "internal_error", "internal error; see the relay's log").body(),
        )


def _write(request, status: int, body: Any) -> bytes:
    data = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    request.setResponseCode(status)
    for name, value in _HEADERS.items():
        request.setHeader(name, value)
    request.setHeader(b"Content-Type", _JSON)
    request.setHeader(b"Content-Length", b"%d" % (len(data),))
    return data


class _GuardedResource(Resource):
    """
    Answers requests whose path or host is not UTF-8 (which Klein refuses
    with a bare 400 and a logged error) with a JSON 400.
    """

    isLeaf = True

    def __init__(self, inner: Resource) -> None:
        super().__init__()
        self._inner = inner

    def render(self, request):
        try:
            (b"/" + b"/".join(request.postpath)).decode("utf-8")
            request.getRequestHostname().decode("utf-8")
        except UnicodeDecodeError:
            return _write(
                request, 400, ApiError(400, "bad_request", "the path is not UTF-8").body()
            )
        return self._inner.render(request)
