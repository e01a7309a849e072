"""
Tests for L{smartrelay.engine.rewrap}: VERP sender, List-Unsubscribe,
Feedback-ID, Message-ID/Date, tracking, the downgrade for the next hop and
signing per recipient.
"""

import email
import email.policy
import pickle

import dkim
from twisted.internet.defer import fail, maybeDeferred
from twisted.trial.unittest import SynchronousTestCase

from smartrelay.engine.dkim import DKIMKey, DKIMSigner, generateKey
from smartrelay.engine.downgrade import Offers, Prepared
from smartrelay.engine.rewrap import RewrapJob, Rewrapper, SigningError
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
GREETING = "Gr\u00fc\u00dfe aus K\u00f6ln \u2014 sch\u00f6ne Tage!\r\n"
EIGHT_BIT = (
    "From: Shop <news@shop.example>\r\nTo: a@example.com\r\nSubject: hi\r\n"
    "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
    "Content-Transfer-Encoding: 8bit\r\n\r\n" + GREETING
).encode("utf-8")
EIGHT_BIT_SUBJECT = EIGHT_BIT.replace(b"Subject: hi", "Subject: Gr\u00fc\u00dfe".encode("utf-8"))
#: Offers of a server without 8BITMIME and SMTPUTF8, and of one with both.
SEVEN_BIT = Offers()
EVERYTHING = Offers(eightBitMIME=True, smtpUTF8=True)

# Made once: RSA key generation takes a while.
RSA_PEM, RSA_TXT = generateKey("rsa-sha256", 2048)


def dnsfunc(name, timeout=5):
    """
    The DKIM public keys of shop.example and xn--fa-hia.de (fa\u00df.de).
    """
    known = {b"s1._domainkey.shop.example.", b"s1._domainkey.xn--fa-hia.de."}
    return RSA_TXT.encode("ascii") if name.lower() in known else None


def realSigner(domain="shop.example"):
    """
    A signer with a fixed clock, so that two signatures of one message are
    the same bytes and no test reads the real time.
    """
    return DKIMSigner([DKIMKey(domain, "s1", "rsa-sha256", RSA_PEM)],
                      clock=lambda: 1_700_000_000.0)


class RewrapperFactory:
    """
    Builds a L{Rewrapper} with the tests' settings; a test case overrides
    L{options} for its own defaults, a test passes its own keywords.
    """

    def setUp(self):
        self.tokens = Tokens([b"k" * 32])

    def options(self) -> dict:
        return {}

    def rewrapper(self, **kwargs):
        options = dict(
            tokens=self.tokens,
            hostname="relay.test",
            bounceDomain="bounces.test",
            verpPrefix="bounce",
            baseURL="https://t.example",
            runInThread=maybeDeferred,
        )
        options.update(self.options())
        options.update(kwargs)
        return Rewrapper(**options)


