"""
The re-wrap engine: what happens to a message between the spool and the
outbound queue (control headers, suppression, VERP, List-Unsubscribe,
tracking, DKIM).
"""
