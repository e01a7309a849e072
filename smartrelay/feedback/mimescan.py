# -*- test-case-name: tests.test_feedback_mimescan -*-
"""
A quick split of a returned message into L{smartrelay.mime.Part}s, for the
report readers.

L{smartrelay.mime.parse} splits every multipart of a message, the returned
message's own included, and compiles a pattern for every boundary: right
for the re-wrap engine, which must keep every byte of every part, but most
of the time of reading a report.  L{parse} builds the same kind of tree
for what a report reader looks at: the report's own parts are split (with
C{bytes.find}, no pattern per boundary), an attached message
(C{message/rfc822} with an identity transfer encoding) gets its header
parsed and its body left whole.  Like L{mime.parse} it never raises and
keeps every byte: C{parse(data).serialize() == data}.
"""

import re
from typing import Optional

from smartrelay import mime

__all__ = ["parse", "headerValue", "contentType", "boundaryOf", "transferEncodingOf", "charsetOf"]

#: Multiparts nested deeper than this stay leaves.
MAX_DEPTH = 8
#: A multipart is split into at most this many parts (the last holds the
#: rest): no report has more, and hostile ones must stay cheap.
MAX_PARTS = 256

_FIELD_START = re.compile(rb"[\x21-\x39\x3b-\x7e]+[ \t]*:")
_FOLD = re.compile(rb"\r?\n(?=[ \t])")
_PARAMETER = re.compile(
    r"""(?i);\s*(boundary|charset)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s;"]+))"""
)
_IDENTITY = frozenset([b"7bit", b"8bit", b"binary", b""])


def _splitHeader(data: bytes) -> tuple[list, bytes, bytes]:
    """
    @return: the header fields (each with its folding and line break), the
        blank line ending the header (C{b""} if none) and the body.
    """
    fields: list[bytes] = []
    position = 0
    size = len(data)
    while position < size:
        end = data.find(b"\n", position)
        end = size if end == -1 else end + 1
        line = data[position:end]
        if line == b"\n" or line == b"\r\n":
            return fields, line, data[end:]
        first = line[:1]
        if (first == b" " or first == b"\t") and fields:
            fields[-1] += line
        elif _FIELD_START.match(line):
            fields.append(line)
        else:
            break
        position = end
    return fields, b"", data[position:]


def headerValue(fields: list, name: bytes) -> Optional[bytes]:
    """
    @param name: a lower-case field name with its colon (C{b"content-type:"}).
    @return: the unfolded raw value of the first such field, or L{None}.
    """
    size = len(name)
    for raw in fields:
        if raw[:size].lower() == name:
            return _FOLD.sub(b"", raw[size:]).strip()
    return None


def contentType(part: mime.Part) -> str:
    """
    @return: C{part}'s lower-case C{type/subtype}, its default type if it
        declares none or a malformed one.
    """
    value = headerValue(part.fields, b"content-type:")
    if value is None:
        return part.defaultType
    kind = value.split(b";", 1)[0].strip().lower()
    if b"/" not in kind or b" " in kind or not kind.isascii():
        return part.defaultType
    return kind.decode("ascii")


def _parameter(part: mime.Part, wanted: str) -> Optional[str]:
    value = headerValue(part.fields, b"content-type:")
    if value is None:
        return None
    for match in _PARAMETER.finditer(value.decode("utf-8", "replace")):
        if match.group(1).lower() == wanted:
            found = match.group(2) if match.group(2) is not None else match.group(3)
            return found.replace("\\\\", "\\").replace('\\"', '"')
    return None


def boundaryOf(part: mime.Part) -> Optional[str]:
    """
    @return: the C{boundary} parameter (trailing white space removed), or
        L{None}.
    """
    boundary = _parameter(part, "boundary")
    return boundary.rstrip() or None if boundary is not None else None


def charsetOf(part: mime.Part) -> Optional[str]:
    """
    @return: the lower-case C{charset} parameter, or L{None}.
    """
    charset = _parameter(part, "charset")
    return charset.strip().lower() or None if charset is not None else None


