# -*- test-case-name: tests.test_web_answers -*-
"""
Prepared answers: a whole HTTP response (status line, headers, body)
written to a Twisted Web request in one go.

The site's front routes (L{smartrelay.web.site.BoundedRequest.process};
the click redirect and the open pixel) answer campaign-sized bursts of
requests whose responses are the same but for a header or two.  Setting
each header through C{Request.setHeader} (which looks up and checks the
name and value every time) and letting C{Request.write} assemble them
costs more than the route itself; a L{PreparedAnswer} holds the headers
already encoded, and L{send} writes them with what Twisted Web would have
added itself (C{Server}, C{Date}, and whatever the channel already put in
C{responseHeaders}, such as C{Connection: close}), then finishes the
request the ordinary way, so the channel's keep-alive, pipelining and
access log work as for any other request::

    moved = PreparedAnswer.of(302, [(b"Location", b"https://example.com/")], b"")
    send(request, moved, dates)

Header names and values must be what Twisted Web would send for them:
canonical names (C{Content-Type}), values without CR or LF (L{PreparedAnswer}
refuses them).
"""

from typing import Sequence

import attrs
from twisted.web.http import RESPONSES, datetimeToString
from twisted.web.server import version as SERVER_VERSION

__all__ = ["DateHeader", "PreparedAnswer", "send"]


def _checked(name: bytes, value: bytes) -> bytes:
    for part in (name, value):
        if not isinstance(part, bytes) or b"\r" in part or b"\n" in part:
            raise ValueError(f"not a header field: {name!r}: {value!r}")
    if not name or b":" in name or b" " in name:
        raise ValueError(f"not a header name: {name!r}")
    return name + b": " + value + b"\r\n"


@attrs.frozen
class PreparedAnswer:
    """
    A response ready to be sent: its status, its header lines (without
    C{Server} and C{Date}, which L{send} adds) and its body.
    C{Content-Length} is added from the body.

    @ivar code: the status code.
    @ivar reason: its reason phrase (Twisted Web's, e.g. C{b"Found"}).
    @ivar head: the header lines, encoded.
    @ivar body: the body (left out of the answer to a C{HEAD}).
    """

    code: int
    reason: bytes
    head: bytes
    body: bytes

    @classmethod
    def of(
        cls, code: int, headers: Sequence[tuple[bytes, bytes]], body: bytes
    ) -> "PreparedAnswer":
        """
        The answer with status C{code}, these headers and C{body}.

        @param headers: (name, value) pairs, in the order to send them.
        @raise ValueError: a name or value that cannot be sent as it is.
        """
        lines = [_checked(name, value) for name, value in headers]
        lines.append(_checked(b"Content-Length", b"%d" % (len(body),)))
        return cls(code, RESPONSES.get(code, b"Unknown Status"), b"".join(lines), body)


class DateHeader:
    """
    The C{Date} header line, made once a second.

    @ivar clock: an C{IReactorTime}.
    """

    def __init__(self, clock) -> None:
        self.clock = clock
        self._second = None
        self._line = b""

    def line(self) -> bytes:
        """
        C{Date: <now in HTTP format>\\r\\n}.
        """
        second = int(self.clock.seconds())
        if second != self._second:
            self._second = second
            self._line = b"Date: " + datetimeToString(second) + b"\r\n"
        return self._line


_SERVER_LINE = b"Server: " + SERVER_VERSION + b"\r\n"


def send(request, answer: PreparedAnswer, date: DateHeader) -> None:
    """
    Answer C{request} (a Twisted Web request that has written nothing yet)
    with C{answer}, in one write, and finish it.

    The status line carries the request's version, as Twisted Web's does;
    the headers are C{Server}, C{Date}, any already in the request's
    C{responseHeaders}, then the answer's.  The request's C{code},
    C{code_message} and C{sentLength} are set as C{Request.write} sets
    them, so the access log shows the same line.
    """
    request.site = request.channel.site
    request.code = answer.code
    request.code_message = answer.reason
    parts = [
        request.clientproto,
        b" %d " % (answer.code,),
        answer.reason,
        b"\r\n",
        _SERVER_LINE,
        date.line(),
    ]
    for name, values in request.responseHeaders.getAllRawHeaders():
        for value in values:
            parts.append(name + b": " + value + b"\r\n")
    parts.append(answer.head)
    parts.append(b"\r\n")
    if request.method != b"HEAD":
        parts.append(answer.body)
        request.sentLength = len(answer.body)
    request.startedWriting = 1
    request.channel.write(b"".join(parts))
    request.finish()
