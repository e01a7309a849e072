"""
A byte-preserving MIME tree (RFC 2045, RFC 2046, RFC 5322).

L{parse} splits a message into L{Part}s without decoding or normalising
anything: every byte of the input is kept in some field of some part, so
that C{parse(data).serialize() == data} for I{any} C{data}, well-formed or
not.  Structures that cannot be understood (a multipart without its
boundary, a header without a body separator, ...) simply become leaf parts.
Parsing never raises.

This is what a rewriting engine needs: it can change one part (say, the
HTML alternative) with L{Part.setBody} or L{Part.setHeader} and every other
part of the message serialises to exactly the bytes it was received as.
The stdlib C{email} package is only used for small helpers (parameter
parsing); it re-serialises messages and so cannot be used for this.

Layout of a part::

    header = fields... + separator          (separator: the blank line)
    body   = leaf:          raw body bytes
             multipart:     preamble + (delimiter + child)... + closing
                            + epilogue
             message/rfc822 (identity transfer encoding): the inner message

For multiparts, each delimiter holds the line break that precedes the
C{--boundary} line (which RFC 2046 section 5.1.1 says belongs to the
delimiter), the boundary line itself and its own line break; C{closing}
holds the line break before C{--boundary--} and that whole line.
"""

import base64
import binascii
import email.message
import email.utils
import quopri
import re
from typing import Iterator, Optional, Union

import attrs

__all__ = [
    "Part",
    "parse",
    "serialize",
    "walk",
    "leaves",
    "has8bit",
    "decodeTransfer",
    "encodeTransfer",
    "encodeQuotedPrintable",
    "encodeBase64",
    "MAX_DEPTH",
]

#: Parts nested deeper than this are not split further (they stay leaves),
#: so that hostile input cannot exhaust the stack.
MAX_DEPTH = 64

#: Transfer encodings whose body is the content itself.
IDENTITY_ENCODINGS = frozenset(["7bit", "8bit", "binary"])

# A header field's first line: a field name (printable ASCII but the
# colon), optional obsolete white space, a colon.
_FIELD_START = re.compile(rb"[\x21-\x39\x3b-\x7e]+[ \t]*:")
_FIELD_NAME = re.compile(rb"([^:]*?)[ \t]*:")
_FOLD = re.compile(rb"\r?\n(?=[ \t])")
_EIGHT_BIT = re.compile(rb"[\x80-\xff]")
_BASE64_JUNK = re.compile(rb"[^A-Za-z0-9+/=]")
_QP_LITERAL = frozenset(range(33, 127)) - {ord("=")}
_QP_LINE = 76
_BASE64_CHUNK = 57  # bytes per 76-character line


def has8bit(data: bytes) -> bool:
    """
    @return: whether C{data} holds any byte with the high bit set.
    """
    return _EIGHT_BIT.search(data) is not None


def _lines(data: bytes) -> Iterator[tuple[int, int]]:
    """
    Split C{data} into lines ending in LF (CRLF or bare LF).

    @return: an iterator of C{(start, end)} offsets; C{data[start:end]} is
        the line with its line break, the last one possibly without.
    """
    start = 0
    size = len(data)
    while start < size:
        end = data.find(b"\n", start)
        end = size if end == -1 else end + 1
        yield start, end
        start = end


def _stripLineBreak(line: bytes) -> bytes:
    """
    @return: C{line} without its trailing CRLF or LF, if any.
    """
    if line.endswith(b"\r\n"):
        return line[:-2]
    if line.endswith(b"\n"):
        return line[:-1]
    return line


def _lineBreakBefore(data: bytes, offset: int) -> int:
    """
    @return: the length of the line break that ends just before C{offset}
        (2 for CRLF, 1 for LF, 0 at the start of C{data}).
    """
    if offset == 0:
        return 0
    if offset >= 2 and data[offset - 2 : offset] == b"\r\n":
        return 2
    return 1


