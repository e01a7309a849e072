"""
DKIM signing (RFC 6376) of outgoing messages, relaxed/relaxed.

dkimpy does the DKIM part: it parses the message, selects and canonicalises
the header fields, hashes the body, builds and folds the C{DKIM-Signature}
header and computes the hash to sign.  Its signature primitive, though, is
pure-Python RSA (about 150 RSA-2048 signatures a second per core), and its
Ed25519 support needs PyNaCl; so the one primitive, "sign this SHA-256
digest", is done here with C{cryptography} (OpenSSL), with private keys
parsed once when the L{DKIMSigner} is made.

How the hook works (pinned by C{tests.test_engine_dkim.DkimpyHookTests}, so a
dkimpy upgrade that changes these internals fails the tests loudly):

  - L{_FastDKIM} subclasses C{dkim.DKIM}.  Its L{_FastDKIM.signWith} does
    what C{dkim.DKIM.sign} does for our fixed options (relaxed/relaxed, no
    C{l=}, C{i=@domain}, the given header list), with the same tags in the
    same order, except that it takes an already-parsed key instead of
    parsing PEM on every call.
  - It then calls dkimpy's own C{DomainSigner.gen_header}, which hashes the
    selected, canonicalised header fields and the signature header with an
    empty C{b=}, signs, and folds the result.  For Ed25519, C{gen_header}
    signs with C{pk.sign(digest).signature}; L{_FastDKIM.gen_header} routes
    RSA through that same branch, and the C{pk} it passes is a L{_Primitive}
    whose C{sign} does RSASSA-PKCS1-v1_5 over the precomputed SHA-256
    digest (C{Prehashed}) or Ed25519 over the digest (RFC 8463), in
    C{cryptography}.  If C{gen_header} ever returns without having called
    that primitive, L{DKIMSigner.sign} raises rather than emit a bad
    signature.

RSA signatures are deterministic, so the tests also check that the output is
byte for byte what plain C{dkim.sign} produces for the same key, header list
and time.

Because all this leans on dkimpy's insides, the relay checks it with the
keys it has before it sends anything: L{DKIMSigner.selfTest} (run at
start-up) signs a test message with every key and has dkimpy's own verifier
check each signature against the key's public half, without DNS; a failure
stops the start.  At run time a message whose signing fails is never sent
unsigned: the re-wrap defers it (L{smartrelay.engine.rewrap.SigningError}).
"""

import base64
import contextlib
import hashlib
import re
import time
import types
from email.utils import getaddresses
from importlib import metadata
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import attrs
import dkim
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from dkim import canonicalization
from dkim.canonicalization import CanonicalizationPolicy

from smartrelay.engine.downgrade import toASCIIDomain

__all__ = ["SIGNED_HEADERS", "OVERSIGNED_HEADERS", "ALGORITHMS", "DKIMKey",
           "DKIMSigner", "SelfTestError", "generateKey", "txtRecordStrings"]

#: The header fields signed when present, in the order receivers look at
#: them.  Each is signed as many times as it occurs.
SIGNED_HEADERS: Tuple[str, ...] = (
    "From",
    "Sender",
    "Reply-To",
    "To",
    "Cc",
    "Subject",
    "Date",
    "Message-ID",
    "In-Reply-To",
    "References",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
    "Feedback-ID",
)

#: The header fields signed once more than they occur (an absent one is
#: signed once, as empty), so that another instance cannot be added without
#: breaking the signature.
OVERSIGNED_HEADERS: Tuple[str, ...] = ("From", "Subject")

#: The supported C{a=} values, in the order their signatures are prepended
#: to a message: the RSA signature ends up on top, so a receiver that only
#: checks the first signature, or does not know Ed25519, checks RSA.
ALGORITHMS: Tuple[str, ...] = ("rsa-sha256", "ed25519-sha256")

_SIGNED = frozenset(name.lower().encode("ascii") for name in SIGNED_HEADERS)
_OVERSIGNED = tuple(name.lower().encode("ascii") for name in OVERSIGNED_HEADERS)
_ANY_EOL = re.compile(rb"\r?\n")
_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
_TRAILING_WSP = re.compile(rb"[\t ]+\r\n")
# A run of spaces and tabs that relaxed canonicalisation changes: one that
# holds a tab or is longer than one space (a lone space stays as it is).
_WSP_TO_COMPRESS = re.compile(rb"\t[\t ]*| [\t ]+")


