"""
The reading pages of the reports UI (the ones that change things are in
L{smartrelay.web.ui.manage}), and what both share: each a function of the application
(L{smartrelay.web.ui.app.UiApp}, for its query layer) and the request's
L{Context}, answering a L{Page}, a redirect or a download.  Inputs are
read with the API's own checks (L{smartrelay.web.apirequest.Query}); every
string shown goes through L{twisted.web.template}, which escapes it.
"""

import email.header
import json
import re
from typing import Optional
from urllib.parse import quote, urlencode

import attrs
from twisted.web.template import Tag, tags

from smartrelay.engine.dkim import fromDomain
from smartrelay.events import EVENT_TYPES, rfc3339
from smartrelay.ids import QUEUE_ID_RE, queueIDFromFileName
from smartrelay.store.interfaces import (
    INTERVALS,
    MAX_LIMIT,
    bucketStart,
    recipientDomain,
)
from smartrelay.web.apirequest import (
    EVENT_FILTERS,
    eventFilters,
    ApiError,
    Query,
    checkAddress,
    checkQueueID,
)
from smartrelay.web.queries import COMPLAINT_RATE_LIMIT, MAX_SCAN
from smartrelay.web.ui.charts import (
    SERIES,
    SMS_SERIES,
    SMS_SWATCHES,
    fillBuckets,
    lineChart,
    rateChart,
    seriesValues,
)
from smartrelay.web.ui.html import (
    Download,
    Link,
    Page,
    Redirect,
    Table,
    csvBytes,
    percent,
    shortTime,
)

__all__ = [
    "RewrapSettings",
    "bounces",
    "dashboard",
    "errorPage",
    "events",
    "exportEvents",
    "filterForm",
    "hiddenToken",
    "loginPage",
    "message",
    "messageLink",
    "ownQuery",
    "pager",
    "postButton",
    "readQuery",
    "search",
    "withNotice",
]

#: The dashboard's ranges: (interval, seconds back, label).
RANGES = {
    "hour": ("hour", 3600, "the last hour"),
    "day": ("hour", 86400, "the last 24 hours"),
    "month": ("day", 30 * 86400, "the last 30 days"),
}

#: How far back a Message-ID search looks, and how many events at most.
MESSAGE_ID_WINDOW = 7 * 86400

#: Fixed notices after an action (never text from the request).
NOTICES = {
    "added": "The address is on the suppression list.",
    "removed": "The address is off the suppression list.",
    "imported": "The file was imported.",
    "retried": "The waiting recipients are being attempted now.",
    "deleted": "The message was deleted from the queue.",
}

_COMMON = ("format", "table")


@attrs.frozen
class RewrapSettings:
    """
    What the relay does to every message it sends, for the message page.

    @ivar dkim: From domain → ((algorithm, selector), ...).
    @ivar bounceDomain: the VERP return path's domain.
    @ivar verpPrefix: its local part before C{+TOKEN}.
    @ivar opens: open tracking by default.
    @ivar clicks: click tracking by default.
    @ivar unsubscribe: List-Unsubscribe by default.
    @ivar trackingBase: C{[tracking] base_url}.
    """

    dkim: dict = attrs.field(factory=dict)
    bounceDomain: str = "localhost"
    verpPrefix: str = "bounce"
    opens: bool = False
    clicks: bool = False
    unsubscribe: bool = True
    trackingBase: str = ""

    @classmethod
    def fromConfig(cls, config) -> "RewrapSettings":
        return cls(
            dkim={
                domain: tuple((alg, sel) for alg, sel, _ in section.signingKeys())
                for domain, section in config.dkim.items()
            },
            bounceDomain=config.feedback.bounce_domain or config.relay.hostname,
            verpPrefix=config.feedback.verp_prefix,
            opens=config.tracking.opens,
            clicks=config.tracking.clicks,
            unsubscribe=config.tracking.unsubscribe,
            trackingBase=config.tracking.base_url,
        )


# -- small pieces -------------------------------------------------------------


def readQuery(context, names: tuple) -> Query:
    return Query(context.request, names + _COMMON)


def ownQuery(query: Query, names: tuple) -> dict:
    """
    The page's own query (for CSV links and cursors), without the CSV keys.
    """
    return {n: query.values[n] for n in names if query.values.get(n)}


def withNotice(page: Page, context) -> Page:
    done = context.request.args.get(b"done")
    if done:
        page.notice = NOTICES.get(done[0].decode("ascii", "replace"))
    return page