def _splitHeader(data: bytes) -> tuple[list[bytes], bytes, bytes]:
    """
    Split a part into its header fields, the blank line ending them and
    the body.

    The header ends at the first empty line (which is kept as the
    separator) or, without a separator, at the first line that is neither
    a field nor the continuation of one (which starts the body).

    @return: C{(fields, separator, body)}, each field with its folding and
        its final line break.
    """
    fields: list[bytes] = []
    for start, end in _lines(data):
        line = data[start:end]
        if line in (b"\r\n", b"\n"):
            return fields, line, data[end:]
        if fields and line[:1] in (b" ", b"\t"):
            fields[-1] += line
        elif _FIELD_START.match(line):
            fields.append(line)
        else:
            return fields, b"", data[start:]
    return fields, b"", b""


def _unfold(value: bytes) -> str:
    """
    @return: a raw field value without folding line breaks or surrounding
        white space, decoded as UTF-8 (undecodable bytes replaced).
    """
    return _FOLD.sub(b"", value).strip(b" \t\r\n").decode("utf-8", "replace")


def _fieldName(field: bytes) -> bytes:
    """
    @return: the name of a raw header field, as written.
    """
    match = _FIELD_NAME.match(field)
    return match.group(1) if match is not None else b""


def _fieldValue(field: bytes) -> bytes:
    """
    @return: the raw value of a header field: everything after the colon
        up to (not including) the final line break, folding kept.
    """
    return _stripLineBreak(field[field.find(b":") + 1 :])


def _parseContentType(value: Optional[str], default: str) -> tuple[str, dict[str, str]]:
    """
    Parse a C{Content-Type} value.

    @param value: the unfolded field value, or L{None} if there is none.
    @param default: the type to use when C{value} is missing or invalid.
    @return: C{(type, params)}: C{"maintype/subtype"} lower-cased and the
        parameters (names lower-cased, values unquoted, RFC 2231 applied).
    """
    if value is None:
        return default, {}
    holder = email.message.Message()
    holder.set_default_type(default)
    try:
        holder["Content-Type"] = value
        ctype = holder.get_content_type()
        params = {}
        for name, raw in (holder.get_params() or [])[1:]:
            params[name.lower()] = email.utils.collapse_rfc2231_value(raw)
    except Exception:
        return default, {}
    return ctype, params


def decodeTransfer(body: bytes, encoding: str) -> bytes:
    """
    Undo a content transfer encoding, leniently.

    @param body: the encoded body.
    @param encoding: C{"base64"}, C{"quoted-printable"}; anything else is
        taken as an identity encoding.
    @return: the decoded bytes.
    """
    if encoding == "base64":
        cleaned = _BASE64_JUNK.sub(b"", body).split(b"=", 1)[0]
        extra = len(cleaned) % 4
        if extra == 1:
            cleaned = cleaned[:-1]
        elif extra:
            cleaned += b"=" * (4 - extra)
        try:
            return base64.b64decode(cleaned)
        except (binascii.Error, ValueError):
            return b""
    if encoding == "quoted-printable":
        return quopri.decodestring(body)
    return body


def encodeQuotedPrintable(data: bytes, newline: bytes = b"\r\n") -> bytes:
    """
    Quoted-printable encode text (RFC 2045 section 6.7).

    Occurrences of C{newline} in C{data} are hard line breaks; any other
    CR or LF byte is encoded.  Printable ASCII but C{=} stands for itself,
    and so do space and tab except at the end of a line; every other byte
    is encoded.  Soft line breaks keep every encoded line within 76
    characters (a line ending in a hard line break within 75).

    L{_encodeQuotedPrintableLine} defines the output; C{binascii.b2a_qp}
    (L{_encodeRun}) writes the same bytes much faster and does the work
    for every run of lines without a bare CR or LF.

    @param data: the text to encode.
    @param newline: the line break of C{data} and of the result.
    @return: the encoded text, ending in a line break iff C{data} does.
    """
    if newline == b"\r\n":
        crlfs = data.count(b"\r\n")
        clean = data.count(b"\r") == crlfs == data.count(b"\n")
    elif newline == b"\n":
        clean = b"\r" not in data
    else:
        return _encodeLines(data.split(newline), newline)
    if clean:
        return _encodeRun(data, newline)
    # Rare: lines with a bare CR or LF one by one, the others in runs.
    pieces: list[bytes] = []
    run: list[bytes] = []
    for line in data.split(newline):
        if b"\r" in line or b"\n" in line:
            if run:
                pieces.append(_encodeRun(newline.join(run), newline))
                run = []
            pieces.append(_encodeQuotedPrintableLine(line, newline))
        else:
            run.append(line)
    if run:
        pieces.append(_encodeRun(newline.join(run), newline))
    return newline.join(pieces)


