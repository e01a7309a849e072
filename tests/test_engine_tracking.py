"""
Tests for L{smartrelay.engine.tracking}: open and click tracking of HTML
parts, everything else byte-identical.
"""

import base64
import binascii
import email
import email.policy
import html
import re
from typing import Optional
from urllib.parse import urljoin

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from smartrelay.engine.tracking import rewriteHTML, rewriteTracking, trackingPixel
from smartrelay.mime import Part, leaves, parse, walk
from tests.test_mime import leafSpecs, partShape, renderMessage, shape, treeSpecs

TRACK = "https://t.example/c/"
OPEN = "https://t.example/o/abc?x=1&y=2"
PIXEL = (
    '<img src="https://t.example/o/abc?x=1&amp;y=2" width="1" height="1" alt="" '
    'style="display:none!important;border:0;width:1px;height:1px" />'
)
TRACKED = re.compile(re.escape(TRACK) + "([A-Za-z0-9_=-]*)")


def click(url: str) -> str:
    """
    A reversible click URL: C{TRACK} and the URL, urlsafe-base64 encoded.
    """
    return TRACK + base64.urlsafe_b64encode(url.encode("utf-8")).decode("ascii")


def unclick(token: str) -> str:
    """
    @return: the URL that L{click} encoded into C{token}.
    """
    return base64.urlsafe_b64decode(token).decode("utf-8")


def trackedURLs(text: str) -> list[str]:
    """
    @return: the original URLs of all tracked links in C{text}.
    """
    return [unclick(token) for token in TRACKED.findall(text)]


def htmlMessage(
    body: bytes,
    charset: str = "utf-8",
    cte: Optional[str] = None,
    extra: str = "",
) -> bytes:
    """
    @return: a single-part HTML message.
    """
    header = (
        "From: a@example.com\r\nTo: b@example.org\r\nSubject: hi\r\nMIME-Version: 1.0\r\n"
        f"Content-Type: text/html; charset={charset}\r\n"
    )
    if cte is not None:
        header += f"Content-Transfer-Encoding: {cte}\r\n"
    return (header + extra + "\r\n").encode("ascii") + body


def rewrite(text: str, openURL: Optional[str] = None, clicks: bool = True) -> str:
    """
    L{rewriteHTML} with the test click URL.
    """
    return rewriteHTML(text, openURL, click if clicks else None)


