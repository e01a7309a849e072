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
    SUPPRESSION_REASONS,
    EventPage,
    IEventStreams,
    InvalidCursor,
    IStore,
    OutboxBatch,
    Statistics,
    StatisticsBucket,
    StoreClosed,
    SuppressionEntry,
    TokenResult,
    encodeCursor,
)
from smartrelay.store.memory import MemoryStore
from smartrelay.store.sqlite import (
    _INSERT,
    MIGRATIONS,
    SCHEMA_VERSION,
    SQLiteStore,
    UnsupportedSchema,
    _toRow,
    _SEEN_ROWS,
)

T0 = 1_700_000_000.0
HOUR = 3600
DAY = 86400
# A UTC midnight.
DAY0 = 1_699_920_000


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


    # -- suppression list ------------------------------------------------

    def addEntry(self, address, reason="bounce", time=T0, **kw):
        """
        Add a suppression entry; return it.
        """
        entry = SuppressionEntry(address=address, reason=reason, time=time, **kw)
        self.assertIsNone(self.successResultOf(self.store.addSuppression(entry)))
        return entry

    def check(self, addresses, now=T0):
        return self.successResultOf(self.store.checkSuppressions(addresses, now))

    def listing(self, **kw):
        return self.successResultOf(self.store.listSuppressions(**kw))

    def listAll(self, **kw):
        """
        Follow suppression cursors to the end; return the list of pages.
        """
        pages = [self.listing(**kw)]
        while pages[-1].cursor is not None:
            pages.append(self.listing(cursor=pages[-1].cursor, **kw))
        return pages

    def test_suppressionEntryNormalisesAddress(self):
        """
        A L{SuppressionEntry} lower-cases the domain of its address and
        keeps the local part as given.
        """
        entry = SuppressionEntry(
            address="Alice.Smith@Example.COM", reason="manual", time=T0
        )
        self.assertEqual(entry.address, "Alice.Smith@example.com")
        quoted = SuppressionEntry(address='"X@Y"@Example.NET', reason="manual", time=T0)
        self.assertEqual(quoted.address, '"X@Y"@example.net')

    def test_suppressionEntryBadValues(self):
        """
        A L{SuppressionEntry} with an unknown reason, a malformed address
        or a missing time cannot be made.
        """
        for reason in ["hardbounce", "Bounce", "", None]:
            self.assertRaises(
                ValueError, SuppressionEntry, address="a@b.c", reason=reason, time=T0
            )
        for address in ["", "nobody", "@example.com", "a@", "@", None, b"a@b.c"]:
            self.assertRaises(
                ValueError, SuppressionEntry, address=address, reason="manual", time=T0
            )
        for time in [None, float("nan"), "now"]:
            self.assertRaises(
                ValueError,
                SuppressionEntry,
                address="a@b.c",
                reason="manual",
                time=time,
            )
        self.assertEqual(
            sorted(SUPPRESSION_REASONS),
            ["bounce", "complaint", "manual", "unsubscribe"],
        )

    def test_addAndCheckSuppression(self):
        """
        A suppressed address is found by C{checkSuppressions}, keyed by the
        address as the caller gave it, with every field as added.
        """
        entry = self.addEntry(
            "José@Bücher.Example",
            reason="complaint",
            source_event="ev1",
            time=T0 + 0.125,
            expires=T0 + 1e6,
        )
        self.assertEqual(
            self.check(["José@bücher.EXAMPLE"]), {"José@bücher.EXAMPLE": entry}
        )

    def test_checkSuppressionCaseRules(self):
        """
        Checking ignores the case of the domain but not of the local part.
        """
        entry = self.addEntry("Bob@Example.com")
        self.assertEqual(
            self.check(["Bob@EXAMPLE.COM", "bob@example.com", "BOB@example.com"]),
            {"Bob@EXAMPLE.COM": entry},
        )

    def test_checkManyAddressesInOneCall(self):
        """
        One C{checkSuppressions} call answers for a whole list of
        recipients: the suppressed ones are in the answer, the others are
        not; an empty list gets an empty answer.
        """
        entries = {
            f"u{i}@example.com": self.addEntry(f"u{i}@example.com", time=T0 + i)
            for i in range(0, 1200, 3)
        }
        addresses = [f"u{i}@example.com" for i in range(1200)]
        self.assertEqual(self.check(addresses), entries)
        self.assertEqual(self.check([]), {})
        self.assertEqual(
            self.check(["u3@example.com", "u3@Example.com", "u3@example.com"]),
            {
                "u3@example.com": entries["u3@example.com"],
                "u3@Example.com": entries["u3@example.com"],
            },
        )

    def test_suppressionUpsertNewerWins(self):
        """
        Adding an address again replaces its entry when the new entry's time
        is the same or later, and is ignored when it is older.
        """
        self.addEntry("a@example.com", reason="bounce", time=T0)
        newer = self.addEntry("a@EXAMPLE.com", reason="complaint", time=T0 + 5)
        self.assertEqual(self.check(["a@example.com"]), {"a@example.com": newer})
        self.addEntry("a@example.com", reason="manual", time=T0 + 1)
        self.assertEqual(self.check(["a@example.com"]), {"a@example.com": newer})
        same = self.addEntry("a@example.com", reason="unsubscribe", time=T0 + 5)
        self.assertEqual(self.check(["a@example.com"]), {"a@example.com": same})
        self.assertEqual(self.listing().entries, [same])

    def test_suppressionExpiry(self):
        """
        An entry suppresses until just before its C{expires} time; expired
        entries are still listed, and a later add without expiry suppresses
        again.
        """
        entry = self.addEntry("a@example.com", expires=T0 + 10)
        forever = self.addEntry("b@example.com")
        both = ["a@example.com", "b@example.com"]
        self.assertEqual(self.check(both, now=T0 + 9.5), {
            "a@example.com": entry, "b@example.com": forever,
        })
        self.assertEqual(self.check(both, now=T0 + 10), {"b@example.com": forever})
        self.assertEqual(self.check(both, now=T0 + 1e9), {"b@example.com": forever})
        self.assertEqual(self.listing().entries, [entry, forever])
        again = self.addEntry("a@example.com", reason="manual", time=T0 + 20)
        self.assertEqual(self.check(["a@example.com"], now=T0 + 30), {
            "a@example.com": again,
        })

    def test_removeSuppression(self):
        """
        C{removeSuppression} reports whether the address was listed
        (matching the domain case-insensitively) and removes it.
        """
        self.addEntry("a@example.com")
        self.addEntry("b@example.com", expires=T0 - 1)
        def remove(address):
            return self.successResultOf(self.store.removeSuppression(address))

        self.assertTrue(remove("a@EXAMPLE.com"))
        self.assertFalse(remove("a@example.com"))
        self.assertFalse(remove("B@example.com"))
        self.assertTrue(remove("b@example.com"))
        self.assertEqual(self.check(["a@example.com", "b@example.com"]), {})
        self.assertEqual(self.listing().entries, [])

    def test_suppressionBadInput(self):
        """
        Malformed addresses, a bare string instead of a list, a missing
        C{now} or something other than an entry fail with L{ValueError}
        (L{TypeError} for the entry).
        """
        self.addEntry("a@example.com")
        for bad in ["nobody", "@example.com", "a@", None]:
            self.failureResultOf(self.store.removeSuppression(bad), ValueError)
            self.failureResultOf(
                self.store.checkSuppressions(["a@example.com", bad], T0), ValueError
            )
        self.failureResultOf(
            self.store.checkSuppressions("a@example.com", T0), ValueError
        )
        self.failureResultOf(
            self.store.checkSuppressions(["a@example.com"], None), ValueError
        )
        self.failureResultOf(
            self.store.checkSuppressions(["a@example.com"], "now"), ValueError
        )
        self.failureResultOf(self.store.addSuppression("a@example.com"), TypeError)

    def test_listSuppressionsPaginated(self):
        """
        Following cursors lists every entry once, ordered by address; a
        last page that is exactly full has no cursor.
        """
        entries = [
            self.addEntry(f"user{i:02d}@example.com", time=T0 + i) for i in range(25)
        ]
        self.addEntry("late@example.com", time=T0)
        expected = sorted(entries + [self.listing(prefix="late").entries[0]],
                          key=lambda e: e.address)
        pages = self.listAll(limit=10)
        self.assertEqual([len(p.entries) for p in pages], [10, 10, 6])
        self.assertEqual([e for p in pages for e in p.entries], expected)
        for page in pages[:-1]:
            self.assertRegex(page.cursor, r"\A[A-Za-z0-9_-]+\Z")
        self.assertEqual(
            [len(p.entries) for p in self.listAll(limit=13)], [13, 13]
        )
        self.assertEqual(self.listing(limit=1000).entries, expected)

    def test_listSuppressionsPrefix(self):
        """
        C{prefix} selects the addresses that start with it, compared with
        the normalised address; it combines with C{reason} and cursors.
        """
        for address, reason in [
            ("ann@example.com", "bounce"),
            ("Anna@example.com", "bounce"),
            ("anna@example.com", "complaint"),
            ("anna@Example.ORG", "bounce"),
            ("annabel@example.com", "manual"),
            ("bob@example.com", "bounce"),
        ]:
            self.addEntry(address, reason=reason)

        def addresses(**kw):
            return [e.address for p in self.listAll(**kw) for e in p.entries]

        self.assertEqual(
            addresses(prefix="ann"),
            ["ann@example.com", "anna@example.com", "anna@example.org",
             "annabel@example.com"],
        )
        self.assertEqual(addresses(prefix="Ann"), ["Anna@example.com"])
        self.assertEqual(
            addresses(prefix="anna@EXAMPLE."), ["anna@example.com", "anna@example.org"]
        )
        self.assertEqual(addresses(prefix="anna@example.org"), ["anna@example.org"])
        self.assertEqual(addresses(prefix="zed"), [])
        self.assertEqual(
            addresses(prefix="ann", reason="bounce", limit=1),
            ["ann@example.com", "anna@example.org"],
        )
        self.assertEqual(addresses(reason="complaint"), ["anna@example.com"])
        self.assertEqual(addresses(reason="unsubscribe"), [])
        self.assertEqual(len(addresses(prefix="")), 6)

    def test_listSuppressionsPrefixEdgeCharacters(self):
        """
        Prefix search works with non-ASCII and the highest code points.
        """
        names = ["z\U0010ffff@x.org", "z\U0010ffffa@x.org", "z\ud7ff@x.org",
                 "z\ue000@x.org", "zé@x.org", "zz@x.org"]
        for name in names:
            self.addEntry(name)
        for prefix in ["z", "z\U0010ffff", "z\ud7ff", "zé", "z\ue000", "\U0010ffff"]:
            self.assertEqual(
                [e.address for e in self.listing(prefix=prefix).entries],
                sorted(n for n in names if n.startswith(prefix)),
                repr(prefix),
            )

    def test_suppressionCursorSurvivesRemoval(self):
        """
        A cursor still works after the entry it points after is removed,
        and entries added before it are not revisited.
        """
        for i in range(6):
            self.addEntry(f"u{i}@example.com")
        page1 = self.listing(limit=3)
        self.successResultOf(self.store.removeSuppression("u2@example.com"))
        self.addEntry("a@example.com")
        self.addEntry("u2a@example.com")
        page2 = self.listing(limit=3, cursor=page1.cursor)
        self.assertEqual(
            [e.address for e in page2.entries],
            ["u2a@example.com", "u3@example.com", "u4@example.com"],
        )

    def test_listSuppressionsBadArguments(self):
        """
        A bad reason or limit fails with L{ValueError}; a cursor the store
        did not hand out (including an event cursor) with L{InvalidCursor}.
        """
        self.addEntry("a@example.com")
        self.addEntry("b@example.com")
        for limit in [0, 1001, 2.5, "10", None, True]:
            self.failureResultOf(self.store.listSuppressions(limit=limit), ValueError)
        for reason in ["bogus", "Bounce", 3]:
            self.failureResultOf(self.store.listSuppressions(reason=reason), ValueError)
        self.failureResultOf(self.store.listSuppressions(prefix=3), ValueError)
        valid = self.listing(limit=1).cursor
        for cursor in ["", "!!", "A", valid + "=", valid[:-1] + "%", 12, b"x",
                       encodeCursor(T0, 1), "AAAA"]:
            self.failureResultOf(
                self.store.listSuppressions(cursor=cursor), InvalidCursor
            )
        self.failureResultOf(self.store.queryEvents(cursor=valid), InvalidCursor)

    # -- statistics ------------------------------------------------------

    def stats(self, **kw):
        kw.setdefault("since", DAY0)
        kw.setdefault("until", DAY0 + 10 * DAY)
        return self.successResultOf(self.store.statistics(**kw))

    def statsSample(self):
        """
        Append events over two days and three hours with two tags and two
        domains.
        """
        self.append(
            event(DAY0 + 10, "accepted", "Q1", "a@example.com", tag="welcome"),
            event(DAY0 + 20, "delivered", "Q1", "a@example.com", tag="welcome"),
            event(DAY0 + 30, "accepted", "Q2", "b@Example.ORG", tag="invoice"),
            event(DAY0 + 40, "bounced", "Q2", "b@example.org", tag="invoice",
                  detail={"kind": "hard", "reason": "userunknown"}),
        )
        self.append(
            event(DAY0 + HOUR + 1, "opened", "Q1", "a@example.com", tag="welcome"),
            event(DAY0 + HOUR + 2, "accepted", "Q3", "c@example.com"),
            event(DAY0 + HOUR + 3, "deferred", "Q3", "c@example.com",
                  detail={"kind": "soft"}),
            event(DAY0 + DAY + 5, "delivered", "Q3", "c@example.com"),
            event(DAY0 + DAY + 6, "opened", "Q3", "c@EXAMPLE.com"),
            event(DAY0 + DAY + 7, "rejected", None, None),
        )

    def test_statisticsByHour(self):
        """
        Hourly statistics have one bucket per UTC hour with events, counts
        per type, and totals.
        """
        self.statsSample()
        stats = self.stats(interval="hour")
        self.assertEqual(
            [(b.start, b.counts) for b in stats.buckets],
            [
                (DAY0, {"accepted": 2, "bounced": 1, "delivered": 1}),
                (DAY0 + HOUR, {"accepted": 1, "deferred": 1, "opened": 1}),
                (DAY0 + DAY, {"delivered": 1, "opened": 1, "rejected": 1}),
            ],
        )
        self.assertEqual(
            [(b.hard_bounces, b.soft_bounces, b.unique_opens) for b in stats.buckets],
            [(1, 0, 0), (0, 0, 1), (0, 0, 1)],
        )
        self.assertEqual(
            stats.totals,
            {"accepted": 3, "bounced": 1, "deferred": 1, "delivered": 2,
             "opened": 2, "rejected": 1},
        )
        self.assertEqual((stats.interval, stats.since, stats.until),
                         ("hour", DAY0, DAY0 + 10 * DAY))
        self.assertIsInstance(stats, Statistics)
        self.assertIsInstance(stats.buckets[0], StatisticsBucket)

    def test_statisticsByDay(self):
        """
        Daily statistics have one bucket per UTC day with events.
        """
        self.statsSample()
        stats = self.stats(interval="day")
        self.assertEqual(
            [(b.start, b.counts) for b in stats.buckets],
            [
                (DAY0, {"accepted": 3, "bounced": 1, "deferred": 1,
                        "delivered": 1, "opened": 1}),
                (DAY0 + DAY, {"delivered": 1, "opened": 1, "rejected": 1}),
            ],
        )
        self.assertEqual(stats.totals, self.stats(interval="hour").totals)

    def test_statisticsRange(self):
        """
        The first bucket is the one holding C{since}; buckets starting at or
        after C{until} are left out.
        """
        self.statsSample()
        stats = self.stats(since=DAY0 + HOUR - 1, until=DAY0 + DAY)
        self.assertEqual([b.start for b in stats.buckets], [DAY0, DAY0 + HOUR])
        stats = self.stats(since=DAY0 + HOUR + 0.5, until=DAY0 + DAY + 0.5)
        self.assertEqual([b.start for b in stats.buckets], [DAY0 + HOUR, DAY0 + DAY])
        stats = self.stats(since=DAY0 + 1, until=DAY0 + DAY, interval="day")
        self.assertEqual([b.start for b in stats.buckets], [DAY0])
        self.assertEqual(self.stats(since=DAY0 + DAY, until=DAY0).buckets, [])

    def test_statisticsByTagAndDomain(self):
        """
        C{tag} and C{domain} (case-insensitive) restrict the counts to
        events with that tag, to that recipient domain, or both.
        """
        self.statsSample()
        self.assertEqual(
            self.stats(tag="welcome").totals,
            {"accepted": 1, "delivered": 1, "opened": 1},
        )
        self.assertEqual(
            self.stats(domain="EXAMPLE.org").totals, {"accepted": 1, "bounced": 1}
        )
        self.assertEqual(self.stats(domain="example.org").hard_bounces, 1)
        self.assertEqual(
            self.stats(domain="example.com", interval="day").totals,
            {"accepted": 2, "deferred": 1, "delivered": 2, "opened": 2},
        )
        self.assertEqual(
            self.stats(tag="welcome", domain="Example.com").totals,
            {"accepted": 1, "delivered": 1, "opened": 1},
        )
        self.assertEqual(self.stats(tag="welcome", domain="example.org").totals, {})
        self.assertEqual(self.stats(tag="Welcome").buckets, [])
        self.assertEqual(self.stats(domain="nowhere.example").totals, {})

    def test_statisticsRates(self):
        """
        Delivery, bounce, complaint and unique open / click rates are
        computed from the counts; a recipient opening or clicking twice
        counts once, in separate batches too.
        """
        delivered = [
            event(DAY0 + i, "delivered", f"Q{i}", f"r{i}@example.com") for i in range(8)
        ]
        self.append(*delivered)
        self.append(
            event(DAY0 + 10, "bounced", "QB1", "x@ex.com", detail={"kind": "hard"}),
            event(DAY0 + 11, "bounced", "QB2", "y@ex.com", detail={"kind": "soft"}),
            event(DAY0 + 12, "bounced", "QB3", "z@example.com", detail={}),
            event(DAY0 + 13, "expired", "QE", "w@example.com"),
            event(DAY0 + 14, "complained", "Q0", "r0@example.com"),
            event(DAY0 + 20, "opened", "Q0", "r0@example.com"),
            event(DAY0 + 21, "opened", "Q0", "r0@example.com"),
            event(DAY0 + 22, "opened", "Q1", "r1@example.com"),
        )
        self.append(
            event(DAY0 + HOUR, "opened", "Q0", "r0@EXAMPLE.com"),
            event(DAY0 + HOUR, "opened", "Q2", "r2@example.com"),
            event(DAY0 + HOUR, "opened", "Q9", "r0@example.com"),
            event(DAY0 + HOUR, "clicked", "Q0", "r0@example.com"),
            event(DAY0 + HOUR, "clicked", "Q0", "r0@example.com"),
        )
        stats = self.stats()
        self.assertEqual(stats.totals["opened"], 6)
        self.assertEqual(stats.totals["clicked"], 2)
        self.assertEqual(
            (stats.hard_bounces, stats.soft_bounces, stats.unique_opens,
             stats.unique_clicks),
            (1, 1, 4, 1),
        )
        self.assertEqual([b.unique_opens for b in stats.buckets], [2, 2])
        self.assertEqual(stats.delivery_rate, 8 / 12)
        self.assertEqual(stats.hard_bounce_rate, 1 / 12)
        self.assertEqual(stats.soft_bounce_rate, 1 / 12)
        self.assertEqual(stats.complaint_rate, 1 / 8)
        self.assertEqual(stats.unique_open_rate, 4 / 8)
        self.assertEqual(stats.unique_click_rate, 1 / 8)
        # A range without the first opens: the later repeats do not count.
        later = self.stats(since=DAY0 + HOUR)
        self.assertEqual((later.unique_opens, later.totals["opened"]), (2, 3))
        self.assertIsNone(later.delivery_rate)

    def test_statisticsZeroDenominators(self):
        """
        With nothing to divide by, every rate is L{None}.
        """
        stats = self.stats()
        self.assertEqual((stats.buckets, stats.totals), ([], {}))
        for rate in [stats.delivery_rate, stats.hard_bounce_rate,
                     stats.soft_bounce_rate, stats.complaint_rate,
                     stats.unique_open_rate, stats.unique_click_rate]:
            self.assertIsNone(rate)
        self.append(event(DAY0, "bounced", detail={"kind": "hard"}),
                    event(DAY0, "opened"))
        stats = self.stats()
        self.assertEqual((stats.delivery_rate, stats.hard_bounce_rate), (0.0, 1.0))
        self.assertIsNone(stats.unique_open_rate)
        self.assertIsNone(stats.complaint_rate)

    def test_statisticsFailedBatchNotCounted(self):
        """
        A batch that fails to append bumps no counter.
        """
        good = event(DAY0, "opened")
        bad = event(DAY0 + 1, metadata={"x": object()})
        self.failureResultOf(self.store.appendEvents([good, bad]), TypeError)
        self.assertEqual(self.stats().totals, {})
        self.append(good)
        self.assertEqual(self.stats().unique_opens, 1)

    def test_statisticsBadArguments(self):
        """
        A bad interval, a missing or non-numeric bound, or a non-string tag
        or domain fails with L{ValueError}.
        """
        for kw in [
            {"interval": "week"},
            {"interval": "Hour"},
            {"interval": None},
            {"since": None},
            {"until": None},
            {"since": "yesterday"},
            {"until": float("nan")},
            {"since": float("-inf")},
            {"tag": 3},
            {"domain": b"example.com"},
        ]:
            args = {"since": DAY0, "until": DAY0 + DAY, **kw}
            self.failureResultOf(self.store.statistics(**args), ValueError)

    @settings(suppress_health_check=[HealthCheck.differing_executors])
    @given(
        st.lists(
            st.tuples(
                st.floats(0, 3 * DAY),
                st.sampled_from(["delivered", "opened", "clicked", "bounced"]),
                st.sampled_from(["a@x.org", "B@X.org", "c@y.org"]),
                st.sampled_from(["Q1", "Q2"]),
            ),
            max_size=30,
        ),
        st.sampled_from(["hour", "day"]),
    )
    def test_statisticsMatchEventsProperty(self, rows, interval):
        """
        Counters agree with counting the stored events directly, per bucket
        and for unique opens.
        """
        tag = f"prop{next(self._counter)}"
        events = [
            event(DAY0 + t, type, tag + queue_id, recipient, tag=tag)
            for t, type, recipient, queue_id in rows
        ]
        if events:
            self.append(*events)
        size = {"hour": HOUR, "day": DAY}[interval]
        stats = self.stats(tag=tag, interval=interval)
        expected = {}
        for e in events:
            start = int(e.time // size * size)
            counts = expected.setdefault(start, {})
            counts[e.type] = counts.get(e.type, 0) + 1
        self.assertEqual(
            [(b.start, b.counts) for b in stats.buckets], sorted(expected.items())
        )
        uniques = {
            (e.queue_id, e.recipient.lower()) for e in events if e.type == "opened"
        }
        self.assertEqual(stats.unique_opens, len(uniques))

    # -- token buckets ---------------------------------------------------

    def take(self, key="k", rate=1.0, burst=3.0, now=T0, count=1):
        return self.successResultOf(
            self.store.takeTokens(key, rate, burst, now, count)
        )

    def test_tokenBucketStartsFull(self):
        """
        A new bucket allows C{burst} takes at once, then refuses, saying
        how long until a token is back.
        """
        self.assertEqual(
            [self.take() for _ in range(4)],
            [
                TokenResult(True, 2.0, 0.0),
                TokenResult(True, 1.0, 0.0),
                TokenResult(True, 0.0, 0.0),
                TokenResult(False, 0.0, 1.0),
            ],
        )

    def test_tokenBucketRefills(self):
        """
        Tokens come back at C{rate} per second, counted from the last take.
        """
        for _ in range(3):
            self.take(rate=2.0)
        self.assertEqual(self.take(rate=2.0, now=T0 + 0.25),
                         TokenResult(False, 0.5, 0.25))
        self.assertEqual(self.take(rate=2.0, now=T0 + 0.5), TokenResult(True, 0.0, 0.0))
        self.assertEqual(self.take(rate=2.0, now=T0 + 0.5),
                         TokenResult(False, 0.0, 0.5))
        self.assertEqual(self.take(rate=2.0, now=T0 + 1.5),
                         TokenResult(True, 1.0, 0.0))

    def test_tokenBucketCappedAtBurst(self):
        """
        However long a bucket is idle it holds at most C{burst} tokens.
        """
        self.take(count=3)
        results = [self.take(now=T0 + 3600) for _ in range(4)]
        self.assertEqual([r.allowed for r in results], [True, True, True, False])
        self.assertEqual(results[0].remaining, 2.0)

    def test_tokenBucketCount(self):
        """
        Several (or fractional) tokens can be taken at once; a take that
        would overdraw takes nothing.
        """
        self.assertEqual(self.take(count=2.5), TokenResult(True, 0.5, 0.0))
        self.assertEqual(self.take(count=2, rate=0.5), TokenResult(False, 0.5, 3.0))
        self.assertEqual(self.take(count=0.5), TokenResult(True, 0.0, 0.0))

    def test_tokenBucketKeysIndependent(self):
        """
        Buckets with different keys do not share tokens.
        """
        self.take(key="a", count=3)
        self.assertFalse(self.take(key="a").allowed)
        self.assertTrue(self.take(key="b").allowed)
        self.assertTrue(self.take(key="A").allowed)

    def test_tokenBucketClockBackwards(self):
        """
        A C{now} before the bucket's last update refills nothing and is not
        an error; the wait counts up to the last update too.
        """
        self.take(count=3, now=T0 + 10)
        self.assertEqual(self.take(now=T0), TokenResult(False, 0.0, 11.0))
        self.assertEqual(self.take(now=T0 + 10.5), TokenResult(False, 0.5, 0.5))
        self.assertTrue(self.take(now=T0 + 11).allowed)

    def test_tokenBucketBurstShrinks(self):
        """
        Lowering a key's burst caps the tokens it holds.
        """
        self.take(burst=10)
        self.assertEqual(self.take(burst=2, now=T0 + 1), TokenResult(True, 1.0, 0.0))

    def test_tokenBucketBadArguments(self):
        """
        Non-positive or non-finite numbers, a count above the burst, or an
        empty key fail with L{ValueError}.
        """
        good = {"key": "k", "rate": 1.0, "burst": 3.0, "now": T0, "count": 1}
        for kw in [
            {"key": ""}, {"key": None}, {"key": 3},
            {"rate": 0}, {"rate": -1}, {"rate": float("inf")}, {"rate": "1"},
            {"burst": 0}, {"burst": float("nan")}, {"burst": True},
            {"now": None}, {"now": float("nan")}, {"now": float("inf")}, {"now": "x"},
            {"count": 0}, {"count": -1}, {"count": 4},
        ]:
            args = {**good, **kw}
            self.failureResultOf(
                self.store.takeTokens(
                    args["key"], args["rate"], args["burst"], args["now"], args["count"]
                ),
                ValueError,
            )

    @settings(suppress_health_check=[HealthCheck.differing_executors])
    @given(
        rate=st.floats(0.01, 100),
        burst=st.floats(1, 50),
        steps=st.lists(
            st.tuples(st.floats(0, 5), st.floats(0.01, 1)), min_size=1, max_size=40
        ),
    )
    def test_tokenBucketNeverExceedsProperty(self, rate, burst, steps):
        """
        Over any sequence of takes a bucket allows at most C{burst} plus
        C{rate} times the elapsed time, and refuses only when it has fewer
        tokens than asked for.
        """
        key = f"prop{next(self._counter)}"
        now = T0
        taken = 0.0
        for dt, fraction in steps:
            now += dt
            count = max(fraction * burst, 1e-9)
            result = self.take(key=key, rate=rate, burst=burst, now=now, count=count)
            if result.allowed:
                taken += count
                self.assertEqual(result.retry_after, 0.0)
            else:
                self.assertLess(result.remaining, count)
                self.assertGreater(result.retry_after, 0)
            self.assertGreaterEqual(result.remaining, -1e-9)
            self.assertLessEqual(result.remaining, burst)
        limit = burst + rate * (now - T0)
        self.assertLessEqual(taken, limit * (1 + 1e-9) + 1e-9)

    # -- retention pruning -----------------------------------------------

    def prune(self, before, limit=10000):
        return self.successResultOf(self.store.pruneEvents(before, limit))

    def everyQueryPath(self):
        """
        What every query path answers for the events of L{sample}.
        """
        return {
            "all": [e for page in self.queryAll(limit=2) for e in page.events],
            "since": self.query(since=T0).events,
            "Q1": self.query(queue_id="Q1").events,
            "Q2": self.query(queue_id="Q2").events,
            "message Q1": self.forMessage("Q1"),
            "message Q2": self.forMessage("Q2"),
            "message Q3": self.forMessage("Q3"),
            "recipient a": self.query(recipient="a@EXAMPLE.com").events,
            "recipient b": self.query(recipient="b@example.org").events,
            "tag welcome": self.query(tag="welcome").events,
            "tag invoice": self.query(tag="invoice").events,
            "type accepted": self.query(type="accepted").events,
            "type bounced": self.query(type="bounced").events,
            "combined": self.query(
                type="accepted", queue_id="Q2", recipient="b@example.org",
                tag="invoice",
            ).events,
        }

    def test_pruneRemovesOlderEventsEverywhere(self):
        """
        C{pruneEvents} deletes exactly the events older than C{before} from
        every query path and answers how many it deleted; newer events
        stay, in order.
        """
        events = self.sample()
        full = self.everyQueryPath()
        self.assertEqual(self.prune(T0 + 4), 3)
        pruned = self.everyQueryPath()
        for path, found in full.items():
            self.assertEqual(
                pruned[path], [e for e in found if e.time >= T0 + 4], path
            )
            for e in pruned[path]:
                self.assertIn(e, events[3:])
        self.assertEqual(self.query().events, events[3:])
        self.assertEqual(self.forMessage("Q1"), [events[4]])
        self.assertEqual(self.query(tag="invoice").events, [events[3]])
        self.assertEqual(self.query(type="accepted").events, [events[5]])
        self.assertEqual(self.prune(T0 + 4), 0)

    def test_pruneBoundaryExclusive(self):
        """
        An event exactly at C{before} is kept.
        """
        events = [event(T0 - 1), event(T0), event(T0 + 1)]
        self.append(*events)
        self.assertEqual(self.prune(T0), 1)
        self.assertEqual(self.query().events, events[1:])

    def test_pruneLimit(self):
        """
        One call deletes at most C{limit} events, oldest first (insertion
        order among equal times); repeated calls finish the job and then
        answer 0.
        """
        events = [
            event(T0 + i // 2, "delivered", f"Q{i % 3}", f"r{i % 2}@example.com",
                  tag=f"t{i % 2}")
            for i in range(11)
        ]
        self.append(*events[:6])
        self.append(*events[6:])
        self.assertEqual(self.prune(T0 + 4, limit=3), 3)
        self.assertEqual(self.query().events, events[3:])
        self.assertEqual(self.prune(T0 + 4, limit=3), 3)
        self.assertEqual(self.query().events, events[6:])
        self.assertEqual(self.prune(T0 + 4, limit=3), 2)
        self.assertEqual(self.prune(T0 + 4, limit=3), 0)
        self.assertEqual(self.query().events, events[8:])
        for i in range(3):
            self.assertEqual(
                self.forMessage(f"Q{i}"),
                [e for e in events[8:] if e.queue_id == f"Q{i}"],
            )
        for i in range(2):
            self.assertEqual(
                self.query(tag=f"t{i}").events,
                [e for e in events[8:] if e.tag == f"t{i}"],
            )
            self.assertEqual(
                self.query(recipient=f"r{i}@example.com").events,
                [e for e in events[8:] if e.recipient == f"r{i}@example.com"],
            )
        self.assertEqual(self.query(type="delivered").events, events[8:])

    def test_pruneKeepsStatistics(self):
        """
        Pruning deletes no statistics: every counter, unique opens and
        clicks included, reads as before.
        """
        self.statsSample()
        before = {
            (interval, tag, domain): self.stats(
                interval=interval, tag=tag, domain=domain
            )
            for interval in ["hour", "day"]
            for tag in [None, "welcome", "invoice"]
            for domain in [None, "example.com", "example.org"]
        }
        while self.prune(DAY0 + 10 * DAY, limit=2):
            pass
        self.assertEqual(self.query().events, [])
        for (interval, tag, domain), stats in before.items():
            self.assertEqual(
                self.stats(interval=interval, tag=tag, domain=domain), stats
            )

    def test_pruneUniqueRecords(self):
        """
        The records of pairs already counted as unique opens or clicks
        before C{before} are pruned too (counted in the answer, after the
        events): an open of such a pair afterwards counts as unique again,
        while the records of later first opens stay.
        """
        self.append(
            event(DAY0, "opened", "Q1", "a@example.com"),
            event(DAY0 + 1, "clicked", "Q1", "a@example.com"),
            event(DAY0 + 2, "opened", "Q1", "a@example.com"),
            event(DAY0 + 10, "opened", "Q2", "a@example.com"),
        )
        self.assertEqual(self.stats().unique_opens, 2)
        # Three events, then the open and click records of Q1.
        self.assertEqual(self.prune(DAY0 + 5, limit=4), 4)
        self.assertEqual(self.prune(DAY0 + 5, limit=4), 1)
        self.assertEqual(self.prune(DAY0 + 5, limit=4), 0)
        stats = self.stats()
        self.assertEqual((stats.unique_opens, stats.unique_clicks), (2, 1))
        self.append(
            event(DAY0 + 20, "opened", "Q1", "a@example.com"),
            event(DAY0 + 21, "clicked", "Q1", "A@Example.com"),
            event(DAY0 + 22, "opened", "Q2", "a@EXAMPLE.com"),
        )
        stats = self.stats()
        self.assertEqual((stats.unique_opens, stats.unique_clicks), (3, 2))
        self.assertEqual(stats.totals, {"clicked": 2, "opened": 5})

    def test_pruneEmpty(self):
        """
        Pruning a store without old events deletes nothing and answers 0.
        """
        self.assertEqual(self.prune(T0), 0)
        self.sample()
        self.assertEqual(self.prune(T0), 0)
        self.assertEqual(len(self.query().events), 6)

    def test_pruneThenAppendAndPage(self):
        """
        After pruning, new events are stored and paged through as usual,
        and a cursor handed out before the prune still continues.
        """
        events = self.sample()
        page = self.query(limit=4)
        self.assertEqual(self.prune(T0 + 3), 2)
        later = [event(T0 + 7, "delivered", "Q3"), event(T0 + 8, "opened", "Q3")]
        self.append(*later)
        self.assertEqual(
            self.query(cursor=page.cursor).events, events[4:] + later
        )
        self.assertEqual(
            [e for p in self.queryAll(limit=1) for e in p.events],
            events[2:] + later,
        )
        self.assertEqual(self.forMessage("Q3"), [events[5]] + later)

    def test_pruneBadArguments(self):
        """
        A C{before} that is not a finite number, or a C{limit} that is not
        an integer from 1 to 100000, fails with L{ValueError} and deletes
        nothing.
        """
        self.sample()
        for before, limit in [
            (None, 10), ("1", 10), (True, 10), (float("nan"), 10),
            (float("inf"), 10), (float("-inf"), 10), (10**400, 10),
            (T0 + 10, 0), (T0 + 10, -1), (T0 + 10, 100001), (T0 + 10, 1.5),
            (T0 + 10, True), (T0 + 10, "5"), (T0 + 10, None),
        ]:
            self.failureResultOf(self.store.pruneEvents(before, limit), ValueError)
        self.assertEqual(len(self.query().events), 6)
        # Six events and the unique open record of Q1.
        self.assertEqual(self.prune(T0 + 10, limit=100000), 7)
        self.assertEqual(self.prune(0), 0)

    def test_pruneAfterClose(self):
        """
        C{pruneEvents} fails with L{StoreClosed} on a closed store.
        """
        self.successResultOf(self.store.close())
        self.failureResultOf(self.store.pruneEvents(T0), StoreClosed)

    def test_newMethodsAfterClose(self):
        """
        The suppression, statistics and token bucket operations fail with
        L{StoreClosed} on a closed store.
        """
        self.successResultOf(self.store.close())
        entry = SuppressionEntry(address="a@b.c", reason="manual", time=T0)
        self.failureResultOf(self.store.addSuppression(entry), StoreClosed)
        self.failureResultOf(self.store.removeSuppression("a@b.c"), StoreClosed)
        self.failureResultOf(self.store.checkSuppressions(["a@b.c"], T0), StoreClosed)
        self.failureResultOf(self.store.listSuppressions(), StoreClosed)
        self.failureResultOf(
            self.store.statistics(since=T0, until=T0 + 1), StoreClosed
        )
        self.failureResultOf(self.store.takeTokens("k", 1, 1, T0), StoreClosed)

    # -- event streams and outboxes (IEventStreams; issue 16) -------------

    def claim(self, stream="export", owner="n1", now=T0, **kw):
        return self.successResultOf(self.store.claimEvents(stream, owner, now, **kw))

    def claimed(self, claim, limit=1000):
        """
        Every event of C{claim}, following the cursors; and the pages.
        """
        pages = [self.successResultOf(self.store.claimedEvents(claim, limit=limit))]
        while pages[-1].cursor is not None:
            pages.append(
                self.successResultOf(
                    self.store.claimedEvents(claim, cursor=pages[-1].cursor, limit=limit)
                )
            )
        return [e for page in pages for e in page.events], pages

    def test_streamsInterface(self):
        """
        The store provides L{IEventStreams}.
        """
        self.assertTrue(verifyObject(IEventStreams, self.store))

    def test_claimNothing(self):
        """
        An empty store has nothing to claim; a stream begun at the newest
        event has nothing either until events are appended.
        """
        self.assertIsNone(self.claim())
        self.append(event(T0 + 1))
        self.assertIsNone(self.claim(stream="webhooks", begin="newest"))
        self.append(event(T0 + 2, id="second"))
        claim = self.claim(stream="webhooks", begin="newest")
        self.assertEqual([e.id for e in self.claimed(claim)[0]], ["second"])

    def test_claimInInsertionOrder(self):
        """
        A claim covers every event appended since the cursor, read in
        insertion order (not time order), across pages.
        """
        times = [T0 + 5, T0 + 1, T0 + 3, T0 + 2, T0 + 4]
        events = [event(t, id=f"e{i}") for i, t in enumerate(times)]
        self.append(*events[:2])
        self.append(*events[2:])
        claim = self.claim(now=T0 + 10)
        self.assertEqual((claim.stream, claim.owner, claim.time), ("export", "n1", T0 + 10))
        self.assertEqual(claim.last - claim.after, 5)
        found, pages = self.claimed(claim, limit=2)
        self.assertEqual(found, events)
        self.assertEqual(len(pages), 3)

    def test_claimResumedUntilFinished(self):
        """
        An owner's open claim comes back unchanged, even with new events;
        once finished, the next claim covers only what came after.
        """
        self.append(event(T0, id="a"))
        first = self.claim()
        self.append(event(T0, id="b"))
        self.assertEqual(self.claim(now=T0 + 99, limit=1), first)
        self.assertTrue(self.successResultOf(self.store.finishClaim(first)))
        self.assertFalse(self.successResultOf(self.store.finishClaim(first)))
        second = self.claim()
        self.assertEqual(second.after, first.last)
        self.assertEqual([e.id for e in self.claimed(second)[0]], ["b"])
        self.successResultOf(self.store.finishClaim(second))
        self.assertIsNone(self.claim())

    def test_claimLimit(self):
        """
        A claim with a limit covers at most that many events.
        """
        self.append(*[event(T0, id=f"e{i}") for i in range(5)])
        claim = self.claim(limit=2)
        self.assertEqual([e.id for e in self.claimed(claim)[0]], ["e0", "e1"])
        self.successResultOf(self.store.finishClaim(claim))
        claim = self.claim(limit=10)
        self.assertEqual([e.id for e in self.claimed(claim)[0]], ["e2", "e3", "e4"])

    def test_ownersClaimDisjointRanges(self):
        """
        Two owners of one stream never claim the same event, and between
        them claim every one; other streams have cursors of their own.
        """
        self.append(*[event(T0, id=f"e{i}") for i in range(3)])
        a = self.claim(owner="a", limit=2)
        self.append(*[event(T0, id=f"f{i}") for i in range(2)])
        b = self.claim(owner="b")
        ids = [e.id for e in self.claimed(a)[0] + self.claimed(b)[0]]
        self.assertEqual(ids, ["e0", "e1", "e2", "f0", "f1"])
        self.assertIsNone(self.claim(owner="c"))
        other = self.claim(stream="other", owner="a")
        self.assertEqual(len(self.claimed(other)[0]), 5)

    def test_claimedSkipsPruned(self):
        """
        Events pruned after they were claimed are left out of the claim's
        pages.
        """
        self.append(event(T0, id="old"), event(T0 + 100, id="new"))
        claim = self.claim()
        self.successResultOf(self.store.pruneEvents(T0 + 50))
        self.assertEqual([e.id for e in self.claimed(claim)[0]], ["new"])

    def test_claimBadArguments(self):
        """
        Bad stream names, owners, times, limits and beginnings fail with
        L{ValueError}; a claim that is not one with L{TypeError}; a cursor
        from elsewhere with L{InvalidCursor}.
        """
        good = {"stream": "export", "owner": "n1", "now": T0}
        for kw in [
            {"stream": ""}, {"stream": "A"}, {"stream": None}, {"stream": "a b"},
            {"owner": ""}, {"owner": None}, {"now": None}, {"now": float("nan")},
            {"limit": 0}, {"limit": -1}, {"limit": True}, {"limit": 1.5},
            {"begin": "middle"},
        ]:
            args = {**good, **kw}
            self.failureResultOf(
                self.store.claimEvents(
                    args.pop("stream"), args.pop("owner"), args.pop("now"), **args
                ),
                ValueError,
            )
        self.failureResultOf(self.store.claimedEvents("claim"), TypeError)
        self.failureResultOf(self.store.finishClaim(None), TypeError)
        self.append(event(T0), event(T0))
        claim = self.claim()
        self.failureResultOf(self.store.claimedEvents(claim, cursor="junk"), InvalidCursor)
        self.failureResultOf(
            self.store.claimedEvents(claim, cursor=encodeCursor(0.0, claim.last + 5)),
            InvalidCursor,
        )
        self.failureResultOf(self.store.claimedEvents(claim, limit=0), ValueError)

    def batch(self, id, due=T0, body=None):
        return OutboxBatch(id=id, body=body or f'{{"events": ["{id}"]}}', created=T0, due=due)

    def test_outboxTakeLeaseDeferRemove(self):
        """
        Batches are taken once due, oldest due first; a taken batch is not
        due again before its lease ends; deferring counts an attempt and
        sets the next due time; removing takes it out for good.
        """
        outbox = "webhooks"
        self.successResultOf(
            self.store.addToOutbox(outbox, [self.batch("b", due=T0 + 1), self.batch("a")])
        )
        self.assertEqual(self.successResultOf(self.store.outboxSize(outbox)), 2)
        taken = self.successResultOf(self.store.takeFromOutbox(outbox, T0, 60))
        self.assertEqual(taken, [attrs.evolve(self.batch("a"), due=T0 + 60)])
        taken = self.successResultOf(self.store.takeFromOutbox(outbox, T0 + 1, 60))
        self.assertEqual([b.id for b in taken], ["b"])
        self.assertEqual(self.successResultOf(self.store.takeFromOutbox(outbox, T0 + 59, 60)), [])
        # The lease of "a" ended: it is due again (its taker died).
        again = self.successResultOf(self.store.takeFromOutbox(outbox, T0 + 60, 60))
        self.assertEqual([b.id for b in again], ["a"])
        self.assertTrue(self.successResultOf(self.store.deferInOutbox(outbox, "a", T0 + 300)))
        # "b"'s lease ended long ago; "a" is not due before T0 + 300.
        taken = self.successResultOf(self.store.takeFromOutbox(outbox, T0 + 299, 60))
        self.assertEqual([b.id for b in taken], ["b"])
        [a] = self.successResultOf(self.store.takeFromOutbox(outbox, T0 + 300, 1))
        self.assertEqual((a.attempts, a.body, a.created), (1, self.batch("a").body, T0))
        self.assertTrue(self.successResultOf(self.store.removeFromOutbox(outbox, "a")))
        self.assertFalse(self.successResultOf(self.store.removeFromOutbox(outbox, "a")))
        self.assertFalse(self.successResultOf(self.store.deferInOutbox(outbox, "a", T0)))
        self.assertEqual(self.successResultOf(self.store.outboxSize(outbox)), 1)
        self.assertEqual(self.successResultOf(self.store.outboxSize("other")), 0)

    def test_outboxLimitAndIdempotentAdd(self):
        """
        A take returns at most C{limit} batches; adding an id that is
        already there keeps the first batch.
        """
        outbox = "webhooks"
        self.successResultOf(
            self.store.addToOutbox(outbox, [self.batch(f"b{i}") for i in range(5)])
        )
        self.successResultOf(self.store.addToOutbox(outbox, [self.batch("b0", body="new")]))
        taken = self.successResultOf(self.store.takeFromOutbox(outbox, T0, 10, limit=3))
        self.assertEqual([b.id for b in taken], ["b0", "b1", "b2"])
        self.assertEqual(taken[0].body, self.batch("b0").body)
        self.assertEqual(self.successResultOf(self.store.outboxSize(outbox)), 5)

    def test_outboxAddFinishesClaim(self):
        """
        Adding batches with a claim finishes that claim in the same step.
        """
        self.append(event(T0))
        claim = self.claim(stream="webhooks")
        self.successResultOf(self.store.addToOutbox("webhooks", [self.batch("x")], claim))
        self.assertFalse(self.successResultOf(self.store.finishClaim(claim)))
        self.assertIsNone(self.claim(stream="webhooks"))

    def test_outboxBadArguments(self):
        """
        Bad outbox names, batches, times, leases and limits fail.
        """
        self.failureResultOf(self.store.addToOutbox("X", []), ValueError)
        self.failureResultOf(self.store.addToOutbox("w", ["batch"]), TypeError)
        self.failureResultOf(self.store.addToOutbox("w", [self.batch("")]), ValueError)
        self.failureResultOf(self.store.addToOutbox("w", [], claim="c"), TypeError)
        for args in [("X", T0, 1), ("w", None, 1), ("w", T0, 0), ("w", T0, float("inf"))]:
            self.failureResultOf(self.store.takeFromOutbox(*args), ValueError)
        self.failureResultOf(self.store.takeFromOutbox("w", T0, 1, limit=0), ValueError)
        self.failureResultOf(self.store.deferInOutbox("w", "x", None), ValueError)
        self.failureResultOf(self.store.removeFromOutbox("", "x"), ValueError)
        self.failureResultOf(self.store.outboxSize(None), ValueError)

    def test_streamsAfterClose(self):
        """
        Stream and outbox operations fail with L{StoreClosed} on a closed
        store.
        """
        self.successResultOf(self.store.close())
        self.failureResultOf(self.store.claimEvents("s", "o", T0), StoreClosed)
        self.failureResultOf(self.store.takeFromOutbox("w", T0, 1), StoreClosed)
        self.failureResultOf(self.store.outboxSize("w"), StoreClosed)

    # -- SMS submissions (ISMSSubmissions, issue 15) -------------------------

    def smsSubmission(self, message_id="5B1A", part=1, parts=2, time=T0, **kw):
        from smartrelay.store.interfaces import SMSSubmission

        fields = dict(queue_id="Q1", recipient="+393331234567@sms.example.com",
                      tag="otp", metadata={"user": "7"})
        fields.update(kw)
        return SMSSubmission(message_id=message_id, part=part, parts=parts, time=time, **fields)

    def test_smsProvidesInterface(self):
        """
        The store provides L{ISMSSubmissions}.
        """
        from smartrelay.store.interfaces import ISMSSubmissions

        self.assertTrue(verifyObject(ISMSSubmissions, self.store))

    def test_smsSubmissionFoundByNormalisedID(self):
        """
        A submission is found by its message id in any case and with
        leading zeros; an unknown id finds nothing.
        """
        submission = self.smsSubmission("005B1A")
        self.successResultOf(self.store.addSMSSubmission(submission))
        self.assertEqual(self.successResultOf(self.store.findSMSSubmission("5b1a")), submission)
        self.assertEqual(self.successResultOf(self.store.findSMSSubmission(" 05B1A")), submission)
        self.assertIsNone(self.successResultOf(self.store.findSMSSubmission("5B1B")))
        self.failureResultOf(self.store.findSMSSubmission(""), ValueError)
        self.failureResultOf(self.store.findSMSSubmission("a" * 65), ValueError)

    def test_smsSubmissionsOfRecipient(self):
        """
        The parts submitted for one message and recipient come back in
        part order; a submission with the same id replaces the old one.
        """
        second = self.smsSubmission("B2", part=2, time=T0 + 1)
        first = self.smsSubmission("B1", part=1, time=T0 + 2)
        other = self.smsSubmission("C1", recipient="+15551234567@sms.example.com")
        for submission in (second, first, other):
            self.successResultOf(self.store.addSMSSubmission(submission))
        found = self.successResultOf(
            self.store.smsSubmissions("Q1", "+393331234567@sms.example.com")
        )
        self.assertEqual(found, [first, second])
        moved = self.smsSubmission("B1", queue_id="Q2", part=1, time=T0 + 3)
        self.successResultOf(self.store.addSMSSubmission(moved))
        self.assertEqual(self.successResultOf(self.store.findSMSSubmission("b1")), moved)
        self.assertEqual(
            self.successResultOf(self.store.smsSubmissions("Q1", "+393331234567@sms.example.com")),
            [second],
        )

    def test_smsSubmissionsPruned(self):
        """
        Pruning deletes submissions older than the cut-off, at most limit
        a call.
        """
        for number in range(3):
            self.successResultOf(
                self.store.addSMSSubmission(self.smsSubmission(f"A{number}", time=T0 + number))
            )
        self.assertEqual(self.successResultOf(self.store.pruneSMSSubmissions(T0 + 2, 1)), 1)
        self.assertEqual(self.successResultOf(self.store.pruneSMSSubmissions(T0 + 2)), 1)
        self.assertEqual(self.successResultOf(self.store.pruneSMSSubmissions(T0 + 2)), 0)
        self.assertIsNotNone(self.successResultOf(self.store.findSMSSubmission("a2")))

    def test_smsSubmissionBadValues(self):
        """
        A submission with a bad id, part or missing queue id cannot be
        made.
        """
        self.assertRaises(ValueError, self.smsSubmission, "bad id")
        self.assertRaises(ValueError, self.smsSubmission, part=3, parts=2)
        self.assertRaises(ValueError, self.smsSubmission, part=0)
        self.assertRaises(ValueError, self.smsSubmission, queue_id="")


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

    def test_streamAfterSeqReuse(self):
        """
        When pruning deletes the events with the highest sequence numbers,
        SQLite reuses them: a stream's cursor and open claims move back, so
        the events stored under reused numbers are claimed, none twice.
        """
        store = self.open()
        self.successResultOf(store.appendEvents([event(T0, id=f"old{i}") for i in range(5)]))
        claim = self.successResultOf(store.claimEvents("export", "n1", T0))
        self.successResultOf(store.finishClaim(claim))
        self.successResultOf(store.pruneEvents(T0 + 1))
        self.successResultOf(
            store.appendEvents([event(T0 + 2, id=f"new{i}") for i in range(7)])
        )
        claim = self.successResultOf(store.claimEvents("export", "n1", T0 + 3))
        page = self.successResultOf(store.claimedEvents(claim))
        self.assertEqual([e.id for e in page.events], [f"new{i}" for i in range(7)])
        self.assertIsNone(page.cursor)

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


    def test_migrationFromVersion1(self):
        """
        A version 1 database is migrated to the current version: its events
        are kept and the suppression list, statistics and token buckets
        work (events stored before the migration are not counted).
        """
        conn = sqlite3.connect(self.path, isolation_level=None)
        conn.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY)")
        [(version, statements)] = [m for m in MIGRATIONS if m[0] == 1]
        for statement in statements:
            conn.execute(statement)
        conn.execute("INSERT INTO schema_version VALUES (1)")
        old = event(T0, "delivered")
        conn.execute(_INSERT, _toRow(old))
        conn.close()

        store = self.open()
        self.assertEqual(
            self.peek("SELECT version FROM schema_version"),
            [(v,) for v in range(1, SCHEMA_VERSION + 1)],
        )
        self.assertEqual(self.successResultOf(store.queryEvents()).events, [old])
        self.successResultOf(store.appendEvents([event(T0 + 1, "opened")]))
        stats = self.successResultOf(
            store.statistics(since=T0, until=T0 + 1, interval="day")
        )
        self.assertEqual(stats.totals, {"opened": 1})
        entry = SuppressionEntry(address="a@b.c", reason="manual", time=T0)
        self.successResultOf(store.addSuppression(entry))
        self.assertEqual(
            self.successResultOf(store.checkSuppressions(["a@b.c"], T0)),
            {"a@b.c": entry},
        )
        self.assertTrue(self.successResultOf(store.takeTokens("k", 1, 1, T0)).allowed)

    def test_newQueriesUseIndexes(self):
        """
        Suppression checks and listings, statistics and token buckets read
        their tables through an index (no table scan, no sorting step), and
        statistics never read the events table.
        """
        store = self.open()
        self.successResultOf(store.appendEvents([event(T0 + i) for i in range(50)]))
        for i in range(20):
            self.successResultOf(
                store.addSuppression(
                    SuppressionEntry(address=f"u{i}@b.c", reason="bounce", time=T0)
                )
            )
        cursor = self.successResultOf(store.listSuppressions(limit=1)).cursor
        statements = []
        store._conn.set_trace_callback(statements.append)
        self.successResultOf(store.checkSuppressions(["u1@b.c", "x@b.c"], T0))
        self.successResultOf(store.listSuppressions(prefix="u1"))
        self.successResultOf(store.listSuppressions(reason="bounce", cursor=cursor))
        self.successResultOf(store.listSuppressions(prefix="u", reason="manual"))
        self.successResultOf(store.removeSuppression("u2@b.c"))
        self.successResultOf(store.statistics(since=T0, until=T0 + 10, tag="t"))
        store._conn.set_trace_callback(None)
        self.assertEqual(len(statements), 6)
        for sql in statements:
            self.assertNotIn("events", sql)
            plan = " / ".join(
                row[-1] for row in store._conn.execute("EXPLAIN QUERY PLAN " + sql)
            )
            self.assertIn("SEARCH", plan, sql)
            self.assertNotIn("TEMP B-TREE", plan, sql)

    def test_pruneUsesIndexes(self):
        """
        C{pruneEvents} finds what it deletes through the time indexes of
        the events and the unique open / click records (no table scan, no
        sorting step), in one transaction.
        """
        store = self.open()
        self.successResultOf(
            store.appendEvents([event(T0 + i, "opened", f"Q{i}") for i in range(20)])
        )
        statements = []
        store._conn.set_trace_callback(statements.append)
        self.assertEqual(self.successResultOf(store.pruneEvents(T0 + 5, 8)), 8)
        store._conn.set_trace_callback(None)
        # The trace repeats a DELETE for each run of the events_seq_reuse
        # trigger (one per deleted row): count the statements once.
        statements = [
            sql for i, sql in enumerate(statements) if i == 0 or sql != statements[i - 1]
        ]
        deletes = [sql for sql in statements if sql.startswith("DELETE")]
        self.assertEqual(
            [sql.split()[0] for sql in statements],
            ["BEGIN", "DELETE", "DELETE", "COMMIT"],
        )
        for sql in deletes:
            plan = " / ".join(
                row[-1] for row in store._conn.execute("EXPLAIN QUERY PLAN " + sql)
            )
            self.assertNotIn("SCAN", plan, sql)
            self.assertNotIn("TEMP B-TREE", plan, sql)
        self.assertEqual(self.peek("SELECT COUNT(*) FROM seen"), [(17,)])
        self.assertEqual(self.peek("SELECT COUNT(*) FROM events"), [(15,)])

    def test_failedBatchCountsNothing(self):
        """
        When SQLite rejects a batch, its counter bumps and unique open
        records are rolled back with its events.
        """
        store = self.open()
        good = event(T0, "opened", tag="t")
        unencodable = event(T0 + 1, "opened", queue_id="\ud800")
        self.failureResultOf(
            store.appendEvents([good, unencodable]), UnicodeEncodeError
        )
        self.assertEqual(self.peek("SELECT COUNT(*) FROM counters"), [(0,)])
        self.assertEqual(self.peek("SELECT COUNT(*) FROM seen"), [(0,)])
        self.successResultOf(store.appendEvents([good]))
        stats = self.successResultOf(store.statistics(since=T0, until=T0 + 1))
        self.assertEqual((stats.totals, stats.unique_opens), ({"opened": 1}, 1))

    def test_tokenBucketsPersist(self):
        """
        Token buckets and suppressions survive closing and reopening the
        store.
        """
        store = SQLiteStore(self.path, synchronous)
        self.successResultOf(store.start())
        self.successResultOf(store.takeTokens("k", 1, 2, T0, 2))
        entry = SuppressionEntry(address="a@b.c", reason="manual", time=T0)
        self.successResultOf(store.addSuppression(entry))
        self.successResultOf(store.close())
        again = self.open()
        self.assertEqual(
            self.successResultOf(again.takeTokens("k", 1, 2, T0 + 0.5)),
            TokenResult(False, 0.5, 0.5),
        )
        self.assertEqual(
            self.successResultOf(again.listSuppressions()).entries, [entry]
        )

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
    def test_newOperationsInPool(self):
        """
        Suppressions, statistics and token buckets work through the pool,
        in call order.
        """
        yield self.store.start()
        self.store.appendEvents([event(T0, "delivered"), event(T0 + 1, "opened")])
        self.store.addSuppression(
            SuppressionEntry(address="a@b.c", reason="bounce", time=T0)
        )
        found = yield self.store.checkSuppressions(["a@B.c", "z@b.c"], T0)
        self.assertEqual(list(found), ["a@B.c"])
        stats = yield self.store.statistics(since=T0, until=T0 + 2)
        self.assertEqual(stats.unique_open_rate, 1.0)
        results = yield gatherResults(
            [self.store.takeTokens("k", 1, 5, T0) for _ in range(7)]
        )
        self.assertEqual([r.allowed for r in results], [True] * 5 + [False] * 2)

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