def _encodeLines(lines: list[bytes], newline: bytes) -> bytes:
    """
    Quoted-printable encode C{lines}, one by one, joined by C{newline}.
    """
    return newline.join(_encodeQuotedPrintableLine(line, newline) for line in lines)


#: Bytes that C{binascii.b2a_qp} always encodes (as C{=XX}, in the place
#: of one character); an unused one stands in for a byte that it would
#: otherwise encode differently from L{_encodeQuotedPrintableLine}.
_QP_MARKS = [bytes([byte]) for byte in (*range(1, 9), 11, 12, *range(14, 32), *range(127, 256))]

#: Where b2a_qp differs: (what, which byte of it to mark, its encoding).
#: It writes a space or tab before a line break as it comes and encodes it
#: afterwards, without the soft line break that may then be needed; and it
#: encodes a "." at the start of a line before NUL.
_QP_MARKED = [(b" \r\n", 0, b"=20"), (b"\t\r\n", 0, b"=09"), (b"\n.\0", 2, b"=00")]


def _encodeRun(data: bytes, newline: bytes) -> bytes:
    """
    L{encodeQuotedPrintable} of text with no CR or LF byte outside its
    line breaks C{newline} (CRLF or LF), by C{binascii.b2a_qp}.

    b2a_qp encodes like L{_encodeQuotedPrintableLine} but in these cases,
    which are turned into ones where it does:
      - its last line: b2a_qp lets the last character of its input be the
        76th of a line, and in text without a line break it writes LF soft
        line breaks; so it gets the text between CRLFs;
      - LF line breaks: it lets a character before LF be the 76th of a
        line; so it gets the text with CRLF instead;
      - a space or tab before a line break, "." and NUL at the start of a
        line: see L{_QP_MARKED};
      - a line that is only ".": it encodes the dot.
    """
    text = b"\r\n" + (data.replace(b"\n", b"\r\n") if newline == b"\n" else data) + b"\r\n"
    marks = []
    for what, offset, encoding in _QP_MARKED:
        if what[offset : offset + 1] == b"\0" and b"\0" not in text:
            continue
        if what in text:
            mark = next((mark for mark in _QP_MARKS if mark not in text), None)
            if mark is None:
                # Every byte b2a_qp could mark with is in the text (hardly
                # text at all): encode line by line.
                return _encodeLines(data.split(newline), newline)
            text = text.replace(what, what[:offset] + mark + what[offset + 1 :])
            marks.append((b"=%02X" % ord(mark), encoding))
    encoded = binascii.b2a_qp(text)
    for token, encoding in marks:
        encoded = encoded.replace(token, encoding)
    if b"\n.\r\n" in text:
        # Two passes at most: replace() skips a line after each one.
        while b"\n=2E\r\n" in encoded:
            encoded = encoded.replace(b"\n=2E\r\n", b"\n.\r\n")
    encoded = encoded[2:-2]
    return encoded.replace(b"\r\n", b"\n") if newline == b"\n" else encoded


def _encodeQuotedPrintableLine(line: bytes, newline: bytes) -> bytes:
    """
    Quoted-printable encode one line of text without its line break,
    inserting soft line breaks to keep encoded lines short.
    """
    last = len(line) - 1
    pieces: list[bytes] = []
    current = b""
    for index, byte in enumerate(line):
        if byte in _QP_LITERAL or (byte in (9, 32) and index != last):
            token = bytes([byte])
        else:
            token = b"=%02X" % (byte,)
        if len(current) + len(token) > _QP_LINE - 1:
            pieces.append(current + b"=")
            current = b""
        current += token
    pieces.append(current)
    return newline.join(pieces)


def encodeBase64(data: bytes, newline: bytes = b"\r\n") -> bytes:
    """
    Base64 encode C{data} in lines of 76 characters, each ending in
    C{newline}.
    """
    return b"".join(
        binascii.b2a_base64(data[start : start + _BASE64_CHUNK], newline=False) + newline
        for start in range(0, len(data), _BASE64_CHUNK)
    )