class HTMLTests(SynchronousTestCase):
    """
    Tests for L{rewriteHTML}.
    """

    def test_simple(self) -> None:
        """
        Absolute http(s) links become tracked links, double-quoted; the
        pixel goes before C{</body>}.
        """
        text = '<html><body><p>Hi <a href="https://shop.example/sale">Sale</a></p></body></html>\r\n'
        self.assertEqual(
            rewrite(text, OPEN),
            '<html><body><p>Hi <a href="' + click("https://shop.example/sale") + '">Sale</a></p>'
            + PIXEL + "</body></html>\r\n",
        )

    def test_pixel(self) -> None:
        """
        L{trackingPixel} escapes the URL for an attribute.
        """
        self.assertEqual(trackingPixel(OPEN), PIXEL)
        self.assertIn('src="https://t.example/o/%C3%A9&quot;"', trackingPixel("https://t.example/o/\xe9\""))

    def test_uppercase(self) -> None:
        """
        Tag and attribute names are case-insensitive; the rest of the tag is
        kept as written.
        """
        text = '<A CLASS=x HREF="http://example.com/">x</A>'
        self.assertEqual(rewrite(text), '<A CLASS=x HREF="' + click("http://example.com/") + '">x</A>')
        text = '<AREA Shape=rect HrEf=HTTP://example.com/a>'
        self.assertEqual(rewrite(text), '<AREA Shape=rect HrEf="' + click("HTTP://example.com/a") + '">')

    def test_quoting(self) -> None:
        """
        Single-quoted and unquoted values, other attributes and line breaks
        inside the tag are handled; only the value changes.
        """
        text = (
            "<a\r\n  class='c > d'\r\n  href='https://example.com/?a=1&amp;b=2'\r\n  target=_blank>x</a>"
            "<a href=http://example.com/p/>y</a>"
            '<a title=t href = " https://example.com/s "\tid=z >w</a>'
        )
        self.assertEqual(
            rewrite(text),
            "<a\r\n  class='c > d'\r\n  href=\"" + click("https://example.com/?a=1&b=2")
            + "\"\r\n  target=_blank>x</a>"
            + '<a href="' + click("http://example.com/p/") + '">y</a>'
            + '<a title=t href = "' + click("https://example.com/s") + '"\tid=z >w</a>',
        )

    def test_attributeEntities(self) -> None:
        """
        Character references in values are decoded as browsers do in
        attributes: C{&region=} is not C{&reg;}.
        """
        text = '<a href="https://example.com/?a=1&region=eu&amp;x=&#37;41&copy;">x</a>'
        self.assertEqual(trackedURLs(rewrite(text)), ["https://example.com/?a=1&region=eu&x=%41\xa9"])

    def test_escaping(self) -> None:
        """
        The tracked URL is attribute-escaped.
        """
        out = rewriteHTML('<a href="http://example.com/">x</a>', None, lambda url: 'https://t/?a=1&b="2"')
        self.assertEqual(out, '<a href="https://t/?a=1&amp;b=&quot;2&quot;">x</a>')

    def test_base(self) -> None:
        """
        Relative links are tracked with an absolute http(s) C{<base href>},
        else left alone.
        """
        links = '<a href="page/x.html">1</a><a href="/root?a=1">2</a><a href="//other.example/x">3</a><a href="#top">4</a>'
        out = rewrite('<head><BASE HREF="https://base.example/dir/index.html"></head>' + links)
        self.assertEqual(
            trackedURLs(out),
            [
                "https://base.example/dir/page/x.html",
                "https://base.example/root?a=1",
                "https://other.example/x",
            ],
        )
        self.assertIn('<a href="#top">4</a>', out)
        for text in [links, '<base href="/relative/">' + links, '<base target=_blank>' + links]:
            self.assertEqual(rewrite(text), text)

    def test_comments(self) -> None:
        """
        Links in comments, conditional comments and marked sections are
        left alone.
        """
        text = (
            '<!-- <a href="http://c.example/">c</a> -->'
            '<!--[if mso]><a href="http://mso.example/">m</a><![endif]-->'
            '<![if !mso]><a href="http://notmso.example/">n</a><![endif]>'
        )
        self.assertEqual(rewrite(text), text.replace('"http://notmso.example/"', '"' + click("http://notmso.example/") + '"'))

    def test_notrack(self) -> None:
        """
        A tag with C{data-smartrelay-notrack} stays exactly as it was.
        """
        for text in [
            '<a data-smartrelay-notrack href="http://example.com/">x</a>',
            "<a href='http://example.com/' DATA-SMARTRELAY-NOTRACK=yes>x</a>",
            '<area data-smartrelay-notrack="" href=http://example.com/>',
        ]:
            self.assertEqual(rewrite(text), text)

    def test_untracked(self) -> None:
        """
        mailto, tel, javascript, anchors, relative links without base,
        empty or missing C{href} and other tags' URLs are left alone.
        """
        text = (
            '<a href="mailto:a@example.com">m</a><a href="tel:+123">t</a>'
            '<a href="javascript:void(0)">j</a><a href="#top">a</a><a href="page.html">r</a>'
            '<a href="">e</a><a name="x">n</a><a href>h</a><a href="http:no-host">h</a>'
            '<img src="http://example.com/i.png"><link href="http://example.com/s.css">'
            '<td background="http://example.com/bg.png">'
        )
        self.assertEqual(rewrite(text, None), text)

    def test_script(self) -> None:
        """
        Script and style contents are not rewritten, and a C{</body>} in a
        script is no end tag.
        """
        text = (
            "<body><script>document.write('<a href=\"http://s.example/\">s</a></body>');</script>"
            '<style>a[href="http://st.example/"] { color: red }</style></body>'
        )
        self.assertEqual(rewrite(text, OPEN), text[: -len("</body>")] + PIXEL + "</body>")

    def test_placeholders(self) -> None:
        """
        URLs with template placeholders are tracked like any other.
        """
        out = rewrite('<a href="https://example.com/u/{{user.id}}?t=%%TOKEN%%">x</a>')
        self.assertEqual(trackedURLs(out), ["https://example.com/u/{{user.id}}?t=%%TOKEN%%"])

    def test_duplicateHref(self) -> None:
        """
        Only the first C{href} counts, as for browsers.
        """
        out = rewrite('<a href="http://one.example/" href="http://two.example/">x</a>')
        self.assertEqual(out, '<a href="' + click("http://one.example/") + '" href="http://two.example/">x</a>')

    def test_pixelPlacement(self) -> None:
        """
        The pixel goes before the last C{</body>} outside comments, else
        before the last C{</html>}, else at the end; only once.
        """
        cases = [
            ("<p>x</p>\r\n", "<p>x</p>\r\n" + PIXEL),
            ("<html><p>x</HTML >", "<html><p>x" + PIXEL + "</HTML >"),
            (
                "<body>a</body><body>b</BODY ><!-- </body> --></html>",
                "<body>a</body><body>b" + PIXEL + "</BODY ><!-- </body> --></html>",
            ),
            ("", PIXEL),
        ]
        for text, expected in cases:
            self.assertEqual(rewrite(text, OPEN, clicks=False), expected)

    def test_nothing(self) -> None:
        """
        Without URLs, or without links, the text is returned as it was.
        """
        text = '<a href="http://example.com/">x</a>'
        self.assertIs(rewriteHTML(text, None, None), text)
        plain = "<p>no links</p>"
        self.assertIs(rewrite(plain), plain)

    def test_undecodable(self) -> None:
        """
        Links holding undecodable bytes (lone surrogates) are left alone.
        """
        text = '<a href="http://example.com/\udce9">x</a>'
        self.assertEqual(rewrite(text), text)


