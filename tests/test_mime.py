"""
Tests for L{smartrelay.mime}.
"""

import base64
import binascii
import email
import email.policy
import quopri

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from smartrelay.mime import (
    MAX_DEPTH,
    Part,
    decodeTransfer,
    encodeBase64,
    encodeQuotedPrintable,
    leaves,
    parse,
    serialize,
    walk,
)

MODEST = settings(max_examples=150, deadline=None)

SIMPLE = (
    b"From: a@example.com\r\n"
    b"Subject: hello\r\n"
    b" world\r\n"
    b"Content-Type: text/plain; charset=UTF-8\r\n"
    b"\r\n"
    b"body\r\n"
)

MULTIPART = (
    b"Content-Type: multipart/mixed; boundary=\"b1\"\r\n"
    b"\r\n"
    b"preamble\r\n"
    b"--b1\r\n"
    b"Content-Type: text/plain\r\n"
    b"\r\n"
    b"one\r\n"
    b"--b1 \t\r\n"
    b"Content-Type: multipart/alternative; boundary=b2\r\n"
    b"\r\n"
    b"--b2\r\n"
    b"Content-Type: text/html\r\n"
    b"Content-Transfer-Encoding: base64\r\n"
    b"\r\n"
    b"PGI+aGk8L2I+\r\n"
    b"--b2--\r\n"
    b"--b1\r\n"
    b"\r\n"
    b"--b1x is not a boundary\r\n"
    b"--b1--\r\n"
    b"epilogue\r\n"
)


