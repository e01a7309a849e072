"""
Open and click tracking: rewrite the HTML parts of a message.

L{rewriteTracking} parses a message with L{smartrelay.mime} (which keeps
every byte), rewrites the C{text/html} leaf parts that are not attachments
and serialises the tree again, so that every header, every other part and
the MIME structure (boundaries, preambles, epilogues) stay byte-identical.

Inside an HTML part, L{rewriteHTML} uses the stdlib tokenizer
(L{html.parser.HTMLParser}, without character reference conversion) only to
I{find} things: the source offset of each C{<a>}, C{<area>} and C{<base>}
start tag and of each C{</body>} and C{</html>} end tag.  The replacements
(a tracked C{href} value, the open pixel) are then spliced into the
original text, so that everything else, odd formatting included, is kept
exactly as it was.  What the tokenizer sees as comments (conditional
comments included), declarations, CDATA-like marked sections and the
content of C{<script>} and C{<style>} is never changed.

Click tracking replaces the first C{href} of each C{<a>} and C{<area>}
whose value, after HTML character reference decoding (with the HTML
attribute rules: C{&region=} stays as written) and removing surrounding
white space, is an absolute C{http} or C{https} URL, or a relative one made
absolute by the document's first C{<base href>} (when that one is absolute
http(s)).  The tracked URL is C{clickURL(absoluteURL)}, attribute-escaped,
in double quotes.  Tags with a C{data-smartrelay-notrack} attribute are
left exactly as they were.

Open tracking inserts L{trackingPixel} once into each HTML part: before the
last C{</body>} end tag, else before the last C{</html>}, else at the end.
"""

import codecs
import html
import re
from html.entities import html5 as _HTML5
from html.parser import HTMLParser
from typing import Callable, Optional
from urllib.parse import quote, urljoin, urlsplit

from smartrelay.mime import IDENTITY_ENCODINGS, Part, encodeTransfer, has8bit, parse

__all__ = ["rewriteTracking", "rewriteHTML", "trackingPixel", "NOTRACK_ATTRIBUTE"]

#: An C{<a>} or C{<area>} carrying this attribute (any value) is not
#: click-tracked.
NOTRACK_ATTRIBUTE = "data-smartrelay-notrack"

#: The longest line (without its line break) a 7bit or 8bit body may have
#: (RFC 5322 section 2.1.1).
_MAX_LINE = 998

_WHITESPACE = " \t\n\r\f"
_NON_ASCII = re.compile(r"[^\x00-\x7f]")
_ESCAPED_BYTE = re.compile(r"[\udc80-\udcff]")
_LINE_BREAK = re.compile(rb"\r?\n")
_CHARREF = re.compile(r"&(#[0-9]+;?|#[xX][0-9a-fA-F]+;?|[^\t\n\f <&#;]{1,32};?)")
_ERRORS = "smartrelay.tracking"
_TRACKED_TAGS = frozenset(["a", "area"])


def _encodeError(error: UnicodeError) -> tuple[bytes, int]:
    """
    Codec error handler for encoding rewritten HTML: lone surrogates from
    C{surrogateescape} decoding become their original bytes again, any
    other character the charset cannot hold becomes a numeric character
    reference.
    """
    if not isinstance(error, UnicodeEncodeError):
        raise error
    pieces = []
    for character in error.object[error.start : error.end]:
        code = ord(character)
        if 0xDC80 <= code <= 0xDCFF:
            pieces.append(bytes([code - 0xDC00]))
        else:
            pieces.append(b"&#%d;" % (code,))
    return b"".join(pieces), error.end


codecs.register_error(_ERRORS, _encodeError)


def _asciiURL(url: str) -> str:
    """
    Percent-encode (as UTF-8) every non-ASCII character of a URL we insert,
    so that inserted text is always ASCII (a 7bit part stays 7bit).
    """
    return _NON_ASCII.sub(
        lambda match: quote(match.group().encode("utf-8", "surrogatepass"), safe=""), url
    )


def _attribute(value: str) -> str:
    """
    @return: C{value} as a double-quoted attribute value, non-ASCII
        percent-encoded and HTML-escaped.
    """
    return '"' + html.escape(_asciiURL(value), quote=True) + '"'


