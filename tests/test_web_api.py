"""
Tests for L{smartrelay.web.api}: the HTTP API in memory through
L{StubTreq}, over a L{MemoryStore}, a real L{DeliveryScheduler} with the
fakes of L{smartrelay.outbound.testing}, on a L{Clock}; and
L{smartrelay.web.site} and L{smartrelay.web.proxies}.
"""

import ipaddress
import json
from urllib.parse import quote

from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from smartrelay.events import Event, EventLog, rfc3339
from smartrelay.outbound.scheduler import DeliveryScheduler
from smartrelay.outbound.testing import (
    Delays,
    FakeDeliverer,
    FakeRouter,
    FakeSpool,
    makeEntry,
)
from smartrelay.store.memory import MemoryStore
from smartrelay.store.sqlite import SQLiteStore
from smartrelay.web.api import (
    AUTH_FAILURES,
    COMPLAINT_RATE_LIMIT,
    ApiApp,
    parseTime,
)
from smartrelay.web.proxies import clientAddress
from smartrelay.web.site import MAX_BODY, BoundedRequest, SiteRoot, makeSite
from tests.test_store import synchronous

START = 1_700_000_000.0
TOKEN = "t" * 24
OTHER_TOKEN = "0123456789abcdef" * 2
QUEUE_ID = "2A/01-00001-00000001"
MESSAGE = (
    b"Received: from client.test\r\nFrom: app@example.com\r\nTo: a@example.org\r\n"
    b"Subject: hi\r\n\r\nbody\r\n"
)


class Leaf(Resource):
    """
    A leaf resource answering every path with the same bytes.
    """

    isLeaf = True

    def __init__(self, body: bytes) -> None:
        super().__init__()
        self.body = body

    def render_GET(self, request):
        return self.body


