"""
Tests for L{smartrelay.outbound.session}: reusable sessions, pipelining,
TLS policies and 8-bit handling against a scripted server over iosim.
"""

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from smartrelay.engine.downgrade import Offers, Prepared
from smartrelay.outbound.router import Hop
from smartrelay.outbound.session import Reply, TLSPolicy, openSession
from smartrelay.outbound.testing import SMTPScript, ScriptedEndpoint

MESSAGE = b"Subject: hi\r\n\r\nhello\r\n"
PIPELINING = [b"250-mx.test", b"250-PIPELINING", b"250-8BITMIME", b"250 SIZE 1000000"]


class FakeTLS:
    def __init__(self, ok=True):
        self.ok = ok

    def iosimVerify(self, other):
        return self.ok and other.ok


class SessionTestsMixin:
    def setUp(self):
        self.clock = Clock()

    def open(self, script=None, policy=TLSPolicy.NONE, context=None):
        self.endpoint = ScriptedEndpoint(script or SMTPScript(), clock=self.clock)
        d = openSession(self.clock, Hop("mx.test", self.endpoint), "relay.test", 30.0, policy, context)
        self.endpoint.flush()
        return self.successResultOf(d)

    def session(self, script=None, **kwargs):
        opened = self.open(script, **kwargs)
        self.assertIsNotNone(opened.session, opened.reply)
        return opened.session

    def send(self, session, recipients=("a@example.com",), data=MESSAGE):
        d = session.send("app@sender.example", list(recipients), data)
        self.endpoint.flush()
        return self.successResultOf(d)

    def verbs(self):
        return [c.split(b" ", 1)[0].split(b":", 1)[0] for c in self.endpoint.server.commands]


