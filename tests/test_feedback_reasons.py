"""
Tests for L{smartrelay.feedback.reasons} and its tables in
L{smartrelay.feedback.phrases}.
"""

import re

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from smartrelay.feedback import phrases
from smartrelay.feedback.reasons import (
    BOUNCE_REASONS,
    HARD_REASONS,
    REASONS,
    Verdict,
    bounceKind,
    classify,
    classifyReply,
    compileKeyed,
    compilePhrases,
    preferStatus,
    providerOf,
    textReasons,
)

#: (status, reply code, diagnostic, action, expected reason): short
#: diagnostics of the kind real servers write, one or more per reason.
CASES = [
    ("5.1.1", 550, "<bob@example.com>: Recipient address rejected: User unknown in local recipient table", "failed", "userunknown"),
    ("5.1.1", 550, "5.1.1 The email account that you tried to reach does not exist. Please try double-checking the recipient's email address", "failed", "userunknown"),
    (None, 550, "550 sorry, no mailbox here by that name (#5.1.1 - chkusr)", "failed", "userunknown"),
    ("5.0.0", 550, "550 5.1.1 RESOLVER.ADR.RecipNotFound; not found", "failed", "userunknown"),
    (None, None, "host mx.example.net said: 550 No such user here (in reply to RCPT TO command)", "failed", "userunknown"),
    (None, None, "host mx.example.net said: 550 Unknown user bob@example.net (in reply to end of DATA command)", "failed", "filtered"),
    ("5.2.0", 550, "550 Unknown user bob@example.net", "failed", "filtered"),
    ("5.2.2", 552, "552 5.2.2 mailbox full", "failed", "mailboxfull"),
    ("4.2.2", 452, "The email account that you tried to reach is over quota.", "delayed", "mailboxfull"),
    (None, None, "Quota exceeded (mailbox for user is full)", "failed", "mailboxfull"),
    ("5.1.2", 550, "Host or domain name not found. Name service error for name=example.invalid type=A: Host not found", "failed", "hostunknown"),
    ("5.4.4", None, "unrouteable address", "failed", "hostunknown"),
    (None, None, "all relevant MX records point to non-existent hosts", "failed", "hostunknown"),
    ("5.5.0", 550, "550 5.5.0 Invalid EHLO/HELO domain.", "failed", "blocked"),
    (None, None, "Message expired", "failed", "expired"),
    ("5.1.10", 550, "Recipient address has null MX", "failed", "notaccept"),
    (None, 556, "556 5.1.10 domain does not accept mail", "failed", "notaccept"),
    ("5.3.4", 552, "Message too big for system", "failed", "mesgtoobig"),
    (None, 552, "552 message size exceeds fixed maximum message size", "failed", "mesgtoobig"),
    ("5.2.3", 552, "552 5.2.3 Message length exceeds administrative limit", "failed", "exceedlimit"),
    ("5.7.1", 554, "554 5.7.1 Message rejected as spam by Content Filtering", "failed", "spamdetected"),
    ("5.7.1", 554, "Service unavailable; Client host [192.0.2.1] blocked using zen.spamhaus.org", "failed", "blocked"),
    ("5.7.606", 550, "5.7.606 Access denied, banned sending IP [192.0.2.1]", "failed", "blocked"),
    ("5.7.26", 550, "Unauthenticated email from example.com is not accepted due to domain's DMARC policy", "failed", "authfailure"),
    ("5.7.1", 550, "The message does not pass SPF check: fail", "failed", "authfailure"),
    ("5.7.25", 550, "The IP address sending this message does not have a PTR record setup", "failed", "requireptr"),
    ("5.2.1", 550, "The email account that you tried to reach is disabled.", "failed", "suspend"),
    ("5.1.6", 550, "5.1.6 mailbox has moved", "failed", "hasmoved"),
    ("5.7.1", 554, "<bob@example.org>: Relay access denied (in reply to RCPT TO command)", "failed", "norelaying"),
    ("4.7.0", 421, "Too many concurrent SMTP connections from this IP address; please try again later", "failed", "toomanyconn"),
    ("4.7.1", 451, "Client host rejected: Please try again slower", "failed", "speeding"),
    ("5.7.1", 550, "Your message was infected with a virus", "failed", "virusdetected"),
    ("5.6.0", 550, "Message header size, or recipient list, exceeds policy limit", "failed", "contenterror"),
    ("5.7.1", 550, "Messages with multiple addresses in From: header are not accepted", "failed", "notcompliantrfc"),
    ("5.7.1", 550, "Message rejected due to local policy", "failed", "policyviolation"),
    ("4.7.0", 421, "4.7.0 [TS01] Our system has detected a poor email reputation score", "failed", "badreputation"),
    (None, 553, "553 sorry, sender address rejected (in reply to MAIL FROM command)", "failed", "rejected"),
    ("4.4.7", None, "Delivery time expired", "delayed", "expired"),
    ("4.4.1", 451, "connection timed out", "delayed", "expired"),
    ("4.4.2", 421, "lost connection with mx.example.net while sending RCPT TO", "delayed", "networkerror"),
    ("4.3.0", 451, "Temporary local problem - please try later", "delayed", "systemerror"),
    ("4.4.3", None, "Host or domain name not found. Name service error for name=example.net type=MX: Host not found, try again", "delayed", "networkerror"),
    ("5.3.0", 554, "554 5.3.0 Message rejected: Unsolicited bulk mail", "failed", "spamdetected"),
    ("4.3.1", 452, "Insufficient system storage", "delayed", "systemfull"),
    ("5.3.0", 554, "procmail: Quota exceeded while writing", "failed", "mailboxfull"),
    ("5.3.0", 554, "Command died with status 1: /usr/bin/deliver", "failed", "mailererror"),
    (None, 530, "530 5.7.0 Must issue a STARTTLS command first", "failed", "failedstarttls"),
    ("5.7.0", 554, "554 5.7.0 authentication required", "failed", "securityerror"),
    (None, 501, "501 Syntax error in parameters or arguments", "failed", "syntaxerror"),
    ("2.0.0", 250, "250 2.0.0 Ok: queued", "delivered", "delivered"),
    ("5.0.0", 550, "550 Rejected (in reply to EHLO command)", "failed", "blocked"),
    ("5.0.0", 550, "550 the server has no opinion", "failed", "onhold"),
    (None, None, None, None, "undefined"),
]


