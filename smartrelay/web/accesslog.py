# -*- test-case-name: tests.test_web_accesslog -*-
"""
Where the web site's access log goes (C{[web] access_log}).

  - C{log} (the default): a line per request in the relay's own log, as
    Twisted Web writes it (L{RelayLogLines}: the same lines, with the same
    time stamps, written in batches every L{LOG_FLUSH_INTERVAL} seconds);
  - C{off}: no access log;
  - a file path: lines appended to that file, kept in memory and written
    in one C{write} every second (and when 64 KiB are waiting, and at
    stop), as nginx's C{access_log ... buffer= flush=} does.  At tracking
    campaign rates a line per request through the logging system costs
    about a fifth of the reactor thread (C{bench/clicks.py}); a crash
    loses at most the last second of access lines, never anything else.
    C{SIGHUP} reopens the file (for logrotate).

The lines are the same in every case: L{accessLogFormatter}, Twisted's
combined log format with no tokens (L{loggedPath}) and the referrer cut to
its origin.
"""

import hashlib
import os
import re
from typing import Any, Optional
from urllib.parse import quote, unquote_to_bytes, urlsplit

from twisted.application.service import Service
from twisted.internet.task import LoopingCall
from twisted.logger import LogLevel, Logger, globalLogPublisher
from twisted.web.http import _escape
from twisted.web.iweb import IAccessLogFormatter
from zope.interface import provider

from smartrelay import logs

__all__ = [
    "AccessLogFile",
    "FLUSH_INTERVAL",
    "LOG_FLUSH_INTERVAL",
    "MAX_WAITING",
    "RelayLogLines",
    "accessLogFormatter",
    "loggedPath",
]

#: Seconds between writes of the waiting lines.
FLUSH_INTERVAL = 1.0

#: Bytes of waiting lines that make a write at once.
MAX_WAITING = 64 * 1024


class AccessLogFile(Service):
    """
    An access log file that Twisted Web's C{HTTPFactory} writes lines to
    (its C{write(str)}), written to disk in batches.

    The file is opened when the service starts (a path that cannot be
    opened stops start-up with one line) and closed, after a last write,
    when it stops.

    @ivar path: the file, opened for appending (created 0640).
    @ivar clock: an C{IReactorTime} for the periodic write.
    """

    log = Logger()

    def __init__(self, path: str, clock) -> None:
        self.path = path
        self.clock = clock
        self._fd: Optional[int] = None
        self._waiting: list[bytes] = []
        self._size = 0
        self._timer = LoopingCall(self.flush)
        self._timer.clock = clock
        self._failed = False

    def open(self) -> None:
        """
        Open (or reopen, after a last write) the file.

        @raise OSError: it cannot be opened.
        """
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        if self._fd is not None:
            self.flush()
            os.close(self._fd)
        self._fd = fd
        self._failed = False

    def reopen(self) -> None:
        """
        Write what waits and start a new file at C{path} (after logrotate
        moved the old one); if it cannot be opened, keep the old one and
        log why.
        """
        try:
            self.open()
        except OSError as e:
            self.log.error("cannot reopen the access log {path}: {why}; still writing the old file",
                           path=self.path, why=e.strerror or str(e))

    def write(self, line: str) -> None:
        """
        Keep C{line} to be written with the next batch.
        """
        data = line.encode("utf-8", "replace")
        self._waiting.append(data)
        self._size += len(data)
        if self._size >= MAX_WAITING:
            self.flush()

    def flush(self) -> None:
        """
        Write the waiting lines now; an error is logged once until a write
        works again, and those lines are dropped (an access log must never
        stop the site).
        """
        if not self._waiting or self._fd is None:
            return
        data = b"".join(self._waiting)
        self._waiting.clear()
        self._size = 0
        try:
            while data:
                data = data[os.write(self._fd, data):]
            self._failed = False
        except OSError as e:
            if not self._failed:
                self.log.error("cannot write the access log {path}: {why}; lines dropped",
                               path=self.path, why=e.strerror or str(e))
            self._failed = True

    def startService(self) -> None:
        if self._fd is None:
            self.open()
        super().startService()
        self._timer.start(FLUSH_INTERVAL, now=False)

    def stopService(self) -> None:
        super().stopService()
        if self._timer.running:
            self._timer.stop()
        self.flush()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


#: Seconds between writes of the waiting lines to the relay's log
#: (C{[web] access_log = log}).
LOG_FLUSH_INTERVAL = logs.FLUSH_INTERVAL

#: Lines waiting for the relay's log that make a write at once.
MAX_LOG_LINES = logs.MAX_LINES

# What Twisted's legacy log file (C{twisted.python.log.logfile}, a
# C{LoggingFile}), which Twisted Web writes its access lines to by default,
# gives them: this namespace, at level info, the line as C{log_io}.
_LEGACY_NAMESPACE = "twisted.python.log"


