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
the same on every node sharing a Redis store; the queue is each node's
spool, but the queue views gather every live node's part (naming the
nodes that did not answer), and a retry or delete of a message queued on
another node is sent to that node (L{smartrelay.cluster.commands}) and
answered as it answers.

Mount it with the other applications of the site
(L{smartrelay.web.site.SiteRoot}): C{{b"api": app.resource()}}.
"""

import functools
import hmac
import json
import math
import re
from typing import Any

import attrs
from klein import Klein
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.resource import Resource
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound
from werkzeug.routing import BaseConverter

from smartrelay.ratelimit import FailureLimiter, clientKey
from smartrelay.store.interfaces import (
    INTERVALS,
    IStore,
    SUPPRESSION_REASONS,
    InvalidCursor,
)
from smartrelay.web.apirequest import (
    eventFilters,
    ApiError,
    Query,
    badParameter,
    checkAddress,
    checkQueueID,
    csvItems,
    importEntries,
    notFound,
    parseTime,
    suppressionEntry,
)
from smartrelay.web.proxies import clientAddress
from smartrelay.web.queries import (
    COMPLAINT_RATE_LIMIT,
    MAX_REASON_SCAN,
    MAX_SCAN,
    QUEUE_SLICE,
    MessageReader,
    Queries,
    QueueControl,
    suppressionCSV,
)

__all__ = [
    "ApiApp",
    "ApiError",
    "COMPLAINT_RATE_LIMIT",
    "MAX_REASON_SCAN",
    "MAX_SCAN",
    "MessageReader",
    "QUEUE_SLICE",
    "QueueControl",
    "parseTime",
]

#: Largest request body (a bulk import), in bytes.
MAX_BODY = 16 * 1024 * 1024


#: Most entries one bulk import may hold.
MAX_IMPORT = 100_000

#: Wrong tokens from one client within the window that lock it out.
AUTH_FAILURES = 10
AUTH_WINDOW = 60.0
AUTH_LOCKOUT = 300.0


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
    @ivar remote: reaches the other nodes for retries, deletes and the
        queue views (L{smartrelay.cluster.commands.NodeCommands}), or
        L{None} (one node).
    @ivar queries: what the routes read and do
        (L{smartrelay.web.queries.Queries}, shared with the reports UI);
        built over the four above unless given.
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
    remote: Any = None
    queries: Queries = attrs.field(
        default=attrs.Factory(
            lambda self: Queries(
                self.store, self.scheduler, self.spool, self.clock, remote=self.remote
            ),
            takes_self=True,
        )
    )

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
        return await self.queries.message(queue_id)

    # -- events ------------------------------------------------------------

    @endpoint("/api/v1/events")
    async def events(self, request):
        query = Query(
            request,
            ("type", "queue_id", "recipient", "tag", "domain", "since", "until", "cursor", "limit"),
        )
        filters, domain = eventFilters(query)
        return await self.queries.events(filters, domain, query.limit(), query.cursor())

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
        return await self.queries.stats(
            since, until, interval, tag=query.text("tag"), domain=query.domain()
        )

    # -- suppressions ------------------------------------------------------

    @endpoint("/api/v1/suppressions")
    async def suppressions(self, request):
        query = Query(request, ("q", "reason", "cursor", "limit"))
        return await self.queries.suppressions(
            query.text("q"),
            query.choice("reason", SUPPRESSION_REASONS),
            query.cursor(),
            query.limit(),
        )

    @endpoint("/api/v1/suppressions", methods=("POST",))
    async def addSuppression(self, request):
        Query(request, ())
        body = self._json(request)
        if not isinstance(body, dict):
            raise ApiError(400, "bad_json", "the body must be a JSON object")
        entry = suppressionEntry(body, self.clock.seconds(), "manual")
        return Answer(201, await self.queries.addSuppression(entry))

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
        # Every entry is checked before the first is added: a bad line
        # imports nothing.
        entries = importEntries(items, now, reason, MAX_IMPORT)
        return {"imported": await self.queries.addSuppressions(entries)}

    @endpoint("/api/v1/suppressions/export")
    async def exportSuppressions(self, request):
        query = Query(request, ("format", "q", "reason"))
        form = query.choice("format", ("json", "csv"), "json")
        entries = await self.queries.allSuppressions(
            query.text("q"), query.choice("reason", SUPPRESSION_REASONS)
        )
        if form == "json":
            return {"items": entries, "next_cursor": None}
        return Answer(
            200,
            suppressionCSV(entries),
            b"text/csv; charset=utf-8",
            {b"Content-Disposition": b'attachment; filename="suppressions.csv"'},
        )

    @endpoint("/api/v1/suppressions/<address:address>")
    async def suppression(self, request, address: str):
        Query(request, ())
        return await self.queries.suppression(checkAddress(address))

    @endpoint("/api/v1/suppressions/<address:address>", methods=("DELETE",))
    async def removeSuppression(self, request, address: str):
        Query(request, ())
        return await self.queries.removeSuppression(checkAddress(address))

    # -- queue -------------------------------------------------------------

    @endpoint("/api/v1/queue")
    async def queueSummary(self, request):
        query = Query(request, ("domain",))
        return await self.queries.queueSummary(query.domain())

    @endpoint("/api/v1/queue/messages")
    async def queueMessages(self, request):
        query = Query(request, ("domain", "state", "cursor", "limit"))
        return await self.queries.queueMessages(
            query.domain(),
            query.choice("state", ("queued", "deferred")),
            query.limit(),
            query.cursor(),
        )

    @endpoint("/api/v1/queue/retry", methods=("POST",))
    async def retryDomain(self, request):
        query = Query(request, ("domain",))
        domain = query.domain()
        if domain is None:
            raise badParameter("domain", "required: the recipient domain to retry")
        return await self.queries.retryDomain(domain)

    @endpoint("/api/v1/queue/<queueid:queue_id>/retry", methods=("POST",))
    async def retry(self, request, queue_id: str):
        Query(request, ())
        checkQueueID(queue_id)
        return Answer(202, await self.queries.retry(queue_id))

    @endpoint("/api/v1/queue/<queueid:queue_id>", methods=("DELETE",))
    async def delete(self, request, queue_id: str):
        Query(request, ())
        checkQueueID(queue_id)
        return await self.queries.delete(queue_id)

    @endpoint("/api/v1/destinations")
    async def destinations(self, request):
        Query(request, ())
        return await self.queries.clusterDestinations()

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
