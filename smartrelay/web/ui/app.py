"""
The reports UI (DESIGN section 1.6: C{GET /} and below): a Klein
application of server-rendered pages over the same query layer as the API
(L{smartrelay.web.queries.Queries}).

What every request goes through (L{UiApp._serve}):

  - the security headers (L{smartrelay.web.ui.guard.SECURITY_HEADERS}: a
    Content-Security-Policy without any script, C{nosniff}, no framing);
  - the session: a cookie (HttpOnly, SameSite=Lax, Secure over https or
    behind a trusted proxy saying https) naming a server-side session
    (L{smartrelay.web.ui.sessions.Sessions}); a page without one sends the
    browser to C{/login};
  - for every C{POST}: C{Origin} / C{Sec-Fetch-Site} must say our own
    origin, and the form's C{csrf} field must be the session's token
    (before logging in, the token bound to the login cookie); otherwise
    C{403} and nothing is done.

Logins are checked against C{[web] users_file} (the format of
C{smartrelay passwd}, shared with SMTP AUTH) by a
L{smartrelay.auth.HashedPasswordChecker}, and failures are limited per
client address and per user name by a L{smartrelay.ratelimit.LoginLimiter}.

Pages answer a L{smartrelay.web.ui.html.Page}; every table on a page can
be downloaded with C{?format=csv&table=NAME} (the same query otherwise).
"""

import functools
import hashlib
import hmac
import math
import os
import re
import secrets
from typing import Any, Optional
from urllib.parse import urlencode

import attrs
from klein import Klein
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.web.resource import Resource
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound
from werkzeug.routing import BaseConverter

from smartrelay.ratelimit import LoginLimited, LoginLimiter
from smartrelay.web.apirequest import ApiError, badParameter
from smartrelay.web.proxies import clientAddress
from smartrelay.web.queries import Queries
from smartrelay.web.ui import manage, pages
from smartrelay.web.ui.domains import DomainChecks
from smartrelay.web.ui.guard import (
    SESSION_COOKIE,
    cookieHeader,
    isHTTPS,
    readCookie,
    sameOrigin,
    setSecurityHeaders,
    tokensMatch,
)
from smartrelay.web.ui.html import Download, Page, Redirect, csvBytes, layout, render
from smartrelay.web.ui.sessions import Session, Sessions

__all__ = ["UiApp", "makeLoginLimiter"]

#: The cookie binding the login form's token before there is a session.
LOGIN_COOKIE = b"smartrelay_login"

#: The longest password and user name looked at.
MAX_PASSWORD = 1024
MAX_USER = 200

_HTML = b"text/html; charset=utf-8"
_STATIC = os.path.join(os.path.dirname(__file__), "static")

# The style sheet (a few kilobytes shipped with the package), read once
# when the module is imported, never on the reactor thread.
with open(os.path.join(_STATIC, "ui.css"), "rb") as _file:
    _STYLESHEET = _file.read()


def makeLoginLimiter(clock) -> LoginLimiter:
    """
    The web login's failure policy: 10 failures of a client address in 15
    minutes, 100 of a user name in an hour, then 15 minutes locked out; 1 s
    before a failure is answered, doubling up to 15 s.
    """
    return LoginLimiter(
        clock,
        clientRate=(10, 900.0),
        userRate=(100, 3600.0),
        lockout=900.0,
        delay=1.0,
        maxDelay=15.0,
        service="web login",
    )


@attrs.frozen
class _Raw:
    """
    Bytes answered as they are (the style sheet), headers set by the
    handler.
    """

    body: bytes


