"""
Tests for L{smartrelay.web.ui}: the reports UI in memory through
L{StubTreq}, over a L{MemoryStore}, a real L{DeliveryScheduler} with the
fakes of L{smartrelay.outbound.testing}, on a L{Clock}: login, sessions,
CSRF, headers and escaping with hostile input, then every page.
"""

import base64
import ipaddress
import re
from http.cookies import SimpleCookie
from urllib.parse import parse_qs, quote, urlencode, urlsplit

from http.cookiejar import CookieJar, DefaultCookiePolicy

import treq
from treq.client import HTTPClient
from treq.testing import RequestTraversalAgent, _SynchronousProducer
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from smartrelay.auth import HashedPasswordChecker, PasswordFile
from smartrelay.dnscheck import FAIL, OK, Check, DNSUnavailable
from smartrelay.events import Event, EventLog
from smartrelay.outbound.scheduler import DeliveryScheduler
from smartrelay.outbound.testing import Delays, FakeDeliverer, FakeRouter, FakeSpool, makeEntry
from smartrelay.store.interfaces import SuppressionEntry
from smartrelay.store.memory import MemoryStore
from smartrelay.web.queries import Queries
from smartrelay.web.site import SiteRoot
from smartrelay.web.ui.app import UiApp
from smartrelay.web.ui.domains import DomainChecks
from smartrelay.web.ui.html import Table, csvBytes
from smartrelay.web.ui.pages import RewrapSettings
from smartrelay.web.ui.sessions import Sessions
from tests.test_auth import cheapHash
from tests.test_web_api import Leaf

START = 1_700_000_000.0
QUEUE_ID = "2A/01-00001-00000001"
USER, PASSWORD = "admin", "correct horse battery staple"
ORIGIN = "http://relay.test"
HOSTILE = "<img src=x onerror=alert(1)>"
HOSTILE_SUBJECT = "=?utf-8?b?" + base64.b64encode(HOSTILE.encode()).decode() + "?="


def headerBlock(subject=HOSTILE_SUBJECT, messageID="<client-1@app.example>"):
    return (
        f"Received: from client.test\r\nFrom: app@example.com\r\nTo: a@example.org\r\n"
        f"Subject: {subject}\r\nMessage-ID: {messageID}\r\n"
    )


class UiTestsMixin:
    """
    A L{UiApp} over a memory store and a scheduler with fake sessions,
    reached through L{StubTreq}; a browser's cookie jar kept by hand.
    """

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(START)
        self.store = self.makeStore()
        self.successResultOf(self.store.start())
        self.addCleanup(self.store.close)
        self.events = EventLog(self.store, self.clock)
        self.spool = FakeSpool()
        self.scheduler = DeliveryScheduler(
            spool=self.spool,
            router=FakeRouter(),
            connector=FakeDeliverer(),
            events=self.events,
            clock=self.clock,
            retry=Delays((60, 300)),
            maxAge=3600.0,
            maxConnections=4,
            store=self.store,
            suppress=True,
        )
        self.scheduler.startService()
        self.addCleanup(lambda: self.scheduler.running and self.scheduler.stopService())
        self.queries = Queries(self.store, self.scheduler, self.spool, self.clock)
        passwords = PasswordFile.parse(f"{USER}:{cheapHash(PASSWORD)}\n")
        self.checks = []
        self.ui = UiApp(
            queries=self.queries,
            clock=self.clock,
            checker=HashedPasswordChecker(passwords, lambda f, *a: maybeDeferred(f, *a)),
            sessions=Sessions(self.clock, idle=600, lifetime=3600),
            trustedProxies=self.trustedProxies(),
            domains=DomainChecks(("example.com",), run=self.runChecks, clock=self.clock),
            rewrap=RewrapSettings(dkim={"example.com": (("rsa-sha256", "s1"),)},
                                  bounceDomain="bounces.example.com"),
        )
        root = SiteRoot(self.ui.resource(), {b"t": Leaf(b"tracking"), b"api": Leaf(b"api")})
        # A client whose cookies are only the test's own (self.cookies).
        agent = RequestTraversalAgent(root)
        self.client = HTTPClient(
            agent=agent,
            data_to_body_producer=_SynchronousProducer,
            cookiejar=CookieJar(DefaultCookiePolicy(allowed_domains=[])),
        )
        self.flush = agent.flush
        self.cookies = {}

    def makeStore(self):
        return MemoryStore()

    def trustedProxies(self):
        return ()

    def runChecks(self, domain):
        self.checks.append(domain)
        return succeed([
            Check("spf", "bounces.example.com", OK, "SPF allows the smarthost."),
            Check("dkim", f"s1._domainkey.{domain}", FAIL, "no key <published>",
                  publish=f's1._domainkey.{domain}. IN TXT "v=DKIM1; k=rsa; p=MII"'),
        ])

    # -- a browser by hand --------------------------------------------------

    def request(self, method, path, headers=None, cookies=True, **kwargs):
        headers = dict(headers or {})
        if cookies and self.cookies:
            headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        d = self.client.request(method, ORIGIN + path, headers=headers, allow_redirects=False,
                                **kwargs)
        self.flush()
        self.clock.advance(0)
        self.flush()
        # A failed login is answered after the limiter's delay.
        done = []
        d.addBoth(lambda result: (done.append(True), result)[1])
        for _ in range(30):
            if done:
                break
            self.clock.advance(1)
            self.flush()
        response = self.successResultOf(d)
        body = self.successResultOf(treq.content(response))
        for value in response.headers.getRawHeaders("Set-Cookie", []):
            cookie = SimpleCookie(value)
            for name, morsel in cookie.items():
                if morsel["max-age"] == "0":
                    self.cookies.pop(name, None)
                else:
                    self.cookies[name] = morsel.value
        return response, body.decode("utf-8")

    def get(self, path, status=200, **kwargs):
        response, body = self.request("GET", path, **kwargs)
        self.assertEqual(response.code, status, body[:2000])
        return response, body

    def post(self, path, fields, status=303, origin=ORIGIN, token=True, headers=None, **kw):
        headers = dict(headers or {})
        if origin is not None:
            headers["Origin"] = origin
        headers.setdefault("Content-Type", "application/x-www-form-urlencoded")
        fields = dict(fields)
        if token is True:
            fields["csrf"] = self.csrf()
        elif token:
            fields["csrf"] = token
        response, body = self.request("POST", path, headers=headers,
                                      data=urlencode(fields).encode(), **kw)
        self.assertEqual(response.code, status, body[:2000])
        return response, body

    def csrf(self):
        response, body = self.request("GET", "/suppressions")
        match = re.search(r'name="csrf" value="([^"]+)"', body)
        assert match, body[:2000]
        return match.group(1)

    def login(self, user=USER, password=PASSWORD, status=303, nextPath="/"):
        response, body = self.get("/login?" + urlencode({"next": nextPath}))
        token = re.search(r'name="csrf" value="([^"]+)"', body).group(1)
        return self.post("/login", {"user": user, "password": password, "next": nextPath},
                         status=status, token=token)

    def emit(self, type, queue_id=QUEUE_ID, recipient="a@example.org", time=None, **kwargs):
        event = Event(type, queue_id, recipient, START if time is None else time, **kwargs)
        self.successResultOf(self.store.appendEvents([event]))
        return event

    def hostileMessage(self):
        """
        A delivered-after-a-deferral message whose every field is hostile.
        """
        meta = {"order": "<script>alert(2)</script>"}
        tag = 'x"><script>alert(3)</script>'
        self.emit("accepted", tag=tag, metadata=meta,
                  detail={"sender": "app@example.com", "size": 120,
                          "client": {"ip": "127.0.0.1", "helo": "<b>helo</b>", "user": None},
                          "headers": headerBlock()})
        self.emit("deferred", tag=tag, metadata=meta, time=START + 1,
                  detail={"code": 451, "status": "4.7.1", "reply": "<i>greylisted</i>",
                          "remote": "mx.example.org"})
        self.emit("delivered", tag=tag, metadata=meta, time=START + 61,
                  detail={"code": 250, "reply": "ok <queued>", "remote": "mx.example.org",
                          "tls": True})
        self.emit("clicked", tag=tag, metadata=meta, time=START + 120,
                  detail={"url": "https://example.com/?a=<x>", "ip": "1.2.3.4",
                          "user_agent": "<ua>", "machine": False})


