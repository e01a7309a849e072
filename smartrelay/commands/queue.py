"""
C{smartrelay queue}: see and steer the delivery queue over the relay's API.
"""

import argparse
import io

from smartrelay.commands.base import PROG, Console, UsageError
from smartrelay.commands.console import (
    API_NOTE,
    addCommonOptions,
    apiClient,
    positiveInt,
    quotePath,
    runEach,
    table,
    withDefaults,
    write,
)
from smartrelay.commands.messages import message

#: Queued messages asked for per request by C{queue list}.
PAGE = 1000


def _missingText(document: dict) -> str:
    """
    The warning lines of a cluster-wide answer that lacks some nodes'
    parts (C{partial}, C{node_errors}); empty otherwise.
    """
    if not document.get("partial"):
        return ""
    lines = []
    for error in document.get("node_errors") or [{}]:
        node = error.get("node")
        who = f"node {node}" if node else "the store"
        lines.append(f"warning: incomplete: {who}: {error.get('code', '?')}: "
                     f"{error.get('message', '')}\n")
    return "".join(lines)


def _warn(console: Console, options, document: dict) -> None:
    # With --json the document says it; without, the warning goes to stderr
    # so that the table stays the same.
    text = _missingText(document)
    if text and not options.json:
        console.stderr.write(text)


def _summaryText(document: dict) -> str:
    out = io.StringIO()
    where = ""
    if document.get("nodes"):
        where = f" on {len(document['nodes'])} node(s) ({', '.join(document['nodes'])})"
    out.write(f"{document['messages']} message(s), {document['recipients']} recipient(s) "
              f"queued{where}\n")
    if len(document.get("per_node") or ()) > 1:
        out.write("".join(f"  node {n['node']}: {n['messages']} message(s), "
                          f"{n['recipients']} recipient(s)\n" for n in document["per_node"]))
    if not document.get("domains"):
        return out.getvalue()
    rows = [[d["domain"], d["messages"], d["recipients"], d["deferred"], d["attempting"],
             d["oldest"], d["next_attempt"]] for d in document["domains"]]
    out.write(table(rows, ["domain", "messages", "recipients", "deferred", "attempting",
                           "oldest", "next attempt"]))
    for d in document["domains"]:
        for reason in d.get("reasons", []):
            out.write(f"  {d['domain']}: {reason['count']} x {reason['reason']}\n")
    return out.getvalue()


def queueSummary(options, console: Console) -> int:
    """
    C{smartrelay queue [summary] [--domain D]}.
    """
    document = apiClient(options).json("GET", "queue", {"domain": options.domain})
    write(console, options, document, _summaryText)
    _warn(console, options, document)
    return 0


def queueList(options, console: Console) -> int:
    """
    C{smartrelay queue list [--domain D] [--state S] [--limit N]}.
    """
    client = apiClient(options)
    query = {"domain": options.domain, "state": options.state}
    items: list = []
    errors: dict = {}
    while True:
        want = PAGE if options.limit is None else min(PAGE, options.limit - len(items))
        page = client.json("GET", "queue/messages", dict(query, limit=want))
        items.extend(page.get("items", []))
        for error in page.get("node_errors") or ():
            errors.setdefault(error.get("node"), error)
        cursor = page.get("next_cursor")
        if not cursor or (options.limit is not None and len(items) >= options.limit):
            break
        query["cursor"] = cursor
    if options.limit is not None:
        items = items[: options.limit]
    document: dict = {"items": items}
    if errors:
        document.update(partial=True, missing_nodes=sorted(n for n in errors if n),
                        node_errors=list(errors.values()))
    nodes = any("node" in item for item in items)

    def human(items: list) -> str:
        rows = []
        for item in items:
            states = sorted({r.get("state") for r in item.get("recipients", [])} - {None})
            nexts = [r["next_attempt"] for r in item.get("recipients", []) if r.get("next_attempt")]
            rows.append([item["queue_id"], item.get("received"), item.get("size"),
                         item.get("sender") or "<>", len(item.get("recipients", [])),
                         ",".join(states), min(nexts) if nexts else None]
                        + ([item.get("node")] if nodes else []))
        return table(rows, ["queue id", "received", "size", "sender", "rcpts", "state",
                            "next attempt"] + (["node"] if nodes else [])) \
            + f"{len(items)} message(s)\n"

    write(console, options, document, lambda d: human(d["items"]))
    _warn(console, options, document)
    return 0