class ReuseTests(SessionTestsMixin, SynchronousTestCase):
    """
    One session, many transactions.
    """

    def test_pipelined(self):
        """With PIPELINING, MAIL, every RCPT and DATA go out before the replies come back."""
        session = self.session(SMTPScript(ehlo=PIPELINING))
        self.assertTrue(session.pipelining)
        d = session.send("app@sender.example", ["a@example.com", "b@example.com"], MESSAGE)
        # Everything is written before any reply is read.
        self.assertEqual(b"".join(self.endpoint.pumps[0].clientIO.stream).count(b"\r\n"), 4)
        self.endpoint.flush()
        result = self.successResultOf(d)
        self.assertEqual({r.code for r in result.results.values()}, {250})
        self.assertEqual(self.verbs(), [b"EHLO", b"MAIL", b"RCPT", b"RCPT", b"DATA"])

    def test_reusedWithReset(self):
        """A second transaction on the same session starts with RSET; both arrive."""
        session = self.session(SMTPScript(ehlo=PIPELINING))
        first = self.send(session, ["a@example.com"], b"Subject: one\r\n\r\n1\r\n")
        self.assertTrue(session.usable)
        second = self.send(session, ["b@example.com"], b"Subject: two\r\n\r\n2\r\n")
        self.assertEqual(
            (first.results["a@example.com"].code, second.results["b@example.com"].code), (250, 250)
        )
        self.assertEqual(
            self.verbs(), [b"EHLO", b"MAIL", b"RCPT", b"DATA", b"RSET", b"MAIL", b"RCPT", b"DATA"]
        )
        self.assertEqual(self.endpoint.server.message, b"Subject: two\r\n\r\n2\r\n")
        self.assertEqual(len(self.endpoint.servers), 1)
        self.assertEqual(session.transactions, 2)

    def test_lockStepReuse(self):
        """Without PIPELINING the same works command by command."""
        session = self.session()
        self.send(session)
        self.send(session)
        self.assertEqual(
            self.verbs(), [b"EHLO", b"MAIL", b"RCPT", b"DATA", b"RSET", b"MAIL", b"RCPT", b"DATA"]
        )

    def test_everyRecipientRejectedPipelined(self):
        """Pipelined: every RCPT refused; each keeps its own reply and the session stays usable."""
        script = SMTPScript(
            ehlo=PIPELINING,
            rcpt={"a@example.com": b"550 5.1.1 unknown", "b@example.com": b"452 4.2.2 full"},
        )
        session = self.session(script)
        result = self.send(session, ["a@example.com", "b@example.com"])
        self.assertEqual(result.results["a@example.com"], Reply(550, "5.1.1", "unknown"))
        self.assertEqual(result.results["b@example.com"], Reply(452, "4.2.2", "full"))
        self.assertIsNone(self.endpoint.server.message)
        self.assertTrue(session.usable)
        self.assertEqual(self.send(session, ["c@example.com"]).results["c@example.com"].code, 250)

    def test_refusalNamesCommand(self):
        """A refusal says which command it answered: RCPT, MAIL, DATA or the final dot."""
        script = SMTPScript(rcpt={"a@example.com": b"550 user unknown"})
        result = self.send(self.session(script), ["a@example.com", "b@example.com"])
        self.assertEqual(result.results["a@example.com"].command, "RCPT")
        self.assertIsNone(result.results["b@example.com"].command)
        result = self.send(self.session(SMTPScript(mail=b"553 5.1.8 bad sender")))
        self.assertEqual(result.results["a@example.com"].command, "MAIL")
        result = self.send(self.session(SMTPScript(data=b"554 5.3.0 no")))
        self.assertEqual(result.results["a@example.com"].command, "DATA")
        result = self.send(self.session(SMTPScript(final=b"550 5.7.1 spam")))
        self.assertEqual(result.results["a@example.com"].command, "DATA")
        self.assertEqual(result.results["a@example.com"], Reply(550, "5.7.1", "spam"))

    def test_mailRefusedPipelined(self):
        """Pipelined: a refused MAIL FROM is every recipient's reply, whatever RCPT said."""
        script = SMTPScript(ehlo=PIPELINING, mail=b"553 5.1.8 bad sender")
        session = self.session(script)
        result = self.send(session, ["a@example.com", "b@example.com"])
        self.assertEqual(set(result.results.values()), {Reply(553, "5.1.8", "bad sender")})

    def test_rcpt421Pipelined(self):
        """A 421 ends the session: everyone undecided gets it, the result is marked throttled."""
        script = SMTPScript(ehlo=PIPELINING, rcpt={"b@example.com": b"421 4.7.0 too fast"})
        session = self.session(script)
        result = self.send(session, ["a@example.com", "b@example.com"])
        self.assertEqual(result.results["b@example.com"], Reply(421, "4.7.0", "too fast"))
        self.assertEqual(result.results["a@example.com"].code, 421)
        self.assertTrue(result.throttled)
        self.assertFalse(session.usable)

    def test_unsolicited421(self):
        """A 421 while idle (the server timing us out) makes the session unusable."""
        session = self.session()
        self.send(session)
        self.endpoint.server.sendLine(b"421 4.4.2 idle too long")
        self.endpoint.flush()
        self.assertFalse(session.usable)

    def test_unansweredOnReusedSession(self):
        """A reused session dropped before any answer marks the result 'unanswered' (retry at once)."""
        script = SMTPScript(dropAt=(b"RSET", 1))
        session = self.session(script)
        self.send(session)
        result = self.send(session)
        self.assertTrue(result.unanswered)
        self.assertEqual(result.results["a@example.com"].code, 451)
        self.assertFalse(session.usable)

    def test_firstTransactionLostIsNotUnanswered(self):
        """On a fresh session a lost connection is an ordinary deferral."""
        script = SMTPScript(dropAt=(b"MAIL", 1))
        session = self.session(script)
        result = self.send(session)
        self.assertFalse(result.unanswered)
        self.assertEqual(result.results["a@example.com"].status, "4.4.2")

    def test_notUsableWhileBusy(self):
        """send() refuses a second transaction while one is running."""
        session = self.session(SMTPScript(silentAt=b"MAIL"))
        session.send("a@x", ["b@example.com"], MESSAGE)
        self.assertRaises(RuntimeError, session.send, "a@x", ["c@example.com"], MESSAGE)

    def test_garbledReply(self):
        """A reply that is not SMTP ends the session with a protocol error."""
        session = self.session()
        d = session.send("app@sender.example", ["a@example.com"], MESSAGE)
        self.endpoint.server.silent = True
        self.endpoint.flush()
        self.endpoint.server.transport.write(b"HTTP/1.1 400 Bad Request\r\n")
        self.endpoint.flush()
        reply = self.successResultOf(d).results["a@example.com"]
        self.assertEqual((reply.code, reply.status), (451, "4.5.0"))
        self.assertIn("malformed", reply.text)

    def test_overlongReplyLine(self):
        """A reply line longer than any server should send ends the session with a protocol error."""
        session = self.session()
        d = session.send("app@sender.example", ["a@example.com"], MESSAGE)
        self.endpoint.server.silent = True
        self.endpoint.flush()
        self.endpoint.server.transport.write(b"250-" + b"x" * 10000)
        self.endpoint.flush()
        reply = self.successResultOf(d).results["a@example.com"]
        self.assertEqual((reply.code, reply.status), (451, "4.5.0"))
        self.assertIn("longer than", reply.text)

    def test_endlessReply(self):
        """A multi-line reply that never ends is cut off."""
        session = self.session()
        d = session.send("app@sender.example", ["a@example.com"], MESSAGE)
        self.endpoint.server.silent = True
        self.endpoint.flush()
        self.endpoint.server.transport.write(b"250-more\r\n" * 500)
        self.endpoint.flush()
        reply = self.successResultOf(d).results["a@example.com"]
        self.assertEqual((reply.code, reply.status), (451, "4.5.0"))
        self.assertIn("more than", reply.text)

    def test_idleHasNoTimer(self):
        """An idle session leaves no timer running (the pool owns idle timeouts)."""
        session = self.session()
        self.send(session)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class TLSPolicyTests(SessionTestsMixin, SynchronousTestCase):
    """
    C{required} and C{verify} never fall back to the clear.
    """

    def test_requiredNotOffered(self):
        """TLS required, STARTTLS not offered: no session, 4.7.10, QUIT sent, next hop allowed."""
        opened = self.open(SMTPScript(), policy=TLSPolicy.REQUIRED, context=FakeTLS())
        self.assertIsNone(opened.session)
        self.assertEqual((opened.reply.code, opened.reply.status), (451, "4.7.10"))
        self.assertTrue(opened.tryNextHop)
        self.assertEqual(self.verbs(), [b"EHLO", b"QUIT"])

    def test_requiredRefused(self):
        """TLS required and STARTTLS refused: no session."""
        script = SMTPScript(ehlo=[b"250-mx.test", b"250 STARTTLS"])
        opened = self.open(script, policy=TLSPolicy.REQUIRED, context=FakeTLS())
        self.assertIsNone(opened.session)
        self.assertIn("TLS is required", opened.reply.text)

    def test_requiredHandshakeFails(self):
        """TLS required and the handshake fails: no second connection in the clear."""
        script = SMTPScript(ehlo=[b"250-mx.test", b"250 STARTTLS"], tlsContext=FakeTLS())
        self.endpoint = ScriptedEndpoint(script, clock=self.clock)
        d = openSession(
            self.clock, Hop("mx.test", self.endpoint), "relay.test", 30.0,
            TLSPolicy.VERIFY, FakeTLS(ok=False),
        )
        self.endpoint.flush()
        opened = self.successResultOf(d)
        self.assertIsNone(opened.session)
        self.assertEqual(opened.reply.status, "4.7.5")
        self.assertEqual(len(self.endpoint.servers), 1)

    def test_requiredUsed(self):
        """TLS required and offered: the session is encrypted."""
        script = SMTPScript(ehlo=[b"250-mx.test", b"250 STARTTLS"], tlsContext=FakeTLS())
        session = self.session(script, policy=TLSPolicy.REQUIRED, context=FakeTLS())
        self.assertTrue(session.tls)
        self.assertTrue(self.send(session).tls)