class LoginTests(UiTestsMixin, SynchronousTestCase):
    """
    Login, logout, sessions and the login failure limits.
    """

    def test_pagesNeedLogin(self):
        """Every page sends a browser without a session to the login page, keeping the path."""
        for path in ["/", "/events?type=bounced", "/queue", "/messages/" + quote(QUEUE_ID)]:
            response, _ = self.get(path, status=303)
            location = response.headers.getRawHeaders("Location")[0]
            self.assertEqual(urlsplit(location).path, "/login")
            self.assertEqual(parse_qs(urlsplit(location).query)["next"], [path])

    def test_securityHeaders(self):
        """Every answer has a CSP without script or inline style, nosniff and no framing."""
        for path, status in [("/login", 200), ("/", 303), ("/nowhere", 404),
                             ("/static/ui.css", 200)]:
            response, _ = self.get(path, status=status)
            csp = response.headers.getRawHeaders("Content-Security-Policy")[0]
            self.assertIn("default-src 'none'", csp)
            self.assertIn("frame-ancestors 'none'", csp)
            self.assertNotIn("unsafe-inline", csp)
            self.assertNotIn("script-src", csp)
            self.assertEqual(response.headers.getRawHeaders("X-Content-Type-Options"),
                             ["nosniff"])
            self.assertEqual(response.headers.getRawHeaders("X-Frame-Options"), ["DENY"])

    def test_loginPageHasSearchBox(self):
        """The login page, like every page, has the q search box and no script."""
        _, body = self.get("/login")
        self.assertIn('name="q"', body)
        self.assertNotIn("<script", body)

    def test_login(self):
        """A right password gives a session cookie (HttpOnly, SameSite=Lax, not Secure over http)."""
        response, _ = self.login(nextPath="/queue")
        self.assertEqual(response.headers.getRawHeaders("Location"), ["/queue"])
        cookies = [c for c in response.headers.getRawHeaders("Set-Cookie")
                   if c.startswith("smartrelay_session=")]
        self.assertEqual(len(cookies), 1)
        self.assertIn("HttpOnly", cookies[0])
        self.assertIn("SameSite=Lax", cookies[0])
        self.assertNotIn("Secure", cookies[0])
        _, body = self.get("/")
        self.assertIn("Dashboard", body)
        self.assertIn(USER, body)
        self.assertEqual(len(self.ui.sessions), 1)

    def test_openRedirect(self):
        """After the login, a next that is not a path of this site goes to the dashboard."""
        for bad in ["//evil.example/", "https://evil.example/", "/\\evil.example", "javascript:x"]:
            self.cookies.clear()
            response, _ = self.login(nextPath=bad)
            self.assertEqual(response.headers.getRawHeaders("Location"), ["/"], bad)

    def test_wrongPassword(self):
        """A wrong password is a 401 login page after the limiter's delay; no session."""
        response, body = self.login(password="wrong", status=401)
        self.assertIn("Wrong user name or password", body)
        self.assertNotIn("smartrelay_session", self.cookies)
        self.assertEqual(len(self.ui.sessions), 0)

    def test_unknownUserSameAnswer(self):
        """An unknown user gets the same answer as a wrong password."""
        _, body = self.login(user="nobody", password="x", status=401)
        self.assertIn("Wrong user name or password", body)

    def test_clientLockedOut(self):
        """After 10 failures from one address the login is refused (429, Retry-After), even a right one."""
        for n in range(10):
            self.login(password=f"wrong{n}", status=401)
            self.clock.advance(20)
        response, body = self.login(status=429)
        self.assertIn("Too many failed logins", body)
        self.assertTrue(int(response.headers.getRawHeaders("Retry-After")[0]) > 0)
        self.assertNotIn("smartrelay_session", self.cookies)
        self.clock.advance(901)
        self.login()

    def test_loginNeedsToken(self):
        """A login without the login form's token, or with another's, is refused."""
        self.get("/login")
        self.post("/login", {"user": USER, "password": PASSWORD}, status=403, token=None)
        self.post("/login", {"user": USER, "password": PASSWORD}, status=403, token="x" * 40)
        self.assertEqual(len(self.ui.sessions), 0)

    def test_loginCrossSite(self):
        """A login posted from another site is refused (login CSRF)."""
        _, body = self.get("/login")
        token = re.search(r'name="csrf" value="([^"]+)"', body).group(1)
        self.post("/login", {"user": USER, "password": PASSWORD}, status=403, token=token,
                  origin="https://evil.example")
        self.assertEqual(len(self.ui.sessions), 0)

    def test_logoutEndsSession(self):
        """Logout ends the session on the server: the old cookie no longer works."""
        self.login()
        old = dict(self.cookies)
        self.post("/logout", {})
        self.assertEqual(len(self.ui.sessions), 0)
        self.cookies = old
        self.get("/", status=303)

    def test_logoutNeedsToken(self):
        """A logout without the session's token (a forged form) is refused."""
        self.login()
        self.post("/logout", {}, status=403, token="forged")
        self.assertEqual(len(self.ui.sessions), 1)

    def test_idleExpiry(self):
        """A session idle longer than the timeout has ended."""
        self.login()
        self.clock.advance(599)
        self.get("/")
        self.clock.advance(601)
        self.get("/", status=303)

    def test_lifetime(self):
        """A session ends at its lifetime however busy it is."""
        self.login()
        for _ in range(7):
            self.clock.advance(500)
            self.get("/")
        self.clock.advance(500)
        self.get("/", status=303)

    def test_forgedCookie(self):
        """A made-up or doubled session cookie is no session."""
        self.login()
        real = self.cookies["smartrelay_session"]
        self.cookies["smartrelay_session"] = "A" * 43
        self.get("/", status=303)
        self.get("/", status=303, cookies=False,
                 headers={"Cookie": f"smartrelay_session={real}; smartrelay_session=x"})

    def test_pathNotUTF8(self):
        """A path that is not UTF-8 is a plain 400 with the security headers."""
        response, body = self.request("GET", "/%FF%FE")
        self.assertEqual(response.code, 400, body)
        self.assertTrue(response.headers.getRawHeaders("Content-Security-Policy"))

    def test_longPassword(self):
        """A password longer than 1,024 characters is a 400 page; nothing is checked."""
        _, body = self.get("/login")
        token = re.search(r'name="csrf" value="([^"]+)"', body).group(1)
        self.post("/login", {"user": USER, "password": "x" * 5000}, status=400, token=token)

    def test_noUsers(self):
        """Without [web] users_file the login page says so and nobody can log in."""
        self.ui.checker = None
        _, body = self.get("/login")
        self.assertIn("users_file", body)
        self.login(status=403)