def _compressWhitespace(text: bytes) -> bytes:
    if b"\t" in text or b"  " in text:
        return _WSP_TO_COMPRESS.sub(b" ", text)
    return text


class _Relaxed(CanonicalizationPolicy):
    """
    dkimpy's C{relaxed/relaxed} policy (RFC 6376 section 3.4.2 and 3.4.4),
    with the same results computed without a regular expression pass over
    text that has nothing to change: dkimpy's own functions replace every
    single space by a space, which is most of a plain body's signing cost.
    A hypothesis test checks both against dkimpy's for arbitrary input.
    """

    def __init__(self) -> None:
        super().__init__(canonicalization.Relaxed, canonicalization.Relaxed)

    def canonicalize_headers(self, headers):
        return [
            (
                name.lower().rstrip(),
                _compressWhitespace(
                    _ANY_EOL.sub(b"", value) if b"\n" in value else value
                ).strip()
                + b"\r\n",
            )
            for name, value in headers
        ]

    def canonicalize_body(self, body):
        if b" \r\n" in body or b"\t\r\n" in body:
            body = _TRAILING_WSP.sub(b"\r\n", body)
        return canonicalization.correct_empty_body(
            canonicalization.strip_trailing_lines(_compressWhitespace(body))
        )


_RELAXED = _Relaxed()


def _dnsName(text: str, what: str) -> str:
    """
    C{text} lower-cased without a final dot, if it is an ASCII DNS name
    (labels of letters, digits, inner hyphens and underscores); else
    L{ValueError}.
    """
    name = text.lower()
    if name.endswith("."):
        name = name[:-1]
    if (not name or len(name) > 253 or not name.isascii()
            or not all(_LABEL.fullmatch(label) for label in name.split("."))):
        raise ValueError(f"invalid DKIM {what} {text!r}")
    return name


@attrs.frozen
class DKIMKey:
    """
    One DKIM private key.

    @ivar domain: the signing domain (C{d=}), which is also the From: domain
        of the messages it signs.
    @ivar selector: the selector (C{s=}): the public key is the TXT record
        at C{SELECTOR._domainkey.DOMAIN}.
    @ivar algorithm: C{"rsa-sha256"} or C{"ed25519-sha256"}.
    @ivar privateKey: the private key, PEM (PKCS#8, or PKCS#1 for RSA).
    """

    domain: str
    selector: str
    algorithm: str
    privateKey: bytes = attrs.field(repr=False)


class _Primitive:
    """
    A parsed private key in the shape dkimpy's C{gen_header} wants from an
    Ed25519 key: C{sign(digest)} returns an object whose C{signature} is the
    signature of the SHA-256 C{digest}.  Immutable once made, so one
    instance serves every thread.

    @ivar algorithm: the C{a=} value, as bytes.
    @ivar domain: the C{d=} value, as bytes.
    @ivar selector: the C{s=} value, as bytes.
    @ivar record: the DNS TXT record value of the public key.
    """

    __slots__ = ("algorithm", "domain", "selector", "record", "_sign")

    def __init__(self, key: DKIMKey) -> None:
        """
        Parse and check C{key}.

        @raise ValueError: the key is not a usable one of its algorithm.
        """
        if key.algorithm not in ALGORITHMS:
            raise ValueError(f"unsupported DKIM algorithm {key.algorithm!r}")
        self.algorithm = key.algorithm.encode("ascii")
        self.domain = _dnsName(key.domain, "domain").encode("ascii")
        self.selector = _dnsName(key.selector, "selector").encode("ascii")
        where = f"DKIM key {key.selector}._domainkey.{key.domain}"
        try:
            private = serialization.load_pem_private_key(key.privateKey, password=None)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{where}: not an unencrypted PEM private key ({e})") from None
        if key.algorithm == "rsa-sha256":
            if not isinstance(private, rsa.RSAPrivateKey):
                raise ValueError(f"{where}: rsa-sha256 needs an RSA key")
            if private.key_size < 1024:
                raise ValueError(f"{where}: RSA keys must have at least 1024 bits (RFC 8301)")
            pkcs1, prehashed = padding.PKCS1v15(), Prehashed(hashes.SHA256())
            self._sign = lambda digest: private.sign(digest, pkcs1, prehashed)
        else:
            if not isinstance(private, ed25519.Ed25519PrivateKey):
                raise ValueError(f"{where}: ed25519-sha256 needs an Ed25519 key")
            self._sign = private.sign
        self.record = _txtRecord(private)

    @property
    def name(self) -> str:
        """
        C{SELECTOR._domainkey.DOMAIN}, where the public key is published.
        """
        return f"{self.selector.decode('ascii')}._domainkey.{self.domain.decode('ascii')}"

    def sign(self, digest: bytes) -> "_Signed":
        """
        Sign the SHA-256 C{digest} of the canonicalised header fields.
        """
        if len(digest) != 32:
            raise dkim.InternalError(f"expected a SHA-256 digest, got {len(digest)} octets")
        return _Signed(self._sign(digest))