def hiddenToken(context) -> Tag:
    return tags.input(type="hidden", name="csrf", value=context.session.csrf)


def postButton(context, action: str, label: str, fields: dict, danger: bool = False,
                describedBy: Optional[str] = None) -> Tag:
    form = tags.form(hiddenToken(context), action=action, method="post", **{"class": "inline"})
    for name, value in fields.items():
        form(tags.input(type="hidden", name=name, value=value))
    button = tags.button(label, type="submit")
    if danger:
        button(**{"class": "danger"})
    if describedBy:
        button(**{"aria-label": describedBy})
    return form(button)


def messageLink(queue_id: Optional[str]) -> Optional[Link]:
    if not queue_id:
        return None
    return Link(queue_id, "/messages/" + quote(queue_id, safe=""))


def decodedSubject(headers: Optional[str]) -> Optional[str]:
    """
    The Subject of a header block, encoded-words decoded (the text as the
    recipient would read it; shown escaped like everything else).
    """
    if not headers:
        return None
    unfolded = re.sub(r"\r?\n[ \t]+", " ", headers)
    match = re.search(r"(?mi)^subject[ \t]*:[ \t]*(.*?)\r?$", unfolded)
    if match is None:
        return None
    raw = match.group(1)
    try:
        return str(email.header.make_header(email.header.decode_header(raw)))
    except (ValueError, LookupError, UnicodeError):
        return raw


def _describe(event: dict) -> str:
    """
    One line for an event: what its detail says, by type.
    """
    detail = event.get("detail") or {}
    kind = event["type"]
    pick = {
        "accepted": ("sender", "size"),
        "deferred": ("code", "status", "reply", "remote", "next_attempt"),
        "delivered": ("code", "reply", "remote", "tls"),
        "bounced": ("kind", "reason", "status", "diagnostic", "remote", "source"),
        "expired": ("reason", "diagnostic"),
        "opened": ("ip", "user_agent", "machine"),
        "clicked": ("url", "ip", "user_agent", "machine"),
        "complained": ("feedback_type", "source_ip", "user_agent"),
        "unsubscribed": ("method",),
        "suppressed": ("reason",),
        "rejected": ("code", "status", "reason"),
        "auto_replied": ("reason",),
    }.get(kind)
    if pick is None:
        pick = tuple(detail)[:6]
    parts = []
    for key in pick:
        value = detail.get(key)
        if value is None or value == "":
            continue
        if isinstance(value, (dict, list)):
            continue
        parts.append(f"{key}: {value}")
    return "; ".join(parts)


def errorPage(status: int, message: str) -> Page:
    page = Page(title="Something went wrong" if status >= 500 else _statusTitle(status))
    page.status = status
    page.add(tags.p(message, role="alert", **{"class": "error"}))
    page.add(tags.p(tags.a("Back to the dashboard", href="/")))
    return page


def _statusTitle(status: int) -> str:
    return {
        400: "Bad request",
        401: "Not logged in",
        403: "Refused",
        404: "Not found",
        405: "Not allowed",
        409: "Busy",
        413: "Too large",
        429: "Too many attempts",
    }.get(status, f"Error {status}")


# -- login -----------------------------------------------------------------


def loginPage(token: str, nextPath: str, problem: Optional[str], configured: bool,
              status: int = 200) -> Page:
    page = Page(title="Log in", status=status)
    if not configured:
        page.add(
            tags.p(
                "No users are configured: set [web] users_file in the configuration and "
                "add users with “smartrelay passwd FILE USER”.",
                role="alert",
                **{"class": "error"},
            )
        )
    if problem:
        page.add(tags.p(problem, role="alert", **{"class": "error"}))
    page.add(
        tags.form(
            tags.input(type="hidden", name="csrf", value=token),
            tags.input(type="hidden", name="next", value=nextPath),
            tags.label("User name", **{"for": "user"}),
            tags.input(id="user", name="user", type="text", autocomplete="username",
                       required="required", maxlength="200"),
            tags.label("Password", **{"for": "password"}),
            tags.input(id="password", name="password", type="password",
                       autocomplete="current-password", required="required",
                       maxlength="1024"),
            tags.button("Log in", type="submit"),
            action="/login",
            method="post",
            **{"class": "login"},
        )
    )
    return page


# -- dashboard --------------------------------------------------------------


