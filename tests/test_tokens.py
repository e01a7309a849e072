"""
Tests for L{smartrelay.tokens}.
"""

import base64
import hashlib
import hmac
import os
import pickle
import re
import stat

from hypothesis import assume, given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from smartrelay.ids import isQueueID
from smartrelay.tokens import (
    COMPACT_KINDS,
    URL_KINDS,
    BadToken,
    TokenData,
    Tokens,
    deriveKey,
    keyID,
    urlKey,
)

KEY = b"k" * 32
OTHER = b"o" * 32
QUEUE_ID = "79/BC-12331-5C348706"

queueIDs = st.builds(
    lambda node, boot, counter, seconds: f"{node:02X}/{boot:02X}-{counter:05d}-{seconds:08X}",
    st.integers(0, 255),
    st.integers(0, 255),
    st.integers(0, 99999),
    st.integers(0, 0xFFFFFFFF),
)
indexes = st.integers(0, 0xFFFF)
recipients = st.one_of(
    st.emails(),
    st.text(max_size=300),
    st.text(alphabet="aé€😀@.", min_size=200, max_size=2000),
)
urls = st.one_of(
    st.builds(lambda path: "https://example.com/" + path, st.text(max_size=500)),
    st.text(max_size=3000),
)
keys = st.binary(min_size=16, max_size=64)

# The typical click of the issue, and the tokens the code before URL tokens
# were encrypted made for it (key KEY): such tokens are in mail already sent.
ALICE = "alice@example.org"
OFFER = "https://www.example.org/offer"
SIGNED_CLICK = (
    "Y155vAAwK1w0hwYAEWFsaWNlQGV4YW1wbGUub3JnaHR0cHM6Ly93d3cuZXhhbXBsZS5vcmcv"
    "b2ZmZXKMkS85If2f6Urt2NtiJJiT"
)
SIGNED_OPEN = "b155vAAwK1w0hwYAEWFsaWNlQGV4YW1wbGUub3Jn5JwoDAzHFsKuTKzM4gIUsw"
SIGNED_UNSUBSCRIBE = "dV55vAAwK1w0hwYAEWFsaWNlQGV4YW1wbGUub3Jn4cjBpINuLQ4XZieHqa_zDA"
# And the sealed ones this code makes: pinned, because mail that carries
# them must keep working whatever changes here later.
SEALED_CLICK = "nnGS0Q8dgFt-o-y2XORIMZH4QByC6M071dpvIxjs9qdZzo5FSwLqsRq8csZpL64UP8BEGBc"
SEALED_OPEN = "nhBxrS7UcGp8vkc9KVcSzaeeoGsABrMKjqle7sPOTTOq7UkbcsA3b5nd"


def signedToken(key, kind, queueID, recipient, url=None):
    """
    A URL token in the signed form made before URL tokens were encrypted:
    kind, key id, packed queue id, 2-byte recipient length, recipient,
    link, then 16 bytes of HMAC-SHA256 with the token key itself.
    """
    node, boot = int(queueID[0:2], 16), int(queueID[3:5], 16)
    counter, seconds = int(queueID[6:11]), int(queueID[12:20], 16)
    recipientBytes = recipient.encode("utf-8")
    body = (
        kind.encode("ascii")
        + bytes([keyID(key), node, boot])
        + counter.to_bytes(3, "big")
        + seconds.to_bytes(4, "big")
        + len(recipientBytes).to_bytes(2, "big")
        + recipientBytes
        + (url or "").encode("utf-8")
    )
    mac = hmac.new(key, b"smartrelay token url\0" + body, hashlib.sha256).digest()[:16]
    return base64.urlsafe_b64encode(body + mac).decode("ascii").rstrip("=")


def tokenBytes(token):
    return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))


def tokenText(data):
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def urlTokens():
    """
    (kind, recipient, url) for L{Tokens.make}.
    """
    return st.one_of(
        st.tuples(st.sampled_from(["o", "u"]), recipients, st.none()),
        st.tuples(st.just("c"), recipients, urls),
    )


class TokensTestMixin:
    def setUp(self):
        self.tokens = Tokens([KEY])


