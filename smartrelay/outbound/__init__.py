"""
Outbound delivery: the seam a fuller MTA engine plugs into.

* L{smartrelay.outbound.router}: domain → ordered hops (smarthost or MX).
* L{smartrelay.outbound.client}: one ESMTP attempt to one hop.
* L{smartrelay.outbound.scheduler}: when to attempt, concurrency, retries,
  recording outcomes and emitting events (the bounce reason of a reply
  from L{smartrelay.feedback.reasons}).
* L{smartrelay.outbound.testing}: in-memory fakes for tests.
"""
