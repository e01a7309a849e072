"""
Server-side request forgery checks for the webhook target: a URL the
operator typed must not make the relay talk to itself, to the private
network it sits in, to link-local metadata services or to multicast
groups, unless C{[webhooks] allow_private = on}.

The URL is checked when the configuration is read (L{checkURL}: scheme,
host, and the address if the host is one), when the relay starts (the
name resolved once, L{checkResolved}) and at every new connection
(L{smartrelay.export.webhooks} connects only to addresses that passed
L{refusal}, so a name that resolves differently later, DNS rebinding,
gets nowhere).  Nothing here does I/O.
"""

import ipaddress
from typing import Optional, Union
from urllib.parse import SplitResult, urlsplit

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

_NAT64 = ipaddress.ip_network("64:ff9b::/96")

#: Names that are the host itself whatever DNS says (RFC 6761).
_LOCAL_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback")


class URLRefused(ValueError):
    """
    A webhook URL (or an address it resolved to) may not be used; the
    message says why, in one line.
    """


def _embedded(address: IPAddress) -> IPAddress:
    """
    The IPv4 address inside an IPv4-mapped or NAT64 IPv6 address, else
    C{address}.
    """
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address in _NAT64:
            return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address


def refusal(address: Union[str, IPAddress]) -> Optional[str]:
    """
    Why a connection to C{address} is refused without C{allow_private}:
    C{"a loopback address"}, C{"a private address"}, ...; L{None} for a
    public unicast address.

    @raise ValueError: C{address} is not an IP address.
    """
    ip = _embedded(ipaddress.ip_address(address))
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_link_local:
        return "a link-local address"
    if ip.is_multicast:
        return "a multicast address"
    if ip.is_unspecified:
        return "an unspecified address"
    if ip.is_private:
        return "a private address"
    if ip.is_reserved or not ip.is_global:
        return "a reserved (not globally routable) address"
    return None


def hostAddress(host: str) -> Optional[IPAddress]:
    """
    C{host} as an IP address if it is one (IPv6 without brackets), else
    L{None}.
    """
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None


def checkURL(url: str, allowPrivate: bool) -> SplitResult:
    """
    Check a webhook URL without resolving its host: an absolute http or
    https URL with a host, no user name or password, no fragment; unless
    C{allowPrivate}, its host is not C{localhost} nor a refused address.

    @return: the split URL.
    @raise URLRefused: one line saying what is wrong.
    """
    text = url.strip()
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as e:
        raise URLRefused(f"not a valid URL ({e})") from None
    if parts.scheme not in ("http", "https"):
        raise URLRefused(f"must be an http:// or https:// URL, not {text!r}")
    host = parts.hostname
    if not host:
        raise URLRefused(f"has no host: {text!r}")
    if parts.username is not None or parts.password is not None:
        raise URLRefused("must not carry a user name or password (the signature authenticates)")
    if parts.fragment:
        raise URLRefused(f"must not have a fragment: {text!r}")
    if port == 0:
        raise URLRefused(f"has port 0: {text!r}")
    if any(c.isspace() for c in text) or not text.isascii():
        raise URLRefused(f"must be ASCII without spaces (percent-encode the rest): {text!r}")
    if not allowPrivate:
        address = hostAddress(host)
        name = host.rstrip(".").lower()
        if address is not None:
            why = refusal(address)
            if why is not None:
                raise URLRefused(
                    f"{text} is {why} ({address}); set allow_private = on to allow it"
                )
        elif name in _LOCAL_NAMES or name.endswith(".localhost"):
            raise URLRefused(
                f"{text} names this host ({host}); set allow_private = on to allow it"
            )
    return parts


def checkResolved(host: str, addresses: list, allowPrivate: bool) -> list:
    """
    The addresses C{host} resolved to that may be connected to.

    @param addresses: IP address strings.
    @return: those addresses (all of them with C{allowPrivate}).
    @raise URLRefused: none may be (one line naming the first refused).
    """
    if allowPrivate:
        return list(addresses)
    allowed, refused = [], []
    for address in addresses:
        why = refusal(address)
        if why is None:
            allowed.append(address)
        else:
            refused.append((address, why))
    if not allowed:
        if not refused:
            raise URLRefused(f"{host} has no address")
        address, why = refused[0]
        raise URLRefused(
            f"{host} resolves to {why} ({address}); set allow_private = on to allow it"
        )
    return allowed
