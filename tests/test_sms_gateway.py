"""
Tests for L{smartrelay.sms.gateway}: SMS recipients, the text a mail
becomes, sending through the delivery scheduler's transport hook, and
receipts matched through the store.
"""

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from smartrelay.outbound.scheduler import DeliveryScheduler
from smartrelay.outbound.testing import Delays, FakeRouter, FakeSpool, RecordingEvents, makeEntry
from smartrelay.sms.client import NotConnected
from smartrelay.sms.codec import Command, Status, Tag, TLV, intTLV, makePDU, stringTLV
from smartrelay.sms.gateway import (
    BadNumber,
    BadSender,
    EmptyText,
    SMSGateway,
    SMSPolicy,
    TextTooLong,
    concatenationReference,
    mailText,
    readReceipt,
    sourceAddress,
)
from smartrelay.sms.protocol import SessionLost, SubmitRefused
from smartrelay.store.interfaces import SMSSubmission, SuppressionEntry
from smartrelay.store.memory import MemoryStore

DOMAIN = "sms.example.com"
NUMBER = "+393331234567@sms.example.com"


def mail(body, headers=b"Subject: Hi\r\nX-SmartRelay-SMS-From: Shop\r\n"):
    return headers + b"\r\n" + body


class PolicyTests(SynchronousTestCase):
    def setUp(self):
        self.policy = SMSPolicy(domain=DOMAIN, maxParts=2, source="Shop")

    def test_numbers(self):
        """
        +E.164 at the SMS domain is a number (domain case-insensitive);
        another domain is not SMS; anything else at the domain is
        L{BadNumber} (553 5.1.3).
        """
        self.assertEqual(self.policy.number(NUMBER), "393331234567")
        self.assertEqual(self.policy.number("+15551234567@SMS.Example.COM"), "15551234567")
        self.assertIsNone(self.policy.number("a@example.com"))
        for bad in ("393331234567", "+0393331234567", "+12345", "+1234567890123456", "+39 333"):
            e = self.assertRaises(BadNumber, self.policy.number, f"{bad}@{DOMAIN}")
            self.assertEqual((e.code, e.status), (553, "5.1.3"))

    def test_sources(self):
        """
        Sender ids: alphanumeric up to 11 is 5/0, +E.164 1/1 without the
        plus, a short code 3/0; anything else is L{BadSender}.
        """
        self.assertEqual(sourceAddress("Shop"), (5, 0, b"Shop"))
        self.assertEqual(sourceAddress("+393331234567"), (1, 1, b"393331234567"))
        self.assertEqual(sourceAddress("4242"), (3, 0, b"4242"))
        for bad in ("TwelveLetter", "", "Shöp", "+1-555"):
            self.assertRaises(BadSender, sourceAddress, bad)

    def test_senderHeaderFirst(self):
        """
        X-SmartRelay-SMS-From wins over [sms] source_addr; without either
        the message cannot be sent.
        """
        self.assertEqual(self.policy.sender(mail(b"x")), (5, 0, b"Shop"))
        self.assertEqual(
            self.policy.sender(mail(b"x", b"X-SmartRelay-SMS-From: +15551234567\r\n")),
            (1, 1, b"15551234567"),
        )
        self.assertEqual(self.policy.sender(mail(b"x", b"Subject: a\r\n")), (5, 0, b"Shop"))
        bare = SMSPolicy(domain=DOMAIN)
        self.assertRaises(BadSender, bare.sender, mail(b"x", b"Subject: a\r\n"))

    def test_plainPartDecoded(self):
        """
        The text/plain part is decoded from its charset and transfer
        encoding; line ends become LF; the signature is cut.
        """
        data = (
            b"Content-Type: text/plain; charset=iso-8859-1\r\n"
            b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"
            b"Gr=FC=DFe, code 1234\r\nline two\r\n-- \r\nACME Inc.\r\n"
        )
        self.assertEqual(mailText(data), "Grüße, code 1234\nline two")

    def test_alternativeAndAttachments(self):
        """
        In a multipart message the first text/plain part that is not an
        attachment is the text.
        """
        data = (
            b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
            b"--b\r\nContent-Type: text/plain\r\nContent-Disposition: attachment\r\n\r\nnot me\r\n"
            b'--b\r\nContent-Type: multipart/alternative; boundary="c"\r\n\r\n'
            b"--c\r\nContent-Type: text/html\r\n\r\n<p>html</p>\r\n"
            b"--c\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n\xd0\x9f\xd1\x80\xd0\xb8\r\n"
            b"--c--\r\n--b--\r\n"
        )
        self.assertEqual(mailText(data), "При")

    def test_htmlOnly(self):
        """
        An HTML-only mail becomes its text rendering.
        """
        data = b"Content-Type: text/html\r\n\r\n<html><body><p>Your code:</p><p><b>1234</b> &amp; go</p></body></html>"
        self.assertEqual(mailText(data), "Your code:\n1234 & go")

    def test_subjectPrepend(self):
        """
        subject = prepend puts the decoded Subject on the first line;
        ignore leaves it out.
        """
        data = b"Subject: =?utf-8?q?C=C3=B3digo?=\r\n\r\n1234\r\n"
        self.assertEqual(mailText(data, "prepend"), "Código\n1234")
        self.assertEqual(mailText(data, "ignore"), "1234")

    def test_prepareRefusals(self):
        """
        An empty text is L{EmptyText} (554 5.6.0); more than max_parts is
        L{TextTooLong} (554 5.3.4).
        """
        e = self.assertRaises(EmptyText, self.policy.prepare, mail(b"  \r\n-- \r\nsig\r\n"))
        self.assertEqual((e.code, e.status), (554, "5.6.0"))
        e = self.assertRaises(TextTooLong, self.policy.prepare, mail(b"a" * 400))
        self.assertEqual((e.code, e.status), (554, "5.3.4"))
        text, parts, sender = self.policy.prepare(mail(b"a" * 300))
        self.assertEqual((len(text), len(parts.parts), sender), (300, 2, (5, 0, b"Shop")))