@attrs.frozen
class _Signed:
    """
    What L{_Primitive.sign} returns, like PyNaCl's C{SignedMessage}.
    """

    signature: bytes


class _CountingPrimitive:
    """
    A L{_Primitive} for one signing call, noting that it was used.
    """

    __slots__ = ("primitive", "used")

    def __init__(self, primitive: _Primitive) -> None:
        self.primitive = primitive
        self.used = False

    def sign(self, digest: bytes) -> _Signed:
        self.used = True
        return self.primitive.sign(digest)


class _FastDKIM(dkim.DKIM):
    """
    dkimpy's C{DKIM}, signing with L{_Primitive} keys.  One instance per
    message: it holds that message's parsed header fields and body.
    """

    _bodyHash: Optional[bytes] = None

    def signWith(self, key: _Primitive, includeHeaders: Sequence[bytes], now: int) -> bytes:
        """
        The C{DKIM-Signature} header field, CRLF-terminated, made with C{key}.

        This is C{dkim.DKIM.sign(selector, domain, privkey,
        canonicalize=(b"relaxed", b"relaxed"), include_headers=includeHeaders)}
        minus its PEM parsing.

        @param includeHeaders: lower-case header field names for C{h=}.
        @param now: the C{t=} value.
        """
        self.signature_algorithm = key.algorithm
        self.hasher = dkim.HASH_ALGORITHMS[key.algorithm]
        self.include_headers = tuple(includeHeaders)
        if self._bodyHash is None:
            body = _RELAXED.canonicalize_body(self.body)
            self._bodyHash = base64.b64encode(hashlib.sha256(body).digest())
        fields = [
            (b"v", b"1"),
            (b"a", key.algorithm),
            (b"c", _RELAXED.to_c_value()),
            (b"d", key.domain),
            (b"i", b"@" + key.domain),
            (b"q", b"dns/txt"),
            (b"s", key.selector),
            (b"t", str(now).encode("ascii")),
            (b"h", b" : ".join(self.include_headers)),
            (b"bh", self._bodyHash),
            # As dkimpy does: b= folds onto its own line, so that refolding
            # after adding the signature leaves the other tags alone.
            (b"b", b"0" * 60),
        ]
        counting = _CountingPrimitive(key)
        value = self.gen_header(fields, self.include_headers, _RELAXED, b"DKIM-Signature", counting)
        if not counting.used:
            raise dkim.InternalError("dkimpy's gen_header did not use the signing hook")
        self.domain, self.selector, self.signature_fields = key.domain, key.selector, dict(fields)
        return b"DKIM-Signature: " + value

    def gen_header(self, fields, include_headers, canon_policy, header_name, pk,
                   standardize=False):
        """
        dkimpy's C{gen_header}, told that the key is an Ed25519 one so that
        it signs with C{pk.sign(digest).signature}, which L{_Primitive} does
        for both algorithms.  C{gen_header} uses C{signature_algorithm} for
        nothing else; the C{a=} tag is already in C{fields}.
        """
        algorithm = self.signature_algorithm
        self.signature_algorithm = b"ed25519-sha256"
        try:
            return super().gen_header(fields, include_headers, canon_policy, header_name, pk,
                                      standardize)
        finally:
            self.signature_algorithm = algorithm