class MessageTests(SynchronousTestCase):
    """
    Tests for L{rewriteTracking}.
    """

    def assertParts(self, before: bytes, after: bytes) -> list[tuple[Part, Part]]:
        """
        Assert that C{before} and C{after} have the same MIME structure and
        headers.

        @return: the pairs of corresponding leaves.
        """
        old, new = parse(before), parse(after)
        self.assertEqual(partShape(old), partShape(new))
        for one, two in zip(walk(old), walk(new)):
            self.assertEqual(one.header, two.header)
            self.assertEqual(
                (one.preamble, one.delimiters, one.closing, one.epilogue),
                (two.preamble, two.delimiters, two.closing, two.epilogue),
            )
        return list(zip(leaves(old), leaves(new)))

    def test_simple(self) -> None:
        """
        A single-part HTML message is rewritten, its header unchanged.
        """
        data = htmlMessage(b'<html><body><a href="https://shop.example/">x</a></body></html>\r\n')
        out = rewriteTracking(data, OPEN, click)
        ((_, new),) = self.assertParts(data, out)
        self.assertEqual(
            new.body,
            b'<html><body><a href="' + click("https://shop.example/").encode("ascii") + b'">x</a>'
            + PIXEL.encode("ascii") + b"</body></html>\r\n",
        )

    def test_noTracking(self) -> None:
        """
        Without URLs the message is returned as it was.
        """
        data = htmlMessage(b'<a href="https://shop.example/">x</a>')
        self.assertIs(rewriteTracking(data, None, None), data)

    def test_noHTML(self) -> None:
        """
        A message without HTML is returned unchanged, byte for byte.
        """
        for data in [
            b"From: a@example.com\r\nSubject: x\r\n\r\nhttp://example.com/ <a href=\"http://example.com/\">\r\n",
            b"Content-Type: multipart/mixed; boundary=b\r\n\r\npre\r\n--b\r\nContent-Type: text/plain\r\n\r\n"
            b"<a href=\"http://example.com/\"></body>\r\n--b--\r\nepi\r\n",
            b"garbage without header",
            b"",
        ]:
            self.assertIs(rewriteTracking(data, OPEN, click), data)

    def test_unchangedHTML(self) -> None:
        """
        An HTML part that needs no change stays byte-identical, even with
        a transfer encoding that would be written differently.
        """
        body = b"PGEgaHJlZj0ibWFpbHRvOmFAZXhhbXBsZS5jb20iPm08L2E+\r\n\r\n"
        data = htmlMessage(body, cte="BASE64")
        self.assertIs(rewriteTracking(data, None, click), data)

    def test_quotedPrintable(self) -> None:
        """
        A quoted-printable part is decoded (soft line breaks in a URL
        included), rewritten and re-encoded with short lines.
        """
        body = (
            b'<html><body><p>Caf=C3=A9 <a href=3D"http://exa=\r\nmple.com/a?b=3D1">link</a></p>=\r\n'
            + b"x" * 70 + b"=\r\n</body></html>\r\n"
        )
        data = htmlMessage(body, cte="quoted-printable")
        out = rewriteTracking(data, OPEN, click)
        ((_, new),) = self.assertParts(data, out)
        self.assertEqual(new.transferEncoding, "quoted-printable")
        text = new.decodedBody().decode("utf-8")
        self.assertEqual(trackedURLs(text), ["http://example.com/a?b=1"])
        self.assertIn("Caf\xe9", text)
        self.assertIn(PIXEL + "</body>", text)
        self.assertTrue(all(len(line) <= 76 for line in new.body.split(b"\r\n")))
        self.assertEqual(binascii.a2b_qp(new.body), new.decodedBody())

    def test_base64(self) -> None:
        """
        A base64 part stays base64, in lines of 76 characters.
        """
        html = '<html><body><a href="https://example.com/\xfcber">\xdcber</a></body></html>'.encode("utf-8")
        data = htmlMessage(base64.encodebytes(html).replace(b"\n", b"\r\n"), cte="base64")
        out = rewriteTracking(data, OPEN, click)
        ((_, new),) = self.assertParts(data, out)
        text = new.decodedBody().decode("utf-8")
        self.assertEqual(trackedURLs(text), ["https://example.com/\xfcber"])
        self.assertIn(">\xdcber</a>" + PIXEL, text)
        self.assertTrue(all(len(line) <= 76 for line in new.body.split(b"\r\n")))
        self.assertEqual(base64.b64decode(new.body), new.decodedBody())

    def test_latin1(self) -> None:
        """
        ISO-8859-1 text stays ISO-8859-1 and intact; the part stays 8bit.
        """
        body = '<p>Gr\xfc\xdfe, caf\xe9 <a href="http://example.com/caf\xe9">l\xe0</a></p>'.encode("iso-8859-1")
        data = htmlMessage(body, charset="ISO-8859-1", cte="8bit")
        out = rewriteTracking(data, OPEN, click)
        ((_, new),) = self.assertParts(data, out)
        expected = (
            '<p>Gr\xfc\xdfe, caf\xe9 <a href="' + click("http://example.com/caf\xe9") + '">l\xe0</a></p>' + PIXEL
        ).encode("iso-8859-1")
        self.assertEqual(new.body, expected)

    def test_utf8(self) -> None:
        """
        UTF-8 text stays intact, and so do bytes that are no UTF-8.
        """
        body = '<p>\u20ac \u65e5\u672c <a href="http://example.com/">x</a></p>'.encode("utf-8") + b"\xff\xfe"
        data = htmlMessage(body, cte="8bit")
        out = rewriteTracking(data, None, click)
        ((_, new),) = self.assertParts(data, out)
        self.assertEqual(new.body, body.replace(b"http://example.com/", click("http://example.com/").encode("ascii")))

    def test_7bitIRI(self) -> None:
        """
        A 7bit part stays 7-bit when a tracked URL holds non-ASCII
        characters: they are percent-encoded.
        """
        data = htmlMessage(b'<a href="http://example.com/caf&eacute;">x</a>', cte="7bit")
        out = rewriteTracking(data, "https://t.example/o/\xe9", lambda url: "https://t.example/c?u=" + url)
        ((_, new),) = self.assertParts(data, out)
        self.assertTrue(new.body.isascii())
        self.assertIn(b'href="https://t.example/c?u=http://example.com/caf%C3%A9"', new.body)
        self.assertIn(b'src="https://t.example/o/%C3%A9"', new.body)

    def test_longLine(self) -> None:
        """
        A 7bit part whose line the rewriting makes too long becomes
        quoted-printable.
        """
        body = b'<a href="http://example.com/">x</a>' + b"y" * 960 + b"\r\n"
        data = htmlMessage(body, cte="7bit")
        out = rewriteTracking(data, None, lambda url: url + "/" + "z" * 100)
        new = parse(out)
        self.assertEqual(new.transferEncoding, "quoted-printable")
        self.assertIn(b"z" * 100, new.decodedBody())
        self.assertEqual(new.get("Subject"), "hi")

    def test_alternative(self) -> None:
        """
        In a multipart/alternative, the text part stays byte-identical.
        """
        data = (
            b"From: a@example.com\r\nMIME-Version: 1.0\r\n"
            b'Content-Type: multipart/alternative; boundary="alt"\r\n\r\n'
            b"This is a MIME message.\r\n"
            b"--alt\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
            b"Visit http://example.com/ <a href=\"http://example.com/\"></body>\r\n"
            b"--alt\r\nContent-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: 7bit\r\n\r\n"
            b'<html><body><a href="http://example.com/">x</a></body></html>\r\n'
            b"--alt--\r\nepilogue\r\n"
        )
        out = rewriteTracking(data, OPEN, click)
        (text, html) = self.assertParts(data, out)
        self.assertEqual(text[0].serialize(), text[1].serialize())
        self.assertEqual(trackedURLs(html[1].body.decode("ascii")), ["http://example.com/"])
        self.assertEqual(html[1].body.count(b"<img"), 1)
        self.assertTrue(out.startswith(data[: data.index(b"--alt\r\nContent-Type: text/html")]))
        self.assertTrue(out.endswith(b"</html>\r\n--alt--\r\nepilogue\r\n"))

    def test_attachment(self) -> None:
        """
        HTML attachments, and HTML inside attached messages, are left
        alone; an inline HTML part beside them is rewritten.
        """
        data = (
            b'Content-Type: multipart/mixed; boundary="m"\r\n\r\n'
            b'--m\r\nContent-Type: text/html\r\n\r\n<a href="http://example.com/a">a</a>\r\n'
            b'--m\r\nContent-Type: text/html; name="page.html"\r\nContent-Disposition: ATTACHMENT; filename="page.html"\r\n\r\n'
            b'<a href="http://example.com/b">b</a></body>\r\n'
            b"--m\r\nContent-Type: message/rfc822\r\nContent-Disposition: attachment\r\n\r\n"
            b'Content-Type: text/html\r\n\r\n<a href="http://example.com/c">c</a>\r\n'
            b"--m--\r\n"
        )
        out = rewriteTracking(data, OPEN, click)
        pairs = self.assertParts(data, out)
        self.assertEqual(trackedURLs(pairs[0][1].body.decode("ascii")), ["http://example.com/a"])
        for old, new in pairs[1:]:
            self.assertEqual(old.serialize(), new.serialize())

    def test_inlineDisposition(self) -> None:
        """
        An HTML part that is explicitly inline is rewritten.
        """
        data = htmlMessage(b'<a href="http://example.com/">x</a>', extra="Content-Disposition: inline\r\n")
        self.assertEqual(trackedURLs(rewriteTracking(data, None, click).decode("ascii")), ["http://example.com/"])

    def test_unknownEncoding(self) -> None:
        """
        A part with a transfer encoding we cannot re-apply is left alone.
        """
        data = htmlMessage(b'<a href="http://example.com/">x</a>', cte="x-uuencode")
        self.assertIs(rewriteTracking(data, OPEN, click), data)

    def test_unknownCharset(self) -> None:
        """
        An unknown charset is read as UTF-8 (undecodable bytes kept).
        """
        body = b'<a href="http://example.com/">\xe9</a>'
        data = htmlMessage(body, charset="x-unknown", cte="8bit")
        out = rewriteTracking(data, None, click)
        self.assertEqual(parse(out).body, body.replace(b"http://example.com/", click("http://example.com/").encode("ascii")))