def encodeTransfer(data: bytes, encoding: str, newline: bytes = b"\r\n") -> bytes:
    """
    Apply a content transfer encoding.

    @param encoding: C{"base64"}, C{"quoted-printable"}, or an identity
        encoding (C{"7bit"}, C{"8bit"}, C{"binary"}).
    @raise ValueError: for any other encoding.
    """
    if encoding == "base64":
        return encodeBase64(data, newline)
    if encoding == "quoted-printable":
        return encodeQuotedPrintable(data, newline)
    if encoding in IDENTITY_ENCODINGS:
        return data
    raise ValueError(f"unknown transfer encoding {encoding!r}")


@attrs.define(eq=False)
class Part:
    """
    One MIME entity: a message or a body part, as raw bytes.

    @ivar fields: the raw header fields, in order, each with its folding
        and final line break.  Assign to elements to rewrite a field.
    @ivar separator: the empty line ending the header (C{b"\\r\\n"} or
        C{b"\\n"}), or C{b""} if the input had none.
    @ivar children: the body parts of a multipart, else empty.
    @ivar preamble: a multipart's bytes before its first delimiter.
    @ivar delimiters: a multipart's delimiters, one before each child.
    @ivar closing: a multipart's close delimiter, C{b""} if missing.
    @ivar epilogue: a multipart's bytes after the close delimiter.
    @ivar message: the encapsulated message of a C{message/rfc822} (or
        C{message/global}) part, else L{None}.
    @ivar defaultType: the content type this part has if it declares none
        (C{message/rfc822} in a C{multipart/digest}, else C{text/plain}).
    """

    fields: list[bytes] = attrs.field(factory=list)
    separator: bytes = b""
    _body: bytes = b""
    children: list["Part"] = attrs.field(factory=list)
    preamble: bytes = b""
    delimiters: list[bytes] = attrs.field(factory=list)
    closing: bytes = b""
    epilogue: bytes = b""
    message: Optional["Part"] = None
    defaultType: str = "text/plain"

    @property
    def header(self) -> bytes:
        """
        The raw header block, including the separating blank line.
        """
        return b"".join(self.fields) + self.separator

    @property
    def body(self) -> bytes:
        """
        The raw (transfer encoded) body.  For composite parts it is built
        from the children; assigning to it makes the part a leaf.
        """
        if self.message is not None:
            return self.message.serialize()
        if self.isMultipart:
            return (
                self.preamble
                + b"".join(
                    delimiter + child.serialize()
                    for delimiter, child in zip(self.delimiters, self.children)
                )
                + self.closing
                + self.epilogue
            )
        return self._body

    @body.setter
    def body(self, value: bytes) -> None:
        self._body = value
        self.children = []
        self.delimiters = []
        self.preamble = self.closing = self.epilogue = b""
        self.message = None

    def serialize(self) -> bytes:
        """
        @return: the part as bytes; exactly the parsed input if nothing was
            changed.
        """
        return self.header + self.body

    @property
    def isMultipart(self) -> bool:
        """
        Whether this part was split into body parts.
        """
        return bool(self.delimiters)

    @property
    def newline(self) -> bytes:
        """
        The line break this part uses (that of its first line), CRLF by
        default.
        """
        for chunk in (*self.fields, self.separator, self._body):
            end = chunk.find(b"\n")
            if end != -1:
                return b"\r\n" if chunk[end - 1 : end] == b"\r" else b"\n"
        return b"\r\n"

    def headerFields(self) -> list[tuple[str, bytes]]:
        """
        @return: C{(name, value)} for each header field: the name as
            written (ASCII) and the raw value after the colon with its
            folding, without the final line break.
        """
        return [
            (_fieldName(field).decode("ascii", "replace"), _fieldValue(field))
            for field in self.fields
        ]

    def _indices(self, name: str) -> list[int]:
        """
        @return: the indices in L{fields} of the fields called C{name}
            (case-insensitively).
        """
        wanted = name.lower().encode("ascii")
        return [
            index
            for index, field in enumerate(self.fields)
            if _fieldName(field).lower() == wanted
        ]

    def getAll(self, name: str) -> list[str]:
        """
        @return: the unfolded values of all fields called C{name}.
        """
        return [_unfold(_fieldValue(self.fields[index])) for index in self._indices(name)]

    def get(self, name: str) -> Optional[str]:
        """
        @return: the unfolded value (decoded as UTF-8, with replacement
            characters for invalid bytes; no RFC 2047 decoding) of the first
            field called C{name}, or L{None}.
        """
        values = self.getAll(name)
        return values[0] if values else None

    @property
    def contentType(self) -> tuple[str, dict[str, str]]:
        """
        C{("maintype/subtype", params)}: the type lower-cased (the
        L{defaultType} if missing or invalid), the parameter names
        lower-cased.
        """
        return _parseContentType(self.get("Content-Type"), self.defaultType)

    @property
    def charset(self) -> Optional[str]:
        """
        The lower-cased C{charset} parameter, or L{None}.
        """
        charset = self.contentType[1].get("charset")
        return charset.lower() if charset else None

    @property
    def boundary(self) -> Optional[str]:
        """
        The C{boundary} parameter of a multipart type (trailing white space
        removed), or L{None}.
        """
        ctype, params = self.contentType
        if not ctype.startswith("multipart/"):
            return None
        boundary = params.get("boundary", "").rstrip()
        return boundary or None

    @property
    def transferEncoding(self) -> str:
        """
        The lower-cased C{Content-Transfer-Encoding}, C{"7bit"} by default.
        """
        value = self.get("Content-Transfer-Encoding")
        return value.lower() if value else "7bit"

    def _rawField(self, name: str, value: Union[str, bytes]) -> bytes:
        """
        @return: a new raw field C{name: value} with this part's line break.
        """
        if isinstance(value, str):
            value = value.encode("utf-8")
        return name.encode("ascii") + b": " + value + self.newline

    def _ensureSeparable(self) -> None:
        """
        Make sure that a field can be appended and that the header is
        followed by a separator if there is a body.
        """
        if self.fields and not self.fields[-1].endswith(b"\n"):
            self.fields[-1] += self.newline
        if not self.separator and (self.body or not self.fields):
            self.separator = self.newline

    def replaceHeader(self, name: str, value: Union[str, bytes]) -> None:
        """
        Replace the first field called C{name}, keeping its position.

        @param value: the new value, without line breaks (C{str} values are
            encoded as UTF-8).
        @raise KeyError: if there is no such field.
        """
        indices = self._indices(name)
        if not indices:
            raise KeyError(name)
        ending = self.fields[indices[0]].endswith(b"\n")
        field = self._rawField(name, value)
        self.fields[indices[0]] = field if ending else _stripLineBreak(field)

    def setHeader(self, name: str, value: Union[str, bytes]) -> None:
        """
        Make C{name: value} the only field called C{name}: replace the
        first such field and remove the others, or append it.
        """
        indices = self._indices(name)
        if indices:
            self.replaceHeader(name, value)
            for index in reversed(indices[1:]):
                del self.fields[index]
        else:
            self._ensureSeparable()
            self.fields.append(self._rawField(name, value))
        self._ensureSeparable()

    def removeHeader(self, name: str) -> None:
        """
        Remove all fields called C{name}.
        """
        for index in reversed(self._indices(name)):
            del self.fields[index]

    def decodedBody(self) -> bytes:
        """
        @return: the body with its content transfer encoding (base64,
            quoted-printable; anything else is identity) undone.
        """
        return decodeTransfer(self.body, self.transferEncoding)

    def setBody(self, decoded: bytes, encoding: str) -> None:
        """
        Replace the body, making this part a leaf.

        @param decoded: the new content.
        @param encoding: the transfer encoding to apply (see
            L{encodeTransfer}); C{Content-Transfer-Encoding} is set to it.
        """
        newline = self.newline
        self.body = encodeTransfer(decoded, encoding, newline)
        self.setHeader("Content-Transfer-Encoding", encoding)