class EightBitTests(SessionTestsMixin, SynchronousTestCase):
    """
    8-bit messages are announced, or downgraded for servers without 8BITMIME.
    """

    DATA = "Subject: caf\u00e9\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nd\u00e9j\u00e0 vu\r\n".encode()

    def test_announced(self):
        """With 8BITMIME and SMTPUTF8 an 8-bit message goes as it is, with both parameters."""
        session = self.session(SMTPScript(ehlo=PIPELINING[:-1] + [b"250-SIZE 1000000", b"250 SMTPUTF8"]))
        self.send(session, data=self.DATA)
        mail = self.endpoint.server.commands[1]
        self.assertIn(b"BODY=8BITMIME", mail)
        self.assertIn(b"SMTPUTF8", mail)
        self.assertEqual(self.endpoint.server.message, self.DATA)

    def test_downgraded(self):
        """No 8BITMIME, no SMTPUTF8: the message arrives 7-bit, same content."""
        session = self.session(SMTPScript(ehlo=[b"250-mx.test", b"250 SIZE 100000"]))
        self.send(session, data=self.DATA)
        received = self.endpoint.server.message
        self.assertTrue(all(b < 0x80 for b in received), received)
        self.assertNotIn(b"BODY=8BITMIME", self.endpoint.server.commands[1])
        import email
        import email.policy

        message = email.message_from_bytes(received, policy=email.policy.default)
        self.assertEqual(message["Subject"], "caf\u00e9")
        self.assertEqual(message.get_content().rstrip(), "d\u00e9j\u00e0 vu")

    def test_headersOnlyDowngradedWithout8BitHeaders(self):
        """8BITMIME but no SMTPUTF8: the body stays 8-bit, the Subject is encoded."""
        session = self.session(SMTPScript())  # SIZE, 8BITMIME
        self.send(session, data=self.DATA)
        received = self.endpoint.server.message
        self.assertIn("d\u00e9j\u00e0 vu".encode(), received)
        self.assertIn(b"Subject: =?utf-8?", received)
        self.assertIn(b"BODY=8BITMIME", self.endpoint.server.commands[1])


