"""
Tests for L{smartrelay.engine.downgrade}.
"""

import email
import email.policy

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from smartrelay.mime import leaves, parse, walk
from smartrelay.engine.downgrade import (
    Offers,
    Prepared,
    downgrade,
    downgradeField,
    eightBit,
    encodeWords,
    prepare,
    toASCIIDomain,
)
from tests.test_mime import renderMessage, treeSpecs

MESSAGE = (
    "From: J\u00f6rg M\u00fcller <jorg@example.com>\r\n"
    "To: plain@example.org\r\n"
    "Subject: Gr\u00fc\u00dfe aus K\u00f6ln\r\n"
    "MIME-Version: 1.0\r\n"
    "Content-Type: multipart/mixed; boundary=outer\r\n"
    "\r\n"
    "--outer\r\n"
    "Content-Type: text/plain; charset=utf-8\r\n"
    "Content-Transfer-Encoding: 8bit\r\n"
    "\r\n"
    "Gr\u00fc\u00dfe!\r\n"
    "--outer\r\n"
    "Content-Type: text/html; charset=us-ascii\r\n"
    "\r\n"
    "<p>plain</p>\r\n"
    "--outer\r\n"
    "Content-Type: application/octet-stream\r\n"
    "Content-Transfer-Encoding: binary\r\n"
    "\r\n"
).encode("utf-8") + b"\x00\xff\xfe\x80\r\n--outer--\r\n"

PLAIN = (
    b"From: a@example.com\r\n"
    b"Subject: =?utf-8?q?already_encoded?=\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n"
    b"just ascii\r\n"
)


def stdlib(data: bytes) -> email.message.EmailMessage:
    """
    Parse with the stdlib parser.
    """
    return email.message_from_bytes(data, policy=email.policy.default)


def payloads(data: bytes) -> list[tuple[str, bytes]]:
    """
    @return: the stdlib's view of each leaf: type and decoded payload.
    """
    return [
        (part.get_content_type(), part.get_payload(decode=True))
        for part in stdlib(data).walk()
        if not part.is_multipart()
    ]


def defects(data: bytes) -> set[type]:
    """
    @return: the kinds of defects the stdlib parser finds anywhere.
    """
    found: set[type] = set()
    for part in stdlib(data).walk():
        found.update(type(defect) for defect in part.defects)
    return found


class EightBitTests(SynchronousTestCase):
    """
    Tests for L{eightBit}.
    """

    def test_clean(self) -> None:
        """A 7-bit message has 8-bit bytes nowhere."""
        self.assertEqual(eightBit(PLAIN), (False, False))

    def test_both(self) -> None:
        """8-bit header fields and bodies are both found."""
        self.assertEqual(eightBit(MESSAGE), (True, True))

    def test_headerOnly(self) -> None:
        """An 8-bit field in a 7-bit message is a header finding only."""
        self.assertEqual(eightBit("Subject: \u00e9\r\n\r\nx".encode()), (True, False))

    def test_partHeader(self) -> None:
        """
        Fields of body parts count as header section.
        """
        data = (
            b"Content-Type: multipart/mixed; boundary=b\r\n\r\n"
            b"--b\r\nContent-Disposition: attachment; filename=\"\xc3\xa9\"\r\n\r\nx\r\n--b--\r\n"
        )
        self.assertEqual(eightBit(data), (True, False))

    def test_bodyOnly(self) -> None:
        """An 8-bit body under 7-bit fields is a body finding only."""
        self.assertEqual(eightBit(b"Subject: x\r\n\r\n\xe9"), (False, True))