@attrs.define
class Context:
    """
    One request as a page handler sees it.

    @ivar session: the live session, or L{None}.
    @ivar https: whether the browser used https.
    """

    request: Any
    session: Optional[Session]
    https: bool

    def field(self, name: str, limit: int = 4096) -> Optional[str]:
        """
        A form field (of the body or the query) as text; L{None} if absent.

        @raise ApiError: 400 if given twice, not UTF-8 or too long.
        """
        values = self.request.args.get(name.encode("ascii"))
        if not values:
            return None
        if len(values) > 1:
            raise badParameter(name, "given more than once")
        try:
            value = values[0].decode("utf-8")
        except UnicodeDecodeError:
            raise badParameter(name, "not UTF-8") from None
        if len(value) > limit:
            raise badParameter(name, f"longer than {limit} characters")
        return value

    def upload(self, name: str) -> Optional[bytes]:
        """
        The bytes of an uploaded file field (C{multipart/form-data}).
        """
        values = self.request.args.get(name.encode("ascii"))
        if not values:
            return None
        if len(values) > 1:
            raise badParameter(name, "given more than once")
        return values[0]


def _localPath(value: Optional[str], default: str = "/") -> str:
    """
    C{value} if it is a path of this site (C{/...}, not C{//host} or
    C{/\\host}, no control characters), else C{default}: never a
    redirect to somewhere else.
    """
    if (
        not value
        or not value.startswith("/")
        or value.startswith("//")
        or value.startswith("/\\")
        or re.search(r"[\x00-\x20\x7f\\]", value)
        or len(value) > 2000
    ):
        return default
    return value


class _QueueIDConverter(BaseConverter):
    """
    A queue id in a path (with its slash, plain or C{%2F}); checked in the
    handler.
    """

    regex = r"[^/]{2}/[^/]+"
    part_isolating = False


_app = Klein()
_app.url_map.converters["queueid"] = _QueueIDConverter


def page(path: str, methods=("GET",), public: bool = False):
    """
    Register an C{async} handler C{(self, context, **kw)} as a UI route:
    its answer a L{Page}, a L{Redirect} or a L{Download}; every failure a
    page with its status.
    """

    def decorate(handler):
        @functools.wraps(handler)
        def route(self, request, **kwargs):
            return self._serve(request, handler, kwargs, public)

        return _app.route(path, methods=list(methods))(route)

    return decorate