class ParseTests(SynchronousTestCase):
    """
    Tests for L{parse} and L{Part}'s parsed view.
    """

    def assertRoundTrip(self, data: bytes) -> Part:
        part = parse(data)
        self.assertEqual(part.serialize(), data)
        self.assertEqual(serialize(part), data)
        return part

    def test_simple(self) -> None:
        """
        A message splits into its fields, separator and body.
        """
        part = self.assertRoundTrip(SIMPLE)
        self.assertEqual(
            part.headerFields(),
            [
                ("From", b" a@example.com"),
                ("Subject", b" hello\r\n world"),
                ("Content-Type", b" text/plain; charset=UTF-8"),
            ],
        )
        self.assertEqual(part.separator, b"\r\n")
        self.assertEqual(part.body, b"body\r\n")
        self.assertEqual(part.header, SIMPLE[: -len(b"body\r\n")])
        self.assertEqual(part.get("subject"), "hello world")
        self.assertIsNone(part.get("To"))
        self.assertEqual(part.contentType, ("text/plain", {"charset": "UTF-8"}))
        self.assertEqual(part.charset, "utf-8")
        self.assertEqual(part.transferEncoding, "7bit")
        self.assertFalse(part.isMultipart)
        self.assertIsNone(part.boundary)

    def test_defaults(self) -> None:
        """
        Without fields, a part is 7bit text/plain.
        """
        part = self.assertRoundTrip(b"\r\njust a body")
        self.assertEqual(part.fields, [])
        self.assertEqual(part.contentType, ("text/plain", {}))
        self.assertEqual(part.transferEncoding, "7bit")
        self.assertIsNone(part.charset)

    def test_invalidContentType(self) -> None:
        """
        An unparseable type is the default type.
        """
        part = parse(b"Content-Type: nonsense\r\n\r\n")
        self.assertEqual(part.contentType[0], "text/plain")

    def test_getUndecodable(self) -> None:
        """
        L{Part.get} replaces bytes that are not UTF-8.
        """
        part = parse(b"Subject: caf\xe9 \xc3\xa9\r\n\r\n")
        self.assertEqual(part.get("Subject"), "caf\ufffd \xe9")

    def test_noSeparator(self) -> None:
        """
        Without a blank line the header ends at the first line that is no
        field; without such a line everything is header.
        """
        part = self.assertRoundTrip(b"Subject: x\r\nnot a field\r\nmore\r\n")
        self.assertEqual(part.separator, b"")
        self.assertEqual(part.body, b"not a field\r\nmore\r\n")
        part = self.assertRoundTrip(b"Subject: x\r\nTo: y")
        self.assertEqual(len(part.fields), 2)
        self.assertEqual(part.body, b"")
        part = self.assertRoundTrip(b" leading space\r\n\r\n")
        self.assertEqual(part.fields, [])

    def test_lineFeeds(self) -> None:
        """
        LF-only messages parse like CRLF ones.
        """
        data = MULTIPART.replace(b"\r\n", b"\n")
        part = self.assertRoundTrip(data)
        self.assertEqual(part.newline, b"\n")
        self.assertEqual(
            [each.contentType[0] for each in walk(part)],
            ["multipart/mixed", "text/plain", "multipart/alternative", "text/html", "text/plain"],
        )
        self.assertEqual(part.children[0].body, b"one")

    def test_multipart(self) -> None:
        """
        Multiparts split into preamble, delimiters, children, closing and
        epilogue; a line that merely starts with the boundary is content.
        """
        part = self.assertRoundTrip(MULTIPART)
        self.assertTrue(part.isMultipart)
        self.assertEqual(part.boundary, "b1")
        self.assertEqual(part.preamble, b"preamble")
        self.assertEqual(part.delimiters, [b"\r\n--b1\r\n", b"\r\n--b1 \t\r\n", b"\r\n--b1\r\n"])
        self.assertEqual(part.closing, b"\r\n--b1--\r\n")
        self.assertEqual(part.epilogue, b"epilogue\r\n")
        first, inner, last = part.children
        self.assertEqual(first.body, b"one")
        self.assertTrue(inner.isMultipart)
        self.assertEqual(inner.children[0].decodedBody(), b"<b>hi</b>")
        # The line break after the inner close belongs to the outer delimiter.
        self.assertEqual(inner.closing, b"\r\n--b2--")
        self.assertEqual(inner.epilogue, b"")
        self.assertEqual(last.body, b"--b1x is not a boundary")
        self.assertEqual(len(list(leaves(part))), 3)

    def test_missingClose(self) -> None:
        """
        Without a close delimiter the last part runs to the end.
        """
        data = b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n\r\nx\r\n"
        part = self.assertRoundTrip(data)
        self.assertEqual(part.closing, b"")
        self.assertEqual(part.children[0].body, b"x\r\n")

    def test_noDelimiter(self) -> None:
        """
        A multipart without delimiters, or without a boundary, is a leaf.
        """
        for data in [
            b"Content-Type: multipart/mixed; boundary=b\r\n\r\nno parts\r\n",
            b"Content-Type: multipart/mixed\r\n\r\n--\r\n",
            b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b--\r\n--b\r\n",
        ]:
            part = self.assertRoundTrip(data)
            self.assertFalse(part.isMultipart)

    def test_adjacentDelimiters(self) -> None:
        """
        Empty parts between adjacent delimiter lines round-trip.
        """
        data = b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n--b\r\n--b--"
        part = self.assertRoundTrip(data)
        self.assertEqual([child.serialize() for child in part.children], [b"", b""])

    def test_digest(self) -> None:
        """
        Parts of a multipart/digest are messages by default, and messages
        are parsed.
        """
        data = (
            b"Content-Type: multipart/digest; boundary=d\r\n\r\n"
            b"--d\r\n\r\nSubject: inner\r\n\r\ntext\r\n--d--\r\n"
        )
        part = self.assertRoundTrip(data)
        child = part.children[0]
        self.assertEqual(child.contentType[0], "message/rfc822")
        assert child.message is not None
        self.assertEqual(child.message.get("Subject"), "inner")
        self.assertEqual(child.message.body, b"text")
        self.assertEqual([each.contentType[0] for each in leaves(part)], ["text/plain"])

    def test_encodedMessage(self) -> None:
        """
        A message/rfc822 part with a non-identity encoding is a leaf.
        """
        part = self.assertRoundTrip(
            b"Content-Type: message/rfc822\r\nContent-Transfer-Encoding: base64\r\n\r\nAAAA\r\n"
        )
        self.assertIsNone(part.message)

    def test_deepNesting(self) -> None:
        """
        Nesting beyond L{MAX_DEPTH} stops splitting but still round-trips.
        """
        data = b"".join(
            b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (level, level)
            for level in range(MAX_DEPTH + 10)
        )
        part = self.assertRoundTrip(data)
        self.assertEqual(len(list(walk(part))), MAX_DEPTH + 1)

    def test_setHeader(self) -> None:
        """
        L{Part.setHeader} replaces a field in place, dropping duplicates,
        or appends it; the rest stays byte-identical.
        """
        part = parse(b"A: 1\r\nB: 2\r\nb: 3\r\n\r\nbody")
        part.setHeader("B", "new")
        self.assertEqual(part.serialize(), b"A: 1\r\nB: new\r\n\r\nbody")
        part.setHeader("C", "x")
        self.assertEqual(part.serialize(), b"A: 1\r\nB: new\r\nC: x\r\n\r\nbody")
        part.replaceHeader("a", "one")
        self.assertEqual(part.serialize(), b"A: 1\r\nB: new\r\nC: x\r\n\r\nbody".replace(b"A: 1", b"a: one"))
        self.assertRaises(KeyError, part.replaceHeader, "Missing", "x")
        part.removeHeader("c")
        self.assertEqual(part.getAll("C"), [])

    def test_setHeaderWithoutSeparator(self) -> None:
        """
        Adding a field to a header without separator adds one (and a line
        break to an unterminated last field).
        """
        part = parse(b"body")
        part.setHeader("X", "y")
        self.assertEqual(part.serialize(), b"X: y\r\n\r\nbody")
        part = parse(b"A: b")
        part.setHeader("X", "y")
        self.assertEqual(part.serialize(), b"A: b\r\nX: y\r\n")

    def test_setBody(self) -> None:
        """
        L{Part.setBody} encodes and labels the body; sibling parts stay
        byte-identical.
        """
        part = parse(MULTIPART)
        html = part.children[1].children[0]
        html.setBody(b"<p>new \xe9</p>", "quoted-printable")
        self.assertEqual(html.transferEncoding, "quoted-printable")
        self.assertEqual(html.body, b"<p>new =E9</p>")
        self.assertEqual(html.decodedBody(), b"<p>new \xe9</p>")
        out = part.serialize()
        self.assertEqual(out, MULTIPART.replace(b"base64", b"quoted-printable").replace(b"PGI+aGk8L2I+", b"<p>new =E9</p>"))
        self.assertRaises(ValueError, html.setBody, b"", "x-unknown")

    def test_decodeLenient(self) -> None:
        """
        Broken base64 decodes as far as possible instead of failing.
        """
        self.assertEqual(decodeTransfer(b"aGk\r\n", "base64"), b"hi")
        self.assertEqual(decodeTransfer(b"aGk=!!a", "base64"), b"hi")
        self.assertEqual(decodeTransfer(b"a=\r\nb=3D", "quoted-printable"), b"ab=")
        self.assertEqual(decodeTransfer(b"\xff", "8bit"), b"\xff")