# Random HTML documents for the property test.  A document is rendered
# twice: as the input, and as what the rewriting should make of it.

ASCII_TEXT = "abc XYZ 019.,;!?"
LATIN_TEXT = ASCII_TEXT + "\xe9\xfc\xdf"
WIDE_TEXT = LATIN_TEXT + "\u20ac\u65e5"
SEPARATORS = st.sampled_from([" ", "\r\n", "\r\n  ", "\t"])

RAW_FRAGMENTS = [
    "<p class=x>",
    "</p>",
    "<br/>",
    "&amp; &lt;&#233;&eacute;",
    '<img src="http://img.example/i.png" alt="">',
    '<td background="https://bg.example/b.png">',
    '<a name="anchor">named</a>',
    '<!-- <a href="http://comment.example/">c</a> -->',
    '<!--[if mso]><a href="http://mso.example/">m</a><![endif]-->',
    "<script>document.write('<a href=\"http://script.example/\">s</a></body>');</script>",
    '<SCRIPT type="text/javascript">if (a < b) { x = "<a href=http://s2.example/>"; }</SCRIPT>',
    '<style>a[href="http://style.example/"] { color: red }</style>',
    "<![CDATA[ plain cdata ]]>",
]

OTHER_HREFS = [
    ("mailto:a@example.com", "none"),
    ("tel:+491234", "none"),
    ("#top", "none"),
    ("javascript:void(0)", "none"),
    ("", "none"),
    ("page/x.html", "rel"),
    ("/root?a=1&amp;b=2", "rel"),
    ("//proto.example/x", "rel"),
    ("?only=query", "rel"),
]