class FakeSubmit:
    """
    C{submit(fields)}: answers from a list (message id, or an exception).
    """

    def __init__(self, answers=()):
        self.answers = list(answers)
        self.calls = []
        self.number = 0x100

    def __call__(self, fields, tlvs=()):
        self.calls.append(fields)
        if self.answers:
            answer = self.answers.pop(0)
            if isinstance(answer, Exception):
                return fail(answer)
            if isinstance(answer, Deferred):
                return answer
            return succeed(answer)
        self.number += 1
        return succeed("%X" % self.number)


class GatewayTestsMixin:
    def makeGateway(self, answers=(), **policy):
        self.clock = Clock()
        self.store = MemoryStore()
        self.events = RecordingEvents()
        self.submit = FakeSubmit(answers)
        policy.setdefault("source", "Shop")
        self.gateway = SMSGateway(
            SMSPolicy(domain=DOMAIN, **policy), self.submit, self.store, self.events,
            self.clock, remote="smsc.test",
        )
        return self.gateway

    def deliver(self, body=b"hello", address=NUMBER, queue_id="Q1", headers=None):
        entry = makeEntry(queue_id, [address])
        entry.tag = "otp"
        entry.metadata = {"user": "7"}
        data = mail(body) if headers is None else mail(body, headers)
        return entry, self.successResultOf(self.gateway.deliver(entry, address, data))