class CodecTests(SynchronousTestCase):
    """
    Tests for L{encodeQuotedPrintable} and L{encodeBase64}.
    """

    @MODEST
    @given(st.binary(max_size=500), st.sampled_from([b"\r\n", b"\n"]))
    def test_quotedPrintable(self, data: bytes, newline: bytes) -> None:
        """
        Quoted-printable output is 7-bit, has short lines without trailing
        white space and decodes to the input.
        """
        encoded = encodeQuotedPrintable(data, newline)
        self.assertEqual(binascii.a2b_qp(encoded), data)
        self.assertTrue(encoded.isascii())
        for line in encoded.split(newline):
            self.assertLessEqual(len(line), 76)
            self.assertFalse(line.endswith((b" ", b"\t")))
            self.assertNotIn(b"\n", line)

    @MODEST
    @given(st.text(alphabet="ab \t\xe9=\r\n", max_size=300))
    def test_quotedPrintableText(self, text: str) -> None:
        """
        Line breaks stay line breaks.
        """
        data = text.replace("\r", "").replace("\n", "\r\n").encode("utf-8")
        encoded = encodeQuotedPrintable(data)
        self.assertEqual(encoded.count(b"=0D"), 0)
        self.assertEqual(binascii.a2b_qp(encoded), data)

    @MODEST
    @given(st.binary(max_size=500))
    def test_base64(self, data: bytes) -> None:
        """
        Base64 output has lines of at most 76 characters and decodes to
        the input.
        """
        encoded = encodeBase64(data)
        self.assertEqual(base64.b64decode(encoded.replace(b"\r\n", b"")), data)
        self.assertEqual(decodeTransfer(encoded, "base64"), data)
        self.assertTrue(all(len(line) <= 76 for line in encoded.split(b"\r\n")))