BASES = [
    (None, None),
    ('<base href="https://base.example/dir/">', "https://base.example/dir/"),
    ("<BASE HREF='http://base.example/'>", "http://base.example/"),
    ('<base href="/relative/">', None),
]


@st.composite
def absoluteHrefs(draw, alphabet: str) -> tuple[str, str]:
    """
    @return: C{(raw, decoded)}: an absolute http(s) URL as written in an
        attribute and as character references decoded.
    """
    scheme = draw(st.sampled_from(["http", "https", "HTTPS", "Http"]))
    host = draw(st.sampled_from(["example.com", "shop.example", "xn--bcher-kva.example"]))
    path = draw(st.text(alphabet="abcXYZ019/._~%" + alphabet[len(ASCII_TEXT):], max_size=12))
    query = draw(
        st.sampled_from(
            [
                ("", ""),
                ("?a=1&amp;b=2", "?a=1&b=2"),
                ("?a=1&b=2", "?a=1&b=2"),
                ("?r=1&region=eu&copy=2", "?r=1&region=eu&copy=2"),
                ("?id={{user.id}}", "?id={{user.id}}"),
                ("?x=&#37;41", "?x=%41"),
            ]
        )
    )
    fragment = draw(st.sampled_from(["", "#frag"]))
    raw = f"{scheme}://{host}/{path}{query[0]}{fragment}"
    return raw, f"{scheme}://{host}/{path}{query[1]}{fragment}"


