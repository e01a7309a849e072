"""
The public tracking and unsubscribe routes (DESIGN sections 1.5 to 1.7).

Recipients reach these from their mail, so everything here is
authenticated by the signed token in the path and nothing else:

  - C{GET|HEAD /t/o/<token>.gif}: a 1x1 transparent GIF; records C{opened}.
    A bad token still gets the GIF (the pixel never tells anyone whether a
    token is valid) but records nothing.
  - C{GET /t/c/<token>}: C{302} to the http(s) link signed in the token;
    records C{clicked}.  A bad token, or a link that is not http(s), gets a
    404 page and never a redirect.
  - C{GET /u/<token>}: a confirmation page with an I{Unsubscribe} button.
    It changes nothing: link scanners follow every GET.
  - C{POST /u/<token>}: unsubscribes, for the RFC 8058 one-click body
    (C{List-Unsubscribe=One-Click}) and for the page's form alike.

Mount it with::

    app = TrackingApp(tokens, events, store, reactor)
    site = makeSite(app)    # or put app.resource() under another Resource

Events carry the tag and metadata of the message (read once per message
from its C{accepted} event and kept in a small LRU cache) and, in
C{detail}, the client's C{user_agent}, C{ip} and C{machine}: true when the
user agent is empty or matches L{MACHINE_AGENTS} (mail-provider image
proxies, link scanners, HTTP libraries, crawlers, headless browsers).
Machine hits are recorded, never dropped; reports decide what to count.

Opens and clicks are recorded in the background: the GIF and the redirect
are answered at once, whatever the store is doing.

Unsubscribing is idempotent: if the address already has an active entry on
the suppression list (for any reason) the entry is left as it is, no event
is recorded again, and the answer is the same as the first time.  Only a
POST that adds the entry records C{unsubscribed}.

The site's access log (L{accessLogFormatter}) and its error log name the
route, never the token: a token segment is logged as
C{<token:HASH>}, the first 8 hex digits of the token's SHA-256 (so a line
can be found from a token in hand, but no token from a line), query
strings are left out and the referrer is cut to its origin.
"""

import hashlib
import html
import re
from collections import OrderedDict
from typing import Any, Optional
from urllib.parse import quote, unquote_to_bytes, urlsplit

import attrs
from klein import Klein
from twisted.internet.defer import Deferred, inlineCallbacks, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import combinedLogFormatter
from twisted.web.iweb import IAccessLogFormatter
from twisted.web.resource import Resource
from twisted.web.server import Site
from zope.interface import provider
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound

from smartrelay.deferreds import whenAllDone
from smartrelay.store.interfaces import SuppressionEntry, normaliseAddress
from smartrelay.web.proxies import clientAddress

__all__ = [
    "TRANSPARENT_GIF",
    "MACHINE_AGENTS",
    "UNSUBSCRIBE_REASON",
    "TrackingApp",
    "accessLogFormatter",
    "isMachine",
    "loggedPath",
    "makeSite",
]

#: A 1x1 transparent GIF89a (43 bytes): one-colour global table, a graphic
#: control extension marking colour 0 transparent, one LZW-coded pixel.
TRANSPARENT_GIF = (
    b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff"
    b"!\xf9\x04\x01\x00\x00\x00\x00"
    b",\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
)

#: The suppression reason of an unsubscribe (one of
#: L{smartrelay.store.interfaces.SUPPRESSION_REASONS}).
UNSUBSCRIBE_REASON = "unsubscribe"

#: User agents of programs that fetch images and follow links on a
#: recipient's behalf or by themselves: (what, case-insensitive regular
#: expression searched in the User-Agent).  An empty or missing User-Agent
#: counts as a machine too.
MACHINE_AGENTS: tuple[tuple[str, str], ...] = (
    ("Gmail image proxy", r"GoogleImageProxy"),
    ("Google image proxy (ggpht)", r"via ggpht\.com"),
    ("Yahoo Mail image proxy", r"YahooMailProxy"),
    ("Microsoft Safe Links", r"SafeLinks"),
    ("Microsoft Office link discovery", r"Microsoft Office (?:Protocol|Existence) Discovery"),
    ("Barracuda", r"Barracuda"),
    ("Mimecast", r"Mimecast"),
    ("Proofpoint", r"Proofpoint"),
    ("python-requests", r"python-requests"),
    ("Python urllib", r"Python-urllib"),
    ("Go net/http", r"Go-http-client"),
    ("curl", r"\bcurl\b"),
    ("Wget", r"\bWget\b"),
    # "...bot" at the end of a word (Googlebot, bingbot, Slackbot-...,
    # AdsBot-Google), except the Cubot phone brand in Android user agents.
    ("bots", r"(?<!cu)bot\b"),
    ("crawlers", r"crawler"),
    ("spiders", r"spider"),
    ("link previews", r"preview"),
    ("Facebook link preview", r"facebookexternalhit"),
    ("headless Chrome", r"HeadlessChrome"),
    ("PhantomJS", r"PhantomJS"),
)

