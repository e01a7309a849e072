"""
Tests for the cluster-wide queue views of L{smartrelay.web.queries}: the
merge of the nodes' parts (summary, pages, destinations, a message's
queued state), the pagination visiting each message once however the
messages are split over the nodes, nodes that do not answer; every node's
command channel on one fake clock and shared in-process mailboxes.
"""

import attrs
from hypothesis import given, settings, strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from smartrelay.cluster.commands import LocalMailboxes, NodeCommands
from smartrelay.cluster.leases import LocalLeases
from smartrelay.cluster.nodes import FRESH, NODES
from smartrelay.store.memory import MemoryStore
from smartrelay.web.apirequest import ApiError, encodeQueueCursor
from smartrelay.web.queries import (
    PAGE_BUDGET,
    Queries,
    QueueActions,
    mergePages,
    mergeSummaries,
)

T0 = 1_800_000_000.0


@attrs.define
class FakeRecipient:
    address: str
    state: str = "queued"
    attempts: int = 0
    next_attempt: float = 0.0

    @property
    def final(self):
        return self.state not in ("queued", "deferred")


@attrs.define
class FakeEntry:
    queue_id: str
    received: float
    recipients: list
    sender: str = "s@example.com"
    size: int = 100
    tag: str = None
    client: dict = None
    metadata: dict = None

    def pending(self):
        return [r for r in self.recipients if not r.final]


class FakeScheduler:
    """
    The scheduler's public queue methods over a list of L{FakeEntry}.
    """

    def __init__(self, entries=(), destinations=(), deferrals=None):
        self.entries = sorted(entries, key=lambda e: (e.received, e.queue_id))
        self.dests = list(destinations)
        self.deferrals = deferrals or {}

    def queuedMessages(self):
        return list(self.entries)

    def queuedMessage(self, queue_id):
        for entry in self.entries:
            if entry.queue_id == queue_id:
                return entry
        return None

    def attempting(self, queue_id):
        return set()

    def lastDeferral(self, queue_id, address):
        return self.deferrals.get((queue_id, address))

    def destinations(self):
        return self.dests

    def retryDomain(self, domain):
        return 0


def entry(node, serial, received, *addresses, state="queued"):
    return FakeEntry(
        f"{node}/01-{serial:05d}-5C348706",
        received,
        [FakeRecipient(a, state=state, next_attempt=received + 60) for a in addresses],
    )


class Cluster:
    """
    Nodes sharing a fake clock, leases and mailboxes; each has a
    L{FakeScheduler}, a command channel answering with
    L{QueueActions.answer} and its L{Queries}.
    """

    def __init__(self, clock, schedulers: dict):
        self.clock = clock
        self.leases = LocalLeases()
        self.mailboxes = LocalMailboxes()
        self.commands = {}
        self.queries = {}
        for node, scheduler in schedulers.items():
            commands = NodeCommands(
                self.mailboxes,
                self.leases,
                clock,
                node=node,
                handler=QueueActions(scheduler, clock).answer,
            )
            self.commands[node] = commands
            self.queries[node] = Queries(
                MemoryStore(), scheduler, None, clock, remote=commands
            )
            self.beat(node)
            commands.startService()

    def beat(self, node):
        now = self.clock.seconds()
        self.leases.acquireLease(NODES, f"{node}-run", 1 << 30, now, 30)
        self.leases.acquireLease(FRESH, f"{node}-run", 1 << 30, now, 20)

    def stop(self):
        for commands in self.commands.values():
            if commands.running:
                commands.stopService()

    def settle(self, coroutine, seconds=6.0):
        d = coroutine if isinstance(coroutine, Deferred) else Deferred.fromCoroutine(coroutine)
        steps = int(seconds / 0.25)
        for _ in range(steps):
            if d.called:
                break
            self.clock.advance(0.25)
        return d