@st.composite
def links(draw, alphabet: str) -> tuple:
    """
    @return: C{("link", tag, attributes, index of href, raw value, decoded
        value, kind, notrack)}; attributes are C{(separator, text)}.
    """
    if draw(st.booleans()):
        raw, decoded = draw(absoluteHrefs(alphabet))
        kind = "abs"
    else:
        raw, kind = draw(st.sampled_from(OTHER_HREFS))
        decoded = html.unescape(raw)
    tag = draw(st.sampled_from(["a", "A", "area", "AREA"]))
    name = draw(st.sampled_from(["href", "HREF", "Href"]))
    quotable = raw and not re.search(r"[\s\"'>`=<]", raw)
    quote = draw(st.sampled_from(['"', "'", ""] if quotable else ['"', "'"]))
    pad = draw(st.sampled_from(["", " ", "\r\n "])) if quote else ""
    value = quote + pad + raw + pad + quote
    others = draw(
        st.lists(
            st.tuples(
                SEPARATORS,
                st.sampled_from(['class="c"', "title='t > u'", "target=_blank", "data-x", 'style="color:red"']),
            ),
            max_size=3,
        )
    )
    notrack = draw(st.sampled_from([None, "data-smartrelay-notrack", 'DATA-SMARTRELAY-NOTRACK="1"']))
    if notrack is not None:
        others.insert(draw(st.integers(0, len(others))), (" ", notrack))
    where = draw(st.integers(0, len(others)))
    attributes = others[:where] + [(draw(SEPARATORS), (name, value))] + others[where:]
    return ("link", tag, attributes, where, decoded, kind, notrack is not None)


def renderLink(fragment: tuple, base: Optional[str], clicks: bool) -> tuple[str, str, list[str]]:
    """
    @return: C{(source, expected, tracked URLs)} of a link fragment.
    """
    _, tag, attributes, where, decoded, kind, notrack = fragment
    url = decoded.strip(" \t\r\n\f")
    if kind == "rel" and base is not None:
        url = urljoin(base, url)
    tracked = clicks and not notrack and (kind == "abs" or (kind == "rel" and base is not None))

    def tagText(replace: bool) -> str:
        pieces = ["<" + tag]
        for index, (separator, attribute) in enumerate(attributes):
            if index == where:
                name, value = attribute
                attribute = name + "=" + ('"' + click(url) + '"' if replace else value)
            pieces.append(separator + attribute)
        pieces.append(">")
        if tag.lower() == "a":
            pieces.append("text</" + tag + ">")
        return "".join(pieces)

    return tagText(False), tagText(tracked), [url] if tracked else []