def transferEncodingOf(part: mime.Part) -> str:
    """
    @return: the lower-case C{Content-Transfer-Encoding} (C{7bit} if none).
    """
    value = headerValue(part.fields, b"content-transfer-encoding:")
    if not value:
        return "7bit"
    return value.split(b"(", 1)[0].strip().lower().decode("ascii", "replace") or "7bit"


def _lineEnd(data: bytes, start: int) -> int:
    end = data.find(b"\n", start)
    return len(data) if end == -1 else end + 1


def _delimiters(body: bytes, boundary: bytes) -> tuple[list, Optional[int]]:
    """
    @return: the offsets of the lines that open a body part, up to the
        close delimiter, and the offset of the close delimiter's line (or
        L{None}).
    """
    delimiter = b"--" + boundary
    opening: list[int] = []
    position = 0
    while True:
        found = body.find(delimiter, position)
        if found == -1:
            return opening, None
        position = found + 1
        if found and body[found - 1 : found] != b"\n":
            continue
        end = _lineEnd(body, found)
        rest = body[found + len(delimiter) : end].rstrip(b"\r\n")
        if rest[:2] == b"--" and not rest[2:].strip(b" \t"):
            return opening, found
        if not rest.strip(b" \t"):
            opening.append(found)


def _lineBreakBefore(data: bytes, offset: int) -> int:
    if offset >= 2 and data[offset - 2 : offset] == b"\r\n":
        return 2
    if offset >= 1 and data[offset - 1 : offset] == b"\n":
        return 1
    return 0


def _split(part: mime.Part, body: bytes, boundary: str, depth: int) -> bool:
    opening, closeAt = _delimiters(body, boundary.encode("utf-8", "replace"))
    if not opening or (closeAt is not None and closeAt < opening[0]):
        return False
    opening = opening[:MAX_PARTS]
    childType = "message/rfc822" if contentType(part) == "multipart/digest" else "text/plain"
    starts = [start - _lineBreakBefore(body, start) for start in opening]
    closeStart = len(body) if closeAt is None else closeAt - _lineBreakBefore(body, closeAt)
    preamble = body[: starts[0]]
    delimiters = []
    children = []
    previousEnd = 0
    for index, start in enumerate(opening):
        delimiterStart = max(starts[index], previousEnd)
        contentStart = _lineEnd(body, start)
        nextStart = starts[index + 1] if index + 1 < len(opening) else closeStart
        previousEnd = max(nextStart, contentStart)
        delimiters.append(body[delimiterStart:contentStart])
        children.append(_parse(body[contentStart:previousEnd], childType, depth + 1))
    part.preamble = preamble
    part.delimiters = delimiters
    part.children = children
    if closeAt is not None:
        epilogueStart = _lineEnd(body, closeAt)
        part.closing = body[previousEnd:epilogueStart]
        part.epilogue = body[epilogueStart:]
    else:
        part.closing = b""
        part.epilogue = b""
    return True


def _parse(data: bytes, defaultType: str, depth: int) -> mime.Part:
    fields, separator, body = _splitHeader(data)
    part = mime.Part(fields=fields, separator=separator, defaultType=defaultType)
    ctype = contentType(part)
    if ctype.startswith("multipart/") and depth < MAX_DEPTH:
        boundary = boundaryOf(part)
        if boundary and _split(part, body, boundary, depth):
            return part
    elif ctype in ("message/rfc822", "message/global") and depth < MAX_DEPTH:
        encoding = (headerValue(fields, b"content-transfer-encoding:") or b"").lower()
        if encoding in _IDENTITY:
            innerFields, innerSeparator, innerBody = _splitHeader(body)
            part.message = mime.Part(
                fields=innerFields, separator=innerSeparator, body=innerBody
            )
            return part
    part.body = body
    return part


def parse(data: bytes, defaultType: str = "text/plain") -> mime.Part:
    """
    Split a report into parts; see the module docstring.

    @return: the top-level part; C{parse(data).serialize() == data}.
    """
    return _parse(data, defaultType, 0)
