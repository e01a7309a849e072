"""
SMTP replies as typed exceptions: every decision the policy makes that is
not "yes" is one of these, and the protocol turns it into a reply in one
place (L{smartrelay.smtp.protocol.HardenedESMTP._replyFor}).
"""

import attrs


@attrs.define(str=False)
class SMTPReply(Exception):
    """
    A complete SMTP reply: basic code, RFC 3463 enhanced status code and a
    human sentence.
    """

    code: int
    status: str
    text: str

    @property
    def temporary(self) -> bool:
        return 400 <= self.code < 500

    def lines(self) -> list:
        """
        The reply as wire lines (without CRLF); multi-line text gets
        continuation markers.
        """
        texts = self.text.split("\n") or [""]
        out = []
        for i, text in enumerate(texts):
            sep = " " if i == len(texts) - 1 else "-"
            out.append(("%03d%s%s %s" % (self.code, sep, self.status, text)).encode("utf-8"))
        return out

    def __str__(self) -> str:
        return "%d %s %s" % (self.code, self.status, self.text)


def reply(code: int, status: str, text: str) -> SMTPReply:
    return SMTPReply(code, status, text)


# The replies that more than one module needs (DESIGN section 1.3).
TOO_MANY_CONNECTIONS = reply(421, "4.7.0", "Too many connections, try again later")
TOO_MANY_CONNECTIONS_FROM_CLIENT = reply(
    421, "4.7.0", "Too many connections from your address, try again later"
)
ACCESS_DENIED = reply(
    554,
    "5.7.1",
    "Relay access denied: submit from an allowed address or authenticate first",
)
STORAGE_TROUBLE = reply(
    451, "4.3.0", "Temporary storage trouble, message not accepted; try again later"
)
TOO_MANY_RECIPIENTS = reply(452, "4.5.3", "Too many recipients for one message")
MESSAGE_TOO_BIG = reply(552, "5.3.4", "Message too big")
LINE_TOO_LONG = reply(500, "5.5.2", "Line too long")
NUL_IN_DATA = reply(554, "5.6.0", "Message contains NUL characters, not accepted")