class EncodeEventsTests(SynchronousTestCase):
    """
    The SQLite store's batch encoding (L{_encodeEvents}) gives what
    encoding the events one by one gives, with a detail dict shared by many
    events (the parked recipients of one suspension) encoded once.
    """

    def oneByOne(self, events):
        from collections import Counter

        from smartrelay.store.sqlite import _counting

        bumps, uniques = Counter(), []
        for e in events:
            always, unique = _counting(e)
            bumps.update(always)
            if unique is not None:
                uniques.append(unique)
        return [_toRow(e) for e in events], bumps, uniques

    def mixed(self):
        shared = {"reply": "delivery temporarily suspended", "attempts": 0}
        events = []
        for n in range(60):
            events.append(event(
                T0 + 97 * n * 13,  # across hour (and day) buckets
                type=("deferred", "delivered", "bounced", "opened", "clicked", "accepted")[n % 6],
                queue_id=None if n % 11 == 0 else f"Q{n % 4}",
                recipient=(None, "a@Example.COM", "b@example.net", "nodomain")[n % 4],
                tag=(None, "news", "receipts")[n % 3],
                metadata=({}, {"k": "v"}, shared)[n % 3],
                detail=(shared, {}, {"kind": ("hard", "soft")[n % 2]})[n % 3],
                id=f"e{n}",
            ))
        return events

    def test_sameAsOneByOne(self):
        """
        Rows, counters and the unique opens and clicks are those of
        L{_toRow} and L{_counting}, event by event.
        """
        from smartrelay.store.sqlite import _encodeEvents

        events = self.mixed()
        self.assertEqual(_encodeEvents(events), self.oneByOne(events))

    @given(st.lists(st.tuples(
        st.sampled_from(["deferred", "delivered", "bounced", "opened", "accepted"]),
        st.floats(min_value=0, max_value=4e9, allow_nan=False),
        st.sampled_from([None, "x@A.example", "y@b.example"]),
        st.sampled_from([None, "t"]),
        st.integers(0, 2),
        jsonValues,
    ), max_size=20))
    @settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow])
    def test_sameAsOneByOneAny(self, specs):
        """
        The same for any events (shared and distinct detail dicts alike).
        """
        from smartrelay.store.sqlite import _encodeEvents

        shared = {"v": 1}
        events = [
            event(time, type=kind, recipient=recipient, tag=tag,
                  detail=(shared, {}, {"value": value})[which], id=f"e{n}")
            for n, (kind, time, recipient, tag, which, value) in enumerate(specs)
        ]
        self.assertEqual(_encodeEvents(events), self.oneByOne(events))

    def test_sharedDetailEncodedOnce(self):
        """
        A detail dict that is the same object for many events of a batch is
        encoded once, an empty metadata dict not at all; a detail only equal
        to another is encoded on its own.
        """
        import json

        import smartrelay.store.interfaces as interfaces
        import smartrelay.store.sqlite as sqlite

        calls = []

        class CountingJSON:
            @staticmethod
            def dumps(value, **kw):
                calls.append(value)
                return json.dumps(value, **kw)

        # The batch's JSON (BatchJSON) is made in the stores' shared part.
        self.patch(interfaces, "json", CountingJSON)
        shared = {"reply": "suspended", "attempts": 0}
        events = [event(T0 + n, type="deferred", recipient=f"r{n}@example.com",
                        detail=shared, id=f"e{n}") for n in range(100)]
        events.append(event(T0, type="deferred", detail=dict(shared), id="other"))
        rows, bumps, uniques = sqlite._encodeEvents(events)
        self.assertEqual(calls, [shared, shared])
        self.assertEqual({row[8] for row in rows}, {json.dumps(shared)})
        self.assertEqual({row[7] for row in rows}, {"{}"})

    def test_changedBetweenBatches(self):
        """
        The cache lasts one batch: a shared dict changed afterwards is
        written as it is when the next batch is encoded.
        """
        from smartrelay.store.sqlite import _encodeEvents

        shared = {"attempts": 0}
        first = _encodeEvents([event(detail=shared, id="a")])[0]
        shared["attempts"] = 1
        second = _encodeEvents([event(detail=shared, id="b")])[0]
        self.assertEqual((first[0][8], second[0][8]), ('{"attempts": 0}', '{"attempts": 1}'))

    def test_unencodableFailsTheBatch(self):
        """
        A batch with a value JSON cannot encode fails as a whole, nothing
        written.
        """
        store = SQLiteStore(self.mktemp(), synchronous)
        self.successResultOf(store.start())
        self.addCleanup(store.close)
        bad = event(detail={"x": object()}, id="bad")
        self.failureResultOf(store.appendEvents([event(id="good"), bad]), TypeError)
        self.assertEqual(self.successResultOf(store.eventsForMessage("Q1")), [])

    def test_storedAndCounted(self):
        """
        Through the store: events sharing one detail dict are read back
        with it, and counted in their hours, tags and domains.
        """
        store = SQLiteStore(self.mktemp(), synchronous)
        self.successResultOf(store.start())
        self.addCleanup(store.close)
        shared = {"reply": "suspended", "attempts": 0}
        events = [event(DAY0 + HOUR * (n % 3) + n, type="deferred", queue_id=f"Q{n}",
                        recipient=f"r{n}@{('a', 'b')[n % 2]}.example", tag="t",
                        detail=shared, id=f"e{n}") for n in range(12)]
        self.successResultOf(store.appendEvents(events))
        self.assertEqual(
            [e.detail for n in range(12)
             for e in self.successResultOf(store.eventsForMessage(f"Q{n}"))],
            [shared] * 12,
        )
        memory = MemoryStore()
        self.successResultOf(memory.appendEvents(events))
        for kw in ({}, {"tag": "t"}, {"domain": "a.example"}, {"tag": "t", "domain": "B.example"}):
            self.assertEqual(
                self.successResultOf(store.statistics(since=DAY0, until=DAY0 + DAY, **kw)),
                self.successResultOf(memory.statistics(since=DAY0, until=DAY0 + DAY, **kw)),
            )


