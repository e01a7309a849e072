"""
Tests for L{smartrelay.web.accesslog} and C{[web] access_log}: where the
site's access lines go.
"""

import io
import os
import re

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.task import Clock
from twisted.logger import (
    LoggingFile,
    Logger,
    LogLevel,
    LogPublisher,
    formatEvent,
    formatTime,
    textFileLogObserver,
)
from twisted.logger import _logger
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from smartrelay.config import ConfigError, parseConfig
from twisted.web.http import combinedLogFormatter

from smartrelay.web import accesslog
from smartrelay.web.accesslog import (
    FLUSH_INTERVAL,
    LOG_FLUSH_INTERVAL,
    MAX_LOG_LINES,
    MAX_WAITING,
    AccessLogFile,
    RelayLogLines,
    _origin,
    accessLogFormatter,
    loggedPath,
)
from smartrelay.web.site import makeSite


class AccessLogFileTests(SynchronousTestCase):
    """
    L{AccessLogFile} writes lines in batches.
    """

    def setUp(self):
        self.clock = Clock()
        self.path = os.path.join(self.mktemp() + "-dir", "access.log")
        os.makedirs(os.path.dirname(self.path))
        self.log = AccessLogFile(self.path, self.clock)
        self.log.startService()
        self.addCleanup(lambda: self.log.running and self.log.stopService())

    def read(self):
        with open(self.path, "rb") as f:
            return f.read()

    def test_batched(self):
        """
        Lines wait in memory until the next second's write.
        """
        self.log.write("one\n")
        self.log.write("two\n")
        self.assertEqual(self.read(), b"")
        self.clock.advance(FLUSH_INTERVAL)
        self.assertEqual(self.read(), b"one\ntwo\n")

    def test_full(self):
        """
        64 KiB of waiting lines are written at once.
        """
        line = "x" * 1023 + "\n"
        for _ in range(MAX_WAITING // len(line)):
            self.log.write(line)
        self.assertEqual(len(self.read()), MAX_WAITING)

    def test_stop(self):
        """
        Stopping writes what waits and closes the file.
        """
        self.log.write("last\n")
        self.log.stopService()
        self.assertEqual(self.read(), b"last\n")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_appends(self):
        """
        An existing file is appended to, never truncated.
        """
        self.log.stopService()
        with open(self.path, "wb") as f:
            f.write(b"old\n")
        log = AccessLogFile(self.path, self.clock)
        log.startService()
        log.write("new\n")
        log.stopService()
        self.assertEqual(self.read(), b"old\nnew\n")

    def test_reopen(self):
        """
        After the file is moved away (logrotate), C{reopen} writes the
        waiting lines to the old file and the next ones to a new file.
        """
        self.log.write("before\n")
        os.rename(self.path, self.path + ".1")
        self.log.reopen()
        self.log.write("after\n")
        self.clock.advance(FLUSH_INTERVAL)
        with open(self.path + ".1", "rb") as f:
            self.assertEqual(f.read(), b"before\n")
        self.assertEqual(self.read(), b"after\n")

    def test_reopenFails(self):
        """
        A file that cannot be reopened keeps the old one, with a log line.
        """
        os.rename(self.path, self.path + ".1")
        os.rename(os.path.dirname(self.path), os.path.dirname(self.path) + "-gone")
        self.log.reopen()
        self.log.write("still\n")
        self.clock.advance(FLUSH_INTERVAL)
        gone = os.path.join(os.path.dirname(self.path) + "-gone", "access.log.1")
        with open(gone, "rb") as f:
            self.assertEqual(f.read(), b"still\n")
        self.assertEqual(len(self.flushLoggedErrors()), 0)

    def test_writeFails(self):
        """
        A failed write drops those lines with one error line, and the site
        goes on.
        """
        os.close(self.log._fd)
        self.log._fd = os.open(os.devnull, os.O_RDONLY)
        logged = []
        self.log.log = Logger(observer=logged.append)
        self.log.write("lost\n")
        self.clock.advance(FLUSH_INTERVAL)
        self.log.write("lost too\n")
        self.clock.advance(FLUSH_INTERVAL)
        self.assertEqual(len(logged), 1)
        self.assertIn("cannot write the access log", logged[0]["log_format"])

    def test_nonUTF8(self):
        """
        A line is written as UTF-8, anything unencodable replaced.
        """
        self.log.write("caf\u00e9 \udcff\n")
        self.clock.advance(FLUSH_INTERVAL)
        self.assertEqual(self.read(), "caf\u00e9 ?\n".encode("utf-8"))


class _Bytes(io.BytesIO):
    """
    A binary file whose text a L{FileLogObserver} writes as UTF-8.
    """


class RelayLogLinesTests(SynchronousTestCase):
    """
    L{RelayLogLines} logs access lines in batches, as Twisted's legacy log
    file logs them one by one.
    """

    LINE = '"127.0.0.1" - - [07/Dec/2026:23:47:27 +0000] "GET /t/c/<token:7d38d8ea> HTTP/1.1" 302 687 "-" "-"'

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1_765_150_000.5)
        self.publisher = LogPublisher()

    def legacyText(self, lines, when):
        """
        What twistd's log file gets for C{lines} written at C{when} through
        Twisted's legacy log file (C{LoggingFile}), one event each.
        """
        out = io.StringIO()
        publisher = LogPublisher(textFileLogObserver(out))
        logFile = LoggingFile(Logger(namespace="twisted.python.log", observer=publisher))
        original = _logger.time
        _logger.time = lambda: when
        try:
            for line in lines:
                logFile.write(line + "\n")
        finally:
            _logger.time = original
        return out.getvalue()

    def test_batchedToLogFile(self):
        """
        With twistd's text log file as the only observer, the lines wait
        for L{LOG_FLUSH_INTERVAL} and are then written in one C{write}, the
        text being what the legacy log file gave, time stamps included.
        """
        out = io.StringIO()
        writes = []
        original = out.write
        out.write = lambda text: (writes.append(text), original(text))[1]
        self.publisher.addObserver(textFileLogObserver(out))
        lines = RelayLogLines(self.clock, self.publisher)
        self.clock.advance(0.4)
        first = self.clock.seconds()
        lines.write(self.LINE + "\n")
        lines.write("caf\u00e9 \"x\"\n")
        self.clock.advance(LOG_FLUSH_INTERVAL / 2)  # into the next second
        lines.write(self.LINE + "\n")
        self.assertEqual(out.getvalue(), "")
        self.clock.advance(LOG_FLUSH_INTERVAL / 2 + 0.01)
        self.assertEqual(len(writes), 1)
        self.assertEqual(
            out.getvalue(),
            self.legacyText([self.LINE, "caf\u00e9 \"x\""], first)
            + self.legacyText([self.LINE], first + LOG_FLUSH_INTERVAL / 2),
        )
        self.assertNotEqual(int(first), int(first + LOG_FLUSH_INTERVAL / 2))
        self.assertIn("[twisted.python.log#info] " + self.LINE + "\n", out.getvalue())

    def test_binaryLogFile(self):
        """
        A log file the observer writes UTF-8 bytes to gets them.
        """
        out = _Bytes()
        self.publisher.addObserver(textFileLogObserver(out))
        lines = RelayLogLines(self.clock, self.publisher)
        lines.write("caf\u00e9\n")
        lines.flush()
        self.assertEqual(
            out.getvalue(),
            self.legacyText(["caf\u00e9"], self.clock.seconds()).encode("utf-8"),
        )

    def test_otherObservers(self):
        """
        With any other observers (a JSON log, several), each line is an
        event of its own, with the time it was written, as the legacy log
        file emits it.
        """
        events = []
        self.publisher.addObserver(events.append)
        lines = RelayLogLines(self.clock, self.publisher)
        lines.write(self.LINE + "\n")
        when = self.clock.seconds()
        self.clock.advance(LOG_FLUSH_INTERVAL)
        [event] = events
        self.assertEqual(formatEvent(event), self.LINE)
        self.assertEqual(event["log_time"], when)
        self.assertEqual(event["log_namespace"], "twisted.python.log")
        self.assertEqual(event["log_level"], LogLevel.info)
        self.assertEqual(event["log_io"], self.LINE)

        out = io.StringIO()
        self.publisher.addObserver(textFileLogObserver(out))
        lines.write(self.LINE + "\n")
        lines.flush()
        self.assertEqual(len(events), 2)
        self.assertEqual(out.getvalue(), self.legacyText([self.LINE], self.clock.seconds()))

    def test_otherFormat(self):
        """
        A text file observer that formats lines otherwise than twistd's
        (another time format) gets events.
        """
        out = io.StringIO()
        self.publisher.addObserver(textFileLogObserver(out, timeFormat="%H:%M"))
        lines = RelayLogLines(self.clock, self.publisher)
        lines.write("x\n")
        lines.flush()
        self.assertEqual(out.getvalue(), formatTime(self.clock.seconds(), "%H:%M")
                         + " [twisted.python.log#info] x\n")

    def test_full(self):
        """
        L{MAX_LOG_LINES} waiting lines are logged at once.
        """
        out = io.StringIO()
        self.publisher.addObserver(textFileLogObserver(out))
        lines = RelayLogLines(self.clock, self.publisher)
        for n in range(MAX_LOG_LINES - 1):
            lines.write(f"{n}\n")
        self.assertEqual(out.getvalue(), "")
        lines.write("last\n")
        self.assertEqual(out.getvalue().count("\n"), MAX_LOG_LINES)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_partialLines(self):
        """
        Text without its newline waits for the rest, as in a file.
        """
        events = []
        self.publisher.addObserver(events.append)
        lines = RelayLogLines(self.clock, self.publisher)
        lines.write("a\nb")
        lines.write("c\nd\n")
        lines.flush()
        self.assertEqual([e["log_io"] for e in events], ["a", "bc", "d"])

    def test_brokenFile(self):
        """
        If the direct write fails, the lines go through the publisher
        (which deals with its broken observer).
        """
        out = io.StringIO()
        out.close()
        observer = textFileLogObserver(out)
        events = []
        self.publisher.addObserver(observer)
        self.publisher.addObserver(events.append)
        self.publisher.removeObserver(events.append)
        lines = RelayLogLines(self.clock, self.publisher)
        errors = []
        self.publisher._errorLoggerForObserver = lambda o: Logger(observer=errors.append)
        lines.write("x\n")
        lines.flush()
        self.assertEqual(len(errors), 1)

    def test_site(self):
        """
        A site whose access log is C{"log"} logs through L{RelayLogLines}
        and writes what waits when it stops.
        """
        site = makeSite(Hello(), self.clock, "log")
        site.doStart()
        self.assertIsInstance(site._logFile, RelayLogLines)
        events = []
        site._logFile.publisher = LogPublisher(events.append)
        request = site.requestFactory(_Channel(site), False)
        request.method, request.uri, request.clientproto = b"GET", b"/t/c/tok", b"HTTP/1.1"
        site.log(request)
        self.assertEqual(events, [])
        site.doStop()
        [event] = events
        self.assertIn('"GET /t/c/<token:', event["log_io"])