_MACHINE = re.compile("|".join(f"(?:{p})" for _, p in MACHINE_AGENTS), re.IGNORECASE)

#: Longest User-Agent kept in an event.
MAX_USER_AGENT = 512
#: Seconds a message the store does not know (no C{accepted} event: pruned,
#: or still in the event journal) is not looked up again for its tag.
UNKNOWN_FOR = 60.0

_SECURITY_HEADERS = {
    b"X-Content-Type-Options": b"nosniff",
    b"Referrer-Policy": b"no-referrer",
    b"Content-Security-Policy": (
        b"default-src 'none'; style-src 'unsafe-inline'; form-action 'self'"
    ),
    b"X-Frame-Options": b"DENY",
}

_NO_CACHE = {
    b"Cache-Control": b"no-store, no-cache, must-revalidate, private, max-age=0",
    b"Pragma": b"no-cache",
    b"Expires": b"0",
}

_STYLE = (
    "body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;"
    "max-width:34rem;margin:3rem auto;padding:0 1rem;line-height:1.5;color:#222}"
    "h1{font-size:1.5rem}"
    "button{font:inherit;padding:.5rem 1.5rem;border:0;border-radius:.3rem;"
    "background:#1a5fb4;color:#fff;cursor:pointer}"
    ".address{font-weight:bold;word-break:break-all}"
)


def isMachine(userAgent: Optional[str]) -> bool:
    """
    Is a request with this User-Agent made by a program rather than by a
    person's mail client or browser?  See L{MACHINE_AGENTS}.
    """
    if userAgent is None or not userAgent.strip():
        return True
    return _MACHINE.search(userAgent) is not None


def redirectTarget(url: Optional[str]) -> Optional[bytes]:
    """
    The C{Location} value for a click on C{url}, or L{None} if it must not
    be redirected to: only absolute http and https URLs with a host.  An
    ASCII URL is kept exactly; spaces and non-ASCII characters are
    percent-encoded (UTF-8); control characters are refused.
    """
    if not isinstance(url, str) or not url:
        return None
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        return None
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:
        return None
    if parts.scheme.lower() not in ("http", "https") or not host:
        return None
    encoded = "".join(
        c if 0x20 < ord(c) < 0x7F else quote(c, safe="") for c in url
    )
    return encoded.encode("ascii")


def page(title: str, body: str) -> bytes:
    """
    A small HTML5 page: C{title} is text (escaped here), C{body} is HTML.
    """
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n'
        "<head>\n"
        '<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        '<meta name="robots" content="noindex, nofollow">\n'
        f"<title>{html.escape(title)}</title>\n"
        f"<style>{_STYLE}</style>\n"
        "</head>\n"
        "<body>\n"
        "<main>\n"
        f"<h1>{html.escape(title)}</h1>\n"
        f"{body}\n"
        "</main>\n"
        "</body>\n"
        "</html>\n"
    ).encode("utf-8")


class InvalidLink(Exception):
    """
    The token in the path is bad, of the wrong kind, or signs something we
    will not act on: answered with the 404 page.
    """


class StoreUnavailable(Exception):
    """
    The store failed while unsubscribing: answered with the 503 page.
    """


