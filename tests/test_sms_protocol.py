"""
Tests for L{smartrelay.sms.protocol}: the ESME session against the fake
SMSC of L{smartrelay.sms.testing}, over an in-memory connection and a
fake clock.
"""

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.test.iosim import connect, makeFakeClient, makeFakeServer
from twisted.trial.unittest import SynchronousTestCase

from smartrelay.sms.codec import Command, Status, Tag, decode, encode, makePDU
from smartrelay.sms.protocol import (
    MAX_PAUSE,
    BindFailed,
    ESMEProtocol,
    SessionLost,
    SessionSettings,
    SubmitRefused,
)
from smartrelay.sms.testing import FakeSMSC, SMSCScript


class SessionTestsMixin:
    def connect(self, script=None, **settings):
        self.clock = Clock()
        self.smsc = FakeSMSC(script or SMSCScript())
        self.delivered = []
        settings.setdefault("system_id", b"esme")
        settings.setdefault("password", b"pw")
        self.esme = ESMEProtocol(self.clock, SessionSettings(**settings), self.delivered.append)
        self.pump = connect(
            self.smsc, makeFakeServer(self.smsc), self.esme, makeFakeClient(self.esme),
            greet=False,
        )
        self.pump.flush()
        return self.esme

    def bind(self, script=None, **settings):
        esme = self.connect(script, **settings)
        d = esme.bind()
        self.pump.flush()
        self.assertEqual(self.successResultOf(d), b"FakeSMSC")
        return esme

    def submit(self, text=b"hi", **fields):
        return self.esme.submit({"destination_addr": b"393331234567", "short_message": text, **fields})


class BindTests(SessionTestsMixin, SynchronousTestCase):
    def test_bindTransceiver(self):
        """
        The bind is a bind_transceiver with the system id, password and
        interface version 3.4.
        """
        self.bind(system_id=b"shop", password=b"secret")
        bind = self.smsc.received[0]
        self.assertEqual(bind.name, "bind_transceiver")
        self.assertEqual(
            (bind.get("system_id"), bind.get("password"), bind.get("interface_version")),
            (b"shop", b"secret", 0x34),
        )
        self.assertTrue(self.esme.bound)

    def test_bindRefused(self):
        """
        A refused bind fails with L{BindFailed} naming the status, and the
        connection is closed.
        """
        esme = self.connect(SMSCScript(bindStatus=Status.ESME_RINVPASWD))
        d = esme.bind()
        self.pump.flush()
        failure = self.failureResultOf(d, BindFailed)
        self.assertEqual(failure.value.status, Status.ESME_RINVPASWD)
        self.assertIn("ESME_RINVPASWD", str(failure.value))
        self.assertFalse(esme.connected)

    def test_bindUnanswered(self):
        """
        A bind without an answer within the response timeout drops the
        connection; the bind fails.
        """
        esme = self.connect(responseTimeout=10)
        self.smsc.handle = lambda pdu: None
        d = esme.bind()
        self.pump.flush()
        self.clock.advance(10)
        self.pump.flush()
        self.failureResultOf(d, BindFailed)
        self.assertFalse(esme.connected)

    def test_submitBeforeBindWaits(self):
        """
        A submit asked for before the bind is answered goes out after it.
        """
        esme = self.connect()
        d = self.submit()
        esme.bind()
        self.pump.flush()
        self.assertEqual(self.successResultOf(d), "1A0")


