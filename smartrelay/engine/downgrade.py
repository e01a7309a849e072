"""
Make a message fit what the next hop offers: downgrade 8-bit content to 7
bits for a server that cannot take it.

Messages are relayed as received, which may include 8-bit bytes: in bodies
(declared C{8bit} or C{binary}, or not declared at all) and, from
SMTPUTF8 clients, in header fields.  L{prepare} looks at the message with
L{eightBit} and at what the server's EHLO answer offers (L{Offers}):

* a server that does not advertise C{8BITMIME} (RFC 6152) must only be
  sent 7-bit bodies, so 8-bit bodies are downgraded: each leaf part whose
  body holds 8-bit bytes is re-encoded, C{text/*} as quoted-printable and
  everything else as base64 (RFC 2045), and its C{Content-Transfer-Encoding}
  is updated; containers that declared C{8bit} are relabelled C{7bit};
* a message with 8-bit header fields may only be sent with C{SMTPUTF8}
  (RFC 6531); when the server does not advertise it the fields are
  downgraded to RFC 2047 encoded-words (UTF-8; bytes that are not UTF-8
  are taken as Latin-1).  Address fields only get their display names
  encoded and their domains converted to A-labels (UTS 46 / IDNA 2008,
  with the C{idna} package: C{fa\u00df.de} is C{xn--fa-hia.de}, never
  IDNA 2003's C{fass.de}, which is another domain); an address whose
  local part is 8-bit, or whose domain IDNA refuses, cannot be expressed
  in 7 bits, so such a field is encoded as a whole, which at least
  delivers it readably.  C{Content-Type} and C{Content-Disposition}
  parameters are encoded as RFC 2231 parameters instead.

The re-wrap engine does this before it signs (L{smartrelay.engine.rewrap}),
so that the DKIM signature covers the bytes that are sent; the outbound
session does it only for messages sent without a re-wrap.

L{downgrade} only touches what has to change: parts and fields without
8-bit bytes are kept byte for byte (see L{smartrelay.mime}).
"""

import re
from typing import Callable, Optional

import attrs
import idna

from smartrelay import mime

__all__ = [
    "Offers",
    "Prepared",
    "prepare",
    "eightBit",
    "downgrade",
    "encodeWords",
    "downgradeField",
    "toASCIIDomain",
]

ADDRESS_FIELDS = frozenset(
    [
        "from",
        "to",
        "cc",
        "bcc",
        "reply-to",
        "sender",
        "resent-from",
        "resent-to",
        "resent-cc",
        "resent-bcc",
        "resent-sender",
    ]
)
PARAMETER_FIELDS = frozenset(["content-type", "content-disposition"])

#: Header lines are folded (at white space) to stay within this length.
FOLD_AT = 78
#: The longest encoded text in an encoded-word: 75 minus C{=?utf-8?q??=}.
_WORD_TEXT = 75 - len("=?utf-8?q??=")
#: Characters that stand for themselves in a "Q" encoded-word anywhere,
#: phrases included (RFC 2047 section 5 rule 3).
_Q_LITERAL = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!*+-/")
#: RFC 2231 attribute-char: what may appear unencoded in a parameter value.
_ATTRIBUTE_CHAR = frozenset(
    b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$&+-.^_`|~"
)
_PARAMETER_CHUNK = 60
_PARAMETER = re.compile(
    r"""(;[ \t]*)([!#$%&'*+\-.0-9A-Za-z^_`|~]+)([ \t]*=[ \t]*)("(?:[^"\\]|\\.)*"|[^; \t]*)"""
)
_WORD = re.compile(r"([ \t]*)([^ \t]+)")
_ESCAPED = re.compile(r"[\udc80-\udcff]")
_FOLDING = re.compile(r"\r?\n(?=[ \t])")
_COMMENT = re.compile(r"\(((?:[^()\\]|\\.)*)\)")
_ADDR_SPEC = re.compile(r"([^\s<>()\",@]+@)([^\s<>()\",@]+)")


