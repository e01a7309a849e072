# -*- test-case-name: tests.test_logs -*-
"""
The relay's log: one line per accepted message and one per delivery
attempt's outcome (L{MessageLog}), and a JSON log observer for twistd
(L{jsonObserver}).

The message lines look like Postfix's, so that an operator can grep the log
for the queue id of a C{250} reply::

    accepted 2A/01-00000-6921A3F0 from=<app@example.com> size=1234 nrcpt=2 client=127.0.0.1 user=app1
    2A/01-00000-6921A3F0 to=<b@example.org> relay=mx.example.org delay=1.2 attempts=1 dsn=2.0.0 status=delivered (250 2.0.0 Ok: queued as ABC)
    2A/01-00000-6921A3F0 to=<c@example.net> relay=mx.example.net delay=1.3 attempts=1 dsn=4.2.2 status=deferred (452 4.2.2 Mailbox full) next_attempt=2025-06-01T12:05:00.000Z

They are C{twisted.logger} events of the namespace L{NAMESPACE} whose
format names fields (C{queue_id}, C{sender}, C{recipient}, C{relay},
C{delay}, C{status}, C{reply}...), so the JSON observer writes each one as
an object with those fields.

Select the JSON observer with twistd's C{--logger}::

    twistd -n --logger smartrelay.logs.jsonObserver smartrelay --config etc/smartrelay.ini

It writes one JSON object per line to standard output (twistd calls a
C{--logger} factory with no arguments, so it cannot see C{--logfile}); use
it with C{-n} (systemd, containers, or a shell redirection), since a
daemon's standard output is C{/dev/null}.

The relay's L{MessageLog} (given the reactor as its clock) and the web
site's access lines in the relay's log write in batches (L{BatchedLog}):
the lines are kept with their time and logged every L{FLUSH_INTERVAL}
seconds, the same lines with the same time stamps; a crash loses at most
that much of them.
"""

import json
import sys
import time
from typing import Any, Optional, TextIO

import attrs
from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    Logger,
    LogLevel,
    formatEvent,
    formatTime,
    globalLogPublisher,
)
from zope.interface import implementer

from smartrelay.events import rfc3339

__all__ = [
    "FLUSH_INTERVAL",
    "MAX_LINES",
    "NAMESPACE",
    "BatchedLog",
    "MessageLog",
    "JSONLinesObserver",
    "eventAsJSONLine",
    "jsonObserver",
]

#: The namespace of the per-message lines.
NAMESPACE = "smartrelay.messages"

_ACCEPTED = "accepted {queue_id} from=<{sender}> size={size} nrcpt={nrcpt} client={client}"
_ACCEPTED_USER = _ACCEPTED + " user={user}"
_OUTCOME = (
    "{queue_id} to=<{recipient}> relay={relay} delay={delay:.1f} attempts={attempts} "
    "dsn={dsn} status={status} ({reply})"
)
_DEFERRED = _OUTCOME + " next_attempt={next_attempt}"
_SUPPRESSED = "{queue_id} to=<{recipient}> relay=none delay={delay:.1f} status=suppressed ({reply})"
_PARKED = (
    "{destination} suspended: {count} parked relay=none dsn={dsn} status=deferred ({reply}) "
    "next_attempt={next_attempt}: {members}"
)

#: The level of each outcome's line.
_LEVELS = {"expired": LogLevel.warn}


# ---------------------------------------------------------------------------
# Batches

#: Seconds a line of a L{BatchedLog} waits at most before it is logged.
FLUSH_INTERVAL = 0.2

#: Waiting lines of a L{BatchedLog} that are logged at once.
MAX_LINES = 2000

_ALL_LEVELS = list(LogLevel.iterconstants())