class SubmitTests(SessionTestsMixin, SynchronousTestCase):
    def test_submitMessageID(self):
        """
        An accepted submit_sm fires with the SMSC's message id; the PDU
        carries the given fields.
        """
        self.bind()
        d = self.submit(b"hello", registered_delivery=1)
        self.pump.flush()
        self.assertEqual(self.successResultOf(d), "1A0")
        pdu = self.smsc.submits[0]
        self.assertEqual((pdu.get("short_message"), pdu.get("registered_delivery")), (b"hello", 1))

    def test_window(self):
        """
        At most C{window} submits are unanswered at once; the rest follow
        as answers come.
        """
        script = SMSCScript(submitStatuses=[None] * 3)
        self.bind(script, window=2)
        results = [self.submit(b"%d" % i) for i in range(5)]
        self.pump.flush()
        self.assertEqual(len(self.smsc.submits), 2)
        self.assertEqual(self.esme.inFlight, 2)
        self.assertEqual(self.esme.queued, 3)
        # Answer the first by hand: one more goes out (and is not answered).
        from smartrelay.sms.codec import responseTo

        self.smsc.send(responseTo(self.smsc.submits[0], message_id=b"X1"))
        self.pump.flush()
        self.assertEqual(self.successResultOf(results[0]), "X1")
        self.assertEqual(len(self.smsc.submits), 3)

    def test_rate(self):
        """
        With a rate, submits are spaced 1/rate seconds apart.
        """
        self.bind(rate=2)
        results = [self.submit() for _ in range(3)]
        self.pump.flush()
        self.assertEqual(len(self.smsc.submits), 1)
        self.clock.advance(0.5)
        self.pump.flush()
        self.assertEqual(len(self.smsc.submits), 2)
        self.clock.advance(0.5)
        self.pump.flush()
        self.assertEqual(len(self.smsc.submits), 3)
        for d in results:
            self.successResultOf(d)

    def test_throttledRetriesSamePDUFirst(self):
        """
        ESME_RTHROTTLED pauses the session for a second; the refused PDU is
        then sent again before anything submitted after it.
        """
        script = SMSCScript(submitStatuses=[Status.ESME_RTHROTTLED])
        self.bind(script, window=1)
        first, second = self.submit(b"first"), self.submit(b"second")
        self.pump.flush()
        self.assertEqual([p.get("short_message") for p in self.smsc.submits], [b"first"])
        self.clock.advance(0.9)
        self.pump.flush()
        self.assertEqual(len(self.smsc.submits), 1)
        self.clock.advance(0.1)
        self.pump.flush()
        self.assertEqual(
            [p.get("short_message") for p in self.smsc.submits], [b"first", b"first", b"second"]
        )
        self.assertEqual((self.successResultOf(first), self.successResultOf(second)), ("1A0", "1A1"))

    def test_queueFullPauseDoubles(self):
        """
        ESME_RMSGQFUL pauses too; each throttle in a row doubles the pause,
        up to L{MAX_PAUSE}; a success resets it.
        """
        script = SMSCScript(submitStatuses=[Status.ESME_RMSGQFUL] * 7)
        self.bind(script, window=1)
        d = self.submit()
        self.pump.flush()
        for pause in (1, 2, 4, 8, 16, MAX_PAUSE, MAX_PAUSE):
            self.assertNoResult(d)
            self.clock.advance(pause)
            self.pump.flush()
        self.assertEqual(self.successResultOf(d), "1A0")
        self.assertEqual(len(self.smsc.submits), 8)
        self.assertEqual(self.esme._pause, 0)

    def test_finalRefusal(self):
        """
        Any other status fails the submit with L{SubmitRefused} naming it;
        ESME_RSYSERR is temporary, ESME_RINVDSTADR is not.
        """
        script = SMSCScript(submitStatuses=[Status.ESME_RINVDSTADR, Status.ESME_RSYSERR])
        self.bind(script)
        first, second = self.submit(), self.submit()
        self.pump.flush()
        refused = self.failureResultOf(first, SubmitRefused).value
        self.assertEqual((refused.name, refused.temporary), ("ESME_RINVDSTADR", False))
        self.assertTrue(self.failureResultOf(second, SubmitRefused).value.temporary)

    def test_genericNack(self):
        """
        A generic_nack for a submit fails it with the nack's status.
        """
        self.bind(SMSCScript(submitStatuses=["nack"]))
        d = self.submit()
        self.pump.flush()
        self.assertEqual(self.failureResultOf(d, SubmitRefused).value.name, "ESME_RSYSERR")

    def test_noResponseDropsSession(self):
        """
        A submit unanswered within the response timeout ends the session:
        it and every queued submit fail with L{SessionLost}.
        """
        self.bind(SMSCScript(submitStatuses=[None]), window=1, responseTimeout=5)
        first, second = self.submit(), self.submit()
        self.pump.flush()
        self.clock.advance(5)
        self.pump.flush()
        self.failureResultOf(first, SessionLost)
        self.failureResultOf(second, SessionLost)
        self.assertFalse(self.esme.connected)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_unbindMidStream(self):
        """
        An unbind from the SMSC is answered and closes the session;
        unanswered submits fail with L{SessionLost}; later ones at once.
        """
        self.bind(SMSCScript(unbindAfter=1))
        first, second = self.submit(), self.submit()
        self.pump.flush()
        self.assertEqual(self.successResultOf(first), "1A0")
        self.failureResultOf(second, SessionLost)
        self.assertEqual(self.smsc.answered[-1].name, "unbind_resp")
        self.assertFalse(self.esme.connected)
        self.failureResultOf(self.submit(), SessionLost)

    def test_receiptBeforeSubmitResponse(self):
        """
        A receipt that arrives before its submit_sm_resp is answered and
        handed on; the submit still gets its id.
        """
        self.bind(SMSCScript(receiptFirst=True))
        d = self.submit()
        self.pump.flush()
        self.assertEqual(self.successResultOf(d), "1A0")
        self.assertEqual(len(self.delivered), 1)
        self.assertEqual(self.delivered[0].tlvString(Tag.receipted_message_id), b"1A0")
        self.assertEqual([p.name for p in self.smsc.answered], ["deliver_sm_resp"])


