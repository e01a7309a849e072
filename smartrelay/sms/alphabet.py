# -*- test-case-name: tests.test_sms_alphabet -*-
"""
Text to short messages: the GSM 03.38 default alphabet (with its
extension table) or UCS-2, and splitting into concatenated parts.

* GSM 03.38 is sent unpacked, one septet per octet (SMPP data_coding 0,
  "SMSC default alphabet"): 160 septets fit one message; the extension
  characters (C{€ { } [ ] ~ ^ \\ |} and form feed) take two, an escape
  (0x1B) and their code.
* Text the default alphabet cannot hold is UCS-2 (data_coding 8), written
  as UTF-16BE: characters outside the Basic Multilingual Plane are
  surrogate pairs, two 16-bit units; 70 units fit one message.
* Longer text is split into parts with a concatenation user data header
  (IEI 0x00: reference, total, sequence; 6 octets), leaving 153 septets or
  67 units a part.  A cut never falls inside an escape pair or a
  surrogate pair.
"""

from typing import Optional

import attrs

from smartrelay.sms.codec import DATA_CODING_DEFAULT, DATA_CODING_UCS2

ESCAPE = 0x1B

#: The default alphabet, by septet value (0x1B is the escape to the
#: extension table).
BASIC = (
    "@£$¥èéùìòÇ\nØø\rÅå"
    "Δ_ΦΓΛΩΠΨΣΘΞ\x1bÆæßÉ"
    " !\"#¤%&'()*+,-./"
    "0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNO"
    "PQRSTUVWXYZÄÖÑÜ§"
    "¿abcdefghijklmno"
    "pqrstuvwxyzäöñüà"
)
assert len(BASIC) == 128

#: The extension table: character → the septet after the escape.
EXTENSION = {
    "\f": 0x0A,
    "^": 0x14,
    "{": 0x28,
    "}": 0x29,
    "\\": 0x2F,
    "[": 0x3C,
    "~": 0x3D,
    "]": 0x3E,
    "|": 0x40,
    "€": 0x65,
}

_ENCODE: dict = {char: bytes([code]) for code, char in enumerate(BASIC) if code != ESCAPE}
_ENCODE.update({char: bytes([ESCAPE, code]) for char, code in EXTENSION.items()})
_DECODE_EXTENSION = {code: char for char, code in EXTENSION.items()}

#: Units (septets or UTF-16 units) in one message without a header, and in
#: each part of a concatenated one.
GSM_SINGLE, GSM_PART = 160, 153
UCS2_SINGLE, UCS2_PART = 70, 67

#: The most parts a concatenation header can number.
MAX_PARTS = 255


class TooLong(ValueError):
    """
    The text needs more parts than allowed.

    @ivar parts: how many it needs.
    @ivar limit: how many are allowed.
    """

    def __init__(self, parts: int, limit: int) -> None:
        super().__init__(f"the text needs {parts} SMS parts, more than the {limit} allowed")
        self.parts = parts
        self.limit = limit


def isGSM(text: str) -> bool:
    """
    Whether every character of C{text} is in the default alphabet or its
    extension table.
    """
    return all(char in _ENCODE for char in text)


def encodeGSM(text: str) -> Optional[bytes]:
    """
    C{text} as unpacked GSM 03.38 septets, or L{None} if a character is
    not in the alphabet.
    """
    try:
        return b"".join([_ENCODE[char] for char in text])
    except KeyError:
        return None


def decodeGSM(data: bytes) -> str:
    """
    Unpacked GSM 03.38 septets to text.  Never raises: the eighth bit is
    ignored, an escape before a code the extension table does not define
    reads as that code's basic character (GSM 03.38 6.2.1.1), and an
    escape at the end is dropped.
    """
    out = []
    escaped = False
    for octet in data:
        code = octet & 0x7F
        if escaped:
            escaped = False
            extension = _DECODE_EXTENSION.get(code)
            if extension is not None:
                out.append(extension)
                continue
            if code == ESCAPE:
                out.append(" ")
                continue
            out.append(BASIC[code])
        elif code == ESCAPE:
            escaped = True
        else:
            out.append(BASIC[code])
    return "".join(out)


def encodeUCS2(text: str) -> bytes:
    """
    C{text} as UTF-16BE (surrogate pairs for characters beyond U+FFFF).
    Lone surrogates in C{text} are replaced by U+FFFD.
    """
    return "".join(
        "\ufffd" if 0xD800 <= ord(char) <= 0xDFFF else char for char in text
    ).encode("utf-16-be")


def decodeUCS2(data: bytes) -> str:
    """
    UTF-16BE to text; never raises (an odd last octet and broken
    surrogates become U+FFFD).
    """
    return data.decode("utf-16-be", "replace")


@attrs.frozen
class Split:
    """
    A text made into short messages.

    @ivar data_coding: L{DATA_CODING_DEFAULT} or L{DATA_CODING_UCS2}.
    @ivar parts: each part's encoded text, without a header.
    """

    data_coding: int
    parts: tuple

    @property
    def concatenated(self) -> bool:
        return len(self.parts) > 1

    def shortMessages(self, reference: int) -> list:
        """
        The short_message of each part: with the concatenation header
        (reference C{reference % 256}) when there is more than one.
        """
        if not self.concatenated:
            return list(self.parts)
        total = len(self.parts)
        return [
            concatenationHeader(reference, total, number) + part
            for number, part in enumerate(self.parts, 1)
        ]


def concatenationHeader(reference: int, total: int, number: int) -> bytes:
    """
    The 6-octet user data header of part C{number} of C{total}
    (3GPP TS 23.040 9.2.3.24.1, 8-bit reference).
    """
    return bytes([0x05, 0x00, 0x03, reference & 0xFF, total, number])


def _units(text: str, gsm: bool) -> list:
    """
    The encoded characters of C{text}, each kept whole (an escape pair,
    a surrogate pair).
    """
    if gsm:
        return [_ENCODE[char] for char in text]
    return [
        char.encode("utf-16-be") if not 0xD800 <= ord(char) <= 0xDFFF else b"\xff\xfd"
        for char in text
    ]


def _pack(units: list, capacity: int, size: int) -> list:
    parts, current, used = [], [], 0
    for unit in units:
        width = len(unit) // size
        if used + width > capacity:
            parts.append(b"".join(current))
            current, used = [], 0
        current.append(unit)
        used += width
    if current or not parts:
        parts.append(b"".join(current))
    return parts


def split(text: str, maxParts: int = 5) -> Split:
    """
    Encode C{text} (GSM 03.38 if it can be, else UCS-2) and cut it into
    parts.

    @raise TooLong: more than C{maxParts} parts would be needed.
    """
    gsm = isGSM(text)
    units = _units(text, gsm)
    size, single, part = (1, GSM_SINGLE, GSM_PART) if gsm else (2, UCS2_SINGLE, UCS2_PART)
    if sum(len(u) for u in units) // size <= single:
        parts = [b"".join(units)]
    else:
        parts = _pack(units, part, size)
    limit = min(maxParts, MAX_PARTS)
    if len(parts) > limit:
        raise TooLong(len(parts), limit)
    return Split(DATA_CODING_DEFAULT if gsm else DATA_CODING_UCS2, tuple(parts))


def decodeText(data_coding: int, data: bytes) -> str:
    """
    A short message's text for the data codings a relay reads back (the
    default alphabet, UCS-2, and Latin-1 / ASCII, 3 and 1), never raising.
    """
    if data_coding == DATA_CODING_UCS2:
        return decodeUCS2(data)
    if data_coding in (0x01, 0x03):
        return data.decode("latin-1")
    return decodeGSM(data)
