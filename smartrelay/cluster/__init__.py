"""
State the relay nodes sharing one store agree on: connection-slot leases
(L{smartrelay.cluster.leases}) and the live-node registry
(L{smartrelay.cluster.nodes}).
"""