@attrs.frozen
class Offers:
    """
    What the next hop takes beyond 7-bit ASCII, from its EHLO answer.

    @ivar eightBitMIME: it advertises C{8BITMIME} (8-bit bodies).
    @ivar smtpUTF8: it advertises C{SMTPUTF8} (8-bit header fields).
    """

    eightBitMIME: bool = False
    smtpUTF8: bool = False


@attrs.frozen
class Prepared:
    """
    A message made to fit one next hop, to be sent byte for byte (only
    dot-stuffed): its DKIM signature, if any, covers exactly these bytes.

    @ivar data: the message.
    @ivar eightBitMIME: send it with C{BODY=8BITMIME} (it has 8-bit bytes
        and the hop offers C{8BITMIME}).
    @ivar smtpUTF8: send it with C{SMTPUTF8} (it has 8-bit header fields
        and the hop offers C{SMTPUTF8}).
    """

    data: bytes
    eightBitMIME: bool = False
    smtpUTF8: bool = False

    def fits(self, offers: Offers) -> bool:
        """
        Whether a hop offering C{offers} can take this message as it is.
        """
        return (offers.eightBitMIME or not self.eightBitMIME) and (
            offers.smtpUTF8 or not self.smtpUTF8
        )


def prepare(data: bytes, offers: Offers) -> Prepared:
    """
    Make C{data} fit a hop offering C{offers}: downgrade the 8-bit header
    fields it cannot take (no C{SMTPUTF8}) and the 8-bit bodies (no
    C{8BITMIME}); say which MAIL parameters the result needs.

    A 7-bit message costs one C{bytes.isascii} (well under a microsecond
    for a few kilobytes); only a message with a byte C{>= 0x80} is parsed.

    @return: a L{Prepared} whose C{data} is C{data} itself if nothing had
        to change.
    """
    if data.isascii():
        return Prepared(data)
    headers8, body8 = eightBit(data)
    downgradeHeaders = headers8 and not offers.smtpUTF8
    downgradeBody = body8 and not offers.eightBitMIME
    if downgradeHeaders or downgradeBody:
        data = downgrade(data, headers=downgradeHeaders, body=downgradeBody)
        if data.isascii():
            return Prepared(data)
    return Prepared(
        data,
        eightBitMIME=offers.eightBitMIME,
        smtpUTF8=headers8 and offers.smtpUTF8,
    )


def _isASCII(text: str) -> bool:
    return text.isascii()


def eightBit(data: bytes) -> tuple[bool, bool]:
    """
    Say where a message has 8-bit bytes.

    @param data: the message.
    @return: C{(headers, body)}: whether the header section of the message
        or of any part (including encapsulated messages) has a byte
        C{>= 0x80}, and whether anything else (a body, a preamble or
        epilogue) has one.
    """
    root = mime.parse(data)
    headers = body = False
    for part in mime.walk(root):
        headers = headers or mime.has8bit(part.header)
        body = body or any(mime.has8bit(chunk) for chunk in _ownBody(part))
    return headers, body


def _ownBody(part: mime.Part) -> list[bytes]:
    """
    @return: the body bytes that belong to C{part} itself rather than to
        a part below it.
    """
    if part.message is not None:
        return []
    if part.isMultipart:
        return [part.preamble, *part.delimiters, part.closing, part.epilogue]
    return [part.body]


def downgrade(data: bytes, headers: bool, body: bool) -> bytes:
    """
    Make a message's header fields and/or bodies 7-bit.

    The result is 7-bit clean if the flags cover all the 8-bit content,
    as with C{downgrade(data, *eightBit(data))}.  The decoded content of
    every part is unchanged; 8-bit bytes in the preamble or epilogue of a
    multipart (which no reader shows) are replaced by C{?}.

    @param data: the message.
    @param headers: whether to RFC 2047/2231 encode 8-bit header fields.
    @param body: whether to re-encode 8-bit bodies.
    @return: the downgraded message; C{data} itself if nothing changed.
    """
    root = mime.parse(data)
    if body:
        _downgradeBodies(root)
    if headers:
        for part in mime.walk(root):
            _downgradeHeader(part)
    return root.serialize()