class PreparedTests(SessionTestsMixin, SynchronousTestCase):
    """
    A re-wrapped message (a L{Prepared}, made and DKIM-signed for this
    session's server) is sent byte for byte: the session never changes it.
    """

    DATA = EightBitTests.DATA
    SEVEN_BIT = [b"250-mx.test", b"250 SIZE 100000"]

    def test_offers(self):
        """The session says what its server offers, from the EHLO answer."""
        self.assertEqual(self.session(SMTPScript(ehlo=self.SEVEN_BIT)).offers, Offers())
        self.assertEqual(self.session(SMTPScript()).offers, Offers(eightBitMIME=True))
        utf8 = PIPELINING[:-1] + [b"250 SMTPUTF8"]
        self.assertEqual(
            self.session(SMTPScript(ehlo=utf8)).offers, Offers(eightBitMIME=True, smtpUTF8=True)
        )

    def test_notDowngraded(self):
        """
        An 8-bit L{Prepared} message is not downgraded again, even for a
        server without 8BITMIME: it was made for it (here, wrongly, to
        show that the session leaves it alone); only dot-stuffing is
        added on the wire.
        """
        session = self.session(SMTPScript(ehlo=self.SEVEN_BIT))
        data = self.DATA + b".dot\r\n"
        self.send(session, data=Prepared(data))
        self.assertEqual(self.endpoint.server.message, data)
        self.assertEqual(
            self.endpoint.server.commands[1], b"MAIL FROM:<app@sender.example> SIZE=%d" % len(data)
        )

    def test_parameters(self):
        """The MAIL parameters are the ones the L{Prepared} message asks for."""
        session = self.session(SMTPScript(ehlo=PIPELINING[:-1] + [b"250 SMTPUTF8"]))
        self.send(session, data=Prepared(self.DATA, eightBitMIME=True, smtpUTF8=True))
        self.assertEqual(
            self.endpoint.server.commands[1],
            b"MAIL FROM:<app@sender.example> BODY=8BITMIME SMTPUTF8",
        )
        self.assertEqual(self.endpoint.server.message, self.DATA)
        self.send(session, data=Prepared(MESSAGE))
        mails = [c for c in self.endpoint.server.commands if c.startswith(b"MAIL")]
        self.assertEqual(mails[-1], b"MAIL FROM:<app@sender.example>")

    def test_madeForAnotherServer(self):
        """
        A L{Prepared} message that needs what this server does not offer is
        refused before anything is sent (it would have to be altered).
        """
        session = self.session(SMTPScript(ehlo=self.SEVEN_BIT))
        commands = list(self.endpoint.server.commands)
        for prepared in [Prepared(self.DATA, eightBitMIME=True), Prepared(self.DATA, smtpUTF8=True)]:
            e = self.assertRaises(ValueError, session.send, "a@b.example", ["c@d.example"], prepared)
            self.assertIn("cannot go to mx.test", str(e))
        self.assertEqual(self.endpoint.server.commands, commands)
        self.assertTrue(session.usable)