class ClassifyTests(SynchronousTestCase):
    """
    L{classify} maps what a failure says to a reason, a kind and a status.
    """

    def test_samples(self):
        """Typical real-world diagnostics get the expected Sisimai reason."""
        for status, code, text, action, reason in CASES:
            verdict = classify(status, code, text, action)
            self.assertEqual(verdict.reason, reason, (status, code, text))

    def test_verdict(self):
        """A verdict carries reason, kind and status, and is immutable."""
        verdict = classify("5.1.1", 550, "user unknown", "failed")
        self.assertEqual(verdict, Verdict(reason="userunknown", kind="hard", status="5.1.1"))
        with self.assertRaises(AttributeError):
            verdict.reason = "blocked"

    def test_statusFromText(self):
        """Without a status, one in the diagnostic is used and returned."""
        verdict = classify(None, 550, "550 5.1.1 <bob@example.com>... User unknown")
        self.assertEqual((verdict.reason, verdict.status), ("userunknown", "5.1.1"))

    def test_specificStatusFromTextBeatsGeneric(self):
        """A class-only status (5.0.0) gives way to a specific one in the text."""
        verdict = classify("5.0.0", 550, "550 5.2.2 mailbox full")
        self.assertEqual((verdict.reason, verdict.status), ("mailboxfull", "5.2.2"))

    def test_statusFromReplyCode(self):
        """With no status anywhere, the reply code gives the class (5.0.0 / 4.0.0)."""
        self.assertEqual(classify(None, 554, "go away").status, "5.0.0")
        self.assertEqual(classify(None, 451, "try later").status, "4.0.0")
        self.assertIsNone(classify(None, None, "").status)

    def test_ipAddressIsNoStatus(self):
        """Dotted numbers inside an IP address are not taken for a status."""
        verdict = classify(None, None, "connection to 10.5.1.1 refused by policy")
        self.assertNotEqual(verdict.status, "5.1.1")

    def test_pseudoStatusIgnored(self):
        """Sisimai's invented 5.0.9xx codes are not statuses."""
        verdict = classify("5.0.911", 550, "mailbox full")
        self.assertEqual((verdict.reason, verdict.status), ("mailboxfull", "5.0.0"))

    def test_statusNamesReason(self):
        """With no telling text, the status names the reason."""
        self.assertEqual(classify("5.1.1", 550, "").reason, "userunknown")
        self.assertEqual(classify("4.2.2", None, None).reason, "mailboxfull")
        self.assertEqual(classify("5.7.13", None, "nope").reason, "suspend")

    def test_textBeatsVagueStatus(self):
        """Text naming a reason beats a status that only says "security"."""
        self.assertEqual(classify("5.7.1", 554, "554 5.7.1 relay access denied").reason, "norelaying")

    def test_statusYields(self):
        """A 5.1.1 whose text says the mailbox is full is a full mailbox."""
        self.assertEqual(classify("5.1.1", 550, "mailbox full").reason, "mailboxfull")

    def test_yieldedStatusLeavesTextOnlyReasons(self):
        """When a status yields to the text, a reason only text names can win."""
        self.assertEqual(classify("5.1.1", 550, "550 5.1.1 null MX").reason, "notaccept")

    def test_microsoftRecipientNotFound(self):
        """Microsoft's RecipientNotFound is an unknown user, whatever 5.1.10 says."""
        verdict = classify("5.1.10", 550, "5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found")
        self.assertEqual((verdict.reason, verdict.kind), ("userunknown", "hard"))

    def test_userUnknownBesideVagueStatus(self):
        """A "user unknown" beside a vague status (5.7.1) is a filter's disguise."""
        self.assertEqual(classify("5.7.1", 550, "550 5.7.1 User unknown").reason, "filtered")
        self.assertEqual(classify("5.5.0", 550, "550 5.5.0 User unknown").reason, "filtered")

    def test_senderStatusBeatsUserUnknownText(self):
        """A sender status (5.1.8) is not overridden by recipient wording."""
        verdict = classify("5.1.8", 501, "the address couldn't be found: 501 5.1.8 Sender address rejected")
        self.assertEqual(verdict.reason, "rejected")

    def test_senderPhraseAtRcptWithoutStatus(self):
        """A sender phrase at RCPT beside no explicit status is a refused sender."""
        text = "host mx.example.jp said: 550 Sender rejected (in reply to RCPT TO command)"
        self.assertEqual(classify(None, 550, text).reason, "rejected")

    def test_senderPhraseAtRcpt(self):
        """A 5.1.1 "address rejected" at RCPT is about the recipient."""
        text = "said: 550 5.1.1 Address rejected bob@example.jp (in reply to RCPT TO command)"
        self.assertEqual(classify("5.1.1", 550, text).reason, "userunknown")
        text = "550 5.1.1 Address rejected bob@example.jp"
        self.assertEqual(classify("5.1.1", 550, text).reason, "userunknown")

    def test_commandFromText(self):
        """The command the diagnostic names decides like a given one."""
        self.assertEqual(classify(None, 550, "SMTP:RCPT host 192.0.2.8: 553 no such user here").reason, "userunknown")
        self.assertEqual(classify(None, 421, "host mx refused to talk to me: 421 try later").reason, "blocked")

    def test_providerWordingDecides(self):
        """A provider's documented wording names its reason whatever the status says."""
        text = (
            "The user you are trying to contact is receiving mail at a rate that prevents"
            " additional messages from being delivered. - gsmtp"
        )
        self.assertEqual(classify("5.2.1", 550, text).reason, "speeding")
        yahoo = "554 delivery error: dd This user doesn't have a yahoo.com account (in reply to end of DATA command)"
        self.assertEqual(classify(None, 554, yahoo).reason, "userunknown")

    @given(st.sampled_from(sorted(phrases.OVERRIDES.items())), st.data())
    def test_overridesFound(self, item, data):
        """Every provider phrase decides, even beside a status naming another reason."""
        reason, texts = item
        text = data.draw(st.sampled_from(texts))
        self.assertEqual(classify("5.2.2", 552, "said: " + text + " (end)").reason, reason, text)

    def test_localProgram(self):
        """An X-Unix diagnostic is a local program's: what it printed decides, else the status."""
        text = 'X-Unix; procmail: Couldn\'t create "/var/mail/bob": No such user'
        self.assertEqual(classify("5.1.1", None, text).reason, "mailererror")
        self.assertEqual(classify("5.3.0", None, "X-Unix; 77").reason, "systemerror")
        self.assertEqual(classify(None, None, "x-unix; 75").reason, "mailererror")

    def test_continuationCodes(self):
        """Codes of joined continuation lines do not break a phrase apart."""
        text = (
            "550-5.2.1 The user you are trying to contact is receiving mail at a rate that"
            " 550-5.2.1 prevents additional messages from being delivered."
        )
        self.assertEqual(classify("5.2.1", 550, text).reason, "speeding")
        self.assertEqual(classify(None, None, "550-5.2.1 x").status, "5.2.1")

    def test_explicitSenderRejection(self):
        """An explicit "sender rejected" beats a 5.1.0 that would name the recipient."""
        self.assertEqual(classify("5.1.0", 550, "550 5.1.0 <b@example.net> sender rejected").reason, "rejected")

    def test_providerCodesDecide(self):
        """A provider's own code (Orange, Cox, GoDaddy) names its reason."""
        orange = "421 mwinf5c77 ME Service refuse. Service refused, please try later. OFR_999 [999]"
        self.assertEqual(classify("4.0.0", 421, orange).reason, "blocked")
        laposte = "550 5.5.0 Adresse d au moins un destinataire invalide. LPN007_416"
        self.assertEqual(classify("5.5.0", 550, laposte).kind, "hard")
        cox = "550 5.1.0 <b@example.com> sender rejected. AUP#CDRBL (in reply to MAIL FROM command)"
        self.assertEqual(classify("5.1.0", 550, cox).reason, "blocked")
        godaddy = "550 5.1.1 <a@example.com> - 192.0.2.1 has sent to too many recipients this hour. IB607"
        self.assertEqual(classify("5.1.1", 550, godaddy).reason, "speeding")
        outlook = "550 5.7.1 Unfortunately, messages from [192.0.2.1] weren't sent. (SC-004)"
        self.assertEqual(classify("5.7.1", 550, outlook).reason, "blocked")
        facebook = "550 5.1.1 RCP-P1 http://postmaster.facebook.com/response_codes?ip=192.0.2.1#rcp"
        self.assertEqual(classify(None, 550, facebook).reason, "userunknown")
        iua = "550 Mailbox is full. https://mail.i.ua/err/4/"
        self.assertEqual(classify(None, 550, iua).reason, "mailboxfull")
        spectrum = "550 5.1.0 <a@example.com> sender rejected. Please see ... AUP#I1310"
        self.assertEqual(classify("5.1.0", 550, spectrum).reason, "toomanyconn")
        for written in ("AUP#In-1310", "AUP#O1540", "AUP#Out-1540"):
            text = "550 5.1.0 <a@example.com> sender rejected. " + written
            self.assertIn(classify("5.1.0", 550, text).reason, ("toomanyconn", "speeding"), written)
        apple = "550 5.1.6 recipient no longer on server: bob@icloud.example"
        self.assertEqual(classify("5.1.6", 550, apple), Verdict("hasmoved", "hard", "5.1.6"))
        self.assertEqual(classify("5.1.1", 550, "user unknown lib123_416x").reason, "userunknown")
        self.assertEqual(classify("5.1.1", 550, "user unknown, see /usr/lib607 a.ib607").reason, "userunknown")

    def test_neutralMasks(self):
        """A phrase inside a neutral one does not count; a longer phrase around it does."""
        self.assertEqual(textReasons("550 Recipient address rejected"), frozenset())
        self.assertEqual(
            textReasons("Recipient address rejected: User unknown in local recipient table"),
            frozenset(["userunknown"]),
        )
        self.assertIn("rejected", textReasons("553 Sender address rejected: not owned by user"))

    def test_overlappingPhrases(self):
        """Phrases of two reasons that overlap are both found."""
        found = textReasons("554 Message rejected: Email address is not verified.")
        self.assertEqual(found, frozenset(["rejected", "norelaying"]))
        self.assertEqual(classify(None, 554, "554 Message rejected: Email address is not verified.").reason, "norelaying")

    def test_commandArgument(self):
        """The failed command, when the caller knows it, decides a bare "user unknown"."""
        self.assertEqual(classify(None, 550, "550 User unknown", command="RCPT").reason, "userunknown")
        self.assertEqual(classify(None, 550, "550 User unknown", command="DATA").reason, "filtered")
        self.assertEqual(classify(None, 550, "550 User unknown", command="rcpt to").reason, "userunknown")
        self.assertEqual(classify(None, 550, "550 User unknown", command="end of data").reason, "filtered")

    def test_delayedWithoutReasonExpires(self):
        """A delayed record saying nothing more is C{expired}."""
        self.assertEqual(classify("4.0.0", None, "", "delayed").reason, "expired")

    def test_delivered(self):
        """A 2.x.x status or the action C{delivered} is C{delivered}, with no kind."""
        self.assertEqual(classify("2.1.5", 250, "ok"), Verdict("delivered", None, "2.1.5"))
        self.assertEqual(classify(None, None, None, "delivered").kind, None)

    def test_replyCodeAsText(self):
        """A reply code given as a numeric string is used; nonsense is ignored."""
        self.assertEqual(classify(None, "556", "").reason, "notaccept")
        self.assertEqual(classify(None, 99999, "").status, None)
        self.assertEqual(classify(None, True, "").status, None)

    def test_longDiagnosticBounded(self):
        """A huge diagnostic is read only up to a bound, and quickly."""
        verdict = classify(None, None, "x" * 1_000_000 + " user unknown")
        self.assertEqual(verdict.reason, "onhold")

    @given(
        st.one_of(st.none(), st.text(max_size=12), st.from_regex(r"\A[245]\.\d{1,3}\.\d{1,3}\Z")),
        st.one_of(st.none(), st.integers(), st.text(max_size=4)),
        st.one_of(st.none(), st.text(max_size=300)),
        st.one_of(st.none(), st.sampled_from(["failed", "delayed", "delivered", "relayed"]), st.text(max_size=8)),
        st.one_of(st.none(), st.text(max_size=10)),
    )
    def test_total(self, status, code, text, action, command):
        """Any input yields a known reason, a consistent kind, and never raises."""
        verdict = classify(status, code, text, action, command)
        self.assertIn(verdict.reason, REASONS)
        self.assertEqual(verdict.kind, bounceKind(verdict.reason, verdict.status))
        if verdict.status is not None:
            self.assertRegex(verdict.status, r"\A[245]\.\d{1,3}\.\d{1,3}\Z")

    @given(st.sampled_from(sorted(phrases.PHRASES.items())), st.data())
    def test_phrasesFound(self, item, data):
        """Every plain phrase of the table is recognised inside other text."""
        reason, texts = item
        text = data.draw(st.sampled_from(texts))
        if "*" in text or reason == phrases.NEUTRAL:
            return
        found = textReasons("Remote said: " + text.upper() + " (end)")
        self.assertIn(reason, found, text)