class BatchedLog:
    """
    Log lines of one namespace, each kept with the time it was made and
    logged together every C{interval} seconds (at once when C{maxLines}
    are waiting, and on L{flush}).

    When the log is twistd's own text log file (the publisher has that one
    observer, a L{FileLogObserver} that formats probe lines, at every
    level, as twistd does), the batch is that file's text, formatted here
    with the time stamp made once a second, in one C{write}: through the
    log system a line (an event, its time formatted with C{strftime}, a
    C{write} and a flush) costs tens of microseconds of the reactor thread.
    With any other observer (C{twistd --logger}, several observers, a
    test's) each line is logged as an event of its own, in order, with its
    level, its fields and the time it was made as C{log_time}.  Either way
    a line reads as it would have one event at a time: C{TIME
    [NAMESPACE#LEVEL] TEXT}.

    After L{stop}, each line is logged at once.

    @ivar clock: an C{IReactorTime}: the lines' times and the batches.
    @ivar namespace: the lines' C{log_namespace}.
    @ivar publisher: the log observer the events go to (Twisted's global
        log publisher), read at each flush.
    @ivar textKey: the event key holding a line's text (its C{log_format}
        is C{"{textKey}"}).
    @ivar logger: the events' C{log_logger}.
    """

    def __init__(
        self,
        clock,
        namespace: str,
        publisher: Any = globalLogPublisher,
        textKey: str = "log_text",
        logger: Optional[Logger] = None,
        interval: float = FLUSH_INTERVAL,
        maxLines: int = MAX_LINES,
    ) -> None:
        self.clock = clock
        self.namespace = namespace
        self.publisher = publisher
        self.textKey = textKey
        self.logger = logger
        self.interval = interval
        self.maxLines = maxLines
        self._format = "{" + textKey + "}"
        # [(time, level, text, fields or None)]
        self._waiting: list = []
        self._call: Any = None
        self._stopped = False
        # The observer checked for direct writes, and the answer.
        self._checked: Any = None
        self._direct: Any = None
        self._stamp: tuple = (-1, "")
        self._systems = {level: f" [{namespace}#{level.name}] " for level in _ALL_LEVELS}

    def add(self, level: LogLevel, text: str, fields: Optional[dict] = None) -> None:
        """
        Keep one line to be logged with the next batch.

        @param fields: more keys of its event (the dict becomes the event),
            or L{None}.
        """
        waiting = self._waiting
        waiting.append((self.clock.seconds(), level, text, fields))
        if self._stopped or len(waiting) >= self.maxLines:
            self.flush()
        elif self._call is None:
            self._call = self.clock.callLater(self.interval, self.flush)

    def stop(self) -> None:
        """
        Log the waiting lines, and any later line at once.
        """
        self._stopped = True
        self.flush()

    def flush(self) -> None:
        """
        Log the waiting lines now.
        """
        if self._call is not None:
            if self._call.active():
                self._call.cancel()
            self._call = None
        if not self._waiting:
            return
        lines, self._waiting = self._waiting, []
        direct = self._directObserver()
        if direct is not None:
            try:
                self._writeDirectly(direct, lines)
                return
            except Exception:
                # Through the publisher, which deals with a broken observer.
                self._checked = self._direct = None
        publish = self.publisher
        logger, namespace, textKey, form = self.logger, self.namespace, self.textKey, self._format
        for when, level, text, fields in lines:
            event = {} if fields is None else fields
            event[textKey] = text
            event.update(
                log_logger=logger,
                log_level=level,
                log_namespace=namespace,
                log_source=None,
                log_format=form,
                log_time=when,
            )
            publish(event)

    def _writeDirectly(self, observer: FileLogObserver, lines: list) -> None:
        parts = []
        systems = self._systems
        last, stamp = self._stamp
        for when, level, text, _ in lines:
            if not text:  # as twistd writes it: nothing
                continue
            if "\n" in text:
                text = text.replace("\n", "\n\t")
            second = int(when)
            if when - second > 0.999999:
                # formatTime's datetime rounds the microseconds: the next
                # second's stamp (made each time).
                parts.append(formatTime(when) + systems[level] + text + "\n")
                continue
            if second != last:
                last, stamp = second, formatTime(when)
            parts.append(stamp + systems[level] + text + "\n")
        self._stamp = (last, stamp)
        text = "".join(parts)
        outFile = observer._outFile
        encoding = observer._encoding
        outFile.write(text if encoding is None else text.encode(encoding))
        outFile.flush()

    def _directObserver(self) -> Optional[FileLogObserver]:
        """
        The publisher's only observer if it is a text file observer that
        writes a line as L{_writeDirectly} does, else L{None}.
        """
        observers = getattr(self.publisher, "_observers", None)
        if type(observers) is not list or len(observers) != 1:
            return None
        observer = observers[0]
        if observer is self._checked:
            return self._direct
        self._checked, self._direct = observer, None
        if type(observer) is not FileLogObserver or not hasattr(observer, "_outFile"):
            return None
        for when in (1_000_000_000.25, self.clock.seconds()):
            for level in _ALL_LEVELS:
                probe = {
                    "log_level": level,
                    "log_namespace": self.namespace,
                    "log_format": self._format,
                    self.textKey: '"probe" - -',
                    "log_time": when,
                }
                try:
                    if observer.formatEvent(probe) != (
                        formatTime(when) + self._systems[level] + '"probe" - -\n'
                    ):
                        return None
                except Exception:
                    return None
        self._direct = observer
        return observer


