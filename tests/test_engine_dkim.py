"""
Tests for L{smartrelay.engine.dkim}: signatures that dkimpy and Debian's
Mail::DKIM (an independent implementation) accept, the header list, line
endings, and the hook into dkimpy's internals.
"""

import base64
import os
import shutil
import subprocess
import threading
import types
from typing import Dict, List, Optional

import dkim
from dkim import canonicalization
from hypothesis import given, settings
from hypothesis import strategies as st
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from smartrelay.engine import dkim as engine
from smartrelay.engine.dkim import (
    OVERSIGNED_HEADERS,
    SIGNED_HEADERS,
    DKIMKey,
    DKIMSigner,
    generateKey,
    txtRecordStrings,
)

NOW = 1700000000

# Made once: RSA key generation takes a while.
RSA_PEM, RSA_TXT = generateKey("rsa-sha256", 2048)
ED_PEM, ED_TXT = generateKey("ed25519-sha256")
OTHER_PEM, OTHER_TXT = generateKey("rsa-sha256", 1024)

MESSAGE = (
    b"Received: from app.test ([127.0.0.1])\r\n\tby relay.test (smartrelay)\r\n"
    b"From: Shop <news@Shop.Example>\r\n"
    b"To: a@example.com\r\n"
    b"Subject: Spring sale\r\n"
    b"Date: Tue, 14 Nov 2023 22:13:20 +0000\r\n"
    b"Message-ID: <1@relay.test>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"List-Unsubscribe: <https://t.example/u/abc>,\r\n <mailto:u@bounces.test>\r\n"
    b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
    b"Feedback-ID: spring:shop.example:smartrelay\r\n"
    b"X-Mailer: app\r\n"
    b"\r\n"
    b"Hello  there,\r\n\r\nbig   sale \xe2\x80\x94 \xc3\xa9t\xc3\xa9 \xff\r\n\r\n\r\n"
)


def rsaKey(domain: str = "shop.example", selector: str = "s1") -> DKIMKey:
    return DKIMKey(domain, selector, "rsa-sha256", RSA_PEM)


def edKey(domain: str = "shop.example", selector: str = "e1") -> DKIMKey:
    return DKIMKey(domain, selector, "ed25519-sha256", ED_PEM)


def dnsFor(records: Dict[str, str]):
    """
    A dkimpy C{dnsfunc} serving C{records} (name without a final dot: TXT).
    """
    table = {name.lower() + ".": txt.encode("ascii") for name, txt in records.items()}

    def dnsfunc(name: bytes, timeout: int = 5) -> Optional[bytes]:
        return table.get(name.decode("ascii").lower())

    return dnsfunc


DNS = dnsFor({
    "s1._domainkey.shop.example": RSA_TXT,
    "e1._domainkey.shop.example": ED_TXT,
    "s2._domainkey.other.example": OTHER_TXT,
})


def signer(*keys: DKIMKey) -> DKIMSigner:
    return DKIMSigner(keys or (rsaKey(),), clock=lambda: NOW)


def verifyAt(message: bytes, index: int = 0, dnsfunc=DNS) -> bool:
    """
    Whether dkimpy verifies the C{index}th (from the top) DKIM signature.
    """
    return dkim.DKIM(message).verify(idx=index, dnsfunc=dnsfunc)


def signatureFields(message: bytes, index: int = 0) -> Dict[bytes, bytes]:
    """
    The tags of C{message}'s C{index}th C{DKIM-Signature}.
    """
    headers, _ = dkim.rfc822_parse(message)
    values = [v for n, v in headers if n.lower() == b"dkim-signature"]
    return dkim.util.parse_tag_value(values[index])


def signedHeaders(message: bytes, index: int = 0) -> List[str]:
    h = signatureFields(message, index)[b"h"]
    return [name.strip().decode("ascii") for name in h.split(b":")]


class _FakeNaCl:
    """
    Just enough of PyNaCl, made with C{cryptography}, for dkimpy to verify
    Ed25519 signatures when PyNaCl is not installed.
    """

    class _BadSignature(Exception):
        pass

    def __init__(self):
        fake = self

        class VerifyKey:
            def __init__(self, key, encoder=None):
                self._key = ed25519.Ed25519PublicKey.from_public_bytes(base64.b64decode(key))

            def verify(self, data, signature):
                try:
                    self._key.verify(signature, data)
                except InvalidSignature:
                    raise fake._BadSignature() from None
                return data

        self.signing = types.SimpleNamespace(VerifyKey=VerifyKey)
        self.encoding = types.SimpleNamespace(Base64Encoder=object())
        self.exceptions = types.SimpleNamespace(
            BadSignatureError=self._BadSignature, ValueError=ValueError)