def queueShow(options, console: Console) -> int:
    """
    C{smartrelay queue show ID}: as C{smartrelay message ID}, with the
    headers.
    """
    options.headers = True
    return message(options, console)


def queueRetry(options, console: Console) -> int:
    """
    C{smartrelay queue retry ID... | --domain D}: attempt now.
    """
    client = apiClient(options)
    if options.domain is not None:
        if options.queue_ids:
            raise UsageError(f"{PROG} queue retry: give queue ids or --domain, not both")
        document = client.json("POST", "queue/retry", {"domain": options.domain})
        write(console, options, document,
               lambda d: f"retrying {d['messages']} message(s) to {d['domain']}\n")
        return 0
    if not options.queue_ids:
        raise UsageError(f"{PROG} queue retry: give queue ids or --domain")
    return runEach(options, console, options.queue_ids, "retry",
                 lambda q: client.json("POST", f"queue/{quotePath(q)}/retry"),
                 lambda q, d: f"{q}: retrying {', '.join(d.get('retrying', [])) or 'now'}")


def queueDelete(options, console: Console) -> int:
    """
    C{smartrelay queue delete ID...}: the messages never go out.
    """
    client = apiClient(options)
    return runEach(options, console, options.queue_ids, "delete",
                 lambda q: client.json("DELETE", f"queue/{quotePath(q)}"),
                 lambda q, d: f"{q}: deleted")


# ---------------------------------------------------------------------------


def register(commands) -> None:
    """
    Add C{queue} and its actions.
    """
    api = API_NOTE

    p = commands.add_parser("queue", help="see and steer the delivery queue",
                            description="The delivery queue: a summary per domain (the "
                                        "default), the messages, one message, retry now, "
                                        "delete. " + api)
    addCommonOptions(p)
    p.add_argument("--domain", metavar="DOMAIN", default=argparse.SUPPRESS,
                   help="only this recipient domain")
    p.set_defaults(run=withDefaults(queueSummary))
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    q = actions.add_parser("summary", help="per domain: counts, deferral reasons, next attempt")
    q.add_argument("--domain", metavar="DOMAIN", default=argparse.SUPPRESS,
                   help="only this recipient domain")
    addCommonOptions(q)
    q.set_defaults(run=withDefaults(queueSummary))
    q = actions.add_parser("list", help="the queued messages, oldest first")
    q.add_argument("--domain", metavar="DOMAIN", default=argparse.SUPPRESS,
                   help="only this recipient domain")
    q.add_argument("--state", choices=("queued", "deferred"), default=None)
    q.add_argument("--limit", type=positiveInt, default=None, metavar="N", help="at most N messages")
    addCommonOptions(q)
    q.set_defaults(run=withDefaults(queueList))
    q = actions.add_parser("show", help="one queued message, with its headers")
    q.add_argument("queue_id", metavar="ID")
    addCommonOptions(q)
    q.set_defaults(run=withDefaults(queueShow), headers=True)
    q = actions.add_parser("retry", help="attempt messages now")
    q.add_argument("queue_ids", metavar="ID", nargs="*")
    q.add_argument("--domain", metavar="DOMAIN", default=argparse.SUPPRESS,
                   help="every message waiting for this domain")
    addCommonOptions(q)
    q.set_defaults(run=withDefaults(queueRetry))
    q = actions.add_parser("delete", help="delete messages: they never go out")
    q.add_argument("queue_ids", metavar="ID", nargs="+")
    addCommonOptions(q)
    q.set_defaults(run=withDefaults(queueDelete))