class RelayLogLines(logs.BatchedLog):
    """
    C{[web] access_log = log}: Twisted Web's access lines (its C{write(str)})
    in the relay's log, as they were written through Twisted's legacy log
    file, but in batches (L{BatchedLog}): each line is kept with the time it
    was written and they are logged together every L{LOG_FLUSH_INTERVAL}
    seconds (at once when L{MAX_LOG_LINES} are waiting, and when the site
    stops).

    At tracking campaign rates a line through the log system costs 20 to
    70 microseconds of the reactor thread; written directly to twistd's
    text log file, a batch costs a fraction of that.  Either way a line
    reads as it did, C{TIME [twisted.python.log#info] "1.2.3.4" - - ...};
    a crash loses at most the last L{LOG_FLUSH_INTERVAL} seconds of access
    lines.

    @ivar clock: an C{IReactorTime}: the lines' times and the batches.
    @ivar publisher: the log publisher (Twisted's global one).
    """

    def __init__(self, clock, publisher: Any = globalLogPublisher) -> None:
        super().__init__(
            clock,
            _LEGACY_NAMESPACE,
            publisher,
            textKey="log_io",
            interval=LOG_FLUSH_INTERVAL,
            maxLines=MAX_LOG_LINES,
        )
        self._partial = ""

    def write(self, text: str) -> None:
        """
        Keep the lines of C{text} (a line ends with C{"\\n"}; the rest
        waits for the next C{write}, as in a file) to be logged with the
        next batch.
        """
        if self._partial:
            text, self._partial = self._partial + text, ""
        if text.endswith("\n") and text.count("\n") == 1:
            self.add(LogLevel.info, text[:-1])
            return
        lines = text.split("\n")
        self._partial = lines.pop()
        for line in lines:
            self.add(LogLevel.info, line)


# -- the lines ------------------------------------------------------------

# A token's path segment: what follows a route prefix, after any
# leading path (a proxy's prefix, doubled slashes).
_TOKEN_ROUTE = re.compile(rb"(?:^|/)(?:t/[oc]|u)/")

# The usual spelling of a token route: nothing to decode, merge or quote,
# so L{loggedPath} can skip straight to the hash.
_PLAIN_TOKEN_PATH = re.compile(rb"/(t/[oc]|u)/([A-Za-z0-9_.~-]*)")


def _hashed(token: bytes) -> bytes:
    return b"<token:" + hashlib.sha256(token).hexdigest()[:8].encode("ascii") + b">"


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
    plain = _PLAIN_TOKEN_PATH.fullmatch(path)
    if plain is not None:
        # What the general case below gives for this path, sooner.
        route, token = plain.groups()
        suffix = b""
        if route == b"t/o" and token.endswith(b".gif"):
            token, suffix = token[:-4], b".gif"
        return b"/" + route + b"/" + _hashed(token) + suffix + (b"?<query>" if query else b"")
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
        path = path[: match.end()] + _hashed(token) + suffix
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


# Printable ASCII but the double quote and the backslash: Twisted's
# C{_escape} gives such text back unchanged.
_PLAIN_TEXT = re.compile(rb"[ !#-\[\]-~]*")


def _quoted(value) -> str:
    """
    C{twisted.web.http._escape(value)}, without its C{repr} for the usual
    value that needs no escaping.
    """
    if isinstance(value, str):
        if value.isascii() and _PLAIN_TEXT.fullmatch(value.encode("ascii")) is not None:
            return value
    elif _PLAIN_TEXT.fullmatch(value) is not None:
        return value.decode("ascii")
    return _escape(value)


@provider(IAccessLogFormatter)
def accessLogFormatter(timestamp: str, request) -> str:
    """
    Twisted's combined log line for C{request}
    (L{twisted.web.http.combinedLogFormatter}), but with the URI of
    L{loggedPath} (no token, no query) and the referrer's origin only: for
    a click, C{"GET /t/c/<token:1a2b3c4d> HTTP/1.1" 302 ...}.

    It is built here rather than by Twisted's formatter, with the same
    text: at tracking campaign rates Twisted's escaping of every field
    through C{repr} is a noticeable share of the reactor thread.
    """
    host = getattr(request.getClientAddress(), "host", None)
    referrer = request.getHeader(b"referer")
    agent = request.getHeader(b"user-agent")
    return '"%s" - - %s "%s %s %s" %d %s "%s" "%s"' % (
        "-" if host is None else _quoted(host),
        timestamp,
        _quoted(request.method),
        loggedPath(request.uri).decode("ascii"),
        _quoted(request.clientproto),
        request.code,
        request.sentLength or "-",
        "-" if not referrer else _quoted(_origin(referrer)),
        _quoted(agent or b"-"),
    )