def bucketStarts(since: float, until: float, size: int) -> list:
    first = bucketStart(since, size)
    return list(range(int(first), int(until), size)) or [int(first)]


def _card(label: str, value: str, over: bool = False) -> Tag:
    span = tags.span(value, **{"class": "value over" if over else "value"})
    return tags.li(span, label)


def _smsSection(counts, rates, buckets, starts, interval, scope) -> tuple:
    """
    The dashboard's SMS totals and chart, counted from the same statistics
    as mail (one C{sms_submitted} per part the SMSC took, the receipts'
    C{sms_delivered} and C{sms_failed}).
    """
    return (
        tags.h2(f"SMS for {scope}"),
        tags.ul(
            _card("SMS parts submitted", f"{counts.get('sms_submitted', 0):,}"),
            _card("SMS parts delivered", f"{counts.get('sms_delivered', 0):,}"),
            _card("SMS parts failed", f"{counts.get('sms_failed', 0):,}"),
            _card("SMS delivery rate", percent(rates.get("sms_delivery"))),
            **{"class": "cards"},
        ),
        lineChart(f"SMS parts per {interval}, {scope}", starts,
                  seriesValues(buckets, SMS_SERIES), interval),
        tags.ul(
            *[tags.li(tags.span(**{"class": f"swatch swatch-{i}", "aria-hidden": "true"}), name)
              for i, (name, _, _) in zip(SMS_SWATCHES, SMS_SERIES)],
            **{"class": "legend", "aria-label": "SMS legend"},
        ),
    )


async def dashboard(ui, context) -> Page:
    names = ("range", "tag", "domain")
    query = readQuery(context, names)
    chosen = query.choice("range", RANGES, "day")
    tag = query.text("tag")
    domain = query.domain()
    interval, back, label = RANGES[chosen]
    now = ui.clock.seconds()
    size = INTERVALS[interval]
    since = now - back
    stats = await ui.queries.stats(since, now, interval, tag=tag, domain=domain,
                                   bounceReasons=False)
    starts = bucketStarts(since, now, size)
    buckets = fillBuckets(stats["buckets"], starts)
    totals, rates = stats["totals"], stats["rates"]
    counts = totals["counts"]
    scope = label + (f", tag {tag}" if tag else "") + (f", domain {domain}" if domain else "")
    page = Page(title="Dashboard")
    page.add(filterForm(
        "/",
        [
            ("range", "Range", tags.select(
                *[tags.option(RANGES[r][2], value=r, **({"selected": "selected"} if r == chosen else {}))
                  for r in RANGES],
                id="range", name="range")),
            ("tag", "Tag", tags.input(id="tag", name="tag", value=tag or "")),
            ("domain", "Recipient domain", tags.input(id="domain", name="domain",
                                                       value=domain or "")),
        ],
    ))
    complaint = rates["complaint"]
    over = bool(stats["complaint_rate_over_limit"])
    summary = ui.queries.queueSize()
    oldest = summary["oldest"]
    page.add(
        tags.h2(f"Totals for {scope}"),
        tags.ul(
            _card("accepted", f"{counts.get('accepted', 0):,}"),
            _card("delivered", f"{counts.get('delivered', 0):,}"),
            _card("deferred", f"{counts.get('deferred', 0):,}"),
            _card("bounced hard / soft", f"{totals['hard_bounces']:,} / {totals['soft_bounces']:,}"),
            _card("complained", f"{counts.get('complained', 0):,}"),
            _card("opened / clicked", f"{counts.get('opened', 0):,} / {counts.get('clicked', 0):,}"),
            _card("delivery rate", percent(rates["delivery"])),
            _card("bounce rate", percent(rates["bounce"])),
            _card("complaint rate (limit 0.3 %)", percent(complaint, 3), over=over),
            _card("unique open rate", percent(rates["unique_open"])),
            _card("unique click rate", percent(rates["unique_click"])),
            _card("queued messages", f"{summary['messages']:,}"),
            _card("oldest queued", shortTime(oldest) or "—"),
            **{"class": "cards"},
        ),
    )
    if over:
        page.add(tags.p(
            f"The complaint rate {percent(complaint, 3)} is over the 0.3 % Gmail and Yahoo "
            "allow senders.", role="alert", **{"class": "error"}))
    page.add(
        tags.h2("Events over time"),
        lineChart(f"Events per {interval}, {scope}", starts, seriesValues(buckets), interval),
        tags.ul(
            *[tags.li(tags.span(**{"class": f"swatch swatch-{i}", "aria-hidden": "true"}), name)
              for i, (name, _, _) in enumerate(SERIES)],
            **{"class": "legend", "aria-label": "Legend"},
        ),
        tags.h2("Complaint rate against the 0.3 % limit"),
        rateChart(
            f"Complaint rate per {interval} against the 0.3 % limit, {scope}",
            starts,
            [b["rates"].get("complaint") for b in buckets],
            COMPLAINT_RATE_LIMIT,
            interval,
        ),
    )
    if any(counts.get(type) for type in ("sms_submitted", "sms_delivered", "sms_failed")):
        page.add(*_smsSection(counts, rates, buckets, starts, interval, scope))
    table = Table(
        "buckets",
        f"Counts per {interval}",
        ["start"] + [name for name, _, _ in SERIES] + ["delivery rate", "complaint rate"],
    )
    for bucket, values in zip(buckets, zip(*[v for _, _, v in seriesValues(buckets)])):
        rates_ = bucket.get("rates") or {}
        table.rows.append(
            (shortTime(rfc3339(bucket["start"])),) + tuple(values)
            + (percent(rates_.get("delivery")), percent(rates_.get("complaint"), 3))
        )
    page.add(page.table(table, ownQuery(query, names)))
    return page


