"""
The relay's web site (DESIGN section 1.6): one Klein site per relay.

L{smartrelay.web.tracking} serves the public, token-authenticated routes
that recipients reach from their mail: the open pixel (C{/t/o/}), the click
redirect (C{/t/c/}) and the unsubscribe page and endpoint (C{/u/}).
"""