def referenceQuotedPrintable(data: bytes, newline: bytes = b"\r\n") -> bytes:
    """
    The quoted-printable encoder smartrelay had before it used
    C{binascii.b2a_qp}, kept as the definition of the output: one line at a
    time, one byte at a time.
    """
    literal = frozenset(range(33, 127)) - {ord("=")}

    def encodeLine(line: bytes) -> bytes:
        last = len(line) - 1
        pieces: list[bytes] = []
        current = b""
        for index, byte in enumerate(line):
            if byte in literal or (byte in (9, 32) and index != last):
                token = bytes([byte])
            else:
                token = b"=%02X" % (byte,)
            if len(current) + len(token) > 75:
                pieces.append(current + b"=")
                current = b""
            current += token
        pieces.append(current)
        return newline.join(pieces)

    return newline.join(encodeLine(line) for line in data.split(newline))


#: Text for the quoted-printable encoder, weighted towards what it treats
#: specially: white space, dots and NUL at line starts, "=", CR and LF,
#: 8-bit bytes, and lines around 76 characters.
QP_TEXT = st.lists(
    st.one_of(
        st.sampled_from([b" ", b"\t", b".", b"=", b"\0", b"\r", b"\n", b"\r\n", b"\x01", b"\x80", b"\xff"]),
        st.integers(min_value=1, max_value=90).map(lambda n: b"a" * n),
        st.binary(max_size=4),
    ),
    max_size=60,
).map(b"".join)


class QuotedPrintableEncoderTests(SynchronousTestCase):
    """
    L{encodeQuotedPrintable} (C{binascii.b2a_qp} with corrections) writes
    exactly what L{referenceQuotedPrintable} writes.
    """

    @settings(max_examples=1000, deadline=None)
    @given(QP_TEXT, st.sampled_from([b"\r\n", b"\n"]))
    def test_sameAsReference(self, data: bytes, newline: bytes) -> None:
        """
        Any text encodes to the reference encoder's bytes, with CRLF or LF
        line breaks, and decodes back to the text.
        """
        encoded = encodeQuotedPrintable(data, newline)
        self.assertEqual(encoded, referenceQuotedPrintable(data, newline))
        self.assertEqual(binascii.a2b_qp(encoded), data)
        self.assertEqual(quopri.decodestring(encoded), data)

    @MODEST
    @given(st.binary(max_size=400), st.sampled_from([b"\r\n", b"\n", b"\r", b"=\r\n"]))
    def test_anyBytesSameAsReference(self, data: bytes, newline: bytes) -> None:
        """
        Arbitrary bytes, and line breaks other than CRLF and LF, encode to
        the reference encoder's bytes.
        """
        self.assertEqual(
            encodeQuotedPrintable(data, newline), referenceQuotedPrintable(data, newline)
        )

    def assertSameAsReference(self, data: bytes, newline: bytes = b"\r\n") -> bytes:
        """
        Assert that C{data} encodes as the reference encodes it and decodes
        back; return the encoding.
        """
        encoded = encodeQuotedPrintable(data, newline)
        self.assertEqual(encoded, referenceQuotedPrintable(data, newline))
        self.assertEqual(binascii.a2b_qp(encoded), data)
        return encoded

    def test_lastCharacter(self) -> None:
        """
        The last line keeps within 75 characters, like every other hard
        line (b2a_qp alone lets its last character be the 76th).
        """
        self.assertEqual(self.assertSameAsReference(b"a" * 76), b"a" * 75 + b"=\r\na")
        self.assertEqual(self.assertSameAsReference(b"a" * 75), b"a" * 75)

    def test_noLineBreak(self) -> None:
        """
        Text without a line break gets CRLF soft line breaks (b2a_qp alone
        writes LF there).
        """
        self.assertEqual(
            self.assertSameAsReference(b"b" * 100), b"b" * 75 + b"=\r\n" + b"b" * 25
        )

    def test_lineFeedLineBreaks(self) -> None:
        """
        With LF line breaks a character before LF is not the 76th of its
        line (b2a_qp alone lets it be).
        """
        self.assertEqual(
            self.assertSameAsReference(b"c" * 76 + b"\nd", b"\n"), b"c" * 75 + b"=\nc\nd"
        )

    def test_trailingWhiteSpace(self) -> None:
        """
        A space or tab before a line break is encoded in its place, with a
        soft line break before it when it would pass column 75 (b2a_qp
        alone makes a 76- or 77-character line).
        """
        for width in (72, 73, 74, 75):
            for space in (b" ", b"\t"):
                encoded = self.assertSameAsReference(b"e" * width + space + b"\r\nf")
                self.assertTrue(all(len(line) <= 76 for line in encoded.split(b"\r\n")))
        self.assertEqual(self.assertSameAsReference(b"e" * 73 + b" \r\n"), b"e" * 73 + b"=\r\n=20\r\n")
        self.assertEqual(self.assertSameAsReference(b"g \t"), b"g =09")

    def test_dotLines(self) -> None:
        """
        A line that is only "." stays "." (b2a_qp alone writes =2E), also
        several in a row; a "." before NUL at the start of a line stays too.
        """
        self.assertEqual(self.assertSameAsReference(b".\r\n.\r\n.\r\n.\r\n."), b".\r\n" * 4 + b".")
        self.assertEqual(self.assertSameAsReference(b"a\r\n.\0" + b"h" * 80), b"a\r\n.=00" + b"h" * 71 + b"=\r\n" + b"h" * 9)
        self.assertSameAsReference(b".\n.\n.\0.", b"\n")

    def test_bareLineBreaks(self) -> None:
        """
        A bare CR or LF in text with CRLF line breaks, or a CR in text with
        LF line breaks, is encoded; the lines around it are encoded as
        usual.
        """
        self.assertEqual(self.assertSameAsReference(b"a\rb\r\nc\nd\r\n=\r\n"), b"a=0Db\r\nc=0Ad\r\n=3D\r\n")
        self.assertEqual(self.assertSameAsReference(b"a\rb\nc\r\n", b"\n"), b"a=0Db\nc=0D\n")
        self.assertSameAsReference(b"i" * 75 + b"\n\r\n" + b"j" * 80 + b" \r\n.\r\n")

    def test_everyByteUsed(self) -> None:
        """
        Text holding every byte that could stand in for a trailing space is
        still encoded right.
        """
        data = bytes(range(256)) + b" \r\n" + bytes(range(255, -1, -1)).replace(b"\r", b"").replace(b"\n", b"") + b" "
        self.assertSameAsReference(data)
        self.assertSameAsReference(data.replace(b"\r\n", b"\n").replace(b"\r", b""), b"\n")

    def test_empty(self) -> None:
        """
        Nothing encodes to nothing, a line break to a line break.
        """
        self.assertEqual(encodeQuotedPrintable(b""), b"")
        self.assertEqual(encodeQuotedPrintable(b"\r\n"), b"\r\n")
        self.assertEqual(encodeQuotedPrintable(b"\n", b"\n"), b"\n")