def filterForm(action: str, fields: list, submit: str = "Show") -> Tag:
    form = tags.form(action=action, method="get", **{"class": "filters"})
    for name, label, control in fields:
        form(tags.label(label, control, **{"for": name}))
    return form(tags.button(submit, type="submit"))


# -- search -----------------------------------------------------------------


async def search(ui, context):
    query = readQuery(context, ("q",))
    q = (query.text("q") or "").strip()
    page = Page(title="Search")
    if not q:
        page.add(tags.p("Type a queue id, a recipient address, a tag or a Message-ID "
                        "in the search box."))
        return page

    if QUEUE_ID_RE.fullmatch(q.upper()):
        return Redirect("/messages/" + quote(q.upper(), safe=""))
    bare = q.strip("<>").strip()
    local, at, _ = bare.rpartition("@")
    if at:
        generated = queueIDFromFileName(local.upper())
        if generated is not None:
            # The Message-ID the relay gives a message that has none.
            return Redirect("/messages/" + quote(generated, safe=""))
    if q.startswith("<") and q.endswith(">"):
        return await _messageIDSearch(ui, page, q)
    if at:
        try:
            address = checkAddress(bare, "q")
        except ApiError:
            pass
        else:
            return Redirect("/events?" + urlencode({"recipient": address}))
    if re.fullmatch(r"[\x21-\x7e]{1,200}", q):
        return Redirect("/events?" + urlencode({"tag": q, "type": "accepted"}))
    page.add(tags.p(f"Nothing can be found for “{q}”: it is not a queue id, an address, "
                    "a tag or a Message-ID.", role="status"))
    return page


async def _messageIDSearch(ui, page: Page, messageID: str) -> Page:
    """
    The messages whose stored headers carry C{messageID}: the accepted
    events of the last L{MESSAGE_ID_WINDOW} seconds, at most L{MAX_SCAN}.
    """
    wanted = messageID.strip().lower()
    now = ui.clock.seconds()
    cursor = None
    scanned = 0
    found = []
    pattern = re.compile(r"(?mi)^message-id[ \t]*:[ \t]*(.*?)\r?$")
    while True:
        result = await ui.queries.events(
            {"type": "accepted", "since": now - MESSAGE_ID_WINDOW, "until": None,
             "queue_id": None, "recipient": None, "tag": None},
            None, MAX_LIMIT, cursor,
        )
        for event in result["items"]:
            headers = (event.get("detail") or {}).get("headers")
            if not isinstance(headers, str):
                continue
            match = pattern.search(re.sub(r"\r?\n[ \t]+", " ", headers))
            if match and match.group(1).strip().lower() == wanted:
                found.append(event)
        scanned += len(result["items"])
        cursor = result["next_cursor"]
        if cursor is None or scanned >= MAX_SCAN:
            break
    if len(found) == 1:

        return Redirect("/messages/" + quote(found[0]["queue_id"], safe=""))
    complete = cursor is None
    page.add(tags.p(
        f"Messages with Message-ID {messageID} among the {scanned:,} accepted in the last 7 days"
        + ("" if complete else " (the search stopped there)") + ".", role="status"))
    table = Table("messages", "Messages with this Message-ID", ["queue id", "accepted", "tag"])
    for event in found:
        table.rows.append((messageLink(event["queue_id"]), shortTime(event["time"]), event["tag"]))
    page.add(page.table(table, {"q": messageID}, "No message has this Message-ID."))
    return page