@attrs.define(slots=False)
class TrackingApp:
    """
    The Klein application of the tracking and unsubscribe routes.

    @ivar tokens: a L{smartrelay.tokens.Tokens}: C{read(kind, token)}
        returns a C{TokenData} or raises C{BadToken} (a L{ValueError}).
    @ivar events: an event log: C{emit(type, queue_id, recipient, *, tag,
        metadata, detail)}.
    @ivar store: an L{smartrelay.store.interfaces.IStore}.
    @ivar clock: an L{IReactorTime}; stamps suppression entries.
    @ivar cacheSize: how many messages' (tag, metadata) to remember.
    @ivar trustedProxies: networks (C{[web] trusted_proxies}) whose
        C{X-Forwarded-For} gives the C{ip} of opens and clicks.
    """

    tokens: Any
    events: Any
    store: Any
    clock: Any
    cacheSize: int = 4096
    trustedProxies: tuple = ()
    _info: OrderedDict = attrs.field(factory=OrderedDict, init=False, repr=False)
    _busy: set = attrs.field(factory=set, init=False, repr=False)
    _lookups: dict = attrs.field(factory=dict, init=False, repr=False)

    app = Klein()
    log = Logger()

    def resource(self) -> Resource:
        """
        The Twisted Web resource serving this application.
        """
        return _EncodingGuard(self.app.resource(), self)

    def drained(self) -> Deferred:
        """
        Fires once the work that writes to the store or the event log
        (unsubscribes, and opens and clicks being recorded in the
        background) is done, including any started meanwhile; the relay
        waits for it when stopping, before it flushes the events and closes
        the store.
        """
        return whenAllDone(lambda: self._busy)

    def _track(self, d: Deferred) -> Deferred:
        self._busy.add(d)

        def finished(result: Any) -> Any:
            self._busy.discard(d)
            return result

        d.addBoth(finished)
        return d

    # -- routes ---------------------------------------------------------

    @app.route("/t/o/<string:token>.gif", methods=["GET", "HEAD"])
    def openPixel(self, request, token: str) -> bytes:
        """
        The open pixel: always the GIF; records C{opened} for a good token.
        """
        data = self._read("o", token, required=False)
        if data is not None:
            userAgent, ip = _client(request, self.trustedProxies)
            self._record(
                "opened",
                data,
                {"user_agent": userAgent, "ip": ip, "machine": isMachine(userAgent)},
            )
        _setHeaders(request, _NO_CACHE)
        return _respond(request, 200, b"image/gif", TRANSPARENT_GIF)

    @app.route("/t/c/<string:token>", methods=["GET", "HEAD"])
    def click(self, request, token: str) -> bytes:
        """
        The click redirect: 302 to the link signed in the token.
        """
        data = self._read("c", token)
        location = redirectTarget(data.url)
        if location is None:
            raise InvalidLink(f"not an http(s) link: {data.url!r}")
        userAgent, ip = _client(request, self.trustedProxies)
        self._record(
            "clicked",
            data,
            {
                "url": data.url,
                "user_agent": userAgent,
                "ip": ip,
                "machine": isMachine(userAgent),
            },
        )
        request.setHeader(b"Location", location)
        request.setHeader(b"Cache-Control", b"no-store")
        return _respond(
            request,
            302,
            b"text/html; charset=utf-8",
            page(
                "Redirecting",
                '<p><a href="%s">Continue</a></p>'
                % html.escape(location.decode("ascii")),
            ),
        )

    @app.route("/u/<string:token>", methods=["GET", "HEAD"])
    def unsubscribePage(self, request, token: str) -> bytes:
        """
        The confirmation page: shows the address and a button that POSTs
        back here; unsubscribes nobody.
        """
        data = self._read("u", token)
        body = (
            "<p>Do you want to stop receiving these e-mails at "
            f'<span class="address">{html.escape(data.recipient)}</span>?</p>\n'
            "<p>Press the button to unsubscribe this address. "
            "Nothing changes until you do.</p>\n"
            '<form method="post">\n'
            '<button type="submit">Unsubscribe</button>\n'
            "</form>"
        )
        return _htmlPage(request, 200, "Unsubscribe", body)

    @app.route("/u/<string:token>", methods=["POST"])
    def unsubscribe(self, request, token: str) -> Deferred:
        """
        Unsubscribe: RFC 8058 one-click or the confirmation page's form.
        """
        data = self._read("u", token)
        return self._track(self._unsubscribe(request, data))

    @inlineCallbacks
    def _unsubscribe(self, request, data):
        oneClick = request.args.get(b"List-Unsubscribe") == [b"One-Click"]
        now = self.clock.seconds()
        try:
            try:
                found = yield maybeDeferred(
                    self.store.checkSuppressions, [data.recipient], now
                )
            except Exception as e:
                # The store cannot be asked (a Redis outage): add anyway,
                # adding twice changes nothing; the relay's store keeps the
                # entry on disk until the store takes it.
                self.log.warn(
                    "could not check whether {queue_id}'s recipient is already "
                    "unsubscribed ({why}); unsubscribing",
                    queue_id=data.queue_id,
                    why=str(e) or type(e).__name__,
                )
                found = {}
            if not found:
                yield maybeDeferred(
                    self.store.addSuppression,
                    SuppressionEntry(
                        address=data.recipient, reason=UNSUBSCRIBE_REASON, time=now
                    ),
                )
        except Exception as e:
            self.log.failure(
                "could not unsubscribe {queue_id}: the store failed",
                queue_id=data.queue_id,
            )
            raise StoreUnavailable(str(e)) from e
        if not found:
            userAgent, ip = _client(request, self.trustedProxies)
            self._record(
                "unsubscribed",
                data,
                {
                    "method": "one-click" if oneClick else "form",
                    "user_agent": userAgent,
                    "ip": ip,
                },
            )
        if oneClick:
            request.setHeader(b"Cache-Control", b"no-store")
            return _respond(
                request,
                200,
                b"text/plain; charset=utf-8",
                b"Unsubscribed.\n",
            )
        body = (
            f'<p><span class="address">{html.escape(data.recipient)}</span> '
            "will not receive these e-mails any more.</p>"
        )
        return _htmlPage(request, 200, "You are unsubscribed", body)

    # -- errors, all mapped here -------------------------------------------

    @app.handle_errors(InvalidLink)
    def invalidLink(self, request, failure) -> bytes:
        return _htmlPage(
            request,
            404,
            "This link is not valid",
            "<p>This link is not valid. Check that it was copied whole "
            "from the e-mail.</p>",
        )

    @app.handle_errors(StoreUnavailable)
    def storeUnavailable(self, request, failure) -> bytes:
        request.setHeader(b"Retry-After", b"60")
        return _htmlPage(
            request,
            503,
            "Please try again",
            "<p>We could not process your request just now. "
            "Please try again in a few minutes.</p>",
        )

    @app.handle_errors(NotFound)
    def notFound(self, request, failure) -> bytes:
        return _htmlPage(
            request, 404, "Page not found", "<p>There is nothing here.</p>"
        )

    @app.handle_errors(MethodNotAllowed)
    def methodNotAllowed(self, request, failure) -> bytes:
        allowed = failure.value.valid_methods or []
        if allowed:
            request.setHeader(b"Allow", ", ".join(allowed).encode("ascii"))
        return _htmlPage(
            request, 405, "Method not allowed", "<p>This page cannot do that.</p>"
        )

    @app.handle_errors(HTTPException)
    def otherHTTPError(self, request, failure) -> bytes:
        error = failure.value
        return _htmlPage(request, error.code, error.name, "")

    @app.handle_errors
    def internalError(self, request, failure) -> bytes:
        self.log.failure(
            "error serving {path}", failure, path=loggedPath(request.uri).decode("ascii")
        )
        return _htmlPage(
            request,
            500,
            "Something went wrong",
            "<p>Please try again later.</p>",
        )

    # -- helpers --------------------------------------------------------

    def _read(self, kind: str, token: str, required: bool = True):
        """
        The data in a token of C{kind}; L{None} (or L{InvalidLink} when
        C{required}) if it is bad or lacks what the kind needs.
        """
        try:
            data = self.tokens.read(kind, token)
        except ValueError:  # BadToken, and any decoding error under it
            data = None
        if data is not None and (
            not data.queue_id
            or (kind in ("o", "u") and not data.recipient)
            or (kind == "c" and not data.url)
        ):
            data = None
        if data is not None and kind == "u":
            try:
                normaliseAddress(data.recipient)
            except ValueError:  # cannot be put on the suppression list
                data = None
        if data is None and required:
            raise InvalidLink(f"bad {kind} token")
        return data

    def _record(self, type: str, data, detail: dict) -> Deferred:
        """
        Emit an event for the message and recipient of C{data}, with the
        message's tag and metadata when they can be found.
        """

        def emit(info):
            tag, metadata = info
            self.events.emit(
                type,
                data.queue_id,
                data.recipient,
                tag=tag,
                metadata=dict(metadata),
                detail=detail,
            )

        d = self._messageInfo(data.queue_id)
        d.addCallback(emit)
        d.addErrback(
            lambda f: self.log.failure(
                "could not record {type} for {queue_id}",
                f,
                type=type,
                queue_id=data.queue_id,
            )
        )
        return self._track(d)

    def _messageInfo(self, queueID: str) -> Deferred:
        """
        (tag, metadata) of a message, from its C{accepted} event; (None, {})
        if the store does not know it or fails.

        Answers are kept in a small LRU cache; a message the store does
        not know is remembered as unknown for L{UNKNOWN_FOR} seconds, and
        the clicks of one message arriving together share one look-up: a
        burst of clicks on one message must not read its (growing) list of
        events once per click.
        """
        cached = self._info.get(queueID)
        if cached is not None:
            info, until = cached
            if until is None or until > self.clock.seconds():
                self._info.move_to_end(queueID)
                return succeed(info)
            del self._info[queueID]
        waiting = self._lookups.get(queueID)
        if waiting is not None:
            d: Deferred = Deferred()
            waiting.append(d)
            return d
        waiting = self._lookups[queueID] = []

        def remember(info, until):
            self._info[queueID] = (info, until)
            while len(self._info) > self.cacheSize:
                self._info.popitem(last=False)
            return info

        def found(events):
            for event in events:
                if event.type == "accepted":
                    return remember((event.tag, dict(event.metadata or {})), None)
            return remember((None, {}), self.clock.seconds() + UNKNOWN_FOR)

        def failed(failure):
            self.log.failure(
                "could not look up the tag and metadata of {queue_id}",
                failure,
                queue_id=queueID,
            )
            return (None, {})

        def answer(info):
            del self._lookups[queueID]
            for d in waiting:
                d.callback(info)
            return info

        d = maybeDeferred(self.store.eventsForMessage, queueID)
        return d.addCallbacks(found, failed).addCallback(answer)


