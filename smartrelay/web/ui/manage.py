"""
The pages of the reports UI that change things: the suppression list
(search, add, remove, CSV import and export), the queue (per domain,
destinations, retry, delete after a confirmation page), and the sending
domains' DNS checklist.  Every form posts the session's token
(L{smartrelay.web.ui.pages.hiddenToken}); the application checks it and
the request's origin before any of these handlers runs.
"""

import re
from datetime import datetime, timezone
from typing import Optional
from urllib.parse import quote, urlencode

from twisted.web.template import Tag, tags

from smartrelay.dnscheck import FAIL, OK, WARN
from smartrelay.store.interfaces import SUPPRESSION_REASONS
from smartrelay.web.apirequest import (
    ApiError,
    badParameter,
    checkAddress,
    checkQueueID,
    csvItems,
    importEntries,
    suppressionEntry,
)
from smartrelay.web.queries import suppressionCSV
from smartrelay.web.ui.html import Download, Link, Page, Redirect, Table, shortTime
from smartrelay.web.ui.pages import (
    filterForm,
    hiddenToken,
    messageLink,
    ownQuery,
    pager,
    postButton,
    readQuery,
    withNotice,
)

__all__ = [
    "addSuppression",
    "confirmDelete",
    "delete",
    "domains",
    "exportSuppressions",
    "importSuppressions",
    "queue",
    "removeSuppression",
    "retry",
    "retryDomain",
    "suppressions",
]

#: Most entries one CSV upload may hold (as the API's import).
MAX_IMPORT = 100_000


# -- suppressions -------------------------------------------------------------


async def suppressions(ui, context) -> Page:
    names = ("q", "reason", "cursor", "limit", "done")
    query = readQuery(context, names)
    prefix = query.text("q")
    reason = query.choice("reason", SUPPRESSION_REASONS)
    result = await ui.queries.suppressions(prefix, reason, query.cursor(), query.limit())
    page = withNotice(Page(title="Suppression list"), context)
    page.add(filterForm("/suppressions", [
        ("sq", "Address starts with", tags.input(id="sq", name="q", value=prefix or "")),
        ("sreason", "Reason", _reasonSelect("sreason", reason, anyOption=True)),
    ], submit="Search"))
    page.add(
        tags.h2("Add an address"),
        tags.form(
            hiddenToken(context),
            tags.label("Address", tags.input(id="address", name="address", type="email",
                                             required="required"), **{"for": "address"}),
            tags.label("Reason", _reasonSelect("reason", "manual"), **{"for": "reason"}),
            tags.label("Expires (optional)", tags.input(id="expires", name="expires",
                                                        placeholder="2027-01-31"),
                       **{"for": "expires"}),
            tags.button("Add", type="submit"),
            action="/suppressions/add", method="post", **{"class": "filters"},
        ),
        tags.h2("Import and export"),
        tags.form(
            hiddenToken(context),
            tags.label("CSV file (address, reason, expires)",
                       tags.input(id="file", name="file", type="file", accept=".csv,text/csv",
                                  required="required"), **{"for": "file"}),
            tags.label("Reason when the file gives none", _reasonSelect("ireason", "manual"),
                       **{"for": "ireason"}),
            tags.button("Import", type="submit"),
            action="/suppressions/import", method="post", enctype="multipart/form-data",
            **{"class": "filters"},
        ),
        tags.p(tags.a("Export the whole list as CSV", href="/suppressions/export.csv?"
                      + urlencode({k: v for k, v in (("q", prefix), ("reason", reason)) if v}))),
    )
    table = Table("suppressions", "Suppressed addresses",
                  ["address", "reason", "added", "expires", "source event", "remove"])
    for entry in result["items"]:
        table.rows.append((
            entry["address"], entry["reason"], shortTime(entry["time"]),
            shortTime(entry["expires"]) or "never", entry["source_event"],
            postButton(context, "/suppressions/remove", "Remove", {"address": entry["address"]},
                        describedBy=f"Remove {entry['address']}"),
        ))
    own = ownQuery(query, ("q", "reason", "cursor", "limit"))
    page.add(page.table(table, own, "The list has no such address."))
    page.add(pager(own, result["next_cursor"]))
    return page


def _reasonSelect(name: str, chosen: Optional[str], anyOption: bool = False) -> Tag:
    select = tags.select(id=name, name="reason")
    if anyOption:
        select(tags.option("any", value=""))
    for reason in sorted(SUPPRESSION_REASONS):
        option = tags.option(reason, value=reason)
        if reason == chosen:
            option(selected="selected")
        select(option)
    return select