# -- message ------------------------------------------------------------------


def _pairs(items: list) -> Tag:
    dl = tags.dl(**{"class": "pairs"})
    for key, value in items:
        dl(tags.dt(key), tags.dd("—" if value is None or value == "" else value))
    return dl


async def message(ui, context, queue_id: str) -> Page:
    query = readQuery(context, ("done",))
    del query
    checkQueueID(queue_id)
    document = await ui.queries.message(queue_id)
    envelope = document["envelope"]
    headers = document["headers"]
    page = withNotice(Page(title=f"Message {queue_id}"), context)
    client = envelope.get("client") or {}
    page.add(
        tags.h2("Envelope"),
        _pairs([
            ("Subject", decodedSubject(headers)),
            ("Sender", envelope.get("sender")),
            ("Recipients", ", ".join(envelope.get("recipients") or [])),
            ("Accepted", shortTime(envelope.get("received"))),
            ("Size", None if envelope.get("size") is None else f"{envelope['size']:,} bytes"),
            ("Client", " ".join(str(client.get(k)) for k in ("ip", "helo") if client.get(k))
             or None),
            ("SMTP user", client.get("user")),
            ("Tag", envelope.get("tag")),
            ("Metadata", "; ".join(f"{k}: {v}" for k, v in (envelope.get("metadata") or {}).items())
             or None),
            ("In the queue", "yes" if document["queued"] else "no"),
        ]),
    )
    if document["queued"]:
        page.add(tags.p(
            postButton(context, "/queue/retry", "Retry now", {"queue_id": queue_id,
                                                                "back": "message"}),
            " ",
            tags.a("Delete from the queue…",
                   href="/queue/confirm?" + urlencode({"queue_id": queue_id})),
        ))
    table = Table("recipients", "Recipients",
                  ["address", "state", "attempts", "next attempt", "last reply"])
    for r in document["recipients"]:
        reply = r.get("last_reply") or {}
        table.rows.append((
            r["address"], r["state"] + (" (being attempted)" if r.get("attempting") else ""),
            r["attempts"], shortTime(r.get("next_attempt")),
            " ".join(str(reply[k]) for k in ("code", "status", "reply") if reply.get(k)) or None,
        ))
    page.add(tags.h2("Recipients"), page.table(table, {}))
    timeline = tags.ol(**{"class": "timeline", "aria-label": "Timeline"})
    events = Table("events", "Events", ["time", "type", "recipient", "detail"])
    for event in document["events"]:
        line = _describe(event)
        timeline(tags.li(
            tags.time(shortTime(event["time"]), datetime=event["time"]), " ",
            tags.span(event["type"], **{"class": "type"}), " ",
            event.get("recipient") or "", tags.br(), line,
            **{"class": f"t-{event['type']}"},
        ))
        events.rows.append((shortTime(event["time"]), event["type"], event.get("recipient"), line))
    page.add(tags.h2("Timeline"), timeline)
    page.tables[events.name] = events
    page.add(tags.p(tags.a("Download the events as CSV",
                           href="?" + urlencode({"format": "csv", "table": "events"}))))
    page.add(tags.h2("Headers as received"),
             tags.pre(headers) if headers else tags.p("The headers are not known.",
                                                        **{"class": "empty"}))
    page.add(tags.h2("What the relay applies"), _rewrap(ui.rewrap, headers, document))
    return page


def _rewrap(settings: RewrapSettings, headers: Optional[str], document: dict) -> Tag:
    domain = fromDomain((headers or "").encode("utf-8") + b"\r\n") if headers else None
    keys = settings.dkim.get(domain or "")
    if keys:
        dkim = f"signed for d={domain} with " + ", ".join(f"{a} (selector {s})" for a, s in keys)
    elif domain:
        dkim = f"not signed: no [dkim:{domain}] section for the From domain"
    else:
        dkim = "not known (no From header)"
    types = {e["type"] for e in document["events"]}
    tracking = []
    tracking.append("opens " + ("on" if settings.opens else "off") + " by default")
    tracking.append("clicks " + ("on" if settings.clicks else "off") + " by default")
    seen = [t for t in ("opened", "clicked") if t in types]
    return _pairs([
        ("DKIM", dkim),
        ("Return path (VERP)",
         f"{settings.verpPrefix}+TOKEN@{settings.bounceDomain}, one signed token per recipient"),
        ("Tracking", ", ".join(tracking)
         + (f"; this message was {' and '.join(seen)}" if seen else "")),
        ("List-Unsubscribe", "added by default" if settings.unsubscribe else "off by default"),
    ])


