"""
Tokens for VERP return paths, List-Unsubscribe addresses and URLs, and
open- and click-tracking URLs (DESIGN sections 1.5 and 1.6).

Two forms:

  - I{compact} tokens (L{Tokens.compact}, L{Tokens.readCompact}) go into
    e-mail local parts, C{bounce+TOKEN@domain} (kind C{"v"}, VERP) and
    C{unsub+TOKEN@domain} (kind C{"u"}, mailto unsubscribe).  They are
    lower-case base32 without padding (only C{[a-z0-9]}, because some MTAs
    lower-case local parts; reading ignores case), 37 characters long, and
    carry the queue id and the recipient's index in the envelope, signed
    (HMAC-SHA256) but not encrypted: they hold nothing about the recipient
    that the address they are sent to does not already say.

  - I{URL} tokens (L{Tokens.make}, L{Tokens.read}) go into URL paths:
    kinds C{"o"} (open pixel), C{"c"} (click; carries the link) and C{"u"}
    (unsubscribe page and RFC 8058 one-click).  They are URL-safe base64
    without padding and carry the queue id, the recipient address and, for
    C{"c"}, the link, under authenticated encryption (AES-SIV): whoever sees
    the URL (a proxy or referrer log, a forwarded mail, a link scanner)
    learns neither the recipient nor the link nor the queue id, and nobody
    without the key can make a token that reads.

A compact token holds, in binary: its kind, the id of the key that signed
it (the first byte of the key's SHA-256, see L{keyID}), the queue id packed
(node byte, boot byte, 3-byte counter, 4-byte seconds), the index and an
80-bit truncated HMAC-SHA256 over all of that and the token's form.

A URL token holds one header byte (bit 7 set; bit 4: the payload is
deflated; bits 0 to 3: the low bits of the key's id) and the AES-SIV
sealing (a 128-bit synthetic IV, then the ciphertext) of the packed queue
id and the payload: the recipient's UTF-8 and, for C{"c"}, before it its
length (LEB128) and after it the link's UTF-8, deflated with a preset
dictionary of common address and link parts when that is shorter.  The
header byte and the kind are the associated data, so a token of one kind is
never accepted as another.  The AES-SIV key is derived from the token key
(HKDF-SHA256, L{urlKey}): the bytes that key HMACs never key the cipher.
A usual click token is about 70 characters (it was 100 in the signed form
below).

URL tokens made before they were encrypted (the I{signed} form: kind byte,
key id byte, packed queue id, 2-byte recipient length, recipient, link,
128-bit HMAC-SHA256 of all of that) still read, as long as the key that
signed them is one of the keys, so links in mail already sent keep working
until their key is retired.  Nothing makes them any more.

Tokens are deterministic: the same inputs and key give the same token.
Keys rotate: the first key of a L{Tokens} signs and seals, every key
verifies and opens.
"""

import base64
import binascii
import functools
import hashlib
import hmac
import os
import re
import tempfile
import zlib
from typing import Optional, Sequence

import attrs
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESSIV
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from smartrelay.diskio import fsyncDirectory, writeAll
from smartrelay.ids import isQueueID

#: Kinds of compact tokens: VERP return paths and mailto unsubscribe.
COMPACT_KINDS = ("v", "u")

#: Kinds of URL tokens: open pixel, click redirect, unsubscribe.
URL_KINDS = ("o", "c", "u")

#: The shortest key accepted, in bytes.
MIN_KEY_SIZE = 16

#: The size of keys made by L{Tokens.load}, in bytes.
NEW_KEY_SIZE = 32

#: MAC sizes in bytes: at least 80 bits for compact tokens, 128 for the
#: signed URL tokens that are still read.
COMPACT_MAC_SIZE = 10
URL_MAC_SIZE = 16

#: The longest compact token, in characters.
MAX_COMPACT_LENGTH = 40

# kind (1), key id (1), packed queue id (9), index (2).
_COMPACT_BODY = 13
_COMPACT_SIZE = _COMPACT_BODY + COMPACT_MAC_SIZE
# Signed URL tokens: kind (1), key id (1), packed queue id (9), recipient
# length (2).
_URL_HEADER = 13