def headerSection(message: bytes) -> bytes:
    """
    The header section of C{message}, up to its first empty line.
    """
    if message.startswith((b"\r\n", b"\n")):
        return b""
    match = re.search(rb"\n\r?\n", message)
    return message if match is None else message[: match.start() + 1]


def fromDomain(message: bytes) -> Optional[str]:
    """
    The lower-cased domain of the first address in C{message}'s first
    C{From:} header field, without a final dot, as A-labels if it is an
    internationalised one (C{fa\u00df.de} is C{xn--fa-hia.de}, whether the
    field was downgraded or not); L{None} if there is none.
    """
    header = _ANY_EOL.sub(b"\n", headerSection(message))
    unfolded = re.sub(rb"\n[ \t]", b" ", header)
    match = re.search(rb"^from[ \t]*:(.*)$", unfolded, re.IGNORECASE | re.MULTILINE)
    if match is None:
        return None
    value = match.group(1).decode("utf-8", "replace")
    for _, address in getaddresses([value]):
        if "@" in address:
            domain = address.rpartition("@")[2].strip().rstrip(".").lower()
            # A domain IDNA refuses stays as it is: no key is for it.
            return (toASCIIDomain(domain) or domain) or None
    return None


class DKIMSigner:
    """
    Signs messages with the keys of their From: domain.

    L{sign} may be called from several threads at once: the parsed keys are
    immutable and every call works on its own objects.
    """

    def __init__(self, keys: Sequence[DKIMKey],
                 clock: Callable[[], float] = time.time) -> None:
        """
        @param keys: the keys; a domain may have several (one RSA and one
            Ed25519 gives two signatures).
        @param clock: returns the time for C{t=}.
        @raise ValueError: a key is unusable, or two keys have the same
            domain and selector.
        """
        self._source = (tuple(keys), clock)
        byDomain: Dict[str, List[_Primitive]] = {}
        seen = set()
        for key in keys:
            primitive = _Primitive(key)
            name = (primitive.selector, primitive.domain)
            if name in seen:
                raise ValueError(
                    f"two DKIM keys for {key.selector}._domainkey.{key.domain}")
            seen.add(name)
            byDomain.setdefault(primitive.domain.decode("ascii"), []).append(primitive)
        for primitives in byDomain.values():
            primitives.sort(key=lambda p: ALGORITHMS.index(p.algorithm.decode("ascii")))
        self._keys: Dict[str, Tuple[_Primitive, ...]] = {
            domain: tuple(primitives) for domain, primitives in byDomain.items()
        }
        self._clock = clock

    def __reduce__(self) -> tuple:
        # Pickled (its keys, not its parsed primitives) for the re-wrap
        # worker processes, over their pipes.
        return (DKIMSigner, self._source)

    def domainFor(self, message: bytes) -> Optional[str]:
        """
        The domain of C{message}'s From: address, lower-cased, if there are
        keys for exactly that domain (a parent domain's keys do not count);
        else L{None}.
        """
        domain = fromDomain(message)
        return domain if domain in self._keys else None

    def sign(self, message: bytes, domain: Optional[str] = None) -> bytes:
        """
        Sign C{message} with every key of its From: domain.  Blocking and
        CPU-bound: call it in a thread, not in the reactor.

        @param message: the message, CRLF or LF line endings.
        @return: C{message} unchanged if there is no key for its From:
            domain; else the message with CRLF line endings (as signed, and
            as SMTP sends it), preceded by one C{DKIM-Signature} header per
            key, the RSA one first.
        @param domain: C{fromDomain(message)}, if the caller has it.
        @raise dkim.DKIMException: the message cannot be parsed as RFC 5322
            (or dkimpy failed otherwise; a dkimpy that has changed could
            raise anything: callers must not send the message unsigned).
        """
        if domain is None:
            domain = fromDomain(message)
        if domain not in self._keys:
            return message
        if message.count(b"\n") != message.count(b"\r\n"):
            message = _ANY_EOL.sub(b"\r\n", message)
        signer = _FastDKIM(message, linesep=b"\r\n")
        include = self.includeHeaders(signer.headers)
        now = int(self._clock())
        signatures = [signer.signWith(key, include, now) for key in self._keys[domain]]
        return b"".join(signatures) + message

    @staticmethod
    def includeHeaders(headers: Sequence[Tuple[bytes, bytes]]) -> List[bytes]:
        """
        The C{h=} list for a message with header fields C{headers}: each
        field of L{SIGNED_HEADERS} as often as it occurs, then each of
        L{OVERSIGNED_HEADERS} once more.
        """
        present = [name.lower() for name, _ in headers if name.lower() in _SIGNED]
        return present + list(_OVERSIGNED)

    def selfTest(self) -> None:
        """
        Sign a test message for each domain, as L{sign} signs mail, and
        have dkimpy's own verifier check every signature against the public
        half of its key (no DNS involved).  Catches a dkimpy whose internals
        no longer work with the signing hook, and anything else that would
        make signatures that do not verify.  CPU-bound (one signature and
        one verification per key): meant for start-up.

        @raise SelfTestError: a key's signature was not made or does not
            verify; the message names the key and is one line.
        """
        for domain, primitives in self._keys.items():
            message = _SELF_TEST_MESSAGE.replace(b"DOMAIN", domain.encode("ascii"))
            try:
                signed = self.sign(message, domain)
            except Exception as e:
                raise SelfTestError(
                    domain, f"signing a test message raised {_describe(e)} ({_dkimpyVersion()})"
                ) from e
            records = {
                f"{primitive.name}.".encode("ascii"): primitive.record.encode("ascii")
                for primitive in primitives
            }

            def dnsfunc(name: bytes, timeout: int = 5) -> Optional[bytes]:
                return records.get(name.lower())

            found = len(dkim.rfc822_parse(signed)[0]) - len(dkim.rfc822_parse(message)[0])
            if found != len(primitives):
                raise SelfTestError(
                    domain, f"the test message got {found} signatures for {len(primitives)} "
                    f"keys ({_dkimpyVersion()})")
            for index, primitive in enumerate(primitives):
                where = f"{primitive.name} ({primitive.algorithm.decode('ascii')})"
                try:
                    with _ed25519Verifier():
                        verified = dkim.DKIM(signed).verify(idx=index, dnsfunc=dnsfunc)
                except Exception as e:
                    raise SelfTestError(
                        domain, f"verifying the test signature of {where} raised "
                        f"{_describe(e)} ({_dkimpyVersion()})") from e
                if not verified:
                    raise SelfTestError(
                        domain, f"the test signature of {where} does not verify "
                        f"({_dkimpyVersion()})")


