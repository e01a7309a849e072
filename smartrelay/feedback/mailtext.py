# -*- test-case-name: tests.test_feedback_report -*-
"""
Small text helpers shared by the report readers: a part's text, header
fields in a report body, addresses, status codes and reply codes found in
free text.

Nothing here raises on bad input: undecodable bytes become replacement
characters, unknown charsets are read as UTF-8.
"""

import codecs
import email.header
import re
from typing import Iterator, Optional

from smartrelay import mime
from smartrelay.feedback import mimescan

__all__ = [
    "partText",
    "headerText",
    "fieldBlocks",
    "addressIn",
    "addresses",
    "normalAddress",
    "statusIn",
    "replyCodeIn",
    "squeeze",
    "htmlText",
    "decodedBody",
    "contentTypeOf",
    "Headers",
    "MAX_TEXT",
]

#: A report's text beyond this many characters is not read (a bounce's
#: own words come first; what follows is the returned message).
MAX_TEXT = 64 * 1024

# RFC 5321 addresses as bounces write them: lenient (quoted local parts,
# IP literals and trailing dots are rare enough to leave out).  Found from
# each "@" outwards, so that long runs of local-part characters cost
# linear time: the local part is at most 64 characters, the domain 255.
_AT = re.compile(r"@")
_LOCAL = re.compile(r"(?<![\w.+=/-])[\w!#$%&'*+/=?^`{|}~-]+(?:\.[\w!#$%&'*+/=?^`{|}~-]+)*\Z")
_DOMAIN = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}(?![\w-])")


def _addressMatches(text: str) -> Iterator[tuple[int, int]]:
    """
    @return: C{(start, end)} of each e-mail address in C{text}.
    """
    for at in _AT.finditer(text):
        position = at.start()
        domain = _DOMAIN.match(text, position + 1, position + 256)
        if domain is None:
            continue
        start = max(0, position - 64)
        if position and text[position - 1] == '"':
            # A quoted local part: "a..b"@example.org
            opening = text.rfind('"', start, position - 1)
            if opening != -1 and "\n" not in text[opening:position]:
                yield opening, domain.end()
            continue
        # Let the look-behind see the character before the window.
        local = _LOCAL.search(text, start, position)
        if local is None or (local.start() == start and start and _LOCAL_CHAR.match(text, start - 1)):
            continue
        first = local.start()
        if text[first] == "/":
            # A mailbox path ("/home/u/.forward/a@b"): the address is its
            # last component.
            first = text.rfind("/", first, position) + 1
            if first == position:
                continue
        yield first, domain.end()


_LOCAL_CHAR = re.compile(r"[\w!#$%&'*+/=?^`{|}~.-]")
_STATUS = re.compile(r"(?<![\d.])([245])\.(\d{1,3})\.(\d{1,3})(?![\d.]*\d)")
_REPLY = re.compile(r"(?<![\w.-])([245][0-5]\d)(?:[ -]|:(?!\d)|$)(?!\s*(?:bytes|ms|sec))", re.M)
_SPACE = re.compile(r"\s+")


def _charsetOf(name: Optional[str]) -> str:
    """
    @return: a codec name Python knows for the MIME charset C{name}, UTF-8
        if unknown.
    """
    if not name:
        return "utf-8"
    name = name.strip().strip('"').lower()
    if name in ("us-ascii", "ascii", "unknown-8bit", "x-unknown", "8bit"):
        return "utf-8"
    try:
        return codecs.lookup(name).name
    except LookupError:
        return "utf-8"


def partText(part: mime.Part, limit: int = MAX_TEXT) -> str:
    """
    @return: the body of C{part}, transfer decoding undone, decoded by its
        charset (UTF-8 with replacement characters when unknown or wrong),
        at most C{limit} characters.
    """
    raw = decodedBody(part)[: limit * 4]
    return decodeBytes(raw, mimescan.charsetOf(part))[:limit]


def decodedBody(part: mime.Part) -> bytes:
    """
    @return: C{part}'s body with its transfer encoding undone.
    """
    return mime.decodeTransfer(part.body, mimescan.transferEncodingOf(part))


def decodeBytes(raw: bytes, charset: Optional[str] = None) -> str:
    """
    @return: C{raw} decoded by C{charset}, falling back to UTF-8 with
        replacement characters.
    """
    codec = _charsetOf(charset)
    try:
        return raw.decode(codec)
    except (UnicodeDecodeError, LookupError):
        pass
    # Mislabelled text: UTF-8, or the other encodings of the same
    # language (EUC-JP labelled ISO-2022-JP is common in Japan).
    for other in ("utf-8", *_SIBLINGS.get(codec, ())):
        try:
            return raw.decode(other)
        except UnicodeDecodeError:
            continue
    return raw.decode(codec, "replace")


_SIBLINGS = {
    "iso2022_jp": ("euc_jp", "cp932"),
    "euc_jp": ("cp932", "iso2022_jp"),
    "shift_jis": ("cp932", "euc_jp"),
    "cp932": ("euc_jp",),
    "gb2312": ("gb18030",),
    "gbk": ("gb18030",),
    "big5": ("big5hkscs", "cp950"),
    "euc_kr": ("cp949",),
    "koi8_r": ("cp1251",),
    "iso8859_1": ("cp1252",),
}


def headerText(value: Optional[str]) -> str:
    """
    @return: a header value with RFC 2047 encoded words decoded, or C{""}.
    """
    if not value:
        return ""
    if "=?" not in value:
        return value
    try:
        pieces = []
        for chunk, charset in email.header.decode_header(value):
            if isinstance(chunk, bytes):
                pieces.append(decodeBytes(chunk, charset))
            else:
                pieces.append(chunk)
        return "".join(pieces)
    except Exception:
        return value


