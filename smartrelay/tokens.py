"""
Signed tokens (HMAC-SHA256) for VERP return paths, List-Unsubscribe
addresses and URLs, and open- and click-tracking URLs (DESIGN sections 1.5
and 1.6).

Two forms:

  - I{compact} tokens (L{Tokens.compact}, L{Tokens.readCompact}) go into
    e-mail local parts, C{bounce+TOKEN@domain} (kind C{"v"}, VERP) and
    C{unsub+TOKEN@domain} (kind C{"u"}, mailto unsubscribe).  They are
    lower-case base32 without padding (only C{[a-z0-9]}, because some MTAs
    lower-case local parts; reading ignores case), 37 characters long, and
    carry the queue id and the recipient's index in the envelope.

  - I{URL} tokens (L{Tokens.make}, L{Tokens.read}) go into URL paths:
    kinds C{"o"} (open pixel), C{"c"} (click; carries the link) and C{"u"}
    (unsubscribe page and RFC 8058 one-click).  They are URL-safe base64
    without padding and carry the queue id, the recipient address and, for
    C{"c"}, the link in full.

Every token holds, in binary: its kind, the id of the key that signed it
(the first byte of the key's SHA-256, see L{keyID}), the queue id packed
(node byte, boot byte, 3-byte counter, 4-byte seconds), its payload and a
truncated HMAC-SHA256 over all of that and the token's form (80 bits for
compact tokens, 128 bits for URL tokens).  The kind is inside the MAC, so a
token of one kind is never accepted as another.  Tokens are deterministic:
the same inputs and key give the same token.

Keys rotate: the first key of a L{Tokens} signs, every key verifies.
"""

import base64
import binascii
import hashlib
import hmac
import os
import re
import tempfile
from typing import Optional, Sequence

import attrs
from cryptography.hazmat.primitives import hashes
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

#: MAC sizes in bytes: at least 80 bits for compact tokens, 128 for URLs.
COMPACT_MAC_SIZE = 10
URL_MAC_SIZE = 16

#: The longest compact token, in characters.
MAX_COMPACT_LENGTH = 40

# kind (1), key id (1), packed queue id (9), index (2).
_COMPACT_BODY = 13
_COMPACT_SIZE = _COMPACT_BODY + COMPACT_MAC_SIZE
# kind (1), key id (1), packed queue id (9), recipient length (2).
_URL_HEADER = 13

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
    signed by an unknown key, or not a token at all.
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
    the key's SHA-256.  Different keys may share an id; verification then
    tries each of them.
    """
    return hashlib.sha256(key).digest()[0]


def deriveKey(secret: str) -> bytes:
    """
    A 32-byte token key derived from a configured secret (HKDF with
    SHA-256 over the secret's UTF-8 text).
    """
    return HKDF(
        algorithm=hashes.SHA256(), length=NEW_KEY_SIZE, salt=None, info=_HKDF_INFO
    ).derive(secret.encode("utf-8"))


def _packQueueID(queueID: str) -> bytes:
    """
    9 bytes for a queue id C{NN/BB-CCCCC-TTTTTTTT}: node, boot, counter
    (3 bytes, big-endian) and seconds (4 bytes, big-endian).

    @raise ValueError: C{queueID} is not a queue id.
    """
    if not isinstance(queueID, str) or not isQueueID(queueID) or len(queueID) != 20:
        raise ValueError(f"not a queue id: {queueID!r}")
    node, boot = int(queueID[0:2], 16), int(queueID[3:5], 16)
    counter, seconds = int(queueID[6:11]), int(queueID[12:20], 16)
    return (
        bytes([node, boot]) + counter.to_bytes(3, "big") + seconds.to_bytes(4, "big")
    )


def _unpackQueueID(packed: bytes) -> str:
    """
    The inverse of L{_packQueueID}.

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


def _encodeCompact(data: bytes) -> str:
    return base64.b32encode(data).decode("ascii").rstrip("=").lower()


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
    Makes and checks signed tokens with a list of keys: the first signs,
    every one verifies (so a key can be rotated in front of the old ones,
    and the old ones removed once their tokens no longer matter).
    """

    def __init__(self, keys: Sequence[bytes]) -> None:
        """
        @param keys: HMAC keys, each at least L{MIN_KEY_SIZE} bytes; the
            first signs.
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
        A URL token.

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
            urlBytes = b"" if url is None else url.encode("utf-8")
        except (AttributeError, UnicodeError):
            raise ValueError("recipient and url must be text encodable as UTF-8") from None
        if len(recipientBytes) > 0xFFFF:
            raise ValueError("the recipient is too long for a token")
        body = (
            bytes([kindByte, self._signingID])
            + _packQueueID(queueID)
            + len(recipientBytes).to_bytes(2, "big")
            + recipientBytes
            + urlBytes
        )
        mac = self._mac(self._signing, _URL_TAG, body)[:URL_MAC_SIZE]
        return _encodeURL(body + mac)

    def read(self, kind: str, token: str) -> TokenData:
        """
        Check a URL token of C{kind}.

        @return: its queue id, recipient and (for C{"c"}) url; C{index} is
            L{None}.
        @raise BadToken: it is not a valid token of C{kind} signed by one of
            the keys, or C{kind} is not one of L{URL_KINDS}.
        """
        kindByte = _kindByte(kind, URL_KINDS, BadToken)
        data = _decodeURL(token)
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
        return hmac.new(key, tag + body, hashlib.sha256).digest()

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