class MergeTests(SynchronousTestCase):
    """
    L{mergeSummaries} and L{mergePages} on their own.
    """

    def test_summarySums(self):
        """
        Counts are added, the oldest and the next attempt are the
        earliest, the reasons' counts added.
        """
        a = {
            "messages": 2,
            "domains": {
                "example.org": {
                    "messages": 2, "recipients": 3, "queued": 1, "deferred": 2,
                    "attempting": 0, "oldest": T0 + 10, "next_attempt": T0 + 100,
                    "reasons": {"421 4.7.0 try later": 2},
                }
            },
        }
        b = {
            "messages": 1,
            "domains": {
                "example.org": {
                    "messages": 1, "recipients": 1, "queued": 0, "deferred": 1,
                    "attempting": 0, "oldest": T0, "next_attempt": None,
                    "reasons": {"421 4.7.0 try later": 1, "451 4.3.0 busy": 1},
                },
                "example.net": {
                    "messages": 1, "recipients": 1, "queued": 1, "deferred": 0,
                    "attempting": 1, "oldest": T0 + 5, "next_attempt": T0 + 50,
                    "reasons": {},
                },
            },
        }
        merged = mergeSummaries([a, b])
        self.assertEqual((merged["messages"], merged["recipients"]), (3, 5))
        net, org = merged["domains"]
        self.assertEqual(net["domain"], "example.net")
        self.assertEqual(
            {k: org[k] for k in ("messages", "recipients", "queued", "deferred")},
            {"messages": 3, "recipients": 4, "queued": 1, "deferred": 3},
        )
        self.assertEqual(org["oldest"], "2027-01-15T08:00:00.000Z")
        self.assertEqual(org["next_attempt"], "2027-01-15T08:01:40.000Z")
        self.assertEqual(
            org["reasons"],
            [{"reason": "421 4.7.0 try later", "count": 3}, {"reason": "451 4.3.0 busy", "count": 1}],
        )

    def test_summaryMalformed(self):
        """
        A malformed part raises rather than counting nonsense.
        """
        for part in ({}, {"messages": 1, "domains": {"x": {}}}, {"messages": "x", "domains": {}}):
            self.assertRaises((KeyError, TypeError, ValueError), mergeSummaries, [part])

    def test_pageStopsAtTheEarliestIncompleteNode(self):
        """
        A node that left messages out cuts the page at its last one: the
        others' later messages wait for the next page.
        """
        a = {"items": [{"queue_id": "a1"}, {"queue_id": "a2"}],
             "positions": [[1.0, "a1"], [5.0, "a2"]], "more": True}
        b = {"items": [{"queue_id": "b1"}, {"queue_id": "b2"}],
             "positions": [[2.0, "b1"], [9.0, "b2"]], "more": False}
        items, last = mergePages([("0A", a), ("0B", b)], 10)
        self.assertEqual([i["queue_id"] for i in items], ["a1", "b1", "a2"])
        self.assertEqual([i["node"] for i in items], ["0A", "0B", "0A"])
        self.assertEqual(last, (5.0, "a2"))
        items, last = mergePages([("0A", dict(a, more=False)), ("0B", b)], 3)
        self.assertEqual(last, (5.0, "a2"))
        items, last = mergePages([("0A", dict(a, more=False)), ("0B", b)], 4)
        self.assertEqual((len(items), last), (4, None))

    def test_pageMalformed(self):
        """
        Positions that do not match the items, or C{more} with nothing,
        raise.
        """
        for part in (
            {"items": [{}], "positions": [], "more": False},
            {"items": [], "positions": [], "more": True},
            {"items": [], "positions": [["x", "y"]], "more": False},
            {},
        ):
            self.assertRaises(
                (KeyError, TypeError, ValueError), mergePages, [("0A", part)], 10
            )

    def test_pageBudget(self):
        """
        A node sends no more items than fit in the budget, at least one,
        and says it left some out.
        """
        big = "x" * 20000
        scheduler = FakeScheduler(
            [entry("0A", n, T0 + n, f"{big}{n}@example.org") for n in range(5)]
        )
        part = self.successResultOf(
            Deferred.fromCoroutine(
                QueueActions(scheduler, Clock()).pagePart(None, None, 100, None, PAGE_BUDGET)
            )
        )
        self.assertEqual((len(part["items"]), part["more"]), (2, True))
        part = self.successResultOf(
            Deferred.fromCoroutine(
                QueueActions(scheduler, Clock()).pagePart(None, None, 100, None, 10)
            )
        )
        self.assertEqual((len(part["items"]), part["more"]), (1, True))


