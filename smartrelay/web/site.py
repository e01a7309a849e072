"""
The one web site of the relay (DESIGN section 1.6): which application
answers which path, and who the client of a request is.

L{SiteRoot} sends a request to an application by the first segment of its
path (C{api} to the HTTP API, C{metrics} and C{healthz} to theirs) and
everything else to the tracking and unsubscribe routes.  Every
application sees the whole path (its Klein routes are written
C{/api/v1/...}, C{/t/c/<token>}), so none needs to know where it is
mounted::

    root = SiteRoot(tracking.resource(), {b"api": api.resource()})
    site = makeSite(root, clock)

To add an application, give it a first path segment of its own in the
mapping (C{service.py} builds it).

Who the client of a request is (behind C{[web] trusted_proxies}) is
L{smartrelay.web.proxies.clientAddress}.
"""

from typing import Optional

from twisted.web.resource import Resource
from twisted.web.server import Site

from smartrelay.web.tracking import accessLogFormatter

__all__ = ["SiteRoot", "makeSite"]


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

    def getChildWithDefault(self, path: bytes, request) -> Resource:
        # Put the segment back: the application routes the whole path.
        request.postpath.insert(0, request.prepath.pop())
        return self.mounts.get(path, self.default)

    def render(self, request):
        # A request for no path at all ("" is the path of "/").
        return self.default.render(request)


def makeSite(root: Resource, clock) -> Site:
    """
    A quiet Twisted Web site serving C{root} on C{clock}, never showing
    tracebacks, whose access log shows no tokens
    (L{smartrelay.web.tracking.accessLogFormatter}).
    """
    site = Site(root, logFormatter=accessLogFormatter, reactor=clock)
    site.noisy = False
    site.displayTracebacks = False
    return site
