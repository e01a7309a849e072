"""
Tests for L{smartrelay.outbound.client}: one delivery attempt against a
scripted SMTP server over iosim (no sockets).
"""

import re

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from smartrelay.outbound.client import AttemptResult, Reply, deliver, encodeData
from smartrelay.outbound.router import Hop
from smartrelay.outbound.testing import SMTPScript, ScriptedEndpoint

MESSAGE = b"Subject: hi\r\nX-SmartRelay-ID: 79/BC-12331-5C348706\r\n\r\nhello\r\n"


class FakeTLS:
    """
    An iosim TLS "context": the handshake succeeds when both sides agree.
    """

    def __init__(self, ok=True):
        self.ok = ok

    def iosimVerify(self, other):
        return self.ok and other.ok


class DeliverTests(SynchronousTestCase):
    """
    L{deliver} against L{ScriptedSMTPServer}.
    """

    def setUp(self):
        self.clock = Clock()

    def attempt(
        self,
        script=None,
        recipients=("a@example.com",),
        data=MESSAGE,
        sender="app@sender.example",
        tlsContext=None,
        endpoint=None,
        flush=True,
    ):
        if endpoint is None:
            endpoint = ScriptedEndpoint(script or SMTPScript(), clock=self.clock)
        self.endpoint = endpoint
        d = deliver(
            self.clock,
            Hop("mx.test", endpoint),
            sender,
            list(recipients),
            data,
            "relay.test",
            30.0,
            tlsContext,
        )
        if flush:
            endpoint.flush()
        return d

    def result(self, *args, **kwargs) -> AttemptResult:
        return self.successResultOf(self.attempt(*args, **kwargs))

    def commands(self):
        return [c.split(b" ", 1)[0].split(b":", 1)[0] for c in self.endpoint.server.commands]

    def test_accepted(self):
        """A 250 after DATA delivers every recipient; the dialogue is EHLO, MAIL, RCPT, DATA, QUIT."""
        result = self.result(recipients=["a@example.com", "b@example.com"])
        ok = Reply(250, "2.0.0", "queued as 4711")
        self.assertEqual(
            result,
            AttemptResult("mx.test", False, {"a@example.com": ok, "b@example.com": ok}),
        )
        self.assertEqual(
            self.endpoint.server.commands,
            [
                b"EHLO relay.test",
                b"MAIL FROM:<app@sender.example> SIZE=%d" % (len(MESSAGE),),
                b"RCPT TO:<a@example.com>",
                b"RCPT TO:<b@example.com>",
                b"DATA",
                b"QUIT",
            ],
        )
        self.assertEqual(self.endpoint.server.message, MESSAGE)

    def test_perRecipientRejection(self):
        """A 550 at RCPT applies to that recipient only; the others get the DATA reply."""
        script = SMTPScript(rcpt={"bad@example.com": b"550 5.1.1 <bad@example.com>: user unknown"})
        result = self.result(script, recipients=["bad@example.com", "good@example.com"])
        self.assertEqual(
            result.results,
            {
                "bad@example.com": Reply(550, "5.1.1", "<bad@example.com>: user unknown"),
                "good@example.com": Reply(250, "2.0.0", "queued as 4711"),
            },
        )
        self.assertEqual(self.endpoint.server.dataLines[-1], b"hello")

    def test_everyRecipientRejected(self):
        """When no RCPT is accepted, DATA is never sent."""
        script = SMTPScript(rcptDefault=b"550 5.7.1 relaying denied")
        result = self.result(script, recipients=["a@example.com", "b@example.com"])
        self.assertEqual(set(r.code for r in result.results.values()), {550})
        self.assertNotIn(b"DATA", self.commands())
        self.assertEqual(self.commands()[-1], b"QUIT")

    def test_dataCommandRejected(self):
        """A 554 to the DATA command applies to the recipients accepted at RCPT."""
        script = SMTPScript(
            data=b"554 5.5.1 no valid recipients",
            rcpt={"x@example.com": b"550 5.1.1 no such user"},
        )
        result = self.result(script, recipients=["x@example.com", "y@example.com"])
        self.assertEqual(result.results["x@example.com"], Reply(550, "5.1.1", "no such user"))
        self.assertEqual(
            result.results["y@example.com"], Reply(554, "5.5.1", "no valid recipients")
        )
        self.assertFalse(result.tryNextHop)

    def test_finalReplyRejected(self):
        """A 554 after the final dot applies to every accepted recipient."""
        script = SMTPScript(final=b"554 5.7.1 message rejected as spam")
        result = self.result(script, recipients=["a@example.com", "b@example.com"])
        self.assertEqual(
            set(result.results.values()), {Reply(554, "5.7.1", "message rejected as spam")}
        )

    def test_temporaryFinalReply(self):
        """A 451 after the final dot is reported as such."""
        script = SMTPScript(final=b"451 4.3.0 try again later")
        result = self.result(script)
        self.assertEqual(result.results["a@example.com"], Reply(451, "4.3.0", "try again later"))

    def test_greeting421(self):
        """A 421 greeting gives every recipient that reply and allows the next hop; no MAIL is sent."""
        script = SMTPScript(greeting=b"421 4.3.2 too busy, come back later", closeAfterGreeting=True)
        result = self.result(script, recipients=["a@example.com", "b@example.com"])
        self.assertEqual(
            set(result.results.values()), {Reply(421, "4.3.2", "too busy, come back later")}
        )
        self.assertTrue(result.tryNextHop)
        self.assertNotIn(b"MAIL", self.commands())

    def test_rcpt421(self):
        """A 421 to RCPT ends the session: the remaining recipients get the 421 too."""
        script = SMTPScript(rcpt={"b@example.com": b"421 4.7.0 closing"})
        result = self.result(script, recipients=["a@example.com", "b@example.com", "c@example.com"])
        self.assertEqual(
            set(result.results.values()), {Reply(421, "4.7.0", "closing")}
        )
        self.assertNotIn(b"DATA", self.commands())

    def test_lostMidData(self):
        """A connection lost during DATA gives accepted recipients 451 4.4.2; RCPT rejections stand."""
        script = SMTPScript(dropMidData=True, rcpt={"x@example.com": b"550 5.1.1 unknown"})
        result = self.result(script, recipients=["x@example.com", "y@example.com"])
        self.assertEqual(result.results["x@example.com"], Reply(550, "5.1.1", "unknown"))
        lost = result.results["y@example.com"]
        self.assertEqual((lost.code, lost.status), (451, "4.4.2"))
        self.assertIn("lost", lost.text)
        self.assertFalse(result.tryNextHop)

    def test_dotStuffing(self):
        """Lines starting with a dot are stuffed on the wire and arrive intact."""
        data = b".first\r\nmiddle\r\n.\r\n..two\r\nlast"
        result = self.result(data=data)
        self.assertEqual(result.results["a@example.com"].code, 250)
        self.assertEqual(
            self.endpoint.server.dataLines,
            [b"..first", b"middle", b"..", b"...two", b"last"],
        )
        self.assertEqual(self.endpoint.server.message, data + b"\r\n")

    def test_nullSender(self):
        """The null reverse path is sent as MAIL FROM:<>."""
        self.result(sender="")
        self.assertTrue(self.endpoint.server.commands[1].startswith(b"MAIL FROM:<> "))

    def test_eightBitBody(self):
        """An 8-bit message is announced with BODY=8BITMIME when the server offers it."""
        self.result(data="Subject: é\r\n\r\nçà\r\n".encode("utf-8"))
        self.assertIn(b"BODY=8BITMIME", self.endpoint.server.commands[1])

    def test_startTLSOfferedNotConfigured(self):
        """Without a TLS context the client ignores an offered STARTTLS and delivers in the clear."""
        script = SMTPScript(ehlo=[b"250-mx.test", b"250 STARTTLS"])
        result = self.result(script)
        self.assertNotIn(b"STARTTLS", self.commands())
        self.assertFalse(result.tls)
        self.assertEqual(result.results["a@example.com"].code, 250)

    def test_startTLSUsed(self):
        """With a TLS context and an offer, STARTTLS is negotiated, EHLO repeated, and tls reported."""
        script = SMTPScript(ehlo=[b"250-mx.test", b"250 STARTTLS"], tlsContext=FakeTLS())
        result = self.result(script, tlsContext=FakeTLS())
        self.assertEqual(self.commands()[:3], [b"EHLO", b"STARTTLS", b"EHLO"])
        self.assertTrue(result.tls)
        self.assertEqual(result.results["a@example.com"].code, 250)

    def test_startTLSRefused(self):
        """A 454 to STARTTLS is not fatal: the client carries on in the clear."""
        script = SMTPScript(ehlo=[b"250-mx.test", b"250 STARTTLS"])
        result = self.result(script, tlsContext=FakeTLS())
        self.assertIn(b"STARTTLS", self.commands())
        self.assertFalse(result.tls)
        self.assertEqual(result.results["a@example.com"].code, 250)

    def test_tlsHandshakeFailureRetriesInTheClear(self):
        """If the TLS handshake fails, the attempt is repeated once without TLS."""
        script = SMTPScript(ehlo=[b"250-mx.test", b"250 STARTTLS"], tlsContext=FakeTLS())
        d = self.attempt(script, tlsContext=FakeTLS(ok=False))
        self.endpoint.flush()
        result = self.successResultOf(d)
        self.assertEqual(len(self.endpoint.servers), 2)
        self.assertNotIn(b"STARTTLS", self.endpoint.servers[1].commands)
        self.assertFalse(result.tls)
        self.assertEqual(result.results["a@example.com"].code, 250)

    def test_ehloRejectedFallsBackToHelo(self):
        """A 502 to EHLO makes the client use HELO."""
        script = SMTPScript(ehlo=[b"502 5.5.2 what is EHLO"])
        result = self.result(script)
        self.assertEqual(self.commands()[:3], [b"EHLO", b"HELO", b"MAIL"])
        self.assertEqual(result.results["a@example.com"].code, 250)

    def test_heloRejected(self):
        """A rejected HELO ends the session with that reply instead of looping."""
        script = SMTPScript(ehlo=[b"502 5.5.2 no"], helo=b"550 5.7.1 go away")
        result = self.result(script)
        self.assertEqual(result.results["a@example.com"], Reply(550, "5.7.1", "go away"))
        self.assertEqual(self.commands(), [b"EHLO", b"HELO", b"QUIT"])

    def test_mailFromRejected(self):
        """A rejected MAIL FROM applies to every recipient."""
        script = SMTPScript(mail=b"553 5.1.8 sender domain does not exist")
        result = self.result(script, recipients=["a@example.com", "b@example.com"])
        self.assertEqual(
            set(result.results.values()), {Reply(553, "5.1.8", "sender domain does not exist")}
        )
        self.assertNotIn(b"RCPT", self.commands())

    def test_oddReplyToDataIsNotAcceptance(self):
        """A 250 where 354 was expected is a temporary protocol error, never a delivery."""
        script = SMTPScript(data=b"250 2.0.0 sure")
        reply = self.result(script).results["a@example.com"]
        self.assertEqual((reply.code, reply.status), (451, "4.5.0"))
        self.assertIn("250 2.0.0 sure", reply.text)

    def test_oddReplyToMail(self):
        """A 3xx to MAIL FROM is a temporary protocol error for every recipient."""
        script = SMTPScript(mail=b"354 what")
        reply = self.result(script).results["a@example.com"]
        self.assertEqual((reply.code, reply.status), (451, "4.5.0"))
        self.assertNotIn(b"RCPT", self.commands())

    def test_connectionRefused(self):
        """A refused connection gives every recipient 451 4.4.1 and allows the next hop."""
        endpoint = ScriptedEndpoint(failure=ConnectionRefusedError("nope"))
        result = self.result(endpoint=endpoint, recipients=["a@example.com", "b@example.com"])
        replies = set(result.results.values())
        self.assertEqual(len(replies), 1)
        (reply,) = replies
        self.assertEqual((reply.code, reply.status), (451, "4.4.1"))
        self.assertIn("mx.test", reply.text)
        self.assertTrue(result.tryNextHop)

    def test_connectTimeout(self):
        """A connection that does not complete within the timeout is abandoned with 451 4.4.1."""
        endpoint = ScriptedEndpoint(hang=True)
        d = self.attempt(endpoint=endpoint)
        self.assertNoResult(d)
        self.clock.advance(30)
        reply = self.successResultOf(d).results["a@example.com"]
        self.assertEqual((reply.code, reply.status), (451, "4.4.1"))
        self.assertIn("timed out", reply.text)

    def test_replyTimeout(self):
        """A server that stops answering is given up on after the timeout with 451 4.4.2."""
        script = SMTPScript(silentAt=b"DATA")
        d = self.attempt(script)
        self.assertNoResult(d)
        self.clock.advance(30)
        self.endpoint.flush()
        result = self.successResultOf(d)
        reply = result.results["a@example.com"]
        self.assertEqual((reply.code, reply.status), (451, "4.4.2"))
        self.assertIn("timeout", reply.text)
        self.assertFalse(result.tryNextHop)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_cancel(self):
        """Cancelling an attempt in progress aborts the connection and fails with CancelledError."""
        script = SMTPScript(silentAt=b"MAIL")
        d = self.attempt(script)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.endpoint.flush()
        self.assertTrue(self.endpoint.pumps[0].clientIO.disconnected)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_duplicateRecipients(self):
        """A recipient listed twice gets one RCPT."""
        result = self.result(recipients=["a@example.com", "a@example.com"])
        self.assertEqual(list(result.results), ["a@example.com"])
        self.assertEqual(self.commands().count(b"RCPT"), 1)

    def test_noRecipients(self):
        """No recipients: no connection, an empty result."""
        endpoint = ScriptedEndpoint(hang=True)
        result = self.result(endpoint=endpoint, recipients=[])
        self.assertEqual(result.results, {})
        self.assertEqual(endpoint.connecting, [])