# Random MIME trees.  A leaf spec is ("leaf", ctype, charset, cte,
# content); a multipart spec is ("multi", subtype, preamble, epilogue,
# children).  Content never contains "-", so it never looks like a
# boundary line.

TEXT = st.text(alphabet="abc XYZ019.,;=\t\xe9\u20ac\r\n", max_size=120)
PLAIN = st.text(alphabet="abc XYZ.\r\n", max_size=40)


def crlf(text: str) -> str:
    """
    @return: C{text} with all line breaks as CRLF.
    """
    return text.replace("\r", "").replace("\n", "\r\n")


@st.composite
def leafSpecs(draw, eight: bool = True) -> tuple:
    ctype = draw(st.sampled_from(["text/plain", "text/html", "application/octet-stream"]))
    charset = draw(st.sampled_from([None, "us-ascii", "utf-8", "iso-8859-1"]))
    ctes = ["7bit", "quoted-printable", "base64", None] + (["8bit"] if eight else [])
    cte = draw(st.sampled_from(ctes))
    if cte in ("quoted-printable", "base64"):
        content = draw(st.binary(max_size=200))
    else:
        text = crlf(draw(TEXT))
        if cte == "8bit":
            content = text.encode(charset if charset == "iso-8859-1" else "utf-8", "replace")
        else:
            content = text.encode("ascii", "replace")
    return ("leaf", ctype, charset, cte, content)


def treeSpecs(leaf=leafSpecs()):
    return st.recursive(
        leaf,
        lambda children: st.tuples(
            st.just("multi"),
            st.sampled_from(["mixed", "alternative", "related"]),
            PLAIN.map(crlf),
            PLAIN.map(crlf),
            st.lists(children, min_size=1, max_size=4),
        ),
        max_leaves=8,
    )