class SignTests(SynchronousTestCase):
    """
    Tests for L{DKIMSigner.sign}, checked with dkimpy's own verifier.
    """

    def test_rsaVerifies(self):
        """
        An RSA-2048 relaxed/relaxed signature over the From domain is
        prepended; dkimpy's C{dkim.verify} accepts it.
        """
        signed = signer().sign(MESSAGE)
        self.assertTrue(signed.startswith(b"DKIM-Signature: v=1; a=rsa-sha256; "))
        self.assertTrue(signed.endswith(MESSAGE))
        self.assertTrue(dkim.verify(signed, dnsfunc=DNS))
        fields = signatureFields(signed)
        self.assertEqual(fields[b"c"], b"relaxed/relaxed")
        self.assertEqual(fields[b"d"], b"shop.example")
        self.assertEqual(fields[b"s"], b"s1")
        self.assertEqual(fields[b"t"], str(NOW).encode())
        self.assertNotIn(b"l", fields)

    def test_ed25519VerifiesWithPyNaCl(self):
        """
        An Ed25519 signature (RFC 8463) verifies with dkimpy and PyNaCl.
        """
        if getattr(dkim, "nacl", None) is None:
            raise SkipTest("PyNaCl is not installed; dkimpy needs it for Ed25519 "
                           "(test_ed25519Verifies covers this with a stand-in)")
        signed = signer(edKey()).sign(MESSAGE)
        self.assertTrue(signed.startswith(b"DKIM-Signature: v=1; a=ed25519-sha256; "))
        self.assertTrue(dkim.verify(signed, dnsfunc=DNS))

    def test_ed25519Verifies(self):
        """
        An Ed25519 signature verifies with dkimpy, its primitive given by a
        stand-in for PyNaCl made with C{cryptography}; a tampered one does not.
        """
        self.patch(dkim, "nacl", _FakeNaCl(), )
        signed = signer(edKey()).sign(MESSAGE)
        self.assertTrue(dkim.verify(signed, dnsfunc=DNS))
        self.assertFalse(dkim.verify(signed.replace(b"big", b"bog"), dnsfunc=DNS))

    def test_matchesDkimpy(self):
        """
        RSA signatures are deterministic: the header is byte for byte what
        plain C{dkim.sign} makes with the same key, header list and time.
        """
        self.patch(dkim, "time", types.SimpleNamespace(time=lambda: NOW))
        signed = signer().sign(MESSAGE)
        include = DKIMSigner.includeHeaders(dkim.rfc822_parse(MESSAGE)[0])
        expected = dkim.sign(MESSAGE, b"s1", b"shop.example", RSA_PEM,
                             canonicalize=(b"relaxed", b"relaxed"), include_headers=include)
        self.assertEqual(signed, expected + MESSAGE)

    def test_bothAlgorithms(self):
        """
        A domain with an RSA and an Ed25519 key gets two signatures, RSA on
        top whatever the configuration order, both verifying.
        """
        self.patch(dkim, "nacl", getattr(dkim, "nacl", None) or _FakeNaCl())
        signed = signer(edKey(), rsaKey()).sign(MESSAGE)
        self.assertEqual(signed.count(b"DKIM-Signature:"), 2)
        self.assertEqual(signatureFields(signed, 0)[b"a"], b"rsa-sha256")
        self.assertEqual(signatureFields(signed, 1)[b"a"], b"ed25519-sha256")
        self.assertTrue(verifyAt(signed, 0))
        self.assertTrue(verifyAt(signed, 1))
        self.assertTrue(signed.endswith(MESSAGE))

    def test_tamperedBody(self):
        """
        Changing the body after signing breaks the signature.
        """
        signed = signer().sign(MESSAGE)
        self.assertFalse(dkim.verify(signed.replace(b"big", b"bog"), dnsfunc=DNS))

    def test_relaxed(self):
        """
        Relaxed/relaxed: header case and whitespace, refolding, and trailing
        whitespace and empty lines in the body may change in transit.
        """
        signed = signer().sign(MESSAGE)
        mangled = (signed.replace(b"Subject: Spring sale", b"SUBJECT:   Spring \t sale")
                   .replace(b"Hello  there,", b"Hello there,  ")
                   .replace(b"To: a@example.com", b"To:\r\n\ta@example.com"))
        mangled = mangled[:-2] + b"\r\n\r\n\r\n"
        self.assertTrue(dkim.verify(mangled, dnsfunc=DNS))
        self.assertFalse(dkim.verify(signed.replace(b"Spring sale", b"Springsale"),
                                     dnsfunc=DNS))

    def test_signedHeaders(self):
        """
        The fields of L{SIGNED_HEADERS} present are signed, in message order;
        others (Received, X-Mailer) are not; From and Subject once more.
        """
        signed = signer().sign(MESSAGE)
        self.assertEqual(signedHeaders(signed), [
            "from", "to", "subject", "date", "message-id", "mime-version",
            "content-type", "content-transfer-encoding", "list-unsubscribe",
            "list-unsubscribe-post", "feedback-id", "from", "subject",
        ])
        self.assertEqual(OVERSIGNED_HEADERS, ("From", "Subject"))
        for name in ["From", "To", "Cc", "Subject", "Date", "Message-ID", "Reply-To",
                     "In-Reply-To", "References", "MIME-Version", "Content-Type",
                     "Content-Transfer-Encoding", "List-Unsubscribe",
                     "List-Unsubscribe-Post", "Feedback-ID", "Sender"]:
            self.assertIn(name, SIGNED_HEADERS)

    def test_listUnsubscribeCovered(self):
        """
        Changing List-Unsubscribe or List-Unsubscribe-Post breaks the signature.
        """
        signed = signer().sign(MESSAGE)
        for old, new in [(b"t.example/u/abc", b"t.example/u/abd"),
                         (b"List-Unsubscribe=One-Click", b"List-Unsubscribe=Two-Click")]:
            self.assertTrue(dkim.verify(signed, dnsfunc=DNS))
            self.assertFalse(dkim.verify(signed.replace(old, new), dnsfunc=DNS), new)

    def test_overSigned(self):
        """
        A second Subject or From added after signing breaks the signature, and
        so does a Subject added to a message signed without one.
        """
        signed = signer().sign(MESSAGE)
        body = signed.index(b"\r\n\r\n") + 2
        for extra in [b"Subject: Pay now\r\n", b"From: ceo@shop.example\r\n"]:
            for added in [signed[:body] + extra + signed[body:],
                          signed.replace(b"To: a@", extra + b"To: a@")]:
                self.assertFalse(dkim.verify(added, dnsfunc=DNS), added)
        noSubject = MESSAGE.replace(b"Subject: Spring sale\r\n", b"")
        signed = signer().sign(noSubject)
        self.assertTrue(dkim.verify(signed, dnsfunc=DNS))
        self.assertEqual(signedHeaders(signed)[-2:], ["from", "subject"])
        body = signed.index(b"\r\n\r\n") + 2
        added = signed[:body] + b"Subject: Pay now\r\n" + signed[body:]
        self.assertFalse(dkim.verify(added, dnsfunc=DNS))

    def test_unsignedHeaderMayChange(self):
        """
        Fields not signed (here X-Mailer, Received) may change or be added.
        """
        signed = signer().sign(MESSAGE)
        changed = b"Received: by mx\r\n" + signed.replace(b"X-Mailer: app", b"X-Mailer: b")
        self.assertTrue(dkim.verify(changed, dnsfunc=DNS))

    def test_lfLineEnds(self):
        """
        A message with LF line ends is signed and returned with CRLF: what is
        signed is what SMTP sends.
        """
        lf = MESSAGE.replace(b"\r\n", b"\n")
        signed = signer().sign(lf)
        self.assertNotRegex(signed, rb"(?<!\r)\n")
        self.assertTrue(signed.endswith(MESSAGE))
        self.assertEqual(signed, signer().sign(MESSAGE))
        self.assertTrue(dkim.verify(signed, dnsfunc=DNS))

    def test_mixedLineEnds(self):
        """
        A message with both kinds of line ends comes out all CRLF.
        """
        mixed = MESSAGE.replace(b"To: a@example.com\r\n", b"To: a@example.com\n")
        signed = signer().sign(mixed)
        self.assertTrue(signed.endswith(MESSAGE))
        self.assertTrue(dkim.verify(signed, dnsfunc=DNS))

    def test_crlfUnchanged(self):
        """
        A CRLF message is returned as it was, after the signature.
        """
        signed = signer().sign(MESSAGE)
        self.assertEqual(signed[signed.index(b"Received:"):], MESSAGE)

    def test_eightBitBody(self):
        """
        A body with 8-bit octets (even invalid UTF-8) signs and verifies;
        changing one octet breaks it.
        """
        signed = signer().sign(MESSAGE)
        self.assertIn(b"\xff", signed)
        self.assertTrue(dkim.verify(signed, dnsfunc=DNS))
        self.assertFalse(dkim.verify(signed.replace(b"\xff", b"\xfe"), dnsfunc=DNS))

    def test_eightBitHeader(self):
        """
        A UTF-8 Subject (SMTPUTF8) signs and verifies.
        """
        message = MESSAGE.replace(b"Spring sale", "Soldes d'\u00e9t\u00e9".encode())
        self.assertTrue(dkim.verify(signer().sign(message), dnsfunc=DNS))

    def test_emptyBody(self):
        """
        Messages with an empty body, or no body at all, sign and verify.
        """
        for message in [b"From: a@shop.example\r\nSubject: x\r\n\r\n",
                        b"From: a@shop.example\r\nSubject: x\r\n"]:
            signed = signer().sign(message)
            self.assertTrue(dkim.verify(signed, dnsfunc=DNS), message)
            self.assertTrue(signed.endswith(message))
            # The empty body's relaxed hash (RFC 6376 3.4.4: a lone CRLF? no: empty).
            self.assertEqual(signatureFields(signed)[b"bh"],
                             b"47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=")

    def test_givenDomain(self):
        """
        A caller that already parsed the From: domain passes it: the result
        is the same, and a domain without keys leaves the message alone.
        """
        s = signer()
        self.assertEqual(s.sign(MESSAGE, engine.fromDomain(MESSAGE)), s.sign(MESSAGE))
        self.assertEqual(s.sign(MESSAGE, "other.example"), MESSAGE)

    def test_noKey(self):
        """
        No From:, a From: without a domain, or a domain without a key
        (including a subdomain of one with keys) leaves the message alone.
        """
        s = signer()
        for message in [
            b"To: a@example.com\r\nSubject: x\r\n\r\nhi\r\n",
            b"From: nobody\r\nSubject: x\r\n\r\nhi\r\n",
            b"From: a@other.example\r\n\r\nhi\n",
            b"From: a@news.shop.example\r\n\r\nhi\r\n",
            b"From: a@shop.example.org\r\n\r\nhi\r\n",
            b"\r\nFrom: a@shop.example\r\n",
            b"",
        ]:
            self.assertIs(s.sign(message), message)
            self.assertIsNone(s.domainFor(message))

    def test_fromInBodyIgnored(self):
        """
        Only the header section's From: counts.
        """
        message = b"Subject: x\r\n\r\nFrom: a@shop.example\r\n"
        self.assertIsNone(signer().domainFor(message))
        self.assertIs(signer().sign(message), message)

    def test_domainFor(self):
        """
        L{DKIMSigner.domainFor} is the From: domain, lower-cased, when keys
        for it exist; display names, comments, folding and case do not matter.
        """
        s = signer()
        for header in [
            b"From: a@shop.example",
            b"from:A@SHOP.EXAMPLE",
            b'From: "Shop, Inc. <x@y.z>" <news@Shop.Example>',
            b"From: Shop\r\n <news@shop.example.> (the shop)",
            b"FROM : news@shop.example",
        ]:
            self.assertEqual(s.domainFor(header + b"\r\nTo: x@y.z\r\n\r\nb\r\n"), "shop.example",
                             header)
        self.assertEqual(s.domainFor(b"From: a@shop.example\nTo: b@c.d\n\nx\n"), "shop.example")

    def test_internationalFromDomain(self):
        """
        An internationalised From: domain is taken in its A-label form
        (UTS 46 / IDNA 2008: fa\u00df.de is xn--fa-hia.de, not IDNA 2003's
        fass.de), so its keys sign it whether the field was downgraded or
        not; one IDNA refuses stays as it is and matches no key.
        """
        s = DKIMSigner([rsaKey("xn--fa-hia.de")], clock=lambda: NOW)
        for header in ["From: a@fa\u00df.de", "From: a@FA\u00dF.DE", "From: a@xn--fa-hia.de"]:
            self.assertEqual(s.domainFor(header.encode("utf-8") + b"\r\n\r\nx\r\n"),
                             "xn--fa-hia.de", header)
        self.assertIsNone(s.domainFor(b"From: a@fass.de\r\n\r\nx\r\n"))
        self.assertEqual(engine.fromDomain("From: a@\u2603.net\r\n\r\n".encode("utf-8")),
                         "\u2603.net")

    def test_keyDomainCaseInsensitive(self):
        """
        A key for C{Shop.Example.} signs mail from C{shop.example}; C{d=} is
        lower case.
        """
        signed = DKIMSigner([rsaKey("Shop.Example.", "S1")], clock=lambda: NOW).sign(MESSAGE)
        self.assertEqual(signatureFields(signed)[b"d"], b"shop.example")
        self.assertTrue(dkim.verify(signed, dnsfunc=DNS))

    def test_otherDomainsKeys(self):
        """
        Each message is signed with its own From domain's keys only.
        """
        s = DKIMSigner([rsaKey(), DKIMKey("other.example", "s2", "rsa-sha256", OTHER_PEM)])
        signed = s.sign(MESSAGE.replace(b"news@Shop.Example", b"a@other.example"))
        self.assertEqual(signed.count(b"DKIM-Signature:"), 1)
        self.assertEqual(signatureFields(signed)[b"d"], b"other.example")
        self.assertTrue(dkim.verify(signed, dnsfunc=DNS))

    def test_clock(self):
        """
        C{t=} is the signer's clock, by default the time of day.
        """
        import time

        before = int(time.time())
        signed = DKIMSigner([rsaKey()]).sign(MESSAGE)
        self.assertGreaterEqual(int(signatureFields(signed)[b"t"]), before)

    def test_threads(self):
        """
        One signer used from several threads at once gives correct signatures.
        """
        s = signer(rsaKey(), edKey())
        messages = [MESSAGE.replace(b"Spring sale", b"sale %d" % i) for i in range(40)]
        results: Dict[int, bytes] = {}

        def work(start: int) -> None:
            for i in range(start, len(messages), 4):
                results[i] = s.sign(messages[i])

        threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.patch(dkim, "nacl", getattr(dkim, "nacl", None) or _FakeNaCl())
        for i, message in enumerate(messages):
            self.assertTrue(results[i].endswith(message))
            self.assertTrue(verifyAt(results[i], 0) and verifyAt(results[i], 1), i)

    def test_badMessage(self):
        """
        A header section dkimpy cannot parse raises L{dkim.DKIMException}.
        """
        self.assertRaises(dkim.DKIMException, signer().sign,
                          b"From: a@shop.example\r\n:bad\r\n\r\nx\r\n")