def trackingPixel(openURL: str) -> str:
    """
    @param openURL: the URL of the open-tracking image.
    @return: the C{<img>} tag that L{rewriteHTML} inserts.
    """
    return (
        f"<img src={_attribute(openURL)} "
        'width="1" height="1" alt="" '
        'style="display:none!important;border:0;width:1px;height:1px" />'
    )


def _unescapeAttribute(value: str) -> str:
    """
    Decode the character references of an attribute value as browsers do
    (HTML section 13.2.5.73): unlike L{html.unescape}, a named reference
    without its semicolon that is followed by an alphanumeric character or
    C{=} is left alone, so that C{?a=1&region=2} keeps its C{&region}.
    """

    def replace(match: "re.Match[str]") -> str:
        reference = match.group(1)
        if reference[0] == "#":
            return html.unescape(match.group())
        if reference in _HTML5:
            return _HTML5[reference]
        for length in range(len(reference) - 1, 1, -1):
            prefix = reference[:length]
            if prefix in _HTML5:
                following = reference[length]
                if following.isalnum() or following == "=":
                    break
                return _HTML5[prefix] + reference[length:]
        return match.group()

    return _CHARREF.sub(replace, value)


def _scanAttributes(tagText: str) -> Optional[list[tuple[str, Optional[str], int, int]]]:
    """
    Find the attributes of a start tag and where their values are, following
    the HTML tokenizer's attribute states.

    @param tagText: the whole start tag, from C{<} to C{>}.
    @return: C{(name, raw value, start, end)} for each attribute, in order,
        where C{tagText[start:end]} is the value as written, quotes
        included (C{None, 0, 0} for an attribute without value); or L{None}
        if the tag cannot be scanned.
    """
    size = len(tagText)
    index = 1
    while index < size and tagText[index] not in _WHITESPACE and tagText[index] not in "/>":
        index += 1
    found: list[tuple[str, Optional[str], int, int]] = []
    while index < size:
        character = tagText[index]
        if character in _WHITESPACE or character == "/":
            index += 1
            continue
        if character == ">":
            break
        start = index
        index += 1
        while (
            index < size
            and tagText[index] not in _WHITESPACE
            and tagText[index] not in "/>="
        ):
            index += 1
        name = tagText[start:index]
        after = index
        while after < size and tagText[after] in _WHITESPACE:
            after += 1
        if after >= size or tagText[after] != "=":
            found.append((name, None, 0, 0))
            index = after
            continue
        after += 1
        while after < size and tagText[after] in _WHITESPACE:
            after += 1
        if after < size and tagText[after] in "\"'":
            close = tagText.find(tagText[after], after + 1)
            if close == -1:
                return None
            found.append((name, tagText[after + 1 : close], after, close + 1))
            index = close + 1
        else:
            end = after
            while end < size and tagText[end] not in _WHITESPACE and tagText[end] != ">":
                end += 1
            found.append((name, tagText[after:end], after, end))
            index = end
    return found


class _Locator(HTMLParser):
    """
    Tokenize an HTML document, recording where the tags that tracking cares
    about start in the source.

    @ivar startTags: C{(offset, tag, raw tag text, attributes)} of each
        C{<a>}, C{<area>} and C{<base>} start tag, in document order;
        attributes as the tokenizer parsed them.
    @ivar endTags: C{(offset, tag)} of each C{</body>} and C{</html>}.
    """

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=False)
        self._text = text
        self._lineStarts = [0]
        position = text.find("\n")
        while position != -1:
            self._lineStarts.append(position + 1)
            position = text.find("\n", position + 1)
        self.startTags: list[tuple[int, str, str, list[tuple[str, Optional[str]]]]] = []
        self.endTags: list[tuple[int, str]] = []

    def _offset(self) -> int:
        """
        @return: the source offset of the construct being handled.
        """
        line, column = self.getpos()
        return self._lineStarts[line - 1] + column

    def parse_html_declaration(self, i: int) -> int:
        # The stdlib gives up (AssertionError) on some malformed "<!"
        # constructs such as "<![<"; treat those as browsers do, as a bogus
        # comment up to the next ">".  It may have moved the position
        # before giving up: put it back.
        position = self.lineno, self.offset
        try:
            return super().parse_html_declaration(i)
        except AssertionError:
            self.lineno, self.offset = position
            return self.parse_bogus_comment(i)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, Optional[str]]]) -> None:
        if tag in _TRACKED_TAGS or tag == "base":
            tagText = self.get_starttag_text()
            if tagText is not None:
                self.startTags.append((self._offset(), tag, tagText, attrs))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, Optional[str]]]) -> None:
        # Not the default (start tag then end tag): <body/> ends nothing.
        self.handle_starttag(tag, attrs)

    def handle_endtag(self, tag: str) -> None:
        if tag in ("body", "html"):
            offset = self._offset()
            if self._text[offset : offset + 2 + len(tag)].lower() == "</" + tag:
                self.endTags.append((offset, tag))