class KindTests(SynchronousTestCase):
    """
    L{bounceKind} is Sisimai's hard/soft rule.
    """

    def test_hard(self):
        """Unknown users, unknown hosts and moved mailboxes are hard."""
        for reason in HARD_REASONS:
            self.assertEqual(bounceKind(reason, "5.0.0"), "hard")

    def test_notacceptTemporaryWords(self):
        """Without a status, a notaccept the text calls temporary is soft."""
        self.assertEqual(bounceKind("notaccept", None, "no mx, a temporary failure"), "soft")
        self.assertEqual(bounceKind("notaccept", None, "no mx found for domain"), "hard")
        self.assertEqual(bounceKind("notaccept", "5.1.10", "a temporary failure"), "hard")

    def test_notaccept(self):
        """C{notaccept} is hard when permanent, soft when temporary."""
        self.assertEqual(bounceKind("notaccept", "5.1.10"), "hard")
        self.assertEqual(bounceKind("notaccept", None), "hard")
        self.assertEqual(bounceKind("notaccept", "4.3.2"), "soft")

    def test_soft(self):
        """Every other bounce reason is soft."""
        for reason in BOUNCE_REASONS - HARD_REASONS - {"notaccept"}:
            self.assertEqual(bounceKind(reason, "5.0.0"), "soft")

    def test_notBounces(self):
        """Deliveries, complaints and auto-replies have no kind."""
        for reason in ("delivered", "feedback", "vacation"):
            self.assertIsNone(bounceKind(reason))