def _scrub(chunk: bytes) -> bytes:
    """
    @return: C{chunk} with each 8-bit byte replaced by C{?}.
    """
    return re.sub(rb"[\x80-\xff]", b"?", chunk)


def _downgradeBodies(part: mime.Part) -> bool:
    """
    Re-encode the 8-bit bodies in and below C{part}.

    @return: whether anything below C{part} had 8-bit body bytes.
    """
    if part.message is not None:
        changed = _downgradeBodies(part.message)
    elif part.isMultipart:
        changed = False
        for child in part.children:
            changed = _downgradeBodies(child) or changed
        if any(mime.has8bit(chunk) for chunk in _ownBody(part)):
            changed = True
            part.preamble = _scrub(part.preamble)
            part.delimiters = [_scrub(delimiter) for delimiter in part.delimiters]
            part.closing = _scrub(part.closing)
            part.epilogue = _scrub(part.epilogue)
    else:
        if not mime.has8bit(part.body):
            return False
        isText = part.contentType[0].startswith("text/")
        part.setBody(part.decodedBody(), "quoted-printable" if isText else "base64")
        return True
    if changed and part.transferEncoding in ("8bit", "binary"):
        part.setHeader("Content-Transfer-Encoding", "7bit")
    return changed


def _downgradeHeader(part: mime.Part) -> None:
    """
    Encode each of C{part}'s header fields that has 8-bit bytes.
    """
    newline = part.newline
    for index, field in enumerate(part.fields):
        if mime.has8bit(field):
            part.fields[index] = downgradeField(field, newline)


def _decode(raw: bytes) -> str:
    """
    @return: C{raw} decoded as UTF-8, each byte that is not part of a valid
        UTF-8 sequence decoded as Latin-1.
    """
    text = raw.decode("utf-8", "surrogateescape")
    return _ESCAPED.sub(lambda match: chr(ord(match.group()) - 0xDC00), text)


def downgradeField(field: bytes, newline: bytes = b"\r\n") -> bytes:
    """
    Make one raw header field 7-bit.

    @param field: the field: name, colon, value with folding, and its line
        break (if any).
    @param newline: the line break for new folds.
    @return: the field with its value encoded and refolded; name, the
        white space after the colon and the final line break are kept.
    """
    colon = field.find(b":")
    name = field[:colon]
    rawValue = field[colon + 1 :]
    ending = rawValue[len(rawValue.rstrip(b"\r\n")) :]
    value = _FOLDING.sub("", _decode(rawValue[: len(rawValue) - len(ending)]))
    kind = name.strip().decode("ascii", "replace").lower()
    encoded = _encodeValue(kind, value)
    folded = _fold(len(name) + 1, encoded, newline.decode("ascii"))
    return _scrub(name) + b":" + folded.encode("ascii", "replace") + ending


def _encodeValue(kind: str, value: str) -> str:
    """
    @param kind: the lower-cased field name.
    @param value: the unfolded field value.
    @return: C{value} in 7-bit form, unfolded.
    """
    special: Optional[Callable[[str], str]] = None
    if kind in ADDRESS_FIELDS:
        special = _encodeAddresses
    elif kind in PARAMETER_FIELDS:
        special = _encodeParameters
    if special is not None:
        encoded = special(value)
        if _isASCII(encoded):
            return encoded
    return _encodeUnstructured(value)


def _qEncode(character: str) -> str:
    """
    @return: one character as "Q" encoded text (RFC 2047 section 4.2).
    """
    out = []
    for byte in character.encode("utf-8"):
        if byte == 32:
            out.append("_")
        elif byte in _Q_LITERAL:
            out.append(chr(byte))
        else:
            out.append("=%02X" % (byte,))
    return "".join(out)


