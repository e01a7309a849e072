"""
Tests for L{smartrelay.store}: one contract suite run against every back end,
plus tests of what only the SQLite back end does (schema, indexes, threads).
"""

import itertools
import os
import sqlite3
import threading

import attrs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import gatherResults, inlineCallbacks, maybeDeferred
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from smartrelay.events import Event
from smartrelay.store.interfaces import (
    EventPage,
    InvalidCursor,
    IStore,
    StoreClosed,
    encodeCursor,
)
from smartrelay.store.memory import MemoryStore
from smartrelay.store.sqlite import SCHEMA_VERSION, SQLiteStore, UnsupportedSchema

T0 = 1_700_000_000.0


def event(time=T0, type="delivered", queue_id="Q1", recipient="a@example.com", **kw):
    """
    An L{Event} with defaults for whatever the test does not care about.
    """
    return Event(type=type, queue_id=queue_id, recipient=recipient, time=time, **kw)


def synchronous(f, *args, **kwargs):
    """
    A C{runInThread} that runs C{f} at once, on the calling thread.
    """
    return maybeDeferred(f, *args, **kwargs)


jsonValues = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(), children, max_size=4),
    max_leaves=12,
)


class StoreContractMixin:
    """
    The L{IStore} contract.  Mix into a L{SynchronousTestCase} that defines
    C{createStore()}, returning a store whose Deferreds fire synchronously.
    """

    def setUp(self):
        self.store = self.createStore()
        self.assertIsNone(self.successResultOf(self.store.start()))
        self.addCleanup(self.store.close)

    def append(self, *events):
        self.assertIsNone(self.successResultOf(self.store.appendEvents(list(events))))

    def query(self, **kw):
        return self.successResultOf(self.store.queryEvents(**kw))

    def queryAll(self, **kw):
        """
        Follow cursors to the end; return the list of pages.
        """
        pages = [self.query(**kw)]
        while pages[-1].cursor is not None:
            pages.append(self.query(cursor=pages[-1].cursor, **kw))
        return pages

    def forMessage(self, queue_id):
        return self.successResultOf(self.store.eventsForMessage(queue_id))

    def sample(self):
        """
        Append a varied set of events; return them in (time, insertion) order.
        """
        events = [
            event(T0 + 1, "accepted", "Q1", "a@example.com", tag="welcome"),
            event(T0 + 2, "delivered", "Q1", "a@example.com", tag="welcome"),
            event(T0 + 3, "accepted", "Q2", "b@Example.ORG", tag="invoice"),
            event(T0 + 4, "bounced", "Q2", "b@example.org", tag="invoice"),
            event(T0 + 5, "opened", "Q1", "a@example.com", tag="welcome"),
            event(T0 + 6, "accepted", "Q3", "c@example.com"),
        ]
        self.append(*events[:3])
        self.append(*events[3:])
        return events

    def test_providesInterface(self):
        """
        The store provides L{IStore}.
        """
        self.assertTrue(verifyObject(IStore, self.store))

    def test_startIdempotent(self):
        """
        Starting a started store again succeeds and keeps its events.
        """
        events = self.sample()
        self.assertIsNone(self.successResultOf(self.store.start()))
        self.assertEqual(self.query().events, events)

    def test_appendEmptyBatch(self):
        """
        Appending an empty batch succeeds and stores nothing.
        """
        self.append()
        self.assertEqual(self.query(), EventPage(events=[], cursor=None))

    def test_eventsForMessage(self):
        """
        C{eventsForMessage} returns exactly that message's events, equal to
        those appended.
        """
        events = self.sample()
        self.assertEqual(self.forMessage("Q2"), events[2:4])

    def test_eventsForMessageTimeOrder(self):
        """
        C{eventsForMessage} orders by time, then by insertion order, whatever
        the order and batching of the appends.
        """
        late = event(T0 + 10, "delivered")
        early = event(T0 + 1, "accepted")
        tieA = event(T0 + 5, "deferred", detail={"n": 1})
        tieB = event(T0 + 5, "deferred", detail={"n": 2})
        self.append(late, tieA)
        self.append(early)
        self.append(tieB)
        self.assertEqual(self.forMessage("Q1"), [early, tieA, tieB, late])

    def test_eventsForUnknownMessage(self):
        """
        C{eventsForMessage} of an unknown queue id is an empty list.
        """
        self.sample()
        self.assertEqual(self.forMessage("nope"), [])

    def test_queryEverything(self):
        """
        Without filters C{queryEvents} returns every event in order, and no
        cursor when they fit on one page.
        """
        events = self.sample()
        self.assertEqual(self.query(), EventPage(events=events, cursor=None))

    def test_eventWithoutQueueIdOrRecipient(self):
        """
        Events without queue id, recipient or tag are stored and returned.
        """
        bare = Event(type="rejected", queue_id=None, recipient=None, time=T0)
        self.append(bare)
        self.assertEqual(self.query().events, [bare])
        self.assertEqual(self.query(recipient="a@example.com").events, [])

    def test_queryByType(self):
        """
        C{type} selects events of that type only.
        """
        events = self.sample()
        self.assertEqual(
            self.query(type="accepted").events, [events[0], events[2], events[5]]
        )
        self.assertEqual(self.query(type="clicked").events, [])

    def test_queryByQueueId(self):
        """
        C{queue_id} selects that message's events only.
        """
        events = self.sample()
        self.assertEqual(
            self.query(queue_id="Q1").events, [events[0], events[1], events[4]]
        )

    def test_queryByRecipient(self):
        """
        C{recipient} selects that recipient's events only.
        """
        events = self.sample()
        self.assertEqual(
            self.query(recipient="a@example.com").events,
            [events[0], events[1], events[4]],
        )

    def test_recipientDomainCaseInsensitive(self):
        """
        Recipient matching ignores the case of the domain, not of the local
        part, and returns the address as it was stored.
        """
        events = self.sample()
        self.assertEqual(
            self.query(recipient="b@EXAMPLE.org").events, [events[2], events[3]]
        )
        self.assertEqual(self.query(recipient="B@example.org").events, [])
        mixed = event(T0 + 7, recipient="Alice.Smith@Example.COM")
        self.append(mixed)
        self.assertEqual(
            self.query(recipient="Alice.Smith@example.com").events, [mixed]
        )
        self.assertEqual(self.query(recipient="alice.smith@example.com").events, [])
        self.assertEqual(
            self.query(recipient="Alice.Smith@example.com").events[0].recipient,
            "Alice.Smith@Example.COM",
        )

    def test_recipientLastAtSplitsDomain(self):
        """
        The domain is what follows the last C{@}; an address without one
        matches only exactly.
        """
        quoted = event(T0, recipient='"x@Y"@Example.NET')
        bare = event(T0 + 1, recipient="Postmaster")
        self.append(quoted, bare)
        self.assertEqual(self.query(recipient='"x@Y"@example.net').events, [quoted])
        self.assertEqual(self.query(recipient='"x@y"@example.net').events, [])
        self.assertEqual(self.query(recipient="Postmaster").events, [bare])
        self.assertEqual(self.query(recipient="postmaster").events, [])

    def test_queryByTag(self):
        """
        C{tag} selects events with that tag only.
        """
        events = self.sample()
        self.assertEqual(self.query(tag="invoice").events, events[2:4])
        self.assertEqual(self.query(tag="Invoice").events, [])

    def test_combinedFilters(self):
        """
        Several filters select the events that match all of them.
        """
        events = self.sample()
        self.assertEqual(
            self.query(
                type="accepted", tag="welcome", recipient="a@example.com"
            ).events,
            [events[0]],
        )
        self.assertEqual(self.query(type="bounced", queue_id="Q1").events, [])

    def test_sinceInclusive(self):
        """
        C{since} keeps events at exactly that time.
        """
        events = self.sample()
        self.assertEqual(self.query(since=T0 + 4).events, events[3:])
        self.assertEqual(self.query(since=T0 + 4.000001).events, events[4:])

    def test_untilExclusive(self):
        """
        C{until} drops events at exactly that time.
        """
        events = self.sample()
        self.assertEqual(self.query(until=T0 + 4).events, events[:3])
        self.assertEqual(self.query(until=T0 + 4.000001).events, events[:4])

    def test_timeRange(self):
        """
        C{since} and C{until} together select a half-open range; an empty
        range selects nothing.
        """
        events = self.sample()
        self.assertEqual(self.query(since=T0 + 2, until=T0 + 5).events, events[1:4])
        self.assertEqual(self.query(since=T0 + 3, until=T0 + 3).events, [])
        self.assertEqual(self.query(since=T0 + 5, until=T0 + 2).events, [])

    def test_timeRangeIntegers(self):
        """
        Integer C{since} / C{until} compare with fractional event times.
        """
        a = event(99.5)
        b = event(100.0)
        c = event(100.25)
        self.append(a, b, c)
        self.assertEqual(self.query(since=100, until=101).events, [b, c])
        self.assertEqual(self.query(until=100).events, [a])

    def test_badTimeBound(self):
        """
        A C{since} or C{until} that is not a number fails with L{ValueError}.
        """
        for kw in [{"since": "yesterday"}, {"until": float("nan")}, {"since": True}]:
            self.failureResultOf(self.store.queryEvents(**kw), ValueError)

    def test_timeRoundTripsExactly(self):
        """
        Event times come back bit for bit.
        """
        e = event(1_700_000_000.123456789)
        self.append(e)
        self.assertEqual(self.forMessage("Q1")[0].time, 1_700_000_000.123456789)

    def test_paginationCoversEverythingOnce(self):
        """
        Following cursors returns every event exactly once, in order, with
        ties in time broken by insertion order.
        """
        events = [
            event(T0 + i // 3, queue_id=f"Q{i}", detail={"i": i}) for i in range(25)
        ]
        self.append(*events[10:])
        self.append(*events[:10])
        # Insertion order decides among equal times: events 10.. were
        # appended first.
        expected = sorted(events, key=lambda e: (e.time, e.detail["i"] < 10))
        pages = self.queryAll(limit=10)
        self.assertEqual([len(p.events) for p in pages], [10, 10, 5])
        self.assertEqual([e for p in pages for e in p.events], expected)
        self.assertIsNone(pages[-1].cursor)

    def test_fullLastPageHasNoCursor(self):
        """
        When the events end exactly at a page boundary the last page has no
        cursor (there is no empty extra page).
        """
        self.append(*[event(T0 + i) for i in range(20)])
        pages = self.queryAll(limit=10)
        self.assertEqual([len(p.events) for p in pages], [10, 10])

    def test_limitBounds(self):
        """
        Limits 1 and 1000 are accepted and respected.
        """
        events = [event(T0 + i) for i in range(1001)]
        self.append(*events)
        one = self.query(limit=1)
        self.assertEqual(one.events, events[:1])
        self.assertIsNotNone(one.cursor)
        thousand = self.query(limit=1000)
        self.assertEqual(thousand.events, events[:1000])
        self.assertEqual(
            self.query(limit=1000, cursor=thousand.cursor).events, events[1000:]
        )

    def test_paginationWithFilters(self):
        """
        Cursors work together with filters.
        """
        events = [
            event(T0 + i, type="opened" if i % 2 else "clicked", tag="t")
            for i in range(30)
        ]
        self.append(*events)
        pages = self.queryAll(type="opened", since=T0 + 3, until=T0 + 24, limit=4)
        self.assertEqual(
            [e for p in pages for e in p.events],
            [e for e in events if e.type == "opened" and T0 + 3 <= e.time < T0 + 24],
        )
        self.assertEqual([len(p.events) for p in pages], [4, 4, 3])

    def test_cursorIsURLSafe(self):
        """
        Cursors are non-empty strings of URL-safe characters.
        """
        self.append(*[event(T0 + i) for i in range(3)])
        cursor = self.query(limit=1).cursor
        self.assertIsInstance(cursor, str)
        self.assertRegex(cursor, r"\A[A-Za-z0-9_-]+\Z")

    def test_newEventsBetweenPages(self):
        """
        Events appended between two pages appear on later pages when they
        sort after the last event read (later time, or the same time and
        appended later); nothing is repeated or skipped.
        """
        first = [event(T0 + i, detail={"n": i}) for i in range(4)]
        self.append(*first)
        page1 = self.query(limit=3)
        self.assertEqual(page1.events, first[:3])

        sameTime = event(T0 + 2, detail={"n": "same time"})
        later = event(T0 + 10, detail={"n": "later"})
        self.append(later, sameTime)

        page2 = self.query(limit=3, cursor=page1.cursor)
        self.assertEqual(page2.events, [sameTime, first[3], later])
        self.assertIsNone(page2.cursor)

    def test_eventsBeforeCursorNotRevisited(self):
        """
        An event appended with a time before the cursor's position does not
        show up on later pages (cursors are positions, not offsets).
        """
        events = [event(T0 + i) for i in range(4)]
        self.append(*events)
        page1 = self.query(limit=2)
        backdated = event(T0 - 1)
        self.append(backdated)
        page2 = self.query(limit=2, cursor=page1.cursor)
        self.assertEqual(page2.events, events[2:])
        self.assertEqual(self.query().events, [backdated] + events)

    def test_cursorAtEndWithNewEvents(self):
        """
        A cursor keeps working after the events it pointed between are
        followed by new ones.
        """
        self.append(*[event(T0 + i) for i in range(2)])
        page1 = self.query(limit=1)
        self.append(*[event(T0 + 5 + i) for i in range(3)])
        self.assertEqual(len(self.query(limit=100, cursor=page1.cursor).events), 4)

    def test_invalidCursor(self):
        """
        A cursor the store did not hand out fails with L{InvalidCursor}, a
        L{ValueError}.
        """
        valid = encodeCursor(T0, 1)
        bad = [
            "",
            "garbage",
            "!!!!",
            valid[:-1],
            valid + "A",
            valid[:-2] + "%3",
            "A" * len(valid),  # version 0
            encodeCursor(float("inf"), 1),
            b"bytes",
            12,
        ]
        self.assertTrue(issubclass(InvalidCursor, ValueError))
        for cursor in bad:
            failure = self.failureResultOf(
                self.store.queryEvents(cursor=cursor), InvalidCursor
            )
            self.assertIsInstance(failure.value, ValueError)

    def test_cursorBeforeAnyEvent(self):
        """
        A well-formed cursor positioned before all events returns them all.
        """
        events = self.sample()
        self.assertEqual(self.query(cursor=encodeCursor(0.0, 0)).events, events)

    def test_badLimit(self):
        """
        A limit that is not an integer from 1 to 1000 fails with
        L{ValueError}.
        """
        for limit in [0, -1, 1001, 10**9, 2.5, "10", None, True]:
            self.failureResultOf(self.store.queryEvents(limit=limit), ValueError)

    def test_metadataAndDetailRoundTrip(self):
        """
        Metadata and detail come back equal, including non-ASCII text,
        escapes, nesting and numbers.
        """
        e = event(
            recipient="José.Ñandú@Bücher.example",
            tag="newsletter-été",
            metadata={
                "campaign": "春のセール",
                "emoji": "📬✉️",
                "quotes": "\"'\\\n\t\u0000",
                "nested": {"list": [1, 2.5, None, True, {"k": "v"}], "empty": {}},
                "big": 2**70,
            },
            detail={
                "kind": "hard",
                "reason": "userunknown",
                "status": "5.1.1",
                "diagnostic": "550 5.1.1 <José@bücher.example>: Benutzer unbekannt",
                "remote": "mx.bücher.example",
            },
        )
        self.append(e)
        [back] = self.forMessage("Q1")
        self.assertEqual(back, e)
        self.assertEqual(back.asDict(), e.asDict())
        self.assertEqual(
            self.query(recipient="José.Ñandú@bücher.EXAMPLE").events, [e]
        )

    # The mixin runs this one test function against several back ends
    # (executors); that is the point, so the health check does not apply.
    @settings(suppress_health_check=[HealthCheck.differing_executors])
    @given(metadata=st.dictionaries(st.text(), jsonValues), detail=jsonValues)
    def test_jsonRoundTripProperty(self, metadata, detail):
        """
        Any JSON object stored as metadata, and any JSON value stored as
        detail, comes back equal.
        """
        queue_id = f"H{next(self._counter)}"
        e = event(queue_id=queue_id, metadata=metadata, detail={"v": detail})
        self.append(e)
        self.assertEqual(self.forMessage(queue_id), [e])

    _counter = itertools.count()

    def test_storesSnapshots(self):
        """
        Changing an event's dictionaries after appending it, or changing an
        event read back, does not change what the store holds.
        """
        e = event(metadata={"a": 1}, detail={"b": [1]})
        self.append(e)
        e.metadata["a"] = 2
        e.detail["b"].append(2)
        [back] = self.forMessage("Q1")
        self.assertEqual((back.metadata, back.detail), ({"a": 1}, {"b": [1]}))
        back.metadata["a"] = 3
        self.assertEqual(self.forMessage("Q1")[0].metadata, {"a": 1})

    def test_unencodableBatchStoresNothing(self):
        """
        A batch with a value that cannot be stored fails as a whole: none of
        its events are stored.
        """
        good = event(T0)
        bad = event(T0 + 1, metadata={"x": object()})
        self.failureResultOf(self.store.appendEvents([good, bad]), TypeError)
        self.assertEqual(self.query().events, [])
        self.append(good)
        self.assertEqual(self.query().events, [good])

    def test_closeTwice(self):
        """
        Closing twice succeeds both times.
        """
        self.assertIsNone(self.successResultOf(self.store.close()))
        self.assertIsNone(self.successResultOf(self.store.close()))

    def test_useAfterClose(self):
        """
        Every operation on a closed store fails with L{StoreClosed}.
        """
        self.successResultOf(self.store.close())
        self.failureResultOf(self.store.appendEvents([event()]), StoreClosed)
        self.failureResultOf(self.store.eventsForMessage("Q1"), StoreClosed)
        self.failureResultOf(self.store.queryEvents(), StoreClosed)
        self.failureResultOf(self.store.start(), StoreClosed)


class MemoryStoreTests(StoreContractMixin, SynchronousTestCase):
    """
    L{MemoryStore} fulfils the store contract.
    """

    def createStore(self):
        return MemoryStore()

    def test_usableWithoutStart(self):
        """
        A L{MemoryStore} works without C{start}, for tests that use it as a
        fake.
        """
        store = MemoryStore()
        e = event()
        self.successResultOf(store.appendEvents([e]))
        self.assertEqual(self.successResultOf(store.eventsForMessage("Q1")), [e])


class SQLiteStoreContractTests(StoreContractMixin, SynchronousTestCase):
    """
    L{SQLiteStore}, run synchronously, fulfils the store contract.
    """

    def createStore(self):
        self.path = self.mktemp()
        return SQLiteStore(self.path, synchronous)


class SQLiteStoreTests(SynchronousTestCase):
    """
    What the SQLite back end does beyond the contract: schema, migrations,
    indexes, durability settings and error reporting.
    """

    def setUp(self):
        self.path = self.mktemp()

    def open(self):
        store = SQLiteStore(self.path, synchronous)
        self.successResultOf(store.start())
        self.addCleanup(store.close)
        return store

    def peek(self, sql, params=()):
        """
        Run C{sql} on a separate connection to the database file.
        """
        conn = sqlite3.connect(self.path)
        try:
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()

    def test_walAndSynchronousNormal(self):
        """
        The database is in WAL mode and the store's connection uses
        C{synchronous=NORMAL}.
        """
        store = self.open()
        self.assertEqual(self.peek("PRAGMA journal_mode"), [("wal",)])
        self.assertEqual(store._conn.execute("PRAGMA synchronous").fetchone(), (1,))

    def test_indexes(self):
        """
        The events table has indexes for queue id, recipient, type and tag
        (each followed by time) and for time alone.
        """
        self.open()
        names = [n for (n,) in self.peek(
            "SELECT name FROM sqlite_master WHERE type = 'index'"
            " AND tbl_name = 'events' AND sql IS NOT NULL"
        )]
        columns = {
            tuple(c for (_, _, c) in self.peek(f"PRAGMA index_info({name})"))
            for name in names
        }
        self.assertEqual(
            columns,
            {
                ("time",),
                ("queue_id", "time"),
                ("recipient_norm", "time"),
                ("type", "time"),
                ("tag", "time"),
            },
        )

    def test_queriesUseIndexes(self):
        """
        Each query the store runs reads one index in (time, seq) order: no
        table scan, no sorting step.
        """
        store = self.open()
        self.successResultOf(store.appendEvents([event(T0 + i) for i in range(50)]))
        cursor = self.successResultOf(store.queryEvents(limit=1)).cursor
        statements = []
        store._conn.set_trace_callback(statements.append)
        self.successResultOf(store.eventsForMessage("Q1"))
        for kw in [
            {},
            {"type": "opened"},
            {"queue_id": "Q1"},
            {"recipient": "a@Example.com"},
            {"tag": "t"},
            {"since": T0, "until": T0 + 10},
        ]:
            self.successResultOf(store.queryEvents(**kw))
            self.successResultOf(store.queryEvents(cursor=cursor, **kw))
        store._conn.set_trace_callback(None)
        self.assertEqual(len(statements), 13)
        for sql in statements:
            plan = " / ".join(
                row[-1] for row in store._conn.execute("EXPLAIN QUERY PLAN " + sql)
            )
            self.assertIn("USING INDEX", plan, sql)
            self.assertNotIn("TEMP B-TREE", plan, sql)

    def test_reopenKeepsData(self):
        """
        Events survive closing the store and opening the file again.
        """
        store = SQLiteStore(self.path, synchronous)
        self.successResultOf(store.start())
        events = [event(T0 + i, metadata={"i": i}) for i in range(5)]
        self.successResultOf(store.appendEvents(events))
        self.successResultOf(store.close())

        again = self.open()
        self.assertEqual(self.successResultOf(again.queryEvents()).events, events)

    def test_migrationsRunOnce(self):
        """
        Each schema version is applied and recorded once, however often the
        store is opened.
        """
        for _ in range(3):
            store = SQLiteStore(self.path, synchronous)
            self.successResultOf(store.start())
            self.successResultOf(store.close())
        self.assertEqual(
            self.peek("SELECT version FROM schema_version"),
            [(v,) for v in range(1, SCHEMA_VERSION + 1)],
        )

    def test_newerSchemaRefused(self):
        """
        A database from a newer schema version fails C{start} with
        L{UnsupportedSchema} and is left unchanged.
        """
        self.successResultOf(self.open().close())
        conn = sqlite3.connect(self.path)
        conn.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION + 1,))
        conn.commit()
        conn.close()
        store = SQLiteStore(self.path, synchronous)
        self.failureResultOf(store.start(), UnsupportedSchema)
        self.assertEqual(
            self.peek("SELECT MAX(version) FROM schema_version"),
            [(SCHEMA_VERSION + 1,)],
        )

    def test_notADatabase(self):
        """
        Opening a file that is not an SQLite database fails C{start} with
        the SQLite error.
        """
        with open(self.path, "wb") as f:
            f.write(b"this is not a database" * 100)
        store = SQLiteStore(self.path, synchronous)
        self.failureResultOf(store.start(), sqlite3.DatabaseError)

    def test_missingDirectory(self):
        """
        A path in a missing directory fails C{start} with the SQLite error.
        """
        store = SQLiteStore(os.path.join(self.path, "nope", "events.db"), synchronous)
        self.failureResultOf(store.start(), sqlite3.OperationalError)
        self.failureResultOf(store.queryEvents(), StoreClosed)

    def test_useBeforeStart(self):
        """
        Operations before C{start} fail with L{StoreClosed}; closing an
        unstarted store succeeds.
        """
        store = SQLiteStore(self.path, synchronous)
        self.failureResultOf(store.appendEvents([event()]), StoreClosed)
        self.failureResultOf(store.eventsForMessage("Q1"), StoreClosed)
        self.failureResultOf(store.queryEvents(), StoreClosed)
        self.assertIsNone(self.successResultOf(store.close()))

    def test_failedBatchRolledBack(self):
        """
        When SQLite rejects an event half way through a batch, the events
        before it are rolled back and the store remains usable.
        """
        store = self.open()
        good = event(T0)
        unencodable = event(T0 + 1, queue_id="\ud800")  # lone surrogate
        self.failureResultOf(
            store.appendEvents([good, unencodable]), UnicodeEncodeError
        )
        self.assertEqual(self.peek("SELECT COUNT(*) FROM events"), [(0,)])
        self.assertFalse(store._conn.in_transaction)
        self.successResultOf(store.appendEvents([good]))
        self.assertEqual(self.successResultOf(store.queryEvents()).events, [good])

    def test_sqliteErrorsPropagate(self):
        """
        An SQLite error during a write reaches the caller as a failure.
        """
        store = self.open()
        conn = sqlite3.connect(self.path)
        conn.execute("DROP TABLE events")
        conn.commit()
        conn.close()
        self.failureResultOf(store.appendEvents([event()]), sqlite3.OperationalError)
        self.failureResultOf(store.queryEvents(), sqlite3.OperationalError)


