"""
Tests for the C{[sms]} wiring of L{smartrelay.service}: the whole relay on a
memory reactor with synchronous thread pools and the in-process fake SMSC
(L{smartrelay.sms.testing}): what the submission listener answers for SMS
recipients, a transaction with mail and SMS recipients, the SMPP session
started with the relay and unbound when it stops.
"""

import os

from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols.basic import LineReceiver
from twisted.test.iosim import ConnectionCompleter, FakeTransport, connect
from twisted.trial.unittest import SynchronousTestCase

from smartrelay.outbound.testing import ScriptedSMTPServer, SMTPScript
from smartrelay.service import EVENT_WRITE_INTERVAL, makeRelayService
from smartrelay.sms.codec import Command
from smartrelay.sms.testing import FakeSMSCFactory, SMSCScript

from tests.test_service import SynchronousThreads, wiringConfig

SMSC_PORT = 2775
SMS = (
    "[sms]\ndomain = sms.example.com\nsmsc = tcp:host=127.0.0.1:port=%d\n"
    "system_id = relay\npassword = pw\nsource_addr = Shop\nmax_parts = 2\n" % SMSC_PORT
)
NUMBER = b"+393331234567@sms.example.com"


class Transaction(LineReceiver):
    """
    An SMTP client that sends one message to several recipients, a
    command at a time, and records every reply line.
    """

    def __init__(self, recipients: list, message: bytes) -> None:
        self.message = message
        self.commands = [b"EHLO client.test", b"MAIL FROM:<app@example.com>"]
        self.commands += [b"RCPT TO:<" + r + b">" for r in recipients] + [b"DATA"]
        self.replies: list = []

    def lineReceived(self, line: bytes) -> None:
        self.replies.append(line)
        if line[3:4] == b"-":
            return
        if line.startswith(b"354"):
            self.transport.write(self.message + b".\r\n")
        elif self.commands:
            self.sendLine(self.commands.pop(0))
        elif not line.startswith(b"221"):
            self.sendLine(b"QUIT")