class ClusterViewTests(SynchronousTestCase):
    """
    Three nodes; the views asked of node 0A.
    """

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(T0)
        deferrals = {("0B/01-00001-5C348706", "b@example.org"): {
            "code": 421, "status": "4.7.0", "reply": "try later", "remote": "mx"}}
        self.schedulers = {
            "0A": FakeScheduler(
                [entry("0A", 1, T0 + 1, "a@example.org")],
                [{"destination": "example.org", "queued": 1, "connections": 1,
                  "max_connections": 5, "throttled": False, "throttle_until": None}],
            ),
            "0B": FakeScheduler(
                [entry("0B", 1, T0, "b@example.org", state="deferred"),
                 entry("0B", 2, T0 + 2, "c@example.net")],
                [{"destination": "example.org", "queued": 1, "connections": 0,
                  "max_connections": 5, "throttled": True, "throttle_until": T0 + 300}],
                deferrals,
            ),
            "0C": FakeScheduler([entry("0C", 1, T0 + 3, "d@example.org")]),
        }
        self.cluster = Cluster(self.clock, self.schedulers)
        self.addCleanup(self.cluster.stop)
        self.a = self.cluster.queries["0A"]

    def test_summaryClusterWide(self):
        """
        Node A's summary sums every node's, says who answered and what
        each holds.
        """
        summary = self.successResultOf(self.cluster.settle(self.a.queueSummary()))
        self.assertEqual((summary["messages"], summary["recipients"]), (4, 4))
        net, org = summary["domains"]
        self.assertEqual((org["domain"], org["messages"], org["deferred"]), ("example.org", 3, 1))
        self.assertEqual(org["oldest"], "2027-01-15T08:00:00.000Z")
        self.assertEqual(org["reasons"], [{"reason": "421 4.7.0 try later", "count": 1}])
        self.assertEqual(net["messages"], 1)
        self.assertEqual(summary["nodes"], ["0A", "0B", "0C"])
        self.assertEqual(
            (summary["partial"], summary["missing_nodes"], summary["node_errors"]),
            (False, [], []),
        )
        self.assertEqual(
            summary["per_node"],
            [
                {"node": "0A", "messages": 1, "recipients": 1},
                {"node": "0B", "messages": 2, "recipients": 2},
                {"node": "0C", "messages": 1, "recipients": 1},
            ],
        )
        only = self.successResultOf(self.cluster.settle(self.a.queueSummary("example.net")))
        self.assertEqual([d["domain"] for d in only["domains"]], ["example.net"])

    def test_silentNodeNamed(self):
        """
        A registered node that does not answer within the view's timeout
        is named; the others' parts are still summed.
        """
        self.cluster.commands["0C"].stopService()
        summary = self.successResultOf(self.cluster.settle(self.a.queueSummary()))
        self.assertEqual(summary["messages"], 3)
        self.assertEqual(summary["nodes"], ["0A", "0B"])
        self.assertTrue(summary["partial"])
        self.assertEqual(summary["missing_nodes"], ["0C"])
        self.assertEqual(summary["node_errors"][0]["code"], "node_timeout")

    def test_staleNodeNotAsked(self):
        """
        A node still registered whose last heartbeat is older than two
        intervals is named at once, without waiting for it.
        """
        self.clock.advance(21)
        self.cluster.beat("0A")
        self.cluster.beat("0B")
        d = Deferred.fromCoroutine(self.a.queueSummary())
        self.clock.advance(0.25)
        self.clock.advance(0.25)
        summary = self.successResultOf(d)
        self.assertEqual(summary["missing_nodes"], ["0C"])
        self.assertEqual(summary["node_errors"][0]["code"], "node_unavailable")
        error = self.failureResultOf(
            Deferred.fromCoroutine(self.a.retry("0C/01-00001-5C348706")), ApiError
        ).value
        self.assertEqual((error.status, error.code), (503, "node_unavailable"))

    def test_storeUnreachable(self):
        """
        When the live nodes cannot be read, the answer is this node's part,
        partial, with the reason.
        """
        class Down:
            def liveLeases(self, *args):
                raise ConnectionRefusedError("refused")

        self.cluster.commands["0A"].leases = Down()
        summary = self.successResultOf(self.cluster.settle(self.a.queueSummary()))
        self.assertEqual((summary["messages"], summary["partial"]), (1, True))
        self.assertEqual(summary["node_errors"][0]["code"], "store_unreachable")
        self.assertIsNone(summary["node_errors"][0]["node"])

    def test_nonsenseNamed(self):
        """
        A node that answers a malformed part is named, not merged.
        """
        self.cluster.commands["0C"].handler = lambda op, args: {"status": 200, "body": {"x": 1}}
        summary = self.successResultOf(self.cluster.settle(self.a.queueSummary()))
        self.assertEqual(summary["missing_nodes"], ["0C"])
        self.assertEqual(summary["nodes"], ["0A", "0B"])
        page = self.successResultOf(self.cluster.settle(self.a.queueMessages(None, None, 10, None)))
        self.assertEqual(page["missing_nodes"], ["0C"])
        self.assertEqual(len(page["items"]), 3)

    def test_pages(self):
        """
        The pages hold every node's messages oldest first, each naming its
        node, and the cursor goes on across nodes.
        """
        page = self.successResultOf(self.cluster.settle(self.a.queueMessages(None, None, 2, None)))
        self.assertEqual(
            [(i["queue_id"][:2], i["node"]) for i in page["items"]], [("0B", "0B"), ("0A", "0A")]
        )
        page = self.successResultOf(
            self.cluster.settle(self.a.queueMessages(None, None, 2, page["next_cursor"]))
        )
        self.assertEqual([i["node"] for i in page["items"]], ["0B", "0C"])
        self.assertIsNone(page["next_cursor"])
        page = self.successResultOf(
            self.cluster.settle(self.a.queueMessages("example.org", "deferred", 10, None))
        )
        self.assertEqual([i["queue_id"] for i in page["items"]], ["0B/01-00001-5C348706"])

    def test_destinations(self):
        """
        Each node's destinations, naming the node, sorted.
        """
        answer = self.successResultOf(self.cluster.settle(self.a.clusterDestinations()))
        self.assertEqual(
            [(d["destination"], d["node"], d["throttled"]) for d in answer["items"]],
            [("example.org", "0A", False), ("example.org", "0B", True)],
        )
        self.assertEqual(answer["items"][1]["throttle_until"], "2027-01-15T08:05:00.000Z")
        self.assertEqual(answer["nodes"], ["0A", "0B", "0C"])

    def test_messageQueuedElsewhere(self):
        """
        The document of a message queued on B, asked of A, says it is
        queued there, with B's recipients.
        """
        doc = self.successResultOf(
            self.cluster.settle(self.a.message("0B/01-00001-5C348706"))
        )
        self.assertEqual((doc["queued"], doc["node"]), (True, "0B"))
        self.assertEqual(doc["recipients"][0]["address"], "b@example.org")
        self.assertEqual(doc["recipients"][0]["last_reply"]["code"], 421)
        self.assertEqual(doc["envelope"]["sender"], "s@example.com")

    def test_messageOfSilentOwner(self):
        """
        When the owner does not answer and the store has no events of the
        message, the answer is the owner's error (504 on a timeout).
        """
        self.cluster.commands["0B"].stopService()
        d = self.cluster.settle(self.a.message("0B/01-00001-5C348706"))
        error = self.failureResultOf(d, ApiError).value
        self.assertEqual((error.status, error.code), (504, "node_timeout"))
        d = self.cluster.settle(self.a.message("0C/01-00009-5C348706"))
        self.assertEqual(self.failureResultOf(d, ApiError).value.status, 404)

    def test_badCommands(self):
        """
        Bad arguments to the view commands are answered 400.
        """
        actions = QueueActions(FakeScheduler(), Clock())
        for op, args in [
            ("queuePage", {"limit": 0}),
            ("queuePage", {"limit": 10, "after": ["x", 1]}),
            ("queuePage", {"limit": 10, "state": "bounced"}),
            ("queuePage", {"limit": True}),
            ("queueSummary", {"domain": 5}),
            ("queued", {"queue_id": "nope"}),
        ]:
            answer = self.successResultOf(Deferred.fromCoroutine(actions.answer(op, args)))
            self.assertEqual(answer["status"], 400, (op, args))