def encodeWords(text: str) -> list[str]:
    """
    Encode text as RFC 2047 encoded-words, UTF-8 and "Q" encoding, each
    at most 75 characters and not splitting characters.  The encoding is
    safe in unstructured text, comments and phrases.

    @return: the encoded-words; white space between them is ignored when
        they are decoded.
    """
    chunks = [""]
    for character in text:
        encoded = _qEncode(character)
        if chunks[-1] and len(chunks[-1]) + len(encoded) > _WORD_TEXT:
            chunks.append("")
        chunks[-1] += encoded
    return [f"=?utf-8?q?{chunk}?=" for chunk in chunks]


def _encodeUnstructured(value: str) -> str:
    """
    Encode the words of C{value} that are not ASCII; runs of such words
    become one run of encoded-words, so the white space inside a run is
    kept.
    """
    pieces: list[str] = []
    run: list[str] = []
    runSpace = ""
    position = 0
    for match in _WORD.finditer(value):
        space, word = match.groups()
        position = match.end()
        if not _isASCII(word):
            if run:
                run.append(space)
            else:
                runSpace = space
            run.append(word)
            continue
        if run:
            pieces.append(runSpace + " ".join(encodeWords("".join(run))))
            run = []
        pieces.append(space + word)
    if run:
        pieces.append(runSpace + " ".join(encodeWords("".join(run))))
    return "".join(pieces) + value[position:]


def _topLevel(text: str) -> list[int]:
    """
    @return: the offsets of the characters of C{text} outside quoted
        strings, comments and angle brackets (opening ones included).
    """
    offsets = []
    quoted = escaped = False
    comment = 0
    angle = False
    for offset, character in enumerate(text):
        if escaped:
            escaped = False
        elif (quoted or comment) and character == "\\":
            escaped = True
        elif quoted:
            quoted = character != '"'
        elif comment:
            comment += {"(": 1, ")": -1}.get(character, 0)
        elif angle:
            angle = character != ">"
        else:
            offsets.append(offset)
            quoted = character == '"'
            comment = 1 if character == "(" else 0
            angle = character == "<"
    return offsets


def _unquotePhrase(phrase: str) -> str:
    """
    @return: a phrase with its quoted strings unquoted.
    """
    return re.sub(
        r'"((?:[^"\\]|\\.)*)"',
        lambda match: re.sub(r"\\(.)", r"\1", match.group(1)),
        phrase,
    )


def toASCIIDomain(domain: str) -> Optional[str]:
    """
    A domain in its ASCII form: its labels as A-labels (UTS 46 mapping,
    then IDNA 2008; C{fa\u00df.de} is C{xn--fa-hia.de}).  An ASCII domain
    is returned as it is.

    @return: the ASCII form, or L{None} if IDNA refuses the domain (a
        code point it does not allow, such as a symbol or white space, an
        empty or over-long label).
    """
    if _isASCII(domain):
        return domain
    try:
        return idna.encode(domain, uts46=True).decode("ascii")
    except UnicodeError:  # idna.IDNAError and its kinds are UnicodeErrors
        return None


def _idnaAddresses(text: str) -> str:
    """
    @return: C{text} with the non-ASCII domains of its addr-specs turned
        into A-labels where IDNA allows it (the others stay, so the caller
        sees that the field is not 7-bit yet).
    """

    def convert(match: "re.Match[str]") -> str:
        domain = match.group(2)
        if _isASCII(domain):
            return match.group()
        converted = toASCIIDomain(domain)
        if converted is None:
            return match.group()
        return match.group(1) + converted

    return _ADDR_SPEC.sub(convert, text)