class RewrapTests(RewrapperFactory, SynchronousTestCase):

    def rewrap(self, data=TEXT, sender="app@shop.example", index=1, **entryOptions):
        """
        Re-wrap for a server offering everything; the message's bytes.
        """
        entry, (sender, prepared) = self.prepare(data, sender, index, **entryOptions)
        return entry, (sender, prepared.data)

    def prepare(self, data=TEXT, sender="app@shop.example", index=1, offers=EVERYTHING,
                rewrapper=None, **entryOptions):
        """
        Re-wrap for a server offering C{offers}: the entry and
        C{(sender, Prepared)}.
        """
        entry = makeEntry(QUEUE_ID, ["a@example.com", "b@example.com"], sender=sender)
        entry.received = 1_700_000_000.0
        for name, value in entryOptions.items():
            setattr(entry, name, value)
        rewrapper = rewrapper or self.rewrapper()
        sender, prepared = self.successResultOf(rewrapper.rewrap(entry, index, data, offers))
        self.assertIsInstance(prepared, Prepared)
        return entry, (sender, prepared)

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

    def test_smsSenderRemoved(self):
        """X-SmartRelay-SMS-From (the sender id of the SMS recipients) is not sent to mail recipients."""
        data = TEXT.replace(b"Subject: hi\r\n", b"Subject: hi\r\nX-SmartRelay-SMS-From: Shop\r\n")
        _, (_, sent) = self.rewrap(data)
        self.assertNotIn(b"sms-from", sent.lower())
        self.assertIn(b"Subject: hi\r\n", sent)

    def test_nullSenderStays(self):
        """A null envelope sender stays null."""
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
        """A message that says unsubscribe off gets no List-Unsubscribe fields."""
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
        """The message's own Message-ID and Date are kept, not doubled."""
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
        """Without tracking the HTML part stays byte for byte."""
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
        sender, prepared = self.successResultOf(
            self.rewrapper(signer=signer).rewrap(entry, 0, TEXT, SEVEN_BIT)
        )
        self.assertTrue(prepared.data.startswith(b"DKIM-Signature: x\r\n"))
        self.assertEqual(signer.domain, "shop.example")
        self.assertIn(b"List-Unsubscribe:", seen[0])


class RequestTests(RewrapperFactory, SynchronousTestCase):
    """
    L{Rewrapper.job}: the re-wrap as plain data, for a worker process that
    holds the session.
    """

    def test_sameAsRewrap(self):
        """
        The request, pickled and run elsewhere with the same signer and
        tokens, makes the sender and message that L{Rewrapper.rewrap}
        makes, for every mix of the message's own tracking choices.
        """
        signer = realSigner()
        rewrapper = self.rewrapper(signer=signer, opens=True)
        for options in ({}, {"opens": False, "clicks": True}, {"unsubscribe": False}):
            entry = makeEntry(
                QUEUE_ID, ["a@example.com", "b@example.com"], sender="app@shop.example"
            )
            entry.received = 1_700_000_000.0
            entry.options = options
            entry.tag = "spring"
            for data in (TEXT, HTML, EIGHT_BIT):
                request = pickle.loads(pickle.dumps(rewrapper.job(entry, 1, data, SEVEN_BIT)))
                expected = self.successResultOf(rewrapper.rewrap(entry, 1, data, SEVEN_BIT))
                self.assertEqual(request.run(signer, self.tokens), expected, options)

    def test_nullSender(self):
        """A message with the null sender keeps it."""
        entry = makeEntry(QUEUE_ID, ["a@example.com"], sender="")
        sender, _ = self.rewrapper().job(entry, 0, TEXT, SEVEN_BIT).run(None, self.tokens)
        self.assertEqual(sender, "")

    def test_signingError(self):
        """Signing that fails raises L{SigningError}, as from L{Rewrapper.rewrap}."""

        class Broken:
            def sign(self, message, domain):
                raise KeyError("s1")

        entry = makeEntry(QUEUE_ID, ["a@example.com"], sender="app@shop.example")
        request = self.rewrapper().job(entry, 0, TEXT, SEVEN_BIT)
        self.assertRaises(SigningError, request.run, Broken(), self.tokens)