class SelfTestError(ValueError):
    """
    L{DKIMSigner.selfTest} failed for a domain's keys.

    @ivar domain: the signing domain.
    @ivar problem: what went wrong, one line.
    """

    def __init__(self, domain: str, problem: str) -> None:
        super().__init__(domain, problem)
        self.domain = domain
        self.problem = problem

    def __str__(self) -> str:
        return f"DKIM self-test for {self.domain} failed: {self.problem}"


#: What L{DKIMSigner.selfTest} signs (C{DOMAIN} replaced): the fields that
#: are signed, a folded one, and white space and empty lines for the
#: relaxed canonicalisation to change, in the header and the body.
_SELF_TEST_MESSAGE = (
    b"From: Self test <selftest@DOMAIN>\r\n"
    b"To: selftest@DOMAIN\r\n"
    b"Subject:  smartrelay\t DKIM  self-test \r\n"
    b"Date: Thu, 01 Jan 2026 00:00:00 +0000\r\n"
    b"Message-ID: <selftest@DOMAIN>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"List-Unsubscribe: <https://DOMAIN/u/x>,\r\n <mailto:unsub@DOMAIN>\r\n"
    b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
    b"\r\n"
    b"Hello  there,\t \r\n\r\nGr\xc3\xbc\xc3\x9fe.\r\n\r\n\r\n"
)


def _describe(error: Exception) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _dkimpyVersion() -> str:
    try:
        version = metadata.version("dkimpy")
    except metadata.PackageNotFoundError:
        version = "of unknown version"
    return f"dkimpy {version}; smartrelay supports dkimpy 1.1"