def _client(request, trustedProxies: tuple = ()) -> tuple[str, Optional[str]]:
    """
    The (User-Agent, client IP address) of a request: the peer, or what
    C{X-Forwarded-For} says when the peer is one of C{trustedProxies}
    (L{smartrelay.web.proxies.clientAddress}).
    """
    raw = request.getHeader(b"user-agent") or b""
    userAgent = raw.decode("utf-8", "replace")[:MAX_USER_AGENT]
    return userAgent, clientAddress(request, trustedProxies)


def _setHeaders(request, headers: dict) -> None:
    for name, value in headers.items():
        request.setHeader(name, value)


def _respond(request, code: int, contentType: bytes, body: bytes) -> bytes:
    """
    Set the status, content type, length and security headers; return the
    body (Twisted leaves it out of a HEAD answer).
    """
    request.setResponseCode(code)
    _setHeaders(request, _SECURITY_HEADERS)
    request.setHeader(b"Content-Type", contentType)
    request.setHeader(b"Content-Length", b"%d" % (len(body),))
    return body


def _htmlPage(request, code: int, title: str, body: str) -> bytes:
    request.setHeader(b"Cache-Control", b"no-store")
    return _respond(request, code, b"text/html; charset=utf-8", page(title, body))


class _EncodingGuard(Resource):
    """
    In front of the Klein application: answers requests whose path or host
    is not UTF-8 (which Klein refuses with a logged error and a bare 400):
    the pixel for pixel paths, since a bad token always gets the pixel, and
    a 400 page for the rest.

    It also serves the two routes that see campaign-sized bursts, C{GET}
    and C{HEAD} of C{/t/c/<token>} and C{/t/o/<token>.gif} with a plain
    token segment (unreserved characters: nothing to percent-decode), by
    calling the application's route methods directly: the same answers and
    events as through Klein, without its routing and Deferred plumbing per
    request, which took about a fifth of the reactor thread under load
    (C{bench/clicks.py} with py-spy).  Anything else goes to Klein.
    """

    isLeaf = True

    def __init__(self, inner: Resource, app: "TrackingApp") -> None:
        super().__init__()
        self._inner = inner
        self._app = app

    def render(self, request):
        postpath = request.postpath
        if (
            request.method in (b"GET", b"HEAD")
            and len(postpath) == 3
            and postpath[0] == b"t"
            and _PLAIN_TOKEN.fullmatch(postpath[2]) is not None
        ):
            answer = self._fastRoute(request, postpath[1], postpath[2])
            if answer is not None:
                return answer
        path = b"/" + b"/".join(postpath)
        try:
            path.decode("utf-8")
            request.getRequestHostname().decode("utf-8")
        except UnicodeDecodeError:
            if path.startswith(b"/t/o/") and path.endswith(b".gif"):
                _setHeaders(request, _NO_CACHE)
                return _respond(request, 200, b"image/gif", TRANSPARENT_GIF)
            return _htmlPage(
                request, 400, "Bad request", "<p>This address is not valid.</p>"
            )
        return self._inner.render(request)

    def _fastRoute(self, request, kind: bytes, segment: bytes) -> Optional[bytes]:
        """
        The answer of the click or pixel route for this token segment, or
        L{None} when the path is neither (Klein answers it).
        """
        app = self._app
        try:
            if kind == b"c":
                return app.click(request, segment.decode("ascii"))
            if kind == b"o" and segment.endswith(b".gif") and len(segment) > 4:
                return app.openPixel(request, segment[:-4].decode("ascii"))
        except InvalidLink:
            return app.invalidLink(request, Failure())
        except Exception:
            return app.internalError(request, Failure())
        return None


