"""
Tests for L{smartrelay.feedback.mimescan}, the report readers' quick MIME
split.
"""

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from smartrelay import mime
from smartrelay.feedback import mimescan
from tests.test_feedback_report import mimeTrees


def ownParts(part, typeOf):
    """
    @return: C{(type, isMultipart)} of C{part} and its body parts, not
        descending into attached messages.
    """
    found = [(typeOf(part), part.isMultipart)]
    for child in part.children:
        found += ownParts(child, typeOf)
    return found


REPORT = (
    b"From: MAILER-DAEMON@mx.example.net\r\n"
    b'Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary="b=1"\r\n'
    b"\r\n"
    b"preamble\r\n"
    b"--b=1\r\n"
    b"Content-Type: text/plain; charset=ISO-8859-1\r\n"
    b"Content-Transfer-Encoding: quoted-printable\r\n"
    b"\r\n"
    b"caf=E9\r\n"
    b"--b=1  \r\n"
    b"Content-Type: message/rfc822\r\n"
    b"\r\n"
    b"From: a@example.com\r\n"
    b"Content-Type: multipart/mixed; boundary=inner\r\n"
    b"\r\n"
    b"--inner\r\n\r\nx\r\n--inner--\r\n"
    b"\r\n"
    b"--b=1--\r\n"
    b"epilogue\r\n"
)


class ParseTests(SynchronousTestCase):
    """
    L{mimescan.parse}.
    """

    def test_report(self):
        """
        The report's own parts are split, an attached message gets its
        header and keeps its body whole, and every byte is kept.
        """
        tree = mimescan.parse(REPORT)
        self.assertEqual(tree.serialize(), REPORT)
        self.assertEqual(
            ownParts(tree, mimescan.contentType),
            [("multipart/report", True), ("text/plain", False), ("message/rfc822", False)],
        )
        text, attached = tree.children
        self.assertEqual((mimescan.charsetOf(text), mimescan.transferEncodingOf(text)), ("iso-8859-1", "quoted-printable"))
        self.assertEqual(attached.message.get("From"), "a@example.com")
        self.assertFalse(attached.message.isMultipart)
        self.assertEqual(mimescan.boundaryOf(tree), "b=1")

    def test_defaults(self):
        """
        A part without fields is text/plain, 7bit, without charset or
        boundary; a malformed type falls back to the default.
        """
        part = mimescan.parse(b"\r\nhello")
        self.assertEqual(
            (mimescan.contentType(part), mimescan.transferEncodingOf(part), mimescan.charsetOf(part), mimescan.boundaryOf(part)),
            ("text/plain", "7bit", None, None),
        )
        self.assertEqual(mimescan.contentType(mimescan.parse(b"Content-Type: nonsense\r\n\r\n")), "text/plain")

    def test_unclosed(self):
        """
        A multipart without its close delimiter still has its parts; one
        whose boundary never appears is a leaf.
        """
        tree = mimescan.parse(b"Content-Type: multipart/mixed; boundary=z\n\n--z\n\na\n--z\n\nb\n")
        self.assertEqual(len(tree.children), 2)
        leaf = mimescan.parse(b"Content-Type: multipart/mixed; boundary=z\n\nno parts\n")
        self.assertFalse(leaf.isMultipart)

    def test_manyParts(self):
        """
        A multipart of more than L{mimescan.MAX_PARTS} parts is split into
        that many, the last holding the rest, every byte kept.
        """
        data = b"Content-Type: multipart/mixed; boundary=b\r\n\r\n" + b"--b\r\n\r\nx\r\n" * 1000 + b"--b--\r\n"
        tree = mimescan.parse(data)
        self.assertEqual(len(tree.children), mimescan.MAX_PARTS)
        self.assertEqual(tree.serialize(), data)

    @given(st.binary(max_size=3000))
    def test_roundTripBytes(self, data):
        """
        Any bytes parse without error and serialise back to themselves.
        """
        self.assertEqual(mimescan.parse(data).serialize(), data)

    @given(mimeTrees())
    def test_sameSplitAsMime(self, tree):
        """
        On report-shaped trees the split of the report's own parts is the
        one L{mime.parse} makes, and the bytes are kept.
        """
        data = tree.encode("utf-8", "surrogatepass")
        quick = mimescan.parse(data)
        self.assertEqual(quick.serialize(), data)
        self.assertEqual(
            ownParts(quick, mimescan.contentType),
            ownParts(mime.parse(data), lambda part: part.contentType[0]),
        )