class ReplyTests(SynchronousTestCase):
    """
    L{Reply.fromResponse} parsing.
    """

    def test_enhancedStatus(self):
        """The enhanced status code is split from the text."""
        self.assertEqual(
            Reply.fromResponse(550, b"5.1.1 user unknown"), Reply(550, "5.1.1", "user unknown")
        )

    def test_noStatus(self):
        """Without an enhanced status code the status is None."""
        self.assertEqual(Reply.fromResponse(250, b"ok"), Reply(250, None, "ok"))

    def test_mismatchedClass(self):
        """An enhanced status whose class differs from the code's is not trusted."""
        self.assertEqual(
            Reply.fromResponse(550, b"4.1.1 odd"), Reply(550, None, "4.1.1 odd")
        )

    def test_multiline(self):
        """Multi-line replies become one line, repeated status codes dropped."""
        reply = Reply.fromResponse(
            550,
            b"5.1.1 The email account that you tried to reach does not exist.\n"
            b"5.1.1 Please try double-checking.",
        )
        self.assertEqual(reply.status, "5.1.1")
        self.assertEqual(
            reply.text,
            "The email account that you tried to reach does not exist. "
            "Please try double-checking.",
        )
        self.assertEqual(reply.line, "550 5.1.1 " + reply.text)


def unstuff(wire: bytes) -> bytes:
    """
    What an RFC 5321 server does with a DATA payload.
    """
    assert wire.endswith(b"\r\n.\r\n") or wire == b".\r\n"
    lines = wire[:-3].split(b"\r\n")[:-1] if wire != b".\r\n" else []
    for line in lines:
        assert line != b".", "premature end of data"
    return b"".join((l[1:] if l.startswith(b".") else l) + b"\r\n" for l in lines)


class EncodeDataTests(SynchronousTestCase):
    """
    L{encodeData} produces a DATA payload that round-trips.
    """

    @given(st.lists(st.sampled_from([b".", b"..", b"a", b"\r\n", b"\r", b"\n", b" ", b".x"]), max_size=30))
    def test_roundTrip(self, parts):
        """Whatever the stored bytes, the server gets them back with CRLF line ends."""
        data = b"".join(parts)
        normal = re.sub(rb"\r\n|\r|\n", b"\r\n", data)
        if normal and not normal.endswith(b"\r\n"):
            normal += b"\r\n"
        self.assertEqual(unstuff(encodeData(data)), normal)