class KeyTests(SynchronousTestCase):
    """
    Tests for L{DKIMSigner}'s key checks and L{generateKey}.
    """

    def test_badKeys(self):
        """
        Unusable keys are refused when the signer is made, naming the key.
        """
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        ecdsa = ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption())
        small, _ = generateKey("rsa-sha256", 1024)
        for key, message in [
            (DKIMKey("a.example", "s", "rsa-sha1", RSA_PEM), "unsupported DKIM algorithm"),
            (DKIMKey("a.example", "s", "rsa-sha256", b"junk"), "not an unencrypted PEM"),
            (DKIMKey("a.example", "s", "rsa-sha256", ED_PEM), "needs an RSA key"),
            (DKIMKey("a.example", "s", "ed25519-sha256", RSA_PEM), "needs an Ed25519 key"),
            (DKIMKey("a.example", "s", "rsa-sha256", ecdsa), "needs an RSA key"),
            (DKIMKey("a example", "s", "rsa-sha256", RSA_PEM), "invalid DKIM domain"),
            (DKIMKey("a.example", "s;x", "rsa-sha256", RSA_PEM), "invalid DKIM selector"),
            (DKIMKey("\u00e9.example", "s", "rsa-sha256", RSA_PEM), "invalid DKIM domain"),
        ]:
            e = self.assertRaises(ValueError, DKIMSigner, [key])
            self.assertIn(message, str(e))
        DKIMSigner([DKIMKey("a.example", "s", "rsa-sha256", small)])

    def test_duplicateSelector(self):
        """
        Two keys with one selector and domain are refused.
        """
        e = self.assertRaises(ValueError, DKIMSigner, [rsaKey(), rsaKey("SHOP.example")])
        self.assertIn("two DKIM keys for s1._domainkey.SHOP.example", str(e))

    def test_parsedOnce(self):
        """
        PEM is parsed when the signer is made, never per message.
        """
        from cryptography.hazmat.primitives import serialization

        s = signer(rsaKey(), edKey())
        calls = []
        self.patch(serialization, "load_pem_private_key",
                   lambda *a, **k: calls.append(a))
        self.patch(dkim, "parse_pem_private_key", lambda *a, **k: calls.append(a))
        s.sign(MESSAGE)
        self.assertEqual(calls, [])

    def test_generateRSA(self):
        """
        An RSA key: PKCS#8 PEM, and a TXT value with the public key, which
        dkimpy reads as a key of the requested size.
        """
        pem, txt = generateKey("rsa-sha256", 1024)
        self.assertTrue(pem.startswith(b"-----BEGIN PRIVATE KEY-----\n"))
        self.assertTrue(txt.startswith("v=DKIM1; k=rsa; p=MI"))
        pk, keysize, ktag, _ = dkim.evaluate_pk(b"x", txt.encode())
        self.assertEqual((keysize, ktag), (1024, b"rsa"))
        self.assertEqual(len(RSA_TXT), len("v=DKIM1; k=rsa; p=") + 392)

    def test_generateEd25519(self):
        """
        An Ed25519 key: PKCS#8 PEM and the raw 32-octet public key (RFC 8463).
        """
        pem, txt = generateKey("ed25519-sha256", bits=999)
        self.assertTrue(pem.startswith(b"-----BEGIN PRIVATE KEY-----\n"))
        prefix = "v=DKIM1; k=ed25519; p="
        self.assertTrue(txt.startswith(prefix))
        self.assertEqual(len(base64.b64decode(txt[len(prefix):])), 32)

    def test_generateBad(self):
        """
        Unknown algorithms and RSA sizes out of 1024..4096 are refused.
        """
        for algorithm, bits in [("rsa-sha1", 2048), ("rsa-sha256", 512),
                                ("rsa-sha256", 8192), ("ed448", 0)]:
            self.assertRaises(ValueError, generateKey, algorithm, bits)

    def test_txtRecordStrings(self):
        """
        TXT values are cut into strings of at most 255 characters.
        """
        self.assertEqual(txtRecordStrings("a" * 600), ["a" * 255, "a" * 255, "a" * 90])
        self.assertEqual(txtRecordStrings("abc"), ["abc"])
        self.assertEqual(txtRecordStrings(""), [""])