# Sealed URL tokens: the header byte's bits.  Signed tokens begin with an
# ASCII kind letter, so bit 7 tells the forms apart.
_SEALED = 0x80
_DEFLATED = 0x10
_RESERVED = 0x60
_KEY_ID_MASK = 0x0F
# AES-256-SIV: a 64-byte key (two AES-256 keys), a 16-byte synthetic IV.
_SIV_KEY_SIZE = 64
_SIV_SIZE = 16
# header (1), synthetic IV (16), packed queue id (9).
_SEALED_MIN = 1 + _SIV_SIZE + 9
_URL_KEY_INFO = b"smartrelay url token aes-siv"

# The deflate dictionary of sealed URL tokens' payloads: pieces of
# addresses and links that recur, the likeliest last (nearest, so
# cheapest to refer to).  It is part of the token format: changing it
# makes tokens with deflated payloads unreadable.
_DICTIONARY = (
    b"@btinternet.com@orange.fr@free.fr@libero.it@mail.ru@yandex.ru@qq.com@163.com"
    b"@t-online.de@gmx.de@web.de@aol.com@me.com@icloud.com@live.com@msn.com"
    b"@yahoo.com@hotmail.com@outlook.com@googlemail.com@gmail.com"
    b".co.uk/.com.au/.com.br/.io/.fr/.de/.net/.org/"
    b"/index.html.php?id=/en/?id=&id=/orders//products//p/"
    b"/login/account/settings/reset-password?token=/confirm?token=/verify?token="
    b"/unsubscribe?&utm_term=&utm_content=&utm_campaign=&utm_medium=email"
    b"?utm_source=newsletter.com/http://www.https://www."
)
# Raw deflate with a 1 KiB window (it reaches all of the dictionary) and
# little memory: building a compressor per token stays cheap.
_DEFLATE_BITS = -10
_DEFLATE_MEMORY = 1

# Domain separation: the MAC covers the form of the token, so a compact
# token's bytes can never verify as a URL token's and vice versa.
_COMPACT_TAG = b"smartrelay token compact\0"
_URL_TAG = b"smartrelay token url\0"

_HKDF_INFO = b"smartrelay token key"

_COMPACT_RE = re.compile(r"[a-z2-7]+")
_URL_RE = re.compile(r"[A-Za-z0-9_-]+")


class BadToken(ValueError):
    """
    A token is not valid: forged, truncated, extended, of another kind,
    signed or sealed by an unknown key, or not a token at all.
    """


@attrs.frozen
class TokenData:
    """
    What a token carries.

    @ivar queue_id: the message's queue id.
    @ivar recipient: the recipient address (URL tokens), or L{None}
        (compact tokens).
    @ivar index: the recipient's index in the envelope (compact tokens), or
        L{None} (URL tokens).
    @ivar url: the link of a click (C{"c"}) token, or L{None}.
    """

    queue_id: str
    recipient: Optional[str]
    index: Optional[int]
    url: Optional[str]


def keyID(key: bytes) -> int:
    """
    The id a token carries for the key that signed it: the first byte of
    the key's SHA-256 (URL tokens carry its low 4 bits).  Different keys
    may share an id; verification then tries each of them.
    """
    return hashlib.sha256(key).digest()[0]


def urlKey(key: bytes) -> bytes:
    """
    The AES-SIV key that seals URL tokens for the token key C{key}: 64
    bytes of HKDF-SHA256 of it, for this purpose only (the token key itself
    keys the HMAC of compact tokens).
    """
    return HKDF(
        algorithm=hashes.SHA256(), length=_SIV_KEY_SIZE, salt=None, info=_URL_KEY_INFO
    ).derive(key)


def deriveKey(secret: str) -> bytes:
    """
    A 32-byte token key derived from a configured secret (HKDF with
    SHA-256 over the secret's UTF-8 text).
    """
    return HKDF(
        algorithm=hashes.SHA256(), length=NEW_KEY_SIZE, salt=None, info=_HKDF_INFO
    ).derive(secret.encode("utf-8"))


@functools.lru_cache(maxsize=256)
def _packQueueID(queueID: str) -> bytes:
    """
    9 bytes for a queue id C{NN/BB-CCCCC-TTTTTTTT}: node, boot, counter
    (3 bytes, big-endian) and seconds (4 bytes, big-endian).  Cached: a
    message's tokens (every link of every recipient) share its queue id.

    @raise ValueError: C{queueID} is not a queue id.
    """
    if not isinstance(queueID, str) or not isQueueID(queueID) or len(queueID) != 20:
        raise ValueError(f"not a queue id: {queueID!r}")
    node, boot = int(queueID[0:2], 16), int(queueID[3:5], 16)
    counter, seconds = int(queueID[6:11]), int(queueID[12:20], 16)
    return (
        bytes([node, boot]) + counter.to_bytes(3, "big") + seconds.to_bytes(4, "big")
    )