class CompactTests(TokensTestMixin, SynchronousTestCase):
    """
    Tests for L{Tokens.compact} and L{Tokens.readCompact}.
    """

    def test_example(self):
        """
        A compact token reads back as its queue id and index.
        """
        token = self.tokens.compact("v", QUEUE_ID, 7)
        self.assertEqual(self.tokens.readCompact("v", token), (QUEUE_ID, 7))

    @given(st.sampled_from(COMPACT_KINDS), queueIDs, indexes)
    def test_roundTrip(self, kind, queueID, index):
        """
        Every kind, queue id and index reads back; the token is at most 40
        characters of C{[a-z0-9]}, and upper case reads the same.
        """
        tokens = Tokens([KEY])
        token = tokens.compact(kind, queueID, index)
        self.assertRegex(token, r"^[a-z0-9]{1,40}$")
        self.assertEqual(tokens.readCompact(kind, token), (queueID, index))
        self.assertEqual(tokens.readCompact(kind, token.upper()), (queueID, index))
        self.assertEqual(tokens.readCompact(kind, token.swapcase()), (queueID, index))

    def test_localPartLimit(self):
        """
        C{bounce+TOKEN} and C{unsub+TOKEN} stay well within 64 octets.
        """
        token = self.tokens.compact("u", "FF/FF-99999-FFFFFFFF", 65535)
        self.assertLessEqual(len("bounce+" + token), 64)

    def test_deterministic(self):
        """
        The same inputs and key give the same token; another key another.
        """
        self.assertEqual(
            self.tokens.compact("v", QUEUE_ID, 1), Tokens([KEY]).compact("v", QUEUE_ID, 1)
        )
        self.assertNotEqual(
            self.tokens.compact("v", QUEUE_ID, 1), Tokens([OTHER]).compact("v", QUEUE_ID, 1)
        )

    def test_badArguments(self):
        """
        Unknown kinds, bad queue ids and out-of-range indexes are refused.
        """
        for kind in ("o", "c", "x", ""):
            self.assertRaises(ValueError, self.tokens.compact, kind, QUEUE_ID, 0)
        for queueID in ("79/BC-12331-5C34870", "79/bc-12331-5C348706", QUEUE_ID + "\n", ""):
            self.assertRaises(ValueError, self.tokens.compact, "v", queueID, 0)
        for index in (-1, 65536, True, 1.0, "1"):
            self.assertRaises(ValueError, self.tokens.compact, "v", QUEUE_ID, index)

    @given(st.sampled_from(COMPACT_KINDS), queueIDs, indexes, st.data())
    def test_oneCharacterChanged(self, kind, queueID, index, data):
        """
        Changing any one character (to anything but the same letter in
        another case) makes the token bad.
        """
        tokens = Tokens([KEY])
        token = tokens.compact(kind, queueID, index)
        position = data.draw(st.integers(0, len(token) - 1))
        replacement = data.draw(st.characters())
        assume(replacement.lower() != token[position])
        changed = token[:position] + replacement + token[position + 1 :]
        self.assertRaises(BadToken, tokens.readCompact, kind, changed)

    @given(st.sampled_from(COMPACT_KINDS), queueIDs, indexes, st.data())
    def test_bitFlipped(self, kind, queueID, index, data):
        """
        Flipping any bit of the token's bytes makes it bad.
        """
        import base64

        tokens = Tokens([KEY])
        token = tokens.compact(kind, queueID, index)
        raw = bytearray(base64.b32decode(token.upper() + "=" * (-len(token) % 8)))
        bit = data.draw(st.integers(0, len(raw) * 8 - 1))
        raw[bit // 8] ^= 1 << (bit % 8)
        changed = base64.b32encode(bytes(raw)).decode().rstrip("=").lower()
        self.assertRaises(BadToken, tokens.readCompact, kind, changed)

    @given(st.sampled_from(COMPACT_KINDS), queueIDs, indexes, st.data())
    def test_truncatedOrExtended(self, kind, queueID, index, data):
        """
        Cutting characters off either end, or adding any, makes it bad.
        """
        tokens = Tokens([KEY])
        token = tokens.compact(kind, queueID, index)
        cut = data.draw(st.integers(1, len(token)))
        self.assertRaises(BadToken, tokens.readCompact, kind, token[:-cut])
        self.assertRaises(BadToken, tokens.readCompact, kind, token[cut:])
        extra = data.draw(st.text(min_size=1, max_size=10))
        self.assertRaises(BadToken, tokens.readCompact, kind, token + extra)
        self.assertRaises(BadToken, tokens.readCompact, kind, extra + token)

    @given(queueIDs, indexes)
    def test_otherKind(self, queueID, index):
        """
        A token of one kind is not a token of another.
        """
        tokens = Tokens([KEY])
        self.assertRaises(BadToken, tokens.readCompact, "u", tokens.compact("v", queueID, index))
        self.assertRaises(BadToken, tokens.readCompact, "v", tokens.compact("u", queueID, index))

    @given(st.text(max_size=60))
    def test_garbage(self, text):
        """
        Arbitrary text is a bad token, never another exception.
        """
        self.assertRaises(BadToken, self.tokens.readCompact, "v", text)

    def test_badKindToRead(self):
        """
        Reading with a kind that has no compact tokens is an error.
        """
        token = self.tokens.compact("v", QUEUE_ID, 0)
        self.assertRaises(BadToken, self.tokens.readCompact, "c", token)
        self.assertRaises(BadToken, self.tokens.read, "v", self.tokens.make("o", QUEUE_ID, "a"))

    def test_notURLToken(self):
        """
        A compact token is not a URL token, and a URL token not a compact one.
        """
        self.assertRaises(BadToken, self.tokens.read, "u", self.tokens.compact("u", QUEUE_ID, 0))
        self.assertRaises(
            BadToken, self.tokens.readCompact, "u", self.tokens.make("u", QUEUE_ID, "a@b")
        )


class URLTokenTests(TokensTestMixin, SynchronousTestCase):
    """
    Tests for L{Tokens.make} and L{Tokens.read}.
    """

    def test_example(self):
        """
        A click token reads back as its queue id, recipient and link.
        """
        token = self.tokens.make("c", QUEUE_ID, "bob@example.com", "https://example.com/?a=1#x")
        self.assertEqual(
            self.tokens.read("c", token),
            TokenData(QUEUE_ID, "bob@example.com", None, "https://example.com/?a=1#x"),
        )

    def test_compact(self):
        """
        An open token for a usual address stays short: packed queue id,
        one header byte, the 128-bit synthetic IV, no JSON.
        """
        token = self.tokens.make("o", QUEUE_ID, "bob@example.com")
        self.assertLessEqual(len(token), 56)

    def test_clickLength(self):
        """
        The usual click token is 71 characters (it was 100 signed in clear);
        one with a long campaign link stays about half its signed length.
        """
        self.assertEqual(len(self.tokens.make("c", QUEUE_ID, ALICE, OFFER)), 71)
        self.assertEqual(len(SIGNED_CLICK), 100)
        link = (
            "https://www.example.org/newsletter/2024/05/spring-sale"
            "?utm_source=newsletter&utm_medium=email&utm_campaign=spring"
        )
        sealed = self.tokens.make("c", QUEUE_ID, ALICE, link)
        self.assertLessEqual(len(sealed), 110)
        self.assertGreater(len(signedToken(KEY, "c", QUEUE_ID, ALICE, link)), 200)

    def test_pinned(self):
        """
        Tokens made by this version read back for ever: the format, the key
        derivation and the deflate dictionary do not change under them.
        """
        self.assertEqual(
            self.tokens.read("c", SEALED_CLICK), TokenData(QUEUE_ID, ALICE, None, OFFER)
        )
        self.assertEqual(
            self.tokens.read("o", SEALED_OPEN), TokenData(QUEUE_ID, ALICE, None, None)
        )
        self.assertEqual(self.tokens.make("c", QUEUE_ID, ALICE, OFFER), SEALED_CLICK)

    def test_opaqueExample(self):
        """
        The usual click token shows neither the recipient, nor the link,
        nor the queue id, in its text or its bytes; the signed form showed
        them all.
        """
        token = self.tokens.make("c", QUEUE_ID, ALICE, OFFER)
        for secret in (ALICE, OFFER, "alice", "example", "offer"):
            self.assertNotIn(secret.encode(), tokenBytes(token))
            self.assertNotIn(secret, token)
        packed = tokenBytes(SIGNED_CLICK)[2:11]
        self.assertNotIn(packed, tokenBytes(token))
        self.assertIn(b"alice@example.orghttps://www.example.org/offer", tokenBytes(SIGNED_CLICK))

    @given(urlTokens(), queueIDs)
    def test_opaque(self, args, queueID):
        """
        No token holds its recipient or link, in any of the three base64
        alignments, nor its packed queue id.
        """
        kind, recipient, url = args
        token = Tokens([KEY]).make(kind, queueID, recipient, url)
        raw = tokenBytes(token)
        for secret in (recipient, url):
            data = (secret or "").encode("utf-8")
            if len(data) < 6:
                continue
            self.assertNotIn(data, raw)
            for shift in range(3):
                # The base64 of the text at each alignment, without the
                # characters that also depend on the neighbouring bytes.
                aligned = tokenText(data[shift:])[:-2]
                if len(aligned) >= 6:
                    self.assertNotIn(aligned, token)
        self.assertNotIn(tokenBytes(signedToken(KEY, kind, queueID, "", url))[2:11], raw)

    def test_sealedHeader(self):
        """
        A token is one header byte (bit 7 set, the deflate flag, the low 4
        bits of the key id) before the sealed bytes; setting a reserved bit,
        or the deflate flag of a token without it, makes it bad.
        """
        token = self.tokens.make("o", QUEUE_ID, "x")
        header = tokenBytes(token)[0]
        self.assertEqual(header & 0x80, 0x80)
        self.assertEqual(header & 0x0F, keyID(KEY) & 0x0F)
        self.assertEqual(header & 0x70, 0)
        for bit in (0x10, 0x20, 0x40):
            changed = tokenText(bytes([header | bit]) + tokenBytes(token)[1:])
            self.assertRaises(BadToken, self.tokens.read, "o", changed)

    def test_deflated(self):
        """
        A payload that deflates shorter is deflated (flag set); one that
        does not is sealed as it is.
        """
        deflated = tokenBytes(self.tokens.make("c", QUEUE_ID, ALICE, OFFER))[0]
        self.assertTrue(deflated & 0x10)
        plain = tokenBytes(self.tokens.make("o", QUEUE_ID, "q"))[0]
        self.assertFalse(plain & 0x10)

    def test_recipientLengths(self):
        """
        Recipient lengths at the edges of the length prefix's bytes read
        back in click tokens.
        """
        for length in (0, 1, 127, 128, 16383, 16384, 65535):
            for recipient in ("a" * length, "é" * (length // 2)):
                token = self.tokens.make("c", QUEUE_ID, recipient, "https://example.com/x")
                self.assertEqual(
                    self.tokens.read("c", token),
                    TokenData(QUEUE_ID, recipient, None, "https://example.com/x"),
                )

    def test_perPurposeKeys(self):
        """
        URL tokens are sealed with a 64-byte key derived from the token key
        for that purpose alone: never the bytes that key the compact
        tokens' HMAC, and different for different keys.
        """
        self.assertEqual(len(urlKey(KEY)), 64)
        self.assertEqual(urlKey(KEY), urlKey(KEY))
        self.assertNotEqual(urlKey(KEY), urlKey(OTHER))
        self.assertNotIn(KEY, urlKey(KEY))

    @given(urlTokens(), queueIDs)
    def test_roundTrip(self, args, queueID):
        """
        Every kind, queue id, recipient and link reads back; the token is
        URL-safe base64 without padding.
        """
        kind, recipient, url = args
        tokens = Tokens([KEY])
        token = tokens.make(kind, queueID, recipient, url)
        self.assertRegex(token, r"^[A-Za-z0-9_-]+$")
        self.assertEqual(tokens.read(kind, token), TokenData(queueID, recipient, None, url))
        self.assertEqual(token, Tokens([KEY]).make(kind, queueID, recipient, url))

    def test_badArguments(self):
        """
        Unknown kinds, bad queue ids, a missing or unexpected url and
        recipients that are not UTF-8 text are refused.
        """
        for kind in ("v", "x"):
            self.assertRaises(ValueError, self.tokens.make, kind, QUEUE_ID, "a@b")
        self.assertRaises(ValueError, self.tokens.make, "o", "bogus", "a@b")
        self.assertRaises(ValueError, self.tokens.make, "c", QUEUE_ID, "a@b")
        self.assertRaises(ValueError, self.tokens.make, "o", QUEUE_ID, "a@b", "https://x")
        self.assertRaises(ValueError, self.tokens.make, "u", QUEUE_ID, "a@b", "https://x")
        self.assertRaises(ValueError, self.tokens.make, "o", QUEUE_ID, "\udc80")
        self.assertRaises(ValueError, self.tokens.make, "o", QUEUE_ID, b"a@b")
        self.assertRaises(ValueError, self.tokens.make, "o", QUEUE_ID, "a" * 65536)

    @given(urlTokens(), queueIDs, st.data())
    def test_oneCharacterChanged(self, args, queueID, data):
        """
        Changing any one character makes the token bad.
        """
        kind, recipient, url = args
        tokens = Tokens([KEY])
        token = tokens.make(kind, queueID, recipient, url)
        position = data.draw(st.integers(0, len(token) - 1))
        replacement = data.draw(st.characters())
        assume(replacement != token[position])
        changed = token[:position] + replacement + token[position + 1 :]
        self.assertRaises(BadToken, tokens.read, kind, changed)

    @given(urlTokens(), queueIDs, st.data())
    def test_bitFlipped(self, args, queueID, data):
        """
        Flipping any bit of the token's bytes makes it bad.
        """
        import base64

        kind, recipient, url = args
        tokens = Tokens([KEY])
        token = tokens.make(kind, queueID, recipient, url)
        raw = bytearray(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        bit = data.draw(st.integers(0, len(raw) * 8 - 1))
        raw[bit // 8] ^= 1 << (bit % 8)
        changed = base64.urlsafe_b64encode(bytes(raw)).decode().rstrip("=")
        self.assertRaises(BadToken, tokens.read, kind, changed)

    @given(urlTokens(), queueIDs, st.data())
    def test_truncatedOrExtended(self, args, queueID, data):
        """
        Cutting characters off either end, or adding any, makes it bad.
        """
        kind, recipient, url = args
        tokens = Tokens([KEY])
        token = tokens.make(kind, queueID, recipient, url)
        cut = data.draw(st.integers(1, len(token)))
        self.assertRaises(BadToken, tokens.read, kind, token[:-cut])
        self.assertRaises(BadToken, tokens.read, kind, token[cut:])
        extra = data.draw(st.text(min_size=1, max_size=10))
        self.assertRaises(BadToken, tokens.read, kind, token + extra)
        self.assertRaises(BadToken, tokens.read, kind, extra + token)

    @given(recipients, queueIDs, urls)
    def test_otherKind(self, recipient, queueID, url):
        """
        A token of one kind is never accepted as another.
        """
        tokens = Tokens([KEY])
        made = {
            "o": tokens.make("o", queueID, recipient),
            "u": tokens.make("u", queueID, recipient),
            "c": tokens.make("c", queueID, recipient, url),
        }
        for kind, token in made.items():
            for other in URL_KINDS:
                if other != kind:
                    self.assertRaises(BadToken, tokens.read, other, token)

    @given(st.text(max_size=200))
    def test_garbage(self, text):
        """
        Arbitrary text is a bad token, never another exception.
        """
        for kind in URL_KINDS:
            self.assertRaises(BadToken, self.tokens.read, kind, text)

    def test_badTokenIsValueError(self):
        """
        L{BadToken} is a L{ValueError}.
        """
        self.assertTrue(issubclass(BadToken, ValueError))

    def test_pickle(self):
        """
        L{Tokens} survive pickling (they go to the re-wrap worker
        processes) with every key: the copy seals the same tokens and opens
        the old key's.
        """
        tokens = Tokens([OTHER, KEY])
        copy = pickle.loads(pickle.dumps(tokens))
        token = tokens.make("c", QUEUE_ID, ALICE, OFFER)
        self.assertEqual(copy.make("c", QUEUE_ID, ALICE, OFFER), token)
        self.assertEqual(copy.read("c", token).url, OFFER)
        self.assertEqual(copy.read("c", SEALED_CLICK).recipient, ALICE)
        self.assertEqual(copy.read("c", SIGNED_CLICK).recipient, ALICE)
        self.assertEqual(copy.compact("v", QUEUE_ID, 3), tokens.compact("v", QUEUE_ID, 3))


class SignedURLTokenTests(TokensTestMixin, SynchronousTestCase):
    """
    L{Tokens.read} still reads URL tokens in the signed form made before
    they were encrypted, for as long as their key is kept.
    """

    def test_madeByOldCode(self):
        """
        Tokens the old code made, copied from its output, read back.
        """
        self.assertEqual(
            self.tokens.read("c", SIGNED_CLICK), TokenData(QUEUE_ID, ALICE, None, OFFER)
        )
        self.assertEqual(
            self.tokens.read("o", SIGNED_OPEN), TokenData(QUEUE_ID, ALICE, None, None)
        )
        self.assertEqual(
            self.tokens.read("u", SIGNED_UNSUBSCRIBE), TokenData(QUEUE_ID, ALICE, None, None)
        )

    def test_builder(self):
        """
        L{signedToken} builds the old form exactly (checked against the
        old code's output), so the properties below test that form.
        """
        self.assertEqual(signedToken(KEY, "c", QUEUE_ID, ALICE, OFFER), SIGNED_CLICK)
        self.assertEqual(signedToken(KEY, "o", QUEUE_ID, ALICE), SIGNED_OPEN)
        self.assertEqual(signedToken(KEY, "u", QUEUE_ID, ALICE), SIGNED_UNSUBSCRIBE)

    @given(urlTokens(), queueIDs)
    def test_roundTrip(self, args, queueID):
        """
        Every signed token reads back as what it carries.
        """
        kind, recipient, url = args
        token = signedToken(KEY, kind, queueID, recipient, url)
        self.assertEqual(Tokens([KEY]).read(kind, token), TokenData(queueID, recipient, None, url))

    @given(urlTokens(), queueIDs, st.data())
    def test_tampered(self, args, queueID, data):
        """
        Flipping any bit, or cutting bytes off either end, makes a signed
        token bad.
        """
        kind, recipient, url = args
        tokens = Tokens([KEY])
        raw = bytearray(tokenBytes(signedToken(KEY, kind, queueID, recipient, url)))
        cut = data.draw(st.integers(1, len(raw)))
        self.assertRaises(BadToken, tokens.read, kind, tokenText(bytes(raw[:-cut])))
        self.assertRaises(BadToken, tokens.read, kind, tokenText(bytes(raw[cut:])))
        bit = data.draw(st.integers(0, len(raw) * 8 - 1))
        raw[bit // 8] ^= 1 << (bit % 8)
        self.assertRaises(BadToken, tokens.read, kind, tokenText(bytes(raw)))

    def test_otherKind(self):
        """
        A signed token of one kind is not accepted as another.
        """
        made = {"c": SIGNED_CLICK, "o": SIGNED_OPEN, "u": SIGNED_UNSUBSCRIBE}
        for kind, token in made.items():
            for other in URL_KINDS:
                if other != kind:
                    self.assertRaises(BadToken, self.tokens.read, other, token)

    def test_rotation(self):
        """
        Signed tokens read while their key is among the keys, in any
        place; once it is removed they fail.
        """
        self.assertEqual(Tokens([OTHER, KEY]).read("c", SIGNED_CLICK).url, OFFER)
        self.assertRaises(BadToken, Tokens([OTHER]).read, "c", SIGNED_CLICK)
        self.assertRaises(BadToken, Tokens([OTHER]).read, "o", SIGNED_OPEN)

    def test_derivedKeyOnlySeals(self):
        """
        A token signed with the sealing key derived from the token key is
        bad: the derived key is for encryption only.
        """
        forged = signedToken(urlKey(KEY), "c", QUEUE_ID, ALICE, OFFER)
        self.assertRaises(BadToken, self.tokens.read, "c", forged)


class RotationTests(SynchronousTestCase):
    """
    Tests for several keys.
    """

    @given(keys, keys, queueIDs, indexes)
    def test_oldKeyVerifies(self, old, new, queueID, index):
        """
        Tokens signed with an old key verify after a new key is added in
        front; new tokens are signed with the new key.
        """
        assume(old != new)
        before = Tokens([old])
        compact = before.compact("v", queueID, index)
        url = before.make("c", queueID, "a@example.com", "https://example.com/")
        after = Tokens([new, old])
        self.assertEqual(after.readCompact("v", compact), (queueID, index))
        self.assertEqual(after.read("c", url).url, "https://example.com/")
        self.assertEqual(
            after.compact("v", queueID, index), Tokens([new]).compact("v", queueID, index)
        )
        self.assertRaises(
            BadToken, Tokens([old]).readCompact, "v", after.compact("v", queueID, index)
        )

    @given(keys, keys, queueIDs, indexes)
    def test_removedKey(self, old, new, queueID, index):
        """
        Once a key is removed, its tokens fail.
        """
        assume(old != new)
        before = Tokens([old])
        compact = before.compact("u", queueID, index)
        url = before.make("o", queueID, "a@example.com")
        self.assertRaises(BadToken, Tokens([new]).readCompact, "u", compact)
        self.assertRaises(BadToken, Tokens([new]).read, "o", url)

    def test_sameKeyID(self):
        """
        Keys that share a key id are each tried.
        """
        first = b"a" * 16
        others = (bytes([n]) * 16 for n in range(1, 256))
        second = next(k for k in others if keyID(k) == keyID(first) and k != first)
        token = Tokens([first]).compact("v", QUEUE_ID, 5)
        self.assertEqual(Tokens([second, first]).readCompact("v", token), (QUEUE_ID, 5))

    def test_sameURLKeyID(self):
        """
        Keys that share the 4 bits of key id a URL token carries are each
        tried; a key that does not seal it never opens it.
        """
        first = b"a" * 16
        others = (bytes([n]) * 16 for n in range(1, 256))
        second = next(
            k for k in others if keyID(k) & 0x0F == keyID(first) & 0x0F and k != first
        )
        token = Tokens([first]).make("c", QUEUE_ID, ALICE, OFFER)
        self.assertEqual(Tokens([second, first]).read("c", token).url, OFFER)
        self.assertEqual(Tokens([first, second]).read("c", token).url, OFFER)
        self.assertRaises(BadToken, Tokens([second]).read, "c", token)

    def test_badKeys(self):
        """
        No keys, short keys and keys that are not bytes are refused.
        """
        self.assertRaises(ValueError, Tokens, [])
        self.assertRaises(ValueError, Tokens, [b"x" * 15])
        self.assertRaises(ValueError, Tokens, [KEY, b"x" * 15])
        self.assertRaises(ValueError, Tokens, ["x" * 32])

    def test_reprHidesKeys(self):
        """
        The repr does not show the keys.
        """
        self.assertNotIn("kkkk", repr(Tokens([KEY])))


class LoadTests(SynchronousTestCase):
    """
    Tests for L{Tokens.load}.
    """

    def setUp(self):
        self.directory = self.mktemp()
        os.makedirs(self.directory)
        self.path = os.path.join(self.directory, "token-keys")

    def test_creates(self):
        """
        Without secrets and without the file, the file is created 0600
        with one 32-byte key, and a second load uses it.
        """
        first = Tokens.load((), self.path)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        with open(self.path) as f:
            text = f.read()
        self.assertRegex(text, r"^[0-9a-f]{64}\n$")
        key = bytes.fromhex(text.strip())
        token = first.compact("v", QUEUE_ID, 1)
        self.assertEqual(token, Tokens([key]).compact("v", QUEUE_ID, 1))
        second = Tokens.load((), self.path)
        self.assertEqual(second.compact("v", QUEUE_ID, 1), token)
        self.assertEqual(os.listdir(self.directory), ["token-keys"])

    def test_createsDirectory(self):
        """
        A missing directory is created too.
        """
        path = os.path.join(self.directory, "a", "b", "token-keys")
        Tokens.load((), path)
        self.assertTrue(os.path.exists(path))

    def test_fresh(self):
        """
        Each new file gets its own random key.
        """
        other = os.path.join(self.directory, "other")
        self.assertNotEqual(
            Tokens.load((), self.path).compact("v", QUEUE_ID, 1),
            Tokens.load((), other).compact("v", QUEUE_ID, 1),
        )

    def test_readsSeveral(self):
        """
        Every key in the file verifies; the first signs; blank lines and
        surrounding spaces are ignored.
        """
        with open(self.path, "w") as f:
            f.write(f"{OTHER.hex()}\n\n  {KEY.hex().upper()}  \n")
        tokens = Tokens.load([], self.path)
        old = Tokens([KEY]).compact("v", QUEUE_ID, 2)
        self.assertEqual(tokens.readCompact("v", old), (QUEUE_ID, 2))
        self.assertEqual(
            tokens.compact("v", QUEUE_ID, 2), Tokens([OTHER]).compact("v", QUEUE_ID, 2)
        )

    def test_secretsOverride(self):
        """
        With secrets the file is neither read nor created; keys are derived
        from the secrets, the first signing.
        """
        secrets = ["a-long-enough-secret-1", "another-long-secret-2"]
        tokens = Tokens.load(secrets, self.path)
        self.assertFalse(os.path.exists(self.path))
        expected = Tokens([deriveKey(s) for s in secrets])
        self.assertEqual(tokens.compact("v", QUEUE_ID, 3), expected.compact("v", QUEUE_ID, 3))
        old = Tokens([deriveKey(secrets[1])]).make("o", QUEUE_ID, "a@b")
        self.assertEqual(tokens.read("o", old).recipient, "a@b")
        with open(self.path, "w") as f:
            f.write("garbage\n")
        self.assertEqual(
            Tokens.load(secrets, self.path).compact("v", QUEUE_ID, 3),
            expected.compact("v", QUEUE_ID, 3),
        )

    def test_deriveKey(self):
        """
        Derived keys are 32 bytes, stable, and differ between secrets.
        """
        self.assertEqual(len(deriveKey("x" * 16)), 32)
        self.assertEqual(deriveKey("x" * 16), deriveKey("x" * 16))
        self.assertNotEqual(deriveKey("x" * 16), deriveKey("y" * 16))
        self.assertNotEqual(deriveKey("é" * 16), deriveKey("e" * 16))

    def assertDamaged(self, content: bytes, reason: str):
        with open(self.path, "wb") as f:
            f.write(content)
        error = self.assertRaises(ValueError, Tokens.load, (), self.path)
        self.assertNotIn("\n", str(error))
        self.assertIn(repr(self.path), str(error))
        self.assertRegex(str(error), reason)

    def test_damaged(self):
        """
        A damaged file is a L{ValueError} with a one-line reason.
        """
        self.assertDamaged(b"", "holds no key")
        self.assertDamaged(b"\n \n", "holds no key")
        self.assertDamaged(b"xyz\n", "line 1 is not a hex key")
        self.assertDamaged(KEY.hex().encode() + b"\nabc\n", "line 2 is not a hex key")
        self.assertDamaged(b"00" * 15 + b"\n", "line 1 is shorter than 16 bytes")
        self.assertDamaged(b"\xff\xfe\n", "not hex text")

    def test_unreadable(self):
        """
        A key file that cannot be read is a L{ValueError} too.
        """
        os.mkdir(self.path)
        error = self.assertRaises(ValueError, Tokens.load, (), self.path)
        self.assertRegex(str(error), r"^cannot read the token key file")

    def test_cannotCreate(self):
        """
        A key file that cannot be created is a L{ValueError}.
        """
        blocker = os.path.join(self.directory, "file")
        open(blocker, "w").close()
        error = self.assertRaises(
            ValueError, Tokens.load, (), os.path.join(blocker, "token-keys")
        )
        self.assertRegex(str(error), r"^cannot (read|create) the token key file")
        self.assertNotIn("\n", str(error))


class QueueIDStrategyTests(SynchronousTestCase):
    """
    The queue ids the tests use are valid.
    """

    @given(queueIDs)
    def test_valid(self, queueID):
        self.assertTrue(isQueueID(queueID))
        self.assertTrue(re.fullmatch(r"[0-9A-F]{2}/[0-9A-F]{2}-[0-9]{5}-[0-9A-F]{8}", queueID))


class CompactEncodingTests(SynchronousTestCase):
    """
    The compact tokens' base32 is RFC 4648's, lower case, unpadded.
    """

    @given(st.binary(max_size=64))
    def test_asBase64Module(self, data):
        """
        L{_encodeCompact} gives what C{base64.b32encode} gives, and
        L{_decodeCompact} reads back a token's worth of it.
        """
        import base64

        from smartrelay.tokens import _decodeCompact, _encodeCompact

        text = _encodeCompact(data)
        self.assertEqual(text, base64.b32encode(data).decode("ascii").rstrip("=").lower())
        token = (data * 23)[:23]
        if token:
            self.assertEqual(_decodeCompact(_encodeCompact(token)), token)