class OneNodeTests(SynchronousTestCase):
    """
    Without other nodes the views are what they were: no cluster fields.
    """

    def test_unchanged(self):
        scheduler = FakeScheduler(
            [entry("0A", n, T0 + n, f"r{n}@example.org") for n in range(3)],
            [{"destination": "example.org", "queued": 1, "connections": 1,
              "max_connections": 5, "throttled": False}],
        )
        queries = Queries(MemoryStore(), scheduler, None, Clock())
        summary = self.successResultOf(Deferred.fromCoroutine(queries.queueSummary()))
        self.assertEqual(set(summary), {"messages", "recipients", "domains"})
        page = self.successResultOf(
            Deferred.fromCoroutine(queries.queueMessages(None, None, 2, None))
        )
        self.assertEqual(set(page), {"items", "next_cursor"})
        self.assertNotIn("node", page["items"][0])
        self.assertEqual(page["next_cursor"], encodeQueueCursor(T0 + 1, "0A/01-00001-5C348706"))
        answer = self.successResultOf(Deferred.fromCoroutine(queries.clusterDestinations()))
        self.assertEqual(set(answer), {"items", "next_cursor"})
        self.assertNotIn("node", answer["items"][0])

    def test_badCursor(self):
        """
        A cursor that is not one the API handed out is a 400 naming it.
        """
        queries = Queries(MemoryStore(), FakeScheduler(), None, Clock())
        for cursor in ("junk", "q" + "A" * 8):
            error = self.failureResultOf(
                Deferred.fromCoroutine(queries.queueMessages(None, None, 2, cursor)), ApiError
            ).value
            self.assertEqual((error.status, error.body()["error"].get("parameter")), (400, "cursor"))