@functools.lru_cache(maxsize=4096)
def _unpackQueueID(packed: bytes) -> str:
    """
    The inverse of L{_packQueueID}.  Cached: the clicks and opens of a
    campaign carry a few messages' queue ids, read for every click.

    @raise BadToken: the counter is out of range.
    """
    node, boot = packed[0], packed[1]
    counter = int.from_bytes(packed[2:5], "big")
    seconds = int.from_bytes(packed[5:9], "big")
    if counter > 99999:
        raise BadToken("bad queue id")
    return f"{node:02X}/{boot:02X}-{counter:05d}-{seconds:08X}"


def _kindByte(kind: str, kinds: Sequence[str], error: type = ValueError) -> int:
    """
    The byte standing for C{kind} in a token.

    @raise error: C{kind} is not one of C{kinds}.
    """
    if kind not in kinds:
        raise error(f"unknown token kind {kind!r} (expected one of {', '.join(kinds)})")
    return ord(kind)


_BASE32 = "abcdefghijklmnopqrstuvwxyz234567"
#: Every pair of base32 digits, by the 10 bits they stand for.
_BASE32_PAIRS = [a + b for a in _BASE32 for b in _BASE32]


def _encodeCompact(data: bytes) -> str:
    """
    C{data} in lower-case base32 without padding (RFC 4648), as
    C{base64.b32encode(data).decode().rstrip("=").lower()} gives it but in
    about half the time (that function is Python code working five
    bytes at a time; every message's VERP and unsubscribe addresses are one
    each, on the reactor thread).
    """
    bits = len(data) * 8
    extra = -bits % 5
    number = int.from_bytes(data, "big") << extra
    digits = (bits + extra) // 5
    pairs = _BASE32_PAIRS
    out = []
    if digits % 2:
        out.append(_BASE32[number & 31])
        number >>= 5
    for _ in range(digits // 2):
        out.append(pairs[number & 1023])
        number >>= 10
    out.reverse()
    return "".join(out)


def _decodeCompact(token: str) -> bytes:
    """
    The bytes of a compact token's text, which must be their canonical
    encoding (no stray bits), any case.

    @raise BadToken: it is not.
    """
    if not isinstance(token, str):
        raise BadToken("not a token")
    if not token.isascii():
        raise BadToken("not a compact token")
    text = token.lower()
    if not _COMPACT_RE.fullmatch(text) or len(text) > MAX_COMPACT_LENGTH:
        raise BadToken("not a compact token")
    try:
        data = base64.b32decode(text.upper() + "=" * (-len(text) % 8))
    except (binascii.Error, ValueError):
        raise BadToken("not a compact token") from None
    if _encodeCompact(data) != text:
        raise BadToken("not a compact token")
    return data


def _encodeURL(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _decodeURL(token: str) -> bytes:
    """
    The bytes of a URL token's text, which must be their canonical
    encoding.

    @raise BadToken: it is not.
    """
    if not isinstance(token, str) or not token.isascii() or not _URL_RE.fullmatch(token):
        raise BadToken("not a URL token")
    try:
        data = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except (binascii.Error, ValueError):
        raise BadToken("not a URL token") from None
    if _encodeURL(data) != token:
        raise BadToken("not a URL token")
    return data


class Tokens:
    """
    Makes and checks tokens with a list of keys: the first signs and seals,
    every one verifies and opens (so a key can be rotated in front of the
    old ones, and the old ones removed once their tokens no longer
    matter).
    """

    def __init__(self, keys: Sequence[bytes]) -> None:
        """
        @param keys: token keys, each at least L{MIN_KEY_SIZE} bytes; the
            first signs and seals.
        @raise ValueError: no keys, or a key that is too short.
        """
        keys = list(keys)
        if not keys:
            raise ValueError("at least one token key is needed")
        for key in keys:
            if not isinstance(key, bytes) or len(key) < MIN_KEY_SIZE:
                raise ValueError(f"token keys must be at least {MIN_KEY_SIZE} bytes")
        self._all = tuple(keys)
        self._signing = keys[0]
        self._signingID = keyID(keys[0])
        self._keys: dict[int, list[bytes]] = {}
        for key in keys:
            self._keys.setdefault(keyID(key), []).append(key)
        # The AES-SIV ciphers of URL tokens, by the 4 bits of key id they
        # carry; the first key's seals.
        ciphers = [AESSIV(urlKey(key)) for key in keys]
        self._sealing = ciphers[0]
        self._openers: dict[int, list[AESSIV]] = {}
        for key, cipher in zip(keys, ciphers):
            self._openers.setdefault(keyID(key) & _KEY_ID_MASK, []).append(cipher)

    def __reduce__(self) -> tuple:
        # Pickled for the re-wrap worker processes, over their pipes.
        return (Tokens, (self._all,))

    def __repr__(self) -> str:
        count = sum(map(len, self._keys.values()))
        return f"<Tokens signing key id {self._signingID:02x}, {count} keys>"

    @classmethod
    def load(cls, secrets: Sequence[str], keyFile: str) -> "Tokens":
        """
        The tokens of a configuration.  Blocking: call it at start-up.

        If C{secrets} (C{[smartrelay] secret}) is not empty, the keys are
        derived from them (L{deriveKey}), the first signing.  Otherwise the
        keys are read from C{keyFile} (C{data_dir/token-keys}): one hex key
        per line, the first signing.  If it does not exist it is created,
        mode 0600, with one new random key of L{NEW_KEY_SIZE} bytes,
        durably and atomically (temporary file, fsync, rename, directory
        fsync); its directory is created if missing.

        @raise ValueError: with a one-line reason, if the file is damaged
            or cannot be read or written.
        """
        if secrets:
            return cls([deriveKey(secret) for secret in secrets])
        try:
            with open(keyFile, encoding="ascii") as f:
                text = f.read()
        except FileNotFoundError:
            key = os.urandom(NEW_KEY_SIZE)
            try:
                _writeKeyFile(keyFile, key)
            except OSError as e:
                raise ValueError(
                    f"cannot create the token key file {keyFile!r}: {e.strerror or e}"
                ) from None
            return cls([key])
        except UnicodeDecodeError:
            raise ValueError(
                f"the token key file {keyFile!r} is damaged: it is not hex text"
            ) from None
        except OSError as e:
            raise ValueError(
                f"cannot read the token key file {keyFile!r}: {e.strerror or e}"
            ) from None
        return cls(_parseKeyFile(text, keyFile))

    # -- compact tokens -------------------------------------------------

    def compact(self, kind: str, queueID: str, index: int) -> str:
        """
        A compact token for an e-mail local part.

        @param kind: one of L{COMPACT_KINDS}: C{"v"} (VERP return path) or
            C{"u"} (mailto unsubscribe).
        @param queueID: the message's queue id.
        @param index: the recipient's index in the envelope, 0 to 65535.
        @return: 37 characters of C{[a-z2-7]}.
        @raise ValueError: for a bad kind, queue id or index.
        """
        kindByte = _kindByte(kind, COMPACT_KINDS)
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index <= 0xFFFF:
            raise ValueError(f"a recipient index must be from 0 to 65535, got {index!r}")
        body = (
            bytes([kindByte, self._signingID])
            + _packQueueID(queueID)
            + index.to_bytes(2, "big")
        )
        mac = self._mac(self._signing, _COMPACT_TAG, body)[:COMPACT_MAC_SIZE]
        return _encodeCompact(body + mac)

    def readCompact(self, kind: str, token: str) -> tuple[str, int]:
        """
        Check a compact token of C{kind} (case is ignored).

        @return: (queue id, recipient index).
        @raise BadToken: it is not a valid token of C{kind} signed by one of
            the keys, or C{kind} is not one of L{COMPACT_KINDS}.
        """
        kindByte = _kindByte(kind, COMPACT_KINDS, BadToken)
        data = _decodeCompact(token)
        if len(data) != _COMPACT_SIZE:
            raise BadToken("bad compact token length")
        body, mac = data[:_COMPACT_BODY], data[_COMPACT_BODY:]
        self._verify(kindByte, _COMPACT_TAG, body, mac)
        queueID = _unpackQueueID(body[2:11])
        return (queueID, int.from_bytes(body[11:13], "big"))

    # -- URL tokens -----------------------------------------------------

    def make(self, kind: str, queueID: str, recipient: str, url: Optional[str] = None) -> str:
        """
        A URL token, sealed with the first key.

        @param kind: one of L{URL_KINDS}: C{"o"} (open), C{"c"} (click) or
            C{"u"} (unsubscribe).
        @param queueID: the message's queue id.
        @param recipient: the recipient address (any text; at most 65535
            octets of UTF-8).
        @param url: the link, for C{"c"} only (required there).
        @return: URL-safe base64 text without padding (C{[A-Za-z0-9_-]}).
        @raise ValueError: for a bad kind, queue id, recipient or url.
        """
        kindByte = _kindByte(kind, URL_KINDS)
        if (url is None) != (kind != "c"):
            raise ValueError(
                "a click token needs a url" if kind == "c" else f"a {kind!r} token has no url"
            )
        try:
            recipientBytes = recipient.encode("utf-8")
            urlBytes = None if url is None else url.encode("utf-8")
        except (AttributeError, UnicodeError):
            raise ValueError("recipient and url must be text encodable as UTF-8") from None
        if len(recipientBytes) > 0xFFFF:
            raise ValueError("the recipient is too long for a token")
        if urlBytes is None:
            payload = recipientBytes
        else:
            payload = _lengthPrefix(len(recipientBytes)) + recipientBytes + urlBytes
        header = _SEALED | (self._signingID & _KEY_ID_MASK)
        deflated = _deflate(payload)
        if len(deflated) < len(payload):
            header |= _DEFLATED
            payload = deflated
        sealed = self._sealing.encrypt(
            _packQueueID(queueID) + payload, [bytes([header, kindByte])]
        )
        return _encodeURL(bytes([header]) + sealed)

    def read(self, kind: str, token: str) -> TokenData:
        """
        Check a URL token of C{kind}: sealed, or signed as before URL tokens
        were encrypted.

        @return: its queue id, recipient and (for C{"c"}) url; C{index} is
            L{None}.
        @raise BadToken: it is not a valid token of C{kind} sealed or signed
            by one of the keys, or C{kind} is not one of L{URL_KINDS}.
        """
        kindByte = _kindByte(kind, URL_KINDS, BadToken)
        data = _decodeURL(token)
        if data and data[0] & _SEALED:
            return self._unseal(kind, kindByte, data)
        return self._readSigned(kind, kindByte, data)

    def _unseal(self, kind: str, kindByte: int, data: bytes) -> TokenData:
        """
        The data of a sealed URL token's bytes.

        @raise BadToken: it is not a token of C{kind} sealed by one of the
            keys.
        """
        header = data[0]
        if header & _RESERVED or len(data) < _SEALED_MIN:
            raise BadToken("not a URL token")
        ciphers = self._openers.get(header & _KEY_ID_MASK)
        if not ciphers:
            raise BadToken("token sealed by an unknown key")
        associated = [bytes([header, kindByte])]
        for cipher in ciphers:
            try:
                plain = cipher.decrypt(data[1:], associated)
                break
            except InvalidTag:
                continue
        else:
            raise BadToken("bad token (forged, damaged, of another kind or another key)")
        queueID = _unpackQueueID(plain[:9])
        payload = plain[9:]
        if header & _DEFLATED:
            payload = _inflate(payload)
        if kind == "c":
            length, offset = _readLengthPrefix(payload)
            recipientBytes = payload[offset : offset + length]
            urlBytes = payload[offset + length :]
            if len(recipientBytes) != length:
                raise BadToken("bad URL token payload")
        else:
            recipientBytes, urlBytes = payload, None
        try:
            recipient = recipientBytes.decode("utf-8")
            url = None if urlBytes is None else urlBytes.decode("utf-8")
        except UnicodeDecodeError:
            raise BadToken("bad URL token payload") from None
        return TokenData(queue_id=queueID, recipient=recipient, index=None, url=url)

    def _readSigned(self, kind: str, kindByte: int, data: bytes) -> TokenData:
        """
        The data of a signed URL token's bytes (the form made before URL
        tokens were sealed).

        @raise BadToken: it is not a token of C{kind} signed by one of the
            keys.
        """
        if len(data) < _URL_HEADER + URL_MAC_SIZE:
            raise BadToken("URL token too short")
        body, mac = data[:-URL_MAC_SIZE], data[-URL_MAC_SIZE:]
        self._verify(kindByte, _URL_TAG, body, mac)
        queueID = _unpackQueueID(body[2:11])
        length = int.from_bytes(body[11:13], "big")
        rest = body[_URL_HEADER:]
        if length > len(rest) or (kind != "c" and length != len(rest)):
            raise BadToken("bad URL token payload")
        try:
            recipient = rest[:length].decode("utf-8")
            url = rest[length:].decode("utf-8") if kind == "c" else None
        except UnicodeDecodeError:
            raise BadToken("bad URL token payload") from None
        return TokenData(queue_id=queueID, recipient=recipient, index=None, url=url)

    # -- MACs -----------------------------------------------------------

    @staticmethod
    def _mac(key: bytes, tag: bytes, body: bytes) -> bytes:
        # hmac.digest: OpenSSL's one-shot HMAC, no Python HMAC object.
        return hmac.digest(key, tag + body, "sha256")

    def _verify(self, kindByte: int, tag: bytes, body: bytes, mac: bytes) -> None:
        """
        Check the kind byte of C{body} and its MAC with each key of its key
        id.

        @raise BadToken: another kind, an unknown key, or a bad MAC.
        """
        if body[0] != kindByte:
            raise BadToken("token of another kind")
        keys = self._keys.get(body[1])
        if not keys:
            raise BadToken("token signed by an unknown key")
        for key in keys:
            if hmac.compare_digest(self._mac(key, tag, body)[: len(mac)], mac):
                return
        raise BadToken("bad token signature")


def _lengthPrefix(length: int) -> bytes:
    """
    C{length} as LEB128: 7 bits a byte, least significant first, bit 7 set
    on every byte but the last.
    """
    out = bytearray()
    while length >= 0x80:
        out.append(0x80 | (length & 0x7F))
        length >>= 7
    out.append(length)
    return bytes(out)


def _readLengthPrefix(data: bytes) -> tuple[int, int]:
    """
    The inverse of L{_lengthPrefix} at the start of C{data}: (length,
    number of bytes it took).  Only the canonical form of a length up to
    65535 is accepted.

    @raise BadToken: there is none.
    """
    length = 0
    for position in range(min(len(data), 3)):
        byte = data[position]
        length |= (byte & 0x7F) << (7 * position)
        if not byte & 0x80:
            if (position and not byte) or length > 0xFFFF:
                break
            return length, position + 1
    raise BadToken("bad URL token payload")


def _deflate(data: bytes) -> bytes:
    """
    C{data} as raw deflate with L{_DICTIONARY} preset.
    """
    compressor = zlib.compressobj(
        9, zlib.DEFLATED, _DEFLATE_BITS, _DEFLATE_MEMORY, zlib.Z_DEFAULT_STRATEGY, _DICTIONARY
    )
    return compressor.compress(data) + compressor.flush()


def _inflate(data: bytes) -> bytes:
    """
    The inverse of L{_deflate}.  Only for data from a token that opened:
    nobody without the key could have made it, so it is not a bomb.

    @raise BadToken: C{data} is not one whole deflate stream.
    """
    decompressor = zlib.decompressobj(_DEFLATE_BITS, zdict=_DICTIONARY)
    try:
        out = decompressor.decompress(data)
    except zlib.error:
        raise BadToken("bad URL token payload") from None
    if not decompressor.eof or decompressor.unused_data:
        raise BadToken("bad URL token payload")
    return out


def _parseKeyFile(text: str, path: str) -> list[bytes]:
    """
    The keys in the text of a key file: one hex key per line; blank lines
    are ignored.

    @raise ValueError: with a one-line reason naming C{path}.
    """
    keys = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if not re.fullmatch(r"(?:[0-9A-Fa-f]{2})+", line):
            raise ValueError(
                f"the token key file {path!r} is damaged: line {number} is not a hex key"
            )
        key = bytes.fromhex(line)
        if len(key) < MIN_KEY_SIZE:
            raise ValueError(
                f"the token key file {path!r} is damaged: the key on line {number} "
                f"is shorter than {MIN_KEY_SIZE} bytes"
            )
        keys.append(key)
    if not keys:
        raise ValueError(f"the token key file {path!r} is damaged: it holds no key")
    return keys


def _writeKeyFile(path: str, key: bytes) -> None:
    """
    Durably and atomically create the key file C{path} (mode 0600) holding
    C{key}: temporary file, fsync, rename, directory fsync.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".token-keys-", suffix=".tmp", dir=directory)
    try:
        try:
            os.fchmod(fd, 0o600)
            writeAll(fd, key.hex().encode("ascii") + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsyncDirectory(directory)