class RedisEventEncodingTests(SynchronousTestCase):
    """
    The Redis store's record text with the batch's detail cache
    (L{smartrelay.store.redis._recordCached}) is L{_record}'s, byte for
    byte; a shared detail is encoded once.
    """

    def test_sameAsRecord(self):
        from smartrelay.store.interfaces import BatchJSON
        from smartrelay.store.redis import _record, _recordCached

        shared = {"reply": "suspended \u00e9", "n": 1.5}
        encoded = BatchJSON()
        for n in range(30):
            e = event(T0 + n / 7, type="deferred", queue_id=(None, "Q1")[n % 2],
                      recipient=(None, 'q"@x.example', "a@b.example")[n % 3],
                      tag=(None, "t")[n % 2], metadata=({}, {"k": "v"}, shared)[n % 3],
                      detail=(shared, {}, {"kind": "hard"})[n % 3], id=f"e{n}")
            self.assertEqual(_recordCached(e, encoded), _record(e))

    def test_sharedDetailEncodedOnce(self):
        import json

        import smartrelay.store.interfaces as interfaces
        import smartrelay.store.redis as redis

        calls = []

        class CountingJSON:
            @staticmethod
            def dumps(value, **kw):
                calls.append(value)
                return json.dumps(value, **kw)

        self.patch(interfaces, "json", CountingJSON)
        shared = {"reply": "suspended"}
        encoded = interfaces.BatchJSON()
        for n in range(50):
            redis._recordCached(event(detail=shared, id=f"e{n}"), encoded)
        self.assertEqual(calls.count(shared), 1)
        self.assertNotIn({}, calls)

    def test_counterKey(self):
        """
        Events alike for the counters have one key: type, tag, recipient
        domain (case-insensitive) and their hour and day; bounces none.
        """
        from smartrelay.store.interfaces import counterKey as _counterKey

        self.assertEqual(_counterKey(event(T0, recipient="a@X.example")),
                         _counterKey(event(T0 + 1, recipient="b@x.example")))
        self.assertNotEqual(_counterKey(event(DAY0 + HOUR - 1)), _counterKey(event(DAY0 + HOUR)))
        self.assertNotEqual(_counterKey(event(T0, tag="a")), _counterKey(event(T0)))
        self.assertNotEqual(_counterKey(event(T0, type="deferred")), _counterKey(event(T0)))
        self.assertIsNone(_counterKey(event(T0, type="bounced")))


