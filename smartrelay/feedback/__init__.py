"""
What comes back: bounces (DSNs and the non-standard forms MTAs send),
complaints (ARF), unsubscribe mail and auto-replies; how they are read,
classified and turned into events and suppressions.
"""