# Text rich in what relaxed canonicalisation changes: runs of spaces and
# tabs, line ends with and without CR, trailing empty lines.
_CANON_TEXT = st.lists(
    st.sampled_from([b" ", b"  ", b"\t", b" \t ", b"\r\n", b"\n", b"\r", b"a", b"B", b"\x0b", b"\xe9"]),
    max_size=60,
).map(b"".join)


class RelaxedCanonicalizationTests(SynchronousTestCase):
    """
    The signer's own C{relaxed/relaxed} policy gives exactly what dkimpy's
    does, for any input: it only skips regular expression passes that would
    change nothing.
    """

    @settings(max_examples=500)
    @given(_CANON_TEXT)
    def test_body(self, body):
        self.assertEqual(
            engine._RELAXED.canonicalize_body(body),
            canonicalization.Relaxed.canonicalize_body(body),
        )

    @settings(max_examples=500)
    @given(st.lists(st.tuples(_CANON_TEXT, _CANON_TEXT), max_size=5))
    def test_headers(self, headers):
        self.assertEqual(
            engine._RELAXED.canonicalize_headers(headers),
            canonicalization.Relaxed.canonicalize_headers(headers),
        )

    def test_cValue(self):
        self.assertEqual(engine._RELAXED.to_c_value(), b"relaxed/relaxed")


