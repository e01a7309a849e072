"""
Tests for L{smartrelay.engine.rewrap}: VERP sender, List-Unsubscribe,
Feedback-ID, Message-ID/Date, tracking and signing per recipient.
"""

import email
import email.policy
import pickle

from twisted.internet.defer import fail, maybeDeferred
from twisted.trial.unittest import SynchronousTestCase

from smartrelay.engine.rewrap import RewrapJob, Rewrapper
from smartrelay.engine.workers import WorkerError, WorkerLost
from smartrelay.outbound.testing import makeEntry
from smartrelay.tokens import Tokens

QUEUE_ID = "79/BC-12331-5C348706"
TEXT = (
    b"Received: from app.test ([127.0.0.1])\r\n\tby relay.test (smartrelay)\r\n"
    b"X-SmartRelay-ID: 79/BC-12331-5C348706\r\n"
    b"From: Shop <news@shop.example>\r\nTo: a@example.com\r\nSubject: hi\r\n"
    b"\r\nHello\r\n"
)
HTML = (
    b"From: news@shop.example\r\nTo: a@example.com\r\nSubject: hi\r\n"
    b"MIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
    b'<html><body><a href="https://shop.example/sale">Sale</a></body></html>\r\n'
)


class RewrapTests(SynchronousTestCase):
    def setUp(self):
        self.tokens = Tokens([b"k" * 32])

    def rewrapper(self, **kwargs):
        options = dict(
            tokens=self.tokens,
            hostname="relay.test",
            bounceDomain="bounces.test",
            verpPrefix="bounce",
            baseURL="https://t.example",
            runInThread=maybeDeferred,
        )
        options.update(kwargs)
        return Rewrapper(**options)

    def rewrap(self, data=TEXT, sender="app@shop.example", index=1, **entryOptions):
        entry = makeEntry(QUEUE_ID, ["a@example.com", "b@example.com"], sender=sender)
        entry.received = 1_700_000_000.0
        for name, value in entryOptions.items():
            setattr(entry, name, value)
        return entry, self.successResultOf(self.rewrapper().rewrap(entry, index, data))

    def parse(self, data):
        return email.message_from_bytes(data, policy=email.policy.default)

    def test_verpSender(self):
        """The envelope sender is a VERP address whose token names the queue id and recipient."""
        _, (sender, _) = self.rewrap()
        local, _, domain = sender.partition("@")
        prefix, _, token = local.partition("+")
        self.assertEqual((prefix, domain), ("bounce", "bounces.test"))
        self.assertEqual(self.tokens.readCompact("v", token), (QUEUE_ID, 1))
        self.assertLessEqual(len(local), 64)

    def test_nullSenderStays(self):
        _, (sender, _) = self.rewrap(sender="")
        self.assertEqual(sender, "")

    def test_listUnsubscribe(self):
        """List-Unsubscribe has an https and a mailto URI for this recipient, with the one-click header."""
        _, (_, data) = self.rewrap()
        message = self.parse(data)
        value = message["List-Unsubscribe"]
        https, mailto = [part.strip(" <>") for part in value.split(",")]
        self.assertTrue(https.startswith("https://t.example/u/"))
        self.assertEqual(self.tokens.read("u", https.rsplit("/", 1)[1]).recipient, "b@example.com")
        local = mailto[len("mailto:"):].split("@")[0]
        self.assertEqual(self.tokens.readCompact("u", local.split("+", 1)[1]), (QUEUE_ID, 1))
        self.assertEqual(message["List-Unsubscribe-Post"], "List-Unsubscribe=One-Click")

    def test_unsubscribeOff(self):
        _, (_, data) = self.rewrap(options={"unsubscribe": False})
        self.assertIsNone(self.parse(data)["List-Unsubscribe"])
        self.assertIsNone(self.parse(data)["List-Unsubscribe-Post"])

    def test_feedbackIDAndMissingHeaders(self):
        """Feedback-ID from tag and From domain; Message-ID and Date added when missing."""
        _, (_, data) = self.rewrap(tag="password-reset")
        message = self.parse(data)
        self.assertEqual(message["Feedback-ID"], "password-reset:shop.example:smartrelay")
        self.assertEqual(message["Message-ID"], "<79BC-12331-5C348706@relay.test>")
        self.assertEqual(message["Date"].datetime.timestamp(), 1_700_000_000.0)
        # Added after the trace fields, which stay on top.
        trace = TEXT[: TEXT.index(b"From:")]
        self.assertTrue(data.startswith(trace + b"List-Unsubscribe: "))
        self.assertTrue(data.endswith(TEXT[len(trace):]))

    def test_existingHeadersKept(self):
        data = b"Message-ID: <own@app>\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n" + TEXT
        _, (_, out) = self.rewrap(data)
        message = self.parse(out)
        self.assertEqual(message.get_all("Message-ID"), ["<own@app>"])
        self.assertEqual(len(message.get_all("Date")), 1)

    def test_tracking(self):
        """With opens and clicks on, the HTML part gets a pixel and tracked links for this recipient."""
        _, (_, data) = self.rewrap(HTML, options={"opens": True, "clicks": True})
        html = self.parse(data).get_content()
        self.assertIn("https://t.example/t/o/", html)
        self.assertNotIn("https://shop.example/sale", html)
        token = html.split("https://t.example/t/c/", 1)[1].split('"', 1)[0]
        click = self.tokens.read("c", token)
        self.assertEqual((click.recipient, click.url), ("b@example.com", "https://shop.example/sale"))

    def test_noTrackingByDefault(self):
        _, (_, data) = self.rewrap(HTML)
        self.assertTrue(data.endswith(HTML))

    def test_signed(self):
        """The signer gets the final message, List-Unsubscribe included."""
        seen = []

        class Signer:
            def sign(self, message, domain):
                seen.append(message)
                self.domain = domain
                return b"DKIM-Signature: x\r\n" + message

        entry = makeEntry(QUEUE_ID, ["a@example.com"], sender="app@shop.example")
        signer = Signer()
        sender, data = self.successResultOf(
            self.rewrapper(signer=signer).rewrap(entry, 0, TEXT)
        )
        self.assertTrue(data.startswith(b"DKIM-Signature: x\r\n"))
        self.assertEqual(signer.domain, "shop.example")
        self.assertIn(b"List-Unsubscribe:", seen[0])