class Hello(Resource):
    isLeaf = True

    def render_GET(self, request):
        return b"hello"


class SiteAccessLogTests(SynchronousTestCase):
    """
    L{makeSite} sends its access lines where C{accessLog} says.
    """

    def test_file(self):
        """
        With an L{AccessLogFile}, a request's line goes to it.
        """
        written = []

        class Lines:
            def write(self, line):
                written.append(line)

        site = makeSite(Hello(), Clock(), Lines())
        site.doStart()
        self.addCleanup(site.doStop)
        request = site.requestFactory(_Channel(site), False)
        request.method, request.uri, request.clientproto = b"GET", b"/t/c/tok", b"HTTP/1.1"
        site.log(request)
        [line] = written
        self.assertIn('"GET /t/c/<token:', line)

    def test_stopLeavesFileOpen(self):
        """
        Stopping the site does not close the access log file: the relay
        stops it (after a last write) as a service of its own.
        """

        class Lines:
            def write(self, line):
                pass

            def close(self):
                self.fail("closed")

        for accessLog in [Lines(), None]:
            site = makeSite(Hello(), Clock(), accessLog)
            site.doStart()
            site.doStop()

    def test_off(self):
        """
        With L{None}, nothing is logged and nothing is formatted.
        """
        site = makeSite(Hello(), Clock(), None)
        site.doStart()
        self.addCleanup(site.doStop)
        site._logFormatter = lambda *a: self.fail("formatted")
        site.log(object())