class SMSWiringTests(SynchronousTestCase):
    """
    The relay with C{[sms]} on a L{MemoryReactorClock}.
    """

    def setUp(self):
        self.dataDir = os.path.abspath(self.mktemp())
        self.reactor = MemoryReactorClock()
        self.smsc = FakeSMSCFactory(SMSCScript(receipts=True))
        self.reactor.listenTCP(SMSC_PORT, self.smsc, interface="127.0.0.1")
        self.smarthost: list = []
        self.reactor.listenTCP(
            2599,
            Factory.forProtocol(
                lambda: self.smarthost.append(ScriptedSMTPServer(SMTPScript()))
                or self.smarthost[-1]
            ),
            interface="127.0.0.1",
        )
        self.completer = ConnectionCompleter(self.reactor)
        self.pumps: list = []

    def start(self, extra=SMS):
        relay = makeRelayService(
            wiringConfig(self.dataDir, extra=extra), self.reactor, SynchronousThreads()
        )
        relay.startService()
        self.successResultOf(relay.whenReady())
        self.pump()
        return relay

    def pump(self, rounds=10):
        """
        Complete the connections asked for and move bytes on all of them.
        """
        for _ in range(rounds):
            while True:
                pump = self.completer.succeedOnce()
                if pump is None:
                    break
                self.pumps.append(pump)
            for pump in self.pumps:
                pump.flush()

    def submit(self, relay, recipients, message):
        [factory] = [s[1] for s in self.reactor.tcpServers if s[0] == 2525]
        peer = IPv4Address("TCP", "127.0.0.1", 40000)
        server = factory.buildProtocol(peer)
        client = Transaction(recipients, message)
        connect(
            server,
            FakeTransport(server, True, IPv4Address("TCP", "127.0.0.1", 2525), peer),
            client,
            FakeTransport(client, False, peer, IPv4Address("TCP", "127.0.0.1", 2525)),
            clock=self.reactor,
        ).flush()
        return client.replies

    def stop(self, relay):
        stopped = relay.stopService()
        for _ in range(5):
            self.pump()
            self.reactor.advance(1)
        self.successResultOf(stopped)

    def spooled(self):
        return [n for n in os.listdir(os.path.join(self.dataDir, "spool")) if n != "tmp"]

    def test_boundAtStart(self):
        """
        With C{[sms] domain} the relay binds a transceiver session to the
        SMSC with the configured system id once it is ready, and unbinds
        when it stops.
        """
        relay = self.start()
        self.assertTrue(relay.smsClient.bound)
        [session] = self.smsc.sessions
        bind = session.received[0]
        self.assertEqual(bind.command_id, Command.bind_transceiver)
        self.assertEqual((bind.get("system_id"), bind.get("password")), (b"relay", b"pw"))
        self.stop(relay)
        self.assertEqual(session.received[-1].command_id, Command.unbind)
        self.assertFalse(relay.smsClient.running)

    def test_noSMS(self):
        """
        Without C{[sms] domain} there is no SMS client and nothing connects
        to an SMSC.
        """
        relay = self.start(extra="")
        self.assertIsNone(relay.smsClient)
        self.assertEqual(self.smsc.sessions, [])
        self.stop(relay)

    def test_badNumber(self):
        """
        A recipient at the SMS domain that is not an E.164 number is refused
        at RCPT with C{553 5.1.3}.
        """
        relay = self.start()
        replies = self.submit(relay, [b"3331234567@sms.example.com"], b"Subject: x\r\n\r\nhi\r\n")
        [refusal] = [r for r in replies if r.startswith(b"553")]
        self.assertTrue(refusal.startswith(b"553 5.1.3 an SMS recipient is +<E.164 number>@"),
                        refusal)
        self.stop(relay)

    def test_emptyText(self):
        """
        A message for an SMS recipient without any text is refused at the
        end of DATA with C{554 5.6.0}: nothing is queued, the recipients get
        C{rejected} events.
        """
        relay = self.start()
        replies = self.submit(
            relay, [b"reader@example.org", NUMBER], b"Subject: x\r\n\r\n-- \r\nsig\r\n"
        )
        self.assertIn(b"554 5.6.0 the message has no text for an SMS "
                      b"(an empty text/plain part)", replies)
        self.assertEqual(self.spooled(), [])
        events = self.successResultOf(relay.store.queryEvents(type="rejected"))
        self.assertEqual(
            sorted(e.recipient for e in events.events if e.type == "rejected"),
            ["+393331234567@sms.example.com", "reader@example.org"],
        )
        self.stop(relay)

    def test_tooLong(self):
        """
        A text that needs more than C{max_parts} parts is refused at the
        end of DATA with C{554 5.3.4}; nothing is sent to the SMSC.
        """
        relay = self.start()
        replies = self.submit(relay, [NUMBER], b"Subject: x\r\n\r\n" + b"a" * 307 + b"\r\n")
        self.assertIn(b"554 5.3.4 the text needs 3 SMS parts; at most 2 are allowed", replies)
        self.assertEqual(self.spooled(), [])
        self.pump()
        self.assertEqual(self.smsc.sessions[0].submits, [])
        self.stop(relay)

    def test_mixed(self):
        """
        One transaction with a mail and an SMS recipient: the mail goes to
        the smarthost, the text to the SMSC as submit_sm (alphanumeric
        sender 5/0, destination 1/1, receipt requested); the receipt makes
        C{sms_delivered}.
        """
        relay = self.start()
        replies = self.submit(
            relay,
            [b"reader@example.org", NUMBER],
            b"From: app@example.com\r\nSubject: x\r\n\r\nYour code is 1234 [ok]\r\n",
        )
        [ok] = [r for r in replies if r.startswith(b"250 2.0.0 OK")]
        queueID = ok.split()[-1].decode()
        self.pump()
        [submit] = self.smsc.sessions[0].submits
        self.assertEqual(
            (submit.get("destination_addr"), submit.get("dest_addr_ton"),
             submit.get("dest_addr_npi"), submit.get("source_addr"),
             submit.get("source_addr_ton"), submit.get("registered_delivery")),
            (b"393331234567", 1, 1, b"Shop", 5, 1),
        )
        self.assertEqual(submit.get("short_message"), b"Your code is 1234 \x1b<ok\x1b>")
        [server] = self.smarthost
        self.assertIn(b"RCPT TO:<reader@example.org>", server.commands)
        self.assertNotIn(b"sms.example.com", b"".join(server.commands))
        # Events are written in batches at most every EVENT_WRITE_INTERVAL.
        self.reactor.advance(EVENT_WRITE_INTERVAL)
        events = self.successResultOf(relay.store.eventsForMessage(queueID))
        types = {(e.type, e.recipient) for e in events}
        self.assertTrue(
            {("accepted", "reader@example.org"), ("delivered", "reader@example.org"),
             ("accepted", NUMBER.decode()), ("sms_submitted", NUMBER.decode()),
             ("sms_delivered", NUMBER.decode())} <= types,
            types,
        )
        self.stop(relay)
        self.assertEqual(self.spooled(), [])

    def test_maxBinds(self):
        """
        C{[sms] max_binds} (issue 17) gives the client the relay's lease
        keeper and the limit: the bind holds a lease on C{sms-bind:<smsc>}
        while bound and gives it back when the relay stops.
        """
        relay = self.start(extra=SMS + "max_binds = 2\n")
        client = relay.smsClient
        self.assertIs(client.leases, relay.leaseKeeper)
        self.assertEqual(client.maxBinds, 2)
        self.assertTrue(client.bound)
        resource = "sms-bind:tcp:host=127.0.0.1:port=%d" % SMSC_PORT
        self.assertIsNotNone(client.bindLease)
        self.assertEqual(client.bindLease.resource, resource)
        self.assertEqual(relay.leaseKeeper.heldBy(resource), 1)
        self.stop(relay)
        self.assertEqual(relay.leaseKeeper.heldBy(resource), 0)

    def test_noMaxBinds(self):
        """
        Without C{[sms] max_binds} the client still has the keeper but no
        limit, and binds without a lease.
        """
        relay = self.start()
        client = relay.smsClient
        self.assertIs(client.leases, relay.leaseKeeper)
        self.assertIsNone(client.maxBinds)
        self.assertTrue(client.bound)
        self.assertIsNone(client.bindLease)
        self.stop(relay)

    def test_rateIsTheCluster(self):
        """
        With C{[sms] rate} the submits take their tokens from the store's
        bucket C{sms:<smsc>} (shared by the nodes of a Redis store), not
        from a pacing of the session's own: two SMS at one a second go out
        a second apart.
        """
        relay = self.start(extra=SMS + "rate = 1\n")
        client = relay.smsClient
        self.assertEqual((client.rate, client.settings.rate), (1.0, None))
        self.assertIs(client.rates, relay.store)
        self.assertEqual(client.rateKey, "sms:tcp:host=127.0.0.1:port=%d" % SMSC_PORT)
        replies = self.submit(
            relay,
            [NUMBER, b"+393337654321@sms.example.com"],
            b"From: app@example.com\r\nSubject: x\r\n\r\nYour code is 1234\r\n",
        )
        self.assertTrue([r for r in replies if r.startswith(b"250 2.0.0 OK")], replies)
        self.pump()
        self.assertEqual(len(self.smsc.sessions[0].submits), 1)
        self.reactor.advance(0.5)
        self.pump()
        self.assertEqual(len(self.smsc.sessions[0].submits), 1)
        self.reactor.advance(0.6)
        self.pump()
        self.assertEqual(len(self.smsc.sessions[0].submits), 2)
        self.stop(relay)