class SecureCookieTests(UiTestsMixin, SynchronousTestCase):
    """
    The cookie's Secure attribute behind a trusted proxy.
    """

    def trustedProxies(self):
        return (ipaddress.ip_network("127.0.0.0/8"),)

    def test_secureBehindProxy(self):
        """Behind a trusted proxy saying https the cookie is Secure (and the Origin is https)."""
        self.ui.trustedProxies = self.trustedProxies()
        response, body = self.get("/login", headers={"X-Forwarded-Proto": "https"})
        token = re.search(r'name="csrf" value="([^"]+)"', body).group(1)
        response, _ = self.post(
            "/login", {"user": USER, "password": PASSWORD}, token=token,
            origin="https://relay.test", headers={"X-Forwarded-Proto": "https"},
        )
        cookie = [c for c in response.headers.getRawHeaders("Set-Cookie")
                  if c.startswith("smartrelay_session=")][0]
        self.assertIn("Secure", cookie)

    def test_forwardedHost(self):
        """Behind a trusted proxy the Origin is compared with its X-Forwarded-Host."""
        self.ui.trustedProxies = self.trustedProxies()
        proxied = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "mail.example.com"}
        _, body = self.get("/login", headers=proxied)
        token = re.search(r'name="csrf" value="([^"]+)"', body).group(1)
        self.post("/login", {"user": USER, "password": PASSWORD}, status=403, token=token,
                  origin="https://relay.test", headers=proxied)
        self.post("/login", {"user": USER, "password": PASSWORD}, token=token,
                  origin="https://mail.example.com", headers=proxied)

    def test_forwardedHostUntrusted(self):
        """X-Forwarded-Host from a peer that is not a trusted proxy is not believed."""
        self.ui.trustedProxies = ()
        _, body = self.get("/login")
        token = re.search(r'name="csrf" value="([^"]+)"', body).group(1)
        self.post("/login", {"user": USER, "password": PASSWORD}, status=403, token=token,
                  origin="http://evil.example", headers={"X-Forwarded-Host": "evil.example"})

    def test_untrustedProxyHeader(self):
        """X-Forwarded-Proto from a peer that is not a trusted proxy changes nothing."""
        self.ui.trustedProxies = ()
        response, _ = self.get("/login", headers={"X-Forwarded-Proto": "https"})
        cookie = response.headers.getRawHeaders("Set-Cookie")[0]
        self.assertNotIn("Secure", cookie)


