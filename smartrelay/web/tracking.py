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
from its C{accepted} event and kept in a small LRU cache:
L{smartrelay.web.hits}) and, in
C{detail}, the client's C{user_agent}, C{ip} and C{machine}: true when the
user agent is empty or matches L{MACHINE_AGENTS} (mail-provider image
proxies, link scanners, HTTP libraries, crawlers, headless browsers).
Machine hits are recorded, never dropped; reports decide what to count.

Opens and clicks are recorded in batches, off the request path: the GIF
and the redirect are answered at once, whatever the store is doing, and
the hits of one reactor turn become their events together in the next
(L{TrackingApp.drained} waits for them).

The click redirect and the pixel are also served in front of Klein
(L{TrackingApp.frontRoute}, called by the site's requests before any
resource is looked up, L{smartrelay.web.site.BoundedRequest}): a C{GET}
or C{HEAD} with a plain token segment is answered with a prepared answer
(L{smartrelay.web.answers}), one per link, without Klein's routing and
Deferreds or Twisted Web's header handling per request.  The answers and
events are the same as through Klein, which serves every other spelling
of these paths.

Unsubscribing is idempotent: if the address already has an active entry on
the suppression list (for any reason) the entry is left as it is, no event
is recorded again, and the answer is the same as the first time.  Only a
POST that adds the entry records C{unsubscribed}.