class DkimpyHookTests(SynchronousTestCase):
    """
    Pin the dkimpy internals that L{smartrelay.engine.dkim} relies on, so an
    upgrade that changes them fails here rather than signing wrongly.
    """

    def test_genHeaderUsesPrimitive(self):
        """
        C{gen_header} signs through the key's C{sign(digest).signature}, and
        if it ever stops doing so, signing fails loudly.
        """
        def noSign(self, fields, *args, **kwargs):
            return b"x=1; b=\r\n"

        self.patch(dkim.DomainSigner, "gen_header", noSign)
        e = self.assertRaises(dkim.InternalError, signer().sign, MESSAGE)
        self.assertIn("did not use the signing hook", str(e))

    def test_internalsPresent(self):
        """
        The names used exist with the expected shapes.
        """
        import inspect

        self.assertEqual(
            list(inspect.signature(dkim.DomainSigner.gen_header).parameters),
            ["self", "fields", "include_headers", "canon_policy", "header_name", "pk",
             "standardize"])
        self.assertIn(b"rsa-sha256", dkim.HASH_ALGORITHMS)
        self.assertIn(b"ed25519-sha256", dkim.HASH_ALGORITHMS)
        self.assertTrue(issubclass(engine._FastDKIM, dkim.DKIM))
        source = inspect.getsource(dkim.DomainSigner.gen_header)
        self.assertIn("pk.sign(h.digest())", source)
        self.assertIn(".signature", source)

    def test_primitiveRefusesNonDigest(self):
        """
        The primitive only signs SHA-256 digests.
        """
        primitive = engine._Primitive(rsaKey())
        self.assertRaises(dkim.InternalError, primitive.sign, b"x" * 31)