# -- events -------------------------------------------------------------------


#: Most events one CSV download of the events list holds.
MAX_EVENT_EXPORT = 100_000



async def events(ui, context) -> Page:
    names = EVENT_FILTERS + ("cursor", "limit")
    query = readQuery(context, names)
    filters, domain = eventFilters(query)
    limit = query.limit()
    cursor = query.cursor()
    result = await ui.queries.events(filters, domain, limit, cursor)
    page = Page(title="Events")
    page.add(filterForm("/events", [
        ("type", "Type", tags.select(
            tags.option("any", value=""),
            *[tags.option(t, value=t, **({"selected": "selected"} if t == filters["type"] else {}))
              for t in sorted(EVENT_TYPES)],
            id="type", name="type")),
        ("recipient", "Recipient", tags.input(id="recipient", name="recipient",
                                              value=filters["recipient"] or "")),
        ("tag", "Tag", tags.input(id="tag", name="tag", value=filters["tag"] or "")),
        ("domain", "Recipient domain", tags.input(id="domain", name="domain",
                                                   value=domain or "")),
        ("since", "Since (RFC 3339 or date)", tags.input(id="since", name="since",
                                                         value=query.values.get("since", ""))),
        ("until", "Until", tags.input(id="until", name="until",
                                      value=query.values.get("until", ""))),
    ]))
    if filters["recipient"]:
        page.add(tags.p(tags.a("Search for this as a Message-ID instead",
                               href="/search?" + urlencode({"q": f"<{filters['recipient']}>"}))))
    table = Table("events", "Events, oldest first",
                  ["time", "type", "queue id", "recipient", "tag", "detail"])
    for event in result["items"]:
        table.rows.append((shortTime(event["time"]), event["type"], messageLink(event["queue_id"]),
                           event.get("recipient"), event.get("tag"), _describe(event)))
    own = ownQuery(query, names)
    page.add(page.table(table, own, "No events match."))
    page.add(pager(own, result["next_cursor"]))
    every = {k: v for k, v in own.items() if k in EVENT_FILTERS}
    page.add(tags.p(tags.a(
        f"Download every matching event as CSV (up to {MAX_EVENT_EXPORT:,})",
        href="/events/export.csv?" + urlencode(every),
    )))
    return page


async def exportEvents(ui, context) -> Download:
    """
    Every event matching the filters, oldest first, as CSV with the
    event object's keys (metadata and detail as JSON), at most
    L{MAX_EVENT_EXPORT}; the store's cursor walks them a page at a time.
    """
    query = readQuery(context, EVENT_FILTERS)
    filters, domain = eventFilters(query)
    table = Table("events", "Events",
                  ["id", "time", "type", "queue_id", "recipient", "tag", "metadata", "detail"])
    cursor = None
    while len(table.rows) < MAX_EVENT_EXPORT:
        want = min(MAX_LIMIT, MAX_EVENT_EXPORT - len(table.rows))
        result = await ui.queries.events(filters, domain, want, cursor)
        for event in result["items"]:
            table.rows.append((
                event["id"], event["time"], event["type"], event["queue_id"],
                event["recipient"], event["tag"],
                json.dumps(event["metadata"], ensure_ascii=False, sort_keys=True),
                json.dumps(event["detail"], ensure_ascii=False, sort_keys=True),
            ))
        cursor = result["next_cursor"]
        if cursor is None:
            break
    return Download(csvBytes(table), b"text/csv; charset=utf-8", "events.csv")


def pager(own: dict, nextCursor: Optional[str]) -> Tag:
    nav = tags.nav(**{"aria-label": "Pages"})
    if own.get("cursor"):
        first = {k: v for k, v in own.items() if k != "cursor"}
        nav(tags.a("First page", href="?" + urlencode(first)), " ")
    if nextCursor:
        following = dict(own, cursor=nextCursor)
        nav(tags.a("Next page", href="?" + urlencode(following), rel="next"))
    return nav


# -- bounces ----------------------------------------------------------------