class ClassifyReplyTests(SynchronousTestCase):
    """
    L{classifyReply} is the delivery session's entry point.
    """

    def test_reply(self):
        """A permanent reply is classified like a failed DSN record."""
        self.assertEqual(
            classifyReply("5.1.1", 550, "<a@example.com>: user unknown"),
            Verdict("userunknown", "hard", "5.1.1"),
        )
        self.assertEqual(classifyReply(None, 554, "go away").reason, "blocked")


class TableTests(SynchronousTestCase):
    """
    The rule tables are well-formed.
    """

    def test_agentTable(self):
        """
        L{reasons._checkAgents} takes L{phrases.LHOSTS} and refuses an
        unknown test or reason.
        """
        from smartrelay.feedback.reasons import _checkAgents

        self.assertEqual(set(_checkAgents(phrases.LHOSTS)), set(phrases.LHOSTS))
        with self.assertRaises(ValueError):
            _checkAgents({"x": {"recognise": (("From", "regex", "a"),)}})
        with self.assertRaises(ValueError):
            _checkAgents({"x": {"recognise": (("From", "equals", "a"),), "reasons": {"nosuch": ("a",)}}})

    def test_agentVerdict(self):
        """
        L{reportingAgent} knows a program by its header (as many tests as
        it needs); L{agentVerdict} reads its own words and header rules.
        """
        from smartrelay.feedback.reasons import agentVerdict, reportingAgent

        header = {
            "from": ["Mail Administrator <Postmaster@ezweb.ne.jp>"],
            "subject": ["Mail System Error - Returned Mail"],
        }
        getAll = lambda name: header.get(name.lower(), [])
        self.assertEqual(reportingAgent(getAll), "ezweb")
        self.assertEqual(agentVerdict("ezweb", getAll, "The user(s) account is disabled.\n<a@b>"), "suspend")
        self.assertIsNone(agentVerdict("ezweb", getAll, "550 user unknown"))
        header["x-spasign"] = ["NG"]
        self.assertEqual(agentVerdict("ezweb", getAll, "550 user unknown"), "filtered")
        self.assertIsNone(reportingAgent(lambda name: {"subject": ["Mail System Error - Returned Mail"]}.get(name.lower(), [])))
        self.assertIsNone(agentVerdict(None, getAll, "anything"))
        zoho = lambda name: {"x-zohomail": ["Si CHF_MF_NL SS_10"]}.get(name.lower(), [])
        self.assertEqual(reportingAgent(zoho), "zoho")
        self.assertEqual(agentVerdict("zoho", zoho, "a@b.example Error, ERROR_CODE :421, Host not reachable."), "expired")

    def test_statusTable(self):
        """Every status is a well-formed RFC 3463 code naming a known reason."""
        for status, reason in phrases.STATUS_REASONS.items():
            self.assertRegex(status, r"\A[245]\.\d{1,3}\.\d{1,3}\Z")
            self.assertIn(reason, REASONS, status)

    def test_reasonsKnown(self):
        """Every reason the tables name is in the vocabulary."""
        named = set(phrases.PRECEDENCE) | set(phrases.TEXT_ONLY) | set(phrases.VAGUE)
        named |= {reason for _, reason in phrases.REPLY_REASONS.values()}
        for key, value in list(phrases.STATUS_YIELDS.items()) + list(
            phrases.STATUS_OVERRULES.items()
        ) + list(phrases.STATUS_NEEDS_TEXT.items()):
            named |= {key} | set(value)
        for reason, context in phrases.TEXT_CONTEXT.items():
            named.add(reason)
            if context["otherwise"] is not None:
                named.add(context["otherwise"])
            self.assertIn(context["status"], ("generic", "vague", "never"))
        self.assertEqual(named - REASONS, set())
        self.assertEqual(set(phrases.PHRASES) - REASONS - {phrases.NEUTRAL}, set())

    def test_everyBounceReasonReachable(self):
        """Each reason with phrases appears in the precedence or the text-only list."""
        ordered = set(phrases.PRECEDENCE) | set(phrases.TEXT_ONLY) | {"vacation"}
        self.assertEqual(set(phrases.PHRASES) - ordered - {phrases.NEUTRAL}, set())

    def test_phrasesCompile(self):
        """Each phrase compiles on its own and is lower-case, trimmed text."""
        for reason, texts in phrases.PHRASES.items():
            self.assertIsInstance(texts, tuple, reason)
            for text in texts:
                self.assertEqual(text, text.lower(), text)
                pattern, groups = compilePhrases({reason: (text,)})
                self.assertIsInstance(pattern, re.Pattern)
                self.assertEqual(set(groups.values()), {(reason, False)})
        for reason, texts in phrases.OVERRIDES.items():
            self.assertIn(reason, REASONS)
            for text in texts:
                self.assertEqual(text, text.lower(), text)
                _, groups = compilePhrases({}, {reason: (text,)})
                self.assertEqual(set(groups.values()), {(reason, True)})

    def test_overridesDistinct(self):
        """No provider phrase is also an ordinary phrase of another reason."""
        ordinary = {t: r for r, texts in phrases.PHRASES.items() for t in texts}
        for reason, texts in phrases.OVERRIDES.items():
            for text in texts:
                self.assertIn(ordinary.get(text, reason), (reason,), text)

    def test_providerCodes(self):
        """Each provider code table is a valid expression with one group and known reasons."""
        for marker, pattern, codes in phrases.PROVIDER_CODES:
            self.assertEqual(re.compile(pattern).groups, 1, pattern)
            self.assertEqual(set(codes.values()) - REASONS, set(), pattern)
            markers = (marker,) if isinstance(marker, str) else marker
            for code in codes:
                self.assertEqual(code, code.lower())
                # Every text a code is found in holds a marker.
                self.assertTrue(
                    any(m in pattern.replace("\\", "") or m in code for m in markers),
                    (marker, code),
                )

    def test_commandHintsCompile(self):
        """Every command hint is a valid expression naming an SMTP command."""
        for pattern, command in phrases.COMMAND_HINTS:
            re.compile(pattern)
            self.assertIn(command, phrases.BEFORE_DATA | {"DATA"})

    def test_badTable(self):
        """An unknown reason or an empty phrase is a clear error."""
        self.assertRaises(ValueError, compilePhrases, {"nosuchreason": ("x",)})
        self.assertRaises(ValueError, compilePhrases, {"blocked": (" * ",)})
        self.assertRaises(ValueError, compilePhrases, {}, {"nosuchreason": ("x",)})