async def addSuppression(ui, context):
    item = {"address": (context.field("address", 1000) or "").strip(),
            "reason": context.field("reason", 50) or "manual"}
    expires = (context.field("expires", 100) or "").strip()
    if expires:
        item["expires"] = expires
    if not item["address"]:
        raise badParameter("address", "required: an e-mail address")
    entry = suppressionEntry(item, ui.clock.seconds(), "manual")
    await ui.queries.addSuppression(entry)
    return Redirect("/suppressions?" + urlencode({"q": entry.address, "done": "added"}))


async def removeSuppression(ui, context):
    address = checkAddress((context.field("address", 1000) or "").strip())
    await ui.queries.removeSuppression(address)
    return Redirect("/suppressions?done=removed")


async def importSuppressions(ui, context):
    data = context.upload("file")
    if not data:
        raise badParameter("file", "required: a CSV file of addresses")
    reason = context.field("reason", 50) or "manual"
    if reason not in SUPPRESSION_REASONS:
        raise badParameter("reason", f"must be one of {', '.join(sorted(SUPPRESSION_REASONS))}")
    entries = importEntries(csvItems(data), ui.clock.seconds(), reason, MAX_IMPORT)
    await ui.queries.addSuppressions(entries)
    return Redirect("/suppressions?done=imported")


async def exportSuppressions(ui, context):
    query = readQuery(context, ("q", "reason"))
    entries = await ui.queries.allSuppressions(
        query.text("q"), query.choice("reason", SUPPRESSION_REASONS)
    )
    return Download(suppressionCSV(entries), b"text/csv; charset=utf-8", "suppressions.csv")


# -- queue --------------------------------------------------------------------


async def queue(ui, context) -> Page:
    names = ("domain", "state", "cursor", "limit", "done")
    query = readQuery(context, names)
    domain = query.domain()
    state = query.choice("state", ("queued", "deferred"))
    summary = await ui.queries.queueSummary(domain)
    listing = await ui.queries.queueMessages(domain, state, query.limit(), query.cursor())
    destinations = await ui.queries.clusterDestinations()
    page = withNotice(Page(title="Queue"), context)
    if "nodes" in summary:
        # With other nodes sharing the store the views are the cluster's:
        # say over which nodes, and which did not answer.
        where = f"on the {len(summary['nodes'])} nodes that answered ({', '.join(summary['nodes'])})"
    else:
        where = "on this node"
    page.add(tags.p(f"{summary['messages']:,} messages, {summary['recipients']:,} recipients "
                    f"waiting {where}.", role="status"))
    missing = sorted(set(summary.get("missing_nodes", ()))
                     | set(listing.get("missing_nodes", ()))
                     | set(destinations.get("missing_nodes", ())))
    if missing:
        page.add(tags.p(
            f"Not counted: node{'s' if len(missing) > 1 else ''} {', '.join(missing)} did not "
            "answer in time; their messages and destinations are missing from this page.",
            role="alert", **{"class": "error"}))
    page.add(filterForm("/queue", [
        ("qdomain", "Recipient domain", tags.input(id="qdomain", name="domain",
                                                    value=domain or "")),
        ("qstate", "State", tags.select(
            tags.option("any", value=""),
            *[tags.option(s, value=s, **({"selected": "selected"} if s == state else {}))
              for s in ("queued", "deferred")], id="qstate", name="state")),
    ]))
    own = ownQuery(query, ("domain", "state", "cursor", "limit"))
    domains = Table("domains", "By destination domain",
                    ["domain", "messages", "recipients", "queued", "deferred", "attempting",
                     "oldest", "next attempt", "deferred because", "retry"])
    for d in summary["domains"]:
        domains.rows.append((
            Link(d["domain"] or "(none)", "/queue?" + urlencode({"domain": d["domain"]})),
            d["messages"], d["recipients"], d["queued"], d["deferred"], d["attempting"],
            shortTime(d["oldest"]), shortTime(d["next_attempt"]),
            "; ".join(f"{r['count']}× {r['reason']}" for r in d["reasons"][:3]) or None,
            postButton(context, "/queue/retry-domain", "Retry now", {"domain": d["domain"]},
                        describedBy=f"Retry now for {d['domain']}"),
        ))
    page.add(page.table(domains, own, "The queue is empty."))
    clustered = any("node" in d for d in destinations["items"])
    throttle = Table("destinations", "Destinations: limits and adaptive throttle",
                     ["destination"] + (["node"] if clustered else [])
                     + ["queued", "connections", "max connections", "rate",
                        "throttled", "factor", "until", "why"])
    for d in destinations["items"]:
        throttle.rows.append((
            d["destination"], *([d["node"]] if clustered else []), d["queued"], d["connections"],
            f"{d['max_connections']} of {d['configured_max_connections']}",
            "" if d["rate"] is None else str(d["rate"]),
            "yes" if d["throttled"] else "no", d["throttle_factor"], shortTime(d["throttle_until"]),
            d.get("throttle_reason"),
        ))
    page.add(page.table(throttle, own, "No destination has been tried yet."))
    messages = Table("messages", "Messages, oldest first",
                     ["queue id", "received", "sender", "tag", "waiting", "actions"])
    for item in listing["items"]:
        waiting = [r for r in item["recipients"] if r["state"] in ("queued", "deferred")]
        actions = tags.span(
            postButton(context, "/queue/retry", "Retry", {"queue_id": item["queue_id"]},
                        describedBy=f"Retry {item['queue_id']} now"),
            " ",
            tags.a("Delete", href="/queue/confirm?" + urlencode({"queue_id": item["queue_id"]}),
                   **{"aria-label": f"Delete {item['queue_id']}"}),
        )
        messages.rows.append((
            messageLink(item["queue_id"]), shortTime(item["received"]), item["sender"],
            item["tag"], ", ".join(r["address"] for r in waiting[:3])
            + (f" and {len(waiting) - 3} more" if len(waiting) > 3 else ""), actions,
        ))
    page.add(page.table(messages, own, "No message waits."))
    page.add(pager(own, listing["next_cursor"]))
    return page