class WorkerJobTests(SynchronousTestCase):
    """
    With a worker pool, the CPU work goes to it as a picklable
    L{RewrapJob} that does in the worker what the thread would have done.
    """

    def setUp(self):
        self.tokens = Tokens([b"k" * 32])

    def rewrapper(self, **kwargs):
        return Rewrapper(
            tokens=self.tokens,
            hostname="relay.test",
            bounceDomain="bounces.test",
            verpPrefix="bounce",
            baseURL="https://t.example",
            runInThread=lambda *a: self.fail("ran in a thread"),
            clicks=True,
            opens=True,
            **kwargs,
        )

    def test_jobToWorkers(self):
        """
        The job goes to C{workers.run}; pickled and run with the worker's
        own copies of the signer and tokens, it gives what the thread path
        gives.
        """
        jobs = []

        class Workers:
            available = True

            def run(self, job):
                jobs.append(job)
                copy = pickle.loads(pickle.dumps(job))
                tokens = pickle.loads(pickle.dumps(outer.tokens))
                return maybeDeferred(copy.run, None, tokens)

        outer = self
        entry = makeEntry(QUEUE_ID, ["a@example.com"], sender="app@shop.example")
        sender, data = self.successResultOf(
            self.rewrapper(workers=Workers()).rewrap(entry, 0, HTML)
        )
        self.assertEqual(len(jobs), 1)
        self.assertIsInstance(jobs[0], RewrapJob)
        self.assertEqual(jobs[0].click, ("https://t.example", QUEUE_ID, "a@example.com"))
        self.assertEqual(data, jobs[0].run(None, self.tokens)[0])
        self.assertIn(b"https://t.example/t/c/", data)
        self.assertIn(b"https://t.example/t/o/", data)
        self.assertTrue(sender.startswith("bounce+"))

    def test_workerLostOnce(self):
        """
        A job whose worker died is given once more to the pool.
        """
        calls = []

        class Workers:
            available = True

            def run(self, job):
                calls.append(job)
                if len(calls) == 1:
                    return fail(WorkerLost("gone"))
                return maybeDeferred(job.run, None, outer.tokens)

        outer = self
        entry = makeEntry(QUEUE_ID, ["a@example.com"], sender="app@shop.example")
        self.successResultOf(self.rewrapper(workers=Workers()).rewrap(entry, 0, HTML))
        self.assertEqual(len(calls), 2)

    def test_workerLostTwice(self):
        """
        A job that loses its worker twice fails the re-wrap (the scheduler
        defers the message); so does one that raised in the worker, at once.
        """
        for error, tries in [(WorkerLost("gone"), 2), (WorkerError("ValueError: x"), 1)]:
            calls = []

            class Workers:
                available = True

                def run(self, job):
                    calls.append(job)
                    return fail(error)

            entry = makeEntry(QUEUE_ID, ["a@example.com"], sender="app@shop.example")
            self.failureResultOf(
                self.rewrapper(workers=Workers()).rewrap(entry, 0, HTML), type(error)
            )
            self.assertEqual(len(calls), tries)

    def test_noWorkerRunning(self):
        """
        While no worker process runs (all being replaced), the job runs in
        the relay's threads; so does the second try of a job whose worker
        died when no other is left.
        """
        threads = []

        def runInThread(f, *args):
            threads.append(f)
            return maybeDeferred(f, *args)

        class Workers:
            available = False

            def run(self, job):
                self.available = False
                return fail(WorkerLost("gone"))

        workers = Workers()
        entry = makeEntry(QUEUE_ID, ["a@example.com"], sender="app@shop.example")
        rewrapper = self.rewrapper(workers=workers)
        rewrapper.runInThread = runInThread
        self.successResultOf(rewrapper.rewrap(entry, 0, HTML))
        self.assertEqual(len(threads), 1)
        workers.available = True
        self.successResultOf(rewrapper.rewrap(entry, 0, HTML))
        self.assertEqual(len(threads), 2)