class LinkTests(SessionTestsMixin, SynchronousTestCase):
    def test_enquireLinkWhenIdle(self):
        """
        After the idle interval an enquire_link goes out; traffic postpones
        it.
        """
        self.bind(enquireLinkInterval=30)
        self.clock.advance(20)
        self.submit()
        self.pump.flush()
        self.clock.advance(20)
        self.pump.flush()
        self.assertNotIn("enquire_link", [p.name for p in self.smsc.received])
        self.clock.advance(10)
        self.pump.flush()
        self.assertEqual(self.smsc.received[-1].name, "enquire_link")
        self.assertTrue(self.esme.connected)

    def test_enquireLinkUnanswered(self):
        """
        An unanswered enquire_link drops the session.
        """
        self.bind(SMSCScript(answerEnquireLink=False), enquireLinkInterval=30, responseTimeout=5)
        self.clock.advance(30)
        self.pump.flush()
        self.clock.advance(5)
        self.pump.flush()
        self.assertFalse(self.esme.connected)

    def test_answersSMSCRequests(self):
        """
        enquire_link from the SMSC gets enquire_link_resp; data_sm gets
        data_sm_resp and is handed on; an unexpected command gets a
        generic_nack ESME_RINVCMDID.
        """
        self.bind()
        self.smsc.send(makePDU(Command.enquire_link, 5))
        self.smsc.send(makePDU(Command.data_sm, 6, esm_class=4))
        self.smsc.send(makePDU(Command.submit_sm, 7))
        self.pump.flush()
        self.assertEqual(
            [(p.name, p.sequence, p.status) for p in self.smsc.answered],
            [("enquire_link_resp", 5, 0), ("data_sm_resp", 6, 0),
             ("generic_nack", 7, Status.ESME_RINVCMDID)],
        )
        self.assertEqual(self.delivered[0].name, "data_sm")

    def test_badLengthFromSMSC(self):
        """
        A command_length out of range is answered with generic_nack
        ESME_RINVCMDLEN and the session is dropped.
        """
        transport = StringTransport()
        probe = ESMEProtocol(Clock(), SessionSettings(system_id=b"x", maxPDULength=100))
        probe.makeConnection(transport)
        probe.dataReceived((101).to_bytes(4, "big"))
        nack = decode(transport.value())
        self.assertEqual((nack.name, nack.status), ("generic_nack", Status.ESME_RINVCMDLEN))
        self.assertTrue(transport.disconnecting)

    def test_unreadablePDUNacked(self):
        """
        A request from the SMSC that does not parse gets a generic_nack with
        its sequence; the session goes on.
        """
        transport = StringTransport()
        esme = ESMEProtocol(Clock(), SessionSettings(system_id=b"x"))
        esme.makeConnection(transport)
        bad = encode(makePDU(Command.deliver_sm, 9))[:-2]
        esme.dataReceived(len(bad).to_bytes(4, "big") + bad[4:])
        nack = decode(transport.value())
        self.assertEqual((nack.name, nack.sequence, nack.status), ("generic_nack", 9, Status.ESME_RINVMSGLEN))
        self.assertFalse(transport.disconnecting)

    def test_unbindOnStop(self):
        """
        unbind() sends unbind, waits for unbind_resp and closes; queued
        submits fail with L{SessionLost}.
        """
        self.bind(SMSCScript(submitStatuses=[None]), window=1)
        first, second = self.submit(), self.submit()
        self.pump.flush()
        done = self.esme.unbind()
        self.pump.flush()
        self.successResultOf(done)
        self.assertEqual(self.smsc.received[-1].name, "unbind")
        self.failureResultOf(first, SessionLost)
        self.failureResultOf(second, SessionLost)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_unbindUnanswered(self):
        """
        An unbind the SMSC does not answer is cut off after the unbind
        timeout.
        """
        self.bind(unbindTimeout=3)
        self.smsc.handle = lambda pdu: None
        done = self.esme.unbind()
        self.pump.flush()
        self.assertNoResult(done)
        self.clock.advance(3)
        self.pump.flush()
        self.successResultOf(done)