@attrs.define(slots=False)
class UiApp:
    """
    The Klein application of the reports UI.

    @ivar queries: the query layer shared with the API.
    @ivar clock: an L{IReactorTime}.
    @ivar checker: a C{twisted.cred} checker of the users of C{[web]
        users_file}, or L{None} when none is configured (nobody can log in).
    @ivar limiter: the failed-login policy.
    @ivar sessions: the live sessions.
    @ivar trustedProxies: networks whose C{X-Forwarded-For} and
        C{X-Forwarded-Proto} are believed.
    @ivar domains: the DNS checks of the sending domains
        (L{smartrelay.web.ui.domains.DomainChecks}), or L{None}.
    @ivar rewrap: what the relay applies to messages, for the message
        page (L{smartrelay.web.ui.pages.RewrapSettings}).
    """

    queries: Queries
    clock: IReactorTime
    checker: Optional[ICredentialsChecker] = None
    limiter: LoginLimiter = attrs.field(
        default=attrs.Factory(lambda self: makeLoginLimiter(self.clock), takes_self=True)
    )
    sessions: Sessions = attrs.field(
        default=attrs.Factory(lambda self: Sessions(self.clock), takes_self=True)
    )
    trustedProxies: tuple = ()
    domains: Optional[DomainChecks] = None
    rewrap: pages.RewrapSettings = attrs.field(factory=pages.RewrapSettings)
    _loginKey: bytes = attrs.field(factory=lambda: os.urandom(32), repr=False)

    app = _app
    log = Logger()

    def resource(self) -> Resource:
        """
        The Twisted Web resource serving this application.
        """
        return _GuardedResource(self.app.resource())

    # -- serving -----------------------------------------------------------

    def _serve(self, request, handler, kwargs: dict, public: bool) -> Deferred:
        setSecurityHeaders(request)
        https = isHTTPS(request, self.trustedProxies)
        session = self.sessions.get(readCookie(request, SESSION_COOKIE))
        context = Context(request, session, https)

        async def run():
            if request.method == b"POST":
                if getattr(request, "bodyTooLarge", False):
                    raise ApiError(413, "too_large", "the form is too large")
                if not sameOrigin(request, https, self.trustedProxies):
                    self.log.warn(
                        "UI: refused a cross-site {method} {path} from {client}",
                        method="POST",
                        path=request.path.decode("ascii", "replace")[:200],
                        client=clientAddress(request, self.trustedProxies),
                    )
                    raise ApiError(
                        403, "cross_site", "refused: this request did not come from this site's pages"
                    )
            if not public:
                if session is None:
                    if request.method in (b"GET", b"HEAD"):
                        return Redirect("/login?" + urlencode({"next": _requestPath(request)}))
                    raise ApiError(
                        403, "no_session", "you are not logged in (the session may have expired)"
                    )
                if request.method == b"POST" and not tokensMatch(
                    context.field("csrf", 200), session.csrf
                ):
                    raise ApiError(
                        403, "bad_token", "the form is not from this session; reload the page"
                    )
            return await handler(self, context, **kwargs)

        d = Deferred.fromCoroutine(run())
        return d.addCallbacks(
            lambda result: self._answer(context, result),
            lambda failure: self._failed(context, failure),
        )

    def _answer(self, context: Context, result) -> bytes:
        request = context.request
        if isinstance(result, Redirect):
            request.setResponseCode(303)
            request.setHeader(b"Location", _localPath(result.location).encode("utf-8"))
            for cookie in result.cookies:
                request.responseHeaders.addRawHeader(b"Set-Cookie", cookie)
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            return b"see " + result.location.encode("utf-8") + b"\n"
        if isinstance(result, Download):
            return self._download(request, result)
        if isinstance(result, _Raw):
            request.setHeader(b"Content-Length", b"%d" % (len(result.body),))
            return result.body
        if request.args.get(b"format") == [b"csv"]:
            name = (request.args.get(b"table") or [b""])[0].decode("utf-8", "replace")
            table = result.tables.get(name)
            if table is None:
                missing = ApiError(404, "no_table", f"this page has no table {name!r}")
                return self._errorPage(context, missing)
            return self._download(
                request, Download(csvBytes(table), b"text/csv; charset=utf-8", f"{name}.csv")
            )
        return self._html(context, result)

    def _download(self, request, download: Download) -> bytes:
        request.setResponseCode(200)
        request.setHeader(b"Content-Type", download.contentType)
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", download.filename)
        request.setHeader(b"Content-Disposition", f'attachment; filename="{safe}"'.encode())
        request.setHeader(b"Content-Length", b"%d" % (len(download.body),))
        return download.body

    def _html(self, context: Context, result: Page) -> bytes:
        request = context.request
        session = context.session
        q = ""
        values = request.args.get(b"q")
        if values and request.path == b"/search":
            q = values[0].decode("utf-8", "replace")[:500]
        document = layout(
            result,
            None if session is None else session.user,
            None if session is None else session.csrf,
            q=q,
            current=request.path.decode("utf-8", "replace"),
        )
        body = render(document)
        request.setResponseCode(result.status)
        request.setHeader(b"Content-Type", _HTML)
        request.setHeader(b"Content-Length", b"%d" % (len(body),))
        return body

    def _errorPage(self, context: Context, error: ApiError) -> bytes:
        for name, value in error.headers.items():
            context.request.setHeader(name, value)
        return self._html(context, pages.errorPage(error.status, error.message))

    def _failed(self, context: Context, failure) -> bytes:
        if failure.check(ApiError):
            error = failure.value
        else:
            request = context.request
            self.log.failure(
                "UI error serving {method} {path}",
                failure,
                method=request.method.decode("ascii", "replace"),
                path=request.path.decode("ascii", "replace")[:200],
            )
            error = ApiError(500, "internal_error", "internal error; see the relay's log")
        return self._errorPage(context, error)

    # -- login -------------------------------------------------------------

    def _loginToken(self, cookie: str) -> str:
        return hmac.new(self._loginKey, cookie.encode("ascii"), hashlib.sha256).hexdigest()

    def _loginPage(self, context: Context, problem: Optional[str] = None,
                   status: int = 200) -> Page:
        cookie = readCookie(context.request, LOGIN_COOKIE)
        if cookie is None:
            cookie = secrets.token_urlsafe(24)
            context.request.responseHeaders.addRawHeader(
                b"Set-Cookie", cookieHeader(LOGIN_COOKIE, cookie, context.https)
            )
        nextPath = _localPath(context.field("next", 2000))
        return pages.loginPage(
            self._loginToken(cookie),
            nextPath,
            problem,
            configured=self.checker is not None,
            status=status,
        )

    @page("/login", public=True)
    async def login(self, context: Context):
        if context.session is not None:
            return Redirect(_localPath(context.field("next", 2000)))
        return self._loginPage(context)

    @page("/login", methods=("POST",), public=True)
    async def loginPost(self, context: Context):
        cookie = readCookie(context.request, LOGIN_COOKIE)
        if cookie is None or not tokensMatch(
            context.field("csrf", 200), self._loginToken(cookie)
        ):
            raise ApiError(403, "bad_token", "the login form has expired; reload the page")
        user = context.field("user", MAX_USER) or ""
        password = context.field("password", MAX_PASSWORD) or ""
        if self.checker is None:
            return self._loginPage(context, "Nobody can log in: [web] users_file is not set.", 403)
        if not user or not password:
            return self._loginPage(context, "Give a user name and a password.", 400)
        client = clientAddress(context.request, self.trustedProxies) or "unknown"
        try:
            attempt = self.limiter.begin(client, user)
        except LoginLimited as e:
            wait = math.ceil(e.retryAfter)
            context.request.setHeader(b"Retry-After", b"%d" % (wait,))
            return self._loginPage(
                context,
                f"Too many failed logins; try again in {max(1, math.ceil(wait / 60))} minutes.",
                429,
            )
        try:
            await self.checker.requestAvatarId(UsernamePassword(user, password))
        except UnauthorizedLogin:
            delay = attempt.failed()
            if delay:
                await deferLater(self.clock, delay, lambda: None)
            self.log.info("UI: failed login for {user!r} from {client}", user=user[:100],
                          client=client)
            return self._loginPage(context, "Wrong user name or password.", 401)
        except BaseException:
            attempt.abandoned()
            raise
        attempt.succeeded()
        session = self.sessions.create(user)
        self.log.info("UI: {user!r} logged in from {client}", user=user[:100], client=client)
        return Redirect(
            _localPath(context.field("next", 2000)),
            cookies=(
                cookieHeader(SESSION_COOKIE, session.id, context.https),
                cookieHeader(LOGIN_COOKIE, "", context.https, maxAge=0),
            ),
        )

    @page("/logout", methods=("POST",), public=True)
    async def logout(self, context: Context):
        session = context.session
        if session is not None:
            if not tokensMatch(context.field("csrf", 200), session.csrf):
                raise ApiError(403, "bad_token", "the form is not from this session; reload the page")
            self.sessions.end(readCookie(context.request, SESSION_COOKIE))
            self.log.info("UI: {user!r} logged out", user=session.user[:100])
        return Redirect(
            "/login", cookies=(cookieHeader(SESSION_COOKIE, "", context.https, maxAge=0),)
        )

    # -- static ------------------------------------------------------------

    @page("/static/ui.css", public=True)
    async def stylesheet(self, context: Context):
        request = context.request
        body = _STYLESHEET
        request.setHeader(b"Content-Type", b"text/css; charset=utf-8")
        request.setHeader(b"Cache-Control", b"max-age=3600")
        return _Raw(body)

    # -- pages -------------------------------------------------------------

    @page("/")
    async def dashboard(self, context: Context):
        return await pages.dashboard(self, context)

    @page("/search")
    async def search(self, context: Context):
        return await pages.search(self, context)

    @page("/messages/<queueid:queue_id>")
    async def message(self, context: Context, queue_id: str):
        return await pages.message(self, context, queue_id)

    @page("/events")
    async def events(self, context: Context):
        return await pages.events(self, context)

    @page("/events/export.csv")
    async def exportEvents(self, context: Context):
        return await pages.exportEvents(self, context)

    @page("/bounces")
    async def bounces(self, context: Context):
        return await pages.bounces(self, context)

    @page("/suppressions")
    async def suppressions(self, context: Context):
        return await manage.suppressions(self, context)

    @page("/suppressions/add", methods=("POST",))
    async def addSuppression(self, context: Context):
        return await manage.addSuppression(self, context)

    @page("/suppressions/remove", methods=("POST",))
    async def removeSuppression(self, context: Context):
        return await manage.removeSuppression(self, context)

    @page("/suppressions/import", methods=("POST",))
    async def importSuppressions(self, context: Context):
        return await manage.importSuppressions(self, context)

    @page("/suppressions/export.csv")
    async def exportSuppressions(self, context: Context):
        return await manage.exportSuppressions(self, context)

    @page("/queue")
    async def queue(self, context: Context):
        return await manage.queue(self, context)

    @page("/queue/confirm")
    async def confirmDelete(self, context: Context):
        return await manage.confirmDelete(self, context)

    @page("/queue/retry", methods=("POST",))
    async def retry(self, context: Context):
        return await manage.retry(self, context)

    @page("/queue/retry-domain", methods=("POST",))
    async def retryDomain(self, context: Context):
        return await manage.retryDomain(self, context)

    @page("/queue/delete", methods=("POST",))
    async def delete(self, context: Context):
        return await manage.delete(self, context)

    @page("/domains")
    async def domainChecks(self, context: Context):
        return await manage.domains(self, context)

    # -- errors outside the handlers ---------------------------------------

    def _bare(self, request, status: int, message: str) -> bytes:
        setSecurityHeaders(request)
        context = Context(
            request,
            self.sessions.get(readCookie(request, SESSION_COOKIE)),
            isHTTPS(request, self.trustedProxies),
        )
        return self._html(context, pages.errorPage(status, message))

    @app.handle_errors(NotFound)
    def notFoundError(self, request, failure) -> bytes:
        return self._bare(request, 404, "There is no such page.")

    @app.handle_errors(MethodNotAllowed)
    def methodNotAllowed(self, request, failure) -> bytes:
        allowed = failure.value.valid_methods or []
        if allowed:
            request.setHeader(b"Allow", ", ".join(allowed).encode("ascii"))
        return self._bare(request, 405, f"This page takes {', '.join(allowed)}.")

    @app.handle_errors(HTTPException)
    def otherHTTPError(self, request, failure) -> bytes:
        error = failure.value
        return self._bare(request, error.code, error.name or "error")

    @app.handle_errors
    def internalError(self, request, failure) -> bytes:
        self.log.failure("UI error", failure)
        return self._bare(request, 500, "internal error; see the relay's log")


def _requestPath(request) -> str:
    path = request.uri.decode("utf-8", "replace")
    return _localPath(path)


class _GuardedResource(Resource):
    """
    Answers requests whose path or host is not UTF-8 (which Klein refuses
    with a bare 400) with a plain 400, with the security headers.
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
            setSecurityHeaders(request)
            request.setResponseCode(400)
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            return b"the path is not UTF-8\n"
        return self._inner.render(request)