class PaginationPropertyTests(SynchronousTestCase):
    """
    However the messages are split over the nodes, whatever their
    received times (ties included) and the page size, paging through the
    merged view visits each message exactly once, in order.
    """

    @settings(max_examples=60, deadline=None)
    @given(
        split=st.lists(
            st.tuples(st.sampled_from(["0A", "0B", "0C"]), st.integers(0, 5)),
            max_size=25,
        ),
        limit=st.integers(1, 7),
        budget=st.sampled_from([None, 1, 700, 2000]),
    )
    def test_eachOnce(self, split, limit, budget):
        clock = Clock()
        nodes = {"0A": [], "0B": [], "0C": []}
        for serial, (node, received) in enumerate(split):
            nodes[node].append(entry(node, serial, T0 + received, f"r{serial}@example.org"))
        actions = {n: QueueActions(FakeScheduler(e), clock) for n, e in nodes.items()}
        seen = []
        after = None
        for _ in range(len(split) + 2):
            parts = [
                (n, self.successResultOf(
                    Deferred.fromCoroutine(a.pagePart(None, None, limit, after, budget))))
                for n, a in actions.items()
            ]
            items, after = mergePages(parts, limit)
            self.assertLessEqual(len(items), limit)
            seen.extend(i["queue_id"] for i in items)
            if after is None:
                break
        expected = sorted(
            (e.received, e.queue_id) for entries in nodes.values() for e in entries
        )
        self.assertEqual(seen, [q for _, q in expected])