class SelfTestTests(SynchronousTestCase):
    """
    L{DKIMSigner.selfTest}: at start-up, every key signs a test message
    that dkimpy's own verifier checks against the key's public half.
    """

    def test_passes(self):
        """RSA, Ed25519 and both together, for several domains, pass."""
        DKIMSigner([rsaKey(), edKey(), DKIMKey("other.example", "s2", "rsa-sha256", OTHER_PEM),
                    edKey("ed.example", "e2")]).selfTest()

    def test_passesWithoutPyNaCl(self):
        """
        Without PyNaCl (which dkimpy needs for Ed25519 and the relay does
        not), Ed25519 keys are checked all the same, and dkimpy is left as
        it was.
        """
        saved = getattr(dkim, "nacl", None)
        if saved is not None:
            del dkim.nacl
            self.addCleanup(setattr, dkim, "nacl", saved)
        DKIMSigner([edKey()]).selfTest()
        self.assertFalse(hasattr(dkim, "nacl"))
        # And dkimpy alone cannot verify it: the stand-in was needed.
        self.assertRaises(dkim.DKIMException, verifyAt, signer(edKey()).sign(MESSAGE))

    def test_hookNotUsed(self):
        """
        A dkimpy whose C{gen_header} no longer signs through the hook fails
        the self-test, in one line naming the domain and dkimpy's version.
        """
        def noSign(self, fields, *args, **kwargs):
            return b"x=1; b=\r\n"

        self.patch(dkim.DomainSigner, "gen_header", noSign)
        e = self.assertRaises(engine.SelfTestError, signer().selfTest)
        self.assertEqual(e.domain, "shop.example")
        self.assertEqual(str(e).count("\n"), 0)
        self.assertTrue(str(e).startswith(
            "DKIM self-test for shop.example failed: signing a test message raised "
            "InternalError: dkimpy's gen_header did not use the signing hook (dkimpy 1."), str(e))
        self.assertTrue(str(e).endswith("; smartrelay supports dkimpy 1.1)"), str(e))

    def test_internalsMoved(self):
        """An unexpected exception from dkimpy's internals fails it too."""
        def moved(self, *args, **kwargs):
            raise AttributeError("'DKIM' object has no attribute 'hasher'")

        self.patch(dkim.DomainSigner, "gen_header", moved)
        e = self.assertRaises(engine.SelfTestError, signer(rsaKey(), edKey()).selfTest)
        self.assertIn("raised AttributeError: 'DKIM' object has no attribute 'hasher'", str(e))

    def test_badSignature(self):
        """
        A signature that does not verify (the primitive signs the wrong
        thing) fails it, naming the key.
        """
        original = engine._Primitive.sign
        self.patch(engine._Primitive, "sign",
                   lambda self, digest: original(self, bytes(32)))
        e = self.assertRaises(engine.SelfTestError, signer(rsaKey(), edKey()).selfTest)
        self.assertIn("the test signature of s1._domainkey.shop.example (rsa-sha256) "
                      "does not verify", str(e))

    def test_badEd25519Signature(self):
        """The Ed25519 signature is checked on its own, also when the RSA one is fine."""
        original = engine._Primitive.sign

        def sign(self, digest):
            if self.algorithm == b"ed25519-sha256":
                digest = bytes(32)
            return original(self, digest)

        self.patch(engine._Primitive, "sign", sign)
        e = self.assertRaises(engine.SelfTestError, signer(rsaKey(), edKey()).selfTest)
        self.assertIn("e1._domainkey.shop.example (ed25519-sha256) does not verify", str(e))

    def test_missingSignature(self):
        """A signer that leaves a key out fails it."""
        s = signer(rsaKey(), edKey())
        # Two keys, but only one signature made.
        self.patch(s, "sign", signer(rsaKey()).sign)
        e = self.assertRaises(engine.SelfTestError, s.selfTest)
        self.assertIn("the test message got 1 signatures for 2 keys", str(e))

    def test_verifierRaises(self):
        """A verifier that raises fails it, naming the key and the error."""
        def verify(self, idx=0, dnsfunc=None):
            raise dkim.KeyFormatError("could not parse RSA public key")

        self.patch(dkim.DKIM, "verify", verify)
        e = self.assertRaises(engine.SelfTestError, signer().selfTest)
        self.assertIn("verifying the test signature of s1._domainkey.shop.example (rsa-sha256) "
                      "raised KeyFormatError: could not parse RSA public key", str(e))