_FIELD_LINE = re.compile(r"([A-Za-z][A-Za-z0-9-]*)[ \t]*:[ \t]?(.*)")


def fieldBlocks(text: str) -> Iterator[list[tuple[str, str]]]:
    """
    Read C{text} as groups of header-style fields separated by blank lines
    (the body of a C{message/delivery-status} or
    C{message/feedback-report} part), unfolding continuation lines.

    @return: each group as a list of C{(lower-cased name, value)}; lines
        that are no field are skipped.
    """
    block: list[tuple[str, str]] = []
    for line in text.splitlines():
        if not line.strip():
            if block:
                yield block
                block = []
            continue
        if line[:1] in (" ", "\t"):
            if block:
                name, value = block[-1]
                block[-1] = (name, value + " " + line.strip())
            continue
        match = _FIELD_LINE.match(line)
        if match is not None:
            block.append((match.group(1).lower(), match.group(2).strip()))
    if block:
        yield block


def normalAddress(address: str) -> str:
    """
    @return: C{address} with the domain lower-cased (the local part is kept
        as written) and surrounding brackets, quotes and dots removed.
    """
    address = address.strip().strip("<>'()[];:,. \t")
    if address.count('"') == 1:
        address = address.strip('"')
    local, at, domain = address.rpartition("@")
    if not at:
        return address
    return local + "@" + domain.lower().rstrip(".")


def addresses(text: str) -> Iterator[tuple[int, str]]:
    """
    @return: C{(offset, address)} for each e-mail address in C{text}.
    """
    for start, end in _addressMatches(text):
        yield start, normalAddress(text[start:end])


def addressIn(text: Optional[str]) -> Optional[str]:
    """
    @return: the first e-mail address in C{text}, normalised, or L{None}.
    """
    if not text:
        return None
    for start, end in _addressMatches(text):
        return normalAddress(text[start:end])
    return None


def statusIn(text: Optional[str]) -> Optional[str]:
    """
    @return: the first RFC 3463 failure status code (C{"5.1.1"}) in
        C{text}, else the first success code (C{"2.1.5"}), or L{None}.
    """
    if not text:
        return None
    success = None
    for match in _STATUS.finditer(text):
        found = ".".join(str(int(group)) for group in match.groups())
        if found[0] != "2":
            return found
        success = success or found
    return success


def replyCodeIn(text: Optional[str]) -> Optional[int]:
    """
    @return: the first SMTP failure reply code (C{550}) in C{text}, else
        the first success code (C{250}), or L{None}.
    """
    if not text:
        return None
    success = None
    for match in _REPLY.finditer(text):
        if match.group(1)[0] != "2":
            return int(match.group(1))
        success = success or int(match.group(1))
    return success


def squeeze(text: Optional[str], limit: int = 2000) -> Optional[str]:
    """
    @return: C{text} with runs of white space made one space, stripped and
        cut to C{limit} characters; L{None} for nothing left.
    """
    if not text:
        return None
    text = _SPACE.sub(" ", text).strip()
    return text[:limit] or None


class Headers:
    """
    A part's header fields, looked up by name in constant time (the
    L{mime.Part} lookups scan every field each time); values are decoded
    when asked for.
    """

    __slots__ = ("_fields", "memo")

    def __init__(self, part: mime.Part):
        fields: dict[bytes, list[bytes]] = {}
        for raw in part.fields:
            name, colon, value = raw.partition(b":")
            if colon:
                fields.setdefault(name.strip().lower(), []).append(value)
        self._fields = fields
        #: What readers worked out from this header once (the program
        #: that wrote the report, its writing host), by their own keys.
        self.memo: dict = {}

    def getAll(self, name: str) -> list[str]:
        """
        @return: the unfolded values of all fields called C{name}.
        """
        return [_unfold(value) for value in self._fields.get(name.lower().encode("ascii", "replace"), ())]

    def get(self, name: str) -> Optional[str]:
        """
        @return: the unfolded value of the first field called C{name}, or
            L{None}.
        """
        values = self._fields.get(name.lower().encode("ascii", "replace"))
        return _unfold(values[0]) if values else None


def _unfold(value: bytes) -> str:
    text = value.rstrip(b"\r\n").decode("utf-8", "replace")
    if "\n" in text:
        text = _FOLD.sub("", text)
    return text.strip()


_FOLD = re.compile(r"\r?\n(?=[ \t])|\r?\n\Z")


def contentTypeOf(part: mime.Part) -> str:
    """
    @return: C{part}'s lower-cased C{maintype/subtype} (its default type
        if it declares none or a malformed one); a quicker
        C{part.contentType[0]} for parts whose parameters do not matter.
    """
    return mimescan.contentType(part)


_TAG = re.compile(r"(?s)<(?:style|script)\b.*?</(?:style|script)\s*>|<br\s*/?>|</?(?:p|div|tr|li|h\d)\b[^>]*>|<[^>]*>")
_ENTITIES = {"&nbsp;": " ", "&lt;": "<", "&gt;": ">", "&amp;": "&", "&quot;": '"', "&#39;": "'"}


def htmlText(html: str) -> str:
    """
    @return: the text of an HTML part: tags taken out, block ends made line
        breaks, the common entities replaced.
    """

    def replace(match):
        tag = match.group(0).lower()
        if tag.startswith(("<br", "<p", "</p", "<div", "</div", "<tr", "</tr", "<li", "<h", "</h")):
            return "\n"
        return ""

    text = _TAG.sub(replace, html)
    for entity, char in _ENTITIES.items():
        text = text.replace(entity, char)
    return text