@st.composite
def documents(draw, alphabet: str) -> tuple:
    """
    @return: C{(wrapper, base, fragments)} for L{renderDocument}.
    """
    fragments = draw(
        st.lists(
            st.one_of(
                links(alphabet),
                links(alphabet),
                links(alphabet),
                st.sampled_from(RAW_FRAGMENTS).map(lambda raw: ("raw", raw)),
                st.text(alphabet=alphabet, max_size=20).map(lambda raw: ("raw", raw)),
                SEPARATORS.map(lambda raw: ("raw", raw)),
            ),
            min_size=1,
            max_size=12,
        )
    )
    wrapper = draw(st.sampled_from(["bare", "full", "FULL", "nobody", "commented"]))
    return wrapper, draw(st.sampled_from(BASES)), fragments


def renderDocument(document: tuple, openURL: Optional[str], clicks: bool) -> tuple[str, str, list[str]]:
    """
    @return: C{(source, expected, tracked URLs)} of a document.
    """
    wrapper, (baseTag, base), fragments = document
    source, expected, tracked = [], [], []
    for fragment in fragments:
        if fragment[0] == "raw":
            source.append(fragment[1])
            expected.append(fragment[1])
        else:
            one, two, urls = renderLink(fragment, base, clicks)
            source.append(one)
            expected.append(two)
            tracked.extend(urls)
    head = baseTag or ""
    body, result = "".join(source), "".join(expected)
    pixel = PIXEL if openURL is not None else ""
    if wrapper == "bare":
        return head + body, head + result + pixel, tracked
    before, after = {
        "full": ("<html><head>" + head + "</head><body>\r\n", "</body></html>\r\n"),
        "FULL": ("<HTML><HEAD>" + head + "</HEAD><BODY>\r\n", "</BODY ></HTML>\r\n"),
        "nobody": ("<html>" + head, "</HTML>"),
        "commented": ("<html><body>" + head, "</body><!-- </body> --></html>\r\n"),
    }[wrapper]
    return before + body + after, before + result + pixel + after, tracked


@st.composite
def htmlLeafSpecs(draw) -> tuple:
    """
    A leaf of C{tests.test_mime}'s tree specs, with a sixth element: the
    generated document (L{None} for leaves of L{leafSpecs}).
    """
    charset = draw(st.sampled_from([None, "us-ascii", "utf-8", "iso-8859-1"]))
    cte = draw(st.sampled_from(["7bit", "8bit", "quoted-printable", "base64", None]))
    if cte in ("7bit", None):
        alphabet = ASCII_TEXT
    elif charset == "iso-8859-1":
        alphabet = LATIN_TEXT
    else:
        alphabet = WIDE_TEXT
    document = draw(documents(alphabet))
    codec = "iso-8859-1" if charset == "iso-8859-1" else "utf-8"
    content = renderDocument(document, None, False)[0].encode(codec)
    return ("leaf", "text/html", charset, cte, content, (document, codec))


def mimeSpec(spec: tuple) -> tuple:
    """
    @return: C{spec} without the documents, for L{renderMessage}.
    """
    if spec[0] == "leaf":
        return spec[:5]
    return spec[:4] + ([mimeSpec(child) for child in spec[4]],)


def specLeaves(spec: tuple) -> list[tuple]:
    """
    @return: the leaves of C{spec}, in order.
    """
    if spec[0] == "leaf":
        return [spec]
    return [leaf for child in spec[4] for leaf in specLeaves(child)]


LEAVES = st.one_of(htmlLeafSpecs(), leafSpecs().map(lambda leaf: leaf + (None,)))