class PerUserLimitTests(UiTestsMixin, SynchronousTestCase):
    """
    Wrong passwords for one user from many addresses (behind a trusted
    proxy, the client is the address it names).
    """

    def trustedProxies(self):
        return (ipaddress.ip_network("127.0.0.0/8"),)

    def loginFrom(self, address, password, status):
        self.cookies.clear()
        headers = {"X-Forwarded-For": address}
        _, body = self.get("/login", headers=headers)
        token = re.search(r'name="csrf" value="([^"]+)"', body).group(1)
        return self.post("/login", {"user": USER, "password": password}, status=status,
                         token=token, headers=headers)

    def test_userLockedOut(self):
        """100 failures for a user from many addresses lock the user out for new addresses only."""
        self.loginFrom("192.0.2.200", PASSWORD, 303)
        for n in range(100):
            self.loginFrom(f"198.51.100.{n}", "guess", 401)
        _, body = self.loginFrom("203.0.113.9", PASSWORD, 429)
        self.assertIn("Too many failed logins", body)
        # The address the user logged in from before still gets in.
        self.loginFrom("192.0.2.200", PASSWORD, 303)


class CSRFTests(UiTestsMixin, SynchronousTestCase):
    """
    State-changing requests need the session's token and a same-origin
    request; otherwise 403 and nothing changes.
    """

    def setUp(self):
        super().setUp()
        self.login()

    def suppressed(self):
        page = self.successResultOf(self.store.listSuppressions())
        return [e.address for e in page.entries]

    def test_sameOrigin(self):
        """The form with the token from the same origin adds the address."""
        self.post("/suppressions/add", {"address": "x@example.org", "reason": "manual"})
        self.assertEqual(self.suppressed(), ["x@example.org"])

    def test_crossSiteOrigin(self):
        """An Origin of another site is refused with 403, nothing added."""
        _, body = self.post("/suppressions/add", {"address": "x@example.org"}, status=403,
                            origin="https://evil.example")
        self.assertIn("did not come from this site", body)
        self.assertEqual(self.suppressed(), [])

    def test_nullOrigin(self):
        """Origin: null (a sandboxed frame, a data: page) is refused."""
        self.post("/suppressions/add", {"address": "x@example.org"}, status=403, origin="null")
        self.assertEqual(self.suppressed(), [])

    def test_secFetchSite(self):
        """Sec-Fetch-Site cross-site or same-site is refused, even with a right Origin."""
        for site in ["cross-site", "same-site", "none"]:
            self.post("/suppressions/add", {"address": "x@example.org"}, status=403,
                      headers={"Sec-Fetch-Site": site})
        self.post("/suppressions/add", {"address": "y@example.org"}, origin=None,
                  headers={"Sec-Fetch-Site": "same-origin"})
        self.assertEqual(self.suppressed(), ["y@example.org"])

    def test_neither(self):
        """A POST with neither Origin nor Sec-Fetch-Site (no browser) is refused."""
        self.post("/suppressions/add", {"address": "x@example.org"}, status=403, origin=None)
        self.assertEqual(self.suppressed(), [])

    def test_badToken(self):
        """A missing or wrong token is refused, nothing added."""
        self.post("/suppressions/add", {"address": "x@example.org"}, status=403, token=None)
        self.post("/suppressions/add", {"address": "x@example.org"}, status=403,
                  token="a" * 43)
        self.assertEqual(self.suppressed(), [])

    def test_otherSessionsToken(self):
        """The token of another session does not do."""
        mine = self.csrf()
        self.cookies.clear()
        self.login()
        self.post("/suppressions/add", {"address": "x@example.org"}, status=403, token=mine)
        self.assertEqual(self.suppressed(), [])

    def test_noSession(self):
        """A POST without a session is refused (403), never redirected and done."""
        token = self.csrf()
        self.cookies.pop("smartrelay_session")
        self.post("/suppressions/add", {"address": "x@example.org"}, status=403, token=token)
        self.assertEqual(self.suppressed(), [])

    def test_everyPostRoute(self):
        """Every POST route of the UI refuses a cross-site request."""
        for rule in UiApp.app.url_map.iter_rules():
            if "POST" not in rule.methods:
                continue
            self.post(rule.rule, {"address": "x@example.org", "queue_id": QUEUE_ID},
                      status=403, origin="https://evil.example")
        self.assertEqual(self.suppressed(), [])
        self.assertEqual(len(self.ui.sessions), 1)

    def test_getChangesNothing(self):
        """The state-changing routes take no GET."""
        for path in ["/suppressions/add?address=x@example.org", "/queue/delete?queue_id=x",
                     "/logout"]:
            self.get(path, status=405)
        self.assertEqual(self.suppressed(), [])