# A token segment with nothing to decode: URL-unreserved characters only
# (the relay's tokens are URL-safe base64; the pixel's ends in ".gif").
_PLAIN_TOKEN = re.compile(rb"[A-Za-z0-9_.~-]+")


# A token's path segment: what follows a route prefix, after any
# leading path (a proxy's prefix, doubled slashes).
_TOKEN_ROUTE = re.compile(rb"(?:^|/)(?:t/[oc]|u)/")


def loggedPath(uri: bytes) -> bytes:
    """
    What the logs show of a request's URI: its path with any token replaced
    by C{<token:HASH>} (the first 8 hex digits of the token's SHA-256; the
    pixel keeps its C{.gif}), a query string as C{?<query>}, the scheme and
    host of an absolute URI left out, and only printable ASCII
    (percent-encoded otherwise).

    A token is whatever follows C{/t/o/}, C{/t/c/} or C{/u/} anywhere in
    the percent-decoded path with runs of slashes merged, so no spelling of
    a tracking URL shows its token.
    """
    path, query, _ = uri.partition(b"?")
    if not path.startswith(b"/"):
        try:
            path = urlsplit(path).path or b"/"
        except ValueError:
            path = b"/<uri>"
    path = re.sub(rb"/{2,}", b"/", unquote_to_bytes(path))
    match = _TOKEN_ROUTE.search(path)
    if match is not None:
        token, suffix = path[match.end() :], b""
        if path[match.end() - 2 : match.end()] == b"o/" and token.endswith(b".gif"):
            token, suffix = token[:-4], b".gif"
        digest = hashlib.sha256(token).hexdigest()[:8].encode("ascii")
        path = path[: match.end()] + b"<token:" + digest + b">" + suffix
    path = quote(path, safe="/<>:;,=@!$&'()*+~.-_").encode("ascii")
    return path + (b"?<query>" if query else b"")