async def bounces(ui, context) -> Page:
    names = ("range", "tag", "reason", "kind", "domain")
    query = readQuery(context, names)
    chosen = query.choice("range", ("day", "month"), "day")
    tag = query.text("tag")
    reason = query.text("reason")
    kind = query.choice("kind", ("hard", "soft"))
    domain = query.domain()
    interval, back, label = RANGES[chosen]
    now = ui.clock.seconds()
    size = INTERVALS[interval]
    since = now - back
    byReason: dict = {}
    byKind: dict = {}
    byDomain: dict = {}
    matching = []
    complete = True
    async for event, done in ui.queries.bounces(since, now, tag):
        if event is None:
            complete = bool(done)
            break
        detail = event.detail or {}
        r = detail.get("reason") or "undefined"
        k = detail.get("kind") or "soft"
        d = recipientDomain(event.recipient) or ""
        byReason[r] = byReason.get(r, 0) + 1
        byKind[k] = byKind.get(k, 0) + 1
        byDomain[d] = byDomain.get(d, 0) + 1
        if (reason is None or r == reason) and (kind is None or k == kind) and (
            domain is None or d == domain
        ) and (reason or kind or domain) and len(matching) < 1000:
            matching.append(event)
    page = Page(title="Bounces")
    page.add(filterForm("/bounces", [
        ("range", "Range", tags.select(
            *[tags.option(RANGES[r][2], value=r, **({"selected": "selected"} if r == chosen else {}))
              for r in ("day", "month")], id="range", name="range")),
        ("tag", "Tag", tags.input(id="tag", name="tag", value=tag or "")),
    ]))
    total = sum(byKind.values())
    page.add(tags.p(f"{total:,} bounces in {label}" + (f" with tag {tag}" if tag else "")
                    + ("" if complete else " (only the first 100,000 were read)") + ".",
                    role="status"))
    base = {"range": chosen, **({"tag": tag} if tag else {})}
    own = ownQuery(query, names)

    def linked(name: str, counts: dict, key: str, caption: str) -> Tag:
        table = Table(name, caption, [key, "bounces", "share"])
        for value, count in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
            table.rows.append((Link(value or "(none)", "/bounces?" + urlencode(dict(base, **{key: value}))),
                               count, percent(count / total if total else None)))
        return page.table(table, own, "No bounces.")

    page.add(linked("reasons", byReason, "reason", "By reason"))
    page.add(linked("kinds", byKind, "kind", "By kind"))
    page.add(linked("domains", byDomain, "domain", "By recipient domain"))
    # Over time from the counters: exact whatever the events' retention.
    stats = await ui.queries.stats(since, now, interval, tag=tag, bounceReasons=False)
    starts = bucketStarts(since, now, size)
    counted = fillBuckets(stats["buckets"], starts)
    time = Table("time", f"Over time (per {interval})", ["start", "hard", "soft"])
    for start, bucket in zip(starts, counted):
        time.rows.append((shortTime(rfc3339(start)), bucket["hard_bounces"],
                          bucket["soft_bounces"]))
    page.add(
        tags.h2("Hard and soft bounces over time"),
        lineChart(
            f"Bounces per {interval}, {label}" + (f", tag {tag}" if tag else ""),
            starts,
            [("hard bounces", "#D55E00", [b["hard_bounces"] for b in counted]),
             ("soft bounces", "#CC79A7", [b["soft_bounces"] for b in counted])],
            interval,
        ),
        tags.ul(
            tags.li(tags.span(**{"class": "swatch swatch-3", "aria-hidden": "true"}), "hard"),
            tags.li(tags.span(**{"class": "swatch swatch-4", "aria-hidden": "true"}), "soft"),
            **{"class": "legend", "aria-label": "Legend"},
        ),
        page.table(time, own),
    )
    if reason or kind or domain:
        what = ", ".join(f"{n} {v}" for n, v in (("reason", reason), ("kind", kind),
                                                  ("domain", domain)) if v)
        table = Table("messages", f"Bounces with {what}",
                      ["time", "queue id", "recipient", "kind", "reason", "diagnostic"])
        for event in matching:
            detail = event.detail or {}
            table.rows.append((shortTime(rfc3339(event.time)), messageLink(event.queue_id),
                               event.recipient, detail.get("kind"), detail.get("reason"),
                               detail.get("diagnostic")))
        page.add(page.table(table, own, "No bounces match."))
    return page