class PropertyTests(SynchronousTestCase):
    """
    Property tests for L{rewriteTracking} on random MIME trees.
    """

    @settings(max_examples=120, deadline=None)
    @given(treeSpecs(LEAVES), st.booleans(), st.booleans())
    def test_trees(self, spec: tuple, opens: bool, clicks: bool) -> None:
        """
        Only HTML leaves change, in the expected way: every trackable link
        tracked, the pixel inserted once; structure, headers and all other
        leaves stay byte-identical, and the result parses with the stdlib.
        """
        data = renderMessage(mimeSpec(spec))
        openURL = OPEN if opens else None
        out = rewriteTracking(data, openURL, click if clicks else None)
        old, new = parse(data), parse(out)
        self.assertEqual(new.serialize(), out)
        self.assertEqual(partShape(new), shape(mimeSpec(spec)))
        for one, two in zip(walk(old), walk(new)):
            self.assertEqual(one.header, two.header)
            self.assertEqual(
                (one.preamble, one.delimiters, one.closing, one.epilogue),
                (two.preamble, two.delimiters, two.closing, two.epilogue),
            )
        newLeaves = list(leaves(new))
        for leafSpec, before, after in zip(specLeaves(spec), leaves(old), newLeaves, strict=True):
            ctype, cte, content, generated = leafSpec[1], leafSpec[3], leafSpec[4], leafSpec[5]
            if ctype != "text/html" or not (opens or clicks):
                self.assertEqual(before.serialize(), after.serialize())
                continue
            decoded = after.decodedBody()
            if generated is None:
                expected = content + (PIXEL.encode("ascii") if opens else b"")
                self.assertEqual(decoded, expected)
                continue
            document, codec = generated
            source, result, tracked = renderDocument(document, openURL, clicks)
            self.assertEqual(source.encode(codec), content)
            self.assertEqual(decoded, result.encode(codec))
            text = decoded.decode(codec)
            self.assertEqual(trackedURLs(text), tracked)
            self.assertEqual(text.count("<img src=\"" + TRACK[:-3]), 1 if opens else 0)
            if result == source:
                self.assertEqual(before.serialize(), after.serialize())
            if cte in ("7bit", None):
                self.assertTrue(after.body.isascii())
            if cte in ("quoted-printable", "base64"):
                self.assertTrue(all(len(line) <= 76 for line in after.body.split(b"\r\n")))
        message = email.message_from_bytes(out, policy=email.policy.default)
        stdlib = [each for each in message.walk() if not each.is_multipart()]
        self.assertEqual(
            [(each.get_content_type(), each.get_payload(decode=True)) for each in stdlib],
            [(leaf.contentType[0], leaf.decodedBody()) for leaf in newLeaves],
        )


HTMLISH = st.lists(
    st.sampled_from(
        [
            "<", ">", "/", "a", "A", " href", "=", '"', "'", "http://x.example/", "https://",
            "<!--", "-->", "<![", "<!", "]]>", "]>", "<script>", "</script>", "</body>",
            "<base href=http://b.example/>", "&amp;", "&", "#", ";", "\r\n", "<area",
            "\udcff", "\xe9", " data-smartrelay-notrack", "<!DOCTYPE html>", "<?php", "</",
        ]
    ),
    max_size=30,
).map("".join)


class RobustnessTests(SynchronousTestCase):
    """
    L{rewriteHTML} and L{rewriteTracking} on malformed input.
    """

    @settings(max_examples=300, deadline=None)
    @given(HTMLISH)
    def test_malformedHTML(self, text: str) -> None:
        """
        Any text can be rewritten; only http(s) URLs are tracked, and
        without tracking URLs nothing changes.
        """
        out = rewriteHTML(text, OPEN, click)
        for url in trackedURLs(out):
            self.assertIn(url.split(":", 1)[0].lower(), ("http", "https"))
        self.assertEqual(out.count(PIXEL), text.count(PIXEL) + 1)
        self.assertIs(rewriteHTML(text, None, None), text)

    def test_malformedDeclaration(self) -> None:
        """
        A declaration the stdlib tokenizer gives up on is a bogus comment,
        and the rest of the document is still tracked.
        """
        out = rewrite('<![<x> <a href="http://example.com/">x</a>')
        self.assertEqual(trackedURLs(out), ["http://example.com/"])
        self.assertTrue(out.startswith("<![<x> <a href="))

    @settings(max_examples=200, deadline=None)
    @given(st.binary(max_size=300))
    def test_arbitraryBytes(self, data: bytes) -> None:
        """
        Arbitrary bodies never make L{rewriteTracking} fail, and the
        result still parses.
        """
        for message in [b"Content-Type: text/html\r\n\r\n" + data, data]:
            out = rewriteTracking(message, OPEN, click)
            self.assertEqual(parse(out).serialize(), out)