class UserUnknownContextTests(SynchronousTestCase):
    """
    Sisimai's rule for a recipient phrase: C{userunknown} with a x.1.1
    status or at RCPT, else C{filtered} unless refused before DATA.
    """

    def test_bareUserUnknownIsFiltered(self):
        """A "user unknown" with no status and no command is filtered, soft."""
        verdict = classify(None, 550, "550 kijitora@example.com... No such user")
        self.assertEqual((verdict.reason, verdict.kind), ("filtered", "soft"))
        verdict = classify("5.0.0", 550, "550 : User unknown")
        self.assertEqual((verdict.reason, verdict.kind), ("filtered", "soft"))

    def test_userUnknownAtRcpt(self):
        """The same words refused at RCPT are an unknown address, hard."""
        verdict = classify(None, 550, "550 kijitora@example.com... No such user", command="RCPT")
        self.assertEqual((verdict.reason, verdict.kind), ("userunknown", "hard"))
        text = "host mx.example.jp said: 550 User unknown (in reply to RCPT TO command)"
        self.assertEqual(classify(None, None, text).reason, "userunknown")

    def test_userUnknownStatus(self):
        """A 5.1.1 status makes the words an unknown address whatever the command."""
        self.assertEqual(classify("5.1.1", 550, "550 User unknown").reason, "userunknown")

    def test_directoryServersOwnReports(self):
        """A directory server's own report (Domino, Exchange 2003, Gmail) is userunknown."""
        for text in [
            "User some.name (bob@example.jp) not listed in Domino Directory",
            "The recipient name is not recognized MSEXCH:IMS:EXAMPLE",
            "Your message wasn't delivered to bob@example.it because the address couldn't"
            " be found. Check for typos or unnecessary spaces and try again.",
        ]:
            verdict = classify(None, None, text)
            self.assertEqual((verdict.reason, verdict.kind), ("userunknown", "hard"), text)