class SQLiteUniqueCountingTests(SynchronousTestCase):
    """
    How L{SQLiteStore} counts unique opens and clicks: the keys it knows to
    be recorded are not asked about again, the others are inserted with a
    statement per L{_SEEN_ROWS} keys.
    """

    def setUp(self):
        self.store = SQLiteStore(self.mktemp(), synchronous)
        self.successResultOf(self.store.start())
        self.addCleanup(self.store.close)
        self.statements = []
        self.store._connection().set_trace_callback(self.statements.append)

    def append(self, *events):
        self.successResultOf(self.store.appendEvents(list(events)))

    def stats(self):
        return self.successResultOf(self.store.statistics(since=DAY0, until=DAY0 + DAY))

    def seenStatements(self):
        return [s for s in self.statements if "INTO seen" in s]

    def test_repeatsNotAsked(self):
        """
        An open or click whose key a recent batch recorded costs no
        statement; it is counted as an open or click, not a unique one.
        """
        self.append(event(DAY0, "clicked"), event(DAY0 + 1, "opened"))
        self.assertEqual(len(self.seenStatements()), 1)
        del self.statements[:]
        self.append(event(DAY0 + 2, "clicked", recipient="a@Example.com"),
                    event(DAY0 + 3, "opened"))
        self.assertEqual(self.seenStatements(), [])
        stats = self.stats()
        self.assertEqual((stats.unique_opens, stats.unique_clicks), (1, 1))
        self.assertEqual(stats.totals, {"clicked": 2, "opened": 2})

    def test_recordedByEarlierRun(self):
        """
        A key recorded before the store was opened (not known in memory)
        is asked about and not counted again.
        """
        self.append(event(DAY0, "clicked"))
        self.store._seen.clear()
        self.append(event(DAY0 + 1, "clicked"), event(DAY0 + 2, "clicked", queue_id="Q2"))
        stats = self.stats()
        self.assertEqual(stats.unique_clicks, 2)
        self.assertEqual(stats.totals, {"clicked": 3})

    def test_manyInOneBatch(self):
        """
        More keys than one statement takes, some repeated in the batch (in
        other spellings): each counted once, in one statement per
        L{_SEEN_ROWS}, with the time of its first event.
        """
        count = 2 * _SEEN_ROWS + 17
        events = [event(DAY0 + n, "opened", recipient=f"u{n}@example.com") for n in range(count)]
        events += [event(DAY0 + 1000 + n, "opened", recipient=f"u{n}@EXAMPLE.com")
                   for n in range(0, count, 3)]
        events += [event(DAY0 + 2000, "clicked", recipient="u5@example.com")]
        self.append(*events)
        self.assertEqual(len(self.seenStatements()), 3)
        stats = self.stats()
        self.assertEqual((stats.unique_opens, stats.unique_clicks), (count, 1))
        conn = self.store._connection()
        self.assertEqual(
            conn.execute("SELECT time FROM seen WHERE recipient_norm = 'u3@example.com'").fetchall(),
            [(DAY0 + 3,)],
        )

    def test_failedBatchNotRemembered(self):
        """
        The keys of a batch whose transaction fails are not remembered: the
        next open of that pair is unique.
        """
        import smartrelay.store.sqlite as module

        original = module._BUMP
        module._BUMP = "INSERT INTO nowhere VALUES (?, ?, ?, ?, ?, ?)"
        try:
            self.failureResultOf(self.store.appendEvents([event(DAY0, "opened")]))
        finally:
            module._BUMP = original
        self.assertEqual(self.store._seen, set())
        self.append(event(DAY0 + 1, "opened"))
        self.assertEqual(self.stats().unique_opens, 1)

    def test_bounded(self):
        """
        At most L{SEEN_KEPT} keys are remembered: past that they are all
        forgotten (and asked about again), and still counted once.
        """
        import smartrelay.store.sqlite as module

        self.patch(module, "SEEN_KEPT", 3)
        self.append(*[event(DAY0 + n, "opened", recipient=f"u{n}@example.com") for n in range(3)])
        self.assertEqual(len(self.store._seen), 3)
        self.append(event(DAY0 + 10, "opened", recipient="u9@example.com"))
        self.assertEqual(self.store._seen, {("Q1", "u9@example.com", "opened")})
        self.append(event(DAY0 + 11, "opened", recipient="u0@example.com"))
        self.assertEqual(self.stats().unique_opens, 4)