class SendTests(GatewayTestsMixin, SynchronousTestCase):
    def test_singlePart(self):
        """
        A short GSM text is one submit_sm: international destination,
        alphanumeric source, receipt requested, data_coding 0, no UDH; the
        outcome is a 250 with no event of the scheduler's; one
        sms_submitted event and one stored submission.
        """
        self.makeGateway()
        _, outcome = self.deliver(b"Your code is 1234 {ok}")
        fields = self.submit.calls[0]
        self.assertEqual(
            (fields["dest_addr_ton"], fields["dest_addr_npi"], fields["destination_addr"]),
            (1, 1, b"393331234567"),
        )
        self.assertEqual((fields["source_addr_ton"], fields["source_addr"]), (5, b"Shop"))
        self.assertEqual((fields["registered_delivery"], fields["data_coding"], fields["esm_class"]), (1, 0, 0))
        self.assertEqual(fields["short_message"], b"Your code is 1234 \x1b(ok\x1b)")
        self.assertEqual((outcome.reply.code, outcome.event), (250, ""))
        [event] = self.events.ofType("sms_submitted")
        self.assertEqual(event[3]["message_id"], "101")
        self.assertEqual((event[3]["part"], event[3]["parts"], event[3]["encoding"]), (1, 1, "gsm"))
        stored = self.successResultOf(self.store.findSMSSubmission("101"))
        self.assertEqual((stored.queue_id, stored.recipient, stored.tag), ("Q1", NUMBER, "otp"))

    def test_twoPartsWithUDH(self):
        """
        300 characters go as 2 parts with one concatenation reference and
        the UDHI bit.
        """
        self.makeGateway()
        _, outcome = self.deliver(b"x" * 300)
        reference = concatenationReference("Q1", NUMBER)
        headers = [c["short_message"][:6] for c in self.submit.calls]
        self.assertEqual(headers, [bytes([5, 0, 3, reference, 2, 1]), bytes([5, 0, 3, reference, 2, 2])])
        self.assertEqual([c["esm_class"] for c in self.submit.calls], [0x40, 0x40])
        self.assertEqual(len(self.events.ofType("sms_submitted")), 2)
        self.assertIn("101, 102", outcome.reply.text)

    def test_ucs2(self):
        """
        Cyrillic text goes as UCS-2 (data_coding 8).
        """
        self.makeGateway()
        self.deliver("Привет".encode("utf-8"), headers=b"Content-Type: text/plain; charset=utf-8\r\n")
        self.assertEqual(self.submit.calls[0]["data_coding"], 8)
        self.assertEqual(self.submit.calls[0]["short_message"], "Привет".encode("utf-16-be"))

    def test_refusedPartIsFinal(self):
        """
        A part the SMSC refuses for good makes a 5xx outcome with an
        sms_failed event naming the status.
        """
        self.makeGateway([SubmitRefused(Status.ESME_RINVDSTADR)])
        _, outcome = self.deliver()
        self.assertEqual((outcome.reply.code, outcome.event), (550, "sms_failed"))
        self.assertEqual(outcome.detail["smpp_status"], "ESME_RINVDSTADR")

    def test_temporaryTrouble(self):
        """
        No session, a lost one, or a temporary status give a 4xx outcome
        (the scheduler retries).
        """
        for error in (NotConnected("down"), SessionLost("gone"), SubmitRefused(Status.ESME_RSYSERR)):
            self.makeGateway([error])
            _, outcome = self.deliver()
            self.assertEqual((outcome.reply.code, outcome.event), (451, None))

    def test_retrySkipsSubmittedParts(self):
        """
        After a part failed temporarily, the next attempt sends only the
        parts the store does not have yet, with the same reference.
        """
        self.makeGateway(["A1", NotConnected("down")])
        _, first = self.deliver(b"y" * 300)
        self.assertEqual(first.reply.code, 451)
        _, second = self.deliver(b"y" * 300)
        self.assertEqual(second.reply.code, 250)
        self.assertEqual(len(self.submit.calls), 3)
        self.assertEqual(self.submit.calls[2]["short_message"][5], 2)
        self.assertIn("a1, 101", second.reply.text)

    def test_badMessageRefused(self):
        """
        A text that became empty or a bad sender gives a 5xx sms_failed
        outcome without any submit.
        """
        self.makeGateway()
        _, outcome = self.deliver(b"")
        self.assertEqual((outcome.reply.code, outcome.reply.status, outcome.event), (554, "5.6.0", "sms_failed"))
        _, outcome = self.deliver(b"hi", headers=b"X-SmartRelay-SMS-From: ###\r\n")
        self.assertEqual(outcome.reply.code, 554)
        self.assertEqual(self.submit.calls, [])

    def test_storeDownStillSends(self):
        """
        A store that cannot be read or written does not stop the SMS; it
        is logged.
        """
        self.makeGateway()

        class DownStore:
            def smsSubmissions(self, queue_id, recipient):
                return fail(OSError("down"))

            def addSMSSubmission(self, submission):
                return fail(OSError("down"))

        self.gateway.store = DownStore()
        _, outcome = self.deliver()
        self.assertEqual(outcome.reply.code, 250)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 2)