@contextlib.contextmanager
def _ed25519Verifier() -> Iterator[None]:
    """
    Let dkimpy verify Ed25519 signatures while the context lasts, also
    without PyNaCl (which dkimpy uses for Ed25519 and the relay does not
    need): if dkimpy has no C{nacl}, it gets the few names of PyNaCl that
    its verifier uses, made with C{cryptography}, and loses them again at
    the end.  Only L{DKIMSigner.selfTest} uses this, at start-up.
    """
    if getattr(dkim, "nacl", None) is not None:
        yield
        return
    dkim.nacl = _NACL_STAND_IN
    try:
        yield
    finally:
        del dkim.nacl


class _BadSignatureError(Exception):
    pass


class _VerifyKey:
    """
    PyNaCl's C{nacl.signing.VerifyKey}, as far as dkimpy's verifier uses
    it: made from a base64 key, C{verify(data, signature)}.
    """

    def __init__(self, key: bytes, encoder: object = None) -> None:
        # A bad key raises ValueError, as dkimpy expects of PyNaCl.
        self._key = ed25519.Ed25519PublicKey.from_public_bytes(base64.b64decode(key))

    def verify(self, data: bytes, signature: bytes) -> bytes:
        try:
            self._key.verify(signature, data)
        except InvalidSignature:
            raise _BadSignatureError() from None
        return data


_NACL_STAND_IN = types.SimpleNamespace(
    signing=types.SimpleNamespace(VerifyKey=_VerifyKey),
    encoding=types.SimpleNamespace(Base64Encoder=object()),
    exceptions=types.SimpleNamespace(BadSignatureError=_BadSignatureError, ValueError=ValueError),
)


def txtRecordStrings(value: str, size: int = 255) -> List[str]:
    """
    C{value} cut into strings of at most C{size} characters, as a DNS TXT
    record holds them (receivers join them with nothing in between).
    """
    return [value[i:i + size] for i in range(0, len(value), size)] or [""]


def generateKey(algorithm: str, bits: int = 2048) -> Tuple[bytes, str]:
    """
    Make a new DKIM key.

    @param algorithm: C{"rsa-sha256"} or C{"ed25519-sha256"}.
    @param bits: the RSA modulus size, 1024 to 4096 (ignored for Ed25519).
    @return: the private key as PKCS#8 PEM, and the DNS TXT record value
        (C{"v=DKIM1; k=rsa; p=..."}): for RSA the base64 DER
        SubjectPublicKeyInfo (RFC 6376), for Ed25519 the base64 raw 32-octet
        public key (RFC 8463).
    @raise ValueError: unknown algorithm or bad size.
    """
    if algorithm == "rsa-sha256":
        if not 1024 <= bits <= 4096:
            raise ValueError(f"RSA keys must have 1024 to 4096 bits, not {bits}")
        private = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    elif algorithm == "ed25519-sha256":
        private = ed25519.Ed25519PrivateKey.generate()
    else:
        raise ValueError(f"unsupported DKIM algorithm {algorithm!r}")
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    return pem, _txtRecord(private)


def publicRecord(privateKeyPEM: bytes) -> str:
    """
    The DNS TXT record value (C{"v=DKIM1; k=rsa; p=..."}) that publishes
    the public half of the RSA or Ed25519 private key C{privateKeyPEM}.

    @raise ValueError: not an unencrypted RSA or Ed25519 PEM private key.
    """
    try:
        private = serialization.load_pem_private_key(privateKeyPEM, password=None)
    except (TypeError, ValueError) as e:
        raise ValueError(f"not a usable private key: {e}") from None
    if not isinstance(private, (rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey)):
        raise ValueError("not an RSA or Ed25519 private key")
    return _txtRecord(private)


def _txtRecord(private: object) -> str:
    """
    The DNS TXT record value for an RSA or Ed25519 private key's public
    half (C{"v=DKIM1; k=rsa; p=..."}): for RSA the base64 DER
    SubjectPublicKeyInfo (RFC 6376), for Ed25519 the base64 raw 32-octet
    public key (RFC 8463).
    """
    if isinstance(private, rsa.RSAPrivateKey):
        public = private.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        kind = "rsa"
    else:
        assert isinstance(private, ed25519.Ed25519PrivateKey)
        public = private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        kind = "ed25519"
    return f"v=DKIM1; k={kind}; p={base64.b64encode(public).decode('ascii')}"
