"""
Tests for L{smartrelay.sms.client}: the reconnecting, binding SMS client
against fake SMSCs over in-memory connections.
"""

from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.test.iosim import connect, makeFakeClient, makeFakeServer
from twisted.trial.unittest import SynchronousTestCase

from smartrelay.sms.client import NotConnected, SMSClient
from smartrelay.sms.codec import Status
from smartrelay.sms.protocol import SessionLost, SessionSettings, SubmitRefused
from smartrelay.sms.testing import FakeSMSC, SMSCScript


class FakeEndpoint:
    """
    Connects each attempt to a new L{FakeSMSC} in memory.
    """

    def __init__(self, scripts):
        self.scripts = list(scripts)
        self.smscs = []
        self.pumps = []

    def connect(self, factory):
        script = self.scripts.pop(0) if len(self.scripts) > 1 else self.scripts[0]
        smsc = FakeSMSC(script)
        protocol = factory.buildProtocol(None)
        self.pumps.append(
            connect(smsc, makeFakeServer(smsc), protocol, makeFakeClient(protocol), greet=False)
        )
        self.smscs.append(smsc)
        return succeed(protocol)

    def flush(self):
        for pump in self.pumps:
            pump.flush()


class ClientTests(SynchronousTestCase):
    def makeClient(self, *scripts, **kw):
        self.clock = Clock()
        self.endpoint = FakeEndpoint(scripts or [SMSCScript()])
        self.receipts = []
        client = SMSClient(
            self.endpoint, self.clock,
            SessionSettings(system_id=b"esme", responseTimeout=5, **kw),
            self.receipts.append, queueTimeout=30, retryPolicy=lambda attempt: 2.0,
        )
        client.startService()
        self.endpoint.flush()
        return client

    def submit(self, client, text=b"hi"):
        return client.submit({"destination_addr": b"39333", "short_message": text})

    def test_submitOnBoundSession(self):
        """
        The client binds on connecting and submits through the session.
        """
        client = self.makeClient()
        self.assertTrue(client.bound)
        d = self.submit(client)
        self.endpoint.flush()
        self.assertEqual(self.successResultOf(d), "1A0")

    def test_bindFailureRetried(self):
        """
        A refused bind is retried after the back-off; submits wait for the
        bound session.
        """
        client = self.makeClient(SMSCScript(bindStatus=Status.ESME_RBINDFAIL), SMSCScript())
        self.assertFalse(client.bound)
        d = self.submit(client)
        self.assertNoResult(d)
        self.clock.advance(2)
        self.endpoint.flush()
        self.assertTrue(client.bound)
        self.endpoint.flush()
        self.assertEqual(self.successResultOf(d), "1A0")
        self.assertEqual(len(self.endpoint.smscs), 2)

    def test_unansweredResentOnNextBind(self):
        """
        Submits unanswered when the session drops are sent again, in their
        order and before newer ones, on the next bind.
        """
        client = self.makeClient(SMSCScript(submitStatuses=[None, None]), SMSCScript())
        first, second = self.submit(client, b"1"), self.submit(client, b"2")
        self.endpoint.flush()
        self.clock.advance(5)  # response timeout: the session is dropped
        self.endpoint.flush()
        third = self.submit(client, b"3")
        self.clock.advance(2)
        self.endpoint.flush()
        self.endpoint.flush()
        again = self.endpoint.smscs[1].submits
        self.assertEqual([p.get("short_message") for p in again], [b"1", b"2", b"3"])
        self.assertEqual(
            [self.successResultOf(d) for d in (first, second, third)], ["1A0", "1A1", "1A2"]
        )

    def test_inFlight(self):
        """
        L{SMSClient.inFlight} counts the submits sent and not answered yet;
        without a session it is 0.
        """
        client = self.makeClient(SMSCScript(submitStatuses=[None, Status.ESME_ROK]))
        self.assertEqual(client.inFlight, 0)
        self.submit(client, b"1")
        self.endpoint.flush()
        self.assertEqual(client.inFlight, 1)
        self.clock.advance(5)  # response timeout: the session is dropped
        self.endpoint.flush()
        self.assertFalse(client.bound)
        self.assertEqual(client.inFlight, 0)
        self.assertEqual(client.waiting, 1)

    def test_refusalIsFinal(self):
        """
        A refusal by the SMSC reaches the caller; it is not retried.
        """
        client = self.makeClient(SMSCScript(submitStatuses=[Status.ESME_RINVDSTADR]))
        d = self.submit(client)
        self.endpoint.flush()
        self.failureResultOf(d, SubmitRefused)
        self.assertEqual(len(self.endpoint.smscs[0].submits), 1)

    def test_notConnected(self):
        """
        A submit that finds no bound session within the queue timeout fails
        with L{NotConnected}.
        """
        client = self.makeClient(SMSCScript(bindStatus=Status.ESME_RINVPASWD))
        d = self.submit(client)
        self.clock.advance(30)
        self.failureResultOf(d, NotConnected)
        self.assertEqual(client.waiting, 0)

    def test_receiptsHandedOn(self):
        """
        Receipts on the session reach the client's receiver.
        """
        client = self.makeClient(SMSCScript(receipts=True))
        self.submit(client)
        self.endpoint.flush()
        self.assertEqual([p.name for p in self.receipts], ["deliver_sm"])

    def test_stopUnbinds(self):
        """
        Stopping unbinds the session and fails waiting submits; a submit
        after the stop fails at once.
        """
        client = self.makeClient(SMSCScript(submitStatuses=[None]))
        d = self.submit(client)
        self.endpoint.flush()
        stopped = client.stopService()
        self.endpoint.flush()
        self.successResultOf(stopped)
        self.assertEqual(self.endpoint.smscs[0].received[-1].name, "unbind")
        self.failureResultOf(d, NotConnected)
        self.failureResultOf(self.submit(client), NotConnected)
        self.assertEqual(self.clock.getDelayedCalls(), [])