class _Channel:
    def __init__(self, site):
        self.site = site
        self.transport = None

    def getPeer(self):
        from twisted.internet.address import IPv4Address

        return IPv4Address("TCP", "127.0.0.1", 1234)

    def getHost(self):
        return self.getPeer()


class ConfigTests(SynchronousTestCase):
    """
    C{[web] access_log}.
    """

    def parse(self, value):
        return parseConfig(f"[web]\naccess_log = {value}\n", "etc/x.ini").web.access_log

    def test_values(self):
        """
        C{log} (the default), C{off} and a writable file path.
        """
        self.assertEqual(parseConfig("", "x").web.access_log, "log")
        self.assertEqual(self.parse("off"), "off")
        path = os.path.abspath(self.mktemp())
        self.assertEqual(self.parse(path), path)

    def test_bad(self):
        """
        A path whose directory is missing, a directory, an unwritable
        place or nothing: one-line errors naming the key.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        os.chmod(directory, 0o500)
        self.addCleanup(os.chmod, directory, 0o700)
        for value, problem in [
            ("/nonexistent/dir/access.log", "the directory of '/nonexistent/dir/access.log' does not exist"),
            (directory, f"{directory!r} is a directory"),
            ("", "expected log, off or a file path"),
        ] + ([] if os.geteuid() == 0 else [
            (os.path.join(directory, "a.log"), f"{os.path.join(directory, 'a.log')!r} cannot be written"),
        ]):
            with self.assertRaises(ConfigError) as e:
                self.parse(value)
            self.assertIn("access_log", str(e.exception))
            self.assertIn(problem, str(e.exception))
            self.assertNotIn("\n", str(e.exception))


class _Request:
    """
    What an access log formatter reads of a request.
    """

    def __init__(self, uri, userAgent=None, referrer=None, client=None, method=b"GET",
                 clientproto=b"HTTP/1.1", code=200, sentLength=0):
        self.uri, self.method, self.clientproto = uri, method, clientproto
        self.code, self.sentLength = code, sentLength
        self._client = client
        self._headers = {b"user-agent": userAgent, b"referer": referrer}

    def getClientAddress(self):
        return self._client

    def getHeader(self, name):
        return self._headers.get(name.lower())


class _Logged:
    """
    The request as Twisted's own formatter is to see it: the URI of
    L{loggedPath} and the referrer's origin (what L{accessLogFormatter}
    is defined as).
    """

    def __init__(self, request):
        self._request = request
        self.uri = loggedPath(request.uri)

    def getHeader(self, name):
        value = self._request.getHeader(name)
        if value is not None and name.lower() == b"referer":
            return _origin(value)
        return value

    def __getattr__(self, name):
        return getattr(self._request, name)


def _slowLoggedPath(uri: bytes) -> bytes:
    """
    L{loggedPath} without its shortcut for plain token paths.
    """
    with_shortcut = accesslog._PLAIN_TOKEN_PATH
    accesslog._PLAIN_TOKEN_PATH = re.compile(rb"(?!)")
    try:
        return loggedPath(uri)
    finally:
        accesslog._PLAIN_TOKEN_PATH = with_shortcut


_segments = st.text(alphabet="AZaz09_.~-%/?", max_size=12).map(str.encode)


class FormatterTests(SynchronousTestCase):
    """
    L{accessLogFormatter} writes the line Twisted's combined log formatter
    would, over the logged URI and the referrer's origin.
    """

    @given(
        uri=st.one_of(
            st.builds(lambda r, s: b"/" + r + b"/" + s, st.sampled_from([b"t/c", b"t/o", b"u", b"x"]), _segments),
            st.binary(max_size=40).map(lambda b: b"/" + b),
        ),
        userAgent=st.one_of(st.none(), st.binary(max_size=30), st.text(max_size=20).map(str.encode)),
        referrer=st.one_of(st.none(), st.just(b""), st.binary(max_size=30),
                           st.just(b"https://user@webmail.example:8443/inbox?q=1")),
        client=st.sampled_from([
            IPv4Address("TCP", "192.0.2.7", 1), IPv6Address("TCP", "2001:db8::1", 1),
            UNIXAddress(b"/tmp/sock"), None,
        ]),
        method=st.sampled_from([b"GET", b"HEAD", b'PO"ST', b"\xff"]),
        sentLength=st.integers(0, 10_000),
    )
    def test_sameAsTwisted(self, uri, userAgent, referrer, client, method, sentLength):
        """
        For any request, the same text as
        L{twisted.web.http.combinedLogFormatter}.
        """
        request = _Request(uri, userAgent, referrer, client, method, sentLength=sentLength)
        timestamp = "[07/Dec/2026:15:00:00 +0000]"
        self.assertEqual(
            accessLogFormatter(timestamp, request),
            combinedLogFormatter(timestamp, _Logged(request)),
        )

    @given(
        route=st.sampled_from([b"/t/c/", b"/t/o/", b"/u/", b"/t/x/", b"//t/c/", b"/a/u/"]),
        segment=_segments,
        suffix=st.sampled_from([b"", b".gif", b"?", b"?a=b"]),
    )
    def test_plainPathsShortcut(self, route, segment, suffix):
        """
        The shortcut for plain token paths gives what the general case
        gives.
        """
        uri = route + segment + suffix
        self.assertEqual(loggedPath(uri), _slowLoggedPath(uri))