def _checkedAttributes(
    text: str, offset: int, tagText: str, attrs: list[tuple[str, Optional[str]]]
) -> Optional[list[tuple[str, Optional[str], int, int]]]:
    """
    Scan a start tag's attributes, making sure that the tag really is at
    C{offset} and that the scan agrees with the tokenizer.

    @return: the scanned attributes with names lower-cased and value
        offsets made absolute, or L{None} if in doubt (the tag is then left
        alone).
    """
    if not text.startswith(tagText, offset):
        return None
    scanned = _scanAttributes(tagText)
    if scanned is None:
        return None
    asParsed = [
        (name.lower(), html.unescape(value) if value else value) for name, value, _, _ in scanned
    ]
    if asParsed != list(attrs):
        return None
    return [
        (name.lower(), value, offset + start, offset + end) for name, value, start, end in scanned
    ]


def _httpURL(url: str) -> bool:
    """
    @return: whether C{url} is an absolute http or https URL with a host.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.netloc)


def _absolute(value: str, base: Optional[str]) -> Optional[str]:
    """
    @param value: an C{href} value, character references decoded.
    @param base: the document's usable base URL, if any.
    @return: the absolute http(s) URL C{value} stands for, or L{None} if it
        is not to be tracked.
    """
    url = value.strip(_WHITESPACE)
    if not url or url.startswith("#") or _ESCAPED_BYTE.search(url):
        return None
    if _httpURL(url):
        return url
    try:
        scheme = urlsplit(url).scheme
    except ValueError:
        return None
    if scheme or base is None:
        return None
    try:
        joined = urljoin(base, url)
    except ValueError:
        return None
    return joined if _httpURL(joined) else None


def rewriteHTML(
    text: str, openURL: Optional[str], clickURL: Optional[Callable[[str], str]]
) -> str:
    """
    Add open and click tracking to an HTML document.

    @param text: the document.
    @param openURL: the URL of the open-tracking pixel, or L{None} for no
        pixel.
    @param clickURL: maps an absolute http(s) URL to its tracked URL, or
        L{None} for no click tracking.
    @return: the rewritten document; C{text} itself if nothing changed.
    @raise Exception: whatever C{clickURL} raises.
    """
    if openURL is None and clickURL is None:
        return text
    locator = _Locator(text)
    locator.feed(text)
    locator.close()
    edits: list[tuple[int, int, str]] = []
    if clickURL is not None:
        base = None
        tags = []
        for offset, tag, tagText, attrs in locator.startTags:
            checked = _checkedAttributes(text, offset, tagText, attrs)
            if checked is None:
                continue
            if tag == "base":
                if base is None:
                    hrefs = [value for name, value, _, _ in checked if name == "href"]
                    if hrefs:
                        candidate = _unescapeAttribute(hrefs[0] or "").strip(_WHITESPACE)
                        base = candidate if _httpURL(candidate) else ""
            else:
                tags.append(checked)
        usableBase = base or None
        for checked in tags:
            names = [name for name, _, _, _ in checked]
            if NOTRACK_ATTRIBUTE in names or "href" not in names:
                continue
            _, value, start, end = checked[names.index("href")]
            if value is None:
                continue
            url = _absolute(_unescapeAttribute(value), usableBase)
            if url is not None:
                edits.append((start, end, _attribute(clickURL(url))))
    if openURL is not None:
        bodies = [offset for offset, tag in locator.endTags if tag == "body"]
        htmls = [offset for offset, tag in locator.endTags if tag == "html"]
        where = bodies[-1] if bodies else htmls[-1] if htmls else len(text)
        edits.append((where, where, trackingPixel(openURL)))
    if not edits:
        return text
    edits.sort()
    pieces = []
    position = 0
    for start, end, replacement in edits:
        pieces.append(text[position:start])
        pieces.append(replacement)
        position = end
    pieces.append(text[position:])
    return "".join(pieces)


def _isAttachment(part: Part) -> bool:
    """
    @return: whether C{part} is declared an attachment.
    """
    disposition = part.get("Content-Disposition")
    return disposition is not None and disposition.split(";")[0].strip().lower() == "attachment"


def _htmlLeaves(part: Part) -> list[Part]:
    """
    @return: the C{text/html} leaves under C{part} that are not
        attachments (nothing inside an attachment counts either).
    """
    if _isAttachment(part):
        return []
    if part.message is not None:
        return _htmlLeaves(part.message)
    if part.isMultipart:
        return [leaf for child in part.children for leaf in _htmlLeaves(child)]
    return [part] if part.contentType[0] == "text/html" else []


def _codec(part: Part) -> str:
    """
    @return: the Python codec for C{part}'s charset: UTF-8 when there is
        none, when it is US-ASCII (UTF-8 is a superset, and mislabelled
        8-bit text is common) or when Python does not know it as a text
        encoding.
    """
    charset = part.charset
    if charset is None:
        return "utf-8"
    try:
        info = codecs.lookup(charset)
    except LookupError:
        return "utf-8"
    if info.name == "ascii" or not getattr(info, "_is_text_encoding", True):
        return "utf-8"
    return info.name


def _longestLine(data: bytes) -> int:
    """
    @return: the length of the longest line of C{data}, line breaks
        excluded.
    """
    return max((len(line) for line in _LINE_BREAK.split(data)), default=0)


def _rewritePart(
    part: Part, openURL: Optional[str], clickURL: Optional[Callable[[str], str]]
) -> bool:
    """
    Rewrite one HTML leaf in place.

    @return: whether C{part} was changed.
    """
    encoding = part.transferEncoding
    if encoding not in IDENTITY_ENCODINGS and encoding not in ("base64", "quoted-printable"):
        return False
    raw = part.decodedBody()
    codec = _codec(part)
    try:
        text = raw.decode(codec, "surrogateescape")
        if text.encode(codec, _ERRORS) != raw:
            return False
    except (UnicodeError, LookupError, TypeError):
        return False
    try:
        rewritten = rewriteHTML(text, openURL, clickURL)
    except (AssertionError, ValueError, IndexError):
        # The tokenizer gave up on something; leave the part alone.
        return False
    if rewritten == text:
        return False
    try:
        data = rewritten.encode(codec, _ERRORS)
    except (UnicodeError, LookupError):
        return False
    newline = part.newline
    if encoding in IDENTITY_ENCODINGS and encoding != "binary":
        tooLong = _longestLine(data) > _MAX_LINE >= _longestLine(raw)
        newly8bit = encoding == "7bit" and has8bit(data) and not has8bit(raw)
        if tooLong or newly8bit:
            part.setBody(data, "quoted-printable")
            return True
    part.body = encodeTransfer(data, encoding, newline)
    return True


def rewriteTracking(
    message: bytes, openURL: Optional[str], clickURL: Optional[Callable[[str], str]]
) -> bytes:
    """
    Add open and click tracking to the HTML parts of a message.

    Only C{text/html} leaves that are not attachments are rewritten, each
    with L{rewriteHTML}: the part is decoded (transfer encoding, then
    charset; undecodable bytes survive as lone surrogates), rewritten and
    encoded again with the same charset and the same transfer encoding
    (quoted-printable and base64 re-encoded in lines of at most 76
    characters).  A 7bit or 8bit part only becomes quoted-printable, with
    its C{Content-Transfer-Encoding} field replaced, if the rewriting made
    one of its lines longer than 998 octets.  Everything else (every other
    part, every header, the MIME structure, HTML parts that need no
    change) stays byte-identical.

    @param message: the whole message.
    @param openURL: the URL of the open-tracking pixel, or L{None}.
    @param clickURL: maps an absolute http(s) URL to its tracked URL, or
        L{None}.
    @return: the rewritten message; C{message} itself if nothing changed.
    @raise Exception: whatever C{clickURL} raises.
    """
    if openURL is None and clickURL is None:
        return message
    tree = parse(message)
    changed = False
    for part in _htmlLeaves(tree):
        if _rewritePart(part, openURL, clickURL):
            changed = True
    return tree.serialize() if changed else message
