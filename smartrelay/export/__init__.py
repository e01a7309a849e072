"""
Every event leaves the relay (DESIGN section 1.7b): the exporter writes
them to files (L{smartrelay.export.exporter}), the webhooks POST them to
the customer's server (L{smartrelay.export.webhooks}), whose address is
checked against private targets by L{smartrelay.ssrf}.  Both read
the store's event streams (L{smartrelay.store.interfaces.IEventStreams}),
so nothing is lost across a crash.
"""