class DowngradeTests(SynchronousTestCase):
    """
    Tests for L{downgrade}.
    """

    def test_unchanged(self) -> None:
        """
        A 7-bit message comes back byte for byte.
        """
        self.assertEqual(downgrade(PLAIN, True, True), PLAIN)

    def test_message(self) -> None:
        """
        Text becomes quoted-printable, binary base64, headers encoded-words;
        the 7-bit part is untouched and the contents are unchanged.
        """
        out = downgrade(MESSAGE, True, True)
        self.assertTrue(out.isascii())
        self.assertEqual(payloads(out), payloads(MESSAGE))
        text, html, binary = parse(out).children
        self.assertEqual(text.transferEncoding, "quoted-printable")
        self.assertEqual(text.body, b"Gr=C3=BC=C3=9Fe!")
        self.assertEqual(
            html.serialize(), parse(MESSAGE).children[1].serialize()
        )
        self.assertEqual(binary.transferEncoding, "base64")
        self.assertEqual(binary.body, b"AP/+gA==\r\n")
        message = stdlib(out)
        self.assertEqual(message["Subject"], "Gr\u00fc\u00dfe aus K\u00f6ln")
        self.assertIn(b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?= aus =?utf-8?q?K=C3=B6ln?=\r\n", out)
        self.assertIn(b"From: =?utf-8?q?J=C3=B6rg_M=C3=BCller?= <jorg@example.com>\r\n", out)
        self.assertEqual(message["From"].addresses[0].display_name, "J\u00f6rg M\u00fcller")
        self.assertEqual(message["From"].addresses[0].addr_spec, "jorg@example.com")
        self.assertIn(b"To: plain@example.org\r\n", out)

    def test_bodyOnly(self) -> None:
        """
        Without C{headers}, 8-bit fields are left alone.
        """
        out = downgrade(MESSAGE, False, True)
        self.assertEqual(out.split(b"\r\n\r\n")[0], MESSAGE.split(b"\r\n\r\n")[0])
        self.assertEqual(payloads(out), payloads(MESSAGE))

    def test_headersOnly(self) -> None:
        """
        Without C{body}, bodies are left alone.
        """
        out = downgrade(MESSAGE, True, False)
        self.assertTrue(out.endswith(MESSAGE[MESSAGE.index(b"\r\n\r\n") :]))

    def test_containerRelabelled(self) -> None:
        """
        A multipart or message declaring 8bit becomes 7bit once its
        contents are.
        """
        data = (
            b"Content-Type: multipart/mixed; boundary=b\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
            b"--b\r\nContent-Type: message/rfc822\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
            b"Subject: \xc3\xa9\r\n\r\n\xc3\xa9\r\n--b--\r\n"
        )
        out = downgrade(data, *eightBit(data))
        self.assertTrue(out.isascii())
        root = parse(out)
        self.assertEqual(root.transferEncoding, "7bit")
        self.assertEqual(root.children[0].transferEncoding, "7bit")
        inner = root.children[0].message
        assert inner is not None
        self.assertEqual(inner.get("Subject"), "=?utf-8?q?=C3=A9?=")
        self.assertEqual(inner.decodedBody(), b"\xc3\xa9")

    def test_latin1Header(self) -> None:
        """
        Header bytes that are not UTF-8 are read as Latin-1.
        """
        out = downgrade(b"Subject: caf\xe9\r\n\r\n", True, False)
        self.assertEqual(stdlib(out)["Subject"], "caf\u00e9")

    def test_addresses(self) -> None:
        """
        Only display names and comments are encoded; domains become
        A-labels; an 8-bit local part makes the whole field encoded.
        """
        field = downgradeField(
            '\"J\u00f6rg, M.\" <j@b\u00fccher.de> (K\u00f6ln), x@y.z\r\n'.join(["To: ", ""]).encode()
        )
        self.assertEqual(
            field,
            b"To: =?utf-8?q?J=C3=B6rg=2C_M=2E?= <j@xn--bcher-kva.de>\r\n"
            b" (=?utf-8?q?K=C3=B6ln?=), x@y.z\r\n",
        )
        field = downgradeField("Cc: <\u00fc@x.org>\r\n".encode())
        self.assertTrue(field.isascii())
        self.assertIn("\u00fc@x.org", str(stdlib(field + b"\r\n")["Cc"]))

    def test_idna2008(self) -> None:
        """
        Domains become A-labels by UTS 46 / IDNA 2008: fa\u00df.de is
        xn--fa-hia.de (IDNA 2003, Python's "idna" codec, would make it
        fass.de, another domain); upper case is mapped to lower case.
        """
        field = downgradeField("From: J\u00f6rg <j@fa\u00df.de>, s@STRA\u00dfE.example\r\n".encode())
        self.assertEqual(
            field, b"From: =?utf-8?q?J=C3=B6rg?= <j@xn--fa-hia.de>, s@xn--strae-oqa.example\r\n"
        )
        self.assertNotIn(b"fass.de", field)

    def test_idnaRefused(self) -> None:
        """
        A domain IDNA refuses (a symbol, an empty label, a label too long)
        cannot be written in 7 bits as an address: the field is encoded as
        a whole, 7-bit and readable, and no other domain is made up.
        """
        for domain in ["\u2603.net", "\u00fc..de", "x" * 70 + "\u00fc.de"]:
            field = downgradeField(f"To: Ann <ann@{domain}>\r\n".encode())
            self.assertTrue(field.isascii(), field)
            self.assertNotIn(b"xn--", field)
            # (The stdlib keeps a space between the encoded-words of a long
            # one, in an address field.)
            self.assertIn(domain, str(stdlib(field + b"\r\n")["To"]).replace(" ", ""))

    def test_toASCIIDomain(self) -> None:
        """L{toASCIIDomain}: A-labels for IDNs, ASCII as it is, L{None} for what IDNA refuses."""
        self.assertEqual(toASCIIDomain("fa\u00df.de"), "xn--fa-hia.de")
        self.assertEqual(toASCIIDomain("B\u00fccher.DE."), "xn--bcher-kva.de.")
        self.assertEqual(toASCIIDomain("Shop.Example"), "Shop.Example")
        self.assertIsNone(toASCIIDomain("\u2603.net"))
        self.assertIsNone(toASCIIDomain("a b\u00fc.de"))

    def test_parameters(self) -> None:
        """
        8-bit MIME parameters become RFC 2231 parameters.
        """
        name = "r\u00e9sum\u00e9-" * 12 + ".pdf"
        data = f'Content-Type: application/pdf; name="{name}"\r\n\r\n'.encode()
        out = downgrade(data, True, False)
        self.assertTrue(out.isascii())
        self.assertTrue(all(len(line) <= 78 for line in out.split(b"\r\n")))
        self.assertEqual(stdlib(out).get_param("name"), name)

    def test_longHeader(self) -> None:
        """
        Encoded fields are folded into short lines.
        """
        subject = "\u00e9" * 300
        out = downgrade(f"Subject: {subject}\r\n\r\n".encode(), True, False)
        first, *rest = out.split(b"\r\n")
        self.assertLessEqual(len(first), len(b"Subject: ") + 75)
        self.assertTrue(all(len(line) <= 78 for line in rest))
        self.assertEqual(stdlib(out)["Subject"], subject)

    def test_malformed(self) -> None:
        """
        Malformed input does not make L{downgrade} fail, and the result is
        7-bit.
        """
        for data in [
            b"\xff\xfe",
            b"Subject: \xff\r\nno separator \xe9",
            b"Content-Type: multipart/mixed; boundary=\xe9\r\n\r\n--\xe9\r\n\xe9\r\n",
            b"Content-Type: multipart/mixed; boundary=b\r\n\r\n\xe9\r\n--b\r\n\xe9",
            b"From: \xe9 <\xe9@\xe9>, \"\xe9\r\n\r\n",
        ]:
            out = downgrade(data, True, True)
            self.assertTrue(out.isascii(), out)

    def test_encodeWords(self) -> None:
        """
        Encoded-words are at most 75 characters and never split a
        character.
        """
        words = encodeWords("\u20ac" * 40)
        self.assertTrue(all(len(word) <= 75 for word in words))
        self.assertEqual(
            str(stdlib(("Subject: " + " ".join(words) + "\r\n\r\n").encode())["Subject"]),
            "\u20ac" * 40,
        )


EIGHT = st.text(alphabet="ab \u00e9\u20ac\u00fc", min_size=1, max_size=30)
OFFERS_LIST = [
    Offers(eightBitMIME=eightBitMIME, smtpUTF8=smtpUTF8)
    for eightBitMIME in (False, True)
    for smtpUTF8 in (False, True)
]
OFFERS = tuple(OFFERS_LIST)


class PropertyTests(SynchronousTestCase):
    """
    Property tests for L{downgrade}.
    """

    @settings(max_examples=150, deadline=None)
    @given(treeSpecs(), EIGHT)
    def test_trees(self, spec: tuple, subject: str) -> None:
        """
        Downgrading generated messages gives 7-bit messages with the same
        structure and contents in which untouched parts are byte-identical
        and which the stdlib parses without new defects.
        """
        data = renderMessage(spec, subject)
        out = downgrade(data, *eightBit(data))
        self.assertTrue(out.isascii())
        before, after = parse(data), parse(out)
        self.assertEqual(len(list(walk(before))), len(list(walk(after))))
        for old, new in zip(leaves(before), leaves(after)):
            self.assertEqual(old.contentType, new.contentType)
            self.assertEqual(old.decodedBody(), new.decodedBody())
            if old.serialize().isascii():
                self.assertEqual(old.serialize(), new.serialize())
        self.assertEqual(payloads(out), payloads(data))
        self.assertLessEqual(defects(out), defects(data))
        self.assertEqual(stdlib(out)["Subject"], stdlib(data)["Subject"])
        self.assertEqual(downgrade(out, True, True), out)


class PrepareTests(SynchronousTestCase):
    """
    Tests for L{prepare}: a message made to fit what a server offers.
    """

    def test_sevenBit(self) -> None:
        """A 7-bit message is itself, for any server, and needs no parameter."""
        for offers in OFFERS:
            prepared = prepare(PLAIN, offers)
            self.assertIs(prepared.data, PLAIN)
            self.assertEqual(prepared, Prepared(PLAIN))

    def test_nothingOffered(self) -> None:
        """Without 8BITMIME and SMTPUTF8 everything is downgraded; no parameter."""
        prepared = prepare(MESSAGE, Offers())
        self.assertEqual(prepared, Prepared(downgrade(MESSAGE, True, True)))
        self.assertTrue(prepared.data.isascii())

    def test_eightBitMIMEOnly(self) -> None:
        """With 8BITMIME only, the bodies stay, the fields are encoded: BODY=8BITMIME."""
        prepared = prepare(MESSAGE, Offers(eightBitMIME=True))
        self.assertEqual(prepared, Prepared(downgrade(MESSAGE, True, False), eightBitMIME=True))

    def test_everything(self) -> None:
        """With both, the message goes as it is, with both parameters."""
        prepared = prepare(MESSAGE, Offers(eightBitMIME=True, smtpUTF8=True))
        self.assertEqual(prepared, Prepared(MESSAGE, eightBitMIME=True, smtpUTF8=True))

    def test_bodyOnlyMessage(self) -> None:
        """SMTPUTF8 is asked for only when a header field is 8-bit."""
        data = b"Subject: x\r\n\r\n\xc3\xa9\r\n"
        prepared = prepare(data, Offers(eightBitMIME=True, smtpUTF8=True))
        self.assertEqual(prepared, Prepared(data, eightBitMIME=True))

    def test_fits(self) -> None:
        """A message fits a server that offers at least what it needs."""
        needs = Prepared(b"", eightBitMIME=True)
        self.assertTrue(needs.fits(Offers(eightBitMIME=True)))
        self.assertFalse(needs.fits(Offers(smtpUTF8=True)))
        self.assertTrue(Prepared(b"").fits(Offers()))
        self.assertFalse(Prepared(b"", smtpUTF8=True).fits(Offers(eightBitMIME=True)))

    @settings(max_examples=60, deadline=None)
    @given(treeSpecs(), EIGHT, st.sampled_from(OFFERS_LIST))
    def test_fitsWhatIsOffered(self, spec: tuple, subject: str, offers: Offers) -> None:
        """
        For any message and server, the result fits that server: 8-bit
        bodies only with 8BITMIME, 8-bit fields only with SMTPUTF8, the
        parameters say so, and every part's content is unchanged.
        """
        data = renderMessage(spec, subject)
        prepared = prepare(data, offers)
        self.assertTrue(prepared.fits(offers))
        headers8, body8 = eightBit(prepared.data)
        self.assertTrue(offers.smtpUTF8 or not headers8)
        self.assertTrue(offers.eightBitMIME or not body8)
        self.assertEqual(prepared.eightBitMIME, offers.eightBitMIME and not prepared.data.isascii())
        self.assertEqual(prepared.smtpUTF8, headers8)
        self.assertEqual(payloads(prepared.data), payloads(data))