_PERL_VERIFY = r"""
use strict;
use warnings;
use Mail::DKIM::Verifier;
use Mail::DKIM::PublicKey;

# Arguments: NAME TXT NAME TXT ...: the only DNS there is.
my %records = @ARGV;
%records = map { lc($_) => $records{$_} } keys %records;
{
    no warnings 'redefine';
    *Mail::DKIM::PublicKey::fetch_async = sub {
        my ($class, %prms) = @_;
        my $on_success = ($prms{Callbacks} || {})->{Success} || sub { $_[0] };
        my $name = lc("$prms{Selector}._domainkey.$prms{Domain}");
        my $txt = $records{$name};
        my $result;
        if (defined $txt) {
            my $key = $class->parse($txt);
            $key->{Selector} = $prms{Selector};
            $key->{Domain} = $prms{Domain};
            $key->check;
            $result = $on_success->($key);
        } else {
            $result = $on_success->();
        }
        return sub { $result };
    };
}
binmode STDIN;
my $dkim = Mail::DKIM::Verifier->new();
while (<STDIN>) {
    s/\015?\012\z/\015\012/;
    $dkim->PRINT($_);
}
$dkim->CLOSE;
print $dkim->result, "\n";
foreach my $signature ($dkim->signatures) {
    print $signature->algorithm, " ", $signature->result, "\n";
}
"""