def _lineEnd(data: bytes, start: int) -> int:
    """
    @return: the offset just past the line starting at C{start}.
    """
    end = data.find(b"\n", start)
    return len(data) if end == -1 else end + 1


def _findDelimiters(body: bytes, boundary: bytes) -> tuple[list[int], Optional[int]]:
    """
    Find the boundary lines of a multipart body (RFC 2046 section 5.1.1):
    C{--boundary}, optionally C{--} after it, then only spaces and tabs.

    @return: the offsets of the lines starting each delimiter up to the
        close delimiter, and the offset of the close delimiter's line (or
        L{None} if there is none).
    """
    pattern = re.compile(b"--" + re.escape(boundary) + rb"(--)?[ \t]*")
    opening: list[int] = []
    for start, end in _lines(body):
        match = pattern.fullmatch(_stripLineBreak(body[start:end]))
        if match is None:
            continue
        if match.group(1):
            return opening, start
        opening.append(start)
    return opening, None


def _parseMultipart(part: Part, body: bytes, depth: int) -> bool:
    """
    Split a multipart body into C{part}'s preamble, children and so on.

    @return: whether C{body} held at least one delimiter (otherwise
        C{part} is left alone).
    """
    boundary = part.boundary
    if boundary is None:
        return False
    opening, closeAt = _findDelimiters(body, boundary.encode("utf-8"))
    if not opening or (closeAt is not None and closeAt < opening[0]):
        return False
    childType = "message/rfc822" if part.contentType[0] == "multipart/digest" else "text/plain"
    # Each delimiter starts with the line break before its boundary line,
    # unless that line break also ends the previous boundary line.
    starts = [start - _lineBreakBefore(body, start) for start in opening]
    closeStart = len(body) if closeAt is None else closeAt - _lineBreakBefore(body, closeAt)
    part.preamble = body[: starts[0]]
    previousEnd = 0
    for index, start in enumerate(opening):
        delimiterStart = max(starts[index], previousEnd)
        contentStart = _lineEnd(body, start)
        nextStart = starts[index + 1] if index + 1 < len(opening) else closeStart
        previousEnd = max(nextStart, contentStart)
        part.delimiters.append(body[delimiterStart:contentStart])
        part.children.append(_parse(body[contentStart:previousEnd], childType, depth + 1))
    if closeAt is not None:
        epilogueStart = _lineEnd(body, closeAt)
        part.closing = body[previousEnd:epilogueStart]
        part.epilogue = body[epilogueStart:]
    return True