def _origin(referrer: bytes) -> bytes:
    """
    The C{scheme://host[:port]} of a referrer, or C{b"-"}.
    """
    try:
        parts = urlsplit(referrer)
        parts.port
    except ValueError:
        return b"-"
    if not parts.scheme or not parts.netloc:
        return b"-"
    return parts.scheme + b"://" + parts.netloc.rpartition(b"@")[2]


class _LoggedRequest:
    """
    A request as the access log sees it: the URI of L{loggedPath}, the
    referrer cut to its origin, the rest as it is.
    """

    def __init__(self, request) -> None:
        self._request = request
        self.uri = loggedPath(request.uri)

    def getHeader(self, name: bytes) -> Optional[bytes]:
        value = self._request.getHeader(name)
        if value is not None and name.lower() == b"referer":
            return _origin(value)
        return value

    def __getattr__(self, name: str) -> Any:
        return getattr(self._request, name)


@provider(IAccessLogFormatter)
def accessLogFormatter(timestamp: str, request) -> str:
    """
    Twisted's combined log line for C{request}, but with the URI of
    L{loggedPath} (no token, no query) and the referrer's origin only: for
    a click, C{"GET /t/c/<token:1a2b3c4d> HTTP/1.1" 302 ...}.
    """
    return combinedLogFormatter(timestamp, _LoggedRequest(request))


def makeSite(app: TrackingApp) -> Site:
    """
    A quiet Twisted Web site serving C{app} on C{app.clock}, never showing
    tracebacks, whose access log shows no tokens (L{accessLogFormatter}).
    """
    site = Site(app.resource(), logFormatter=accessLogFormatter, reactor=app.clock)
    site.noisy = False
    site.displayTracebacks = False
    return site