class ApiTestsMixin:
    """
    An L{ApiApp} over a memory store, a scheduler with fake sessions and a
    fake spool, reached through L{StubTreq}.
    """

    tokens = (TOKEN, OTHER_TOKEN)

    def makeStore(self):
        return MemoryStore()

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(START)
        self.store = self.makeStore()
        self.successResultOf(self.store.start())
        self.addCleanup(self.store.close)
        self.events = EventLog(self.store, self.clock)
        self.spool = FakeSpool()
        self.deliverer = FakeDeliverer()
        self.scheduler = DeliveryScheduler(
            spool=self.spool,
            router=FakeRouter(),
            connector=self.deliverer,
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
        self.app = ApiApp(
            store=self.store,
            scheduler=self.scheduler,
            spool=self.spool,
            clock=self.clock,
            tokens=self.tokens,
        )
        self.treq = StubTreq(SiteRoot(Leaf(b"tracking"), {b"api": self.app.resource()}))

    def call(self, method, path, token=TOKEN, headers=None, **kwargs):
        headers = dict(headers or {})
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        d = self.treq.request(method, "http://relay.test" + path, headers=headers, **kwargs)
        self.treq.flush()
        # (The event log writes on the next turn; a delete answers then.)
        self.clock.advance(0)
        self.treq.flush()
        response = self.successResultOf(d)
        body = self.successResultOf(self.treq.content(response))
        self.clock.advance(0)
        self.treq.flush()
        return response, body

    def json(self, method, path, status=200, **kwargs):
        response, body = self.call(method, path, **kwargs)
        self.assertEqual(response.code, status, body)
        self.assertEqual(
            response.headers.getRawHeaders("Content-Type"), ["application/json; charset=utf-8"]
        )
        return json.loads(body)

    def assertError(self, method, path, status, code, parameter=None, **kwargs):
        body = self.json(method, path, status, **kwargs)
        self.assertEqual(set(body), {"error"})
        self.assertEqual(body["error"]["code"], code)
        self.assertIsInstance(body["error"]["message"], str)
        self.assertTrue(body["error"]["message"])
        if parameter is not None:
            self.assertEqual(body["error"]["parameter"], parameter)
            self.assertIn(parameter, body["error"]["message"])
        return body["error"]

    def emit(self, type, queue_id=QUEUE_ID, recipient="a@example.org", time=None, **kwargs):
        event = Event(type, queue_id, recipient, START if time is None else time, **kwargs)
        self.successResultOf(self.store.appendEvents([event]))
        return event

    def enqueue(self, queue_id=QUEUE_ID, recipients=("a@example.org",), data=MESSAGE):
        entry = makeEntry(queue_id, list(recipients), received=self.clock.seconds())
        self.spool.add(entry, data)
        self.scheduler.enqueue(entry)
        return entry


class AuthTests(ApiTestsMixin, SynchronousTestCase):
    """
    Bearer tokens, the failure limit, and the disabled API.
    """

    def test_noToken(self):
        """Without an Authorization header: 401 with a Bearer challenge."""
        response, body = self.call("GET", "/api/v1/events", token=None)
        self.assertEqual(response.code, 401)
        self.assertEqual(json.loads(body)["error"]["code"], "unauthorized")
        self.assertEqual(
            response.headers.getRawHeaders("WWW-Authenticate"), ['Bearer realm="smartrelay"']
        )

    def test_goodTokens(self):
        """Every configured token is accepted."""
        for token in self.tokens:
            self.json("GET", "/api/v1/events", token=token)

    def test_badHeaders(self):
        """A wrong token, another scheme, or an empty token: 401."""
        self.assertError("GET", "/api/v1/events", 401, "invalid_token", token="x" * 24)
        self.assertError("GET", "/api/v1/events", 401, "invalid_token", token=TOKEN + "x")
        for header in ["Basic dXNlcjpwYXNz", "Bearer", "Bearer ", TOKEN]:
            self.assertError(
                "GET", "/api/v1/events", 401, "unauthorized",
                token=None, headers={"Authorization": header},
            )

    def test_lockout(self):
        """
        Too many wrong tokens from one address lock it out (429 with
        Retry-After), even for a good token, until the lock-out ends.
        """
        for _ in range(AUTH_FAILURES):
            self.assertError("GET", "/api/v1/events", 401, "invalid_token", token="y" * 30)
        response, body = self.call("GET", "/api/v1/events")
        self.assertEqual(response.code, 429)
        self.assertEqual(json.loads(body)["error"]["code"], "too_many_failures")
        self.assertEqual(response.headers.getRawHeaders("Retry-After"), ["300"])
        self.clock.advance(301)
        self.json("GET", "/api/v1/events")

    def test_openapiPublic(self):
        """The OpenAPI document needs no token."""
        document = self.json("GET", "/api/v1/openapi.json", token=None)
        self.assertEqual(document["openapi"], "3.1.0")


class EveryRouteTests(ApiTestsMixin, SynchronousTestCase):
    """
    What every route does with an unknown parameter and another method.
    """

    def test_unknownParameter(self):
        """Every route refuses a parameter it does not take with a 400 naming it."""
        from smartrelay.web.api import ApiApp

        for rule in ApiApp.app.url_map.iter_rules():
            path = rule.rule.replace("<queueid:queue_id>", QUEUE_ID).replace(
                "<address:address>", "a@example.org"
            )
            for method in rule.methods - {"HEAD", "OPTIONS"}:
                self.assertError(
                    method, path + "?bogus=1", 400, "unknown_parameter", "bogus",
                    headers={"Content-Type": "application/json"}, data=b"{}",
                )

    def test_otherMethods(self):
        """A method a route does not take is a 405 JSON error with Allow."""
        from smartrelay.web.api import ApiApp

        for rule in ApiApp.app.url_map.iter_rules():
            path = rule.rule.replace("<queueid:queue_id>", QUEUE_ID).replace(
                "<address:address>", "a@example.org"
            )
            for method in {"GET", "POST", "DELETE", "PUT", "PATCH"} - rule.methods:
                response, body = self.call(method, path)
                if response.code == 405:
                    self.assertEqual(json.loads(body)["error"]["code"], "method_not_allowed")
                    self.assertTrue(response.headers.getRawHeaders("Allow"))
                else:
                    # Another route takes that method on this path.
                    self.assertIn(response.code, (200, 201, 202, 400, 404, 409, 415), (method, path))


class DisabledTests(ApiTestsMixin, SynchronousTestCase):
    """
    No [web] api_tokens: the API is disabled.
    """

    tokens = ()

    def test_disabled(self):
        """Every route answers 403 api_disabled, with or without a token."""
        self.assertError("GET", "/api/v1/events", 403, "api_disabled")
        self.assertError("GET", "/api/v1/queue", 403, "api_disabled", token=None)


class ErrorTests(ApiTestsMixin, SynchronousTestCase):
    """
    Routing errors, bodies and unexpected failures are JSON too.
    """

    def test_unknownRoute(self):
        """An unknown path under /api: 404 JSON."""
        self.assertError("GET", "/api/v1/nothing", 404, "not_found")
        self.assertError("GET", "/api/v2/events", 404, "not_found")

    def test_methodNotAllowed(self):
        """A known path with another method: 405 JSON with Allow."""
        response, body = self.call("PUT", "/api/v1/events")
        self.assertEqual(response.code, 405)
        self.assertEqual(json.loads(body)["error"]["code"], "method_not_allowed")
        self.assertIn("GET", response.headers.getRawHeaders("Allow")[0])

    def test_tooLarge(self):
        """A body over the limit: 413, nothing added."""
        self.app.maxBody = 100
        self.assertError(
            "POST", "/api/v1/suppressions", 413, "too_large",
            data=json.dumps({"address": "a@example.org", "reason": "manual" + " " * 200}),
            headers={"Content-Type": "application/json"},
        )
        page = self.successResultOf(self.store.listSuppressions())
        self.assertEqual(page.entries, [])

    def test_unknownParameter(self):
        """An unknown query parameter is a 400 naming it (a typo must not be ignored)."""
        self.assertError("GET", "/api/v1/events?limt=5", 400, "unknown_parameter", "limt")

    def test_repeatedParameter(self):
        """A parameter given twice: 400 naming it."""
        self.assertError("GET", "/api/v1/events?tag=a&tag=b", 400, "bad_parameter", "tag")

    def test_storeFails(self):
        """A store failure is a 500 JSON error, logged, never a traceback page."""
        self.successResultOf(self.store.close())
        error = self.assertError("GET", "/api/v1/events", 500, "internal_error")
        self.assertNotIn("Traceback", error["message"])
        self.assertTrue(self.flushLoggedErrors())

    def test_notUTF8(self):
        """A path that is not UTF-8: 400 JSON."""
        self.assertError("GET", "/api/v1/messages/%FF", 400, "bad_request")

    def test_otherApplications(self):
        """Paths outside /api go to the site's other application."""
        response, body = self.call("GET", "/t/c/whatever", token=None)
        self.assertEqual(body, b"tracking")


class MessageTests(ApiTestsMixin, SynchronousTestCase):
    """
    GET /api/v1/messages/<queue-id>.
    """

    def test_queued(self):
        """
        A queued message: envelope, per-recipient state with the last
        deferral, the raw headers from the spool, and its events; the id
        may be written with a slash or %2F.
        """
        self.enqueue(recipients=["a@example.org", "b@example.org"])
        self.emit("accepted", detail={"sender": "app@sender.example"})
        self.clock.advance(0)
        self.deliverer.calls[0].answer(451, "greylisted", "4.7.1")
        self.clock.advance(0)
        for path in [QUEUE_ID, quote(QUEUE_ID, safe="")]:
            document = self.json("GET", "/api/v1/messages/" + path)
            self.assertEqual(document["queue_id"], QUEUE_ID)
            self.assertTrue(document["queued"])
            self.assertEqual(
                document["envelope"]["recipients"], ["a@example.org", "b@example.org"]
            )
            self.assertEqual(document["headers"], MESSAGE.split(b"\r\n\r\n")[0].decode() + "\r\n")
            states = {r["address"]: r for r in document["recipients"]}
            self.assertEqual(states["a@example.org"]["state"], "deferred")
            self.assertEqual(states["a@example.org"]["last_reply"]["code"], 451)
            self.assertEqual(
                states["a@example.org"]["next_attempt"], rfc3339(START + 60)
            )
            self.assertEqual(
                [e["type"] for e in document["events"]], ["accepted", "deferred", "deferred"]
            )

    def test_deferredBeforeRestart(self):
        """
        A recipient deferred before a restart (the scheduler knows no reply)
        shows the reply of its last deferred event.
        """
        entry = makeEntry(QUEUE_ID, ["a@example.org"], received=START)
        entry.recipients[0].state = "deferred"
        entry.recipients[0].attempts = 1
        entry.recipients[0].next_attempt = START + 600
        self.spool.add(entry, MESSAGE)
        self.scheduler.enqueue(entry)
        self.emit("deferred", detail={"code": 451, "status": "4.2.0", "reply": "later", "remote": "mx"})
        document = self.json("GET", "/api/v1/messages/" + QUEUE_ID)
        self.assertEqual(
            document["recipients"][0]["last_reply"],
            {"code": 451, "status": "4.2.0", "reply": "later", "remote": "mx"},
        )

    def test_finished(self):
        """A message no longer queued is described from its events."""
        self.emit("accepted", detail={"sender": "app@example.com", "size": 10,
                                      "headers": "Subject: hi\r\n"})
        self.emit("delivered", time=START + 1, detail={"remote": "mx"})
        self.emit("accepted", recipient="b@example.org")
        self.emit("bounced", recipient="b@example.org", time=START + 2,
                  detail={"kind": "hard", "reason": "userunknown"})
        document = self.json("GET", "/api/v1/messages/" + QUEUE_ID)
        self.assertFalse(document["queued"])
        self.assertEqual(document["envelope"]["sender"], "app@example.com")
        self.assertEqual(document["envelope"]["received"], rfc3339(START))
        self.assertEqual(
            [(r["address"], r["state"], r["attempts"]) for r in document["recipients"]],
            [("a@example.org", "delivered", 1), ("b@example.org", "bounced", 1)],
        )
        self.assertEqual(document["headers"], "Subject: hi\r\n")
        self.assertEqual(len(document["events"]), 4)

    def test_unknown(self):
        """An unknown id: 404; a malformed one: 400 naming queue_id."""
        self.assertError("GET", "/api/v1/messages/" + QUEUE_ID, 404, "not_found")
        self.assertError("GET", "/api/v1/messages/2A/nonsense", 400, "bad_parameter", "queue_id")
        self.assertError("GET", "/api/v1/messages/nonsense", 404, "not_found")
        self.assertError(
            "GET", "/api/v1/messages/" + QUEUE_ID[:-1] + "G", 400, "bad_parameter", "queue_id"
        )
        self.assertError(
            "GET", "/api/v1/messages/" + QUEUE_ID + "?x=1", 400, "unknown_parameter", "x"
        )


class EventTests(ApiTestsMixin, SynchronousTestCase):
    """
    GET /api/v1/events.
    """

    def fill(self):
        for n in range(5):
            self.emit("delivered", recipient=f"r{n}@Example.org", time=START + n, tag="t%d" % (n % 2))
        self.emit("bounced", recipient="x@other.example", time=START + 10)

    def walk(self, query, limit):
        seen, cursor = [], None
        while True:
            path = f"/api/v1/events?limit={limit}" + query
            if cursor is not None:
                path += "&cursor=" + cursor
            page = self.json("GET", path)
            self.assertLessEqual(len(page["items"]), limit)
            seen.extend(page["items"])
            cursor = page["next_cursor"]
            if cursor is None:
                return seen

    def test_paging(self):
        """limit=2 walks every event once, in order, in pages of at most 2."""
        self.fill()
        seen = self.walk("", 2)
        self.assertEqual(len(seen), 6)
        self.assertEqual(len({e["id"] for e in seen}), 6)
        self.assertEqual([e["time"] for e in seen], sorted(e["time"] for e in seen))
        self.assertEqual(
            set(seen[0]),
            {"id", "time", "type", "queue_id", "recipient", "tag", "metadata", "detail"},
        )

    def test_recipientDomainCase(self):
        """
        The recipient filter matches whatever the case of its domain (as
        the UI's events page does): the address is normalised first.
        """
        self.emit("delivered", recipient="r1@example.org", time=START)
        self.emit("delivered", recipient="r2@example.org", time=START + 1)
        page = self.json("GET", "/api/v1/events?recipient=r1@EXAMPLE.org")
        self.assertEqual([e["recipient"] for e in page["items"]], ["r1@example.org"])

    def test_newEventsWhilePaging(self):
        """Events added during a walk show up once, on a later page."""
        self.fill()
        first = self.json("GET", "/api/v1/events?limit=3")
        self.emit("opened", time=START + 20)
        second = self.json("GET", "/api/v1/events?limit=10&cursor=" + first["next_cursor"])
        self.assertIsNone(second["next_cursor"])
        ids = [e["id"] for e in first["items"] + second["items"]]
        self.assertEqual(len(ids), 7)
        self.assertEqual(len(set(ids)), 7)

    def test_filters(self):
        """type, tag, recipient, since/until and domain filter the events."""
        self.fill()
        self.assertEqual(len(self.walk("&type=bounced", 10)), 1)
        self.assertEqual(len(self.walk("&tag=t0", 10)), 3)
        self.assertEqual(len(self.walk("&recipient=r1@example.ORG", 10)), 1)
        since = quote(rfc3339(START + 1))
        until = quote(rfc3339(START + 3))
        self.assertEqual(len(self.walk(f"&since={since}&until={until}", 10)), 2)
        self.assertEqual(len(self.walk(f"&since={START + 4}", 10)), 2)

    def test_domain(self):
        """domain keeps the events of recipients at that domain, walking every one once."""
        self.fill()
        seen = self.walk("&domain=EXAMPLE.org", 2)
        self.assertEqual(len(seen), 5)
        self.assertEqual(len({e["id"] for e in seen}), 5)
        self.assertEqual(len(self.walk("&domain=other.example", 1)), 1)

    def test_badParameters(self):
        """Every bad value is a 400 naming its parameter."""
        for query, parameter in [
            ("since=garbage", "since"),
            ("until=2026-13-45T00:00:00Z", "until"),
            ("since=2026-12-07T10:00:00", "since"),
            ("type=sent", "type"),
            ("limit=0", "limit"),
            ("limit=1001", "limit"),
            ("limit=ten", "limit"),
            ("cursor=!!", "cursor"),
            ("cursor=AAAA", "cursor"),
            ("recipient=nobody", "recipient"),
            ("queue_id=x", "queue_id"),
            ("domain=a@b", "domain"),
            ("tag=%01", "tag"),
        ]:
            self.assertError("GET", "/api/v1/events?" + query, 400, "bad_parameter", parameter)


class TimeTests(SynchronousTestCase):
    """
    L{parseTime}.
    """

    def test_forms(self):
        """RFC 3339 with Z or an offset, dates and POSIX seconds are read."""
        self.assertEqual(parseTime("2023-11-14T22:13:20Z"), START)
        self.assertEqual(parseTime("2023-11-14T23:13:20.000+01:00"), START)
        self.assertEqual(parseTime("2023-11-14t22:13:20.123456789z"), START + 0.123456)
        self.assertEqual(parseTime("2023-11-14"), START - 22 * 3600 - 13 * 60 - 20)
        self.assertEqual(parseTime("1700000000"), START)
        self.assertEqual(parseTime("1700000000.5"), START + 0.5)

    def test_bad(self):
        """Anything else raises ValueError."""
        for bad in ["", "garbage", "2023-11-14T22:13:20", "2023-02-30", "1e400", "nan",
                    "2023-11-14T25:00:00Z", "999999999999", "-5", "1.0123456789",
                    "0966-05-22", "1969-12-31T23:59:59Z"]:
            self.assertRaises(ValueError, parseTime, bad)


class StatsTests(ApiTestsMixin, SynchronousTestCase):
    """
    GET /api/v1/stats.
    """

    def test_counts(self):
        """
        Counts, rates (complaint rate beside the 0.3 % limit) and bounce
        reasons, per bucket and in total.
        """
        for n in range(8):
            self.emit("delivered", recipient=f"r{n}@example.org", time=START + n)
        self.emit("bounced", time=START + 3700,
                  detail={"kind": "hard", "reason": "userunknown"})
        self.emit("bounced", recipient="b@other.example", time=START + 3700,
                  detail={"kind": "soft", "reason": "mailboxfull"})
        self.emit("complained", time=START + 3700)
        since = quote(rfc3339(START - 3600))
        until = quote(rfc3339(START + 7200))
        stats = self.json("GET", f"/api/v1/stats?from={since}&to={until}")
        self.assertEqual(stats["interval"], "hour")
        self.assertEqual(stats["totals"]["counts"]["delivered"], 8)
        self.assertEqual(stats["totals"]["hard_bounces"], 1)
        self.assertEqual(
            stats["totals"]["bounce_reasons"], {"mailboxfull": 1, "userunknown": 1}
        )
        self.assertEqual(stats["rates"]["delivery"], 0.8)
        self.assertEqual(stats["rates"]["complaint"], 1 / 8)
        self.assertEqual(stats["complaint_rate_limit"], COMPLAINT_RATE_LIMIT)
        self.assertTrue(stats["complaint_rate_over_limit"])
        self.assertTrue(stats["bounce_reasons_complete"])
        self.assertEqual(len(stats["buckets"]), 2)
        self.assertEqual(stats["buckets"][1]["bounce_reasons"], {"mailboxfull": 1, "userunknown": 1})
        byDomain = self.json(
            "GET", f"/api/v1/stats?from={since}&to={until}&domain=other.example&interval=day"
        )
        self.assertEqual(byDomain["totals"]["bounce_reasons"], {"mailboxfull": 1})
        self.assertIsNone(byDomain["complaint_rate_over_limit"])

    def test_sms(self):
        """
        SMS parts are counted like mail, per tag and by the SMS domain, with
        their delivery rate over the parts that have a final receipt.
        """
        phone = "+4915112345678@sms.example"
        for part in range(3):
            self.emit("sms_submitted", recipient=phone, tag="otp", time=START + part,
                      detail={"message_id": f"m{part}", "part": part + 1, "parts": 3})
        self.emit("sms_delivered", recipient=phone, tag="otp", time=START + 10,
                  detail={"message_id": "m0", "state": "delivered"})
        self.emit("sms_failed", recipient=phone, tag="otp", time=START + 10,
                  detail={"message_id": "m1", "state": "expired"})
        since = quote(rfc3339(START - 3600))
        until = quote(rfc3339(START + 3600))
        for scope in ("", "&tag=otp", "&domain=sms.example"):
            stats = self.json("GET", f"/api/v1/stats?from={since}&to={until}{scope}")
            self.assertEqual(
                stats["totals"]["counts"],
                {"sms_submitted": 3, "sms_delivered": 1, "sms_failed": 1},
            )
            self.assertEqual(stats["rates"]["sms_delivery"], 0.5)
            self.assertIsNone(stats["rates"]["delivery"])
        stats = self.json("GET", f"/api/v1/stats?from={since}&to={until}&domain=example.org")
        self.assertEqual(stats["totals"]["counts"], {})
        self.assertIsNone(stats["rates"]["sms_delivery"])

    def test_defaults(self):
        """Without from and to: the last day by hour."""
        stats = self.json("GET", "/api/v1/stats")
        self.assertEqual(stats["to"], rfc3339(START))
        self.assertEqual(stats["from"], rfc3339(START - 86400))
        self.assertEqual(stats["buckets"], [])

    def test_badParameters(self):
        """Bad values are 400s naming their parameter."""
        for query, parameter in [
            ("from=garbage", "from"),
            ("to=x", "to"),
            ("interval=week", "interval"),
            ("from=2023-11-15&to=2023-11-14", "from"),
            ("from=2000-01-01&to=2023-11-14", "from"),
            ("domain=a@b", "domain"),
        ]:
            self.assertError("GET", "/api/v1/stats?" + query, 400, "bad_parameter", parameter)


class SuppressionTests(ApiTestsMixin, SynchronousTestCase):
    """
    /api/v1/suppressions.
    """

    def add(self, address, reason="manual", **kwargs):
        return self.json(
            "POST", "/api/v1/suppressions", 201,
            data=json.dumps({"address": address, "reason": reason, **kwargs}),
            headers={"Content-Type": "application/json"},
        )

    def test_addListRemove(self):
        """Add with a reason, find by prefix, page, read one, remove."""
        entry = self.add("Someone@Example.ORG", "complaint", expires="2030-01-01T00:00:00Z")
        self.assertEqual(
            entry,
            {"address": "Someone@example.org", "reason": "complaint", "source_event": None,
             "time": rfc3339(START), "expires": "2030-01-01T00:00:00.000Z"},
        )
        self.add("a/b@example.org")
        self.assertEqual(
            self.json("GET", "/api/v1/suppressions/" + quote("a/b@example.org", safe=""))["address"],
            "a/b@example.org",
        )
        self.json("DELETE", "/api/v1/suppressions/a/b@example.org")
        self.add("other@example.org")
        self.add("third@example.net")
        page = self.json("GET", "/api/v1/suppressions?limit=2")
        self.assertEqual(len(page["items"]), 2)
        rest = self.json("GET", "/api/v1/suppressions?limit=2&cursor=" + page["next_cursor"])
        self.assertEqual(len(rest["items"]), 1)
        self.assertIsNone(rest["next_cursor"])
        found = self.json("GET", "/api/v1/suppressions?q=Some")
        self.assertEqual([e["address"] for e in found["items"]], ["Someone@example.org"])
        self.assertEqual(
            self.json("GET", "/api/v1/suppressions?reason=complaint")["items"][0]["address"],
            "Someone@example.org",
        )
        one = self.json("GET", "/api/v1/suppressions/" + quote("Someone@EXAMPLE.org"))
        self.assertEqual(one["reason"], "complaint")
        removed = self.json("DELETE", "/api/v1/suppressions/" + quote("Someone@example.org"))
        self.assertEqual(removed, {"address": "Someone@example.org", "removed": True})
        self.assertError("DELETE", "/api/v1/suppressions/Someone@example.org", 404, "not_found")
        self.assertError("GET", "/api/v1/suppressions/Someone@example.org", 404, "not_found")

    def test_suppressedRecipientNotDelivered(self):
        """An address added through the API is not delivered to."""
        self.add("a@example.org")
        self.enqueue()
        self.clock.advance(0)
        self.assertEqual(self.deliverer.calls, [])
        document = self.json("GET", "/api/v1/messages/" + QUEUE_ID)
        self.assertEqual(document["recipients"][0]["state"], "suppressed")

    def test_badAdds(self):
        """Bad bodies are 400s naming the field; nothing is added."""
        headers = {"Content-Type": "application/json"}
        for body, code, parameter in [
            (b"not json", "bad_json", None),
            (b"[1]", "bad_json", None),
            (b"\xff", "bad_json", None),
            (b"{}", "bad_parameter", "address"),
            (b'{"address": "nobody"}', "bad_parameter", "address"),
            (b'{"address": 5}', "bad_parameter", "address"),
            (b'{"address": "a@b.c", "reason": "spite"}', "bad_parameter", "reason"),
            (b'{"address": "a@b.c", "expires": "soon"}', "bad_parameter", "expires"),
            (b'{"address": "a@b.c", "expires": true}', "bad_parameter", "expires"),
            (b'{"address": "a@b.c", "colour": "red"}', "bad_parameter", "colour"),
            (b'{"address": "a@b.c", "expires": ""}', "bad_parameter", "expires"),
            (b'{"address": "a@b.c", "expires": -1}', "bad_parameter", "expires"),
            (b'{"address": "a@b.c", "expires": 1e12}', "bad_parameter", "expires"),
            (b'{"address": "a@b.c", "reason": ""}', "bad_parameter", "reason"),
            (b'{"address": "a@b.c", "reason": {}}', "bad_parameter", "reason"),
            (b'{"address": "a\\nb@b.c"}', "bad_parameter", "address"),
        ]:
            self.assertError(
                "POST", "/api/v1/suppressions", 400, code, parameter, data=body, headers=headers
            )
        self.assertEqual(self.successResultOf(self.store.listSuppressions()).entries, [])

    def test_badQueries(self):
        """Bad list parameters and addresses are 400s naming them."""
        self.assertError("GET", "/api/v1/suppressions?reason=x", 400, "bad_parameter", "reason")
        self.assertError("GET", "/api/v1/suppressions?limit=-1", 400, "bad_parameter", "limit")
        self.assertError("GET", "/api/v1/suppressions?cursor=zz", 400, "bad_parameter", "cursor")
        self.assertError("DELETE", "/api/v1/suppressions/nobody@", 400, "bad_parameter", "address")
        self.assertError("GET", "/api/v1/suppressions/%01@x", 400, "bad_parameter", "address")
        self.assertError("DELETE", "/api/v1/suppressions/import", 405, "method_not_allowed")

    def test_importCSV(self):
        """A CSV with a header row imports every line; the export gives them back."""
        csvText = "address,reason\r\na@example.org,bounce\r\nb@example.org,\r\n\r\n"
        result = self.json(
            "POST", "/api/v1/suppressions/import", data=csvText.encode(),
            headers={"Content-Type": "text/csv"},
        )
        self.assertEqual(result, {"imported": 2})
        response, body = self.call("GET", "/api/v1/suppressions/export?format=csv")
        self.assertEqual(response.headers.getRawHeaders("Content-Type"), ["text/csv; charset=utf-8"])
        lines = body.decode().splitlines()
        self.assertEqual(lines[0], "address,reason,source_event,time,expires")
        self.assertEqual(
            [line.split(",")[:2] for line in lines[1:]],
            [["a@example.org", "bounce"], ["b@example.org", "manual"]],
        )

    def test_importPlainCSV(self):
        """A CSV without a header is one address (and maybe a reason) a line."""
        result = self.json(
            "POST", "/api/v1/suppressions/import?reason=complaint",
            data=b"a@example.org\nb@example.org,unsubscribe\n",
            headers={"Content-Type": "text/csv"},
        )
        self.assertEqual(result, {"imported": 2})
        exported = self.json("GET", "/api/v1/suppressions/export")
        self.assertEqual(
            [(e["address"], e["reason"]) for e in exported["items"]],
            [("a@example.org", "complaint"), ("b@example.org", "unsubscribe")],
        )

    def test_importJSON(self):
        """A JSON array (objects or addresses) or {"items": [...]} imports."""
        for body in [["a@example.org", {"address": "b@example.org"}],
                     {"items": ["c@example.org"]}]:
            self.json(
                "POST", "/api/v1/suppressions/import", data=json.dumps(body).encode(),
                headers={"Content-Type": "application/json"},
            )
        exported = self.json("GET", "/api/v1/suppressions/export?format=json")
        self.assertEqual(len(exported["items"]), 3)

    def test_importBad(self):
        """One bad entry imports nothing and names the entry; other media types are 415."""
        self.assertError(
            "POST", "/api/v1/suppressions/import", 400, "bad_parameter", "items[2].address",
            data=b'["a@example.org", "nobody"]', headers={"Content-Type": "application/json"},
        )
        self.assertError(
            "POST", "/api/v1/suppressions/import", 400, "bad_parameter", "items[1].reason",
            data=b"address,reason\na@example.org,spite\n", headers={"Content-Type": "text/csv"},
        )
        self.assertError(
            "POST", "/api/v1/suppressions/import", 400, "bad_csv",
            data=b"address\na@example.org,x\n", headers={"Content-Type": "text/csv"},
        )
        self.assertError(
            "POST", "/api/v1/suppressions/import", 400, "bad_csv",
            data=b"\xff\xfe", headers={"Content-Type": "text/csv"},
        )
        self.assertError(
            "POST", "/api/v1/suppressions/import", 400, "bad_json",
            data=b'{"address": "a@example.org"}', headers={"Content-Type": "application/json"},
        )
        self.assertError(
            "POST", "/api/v1/suppressions/import", 415, "unsupported_media_type",
            data=b"a@example.org", headers={"Content-Type": "application/xml"},
        )
        self.assertError(
            "POST", "/api/v1/suppressions/import?reason=x", 400, "bad_parameter", "reason",
            data=b"[]", headers={"Content-Type": "application/json"},
        )
        self.assertError(
            "GET", "/api/v1/suppressions/export?format=xml", 400, "bad_parameter", "format"
        )
        self.assertEqual(self.successResultOf(self.store.listSuppressions()).entries, [])


class QueueTests(ApiTestsMixin, SynchronousTestCase):
    """
    /api/v1/queue and /api/v1/destinations.
    """

    def deferred(self, queue_id=QUEUE_ID, recipients=("a@example.org",)):
        entry = self.enqueue(queue_id, recipients)
        self.clock.advance(0)
        for call in list(self.deliverer.calls):
            if call.recipients[0] in recipients and not call.d.called:
                call.answer(451, "greylisted", "4.7.1")
        return entry

    def test_summary(self):
        """Per domain: messages, recipients, deferred, the oldest, the next attempt and the reasons."""
        self.deferred()
        self.clock.advance(5)
        self.deferred("2A/01-00001-00000002", ("b@example.org", "c@other.example"))
        summary = self.json("GET", "/api/v1/queue")
        self.assertEqual((summary["messages"], summary["recipients"]), (2, 3))
        [example, other] = summary["domains"]
        self.assertEqual(example["domain"], "example.org")
        self.assertEqual((example["messages"], example["recipients"], example["deferred"]), (2, 2, 2))
        self.assertEqual(example["oldest"], rfc3339(START))
        self.assertEqual(example["next_attempt"], rfc3339(START + 60))
        self.assertEqual(example["reasons"], [{"reason": "451 4.7.1 greylisted", "count": 2}])
        self.assertEqual(other["domain"], "other.example")
        only = self.json("GET", "/api/v1/queue?domain=Other.Example")
        self.assertEqual([d["domain"] for d in only["domains"]], ["other.example"])
        self.assertEqual((only["messages"], only["recipients"]), (1, 1))

    def test_list(self):
        """The per-message list pages by arrival, filtered by domain and state."""
        for n in range(1, 4):
            self.deferred(f"2A/01-00001-0000000{n}", (f"r{n}@example.org",))
            self.clock.advance(1)
        page = self.json("GET", "/api/v1/queue/messages?limit=2")
        self.assertEqual(
            [m["queue_id"] for m in page["items"]],
            ["2A/01-00001-00000001", "2A/01-00001-00000002"],
        )
        rest = self.json("GET", "/api/v1/queue/messages?limit=2&cursor=" + page["next_cursor"])
        self.assertEqual([m["queue_id"] for m in rest["items"]], ["2A/01-00001-00000003"])
        self.assertIsNone(rest["next_cursor"])
        self.assertEqual(
            rest["items"][0]["recipients"][0]["last_reply"]["reply"], "greylisted"
        )
        self.assertEqual(self.json("GET", "/api/v1/queue/messages?state=queued")["items"], [])
        self.assertEqual(self.json("GET", "/api/v1/queue/messages?domain=x.example")["items"], [])

    def test_retry(self):
        """Retry attempts a deferred message at once: 202, then a new attempt."""
        self.deferred()
        calls = len(self.deliverer.calls)
        answer = self.json("POST", f"/api/v1/queue/{QUEUE_ID}/retry", 202)
        self.assertEqual(answer, {"queue_id": QUEUE_ID, "retrying": ["a@example.org"]})
        self.clock.advance(0)
        self.assertEqual(len(self.deliverer.calls), calls + 1)
        self.assertError("POST", f"/api/v1/queue/{QUEUE_ID}/retry", 409, "in_progress")

    def test_retryDomain(self):
        """POST /queue/retry?domain= retries every waiting message of a domain."""
        self.deferred()
        self.assertEqual(
            self.json("POST", "/api/v1/queue/retry?domain=example.org"),
            {"domain": "example.org", "messages": 1},
        )
        self.assertError("POST", "/api/v1/queue/retry", 400, "bad_parameter", "domain")

    def test_delete(self):
        """Delete: the message gets expired events (reason deleted), leaves the queue and never goes out."""
        self.deferred()
        calls = len(self.deliverer.calls)
        answer = self.json("DELETE", "/api/v1/queue/" + quote(QUEUE_ID, safe=""))
        self.assertEqual(answer, {"queue_id": QUEUE_ID, "deleted": ["a@example.org"]})
        self.assertEqual(self.json("GET", "/api/v1/queue")["domains"], [])
        self.clock.advance(86400)
        self.assertEqual(len(self.deliverer.calls), calls)
        document = self.json("GET", "/api/v1/messages/" + QUEUE_ID)
        self.assertFalse(document["queued"])
        self.assertEqual(document["events"][-1]["type"], "expired")
        self.assertEqual(document["events"][-1]["detail"]["reason"], "deleted")
        self.assertError("DELETE", "/api/v1/queue/" + QUEUE_ID, 404, "not_found")

    def test_deleteInFlight(self):
        """A message in a transaction: 409, nothing changed."""
        self.enqueue()
        self.clock.advance(0)
        self.assertError("DELETE", "/api/v1/queue/" + QUEUE_ID, 409, "in_progress")
        self.assertEqual(len(self.json("GET", "/api/v1/queue")["domains"]), 1)

    def test_badInput(self):
        """Unknown and malformed ids, bad filters."""
        self.assertError("POST", f"/api/v1/queue/{QUEUE_ID}/retry", 404, "not_found")
        self.assertError("POST", "/api/v1/queue/2A/nonsense/retry", 400, "bad_parameter", "queue_id")
        self.assertError("DELETE", "/api/v1/queue/2A%2Fnonsense", 400, "bad_parameter", "queue_id")
        self.assertError("DELETE", "/api/v1/queue/retry", 405, "method_not_allowed")
        self.assertError("GET", "/api/v1/queue?domain=a@b", 400, "bad_parameter", "domain")
        self.assertError("GET", "/api/v1/queue/messages?state=sent", 400, "bad_parameter", "state")
        self.assertError("GET", "/api/v1/queue/messages?cursor=abc", 400, "bad_parameter", "cursor")
        self.assertError("GET", "/api/v1/queue?x=1", 400, "unknown_parameter", "x")

    def test_destinations(self):
        """The state of every destination, throttle included."""
        self.deferred()
        destinations = self.json("GET", "/api/v1/destinations")
        [state] = destinations["items"]
        self.assertEqual(state["destination"], "relay:smarthost.test:25")
        self.assertIn("throttled", state)
        self.assertIsNone(destinations["next_cursor"])


class ClientAddressTests(SynchronousTestCase):
    """
    L{clientAddress} and [web] trusted_proxies.
    """

    def request(self, peer, forwarded=None):
        from twisted.internet.address import IPv4Address
        from twisted.web.test.requesthelper import DummyRequest

        request = DummyRequest([b""])
        request.client = IPv4Address("TCP", peer, 1234)
        if forwarded is not None:
            for value in forwarded:
                request.requestHeaders.addRawHeader(b"X-Forwarded-For", value)
        return request

    def test_untrusted(self):
        """Without trusted proxies, or from another peer, X-Forwarded-For is ignored."""
        proxies = (ipaddress.ip_network("10.0.0.0/8"),)
        self.assertEqual(clientAddress(self.request("10.1.1.1", [b"1.2.3.4"])), "10.1.1.1")
        self.assertEqual(
            clientAddress(self.request("192.0.2.1", [b"1.2.3.4"]), proxies), "192.0.2.1"
        )

    def test_trusted(self):
        """From a trusted proxy, the rightmost untrusted hop is the client."""
        proxies = (ipaddress.ip_network("10.0.0.0/8"),)
        for forwarded, client in [
            ([b"1.2.3.4"], "1.2.3.4"),
            ([b"6.6.6.6, 1.2.3.4, 10.0.0.2"], "1.2.3.4"),
            ([b"6.6.6.6", b"1.2.3.4"], "1.2.3.4"),
            ([b"10.0.0.3, 10.0.0.2"], "10.0.0.3"),
            ([b"1.2.3.4, garbage"], "10.1.1.1"),
            ([b"2001:db8::1"], "2001:db8::1"),
            ([], "10.1.1.1"),
        ]:
            self.assertEqual(
                clientAddress(self.request("10.1.1.1", forwarded), proxies), client, forwarded
            )

    def test_lockoutPerForwardedClient(self):
        """Behind a trusted proxy, failures are counted for the forwarded client."""
        test = AuthTests("test_noToken")
        test.setUp()
        test.app.trustedProxies = (ipaddress.ip_network("127.0.0.0/8"),)
        for _ in range(AUTH_FAILURES):
            test.call("GET", "/api/v1/events", token="y" * 30,
                      headers={"X-Forwarded-For": "192.0.2.7"})
        response, _ = test.call("GET", "/api/v1/events", headers={"X-Forwarded-For": "192.0.2.7"})
        self.assertEqual(response.code, 429)
        response, _ = test.call("GET", "/api/v1/events", headers={"X-Forwarded-For": "192.0.2.8"})
        self.assertEqual(response.code, 200)
        test.scheduler.stopService()


class SiteRootTests(SynchronousTestCase):
    """
    L{SiteRoot}: the first path segment chooses the application.
    """

    def test_dispatch(self):
        """Mounted segments go to their resource, everything else to the default; both see the whole path."""

        class Echo(Resource):
            isLeaf = True

            def __init__(self, name):
                super().__init__()
                self.name = name

            def render_GET(self, request):
                return self.name + b" " + b"/".join(request.postpath)

        treq = StubTreq(SiteRoot(Echo(b"default"), {b"api": Echo(b"api")}))
        for path, expected in [
            ("/api/v1/x", b"api api/v1/x"),
            ("/t/c/abc", b"default t/c/abc"),
            ("/", b"default "),
            ("/apis", b"default apis"),
        ]:
            d = treq.get("http://x" + path)
            treq.flush()
            self.assertEqual(self.successResultOf(treq.content(self.successResultOf(d))), expected)


class SQLiteMixin:
    """
    The same tests over a real L{SQLiteStore} (its statements run
    synchronously).
    """

    def makeStore(self):
        return SQLiteStore(self.mktemp(), synchronous)


class SQLiteMessageTests(SQLiteMixin, MessageTests):
    """
    L{MessageTests} over SQLite.
    """


class SQLiteEventTests(SQLiteMixin, EventTests):
    """
    L{EventTests} over SQLite.
    """


class SQLiteStatsTests(SQLiteMixin, StatsTests):
    """
    L{StatsTests} over SQLite.
    """


class SQLiteSuppressionTests(SQLiteMixin, SuppressionTests):
    """
    L{SuppressionTests} over SQLite.
    """


class QueueSliceTests(ApiTestsMixin, SynchronousTestCase):
    """
    Walks over a big queue let the reactor run between slices.
    """

    def test_slices(self):
        """The summary and the list of a queue bigger than a slice come in several reactor turns."""
        from smartrelay.web import queries

        self.patch(queries, "QUEUE_SLICE", 2)
        self.scheduler.hold = True
        for n in range(5):
            self.enqueue(f"2A/01-00001-0000000{n}", (f"r{n}@example.org",))
        headers = {"Authorization": f"Bearer {TOKEN}"}
        d = self.treq.get("http://relay.test/api/v1/queue", headers=headers)
        self.treq.flush()
        self.assertNoResult(d)
        self.clock.advance(0)
        self.clock.advance(0)
        self.treq.flush()
        summary = json.loads(self.successResultOf(self.treq.content(self.successResultOf(d))))
        self.assertEqual((summary["messages"], summary["recipients"]), (5, 5))
        d = self.treq.get("http://relay.test/api/v1/queue/messages?limit=4", headers=headers)
        self.treq.flush()
        self.clock.advance(0)
        self.clock.advance(0)
        self.treq.flush()
        page = json.loads(self.successResultOf(self.treq.content(self.successResultOf(d))))
        self.assertEqual(len(page["items"]), 4)
        self.assertIsNotNone(page["next_cursor"])


class BoundedRequestTests(SynchronousTestCase):
    """
    L{BoundedRequest}: bodies over the limit are dropped, not stored.
    """

    def request(self):
        from twisted.web.test.requesthelper import DummyChannel

        return BoundedRequest(DummyChannel())

    def test_declaredTooLarge(self):
        """A Content-Length over the limit: nothing is kept, bodyTooLarge is set."""
        request = self.request()
        request.gotLength(MAX_BODY + 1)
        request.handleContentChunk(b"x" * 1000)
        self.assertTrue(request.bodyTooLarge)
        request.content.seek(0)
        self.assertEqual(request.content.read(), b"")

    def test_chunkedTooLarge(self):
        """A chunked body growing past the limit is dropped when it does."""
        request = self.request()
        request.maxBody = 10
        request.gotLength(None)
        request.handleContentChunk(b"x" * 6)
        self.assertFalse(request.bodyTooLarge)
        request.handleContentChunk(b"x" * 6)
        self.assertTrue(request.bodyTooLarge)
        self.assertEqual(request.content.read(), b"")

    def test_small(self):
        """A body within the limit is kept as Twisted keeps it."""
        request = self.request()
        request.gotLength(5)
        request.handleContentChunk(b"hello")
        request.content.seek(0)
        self.assertEqual((request.content.read(), request.bodyTooLarge), (b"hello", False))

    def test_makeSite(self):
        """The relay's site makes bounded requests and shows no tracebacks."""
        site = makeSite(Leaf(b"x"), Clock())
        self.assertIs(site.requestFactory, BoundedRequest)
        self.assertFalse(site.displayTracebacks)


class ProtocolTests(SynchronousTestCase):
    """
    The collaborators the API is typed by.
    """

    def test_schedulerIsQueueControl(self):
        """DeliveryScheduler has every method of QueueControl, and the spool MessageReader's."""
        from smartrelay.spool import Spool
        from smartrelay.web.api import MessageReader, QueueControl

        for protocol, cls in [(QueueControl, DeliveryScheduler), (MessageReader, Spool)]:
            for name in dir(protocol):
                if not name.startswith("_"):
                    self.assertTrue(callable(getattr(cls, name, None)), f"{cls.__name__}.{name}")