class MailDKIMTests(SynchronousTestCase):
    """
    Debian's Mail::DKIM (Perl; C{apt-get install libmail-dkim-perl}), an
    implementation independent of dkimpy, verifies our signatures.
    """

    def setUp(self):
        if shutil.which("perl") is None:
            raise SkipTest("perl is not installed")
        check = subprocess.run(["perl", "-MMail::DKIM::Verifier", "-e", "1"],
                               capture_output=True)
        if check.returncode != 0:
            self.fail("Mail::DKIM is missing: apt-get install libmail-dkim-perl "
                      "(test.sh does this)")

    def perlVerify(self, message: bytes) -> List[str]:
        """
        Mail::DKIM's overall result, then one "algorithm result" line
        per signature.
        """
        records = ["s1._domainkey.shop.example", RSA_TXT,
                   "s2._domainkey.other.example", OTHER_TXT,
                   "e1._domainkey.shop.example", ED_TXT]
        run = subprocess.run(["perl", "-e", _PERL_VERIFY] + records, input=message,
                             capture_output=True, timeout=60, env=dict(os.environ, LC_ALL="C"))
        self.assertEqual(run.returncode, 0, run.stderr)
        return run.stdout.decode("utf-8").splitlines()

    def test_rsaPasses(self):
        """
        Mail::DKIM passes our RSA-2048 signature, on the 8-bit test message
        with folded List-Unsubscribe.
        """
        self.assertEqual(self.perlVerify(signer().sign(MESSAGE)),
                         ["pass", "rsa-sha256 pass"])

    def test_rsaLFAndEmptyBody(self):
        """
        Mail::DKIM passes signatures of LF-only and empty-bodied messages.
        """
        for message in [MESSAGE.replace(b"\r\n", b"\n"),
                        b"From: a@shop.example\r\nSubject: x\r\n\r\n"]:
            self.assertEqual(self.perlVerify(signer().sign(message))[0], "pass", message)

    def test_rsa1024OtherDomain(self):
        """
        Another domain's 1024-bit key passes too.
        """
        s = DKIMSigner([DKIMKey("other.example", "s2", "rsa-sha256", OTHER_PEM)])
        signed = s.sign(MESSAGE.replace(b"news@Shop.Example", b"a@other.example"))
        self.assertEqual(self.perlVerify(signed)[0], "pass")

    def test_tamperedFails(self):
        """
        Mail::DKIM fails a tampered body and an added Subject.
        """
        signed = signer().sign(MESSAGE)
        self.assertEqual(self.perlVerify(signed.replace(b"big", b"bog"))[0], "fail")
        body = signed.index(b"\r\n\r\n") + 2
        added = signed[:body] + b"Subject: Pay now\r\n" + signed[body:]
        self.assertEqual(self.perlVerify(added)[0], "fail")

    def test_bothAlgorithms(self):
        """
        With RSA and Ed25519 signatures, Mail::DKIM passes the RSA one; this
        version of Mail::DKIM (Debian 12) does not know Ed25519, so that one
        is at worst "invalid" (unsupported), never "fail".
        """
        lines = self.perlVerify(signer(rsaKey(), edKey()).sign(MESSAGE))
        self.assertEqual(lines[0], "pass")
        self.assertEqual(lines[1], "rsa-sha256 pass")
        algorithm, result = lines[2].split(" ")[:2]
        self.assertEqual(algorithm, "ed25519-sha256")
        self.assertIn(result, ("pass", "invalid", "neutral", "none"))