class EscapingTests(UiTestsMixin, SynchronousTestCase):
    """
    Whatever the relay shows is escaped: subjects with encoded-word HTML,
    recipients, tags, metadata, remote replies, queries.
    """

    def setUp(self):
        super().setUp()
        self.login()
        self.hostileMessage()

    def assertEscaped(self, body):
        self.assertNotIn("<img src=x", body)
        self.assertNotIn("<script>", body)
        self.assertNotIn("<i>greylisted", body)
        self.assertNotIn('"><script', body)

    def test_messagePage(self):
        """The decoded hostile subject, tag, metadata and replies show as text."""
        _, body = self.get("/messages/" + quote(QUEUE_ID, safe=""))
        self.assertEscaped(body)
        self.assertIn("&lt;img src=x onerror=alert(1)&gt;", body)
        self.assertIn("&lt;i&gt;greylisted&lt;/i&gt;", body)
        self.assertIn("&lt;script&gt;alert(2)&lt;/script&gt;", body)

    def test_eventsPage(self):
        """The events list escapes tags, replies and URLs."""
        _, body = self.get("/events")
        self.assertEscaped(body)
        self.assertIn("&lt;i&gt;greylisted&lt;/i&gt;", body)

    def test_reflectedQuery(self):
        """A hostile q comes back escaped in the search box and the page."""
        q = '"> <script>alert(4)</script>'
        _, body = self.get("/search?" + urlencode({"q": q}))
        self.assertEscaped(body)
        self.assertIn("&lt;script&gt;alert(4)&lt;/script&gt;", body)

    def test_hostileRecipient(self):
        """A recipient with markup is escaped on the events page."""
        self.emit("bounced", queue_id="2A/01-00001-00000002",
                  recipient='"<svg onload=alert(5)>"@example.org',
                  detail={"kind": "hard", "reason": "userunknown", "diagnostic": "550 <b>"})
        _, body = self.get("/events?type=bounced")
        self.assertNotIn("<svg onload", body)
        self.assertIn("&lt;svg onload=alert(5)&gt;", body)
        _, body = self.get("/bounces?reason=userunknown")
        self.assertNotIn("<svg onload", body)
        self.assertNotIn("550 <b>", body)

    def test_csvFormulas(self):
        """A CSV download makes cells a spreadsheet would run as formulas into text."""
        table = Table("t", "T", ["a", "b"], [("=HYPERLINK(\"x\")", "+1"), ("-2", "@SUM(A1)")])
        self.assertEqual(
            csvBytes(table), b"a,b\r\n\"'=HYPERLINK(\"\"x\"\")\",'+1\r\n'-2,'@SUM(A1)\r\n"
        )


class DashboardTests(UiTestsMixin, SynchronousTestCase):
    """
    The dashboard: counters as SVG charts, rates, the complaint limit.
    """

    def setUp(self):
        super().setUp()
        self.login()

    def test_charts(self):
        """The dashboard draws inline SVG charts with a title from the counters."""
        for n in range(5):
            self.emit("accepted", queue_id=f"2A/01-00001-0000001{n}", time=START - 7200)
            self.emit("delivered", queue_id=f"2A/01-00001-0000001{n}", time=START - 3600)
        _, body = self.get("/?range=day")
        self.assertEqual(body.count("<svg"), 2)
        self.assertIn("<polyline", body)
        self.assertIn('role="img"', body)
        self.assertIn("<title>Events per hour", body)
        self.assertIn("100.00 %", body)  # delivery rate

    def test_sms(self):
        """
        SMS are counted like mail: parts submitted, delivered and failed,
        the SMS delivery rate and a chart of their own, shown once there
        are any.
        """
        _, body = self.get("/?range=day")
        self.assertNotIn("SMS parts submitted", body)
        self.emit("accepted", recipient="+4915112345678@sms.example", time=START - 3600)
        for part in (1, 2):
            self.emit("sms_submitted", recipient="+4915112345678@sms.example",
                      time=START - 3500, detail={"message_id": f"m{part}", "part": part, "parts": 2})
        self.emit("sms_delivered", recipient="+4915112345678@sms.example", time=START - 3400,
                  detail={"message_id": "m1", "part": 1, "parts": 2, "state": "delivered"})
        self.emit("sms_failed", recipient="+4915112345678@sms.example", time=START - 3400,
                  detail={"message_id": "m2", "part": 2, "parts": 2, "state": "expired"})
        _, body = self.get("/?range=day")
        self.assertIn("SMS parts submitted", body)
        self.assertIn("<title>SMS parts per hour", body)
        self.assertEqual(body.count("<svg"), 3)
        self.assertIn("50.00 %", body)  # one part of two delivered
        _, body = self.get("/?range=day&domain=sms.example")
        self.assertIn("SMS parts delivered", body)
        _, body = self.get("/?range=day&domain=example.org")
        self.assertNotIn("SMS parts submitted", body)

    def test_complaintOverLimit(self):
        """A complaint rate over 0.3 % is drawn and said in red."""
        for n in range(100):
            self.emit("delivered", queue_id=f"2A/01-00001-{n:08X}", time=START - 60)
        self.emit("complained", queue_id="2A/01-00001-00000000", time=START - 30,
                  detail={"feedback_type": "abuse"})
        _, body = self.get("/?range=hour")
        self.assertIn('class="over"', body)
        self.assertIn('fill="#C00000"', body)
        self.assertIn("over the 0.3 %", body)
        self.assertIn("value over", body)

    def test_noEventScan(self):
        """The dashboard reads counters only: it works with queryEvents failing."""
        def refuse(**kwargs):
            raise AssertionError("the dashboard scanned events")

        self.patch(MemoryStore, "queryEvents", refuse)
        self.patch(MemoryStore, "eventsForMessage", refuse)
        for chosen in ["hour", "day", "month"]:
            self.get(f"/?range={chosen}&tag=welcome&domain=example.org")

    def test_badRange(self):
        """A bad filter value is a 400 page naming it."""
        _, body = self.get("/?range=year", status=400)
        self.assertIn("range", body)
        self.get("/?bogus=1", status=400)

    def test_csv(self):
        """The dashboard's table downloads as CSV; an unknown table is a 404."""
        self.emit("accepted", time=START - 10)
        response, body = self.get("/?range=hour&format=csv&table=buckets")
        self.assertEqual(response.headers.getRawHeaders("Content-Type"),
                         ["text/csv; charset=utf-8"])
        self.assertTrue(body.startswith("start,accepted,delivered"))
        self.get("/?format=csv&table=nope", status=404)

    def test_queueSize(self):
        """The dashboard shows the queue's size and its oldest message."""
        self.scheduler.hold = True
        self.scheduler.enqueue(makeEntry(QUEUE_ID, ("a@example.org",), received=START - 100))
        _, body = self.get("/")
        self.assertIn("queued messages", body)
        self.assertIn(">1<", body)
        self.assertIn("2023-11-14 22:11:40 UTC", body)  # the oldest: START - 100