def render(spec: tuple, counter: list[int]) -> bytes:
    """
    Render a tree spec as an entity (fields, blank line, body).
    """
    if spec[0] == "leaf":
        _, ctype, charset, cte, content = spec
        header = f"Content-Type: {ctype}" + (f"; charset={charset}" if charset else "") + "\r\n"
        if cte is not None:
            header += f"Content-Transfer-Encoding: {cte}\r\n"
        if cte == "base64":
            body = base64.encodebytes(content).replace(b"\n", b"\r\n")
        elif cte == "quoted-printable":
            body = binascii.b2a_qp(content, istext=False).replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        else:
            body = content
        return header.encode("ascii") + b"\r\n" + body
    _, subtype, preamble, epilogue, children = spec
    counter[0] += 1
    boundary = f"=_part_{counter[0]}_x".encode("ascii")
    header = b'Content-Type: multipart/' + subtype.encode() + b'; boundary="' + boundary + b'"\r\n\r\n'
    body = preamble.encode("ascii")
    for index, child in enumerate(children):
        if body or index:
            body += b"\r\n"
        body += b"--" + boundary + b"\r\n" + render(child, counter)
    body += b"\r\n--" + boundary + b"--"
    if epilogue:
        body += b"\r\n" + epilogue.encode("ascii")
    return header + body


def renderMessage(spec: tuple, subject: str = "test") -> bytes:
    """
    Render a tree spec as a whole message.
    """
    top = f"From: a@example.com\r\nSubject: {subject}\r\nMIME-Version: 1.0\r\n"
    return top.encode("utf-8") + render(spec, [0])


def expectedLeaves(spec: tuple) -> list[tuple[str, bytes]]:
    """
    @return: C{(ctype, decoded content)} of each leaf of C{spec}.
    """
    if spec[0] == "leaf":
        return [(spec[1], spec[4])]
    return [leaf for child in spec[4] for leaf in expectedLeaves(child)]


def shape(spec: tuple) -> object:
    """
    @return: the content types of C{spec} as nested lists.
    """
    if spec[0] == "leaf":
        return spec[1]
    return ["multipart/" + spec[1], [shape(child) for child in spec[4]]]


def partShape(part: Part) -> object:
    """
    @return: the content types of a parsed tree as nested lists.
    """
    if part.isMultipart:
        return [part.contentType[0], [partShape(child) for child in part.children]]
    return part.contentType[0]


class PropertyTests(SynchronousTestCase):
    """
    Property tests for L{parse}.
    """

    @MODEST
    @given(st.binary(max_size=400))
    def test_arbitraryBytes(self, data: bytes) -> None:
        """
        Any bytes round-trip.
        """
        self.assertEqual(parse(data).serialize(), data)

    @MODEST
    @given(
        st.lists(
            st.sampled_from(
                [
                    b"Content-Type: multipart/mixed; boundary=b\r\n",
                    b"Content-Type: message/rfc822\r\n",
                    b"Content-Type: multipart/digest; boundary=c\n",
                    b"--b\r\n",
                    b"--b--\r\n",
                    b"--c\n",
                    b"--b",
                    b"\r\n",
                    b"\n",
                    b"x: y\r\n",
                    b" folded\r\n",
                    b"text",
                    b"\r",
                ]
            ),
            max_size=40,
        ).map(b"".join)
    )
    def test_mimeishBytes(self, data: bytes) -> None:
        """
        Inputs made of MIME-like pieces round-trip, and so does every part.
        """
        part = parse(data)
        self.assertEqual(part.serialize(), data)
        for each in walk(part):
            self.assertEqual(parse(each.serialize(), each.defaultType).serialize(), each.serialize())

    @MODEST
    @given(treeSpecs())
    def test_trees(self, spec: tuple) -> None:
        """
        Generated MIME trees round-trip and parse to the generated shape
        and contents, as the stdlib parser sees them too.
        """
        data = renderMessage(spec)
        part = parse(data)
        self.assertEqual(part.serialize(), data)
        self.assertEqual(partShape(part), shape(spec))
        self.assertEqual(
            [(leaf.contentType[0], leaf.decodedBody()) for leaf in leaves(part)],
            expectedLeaves(spec),
        )
        message = email.message_from_bytes(data, policy=email.policy.default)
        self.assertEqual(
            [
                (each.get_content_type(), each.get_payload(decode=True))
                for each in message.walk()
                if not each.is_multipart()
            ],
            expectedLeaves(spec),
        )
        if spec[0] == "multi":
            self.assertEqual(part.preamble, spec[2].encode("ascii"))
            self.assertEqual(part.epilogue, spec[3].encode("ascii"))
