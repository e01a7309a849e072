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
"""

import json
import sys
import time
from typing import Any, Optional, TextIO

import attrs
from twisted.logger import ILogObserver, Logger, LogLevel, formatEvent
from zope.interface import implementer

from smartrelay.events import rfc3339

__all__ = ["NAMESPACE", "MessageLog", "JSONLinesObserver", "eventAsJSONLine", "jsonObserver"]

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

    @ivar enabled: L{False} writes nothing (C{[smartrelay] log_messages = off}).
    @ivar log: where the lines go.
    """

    enabled: bool = True
    log: Logger = attrs.field(factory=lambda: Logger(namespace=NAMESPACE), eq=False)

    #: Parked recipients named in one line of L{parked}.
    PARKED_PER_LINE = 100

    def _emit(self, level: LogLevel, template: str, **fields: Any) -> None:
        # The text is formatted here, once, with str.format: the same
        # template through twisted.logger's formatEvent costs about 18 us
        # a line (its Formatter is Python code), str.format about 1 us, and
        # a busy relay writes two lines per message.  The fields stay
        # fields of the event.
        self.log.emit(level, "{log_text}", log_text=template.format(**fields), **fields)

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