def receipt(message_id=b"1A0", state=2, text=None, tlvs=True, command=Command.deliver_sm, esm=0x04):
    text = text if text is not None else b"id:%s sub:001 dlvrd:001 stat:DELIVRD err:000 text:x" % message_id
    extra = (stringTLV(Tag.receipted_message_id, message_id), intTLV(Tag.message_state, state, 1)) if tlvs else ()
    fields = {"esm_class": esm}
    if command == Command.deliver_sm:
        fields["short_message"] = text
    else:
        extra = extra + (TLV(Tag.message_payload, text),)
    return makePDU(command, 1, tlvs=extra, **fields)


class ReceiptTests(GatewayTestsMixin, SynchronousTestCase):
    def remember(self, message_id="1A0", part=1, parts=1):
        self.successResultOf(
            self.store.addSMSSubmission(
                SMSSubmission(message_id=message_id, queue_id="Q9", recipient=NUMBER,
                              part=part, parts=parts, time=0.0, tag="otp", metadata={"k": "v"})
            )
        )

    def test_readReceiptTLVsFirst(self):
        """
        The TLVs win over the text; the text fills in what they lack.
        """
        r = readReceipt(receipt(b"1A0", 2, b"id:999 stat:UNDELIV err:012"))
        self.assertEqual((r.message_id, r.state, r.error), ("1A0", "delivered", "012"))
        r = readReceipt(receipt(tlvs=False, text=b"id:0042 sub:001 dlvrd:000 stat:UNDELIV err:034"))
        self.assertEqual((r.message_id, r.state, r.eventType), ("0042", "undeliverable", "sms_failed"))
        self.assertIsNone(readReceipt(receipt(tlvs=False, text=b"garbage")))

    def test_deliveredReceipt(self):
        """
        A DELIVRD receipt becomes sms_delivered for the stored message and
        recipient, with its tag and metadata.
        """
        self.makeGateway()
        self.remember()
        self.gateway.received(receipt())
        [event] = self.events.ofType("sms_delivered")
        self.assertEqual(event[:3], ("sms_delivered", "Q9", NUMBER))
        self.assertEqual((event[3]["state"], event[3]["part"]), ("delivered", 1))

    def test_failedReceiptAndDataSM(self):
        """
        A data_sm receipt with an UNDELIV text (message_payload) becomes
        sms_failed.
        """
        self.makeGateway()
        self.remember("77")
        self.gateway.received(receipt(b"77", tlvs=False, command=Command.data_sm,
                                      text=b"id:77 stat:UNDELIV err:001"))
        [event] = self.events.ofType("sms_failed")
        self.assertEqual((event[3]["state"], event[3]["error"]), ("undeliverable", "001"))

    def test_decimalAndHexIDs(self):
        """
        A receipt giving the id in decimal finds a submission known by its
        hex id, and the other way round.
        """
        self.makeGateway()
        self.remember("1A0")
        self.remember("999", part=1)
        self.gateway.received(receipt(b"416", tlvs=False, text=b"id:416 stat:DELIVRD"))
        self.gateway.received(receipt(b"3E7", tlvs=False, text=b"id:3E7 stat:DELIVRD"))
        self.assertEqual(len(self.events.ofType("sms_delivered")), 2)

    def test_receiptBeforeTheIDIsStored(self):
        """
        A receipt whose id the store does not know yet is looked up again
        later and matched then.
        """
        self.makeGateway()
        self.gateway.received(receipt())
        self.assertEqual(self.events.emitted, [])
        self.remember()
        self.clock.advance(1)
        self.assertEqual(len(self.events.ofType("sms_delivered")), 1)

    def test_unmatchedGivesUp(self):
        """
        A receipt nobody sent is looked up a few times, then logged and
        dropped; nothing is left scheduled.
        """
        self.makeGateway()
        self.gateway.received(receipt(b"404"))
        self.clock.pump([1, 5, 30, 120, 600, 600])
        self.assertEqual(self.events.emitted, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_intermediateAndMobileOriginated(self):
        """
        ENROUTE / ACCEPTD receipts and messages from phones make no event.
        """
        self.makeGateway()
        self.remember()
        self.gateway.received(receipt(state=1))
        self.gateway.received(receipt(state=6))
        self.gateway.received(receipt(esm=0))
        self.assertEqual(self.events.emitted, [])

    def test_stopCancelsLookups(self):
        """
        stop() cancels the pending look-ups.
        """
        self.makeGateway()
        self.gateway.received(receipt(b"404"))
        self.gateway.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])