class SearchAndMessageTests(UiTestsMixin, SynchronousTestCase):
    """
    The q search box and the message page.
    """

    def setUp(self):
        super().setUp()
        self.login()
        self.hostileMessage()

    def location(self, q):
        response, _ = self.get("/search?" + urlencode({"q": q}), status=303)
        return response.headers.getRawHeaders("Location")[0]

    def test_queueID(self):
        """A queue id (any case) goes to its message page."""
        self.assertEqual(self.location(QUEUE_ID.lower()), "/messages/" + quote(QUEUE_ID, safe=""))

    def test_recipient(self):
        """An address lists its events."""
        self.assertEqual(self.location("a@Example.ORG"), "/events?recipient=a%40example.org")

    def test_tag(self):
        """Anything else is a tag: its accepted messages."""
        self.assertEqual(self.location("welcome"), "/events?tag=welcome&type=accepted")

    def test_generatedMessageID(self):
        """The Message-ID the relay makes from a queue id finds that message."""
        self.assertEqual(self.location("<2A01-00001-00000001@relay.example>"),
                         "/messages/" + quote(QUEUE_ID, safe=""))

    def test_clientMessageID(self):
        """A client's Message-ID is found in the headers of accepted messages."""
        self.assertEqual(self.location("<client-1@app.example>"),
                         "/messages/" + quote(QUEUE_ID, safe=""))
        _, body = self.get("/search?" + urlencode({"q": "<none@app.example>"}))
        self.assertIn("No message has this Message-ID", body)

    def test_messagePage(self):
        """The message page: envelope, recipients, the timeline in order, headers, re-wrap."""
        _, body = self.get("/messages/" + quote(QUEUE_ID, safe=""))
        timeline = body[body.index('class="timeline"'):]
        order = [timeline.index(f'class="type">{t}<') for t in
                 ("accepted", "deferred", "delivered", "clicked")]
        self.assertEqual(order, sorted(order))
        self.assertIn("greylisted", timeline)
        self.assertIn("Message-ID: &lt;client-1@app.example&gt;", body)
        self.assertIn("signed for d=example.com with rsa-sha256 (selector s1)", body)
        self.assertIn("bounce+TOKEN@bounces.example.com", body)
        self.assertIn("this message was clicked", body)

    def test_unknownMessage(self):
        """An unknown or malformed id is a 404 or 400 page."""
        self.get("/messages/" + quote("2A/01-00001-0000FFFF", safe=""), status=404)
        self.get("/messages/" + quote("2A/nonsense", safe=""), status=400)

    def test_eventsPaging(self):
        """The events list walks the API's cursor: next page links until the end."""
        seen = []
        path = "/events?limit=2"
        while path:
            _, body = self.get(path)
            seen.extend(re.findall(r"<td>(accepted|deferred|delivered|clicked)</td>", body))
            match = re.search(r'href="(\?[^"]*cursor=[^"]*)" rel="next"', body)
            path = None if match is None else "/events" + match.group(1).replace("&amp;", "&")
        self.assertEqual(seen, ["accepted", "deferred", "delivered", "clicked"])


class EventExportTests(UiTestsMixin, SynchronousTestCase):
    """
    Every matching event as one CSV download.
    """

    def setUp(self):
        super().setUp()
        self.login()

    def test_everyPage(self):
        """The download walks every page of the cursor, with the filters; formulas made text."""
        from smartrelay.web.ui import pages

        self.patch(pages, "MAX_LIMIT", 2)
        for n in range(5):
            self.emit("delivered", queue_id=f"2A/01-00001-0000000{n}", time=START + n,
                      tag="=cmd|' /C calc'!A0" if n == 0 else "t",
                      detail={"remote": "mx.example.org"})
        self.emit("bounced", time=START + 10, detail={"kind": "hard"})
        response, body = self.get("/events/export.csv?type=delivered")
        self.assertEqual(response.headers.getRawHeaders("Content-Disposition"),
                         ['attachment; filename="events.csv"'])
        lines = body.splitlines()
        self.assertEqual(lines[0], "id,time,type,queue_id,recipient,tag,metadata,detail")
        self.assertEqual(len(lines), 6)
        self.assertIn(",'=cmd|", lines[1])
        self.assertIn('"{""remote"": ""mx.example.org""}"', lines[1])
        _, page = self.get("/events?type=delivered")
        self.assertIn("/events/export.csv?type=delivered", page)

    def test_cap(self):
        """At most MAX_EVENT_EXPORT events go into one download."""
        from smartrelay.web.ui import pages

        self.patch(pages, "MAX_EVENT_EXPORT", 3)
        for n in range(5):
            self.emit("delivered", queue_id=f"2A/01-00001-0000000{n}", time=START + n)
        _, body = self.get("/events/export.csv")
        self.assertEqual(len(body.splitlines()), 4)

    def test_badFilter(self):
        """A bad filter is a 400 page, not a download."""
        _, body = self.get("/events/export.csv?since=yesterday", status=400)
        self.assertIn("since", body)