def _queueID(context) -> str:
    return checkQueueID((context.field("queue_id", 100) or "").strip())


async def confirmDelete(ui, context) -> Page:
    query = readQuery(context, ("queue_id",))
    queue_id = checkQueueID(query.text("queue_id") or "")
    entry = ui.queries.scheduler.queuedMessage(queue_id)
    if entry is None:
        raise ApiError(404, "not_found", f"{queue_id} is not in the queue")
    waiting = [r.address for r in entry.pending()]
    page = Page(title=f"Delete {queue_id}?")
    page.add(
        tags.p(f"{len(waiting)} recipients still wait: {', '.join(waiting[:10])}"
               + (" …" if len(waiting) > 10 else "") + ". Deleting ends them as expired "
               "(reason deleted); nothing is sent to them. This cannot be undone."),
        tags.p(
            postButton(context, "/queue/delete", "Delete the message", {"queue_id": queue_id},
                        danger=True),
            " ",
            tags.a("Cancel", href="/messages/" + quote(queue_id, safe="")),
        ),
    )
    return page


async def retry(ui, context):
    queue_id = _queueID(context)
    await ui.queries.retry(queue_id)
    if context.field("back", 20) == "message":
        return Redirect("/messages/" + quote(queue_id, safe="") + "?done=retried")
    return Redirect("/queue?done=retried")


async def retryDomain(ui, context):
    domain = (context.field("domain", 300) or "").strip().rstrip(".").lower()
    if not domain or not re.fullmatch(r"[^\x00-\x20\x7f@/]{1,255}", domain):
        raise badParameter("domain", "required: a recipient domain")
    await ui.queries.retryDomain(domain)
    return Redirect("/queue?done=retried")


async def delete(ui, context):
    queue_id = _queueID(context)
    await ui.queries.delete(queue_id)
    return Redirect("/queue?done=deleted")


# -- domains ------------------------------------------------------------------

_STATUS_LABEL = {OK: "ok", WARN: "warning", FAIL: "failed"}


async def domains(ui, context) -> Page:
    query = readQuery(context, ("refresh",))
    fresh = query.choice("refresh", ("on",)) == "on"
    page = Page(title="Sending domains")
    if ui.domains is None:
        page.add(tags.p("The DNS checks are not available here.", **{"class": "empty"}))
        return page
    page.add(tags.p(
        "The checks of “smartrelay check-dns” for every domain the relay signs for. ",
        tags.a("Check again now", href="/domains?refresh=on"),
    ))
    for domain in ui.domains.domains:
        result = await ui.domains.result(domain, fresh=fresh)
        page.add(tags.h2(domain))
        checked = datetime.fromtimestamp(result.time, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        page.add(tags.p(f"Checked {checked}.", **{"class": "empty"}))
        if result.error:
            page.add(tags.p(result.error, role="alert", **{"class": "error"}))
            continue
        table = Table(f"dns-{domain}", f"DNS checklist for {domain}",
                      ["check", "name", "status", "what was found", "publish"])
        for check in result.checks:
            status = tags.span(_STATUS_LABEL.get(check.status, check.status),
                               **{"class": f"status-{check.status}"})
            table.rows.append((check.check, check.name, status, check.message,
                               tags.code(check.publish) if check.publish else None))
        page.add(page.table(table, {}, "No checks ran."))
    return page