def _encodeComments(text: str) -> str:
    """
    @return: C{text} with the contents of its non-ASCII (unnested)
        comments replaced by encoded-words.
    """

    def encode(match: "re.Match[str]") -> str:
        content = match.group(1)
        if _isASCII(content):
            return match.group()
        return "(" + " ".join(encodeWords(re.sub(r"\\(.)", r"\1", content))) + ")"

    return _COMMENT.sub(encode, text)


def _encodeAddress(address: str) -> str:
    """
    Downgrade one address (a mailbox, possibly with a display name).
    """
    if _isASCII(address):
        return address
    angles = [offset for offset in _topLevel(address) if address[offset] == "<"]
    if not angles:
        return _encodeComments(_idnaAddresses(address))
    phrase, rest = address[: angles[0]], address[angles[0] :]
    core = phrase.strip(" \t")
    if not _isASCII(core):
        lead = phrase[: len(phrase) - len(phrase.lstrip(" \t"))]
        trail = phrase[len(phrase.rstrip(" \t")) :] or " "
        phrase = lead + " ".join(encodeWords(_unquotePhrase(core))) + trail
    return phrase + _encodeComments(_idnaAddresses(rest))


def _encodeAddresses(value: str) -> str:
    """
    Downgrade an address list: encode display names, convert domains.
    """
    commas = [offset for offset in _topLevel(value) if value[offset] == ","]
    bounds = [-1, *commas, len(value)]
    return ",".join(
        _encodeAddress(value[start + 1 : end]) for start, end in zip(bounds, bounds[1:])
    )


def _percentEncode(text: str) -> str:
    """
    @return: C{text} as RFC 2231 extended value characters (UTF-8).
    """
    return "".join(
        chr(byte) if byte in _ATTRIBUTE_CHAR else "%%%02X" % (byte,)
        for byte in text.encode("utf-8")
    )


def _chunks(encoded: str) -> list[str]:
    """
    @return: C{encoded} (percent-encoded) cut into short pieces, never
        inside a C{%XX}.
    """
    pieces = [""]
    for token in re.findall(r"%[0-9A-F]{2}|.", encoded):
        if pieces[-1] and len(pieces[-1]) + len(token) > _PARAMETER_CHUNK:
            pieces.append("")
        pieces[-1] += token
    return pieces


def _encodeParameter(match: "re.Match[str]") -> str:
    """
    Rewrite one non-ASCII parameter as an RFC 2231 extended parameter,
    with continuations if it is long.
    """
    separator, name, equals, value = match.groups()
    if _isASCII(value) or name.endswith("*"):
        return match.group()
    if value.startswith('"') and value.endswith('"') and len(value) >= 2:
        value = re.sub(r"\\(.)", r"\1", value[1:-1])
    pieces = _chunks(_percentEncode(value))
    if len(pieces) == 1:
        return f"{separator}{name}*=utf-8''{pieces[0]}"
    return separator + "; ".join(
        f"{name}*{index}*=" + ("utf-8''" if index == 0 else "") + piece
        for index, piece in enumerate(pieces)
    )


def _encodeParameters(value: str) -> str:
    """
    Downgrade a C{Content-Type} or C{Content-Disposition} value.
    """
    return _PARAMETER.sub(_encodeParameter, value)


def _fold(used: int, value: str, newline: str) -> str:
    """
    Fold a field value at its white space so that lines stay within
    L{FOLD_AT} characters where possible; unfolding gives C{value} back.

    @param used: the length of the field name and colon.
    """
    out: list[str] = []
    length = used
    # Never fold before the first word (the stdlib would keep the white
    # space) nor twice in a row (a line of white space only).
    fresh = True
    position = 0
    for match in _WORD.finditer(value):
        space, word = match.groups()
        position = match.end()
        if space and not fresh and length + len(space) + len(word) > FOLD_AT:
            out.append(newline)
            length = 0
            fresh = True
        out.append(space + word)
        length += len(space) + len(word)
        fresh = False
    out.append(value[position:])
    return "".join(out)
