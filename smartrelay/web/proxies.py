"""
Who the client of a web request is: the peer, or, when the peer is one of
C{[web] trusted_proxies}, the address its C{X-Forwarded-For} names.  The
API's failure limits and the C{ip} of C{opened} and C{clicked} events use
it.
"""

import ipaddress
from typing import Optional, Sequence

__all__ = ["clientAddress"]


def _ip(text: str):
    try:
        return ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return None


def _trusted(address, proxies: Sequence) -> bool:
    if address is None:
        return False
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address.version == net.version and address in net for net in proxies)


def clientAddress(request, trustedProxies: Sequence = ()) -> Optional[str]:
    """
    The client's IP address as text: the peer's, unless the peer is one
    of C{trustedProxies} (networks); then the hops of C{X-Forwarded-For}
    are read from the right, and the first one that is not a trusted proxy
    is the client (the leftmost one if they all are).  A hop that is not an
    IP address ends the walk there: the last address believed is the
    client.  L{None} for a peer that is not an IP address (a UNIX socket).
    """
    peer = getattr(request.getClientAddress(), "host", None)
    if peer is None or not trustedProxies:
        return peer
    current = _ip(peer)
    if not _trusted(current, trustedProxies):
        return peer
    hops = []
    for value in request.requestHeaders.getRawHeaders(b"x-forwarded-for", []):
        hops.extend(h for h in value.decode("latin-1").split(","))
    client = peer
    for hop in reversed(hops):
        address = _ip(hop)
        if address is None:
            break
        client = str(address)
        if not _trusted(address, trustedProxies):
            break
    return client
