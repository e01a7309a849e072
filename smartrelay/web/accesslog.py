# -*- test-case-name: tests.test_web_accesslog -*-
"""
Where the web site's access log goes (C{[web] access_log}).

  - C{log} (the default): a line per request in the relay's own log, as
    Twisted Web writes it;
  - C{off}: no access log;
  - a file path: lines appended to that file, kept in memory and written
    in one C{write} every second (and when 64 KiB are waiting, and at
    stop), as nginx's C{access_log ... buffer= flush=} does.  At tracking
    campaign rates a line per request through the logging system costs
    about a fifth of the reactor thread (C{bench/clicks.py}); a crash
    loses at most the last second of access lines, never anything else.
    C{SIGHUP} reopens the file (for logrotate).

The lines are the same in every case: L{accessLogFormatter
<smartrelay.web.tracking.accessLogFormatter>}, with no tokens.
"""

import os
from typing import Optional

from twisted.application.service import Service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

__all__ = ["AccessLogFile", "FLUSH_INTERVAL", "MAX_WAITING"]

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
