"""
End to end over SMPP against an SMSC nobody here wrote: the npm C{smpp}
package as a server (C{tests/js/smsc.js}, installed by C{test.sh} with
C{npm ci} in C{tests/js}), started by the test on a loopback port the OS
chooses, and a real C{twistd smartrelay} child process submitting to it.
What the package's own decoders read is checked: GSM 03.38 text with
extension characters, a 300-character text in two concatenated parts,
Cyrillic and CJK in UCS-2; and the receipts it sends become
C{sms_delivered} events.
"""

import json
import os
import shutil
import signal
import subprocess

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from tests.redisserver import freePort
from tests.sink import PROJECT, waitFor
from tests.test_e2e import RelayTestMixin, events, submit

JS = os.path.join(PROJECT, "tests", "js")
NODE = shutil.which("node") or shutil.which("nodejs")

GSM_TEXT = "Total 12€ [paid] at 10:30, ref #A-7"
LONG_TEXT = ("Your parcel 4711 is on its way and arrives tomorrow between 9 and 12. " * 5)[:299] + "!"
UCS2_TEXT = "Привет, мир! Ваш код 5521. 你好，世界"
NUMBER = "+393331234567@sms.example.com"


def message(text: str, subject: str = "sms", headers: str = "") -> str:
    return (
        f"From: App <app@example.com>\r\nSubject: {subject}\r\n{headers}"
        "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n"
        f"\r\n{text}\r\n-- \r\nThe signature, never sent\r\n"
    )