class RegistryTests(SynchronousTestCase):
    """
    L{NodeRegistry} keeps a lease on C{nodes-fresh} for two heartbeat
    intervals and gives both leases back when it stops.
    """

    def test_freshAndReleased(self):
        from smartrelay.cluster.nodes import NodeRegistry

        clock = Clock()
        clock.advance(T0)
        leases = LocalLeases()
        registry = NodeRegistry(leases, clock, "0A-run", ttl=30)
        registry.startService()
        live = lambda resource: self.successResultOf(leases.liveLeases(resource, clock.seconds()))
        self.assertEqual((live(NODES), live(FRESH)), (["0A-run"], ["0A-run"]))
        # Killed: no more beats; fresh after 20 s, registered until 30 s.
        registry._beat.stop()
        clock.advance(20.5)
        self.assertEqual((live(NODES), live(FRESH)), (["0A-run"], []))
        registry._beat.start(10, now=True)
        self.successResultOf(registry.stopService())
        self.assertEqual((live(NODES), live(FRESH)), ([], []))


class TooLargeTests(SynchronousTestCase):
    """
    An answer too long for a mailbox message comes back as a 500
    C{answer_too_large} error, not as silence.
    """

    def test_tooLarge(self):
        clock = Clock()
        clock.advance(T0)
        cluster = Cluster(clock, {"0A": FakeScheduler(), "0B": FakeScheduler()})
        self.addCleanup(cluster.stop)
        cluster.commands["0B"].handler = lambda op, args: {"status": 200, "body": "x" * 70000}
        d = cluster.settle(cluster.commands["0A"].request("0B", "destinations", {}))
        answer = self.successResultOf(d)
        self.assertEqual(
            (answer["status"], answer["body"]["error"]["code"]), (500, "answer_too_large")
        )
        self.flushLoggedErrors()


class MessageEventsTests(SynchronousTestCase):
    """
    The document of another node's message when the store has its events.
    """

    def setUp(self):
        from smartrelay.events import Event

        self.clock = Clock()
        self.clock.advance(T0)
        self.cluster = Cluster(self.clock, {"0A": FakeScheduler(), "0B": FakeScheduler()})
        self.addCleanup(self.cluster.stop)
        self.a = self.cluster.queries["0A"]
        self.queueID = "0B/01-00007-5C348706"
        self.events = [
            Event("accepted", self.queueID, "x@example.org", T0, detail={"sender": "s@e.com"}),
        ]
        self.Event = Event

    def store(self):
        self.successResultOf(self.a.store.appendEvents(self.events))

    def test_finalNotAsked(self):
        """
        A message whose recipients all have their final event is answered
        from the events without asking its node (even one that is gone).
        """
        self.events.append(self.Event("delivered", self.queueID, "x@example.org", T0 + 1))
        self.store()
        self.cluster.commands["0B"].stopService()
        d = Deferred.fromCoroutine(self.a.message(self.queueID))
        doc = self.successResultOf(d)
        self.assertEqual((doc["queued"], doc["recipients"][0]["state"]), (False, "delivered"))
        self.assertNotIn("partial", doc)

    def test_waitingOwnerSilent(self):
        """
        A message still waiting by its events, whose node does not answer,
        is shown from the events as queued, partial, naming the node.
        """
        self.store()
        self.cluster.commands["0B"].stopService()
        doc = self.successResultOf(self.cluster.settle(self.a.message(self.queueID)))
        self.assertEqual(
            (doc["queued"], doc["partial"], doc["missing_nodes"], doc["node"]),
            (True, True, ["0B"], "0B"),
        )
        self.assertEqual(doc["node_errors"][0]["code"], "node_timeout")
