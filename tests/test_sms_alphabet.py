"""
Tests for L{smartrelay.sms.alphabet}: GSM 03.38, UCS-2 and splitting with
concatenation headers.
"""

from hypothesis import given, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from smartrelay.sms.alphabet import (
    BASIC,
    EXTENSION,
    TooLong,
    concatenationHeader,
    decodeGSM,
    decodeText,
    decodeUCS2,
    encodeGSM,
    encodeUCS2,
    isGSM,
    split,
)
from smartrelay.sms.codec import DATA_CODING_DEFAULT, DATA_CODING_UCS2

gsmChars = st.sampled_from([c for c in BASIC if c != "\x1b"] + list(EXTENSION))
gsmText = st.text(alphabet=gsmChars, max_size=800)
anyText = st.text(
    alphabet=st.characters(blacklist_categories=["Cs"]), max_size=600
)


def joined(result):
    decode = decodeGSM if result.data_coding == DATA_CODING_DEFAULT else decodeUCS2
    return "".join(decode(part) for part in result.parts)


class GSMTests(SynchronousTestCase):
    @given(gsmText)
    def test_roundTrip(self, text):
        """
        Text in the default alphabet and its extension encodes and decodes
        back unchanged.
        """
        self.assertEqual(decodeGSM(encodeGSM(text)), text)

    @given(st.binary(max_size=300))
    def test_decodeNeverRaises(self, data):
        """
        Any octets decode to some text.
        """
        self.assertIsInstance(decodeGSM(data), str)
        self.assertIsInstance(decodeUCS2(data), str)

    def test_extensionCharacters(self):
        """
        The extension characters take an escape and their code.
        """
        self.assertEqual(
            encodeGSM("€{}[]~^\\|"),
            bytes.fromhex("1b65" "1b28" "1b29" "1b3c" "1b3e" "1b3d" "1b14" "1b2f" "1b40"),
        )
        self.assertEqual(encodeGSM("@£$\n"), b"\x00\x01\x02\n")

    def test_notGSM(self):
        """
        Text with a character outside the alphabet is not GSM.
        """
        self.assertFalse(isGSM("Привет"))
        self.assertIsNone(encodeGSM("a`b"))
        self.assertTrue(isGSM("Grüße €5"))

    def test_oddEscapes(self):
        """
        An escape before an undefined code reads as the basic character; a
        trailing escape is dropped; the eighth bit is ignored.
        """
        self.assertEqual(decodeGSM(b"\x1bA\x1b"), "A")
        self.assertEqual(decodeGSM(b"\xc1"), "A")


class UCS2Tests(SynchronousTestCase):
    @given(anyText)
    def test_roundTrip(self, text):
        """
        Any text without lone surrogates survives UCS-2 (UTF-16BE).
        """
        self.assertEqual(decodeUCS2(encodeUCS2(text)), text)

    def test_surrogatePairs(self):
        """
        A character beyond U+FFFF is a surrogate pair; a lone surrogate is
        replaced.
        """
        self.assertEqual(encodeUCS2("\U0001F600"), b"\xd8\x3d\xde\x00")
        self.assertEqual(encodeUCS2("a\ud800"), b"\x00a\xff\xfd")


class SplitTests(SynchronousTestCase):
    @given(gsmText)
    def test_gsmPartsWhole(self, text):
        """
        GSM text splits into parts of at most 153 septets (160 for a single
        one), never cutting an escape pair, and joins back to the text.
        """
        result = split(text, maxParts=255)
        self.assertEqual(result.data_coding, DATA_CODING_DEFAULT)
        self.assertEqual(joined(result), text)
        limit = 160 if len(result.parts) == 1 else 153
        for part in result.parts:
            self.assertLessEqual(len(part), limit)
            self.assertFalse(part.endswith(b"\x1b"), "part ends inside an escape pair")

    @given(anyText.filter(lambda t: not isGSM(t)))
    def test_ucs2PartsWhole(self, text):
        """
        Other text is UCS-2 in parts of at most 67 units (70 single),
        never cutting a surrogate pair, and joins back to the text.
        """
        result = split(text, maxParts=255)
        self.assertEqual(result.data_coding, DATA_CODING_UCS2)
        self.assertEqual(joined(result), text)
        limit = 140 if len(result.parts) == 1 else 134
        for part in result.parts:
            self.assertLessEqual(len(part), limit)
            self.assertEqual(len(part) % 2, 0)
            if part:
                self.assertFalse(0xD8 <= part[-2] <= 0xDB, "part ends in a high surrogate")

    def test_boundaries(self):
        """
        160 GSM septets are one message, 161 two; 70 UCS-2 units one, 71
        two; 300 characters of GSM text are two parts.
        """
        self.assertEqual(len(split("a" * 160).parts), 1)
        self.assertEqual(len(split("a" * 161).parts), 2)
        self.assertEqual(len(split("ж" * 70).parts), 1)
        self.assertEqual(len(split("ж" * 71).parts), 2)
        self.assertEqual([len(p) for p in split("a" * 300).parts], [153, 147])

    def test_escapePairNotCut(self):
        """
        A euro sign that would straddle the 153rd septet moves whole to the
        next part.
        """
        result = split("a" * 152 + "€" + "b" * 10)
        self.assertEqual(result.parts[0], b"a" * 152)
        self.assertTrue(result.parts[1].startswith(b"\x1be"))

    def test_surrogatePairNotCut(self):
        """
        An emoji that would straddle the 67th unit moves whole to the next
        part.
        """
        result = split("ж" * 66 + "\U0001F600" + "ж" * 10)
        self.assertEqual(len(result.parts[0]), 132)
        self.assertTrue(result.parts[1].startswith(b"\xd8\x3d\xde\x00"))

    def test_maxParts(self):
        """
        Text needing more parts than allowed raises L{TooLong} saying how
        many.
        """
        e = self.assertRaises(TooLong, split, "a" * (153 * 5 + 1), 5)
        self.assertEqual((e.parts, e.limit), (6, 5))
        self.assertEqual(len(split("a" * 153 * 5, 5).parts), 5)

    def test_shortMessagesHeaders(self):
        """
        Each part of a concatenated message starts with the 6-octet header
        (reference, total, number); a single part has none.
        """
        result = split("a" * 300)
        messages = result.shortMessages(0x1A2)
        self.assertEqual(messages[0][:6], bytes.fromhex("050003a20201"))
        self.assertEqual(messages[1][:6], bytes.fromhex("050003a20202"))
        self.assertEqual(split("hi").shortMessages(7), [b"hi"])
        self.assertEqual(concatenationHeader(1, 3, 2), b"\x05\x00\x03\x01\x03\x02")

    def test_emptyText(self):
        """
        Empty text is one empty part (the gateway refuses it before).
        """
        self.assertEqual(split("").parts, (b"",))

    def test_decodeText(self):
        """
        Received short messages decode by data coding.
        """
        self.assertEqual(decodeText(0, b"id:1"), "id:1")
        self.assertEqual(decodeText(8, "é".encode("utf-16-be")), "é")
        self.assertEqual(decodeText(3, b"\xe9"), "é")