# ---------------------------------------------------------------------------
# The per-message lines

def printable(text: str) -> str:
    """
    C{text} with control characters (a remote server's reply can hold any)
    written as escapes, so that one log line stays one line.
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


@attrs.frozen
class MessageLog:
    """
    Writes the per-message lines (see the module docstring).

    Without a clock (tests, tools) each line is a log event at once, through
    C{log}.  With one (the relay gives the reactor) the lines are written in
    batches (L{BatchedLog}, to C{log}'s observer): every L{FLUSH_INTERVAL}
    seconds, the same lines, events and time stamps; L{flush} and L{stop}
    write what waits (the relay stops it after delivery has stopped).

    @ivar enabled: L{False} writes nothing (C{[smartrelay] log_messages = off}).
    @ivar log: where the lines go.
    @ivar clock: an C{IReactorTime} for the batches, or L{None}.
    """

    enabled: bool = True
    log: Logger = attrs.field(factory=lambda: Logger(namespace=NAMESPACE), eq=False)
    clock: Any = attrs.field(default=None, eq=False, repr=False)
    _batch: Optional[BatchedLog] = attrs.field(init=False, default=None, eq=False, repr=False)

    #: Parked recipients named in one line of L{parked}.
    PARKED_PER_LINE = 100

    def __attrs_post_init__(self) -> None:
        if self.clock is not None and self.enabled:
            batch = BatchedLog(
                self.clock, self.log.namespace, self.log.observer, "log_text", self.log
            )
            object.__setattr__(self, "_batch", batch)

    def _emit(self, level: LogLevel, template: str, **fields: Any) -> None:
        # The text is formatted here, once, with str.format: the same
        # template through twisted.logger's formatEvent costs about 18 us
        # a line (its Formatter is Python code), str.format about 1 us, and
        # a busy relay writes two lines per message.  The fields stay
        # fields of the event.
        batch = self._batch
        if batch is not None:
            batch.add(level, template.format(**fields), fields)
        else:
            self.log.emit(level, "{log_text}", log_text=template.format(**fields), **fields)

    def flush(self) -> None:
        """
        Write the waiting lines now.
        """
        if self._batch is not None:
            self._batch.flush()

    def stop(self) -> None:
        """
        Write the waiting lines, and any later one at once.
        """
        if self._batch is not None:
            self._batch.stop()

    def accepted(
        self,
        queue_id: str,
        sender: str,
        size: int,
        recipients: int,
        client: str,
        user: Optional[str] = None,
        helo: Optional[str] = None,
        tls: bool = False,
        tag: Optional[str] = None,
    ) -> None:
        """
        A message was stored (and is being answered C{250}); C{sender}
        C{""} is the null reverse path.  C{helo}, C{tls} and C{tag} are
        fields of the event but not in its text.
        """
        if not self.enabled:
            return
        self._emit(
            LogLevel.info,
            _ACCEPTED if user is None else _ACCEPTED_USER,
            queue_id=queue_id,
            sender=sender,
            size=size,
            nrcpt=recipients,
            client=client,
            user=user,
            helo=printable(helo) if helo else helo,
            tls=tls,
            tag=tag,
        )

    def outcome(
        self,
        queue_id: str,
        recipient: str,
        status: str,
        delay: float,
        reply: str,
        relay: Optional[str] = None,
        dsn: Optional[str] = None,
        attempts: int = 0,
        next_attempt: Optional[str] = None,
    ) -> None:
        """
        The outcome of one delivery attempt for one recipient.

        @param status: C{delivered}, C{deferred}, C{bounced}, C{expired} or
            C{suppressed}.
        @param delay: seconds since the message was accepted.
        @param reply: the server's reply as one line (for C{suppressed},
            the suppression's reason).
        @param relay: the host that answered, or L{None} if none did.
        @param dsn: the RFC 3463 status code.
        @param next_attempt: for C{deferred}, when it is tried again (RFC 3339).
        """
        if not self.enabled:
            return
        if status == "suppressed":
            form = _SUPPRESSED
        elif status == "deferred" and next_attempt is not None:
            form = _DEFERRED
        else:
            form = _OUTCOME
        self._emit(
            _LEVELS.get(status, LogLevel.info),
            form,
            queue_id=queue_id,
            recipient=recipient,
            relay=relay or "none",
            delay=max(0.0, delay),
            attempts=attempts,
            dsn=dsn,
            status=status,
            reply=printable(reply or ""),
            next_attempt=next_attempt,
        )


    def parked(
        self,
        destination: str,
        members: list,
        reply: str,
        dsn: Optional[str],
        next_attempt: Optional[str],
    ) -> None:
        """
        Recipients parked at a suspended destination were deferred without
        an attempt of their own: one line per L{PARKED_PER_LINE} of them
        (a queue id and its recipient each, so that grepping for a queue id
        finds it), not one each.

        @param members: C{(queue_id, recipient)} pairs.
        @param reply: the reply line they are deferred with.
        """
        if not self.enabled:
            return
        step = self.PARKED_PER_LINE
        for start in range(0, len(members), step):
            part = members[start : start + step]
            self._emit(
                LogLevel.info,
                _PARKED,
                destination=destination,
                count=len(part),
                dsn=dsn,
                status="deferred",
                reply=printable(reply),
                next_attempt=next_attempt,
                members=", ".join(f"{q} <{r}>" for q, r in part),
                queue_ids=[q for q, _ in part],
                recipients=[r for _, r in part],
            )


# ---------------------------------------------------------------------------
# JSON lines

#: Keys of an old-style (twisted.python.log) event, left out of the JSON.
_LEGACY_KEYS = frozenset(["message", "time", "system", "isError", "format", "why", "failure"])

#: Top-level keys of each JSON object; a field of the same name is
#: written as C{field_NAME}.
_RESERVED = frozenset(["time", "level", "namespace", "text", "system", "error", "traceback"])


def _jsonDefault(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=str)
    return str(value)


def _dumps(value: Any) -> str:
    return json.dumps(value, default=_jsonDefault, allow_nan=False, separators=(",", ":"))


def eventAsJSONLine(event: dict) -> str:
    """
    One log event as one line of JSON (no newline).

    The object has C{time} (RFC 3339, UTC), C{level} (C{debug}, C{info},
    C{warn}, C{error}, C{critical}), C{namespace}, C{text} (the formatted
    message), C{system} (old-style events only), then every named field of
    the event; for a failure also C{error} (C{Type: message}) and
    C{traceback}.  A value JSON cannot hold is written as its text.  Never
    raises.
    """
    level = event.get("log_level")
    record: dict = {
        "time": rfc3339(event.get("log_time") or 0.0),
        "level": getattr(level, "name", "info"),
        "namespace": event.get("log_namespace") or "-",
        "text": formatEvent(event),
    }
    legacy = isinstance(event.get("message"), tuple)
    if legacy and event.get("log_system") not in (None, "-"):
        record["system"] = str(event["log_system"])
    failure = event.get("log_failure")
    if failure is not None:
        try:
            record["error"] = f"{failure.type.__name__}: {failure.getErrorMessage()}"
            record["traceback"] = failure.getTraceback()
        except Exception:
            record["error"] = repr(failure)
    for key, value in event.items():
        if key.startswith("log_") or (legacy and key in _LEGACY_KEYS):
            continue
        record["field_" + key if key in _RESERVED else key] = value
    try:
        return _dumps(record)
    except (TypeError, ValueError):
        pass
    # Something in a field (a dict with odd keys, a NaN) cannot be
    # written: write each such field as its text.
    for key, value in list(record.items()):
        try:
            _dumps(value)
        except (TypeError, ValueError):
            record[key] = repr(value)
    return _dumps(record)


@implementer(ILogObserver)
@attrs.define(eq=False)
class JSONLinesObserver:
    """
    Writes each event as one line of JSON (L{eventAsJSONLine}) to a text
    file, flushed after each line.

    @ivar out: where to write.
    """

    out: TextIO

    def __call__(self, event: dict) -> None:
        try:
            line = eventAsJSONLine(event)
        except Exception as e:
            # A log observer that raises is dropped by the publisher: say
            # what could not be written instead.
            line = _dumps(
                {
                    "time": rfc3339(time.time()),
                    "level": "error",
                    "namespace": __name__,
                    "text": f"could not write a log event as JSON: {e!r}",
                }
            )
        self.out.write(line + "\n")
        self.out.flush()


def jsonObserver() -> JSONLinesObserver:
    """
    The observer for C{twistd --logger smartrelay.logs.jsonObserver}: JSON
    lines to standard output (the one there when twistd starts, before it
    sends C{print} output to the log).
    """
    return JSONLinesObserver(sys.stdout)