class LocalAgentTests(SynchronousTestCase):
    """
    Local delivery agents' failures (L{phrases.LOCAL_AGENTS}).
    """

    def test_mailLocal(self):
        """mail.local's "unknown user" is userunknown, even beside a 554 service unavailable."""
        text = "mail.local: unknown user: bob 554 <bob@example.net>... Service unavailable"
        self.assertEqual(classify("5.5.0", 554, text).reason, "userunknown")

    def test_agentWithoutKnownWords(self):
        """An agent's failure that says nothing known is a mailererror."""
        text = 'procmail: Couldn\'t create "/var/mail/bob"'
        self.assertEqual(classify(None, None, text).reason, "mailererror")

    def test_agentQuota(self):
        """A local agent's quota message is mailboxfull."""
        self.assertEqual(classify(None, None, "maildrop: maildir over quota.").reason, "mailboxfull")

    def test_notAfterCommandBeforeData(self):
        """Words refused at RCPT are no local agent's, whatever they look like."""
        verdict = classify("5.1.1", 550, "procmail: no such user", command="RCPT")
        self.assertEqual(verdict.reason, "userunknown")


class ProviderTests(SynchronousTestCase):
    """
    Provider knowledge keyed on the remote host or the recipient's domain
    (L{phrases.RHOSTS}, L{phrases.RHOST_PHRASES}).
    """

    def test_providerByRemote(self):
        """The remote host names its provider, on a label boundary."""
        self.assertEqual(providerOf("mx1.hotmail.com"), "outlook")
        self.assertEqual(providerOf("dns; lsean.ezweb.ne.jp."), "kddi")
        self.assertEqual(providerOf("MX.COX.NET [192.0.2.1]"), "cox")
        self.assertEqual(providerOf("cox.net"), "cox")
        self.assertIsNone(providerOf("notcox.net"))
        self.assertIsNone(providerOf("hotmail.com.example.org"))
        self.assertIsNone(providerOf("mx.example.org"))
        self.assertIsNone(providerOf(None))
        self.assertIsNone(providerOf(""))

    def test_providerByRecipientDomain(self):
        """The recipient's domain names its provider when a provider host lies under it."""
        self.assertEqual(providerOf(None, "bob@ezweb.ne.jp"), "kddi")
        self.assertEqual(providerOf(None, "bob@docomo.ne.jp"), "nttdocomo")
        self.assertEqual(providerOf(None, "bob@icloud.com"), "apple")
        self.assertIsNone(providerOf(None, "bob@example.com"))
        self.assertIsNone(providerOf(None, "bob@com"))
        self.assertIsNone(providerOf(None, "not an address"))

    def test_providerByHostInText(self):
        """A provider host named in the diagnostic counts; an address's domain does not."""
        text = "550 5.4.1 access denied [am0pr01mb1234.eurprd01.prod.protection.outlook.com]"
        self.assertEqual(providerOf(None, None, text), "microsoft")
        self.assertIsNone(providerOf(None, None, "mail to bob@x.mail.icloud.com failed"))
        self.assertIsNone(providerOf(None, None, "host mx.hotmail.community said"))

    def test_providerByReporter(self):
        """The reporting host names the provider when nothing else does."""
        self.assertEqual(providerOf(None, None, "", "omr-a015e.mx.aol.com"), "aol")
        self.assertEqual(providerOf("mx.cox.net", None, "", "omr-a015e.mx.aol.com"), "cox")
        text = "Name service error for name=example.org type=MX: Malformed or unexpected name server reply"
        verdict = classify("5.4.4", None, text, reporter="omr-a015e.mx.aol.com")
        self.assertEqual((verdict.reason, verdict.kind), ("notaccept", "hard"))
        self.assertNotEqual(classify("5.4.4", None, text).reason, "notaccept")

    def test_kddiUserUnknown(self):
        """au / KDDI: the address in the reply is an unknown user, none is a filter."""
        text = "550 <bob@ezweb.ne.jp>: User unknown"
        verdict = classify("5.0.0", 550, text, remote="lsean.ezweb.ne.jp")
        self.assertEqual((verdict.reason, verdict.kind), ("userunknown", "hard"))
        verdict = classify("5.0.0", 550, "550 : User unknown", recipient="bob@ezweb.ne.jp")
        self.assertEqual((verdict.reason, verdict.kind), ("filtered", "soft"))

    def test_outlookMailboxUnavailable(self):
        """Outlook.com's "mailbox unavailable" is an unknown user; from others it is not."""
        text = "550 Requested action not taken: mailbox unavailable (-1:2:-1)"
        self.assertEqual(classify("5.5.0", 550, text, remote="bay004-mc1.hotmail.com").reason, "userunknown")
        self.assertEqual(classify("5.5.0", 550, text, remote="mx.example.org").reason, "filtered")

    def test_microsoftByStatus(self):
        """Microsoft's "access denied" is an unknown address at 5.4.1, a suspended one at 5.7.504."""
        text = "550 5.4.1 Recipient address rejected: Access denied. AS(201806281)"
        remote = "example-com.mail.protection.outlook.com"
        self.assertEqual(classify("5.4.1", 550, text, remote=remote).reason, "userunknown")
        text = "550 5.7.504 Recipient address rejected: Access denied"
        self.assertEqual(classify("5.7.504", 550, text, remote=remote).reason, "suspend")

    def test_keyedStatusPrefix(self):
        """A status-qualified provider phrase may name a status prefix; a bad one is an error."""
        table = compileKeyed({"kddi": {"blocked": (("5.7.", "no thanks"),)}}, phrases.RHOSTS, "T")
        self.assertRaises(
            ValueError, compileKeyed, {"kddi": {"blocked": (("5.x", "no"),)}}, phrases.RHOSTS, "T"
        )
        self.assertEqual(table["kddi"], [("blocked", (("5.7.", None, "no thanks"),))])

    def test_commandGivenCountsAsPostfixWrites(self):
        """
        A phrase written with Postfix's "(in reply to MAIL FROM command)"
        counts when the caller gives the command: "Access denied" at MAIL
        is a refused sender whichever way the command is known.
        """
        said = classify("5.7.1", 550, "550 5.7.1 Access denied (in reply to MAIL FROM command)")
        given = classify("5.7.1", 550, "550 5.7.1 Access denied", command="MAIL")
        self.assertEqual((said.reason, given.reason), ("rejected", "rejected"))
        self.assertEqual(classify("5.7.1", 550, "550 5.7.1 Access denied", command="RCPT").reason, "securityerror")

    def test_keyedCommand(self):
        """
        A provider phrase may count only in reply to a command (beside a
        status): NTT docomo's "550 Unknown user" after DATA with 5.0.0 is
        a refusal, at RCPT an unknown user; a bad condition is an error.
        """
        text = "550 Unknown user someone@docomo.ne.jp"
        remote = "mfsmax.docomo.ne.jp"
        self.assertEqual(classify("5.0.0", 550, text, command="DATA", remote=remote).reason, "rejected")
        self.assertEqual(classify("5.0.0", 550, text, command="RCPT", remote=remote).reason, "userunknown")
        self.assertNotEqual(classify("5.2.0", 550, text, command="DATA", remote=remote).reason, "rejected")
        table = compileKeyed({"kddi": {"blocked": (("5.7.1 MAIL", "no thanks"),)}}, phrases.RHOSTS, "T")
        self.assertEqual(table["kddi"], [("blocked", (("5.7.1", "MAIL", "no thanks"),))])
        self.assertRaises(
            ValueError, compileKeyed, {"kddi": {"blocked": (("5.7.1 QUIT", "no"),)}}, phrases.RHOSTS, "T"
        )

    def test_messageLabsNoSuchUser(self):
        """MessageLabs' "No such user" is an unknown user."""
        text = "550 bob@example.org... No such user"
        verdict = classify("5.0.0", 550, text, remote="cluster5.eu.messagelabs.com")
        self.assertEqual(verdict.reason, "userunknown")

    def test_yahooTss04(self):
        """Yahoo's TSS04 deferral is a refused sender, from Yahoo's hosts only."""
        text = (
            "host mta6.am0.yahoodns.net[192.0.2.7] said: 421 4.7.0 [TSS04] Messages from 192.0.2.1"
            " temporarily deferred due to unexpected volume or user complaints"
        )
        self.assertEqual(classify("4.7.0", 421, text).reason, "rejected")
        text = "421 4.7.0 Messages temporarily deferred due to unexpected volume or user complaints"
        self.assertNotEqual(classify("4.7.0", 421, text, remote="mx.example.net").reason, "rejected")

    def test_deliveredIgnoresProvider(self):
        """A delivery stays a delivery whatever the provider's words."""
        verdict = classify("2.0.0", 250, "550 : user unknown", "delivered", remote="x.ezweb.ne.jp")
        self.assertEqual(verdict.reason, "delivered")

    def test_classifyReplyRemote(self):
        """classifyReply passes the remote host on."""
        verdict = classifyReply(None, 550, "Requested action not taken: mailbox unavailable", "RCPT", "mx4.hotmail.com")
        self.assertEqual(verdict.reason, "userunknown")

    def test_keyedTables(self):
        """Every provider and agent table names known keys and reasons, with phrases."""
        compileKeyed(phrases.RHOST_PHRASES, phrases.RHOSTS, "RHOST_PHRASES")
        compileKeyed(phrases.LOCAL_AGENT_PHRASES, phrases.LOCAL_AGENTS, "LOCAL_AGENT_PHRASES")
        self.assertRaises(ValueError, compileKeyed, {"nosuch": {}}, phrases.RHOSTS, "T")
        self.assertRaises(ValueError, compileKeyed, {"kddi": {"nosuchreason": ("x",)}}, phrases.RHOSTS, "T")
        self.assertRaises(ValueError, compileKeyed, {"kddi": {"blocked": (" ",)}}, phrases.RHOSTS, "T")

    @given(st.text(max_size=300), st.text(max_size=80), st.text(max_size=80))
    def test_totalWithHosts(self, text, remote, recipient):
        """classify never raises whatever the remote host and recipient are."""
        verdict = classify(None, 550, text, remote=remote, recipient=recipient)
        self.assertIn(verdict.reason, REASONS)