class NodeSMSC:
    """
    C{node tests/js/smsc.js RECORD}: started, its port read from its first
    line, stopped by its pid.
    """

    def __init__(self, directory: str) -> None:
        self.recordPath = os.path.join(directory, "smsc.jsonl")
        self.process = subprocess.Popen(
            [NODE, os.path.join(JS, "smsc.js"), self.recordPath],
            stdout=subprocess.PIPE,
            stderr=open(os.path.join(directory, "smsc.stderr"), "wb"),
        )
        line = self.process.stdout.readline()
        if not line:
            self.process.wait(10)
            raise AssertionError(
                "the npm smpp SMSC did not start (exit %s): %s"
                % (self.process.returncode, open(os.path.join(directory, "smsc.stderr")).read())
            )
        self.port = json.loads(line)["port"]

    def records(self, event=None) -> list:
        try:
            with open(self.recordPath, encoding="utf-8") as f:
                found = [json.loads(line) for line in f if line.strip()]
        except FileNotFoundError:
            return []
        return [r for r in found if event is None or r["event"] == event]

    def stop(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            self.process.wait(10)


class NpmSMSCTests(RelayTestMixin, TestCase):
    timeout = 120

    def setUp(self):
        if NODE is None:
            raise SkipTest("node is not installed (Debian: apt-get install nodejs npm)")
        if not os.path.isdir(os.path.join(JS, "node_modules", "smpp")):
            self.fail("the npm smpp package is missing: run npm ci in tests/js (test.sh does)")
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        self.directory = directory
        self.smsc = NodeSMSC(directory)
        self.addCleanup(self.smsc.stop)

    def smsConfig(self, sinkPort, smscPort):
        return self.relayConfig(
            sinkPort,
            "[sms]\ndomain = sms.example.com\nsmsc = tcp:host=127.0.0.1:port=%d\n"
            "system_id = relay\npassword = pw\nsource_addr = Shop\n" % smscPort,
        )

    @inlineCallbacks
    def test_textsAndReceipts(self):
        """
        Three messages to one number and one to a mail and a number: the
        SMSC decodes the GSM text with its escapes, the two parts of the
        300-character text (one reference, 2 parts, in order), the UCS-2
        text; every part gets an sms_submitted event, every receipt is
        acknowledged and becomes sms_delivered; the mail recipient is
        delivered by SMTP as usual; the relay unbinds when it stops.
        """
        sinkPort = self.startSink()
        relay = self.makeRelay(self.smsConfig(sinkPort, self.smsc.port))
        relay.start()
        yield relay.waitReady(reactor)
        queueIDs = []
        for recipients, text in [
            ([NUMBER], GSM_TEXT),
            ([NUMBER], LONG_TEXT),
            ([NUMBER], UCS2_TEXT),
            (["ok@example.org", NUMBER], "Mail and SMS in one go"),
        ]:
            (code, reply), refused = yield deferToThread(
                submit, relay.port, recipients,
                message(text, headers="X-SmartRelay-SMS-From: +15551230000\r\n"
                        if "ok@example.org" in recipients else ""),
            )
            self.assertEqual((code, refused), (250, []), reply)
            queueIDs.append(reply.split()[-1])
        # A bad number is refused at RCPT; a text too long at DATA.
        (code, reply), refused = yield deferToThread(
            submit, relay.port, ["ok@example.org", "0333@sms.example.com"], message("hi")
        )
        self.assertEqual((code, refused), (250, ["0333@sms.example.com"]))
        (code, reply), refused = yield deferToThread(
            submit, relay.port, [NUMBER], message("\r\n".join(["x" * 100] * 10))
        )
        self.assertEqual((code, reply.split()[0]), (554, "5.3.4"))

        yield waitFor(reactor, lambda: len(self.smsc.records("submit_sm")) >= 5)
        yield waitFor(reactor, lambda: len(self.smsc.records("deliver_sm_resp")) >= 5)
        yield waitFor(
            reactor,
            lambda: [e[0] for e in events(self.workdir)].count("sms_delivered") >= 5,
        )
        yield waitFor(reactor, lambda: len(self.sink.received) >= 2)
        yield relay.stop()

        [bind] = self.smsc.records("bind_transceiver")
        self.assertEqual((bind["system_id"], bind["password"]), ("relay", "pw"))
        submits = self.smsc.records("submit_sm")
        self.assertEqual(len(submits), 5)
        gsm, first, second, ucs2, mixed = submits
        self.assertEqual(
            (mixed["source_addr"], mixed["source_addr_ton"], mixed["source_addr_npi"]),
            ("15551230000", 1, 1),
        )
        # The mail copy does not carry the SMS sender id.
        self.assertTrue(all(b"x-smartrelay-sms-from" not in r.data.lower()
                            for r in self.sink.received))
        for s in submits[:4]:
            self.assertEqual(
                (s["destination_addr"], s["dest_addr_ton"], s["dest_addr_npi"],
                 s["source_addr"], s["source_addr_ton"], s["source_addr_npi"],
                 s["registered_delivery"]),
                ("393331234567", 1, 1, "Shop", 5, 0, 1),
            )
        self.assertEqual((gsm["text"], gsm["data_coding"], gsm["udh"]), (GSM_TEXT, 0, []))
        self.assertEqual((ucs2["text"], ucs2["data_coding"], ucs2["udh"]), (UCS2_TEXT, 8, []))
        self.assertEqual(mixed["text"], "Mail and SMS in one go")
        # The long text: two parts, IEI 0 (8-bit reference), same reference,
        # total 2, numbers 1 and 2; joined, the whole text.
        self.assertEqual([first["data_coding"], second["data_coding"]], [0, 0])
        self.assertTrue(first["esm_class"] & 0x40 and second["esm_class"] & 0x40)
        [udh1], [udh2] = first["udh"], second["udh"]
        self.assertEqual((udh1[:4], udh1[6:], udh2[:4], udh2[6:]), ("0003", "0201", "0003", "0202"))
        self.assertEqual(udh1[4:6], udh2[4:6])
        self.assertEqual(first["text"] + second["text"], LONG_TEXT)
        self.assertEqual(len(first["text"]), 153)
        self.assertTrue(all(r["command_status"] == 0 for r in self.smsc.records("deliver_sm_resp")))
        self.assertEqual(len(self.smsc.records("unbind")), 1)

        found = events(self.workdir)
        submitted = [json.loads(d) for t, q, r, d in found if t == "sms_submitted"]
        self.assertEqual(sorted(d["message_id"] for d in submitted),
                         sorted(s["message_id"] for s in submits))
        self.assertEqual(
            sorted((d["part"], d["parts"], d["encoding"]) for d in submitted),
            [(1, 1, "gsm"), (1, 1, "gsm"), (1, 1, "ucs2"), (1, 2, "gsm"), (2, 2, "gsm")],
        )
        delivered = [(q, r, json.loads(d)) for t, q, r, d in found if t == "sms_delivered"]
        self.assertEqual(sorted(d["message_id"] for _, _, d in delivered),
                         sorted(s["message_id"] for s in submits))
        self.assertTrue(all(r == NUMBER and q in queueIDs for q, r, _ in delivered))
        self.assertEqual({d["state"] for _, _, d in delivered}, {"delivered"})
        self.assertEqual(
            sorted(r for t, q, r, d in found if t == "delivered"),
            ["ok@example.org", "ok@example.org"],
        )
        self.assertEqual([t for t, q, r, d in found if t in ("sms_failed", "deferred")], [])

    @inlineCallbacks
    def test_survivesKill(self):
        """
        An SMS answered 250 while the SMSC cannot be reached survives a
        kill -9 of the relay: after the restart, with the SMSC up, it is
        submitted once and its receipt makes sms_delivered.
        """
        sinkPort = self.startSink()
        relay = self.makeRelay(self.smsConfig(sinkPort, freePort()))
        relay.start()
        yield relay.waitReady(reactor)
        (code, reply), refused = yield deferToThread(
            submit, relay.port, [NUMBER], message(GSM_TEXT)
        )
        self.assertEqual((code, refused), (250, []), reply)
        queueID = reply.split()[-1]
        # The accepted event is written in a batch just after the 250; a
        # kill inside that window loses the event (not the message: a
        # known gap, see docs/events.md), which is not what this test is about.
        yield waitFor(reactor, lambda: any(
            t == "accepted" and q == queueID for t, q, r, d in events(self.workdir)))
        relay.kill(signal.SIGKILL)
        with open(relay.configPath, "w") as f:
            f.write(self.smsConfig(sinkPort, self.smsc.port)
                    + "\n[feedback]\nlisten = tcp:0:interface=127.0.0.1\n")
        relay.start()
        yield relay.waitReady(reactor)
        yield waitFor(
            reactor,
            lambda: [e[0] for e in events(self.workdir)].count("sms_delivered") >= 1,
        )
        yield relay.stop()
        self.assertIn("recovered 1 queued message", relay.log())
        [submitted] = self.smsc.records("submit_sm")
        self.assertEqual(submitted["text"], GSM_TEXT)
        kinds = [(t, q, r) for t, q, r, d in events(self.workdir)]
        self.assertEqual(
            [t for t, q, r in kinds if q == queueID and r == NUMBER],
            ["accepted", "sms_submitted", "sms_delivered"],
        )