The site's access log (L{accessLogFormatter
<smartrelay.web.accesslog.accessLogFormatter>}) and its error log name the
route, never the token: a token segment is logged as
C{<token:HASH>}, the first 8 hex digits of the token's SHA-256 (so a line
can be found from a token in hand, but no token from a line), query
strings are left out and the referrer is cut to its origin
(L{smartrelay.web.accesslog.loggedPath}).
"""

import functools
import html
import re
from typing import Any, Optional
from urllib.parse import quote, urlsplit

import attrs
from klein import Klein
from twisted.internet.defer import Deferred, inlineCallbacks, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import datetimeToString
from twisted.web.resource import Resource
from twisted.web.server import Site, version as SERVER_VERSION
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound

from smartrelay.deferreds import whenAllDone
from smartrelay.store.interfaces import SuppressionEntry, normaliseAddress
from smartrelay.web.accesslog import accessLogFormatter, loggedPath
from smartrelay.web.answers import DateHeader, PreparedAnswer, send
from smartrelay.web.hits import UNKNOWN_FOR, HitRecorder
from smartrelay.web.proxies import clientAddress
from smartrelay.web.site import makeSite as _makeSite

__all__ = [
    "TRANSPARENT_GIF",
    "MACHINE_AGENTS",
    "UNKNOWN_FOR",
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


@functools.lru_cache(maxsize=1024)
def isMachine(userAgent: Optional[str]) -> bool:
    """
    Is a request with this User-Agent made by a program rather than by a
    person's mail client or browser?  See L{MACHINE_AGENTS}.

    The answers for the last 1,024 user agents are kept: a campaign's
    clicks come from a few browsers, and searching a browser's User-Agent
    for every pattern takes about 25 microseconds.
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
    @ivar cacheSize: how many messages' (tag, metadata) to remember
        (L{HitRecorder}).
    @ivar trustedProxies: networks (C{[web] trusted_proxies}) whose
        C{X-Forwarded-For} gives the C{ip} of opens and clicks.
    """

    tokens: Any
    events: Any
    store: Any
    clock: Any
    cacheSize: int = 4096
    trustedProxies: tuple = ()
    #: Records the events (L{HitRecorder}), built from the fields above.
    hits: HitRecorder = attrs.field(init=False, repr=False)
    _busy: set = attrs.field(factory=set, init=False, repr=False)
    #: The front route's redirects: link -> L{PreparedAnswer}, or None for
    #: a link that is not redirected to.
    _redirects: dict = attrs.field(factory=dict, init=False, repr=False)
    _dates: DateHeader = attrs.field(
        default=attrs.Factory(lambda self: DateHeader(self.clock), takes_self=True),
        init=False,
        repr=False,
    )

    app = Klein()
    log = Logger()

    def __attrs_post_init__(self) -> None:
        self.hits = HitRecorder(self.events, self.store, self.clock, self.cacheSize)

    def resource(self) -> Resource:
        """
        The Twisted Web resource serving this application; its
        C{frontRoute} is L{frontRoute}, for the site to call first
        (L{smartrelay.web.site}).
        """
        return _EncodingGuard(self.app.resource(), self)

    def drained(self) -> Deferred:
        """
        Fires once the work that writes to the store or the event log
        (unsubscribes, and opens and clicks waiting for their batch or for
        their message's look-up) is done, including any started
        meanwhile; the relay
        waits for it when stopping, before it flushes the events and closes
        the store.
        """
        return whenAllDone(lambda: self._busy | self.hits.pending)

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
        self._opened(request, token)
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
        self._clicked(request, data)
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
            self.hits.record(
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

    # -- in front of Klein -------------------------------------------------

    def frontRoute(self, request) -> bool:
        """
        Answer C{request} (and return L{True}) if it is a C{GET} or C{HEAD}
        of C{/t/c/<token>} or C{/t/o/<token>.gif} with a plain token
        segment (URL-unreserved characters: nothing to percent-decode), as
        L{click} and L{openPixel} would; return L{False}, having done
        nothing, for any other request.

        A good click is answered with the link's prepared redirect
        (L{PreparedAnswer}, made once per link and kept for the next
        clicks on it), a pixel with the prepared GIF; a bad token gets the
        pages of L{invalidLink} and L{internalError}, through Twisted Web.
        """
        method = request.method
        if method != b"GET" and method != b"HEAD":
            return False
        path = request.path
        prefix = path[:5]
        if prefix == b"/t/c/":
            segment = path[5:]
            kind = "c"
        elif prefix == b"/t/o/" and path[-4:] == b".gif" and len(path) > 9:
            segment = path[5:-4]
            kind = "o"
        else:
            return False
        if _PLAIN_TOKEN.fullmatch(segment) is None:
            return False
        try:
            if kind == "c":
                answer = self._frontClick(request, segment.decode("ascii"))
            else:
                answer = self._frontPixel(request, segment.decode("ascii"))
        except InvalidLink:
            _sendPage(request, self.invalidLink, Failure())
        except Exception:
            _sendPage(request, self.internalError, Failure())
        else:
            send(request, answer, self._dates)
        return True

    def _frontClick(self, request, token: str) -> PreparedAnswer:
        data = self._read("c", token)
        url = data.url
        answer = self._redirects.get(url, _UNKNOWN)
        if answer is _UNKNOWN:
            answer = _redirectAnswer(url)
            if len(self._redirects) >= _MAX_REDIRECTS:
                self._redirects.clear()
            self._redirects[url] = answer
        if answer is None:
            raise InvalidLink(f"not an http(s) link: {url!r}")
        self._clicked(request, data)
        return answer

    def _frontPixel(self, request, token: str) -> PreparedAnswer:
        self._opened(request, token)
        return _PIXEL

    def _opened(self, request, token: str) -> None:
        """
        Record C{opened} for a good open token (a bad one records nothing:
        the pixel is served either way).
        """
        data = self._read("o", token, required=False)
        if data is not None:
            userAgent, ip = _client(request, self.trustedProxies)
            self.hits.hit(
                "opened",
                data,
                {"user_agent": userAgent, "ip": ip, "machine": isMachine(userAgent)},
            )

    def _clicked(self, request, data) -> None:
        """
        Record C{clicked} for the click token's C{data}.
        """
        userAgent, ip = _client(request, self.trustedProxies)
        self.hits.hit(
            "clicked",
            data,
            {"url": data.url, "user_agent": userAgent, "ip": ip, "machine": isMachine(userAgent)},
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


# -- the front route's answers ----------------------------------------------

#: The open pixel's answer, as L{TrackingApp.openPixel} gives it.
_PIXEL = PreparedAnswer.of(
    200,
    [*_NO_CACHE.items(), *_SECURITY_HEADERS.items(), (b"Content-Type", b"image/gif")],
    TRANSPARENT_GIF,
)

#: Links whose redirects the front route keeps; all are forgotten when
#: there are this many (a campaign has a few links, clicked many times).
_MAX_REDIRECTS = 4096

_UNKNOWN = object()


def _redirectAnswer(url: str) -> Optional[PreparedAnswer]:
    """
    The answer to a click on C{url}, as L{TrackingApp.click} gives it, or
    L{None} if it is not redirected to (L{redirectTarget}).
    """
    location = redirectTarget(url)
    if location is None:
        return None
    body = page(
        "Redirecting",
        '<p><a href="%s">Continue</a></p>' % html.escape(location.decode("ascii")),
    )
    return PreparedAnswer.of(
        302,
        [
            (b"Location", location),
            (b"Cache-Control", b"no-store"),
            *_SECURITY_HEADERS.items(),
            (b"Content-Type", b"text/html; charset=utf-8"),
        ],
        body,
    )


def _sendPage(request, handler, failure: Failure) -> None:
    """
    Answer a front route's request with one of the application's error
    pages (C{handler(request, failure)}, such as L{TrackingApp.invalidLink}),
    through Twisted Web as it answers a resource's page.
    """
    request.setHeader(b"Server", SERVER_VERSION)
    request.setHeader(b"Date", datetimeToString())
    body = handler(request, failure)
    request.write(b"" if request.method == b"HEAD" else body)
    request.finish()


class _EncodingGuard(Resource):
    """
    In front of the Klein application: answers requests whose path or host
    is not UTF-8 (which Klein refuses with a logged error and a bare 400):
    the pixel for pixel paths, since a bad token always gets the pixel, and
    a 400 page for the rest.  Anything else goes to Klein.

    @ivar frontRoute: the application's L{TrackingApp.frontRoute}, for the
        site to call before it looks for a resource.
    """

    isLeaf = True

    def __init__(self, inner: Resource, app: "TrackingApp") -> None:
        super().__init__()
        self._inner = inner
        self.frontRoute = app.frontRoute

    def render(self, request):
        path = b"/" + b"/".join(request.postpath)
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


# A token segment with nothing to decode: URL-unreserved characters only
# (the relay's tokens are URL-safe base64; the pixel's ends in ".gif").
_PLAIN_TOKEN = re.compile(rb"[A-Za-z0-9_.~-]+")


def makeSite(app: TrackingApp) -> Site:
    """
    A quiet Twisted Web site serving C{app} alone on C{app.clock}, never
    showing tracebacks, whose access log shows no tokens
    (L{accessLogFormatter}), with the front route
    (L{smartrelay.web.site.makeSite}).
    """
    return _makeSite(app.resource(), app.clock)