class PreferStatusTests(SynchronousTestCase):
    """
    Which status to believe, the report's or the diagnostic's
    (Sisimai::SMTP::Status's prefer).
    """

    def test_missing(self):
        """Either one alone is taken."""
        self.assertEqual(preferStatus(None, "5.1.1"), "5.1.1")
        self.assertEqual(preferStatus("5.1.1", None), "5.1.1")
        self.assertIsNone(preferStatus(None, None))

    def test_classOnlyYields(self):
        """x.0.0 and a x.y.0 beside a precise code yield to it."""
        self.assertEqual(preferStatus("5.0.0", "5.2.2"), "5.2.2")
        self.assertEqual(preferStatus("5.1.0", "5.7.1"), "5.7.1")
        self.assertEqual(preferStatus("5.2.2", "5.0.0"), "5.2.2")

    def test_replyCodeSettlesClass(self):
        """When the classes differ, the one the reply code shares wins."""
        self.assertEqual(preferStatus("4.4.1", "5.1.1", 550), "5.1.1")
        self.assertEqual(preferStatus("4.4.1", "5.1.1", 450), "4.4.1")

    def test_weakGivenYields(self):
        """A vague given code (4.7.0, 5.3.x, x.5.x protocol) yields to the text's."""
        self.assertEqual(preferStatus("4.7.0", "4.7.28"), "4.7.28")
        self.assertEqual(preferStatus("5.5.1", "5.1.1"), "5.1.1")
        self.assertEqual(preferStatus("5.3.0", "5.2.2"), "5.2.2")

    def test_userUnknownStatus(self):
        """A 5.1.1 yields to a precise code, not to a protocol or class-only one."""
        self.assertEqual(preferStatus("5.1.1", "5.7.1"), "5.7.1")
        self.assertEqual(preferStatus("5.1.1", "5.5.0"), "5.1.1")
        self.assertEqual(preferStatus("5.2.2", "5.7.1"), "5.2.2")

    def test_statusInTextChosen(self):
        """classify takes the diagnostic's precise code over a class-only one."""
        text = "5.1.0 - Unknown address error 550-'5.7.1 <a@b.example>... Access denied'"
        self.assertEqual(classify("5.0.0", 550, text).status, "5.7.1")