class SchedulerTests(GatewayTestsMixin, SynchronousTestCase):
    """
    The gateway as the delivery scheduler's transport.
    """

    def makeScheduler(self, answers=()):
        self.makeGateway(answers)
        self.spool = FakeSpool()
        self.scheduler = DeliveryScheduler(
            spool=self.spool, router=FakeRouter(), connector=None, events=self.events,
            clock=self.clock, retry=Delays((60,)), maxAge=3600.0, maxConnections=1,
            store=self.store, suppress=True, transports=(self.gateway,),
        )
        self.scheduler.startService()
        return self.scheduler

    def test_submittedIsFinal(self):
        """
        An SMS recipient is submitted by the gateway: the spool records it
        delivered, the events are the gateway's sms_submitted only.
        """
        self.makeScheduler()
        entry = self.spool.add(makeEntry("Q1", [NUMBER]), mail(b"hello"))
        self.scheduler.enqueue(entry)
        self.clock.advance(0)
        self.assertEqual(self.spool.records[-1][1][0].state, "delivered")
        self.assertEqual([e[0] for e in self.events.emitted], ["sms_submitted"])

    def test_temporaryDeferredThenSent(self):
        """
        No SMSC session: the recipient is deferred with the retry schedule
        and submitted on the next attempt.
        """
        self.makeScheduler([NotConnected("no session")])
        entry = self.spool.add(makeEntry("Q1", [NUMBER]), mail(b"hello"))
        self.scheduler.enqueue(entry)
        self.clock.advance(0)
        [deferred] = self.events.ofType("deferred")
        self.assertIn("no session", deferred[3]["reply"])
        self.clock.advance(60)
        self.assertEqual(len(self.events.ofType("sms_submitted")), 1)
        self.assertTrue(entry.done)

    def test_refusedIsSMSFailed(self):
        """
        A final refusal is recorded bounced with an sms_failed event (not
        bounced, so no suppression).
        """
        self.makeScheduler([SubmitRefused(Status.ESME_RINVDSTADR)])
        entry = self.spool.add(makeEntry("Q1", [NUMBER]), mail(b"hello"))
        self.scheduler.enqueue(entry)
        self.clock.advance(0)
        self.assertEqual(self.spool.records[-1][1][0].state, "bounced")
        [failed] = self.events.ofType("sms_failed")
        self.assertEqual(failed[3]["smpp_status"], "ESME_RINVDSTADR")
        self.assertEqual(self.events.ofType("bounced"), [])

    def test_suppressedNumber(self):
        """
        A phone number on the suppression list is not sent.
        """
        self.makeScheduler()
        self.successResultOf(
            self.store.addSuppression(SuppressionEntry(address=NUMBER, reason="manual", time=0.0))
        )
        entry = self.spool.add(makeEntry("Q1", [NUMBER]), mail(b"hello"))
        self.scheduler.enqueue(entry)
        self.clock.advance(0)
        self.assertEqual(self.submit.calls, [])
        self.assertEqual([e[0] for e in self.events.emitted], ["suppressed"])
