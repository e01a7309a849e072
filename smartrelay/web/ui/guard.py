"""
The reports UI's defences, as plain functions over a Twisted Web request:
the security headers every answer carries, the session cookie's
attributes, whether the request came over https, and whether a
state-changing request comes from the UI's own pages (C{Origin},
C{Sec-Fetch-Site}).
"""

import hmac
import ipaddress
from typing import Optional, Sequence

__all__ = [
    "CONTENT_SECURITY_POLICY",
    "SECURITY_HEADERS",
    "SESSION_COOKIE",
    "cookieHeader",
    "isHTTPS",
    "readCookie",
    "sameOrigin",
    "setSecurityHeaders",
    "siteHost",
    "tokensMatch",
]

#: The name of the session cookie.
SESSION_COOKIE = b"smartrelay_session"

#: No script at all, styles and images from the UI itself only, forms that
#: post nowhere else, never framed.  (The charts are inline SVG drawn with
#: presentation attributes, which CSP does not count as inline style.)
CONTENT_SECURITY_POLICY = (
    b"default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
    b"frame-ancestors 'none'; base-uri 'none'"
)

SECURITY_HEADERS = {
    b"Content-Security-Policy": CONTENT_SECURITY_POLICY,
    b"X-Content-Type-Options": b"nosniff",
    b"X-Frame-Options": b"DENY",
    b"Referrer-Policy": b"same-origin",
    b"Cache-Control": b"no-store",
    b"Cross-Origin-Opener-Policy": b"same-origin",
}


def setSecurityHeaders(request) -> None:
    """
    Put L{SECURITY_HEADERS} on the answer.
    """
    for name, value in SECURITY_HEADERS.items():
        request.setHeader(name, value)


def _trusted(text: Optional[str], proxies: Sequence) -> bool:
    if text is None or not proxies:
        return False
    try:
        address = ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return False
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address.version == net.version and address in net for net in proxies)


def isHTTPS(request, trustedProxies: Sequence = ()) -> bool:
    """
    Did the browser use https: to us directly, or to a proxy of
    C{trustedProxies} that says so (C{X-Forwarded-Proto: https}, the last
    value if it was appended to)?
    """
    if request.isSecure():
        return True
    peer = getattr(request.getClientAddress(), "host", None)
    if not _trusted(peer, trustedProxies):
        return False
    values = request.requestHeaders.getRawHeaders(b"x-forwarded-proto", [])
    if not values:
        return False
    last = values[-1].split(b",")[-1].strip().lower()
    return last == b"https"


def cookieHeader(
    name: bytes, value: str, secure: bool, maxAge: Optional[int] = None
) -> bytes:
    """
    A C{Set-Cookie} value: HttpOnly, SameSite=Lax, Path=/, Secure over
    https; C{maxAge} 0 deletes it.
    """
    parts = [name + b"=" + value.encode("ascii"), b"Path=/", b"HttpOnly", b"SameSite=Lax"]
    if secure:
        parts.append(b"Secure")
    if maxAge is not None:
        parts.append(b"Max-Age=%d" % (maxAge,))
    return b"; ".join(parts)


def readCookie(request, name: bytes) -> Optional[str]:
    """
    The value of cookie C{name}, if the request has exactly one that is
    printable ASCII (two of them, as a subdomain could plant, count as
    none).
    """
    found = []
    for header in request.requestHeaders.getRawHeaders(b"cookie", []):
        for part in header.split(b";"):
            key, eq, value = part.strip().partition(b"=")
            if eq and key == name:
                found.append(value.strip())
    if len(found) != 1:
        return None
    value = found[0]
    if not value or len(value) > 200 or not all(0x21 <= c <= 0x7E for c in value):
        return None
    return value.decode("ascii")


def siteHost(request, trustedProxies: Sequence = ()) -> Optional[bytes]:
    """
    The host (and port) the browser asked for: C{Host}, or behind a proxy
    of C{trustedProxies} that sends it, the last C{X-Forwarded-Host}.
    """
    peer = getattr(request.getClientAddress(), "host", None)
    if _trusted(peer, trustedProxies):
        values = request.requestHeaders.getRawHeaders(b"x-forwarded-host", [])
        if values:
            last = values[-1].split(b",")[-1].strip()
            if last:
                return last
    return request.getHeader(b"host")


def sameOrigin(request, https: bool, trustedProxies: Sequence = ()) -> bool:
    """
    Does a state-changing request come from one of our own pages?  The
    browser's C{Sec-Fetch-Site} must be C{same-origin} when it is sent,
    and C{Origin} must be this site (scheme, the host asked for:
    L{siteHost}) when it is sent; at least one of them must be there.  A
    request with neither (no browser made it) is refused.
    """
    site = request.getHeader(b"sec-fetch-site")
    origin = request.getHeader(b"origin")
    if site is None and origin is None:
        return False
    if site is not None and site.strip().lower() != b"same-origin":
        return False
    if origin is not None:
        host = siteHost(request, trustedProxies)
        if not host:
            return False
        expected = (b"https://" if https else b"http://") + host.strip().lower()
        if origin.strip().lower() != expected:
            return False
    return True


def tokensMatch(given: Optional[str], expected: str) -> bool:
    """
    A CSRF token compared in constant time.
    """
    if not given:
        return False
    return hmac.compare_digest(given.encode("utf-8", "replace"), expected.encode("ascii"))