class SuppressionPageTests(UiTestsMixin, SynchronousTestCase):
    """
    The suppression list: search, add, remove, CSV import and export.
    """

    def setUp(self):
        super().setUp()
        self.login()

    def suppressed(self):
        page = self.successResultOf(self.store.listSuppressions())
        return {e.address: e.reason for e in page.entries}

    def test_addSearchRemove(self):
        """An address added shows with its reason and date, and can be removed."""
        response, _ = self.post("/suppressions/add", {"address": "X@Example.org",
                                                      "reason": "complaint"})
        self.assertEqual(self.suppressed(), {"X@example.org": "complaint"})
        _, body = self.get(response.headers.getRawHeaders("Location")[0])
        self.assertIn("The address is on the suppression list.", body)
        self.assertIn("X@example.org", body)
        self.assertIn("complaint", body)
        self.post("/suppressions/remove", {"address": "X@example.org"})
        self.assertEqual(self.suppressed(), {})

    def test_badInput(self):
        """A bad address, reason or expiry is a 400 page naming the field; nothing added."""
        for fields, name in [({"address": "nobody"}, "address"),
                             ({"address": "a@b.example", "reason": "whim"}, "reason"),
                             ({"address": "a@b.example", "expires": "soon"}, "expires")]:
            _, body = self.post("/suppressions/add", fields, status=400)
            self.assertIn(name, body)
        self.assertEqual(self.suppressed(), {})
        self.post("/suppressions/remove", {"address": "a@b.example"}, status=404)

    def test_importExport(self):
        """A CSV upload imports every line or none; the export gives them back."""
        good = b"address,reason\r\na@example.org,bounce\r\nb@example.org,\r\n"
        response, body = self.upload(good)
        self.assertEqual(response.code, 303, body)
        self.assertEqual(self.suppressed(), {"a@example.org": "bounce", "b@example.org": "manual"})
        response, body = self.upload(b"c@example.org\r\nnot-an-address\r\n")
        self.assertEqual(response.code, 400, body)
        self.assertNotIn("c@example.org", self.suppressed())
        response, body = self.get("/suppressions/export.csv")
        self.assertEqual(response.headers.getRawHeaders("Content-Disposition"),
                         ['attachment; filename="suppressions.csv"'])
        self.assertEqual(body.splitlines()[0], "address,reason,source_event,time,expires")
        self.assertEqual(len(body.splitlines()), 3)

    def upload(self, data, reason="manual"):
        boundary = "----smartrelaytest"
        parts = []
        for name, value in [("csrf", self.csrf()), ("reason", reason)]:
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"'
                         f"\r\n\r\n{value}\r\n".encode())
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
                     f'filename="list.csv"\r\nContent-Type: text/csv\r\n\r\n'.encode()
                     + data + b"\r\n")
        parts.append(f"--{boundary}--\r\n".encode())
        return self.request(
            "POST", "/suppressions/import", data=b"".join(parts),
            headers={"Origin": ORIGIN,
                     "Content-Type": f"multipart/form-data; boundary={boundary}"},
        )

    def test_pages(self):
        """A long list is paged with the store's cursor."""
        for n in range(5):
            self.successResultOf(self.store.addSuppression(
                SuppressionEntry(address=f"u{n}@example.org", reason="manual", time=START)))
        _, body = self.get("/suppressions?limit=2")
        self.assertIn("u1@example.org", body)
        self.assertNotIn("u2@example.org", body)
        self.assertIn('rel="next"', body)


class QueuePageTests(UiTestsMixin, SynchronousTestCase):
    """
    The queue page: per domain, destinations, retry and delete with
    confirmation.
    """

    def setUp(self):
        super().setUp()
        self.login()
        self.scheduler.hold = True
        self.scheduler.enqueue(makeEntry(QUEUE_ID, ("a@example.org", "b@example.net"),
                                         received=START - 100))

    def test_listing(self):
        """The queue shows its domains and messages, each with retry and delete."""
        _, body = self.get("/queue")
        self.assertIn("example.net", body)
        self.assertIn(QUEUE_ID, body)
        self.assertIn("Retry", body)
        self.assertIn("/queue/confirm?queue_id=" + quote(QUEUE_ID, safe=""), body)

    def test_localWording(self):
        """Without other nodes the counts are this node's."""
        _, body = self.get("/queue")
        self.assertIn("waiting on this node.", body)
        self.assertNotIn("did not answer", body)

    def test_clusterAndMissingNodes(self):
        """
        With other nodes sharing the store the page says over which nodes
        it counted, names those that did not answer, and shows each
        destination's node.
        """
        summary = self.successResultOf(Deferred.fromCoroutine(self.queries.queueSummary()))
        listing = self.successResultOf(Deferred.fromCoroutine(
            self.queries.queueMessages(None, None, 50, None)))
        cluster = {"nodes": ["01", "02"], "partial": True, "missing_nodes": ["03"],
                   "node_errors": [{"node": "03", "error": "node_timeout"}]}

        async def clusterSummary(only=None):
            return dict(summary, **cluster)

        async def clusterMessages(*args):
            return dict(listing, **cluster)

        async def clusterDestinations():
            return dict(cluster, items=[{
                "destination": "example.net", "node": "02", "queued": 1, "connections": 0,
                "max_connections": 10, "configured_max_connections": 10, "rate": None,
                "throttled": False, "throttle_factor": 1.0, "throttle_until": None,
            }], next_cursor=None)

        self.patch(self.queries, "queueSummary", clusterSummary)
        self.patch(self.queries, "queueMessages", clusterMessages)
        self.patch(self.queries, "clusterDestinations", clusterDestinations)
        _, body = self.get("/queue")
        self.assertIn("waiting on the 2 nodes that answered (01, 02).", body)
        self.assertIn("Not counted: node 03 did not answer in time", body)
        self.assertIn('role="alert"', body)
        self.assertIn("<th scope=\"col\">node</th>", body.replace("'", '"'))

    def test_deleteWithConfirmation(self):
        """Delete asks first; the confirmed form ends the recipients expired."""
        _, body = self.get("/queue/confirm?" + urlencode({"queue_id": QUEUE_ID}))
        self.assertIn("cannot be undone", body)
        self.assertIsNotNone(self.scheduler.queuedMessage(QUEUE_ID))
        self.post("/queue/delete", {"queue_id": QUEUE_ID})
        self.clock.advance(0)
        self.assertIsNone(self.scheduler.queuedMessage(QUEUE_ID))
        self.post("/queue/delete", {"queue_id": QUEUE_ID}, status=404)

    def test_retry(self):
        """Retry now attempts the message; the message page's form comes back to it."""
        calls = []
        self.patch(self.scheduler, "retryNow", lambda q: calls.append(q) or True)
        response, _ = self.post("/queue/retry", {"queue_id": QUEUE_ID, "back": "message"})
        self.assertEqual(calls, [QUEUE_ID])
        self.assertEqual(response.headers.getRawHeaders("Location"),
                         ["/messages/" + quote(QUEUE_ID, safe="") + "?done=retried"])
        self.post("/queue/retry", {"queue_id": "nonsense"}, status=400)
        self.post("/queue/retry", {"queue_id": "2A/01-00001-0000FFFF"}, status=404)

    def test_retryDomain(self):
        """Retry now for a domain retries its recipients."""
        calls = []
        self.patch(self.scheduler, "retryDomain", lambda d: calls.append(d) or 1)
        self.post("/queue/retry-domain", {"domain": "Example.NET"})
        self.assertEqual(calls, ["example.net"])
        self.post("/queue/retry-domain", {"domain": "a b"}, status=400)