class DowngradeAndSigningTests(RewrapperFactory, SynchronousTestCase):
    """
    The re-wrap makes the message for the server that will get it: 8-bit
    content that server cannot take is downgraded before the message is
    signed, so the signature covers the bytes that are sent; a message of
    a domain with keys is never sent unsigned.
    """

    def options(self) -> dict:
        return dict(signer=realSigner())

    def rewrap(self, data, offers, rewrapper=None):
        entry = makeEntry(QUEUE_ID, ["a@example.com"], sender="app@shop.example")
        d = (rewrapper or self.rewrapper()).rewrap(entry, 0, data, offers)
        return d

    def prepared(self, data, offers, rewrapper=None):
        sender, prepared = self.successResultOf(self.rewrap(data, offers, rewrapper))
        self.assertIsInstance(prepared, Prepared)
        return prepared

    def text(self, data):
        """
        The text of a one-part message, decoded, with LF line ends.
        """
        content = email.message_from_bytes(data, policy=email.policy.default).get_content()
        return content.replace("\r\n", "\n")

    def test_downgradedThenSigned(self):
        """
        For a server without 8BITMIME an 8-bit body becomes 7-bit before
        signing: the signature verifies on the bytes that go out, and the
        text decodes to the original.
        """
        prepared = self.prepared(EIGHT_BIT, SEVEN_BIT)
        self.assertTrue(prepared.data.isascii())
        self.assertEqual((prepared.eightBitMIME, prepared.smtpUTF8), (False, False))
        self.assertTrue(prepared.data.startswith(b"DKIM-Signature:"))
        self.assertTrue(dkim.verify(prepared.data, dnsfunc=dnsfunc))
        self.assertIn(b"Content-Transfer-Encoding: quoted-printable", prepared.data)
        self.assertEqual(self.text(prepared.data), GREETING.replace("\r\n", "\n"))

    def test_eightBitKeptWhenOffered(self):
        """
        For a server with 8BITMIME the 8-bit body is signed and sent as it
        is, with BODY=8BITMIME.
        """
        prepared = self.prepared(EIGHT_BIT, Offers(eightBitMIME=True))
        self.assertEqual((prepared.eightBitMIME, prepared.smtpUTF8), (True, False))
        self.assertTrue(prepared.data.endswith(EIGHT_BIT[EIGHT_BIT.index(b"\r\n\r\n"):]))
        self.assertTrue(dkim.verify(prepared.data, dnsfunc=dnsfunc))

    def test_eightBitHeader(self):
        """
        An 8-bit Subject is RFC 2047-encoded before signing for a server
        without SMTPUTF8 (even with 8BITMIME), and kept, with SMTPUTF8,
        for one that has it; both signatures verify.
        """
        prepared = self.prepared(EIGHT_BIT_SUBJECT, Offers(eightBitMIME=True))
        self.assertIn(b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n", prepared.data)
        self.assertEqual((prepared.eightBitMIME, prepared.smtpUTF8), (True, False))
        self.assertTrue(dkim.verify(prepared.data, dnsfunc=dnsfunc))
        prepared = self.prepared(EIGHT_BIT_SUBJECT, EVERYTHING)
        self.assertIn("Subject: Gr\u00fc\u00dfe\r\n".encode("utf-8"), prepared.data)
        self.assertEqual((prepared.eightBitMIME, prepared.smtpUTF8), (True, True))
        self.assertTrue(dkim.verify(prepared.data, dnsfunc=dnsfunc))

    def test_sevenBitUntouched(self):
        """A 7-bit message is the same for every server, and needs no MAIL parameter."""
        seven = self.prepared(TEXT, SEVEN_BIT)
        everything = self.prepared(TEXT, EVERYTHING)
        self.assertEqual((seven.eightBitMIME, seven.smtpUTF8), (False, False))
        self.assertEqual((everything.eightBitMIME, everything.smtpUTF8), (False, False))
        self.assertEqual(seven.data.split(b"\r\n", 1)[1:], everything.data.split(b"\r\n", 1)[1:])

    def test_internationalFromDomain(self):
        """
        A From domain written as U-labels (fa\u00df.de) is signed with the
        keys of its A-label form (xn--fa-hia.de, UTS 46), whether the field
        is downgraded or sent with SMTPUTF8.
        """
        data = EIGHT_BIT.replace(b"news@shop.example", "news@fa\u00df.de".encode("utf-8"))
        rewrapper = self.rewrapper(signer=realSigner("xn--fa-hia.de"))
        for offers in (SEVEN_BIT, EVERYTHING):
            prepared = self.prepared(data, offers, rewrapper)
            self.assertTrue(prepared.data.startswith(b"DKIM-Signature:"), offers)
            self.assertIn(b"d=xn--fa-hia.de", prepared.data)
            self.assertTrue(dkim.verify(prepared.data, dnsfunc=dnsfunc), offers)
        self.assertIn(b"From: Shop <news@xn--fa-hia.de>\r\n",
                      self.prepared(data, SEVEN_BIT, rewrapper).data)

    def test_signingErrorFails(self):
        """
        A message dkimpy cannot parse, of a domain with keys, is not sent
        unsigned: the re-wrap fails with L{SigningError} naming the domain
        and dkimpy's error.
        """
        bad = b"From: a@shop.example\r\n:bad\r\n\r\nx\r\n"
        failure = self.failureResultOf(self.rewrap(bad, SEVEN_BIT), SigningError)
        self.assertEqual(failure.value.domain, "shop.example")
        self.assertTrue(failure.value.why.startswith("MessageFormatError: "), failure.value.why)
        self.assertEqual(
            str(failure.value),
            f"DKIM signing for shop.example failed ({failure.value.why}); not sending it unsigned",
        )

    def test_unexpectedSigningError(self):
        """
        Any exception from signing (a dkimpy whose internals moved under
        the fast path, say) is a L{SigningError} too, not a message sent
        unsigned.
        """

        def broken(self, *args, **kwargs):
            raise AttributeError("'DKIM' object has no attribute 'gen_header'")

        self.patch(dkim.DomainSigner, "gen_header", broken)
        failure = self.failureResultOf(self.rewrap(EIGHT_BIT, SEVEN_BIT), SigningError)
        self.assertEqual(
            failure.value.why, "AttributeError: 'DKIM' object has no attribute 'gen_header'"
        )

    def test_noKeyUnsigned(self):
        """A message whose From domain has no key goes unsigned, as before."""
        rewrapper = self.rewrapper(signer=realSigner("other.example"))
        prepared = self.prepared(EIGHT_BIT, SEVEN_BIT, rewrapper)
        self.assertNotIn(b"DKIM-Signature", prepared.data)
        self.assertTrue(prepared.data.isascii())

    def test_signingErrorPickles(self):
        """A L{SigningError} survives pickling (from a worker process) whole."""
        error = pickle.loads(pickle.dumps(SigningError("shop.example", "KeyError: x")))
        self.assertEqual((error.domain, error.why), ("shop.example", "KeyError: x"))
        self.assertEqual(
            str(error), "DKIM signing for shop.example failed (KeyError: x); not sending it unsigned"
        )


class WorkerJobTests(RewrapperFactory, SynchronousTestCase):
    """
    With a worker pool, the CPU work goes to it as a picklable
    L{RewrapJob} that does in the worker what the thread would have done.
    """

    def options(self) -> dict:
        return dict(runInThread=lambda *a: self.fail("ran in a thread"), clicks=True, opens=True)

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
        sender, prepared = self.successResultOf(
            self.rewrapper(workers=Workers()).rewrap(entry, 0, HTML, SEVEN_BIT)
        )
        self.assertEqual(len(jobs), 1)
        self.assertIsInstance(jobs[0], RewrapJob)
        self.assertEqual(jobs[0].click, ("https://t.example", QUEUE_ID, "a@example.com"))
        self.assertEqual(jobs[0].offers, SEVEN_BIT)
        self.assertEqual(prepared, jobs[0].run(None, self.tokens))
        data = prepared.data
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
        self.successResultOf(self.rewrapper(workers=Workers()).rewrap(entry, 0, HTML, SEVEN_BIT))
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
                self.rewrapper(workers=Workers()).rewrap(entry, 0, HTML, SEVEN_BIT), type(error)
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
        self.successResultOf(rewrapper.rewrap(entry, 0, HTML, SEVEN_BIT))
        self.assertEqual(len(threads), 1)
        workers.available = True
        self.successResultOf(rewrapper.rewrap(entry, 0, HTML, SEVEN_BIT))
        self.assertEqual(len(threads), 2)
