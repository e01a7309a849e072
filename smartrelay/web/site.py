"""
The one web site of the relay (DESIGN section 1.6): which application
answers which path, and who the client of a request is.

L{SiteRoot} sends a request to an application by the first segment of its
path (C{api} to the HTTP API, C{metrics} and C{healthz} to theirs, C{t}
and C{u} to the tracking and unsubscribe routes) and everything else to
the default application, the reports UI (C{service.py} builds it).  Every
application sees the whole path (its Klein routes are written
C{/api/v1/...}, C{/t/c/<token>}), so none needs to know where it is
mounted::

    root = SiteRoot(tracking.resource(), {b"api": api.resource()})
    site = makeSite(root, clock)

To add an application, give it a first path segment of its own in the
mapping (C{service.py} builds it).

Front routes: an application's resource may have a C{frontRoute(request)}
method, which the site's requests (L{BoundedRequest}) call, through
L{SiteRoot.frontRoute}, before any resource is looked up for a request
whose first segment is the application's.  It either answers and
finishes the request and returns L{True}, or does nothing and returns
L{False}, and the request is processed as usual.  The tracking
application answers its click redirect and open pixel there
(L{smartrelay.web.tracking.TrackingApp.frontRoute}): those see campaign
bursts, and Twisted Web's traversal and header handling cost more than
the routes themselves.

Who the client of a request is (behind C{[web] trusted_proxies}) is
L{smartrelay.web.proxies.clientAddress}.
"""

from typing import Any, Optional

from twisted.python import log
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from smartrelay.web.accesslog import RelayLogLines, accessLogFormatter

__all__ = ["MAX_BODY", "BoundedRequest", "SiteRoot", "makeSite"]


class SiteRoot(Resource):
    """
    Dispatches on the first path segment; the chosen resource (a leaf,
    such as a Klein resource) sees the request's whole path.

    @ivar default: the resource for every other first segment.
    @ivar mounts: first segment (bytes) → resource.
    """

    def __init__(self, default: Resource, mounts: Optional[dict] = None) -> None:
        super().__init__()
        self.default = default
        self.mounts = dict(mounts or {})
        self._fronts = {
            segment: resource.frontRoute
            for segment, resource in self.mounts.items()
            if getattr(resource, "frontRoute", None) is not None
        }

    def frontRoute(self, request) -> bool:
        """
        The front route of the application mounted under the request's
        first path segment, if it has one: L{True} if it answered the
        request.
        """
        path = request.path
        end = path.find(b"/", 1)
        front = self._fronts.get(path[1:end] if end > 0 else path[1:])
        return front is not None and front(request)

    def getChildWithDefault(self, path: bytes, request) -> Resource:
        # Put the segment back: the application routes the whole path.
        request.postpath.insert(0, request.prepath.pop())
        return self.mounts.get(path, self.default)

    def render(self, request):
        # A request for no path at all ("" is the path of "/").
        return self.default.render(request)


#: The largest request body the site keeps; the bytes of a bigger one are
#: read and dropped (the application answers 413).
MAX_BODY = 16 * 1024 * 1024


class _Dropped:
    """
    The C{content} of a request whose body is too large: takes every
    write, keeps nothing, reads as empty.
    """

    def write(self, data: bytes) -> None:
        pass

    def read(self, size: int = -1) -> bytes:
        return b""

    def seek(self, offset: int, whence: int = 0) -> int:
        return 0

    def tell(self) -> int:
        return 0

    def close(self) -> None:
        pass


class BoundedRequest(Request):
    """
    A request that keeps at most L{MAX_BODY} bytes of its body, in memory
    or a temporary file as Twisted does; past that (said by
    C{Content-Length} or found while a chunked body arrives) the body is
    dropped and C{bodyTooLarge} is set, for the application to answer
    C{413}.  Without it a client could make the relay store any amount.
    """

    maxBody = MAX_BODY
    bodyTooLarge = False
    _received = 0

    def process(self) -> None:
        """
        Give the site's front route (its root resource's C{frontRoute},
        if any) the first go at the request, then process it as usual.
        """
        self.site = self.channel.site
        front = getattr(self.site.resource, "frontRoute", None)
        if front is not None:
            try:
                if front(self):
                    return
            except BaseException:
                self.processingFailed(Failure())
                return
        super().process()

    def gotLength(self, length: Optional[int]) -> None:
        if length is not None and length > self.maxBody:
            self.bodyTooLarge = True
            self.content = _Dropped()
        else:
            super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self.bodyTooLarge:
            return
        self._received += len(data)
        if self._received > self.maxBody:
            self.bodyTooLarge = True
            self.content.close()
            self.content = _Dropped()
            return
        super().handleContentChunk(data)


class _Site(Site):
    """
    A site whose access log goes where C{[web] access_log} says: the
    relay's log (in batches, L{RelayLogLines}), nowhere (C{accessLog} L{None}), or
    an object with C{write(str)} such as
    L{smartrelay.web.accesslog.AccessLogFile}.
    """

    accessLog: Any = "log"

    def startFactory(self) -> None:
        super().startFactory()
        if self.accessLog == "log":
            # The relay's log, in batches (the same lines).
            self._logFile = RelayLogLines(self.reactor)
        else:
            self._logFile = self.accessLog

    def stopFactory(self) -> None:
        # Twisted Web closes a log file of its own; this one is the relay's.
        if isinstance(self._logFile, RelayLogLines):
            self._logFile.flush()
        self._logFile = log.logfile
        super().stopFactory()


def makeSite(root: Resource, clock, accessLog: Any = "log") -> Site:
    """
    A quiet Twisted Web site serving C{root} on C{clock}, never showing
    tracebacks, whose access log shows no tokens
    (L{smartrelay.web.accesslog.accessLogFormatter}), keeping at most
    L{MAX_BODY} bytes of a request body (L{BoundedRequest}), answering
    its front routes before Klein (L{BoundedRequest.process}).

    @param accessLog: C{"log"} for the relay's log, L{None} for no access
        log, or a file-like C{write(str)} (L{AccessLogFile
        <smartrelay.web.accesslog.AccessLogFile>}).
    """
    site = _Site(
        root, requestFactory=BoundedRequest, logFormatter=accessLogFormatter, reactor=clock
    )
    site.accessLog = accessLog
    site.noisy = False
    site.displayTracebacks = False
    return site