class BouncesAndDomainsTests(UiTestsMixin, SynchronousTestCase):
    """
    The bounces and domains pages.
    """

    def setUp(self):
        super().setUp()
        self.login()

    def test_bounces(self):
        """Bounces by reason, kind and domain; a row lists its messages."""
        for n, (reason, kind, domain) in enumerate([("userunknown", "hard", "a.example"),
                                                    ("userunknown", "hard", "b.example"),
                                                    ("mailboxfull", "soft", "a.example")]):
            self.emit("bounced", queue_id=f"2A/01-00001-0000000{n}",
                      recipient=f"u{n}@{domain}", time=START - 60,
                      detail={"kind": kind, "reason": reason, "diagnostic": "550 5.1.1 no"})
        _, body = self.get("/bounces")
        self.assertIn("3 bounces", body)
        self.assertIn("<title>Bounces per hour", body)  # the chart, from the counters
        self.assertIn("/bounces?range=day&amp;reason=userunknown", body)
        _, body = self.get("/bounces?reason=userunknown")
        self.assertIn("2A/01-00001-00000000", body)
        self.assertIn("2A/01-00001-00000001", body)
        self.assertNotIn("2A/01-00001-00000002", body)

    def test_domains(self):
        """The domains page shows each check and the record to publish, escaped; results are kept."""
        _, body = self.get("/domains")
        self.assertIn("status-fail", body)
        self.assertIn("no key &lt;published&gt;", body)
        self.assertIn('s1._domainkey.example.com. IN TXT', body)
        self.get("/domains")
        self.assertEqual(self.checks, ["example.com"])
        self.get("/domains?refresh=on")
        self.assertEqual(self.checks, ["example.com", "example.com"])

    def test_dnsUnavailable(self):
        """Name servers that do not answer are said on the page."""
        def unavailable(domain):
            from twisted.internet.defer import fail

            return fail(DNSUnavailable("no answer from 127.0.0.1:53"))

        self.ui.domains = DomainChecks(("example.com",), run=unavailable, clock=self.clock)
        _, body = self.get("/domains")
        self.assertIn("no answer from 127.0.0.1:53", body)


class SessionsTests(SynchronousTestCase):
    """
    L{Sessions} on its own.
    """

    def test_bounded(self):
        """At most maxSessions live; the least recently used goes first."""
        clock = Clock()
        sessions = Sessions(clock, maxSessions=2)
        a, b = sessions.create("a"), sessions.create("b")
        clock.advance(1)
        sessions.get(a.id)
        sessions.create("c")
        self.assertIsNotNone(sessions.get(a.id))
        self.assertIsNone(sessions.get(b.id))

    def test_endUser(self):
        """Every session of a user can be ended."""
        sessions = Sessions(Clock())
        first, _ = sessions.create("a"), sessions.create("a")
        sessions.create("b")
        self.assertEqual(sessions.endUser("a"), 2)
        self.assertIsNone(sessions.get(first.id))
        self.assertEqual(len(sessions), 1)


class BuildTests(SynchronousTestCase):
    """
    L{makeUiApp} from a configuration.
    """

    def build(self, extra=""):
        from twisted.internet.testing import MemoryReactorClock

        from smartrelay.config import parseConfig
        from smartrelay.web.ui.build import makeUiApp

        config = parseConfig("[smartrelay]\nhostname = relay.example\n\n[web]\n" + extra)
        reactor = MemoryReactorClock()
        queries = Queries(MemoryStore(), None, None, reactor)
        return makeUiApp(config, reactor, queries, lambda f, *a: maybeDeferred(f, *a)), reactor

    def test_users(self):
        """[web] users_file gives a checker of its users; sessions follow the [web] keys."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(f"{USER}:{cheapHash(PASSWORD)}\n")
        ui, reactor = self.build(
            f"users_file = {path}\nsession_timeout = 10m\nsession_lifetime = 2h\n"
        )
        from twisted.cred.credentials import UsernamePassword

        self.assertEqual(
            self.successResultOf(ui.checker.requestAvatarId(UsernamePassword(USER, PASSWORD))),
            USER,
        )
        self.assertEqual((ui.sessions.idle, ui.sessions.lifetime), (600.0, 7200.0))
        self.assertEqual(tuple(ui.domains.domains), ("relay.example",))
        # Nothing is scheduled on the reactor before a DNS check is asked for.
        self.assertEqual(reactor.getDelayedCalls(), [])

    def test_noUsers(self):
        """Without [web] users_file there is no checker."""
        ui, _ = self.build()
        self.assertIsNone(ui.checker)

    def test_badUsersFile(self):
        """A users file that does not parse is one configuration error naming the key."""
        from smartrelay.config import ConfigError, parseConfig

        path = self.mktemp()
        with open(path, "w") as f:
            f.write("no colon here\n")
        error = self.assertRaises(ConfigError, parseConfig, f"[web]\nusers_file = {path}\n")
        self.assertIn("users_file", str(error))
        self.assertNotIn("\n", str(error))