def _parse(data: bytes, defaultType: str, depth: int) -> Part:
    """
    Parse one entity; see L{parse}.
    """
    fields, separator, body = _splitHeader(data)
    part = Part(fields=fields, separator=separator, defaultType=defaultType)
    if depth < MAX_DEPTH:
        ctype = part.contentType[0]
        if ctype.startswith("multipart/") and _parseMultipart(part, body, depth):
            return part
        if (
            ctype in ("message/rfc822", "message/global")
            and part.transferEncoding in IDENTITY_ENCODINGS
        ):
            part.message = _parse(body, "text/plain", depth + 1)
            return part
    part._body = body
    return part


def parse(data: bytes, defaultType: str = "text/plain") -> Part:
    """
    Parse a message into a tree of L{Part}s, keeping every byte.

    Never raises: whatever cannot be split further is a leaf.

    @param data: the message (CRLF or LF line breaks).
    @param defaultType: the content type of the message if it declares
        none.
    @return: the top-level part; C{parse(data).serialize() == data}.
    """
    return _parse(data, defaultType, 0)


def serialize(part: Part) -> bytes:
    """
    @return: C{part.serialize()}.
    """
    return part.serialize()


def walk(part: Part) -> Iterator[Part]:
    """
    Iterate over C{part} and all parts below it, depth first, parents
    before children; an encapsulated message (L{Part.message}) counts as
    its container's only child.
    """
    yield part
    if part.message is not None:
        yield from walk(part.message)
    for child in part.children:
        yield from walk(child)


def leaves(part: Part) -> Iterator[Part]:
    """
    Iterate over the parts below (or equal to) C{part} that have neither
    children nor an encapsulated message.
    """
    for each in walk(part):
        if each.message is None and not each.isMultipart:
            yield each


def removeHeader(data: bytes, name: bytes) -> bytes:
    """
    Remove every occurrence of header C{name} (with its continuation lines)
    from the header section of C{data}; the body is untouched.
    """
    end = data.find(b"\r\n\r\n")
    header = data if end < 0 else data[: end + 2]
    lowered = name.lower() + b":"
    if lowered not in header.lower():
        return data
    kept, dropping = [], False
    for line in header.split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):
            if not dropping:
                kept.append(line)
            continue
        dropping = line.lower().startswith(lowered)
        if not dropping:
            kept.append(line)
    newHeader = b"\r\n".join(kept)
    return newHeader if end < 0 else newHeader + data[end + 2 :]