@attrs.define
class TriggerRecordingReactor:
    """
    The real reactor for threads, with system event triggers recorded
    instead of registered.
    """

    reactor: object
    triggers: dict = attrs.field(factory=dict)
    _ids: object = attrs.field(factory=itertools.count)

    def callFromThread(self, f, *args, **kwargs):
        return self.reactor.callFromThread(f, *args, **kwargs)

    def addSystemEventTrigger(self, phase, eventType, f, *args, **kwargs):
        triggerID = next(self._ids)
        self.triggers[triggerID] = (phase, eventType, f)
        return triggerID

    def removeSystemEventTrigger(self, triggerID):
        del self.triggers[triggerID]


class SQLiteStoreThreadPoolTests(TestCase):
    """
    L{SQLiteStore.inThreadPool} runs the store in a real one-thread pool.
    """

    def setUp(self):
        from twisted.internet import reactor

        self.reactor = TriggerRecordingReactor(reactor)
        self.path = self.mktemp()
        self.store, self.pool = SQLiteStore.inThreadPool(self.path, self.reactor)
        self.addCleanup(self.store.close)

    @inlineCallbacks
    def test_roundTrip(self):
        """
        Events appended through the pool can be read back through it.
        """
        yield self.store.start()
        events = [event(T0 + i, metadata={"i": i}) for i in range(10)]
        yield self.store.appendEvents(events)
        page = yield self.store.queryEvents(limit=5)
        self.assertEqual(page.events, events[:5])
        self.assertEqual((yield self.store.eventsForMessage("Q1")), events)

    @inlineCallbacks
    def test_oneNamedThread(self):
        """
        The pool has exactly one thread, named after the store, and SQL runs
        there rather than on the reactor thread.
        """
        self.assertEqual((self.pool.min, self.pool.max), (1, 1))
        yield self.store.start()
        ran = set()
        self.store._conn.set_trace_callback(
            lambda sql: ran.add(threading.current_thread().name)
        )
        yield gatherResults(
            [self.store.appendEvents([event(T0 + i)]) for i in range(20)]
            + [self.store.queryEvents() for i in range(5)]
        )
        self.assertEqual(len(ran), 1)
        [name] = ran
        self.assertIn("smartrelay-sqlite", name)
        self.assertNotEqual(name, threading.current_thread().name)
        self.assertEqual(len(self.pool.threads), 1)

    @inlineCallbacks
    def test_callOrderKept(self):
        """
        Operations run in the order they were called: a query issued right
        after appends, without waiting for them, sees them all.
        """
        self.store.start()
        appends = [self.store.appendEvents([event(T0 + i)]) for i in range(50)]
        page = yield self.store.queryEvents(limit=1000)
        self.assertEqual(len(page.events), 50)
        yield gatherResults(appends)

    @inlineCallbacks
    def test_closeFinishesWritesAndStopsPool(self):
        """
        C{close} lets writes already called finish, then stops the pool and
        drops the shutdown trigger.
        """
        self.store.start()
        self.store.appendEvents([event(T0 + i) for i in range(100)])
        self.assertEqual(
            [(p, e) for (p, e, _) in self.reactor.triggers.values()],
            [("during", "shutdown")],
        )
        yield self.store.close()
        self.assertTrue(self.pool.joined)
        self.assertFalse(any(t.is_alive() for t in self.pool.threads))
        self.assertEqual(self.reactor.triggers, {})

        again = SQLiteStore(self.path, synchronous)
        self.successResultOf(again.start())
        self.addCleanup(again.close)
        page = self.successResultOf(again.queryEvents(limit=1000))
        self.assertEqual(len(page.events), 100)

    @inlineCallbacks
    def test_concurrentCloses(self):
        """
        A second C{close} while the first is in progress fires once the
        store is closed; a third after that fires at once.
        """
        yield self.store.start()
        first = self.store.close()
        second = self.store.close()
        yield gatherResults([first, second])
        self.assertTrue(self.pool.joined)
        self.assertIsNone(self.successResultOf(self.store.close()))

    @inlineCallbacks
    def test_useAfterCloseFailsAtOnce(self):
        """
        After C{close} operations fail with L{StoreClosed} instead of
        waiting on the stopped pool forever.
        """
        yield self.store.start()
        yield self.store.close()
        self.failureResultOf(self.store.queryEvents(), StoreClosed)
        self.failureResultOf(self.store.appendEvents([event()]), StoreClosed)

    @inlineCallbacks
    def test_shutdownStopsUnclosedPool(self):
        """
        If the reactor shuts down while the store is still open, the
        shutdown trigger stops the pool so its thread cannot keep the
        process alive.
        """
        yield self.store.start()
        [(phase, eventType, trigger)] = self.reactor.triggers.values()
        trigger()
        self.assertTrue(self.pool.joined)
        self.assertFalse(any(t.is_alive() for t in self.pool.threads))
