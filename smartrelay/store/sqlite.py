"""
The SQLite event store: the default back end, one file under C{data_dir}.

All SQLite work runs through a C{runInThread(f, *args)} callable.  In
production that is a thread pool of exactly one thread (see
L{SQLiteStore.inThreadPool}): one connection, one writer, and operations run
in the order they were called, so a query issued after an append sees it.
Unit tests pass a synchronous stand-in instead.

The spool on disk, not this store, is the source of truth for messages, so
the database runs in WAL mode with C{synchronous=NORMAL}: a crash may lose
the last few committed batches but never corrupts the file.
"""

import json
import sqlite3
from collections import Counter
from typing import Any, Callable, Optional

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from smartrelay.events import Event
from smartrelay.store.interfaces import (
    BatchCounters,
    BatchJSON,
    ISMSSubmissions,
    SMSSubmission,
    normaliseSMSMessageID,
    UNIQUE_TYPES,
    EventClaim,
    EventPage,
    IEventStreams,
    IStore,
    OutboxBatch,
    StoreClosed,
    SuppressionEntry,
    SuppressionPage,
    buildStatistics,
    checkAddresses,
    checkBatches,
    checkClaim,
    checkClaimArguments,
    checkLimit,
    checkPruneArguments,
    checkReason,
    checkStatisticsArguments,
    checkStreamName,
    checkTakeArguments,
    checkTime,
    checkTokenArguments,
    claimCursor,
    claimPage,
    counterBumps,
    decodeCursor,
    decodeSuppressionCursor,
    encodeCursor,
    encodeSuppressionCursor,
    eventCounterTypes,
    normaliseAddress,
    normalisePrefix,
    normaliseRecipient,
    prefixUpperBound,
    takeFromBucket,
    uniqueKey,
)


class UnsupportedSchema(Exception):
    """
    The database was written by a newer smartrelay (its schema version is
    higher than any this code knows).
    """


# Schema migrations: (version, statements).  Each runs once, in order, in the
# same transaction that records its version in schema_version.  Append new
# versions at the end; never edit one that has been released.
#
# events.seq is the rowid: it gives the insertion order that breaks ties
# between events with the same time.  Every secondary index ends with time
# (and, implicitly, the rowid), so a filtered query reads its rows from one
# index already in (time, seq) order.
MIGRATIONS: list[tuple[int, list[str]]] = [
    (
        1,
        [
            """
            CREATE TABLE events (
                seq INTEGER PRIMARY KEY,
                id TEXT NOT NULL,
                time REAL NOT NULL,
                type TEXT NOT NULL,
                queue_id TEXT,
                recipient TEXT,
                recipient_norm TEXT,
                tag TEXT,
                metadata TEXT NOT NULL,
                detail TEXT NOT NULL
            )
            """,
            "CREATE INDEX events_time ON events (time)",
            "CREATE INDEX events_queue_id ON events (queue_id, time)",
            "CREATE INDEX events_recipient ON events (recipient_norm, time)",
            "CREATE INDEX events_type ON events (type, time)",
            "CREATE INDEX events_tag ON events (tag, time)",
        ],
    ),
    # Version 2: the suppression list, statistics counters (bumped in the
    # transaction that appends the events) with the (queue id, recipient,
    # type) triples already counted as unique opens / clicks, and the
    # rate-limit token buckets.  Events stored before this version are not
    # counted.
    (
        2,
        [
            """
            CREATE TABLE suppressions (
                address TEXT PRIMARY KEY,
                reason TEXT NOT NULL,
                source_event TEXT,
                time REAL NOT NULL,
                expires REAL
            ) WITHOUT ROWID
            """,
            "CREATE INDEX suppressions_reason ON suppressions (reason, address)",
            """
            CREATE TABLE counters (
                interval TEXT NOT NULL,
                dim TEXT NOT NULL,
                key TEXT NOT NULL,
                bucket INTEGER NOT NULL,
                type TEXT NOT NULL,
                count INTEGER NOT NULL,
                PRIMARY KEY (interval, dim, key, bucket, type)
            ) WITHOUT ROWID
            """,
            """
            CREATE TABLE seen (
                queue_id TEXT NOT NULL,
                recipient_norm TEXT NOT NULL,
                type TEXT NOT NULL,
                time REAL NOT NULL,
                PRIMARY KEY (queue_id, recipient_norm, type)
            ) WITHOUT ROWID
            """,
            """
            CREATE TABLE token_buckets (
                key TEXT PRIMARY KEY,
                tokens REAL NOT NULL,
                updated REAL NOT NULL
            ) WITHOUT ROWID
            """,
        ],
    ),
    # Version 3: pruneEvents deletes the oldest unique open / click records
    # (events already have their time index).
    (
        3,
        ["CREATE INDEX seen_time ON seen (time)"],
    ),
    # Version 4: event streams (a cursor over seq per stream, the open
    # claims of each owner) and outboxes, for the exporter and the webhooks
    # (IEventStreams).  seq is the rowid, which SQLite reuses when the
    # events with the highest ones are deleted (pruning an idle relay's
    # last events): the trigger records how far down seq went, and the
    # next claim moves every cursor and claim back there, so events stored
    # under reused numbers are not skipped.
    (
        4,
        [
            """
            CREATE TABLE event_streams (
                name TEXT PRIMARY KEY,
                cursor INTEGER NOT NULL
            ) WITHOUT ROWID
            """,
            """
            CREATE TABLE event_claims (
                stream TEXT NOT NULL,
                owner TEXT NOT NULL,
                after INTEGER NOT NULL,
                last INTEGER NOT NULL,
                time REAL NOT NULL,
                PRIMARY KEY (stream, owner)
            ) WITHOUT ROWID
            """,
            """
            CREATE TABLE outbox (
                outbox TEXT NOT NULL,
                id TEXT NOT NULL,
                body TEXT NOT NULL,
                created REAL NOT NULL,
                due REAL NOT NULL,
                attempts INTEGER NOT NULL,
                PRIMARY KEY (outbox, id)
            ) WITHOUT ROWID
            """,
            "CREATE INDEX outbox_due ON outbox (outbox, due, id)",
            """
            CREATE TABLE event_seq_reuse (
                id INTEGER PRIMARY KEY CHECK (id = 0),
                base INTEGER NOT NULL
            )
            """,
            """
            CREATE TRIGGER events_seq_reuse AFTER DELETE ON events
            WHEN OLD.seq > (SELECT COALESCE(MAX(seq), 0) FROM events)
            BEGIN
                INSERT INTO event_seq_reuse (id, base)
                VALUES (0, (SELECT COALESCE(MAX(seq), 0) FROM events))
                ON CONFLICT (id) DO UPDATE SET base = MIN(base, excluded.base);
            END
            """,
        ],
    ),
    (
        # SMS submissions (issue 15): SMSC message id -> message, recipient, part.
        5,
        [
            """
            CREATE TABLE sms_submissions (
                message_id TEXT PRIMARY KEY,
                queue_id TEXT NOT NULL,
                recipient TEXT NOT NULL,
                part INTEGER NOT NULL,
                parts INTEGER NOT NULL,
                time REAL NOT NULL,
                tag TEXT,
                metadata TEXT NOT NULL
            ) WITHOUT ROWID
            """,
            "CREATE INDEX sms_submissions_message ON sms_submissions (queue_id, recipient, part)",
            "CREATE INDEX sms_submissions_time ON sms_submissions (time)",
        ],
    ),
]

SCHEMA_VERSION = MIGRATIONS[-1][0]

_BUMP = (
    "INSERT INTO counters (interval, bucket, dim, key, type, count)"
    " VALUES (?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (interval, dim, key, bucket, type)"
    " DO UPDATE SET count = count + excluded.count"
)

_SUPPRESSION_COLUMNS = "address, reason, source_event, time, expires"

# Of two adds for one address the one with the later time wins.
_UPSERT_SUPPRESSION = (
    f"INSERT INTO suppressions ({_SUPPRESSION_COLUMNS}) VALUES (?, ?, ?, ?, ?)"
    " ON CONFLICT (address) DO UPDATE SET"
    " reason = excluded.reason, source_event = excluded.source_event,"
    " time = excluded.time, expires = excluded.expires"
    " WHERE excluded.time >= suppressions.time"
)

# Addresses per SELECT of checkSuppressions (below SQLite's variable limit).
_CHECK_CHUNK = 500

_COLUMNS = "seq, id, time, type, queue_id, recipient, tag, metadata, detail"

#: Unique open / click keys (queue id, recipient, type) the database
#: thread remembers as recorded, so that a repeated open or click costs no
#: query (all are forgotten when there would be more).
SEEN_KEPT = 100_000

# Keys inserted into C{seen} by one statement (4 parameters each).
_SEEN_ROWS = 200

_INSERT = (
    "INSERT INTO events"
    " (id, time, type, queue_id, recipient, recipient_norm, tag, metadata, detail)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def _toRow(event: Event) -> tuple:
    return (
        event.id,
        event.time,
        event.type,
        event.queue_id,
        event.recipient,
        normaliseRecipient(event.recipient),
        event.tag,
        json.dumps(event.metadata),
        json.dumps(event.detail),
    )


def _counting(event: Event) -> tuple:
    """
    What appending C{event} does to the statistics: the counters it bumps
    in any case, and the (queue id, recipient, type) triple with the
    counters it bumps if that triple was not seen before (or L{None}).
    """
    bumps = counterBumps(event, eventCounterTypes(event))
    unique = uniqueKey(event)
    if unique is None:
        return bumps, None
    return bumps, (unique, event.time, counterBumps(event, [UNIQUE_TYPES[event.type]]))


def _encodeEvents(events: list) -> tuple:
    """
    The rows of C{events} and what they do to the statistics, as
    L{_toRow} and L{_counting} make them, event by event, but with the work
    that repeats done once per batch: a C{metadata} or C{detail} dict that
    is the same object as one already encoded in this batch (the scheduler
    gives every parked recipient of one suspension the same detail) is
    encoded once, an empty one is C{"{}"}, and the counters of events that
    share their type, tag, recipient domain and hour and day (and, for
    opens and clicks, their unique counters) are computed once and
    counted.

    @return: C{(rows, bumps, uniques)}: C{bumps} a L{Counter} of the
        counters every event bumps, C{uniques} the C{(key, time, bumps)} of
        opens and clicks in order.
    """
    rows = []
    uniques = []
    encode = BatchJSON()
    counters = BatchCounters()
    uniqueBumpsOf: dict = {}  # counters key -> its unique open / click counters
    for event in events:
        recipient = event.recipient
        rows.append(
            (
                event.id,
                event.time,
                event.type,
                event.queue_id,
                recipient,
                normaliseRecipient(recipient),
                event.tag,
                encode(event.metadata),
                encode(event.detail),
            )
        )
        key = counters.add(event)
        if (
            key is not None
            and event.type in UNIQUE_TYPES
            and event.queue_id is not None
            and recipient is not None
        ):
            # An open or a click (a campaign's busiest events): its
            # unique counters are those of the others alike, made once.
            uniqueBumps = uniqueBumpsOf.get(key)
            if uniqueBumps is None:
                uniqueBumps = uniqueBumpsOf[key] = counterBumps(
                    event, [UNIQUE_TYPES[event.type]]
                )
            uniques.append(((event.queue_id, rows[-1][5], event.type), event.time, uniqueBumps))
    return rows, counters.total(), uniques


def _entryFromRow(row: tuple) -> SuppressionEntry:
    address, reason, source_event, time, expires = row
    return SuppressionEntry(
        address=address,
        reason=reason,
        source_event=source_event,
        time=time,
        expires=expires,
    )


def _fromRow(row: tuple) -> Event:
    _, id, time, type, queue_id, recipient, tag, metadata, detail = row
    return Event(
        type=type,
        queue_id=queue_id,
        recipient=recipient,
        time=time,
        tag=tag,
        metadata=json.loads(metadata),
        detail=json.loads(detail),
        id=id,
    )


def _migrate(conn: sqlite3.Connection) -> tuple[int, list[int]]:
    """
    Bring the schema up to L{SCHEMA_VERSION} in one transaction.

    @return: the version found and the versions applied.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY)"
        )
        (found,) = conn.execute(
            "SELECT COALESCE(MAX(version), 0) FROM schema_version"
        ).fetchone()
        if found > SCHEMA_VERSION:
            raise UnsupportedSchema(
                f"event store schema version {found} is newer than the"
                f" newest this smartrelay knows ({SCHEMA_VERSION})"
            )
        applied = []
        for version, statements in MIGRATIONS:
            if version <= found:
                continue
            for statement in statements:
                conn.execute(statement)
            conn.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
            applied.append(version)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return found, applied


@implementer(IStore, IEventStreams, ISMSSubmissions)
@attrs.define
class SQLiteStore:
    """
    An L{IStore} in one SQLite database file.

    @ivar path: the database file (created if missing).
    @ivar _runInThread: C{runInThread(f, *args, **kwargs) -> Deferred}
        runs C{f} in the store's one database thread, in call order.
    @ivar _afterClose: called (on the reactor thread) once C{close} has
        closed the connection; L{inThreadPool} uses it to stop the pool.
    """

    path: str
    _runInThread: Callable[..., Deferred] = attrs.field(alias="runInThread")
    _afterClose: Optional[Callable[[], object]] = attrs.field(
        default=None, kw_only=True, alias="afterClose"
    )
    # Only the database thread touches _conn; only the reactor thread
    # touches the rest.
    _conn: Optional[sqlite3.Connection] = attrs.field(default=None, init=False)
    #: Unique open / click keys known to be in C{seen} (the database
    #: thread's, like _conn; at most L{SEEN_KEPT}).
    _seen: set = attrs.field(factory=set, init=False, repr=False)
    _closed: bool = attrs.field(default=False, init=False)
    _closeDone: bool = attrs.field(default=False, init=False)
    _closeWaiters: list = attrs.field(factory=list, init=False)

    log = Logger()

    @classmethod
    def inThreadPool(
        cls, path: str, reactor: Any, name: str = "smartrelay-sqlite"
    ) -> tuple["SQLiteStore", ThreadPool]:
        """
        A store whose SQLite work runs in a new, started, one-thread pool.

        C{close()} stops the pool.  Should the reactor shut down without
        C{close()} having been called, the pool is stopped during shutdown
        (after queued work finishes) so that its thread cannot keep the
        process alive.

        @param reactor: provides L{IReactorFromThreads} and
            L{IReactorCore}.
        @return: the store and its pool.
        """
        pool = ThreadPool(minthreads=1, maxthreads=1, name=name)
        pool.start()
        trigger = None

        def runInThread(f, *args, **kwargs):
            return deferToThreadPool(reactor, pool, f, *args, **kwargs)

        def afterClose():
            nonlocal trigger
            if trigger is not None:
                reactor.removeSystemEventTrigger(trigger)
                trigger = None
            if not pool.joined:
                pool.stop()

        def atShutdown():
            nonlocal trigger
            trigger = None
            if not pool.joined:
                store._abandon()
                # Queued work, then the connection's close, run before the
                # pool's thread quits.
                pool.callInThread(store._closeConnection)
                pool.stop()

        store = cls(path, runInThread, afterClose=afterClose)
        trigger = reactor.addSystemEventTrigger("during", "shutdown", atShutdown)
        return store, pool

    # -- reactor thread --------------------------------------------------

    def _run(self, f: Callable, *args) -> Deferred:
        if self._closed:
            return fail(StoreClosed("the event store is closed"))
        return self._runInThread(f, *args)

    def start(self) -> Deferred:
        d = self._run(self._open)

        def opened(result):
            if result is not None:
                mode, found, applied = result
                self.log.info(
                    "Opened event store {path} (schema version {version},"
                    " journal mode {mode}, migrations applied: {applied})",
                    path=self.path,
                    version=found if not applied else applied[-1],
                    mode=mode,
                    applied=applied,
                )
                if mode != "wal":
                    self.log.warn(
                        "Event store {path} is not in WAL mode (got {mode})",
                        path=self.path,
                        mode=mode,
                    )

        return d.addCallback(opened)

    def close(self) -> Deferred:
        if self._closeDone:
            return succeed(None)
        if self._closed:
            waiter = Deferred()
            self._closeWaiters.append(waiter)
            return waiter
        # Already queued work runs before the close (one thread, in order);
        # anything called from now on fails with StoreClosed.
        d = self._runInThread(self._closeConnection)
        self._closed = True

        def finished(result):
            self._closeDone = True
            try:
                if self._afterClose is not None:
                    self._afterClose()
            finally:
                waiters, self._closeWaiters = self._closeWaiters, []
                for waiter in waiters:
                    waiter.callback(None)
            return result

        return d.addBoth(finished)

    def _abandon(self) -> None:
        """
        Mark the store closed without going through the database thread
        (which is about to stop); any C{close} still in progress is
        considered done.
        """
        self._closed = True
        self._closeDone = True
        waiters, self._closeWaiters = self._closeWaiters, []
        for waiter in waiters:
            waiter.callback(None)

    def appendEvents(self, events: list[Event]) -> Deferred:
        if self._closed:
            return fail(StoreClosed("the event store is closed"))
        # Encode on the calling thread: the batch is a snapshot of the
        # events as they were when appended, and a value that cannot be
        # encoded fails before anything is written.
        try:
            rows, bumps, uniques = _encodeEvents(events)
        except Exception:
            return fail()
        return self._run(self._append, rows, bumps, uniques)

    def eventsForMessage(self, queue_id: str) -> Deferred:
        return self._run(self._eventsForMessage, queue_id)

    def queryEvents(
        self,
        *,
        type: Optional[str] = None,
        queue_id: Optional[str] = None,
        recipient: Optional[str] = None,
        tag: Optional[str] = None,
        since: Optional[float] = None,
        until: Optional[float] = None,
        cursor: Optional[str] = None,
        limit: int = 100,
    ) -> Deferred:
        try:
            limit = checkLimit(limit)
            since = checkTime("since", since)
            until = checkTime("until", until)
            after = None if cursor is None else decodeCursor(cursor)
        except ValueError:
            return fail()

        clauses = []
        params: list[Any] = []
        for column, value in [
            ("type", type),
            ("queue_id", queue_id),
            ("recipient_norm", normaliseRecipient(recipient)),
            ("tag", tag),
        ]:
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(value)
        if since is not None:
            clauses.append("time >= ?")
            params.append(since)
        if until is not None:
            clauses.append("time < ?")
            params.append(until)
        if after is not None:
            clauses.append("(time, seq) > (?, ?)")
            params.extend(after)
        sql = f"SELECT {_COLUMNS} FROM events"
        if clauses:
            sql += " WHERE " + " AND ".join(clauses)
        sql += " ORDER BY time, seq LIMIT ?"
        # One more than asked for tells whether there is a next page.
        params.append(limit + 1)
        return self._run(self._query, sql, params, limit)

    def addSuppression(self, entry: SuppressionEntry) -> Deferred:
        if not isinstance(entry, SuppressionEntry):
            return fail(TypeError(f"not a SuppressionEntry: {entry!r}"))
        row = (
            entry.address,
            entry.reason,
            entry.source_event,
            entry.time,
            entry.expires,
        )
        d = self._run(self._execute, _UPSERT_SUPPRESSION, row)
        return d.addCallback(lambda rowcount: None)

    def removeSuppression(self, address: str) -> Deferred:
        try:
            address = normaliseAddress(address)
        except ValueError:
            return fail()
        d = self._run(
            self._execute, "DELETE FROM suppressions WHERE address = ?", (address,)
        )
        return d.addCallback(lambda rowcount: rowcount > 0)

    def checkSuppressions(self, addresses: list[str], now: float) -> Deferred:
        try:
            pairs = checkAddresses(addresses)
            now = checkTime("now", now)
            if now is None:
                raise ValueError("now is required")
        except ValueError:
            return fail()
        return self._run(self._checkSuppressions, pairs, now)

    def listSuppressions(
        self,
        *,
        prefix: Optional[str] = None,
        reason: Optional[str] = None,
        cursor: Optional[str] = None,
        limit: int = 100,
    ) -> Deferred:
        try:
            limit = checkLimit(limit)
            reason = checkReason(reason)
            prefix = normalisePrefix(prefix)
            after = None if cursor is None else decodeSuppressionCursor(cursor)
        except ValueError:
            return fail()
        clauses = []
        params: list[Any] = []
        if prefix:
            clauses.append("address >= ?")
            params.append(prefix)
            upper = prefixUpperBound(prefix)
            if upper is not None:
                clauses.append("address < ?")
                params.append(upper)
        if reason is not None:
            clauses.append("reason = ?")
            params.append(reason)
        if after is not None:
            clauses.append("address > ?")
            params.append(after)
        sql = f"SELECT {_SUPPRESSION_COLUMNS} FROM suppressions"
        if clauses:
            sql += " WHERE " + " AND ".join(clauses)
        sql += " ORDER BY address LIMIT ?"
        params.append(limit + 1)
        return self._run(self._listSuppressions, sql, params, limit)

    def statistics(
        self,
        *,
        since: float,
        until: float,
        interval: str = "hour",
        tag: Optional[str] = None,
        domain: Optional[str] = None,
    ) -> Deferred:
        try:
            since, until, size, dim, key, first = checkStatisticsArguments(
                since, until, interval, tag, domain
            )
        except ValueError:
            return fail()
        d = self._run(self._counters, interval, dim, key, first, until)
        return d.addCallback(
            lambda counters: buildStatistics(
                since=since,
                until=until,
                interval=interval,
                tag=tag,
                domain=domain,
                counters=counters,
            )
        )

    def pruneEvents(self, before: float, limit: int = 10000) -> Deferred:
        try:
            before, limit = checkPruneArguments(before, limit)
        except ValueError:
            return fail()
        return self._run(self._prune, before, limit)

    def takeTokens(
        self, key: str, rate: float, burst: float, now: float, count: float = 1
    ) -> Deferred:
        try:
            args = checkTokenArguments(key, rate, burst, now, count)
        except ValueError:
            return fail()
        return self._run(self._takeTokens, *args)

    # -- database thread -------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreClosed("the event store is not open")
        return self._conn

    def _open(self) -> Optional[tuple[str, int, list[int]]]:
        if self._conn is not None:
            return None
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            (mode,) = conn.execute("PRAGMA journal_mode=WAL").fetchone()
            conn.execute("PRAGMA synchronous=NORMAL")
            found, applied = _migrate(conn)
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        return mode, found, applied

    def _closeConnection(self) -> None:
        conn, self._conn = self._conn, None
        self._seen.clear()
        if conn is not None:
            try:
                conn.execute("PRAGMA optimize")
            finally:
                conn.close()

    def _append(self, rows: list[tuple], always: Counter, uniques: list[tuple]) -> None:
        """
        Insert the rows of L{_encodeEvents} and bump the counters (C{always}
        and, for the opens and clicks not seen before, theirs) in one
        transaction.
        """
        conn = self._connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(_INSERT, rows)
            bumps: Counter = Counter(always)
            checked = self._countUniques(conn, uniques, bumps) if uniques else ()
            conn.executemany(
                _BUMP, [(*counter, count) for counter, count in bumps.items()]
            )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        if checked:
            seen = self._seen
            if len(seen) + len(checked) > SEEN_KEPT:
                seen.clear()
            seen.update(checked)

    def _countUniques(self, conn, uniques: list[tuple], bumps: Counter) -> list:
        """
        Record the opens and clicks of C{uniques} (C{(key, time, bumps)})
        in C{seen} and add to C{bumps} the unique counters of those whose
        key was not there: the keys this thread knows to be there (L{_seen},
        those of recent batches) are not asked about again, and the others
        are inserted with one statement per L{_SEEN_ROWS} keys, which
        returns the keys it added.

        @return: the keys now in C{seen} (once this transaction commits).
        """
        known = self._seen
        fresh: dict = {}
        for key, time, uniqueBumps in uniques:
            if key not in known and key not in fresh:
                fresh[key] = (time, uniqueBumps)
        if not fresh:
            return []
        items = list(fresh.items())
        for start in range(0, len(items), _SEEN_ROWS):
            chunk = items[start : start + _SEEN_ROWS]
            params = []
            for (queueID, recipient, type), (time, _) in chunk:
                params += (queueID, recipient, type, time)
            added = conn.execute(
                "INSERT OR IGNORE INTO seen (queue_id, recipient_norm, type, time)"
                " VALUES " + ", ".join(["(?, ?, ?, ?)"] * len(chunk))
                + " RETURNING queue_id, recipient_norm, type",
                params,
            ).fetchall()
            for row in added:
                bumps.update(fresh[tuple(row)][1])
        return list(fresh)

    def _eventsForMessage(self, queue_id: str) -> list[Event]:
        rows = self._connection().execute(
            f"SELECT {_COLUMNS} FROM events WHERE queue_id = ? ORDER BY time, seq",
            (queue_id,),
        )
        return [_fromRow(row) for row in rows]

    def _query(self, sql: str, params: list, limit: int) -> EventPage:
        rows = self._connection().execute(sql, params).fetchall()
        cursor = None
        if len(rows) > limit:
            del rows[limit:]
            seq, _, time = rows[-1][:3]
            cursor = encodeCursor(time, seq)
        return EventPage(events=[_fromRow(row) for row in rows], cursor=cursor)

    def _execute(self, sql: str, params: tuple) -> int:
        return self._connection().execute(sql, params).rowcount

    def _checkSuppressions(
        self, pairs: list[tuple[str, str]], now: float
    ) -> dict[str, SuppressionEntry]:
        conn = self._connection()
        wanted = sorted({normalised for _, normalised in pairs})
        entries = {}
        for i in range(0, len(wanted), _CHECK_CHUNK):
            chunk = wanted[i : i + _CHECK_CHUNK]
            marks = ", ".join("?" * len(chunk))
            for row in conn.execute(
                f"SELECT {_SUPPRESSION_COLUMNS} FROM suppressions"
                f" WHERE address IN ({marks})",
                chunk,
            ):
                entry = _entryFromRow(row)
                if entry.activeAt(now):
                    entries[entry.address] = entry
        return {
            given: entries[normalised]
            for given, normalised in pairs
            if normalised in entries
        }

    def _listSuppressions(self, sql: str, params: list, limit: int) -> SuppressionPage:
        rows = self._connection().execute(sql, params).fetchall()
        cursor = None
        if len(rows) > limit:
            del rows[limit:]
            cursor = encodeSuppressionCursor(rows[-1][0])
        entries = [_entryFromRow(row) for row in rows]
        return SuppressionPage(entries=entries, cursor=cursor)

    def _counters(
        self, interval: str, dim: str, key: str, first: int, until: float
    ) -> list[tuple[int, str, int]]:
        return self._connection().execute(
            "SELECT bucket, type, count FROM counters"
            " WHERE interval = ? AND dim = ? AND key = ?"
            " AND bucket >= ? AND bucket < ?",
            (interval, dim, key, first, until),
        ).fetchall()

    def _prune(self, before: float, limit: int) -> int:
        """
        Delete at most C{limit} of the oldest events before C{before}, then,
        with what is left of C{limit}, unique open / click records before
        it: one short transaction, both read through their time index.
        """
        conn = self._connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            deleted = conn.execute(
                "DELETE FROM events WHERE seq IN"
                " (SELECT seq FROM events WHERE time < ? ORDER BY time, seq LIMIT ?)",
                (before, limit),
            ).rowcount
            if deleted < limit:
                unseen = conn.execute(
                    "DELETE FROM seen WHERE (queue_id, recipient_norm, type) IN"
                    " (SELECT queue_id, recipient_norm, type FROM seen"
                    " WHERE time < ? ORDER BY time LIMIT ?)",
                    (before, limit - deleted),
                ).rowcount
                if unseen:
                    # Those keys count as unique again: ask about all.
                    self._seen.clear()
                deleted += unseen
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return deleted

    def _takeTokens(self, key, rate, burst, now, count):
        conn = self._connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            state = conn.execute(
                "SELECT tokens, updated FROM token_buckets WHERE key = ?", (key,)
            ).fetchone()
            (tokens, updated), result = takeFromBucket(state, rate, burst, now, count)
            conn.execute(
                "INSERT OR REPLACE INTO token_buckets (key, tokens, updated)"
                " VALUES (?, ?, ?)",
                (key, tokens, updated),
            )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return result

    # -- event streams and outboxes (IEventStreams) ----------------------

    def claimEvents(self, stream, owner, now, limit=None, begin="oldest") -> Deferred:
        try:
            args = checkClaimArguments(stream, owner, now, limit, begin)
        except ValueError:
            return fail()
        return self._run(self._claimEvents, *args)

    def claimedEvents(self, claim, cursor=None, limit=1000) -> Deferred:
        try:
            after, upTo = claimPage(claim, cursor, limit)
        except (TypeError, ValueError):
            return fail()
        d = self._run(
            self._rows,
            f"SELECT {_COLUMNS} FROM events WHERE seq > ? AND seq <= ? ORDER BY seq",
            (after, upTo),
        )
        return d.addCallback(
            lambda rows: EventPage(
                events=[_fromRow(row) for row in rows], cursor=claimCursor(claim, upTo)
            )
        )

    def finishClaim(self, claim) -> Deferred:
        try:
            checkClaim(claim)
        except TypeError:
            return fail()
        return self._run(self._inTransaction, self._finishClaim, claim)

    def addToOutbox(self, outbox, batches, claim=None) -> Deferred:
        try:
            checkStreamName(outbox)
            batches = checkBatches(batches)
            if claim is not None:
                checkClaim(claim)
        except (TypeError, ValueError):
            return fail()
        rows = [
            (outbox, b.id, b.body, b.created, b.due, b.attempts) for b in batches
        ]
        return self._run(self._inTransaction, self._addToOutbox, rows, claim)

    def takeFromOutbox(self, outbox, now, lease, limit=10) -> Deferred:
        try:
            args = checkTakeArguments(outbox, now, lease, limit)
        except ValueError:
            return fail()
        return self._run(self._inTransaction, self._takeFromOutbox, *args)

    def deferInOutbox(self, outbox, id, due) -> Deferred:
        try:
            checkStreamName(outbox)
            due = checkTime("due", due)
            if due is None:
                raise ValueError("due is required")
        except ValueError:
            return fail()
        d = self._run(
            self._execute,
            "UPDATE outbox SET due = ?, attempts = attempts + 1"
            " WHERE outbox = ? AND id = ?",
            (due, outbox, id),
        )
        return d.addCallback(lambda rowcount: rowcount > 0)

    def removeFromOutbox(self, outbox, id) -> Deferred:
        try:
            checkStreamName(outbox)
        except ValueError:
            return fail()
        d = self._run(
            self._execute, "DELETE FROM outbox WHERE outbox = ? AND id = ?", (outbox, id)
        )
        return d.addCallback(lambda rowcount: rowcount > 0)

    def outboxSize(self, outbox) -> Deferred:
        try:
            checkStreamName(outbox)
        except ValueError:
            return fail()
        d = self._run(self._rows, "SELECT COUNT(*) FROM outbox WHERE outbox = ?", (outbox,))
        return d.addCallback(lambda rows: rows[0][0])

    # database thread

    def _rows(self, sql: str, params: tuple) -> list:
        return self._connection().execute(sql, params).fetchall()

    def _inTransaction(self, f: Callable, *args):
        conn = self._connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = f(conn, *args)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return result

    def _claimEvents(self, stream, owner, now, limit, begin):
        return self._inTransaction(self._claimIn, stream, owner, now, limit, begin)

    def _claimIn(self, conn, stream, owner, now, limit, begin):
        reused = conn.execute("SELECT base FROM event_seq_reuse WHERE id = 0").fetchone()
        if reused is not None:
            (base,) = reused
            conn.execute("UPDATE event_streams SET cursor = MIN(cursor, ?)", (base,))
            conn.execute(
                "UPDATE event_claims SET after = MIN(after, ?), last = MIN(last, ?)",
                (base, base),
            )
            conn.execute("DELETE FROM event_seq_reuse")
        row = conn.execute(
            "SELECT after, last, time FROM event_claims WHERE stream = ? AND owner = ?",
            (stream, owner),
        ).fetchone()
        if row is not None:
            return EventClaim(stream, owner, *row)
        (top,) = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()
        row = conn.execute(
            "SELECT cursor FROM event_streams WHERE name = ?", (stream,)
        ).fetchone()
        if row is None:
            cursor = top if begin == "newest" else 0
            conn.execute(
                "INSERT INTO event_streams (name, cursor) VALUES (?, ?)", (stream, cursor)
            )
        else:
            (cursor,) = row
        if top <= cursor:
            return None
        last = top if limit is None else min(top, cursor + limit)
        conn.execute(
            "INSERT INTO event_claims (stream, owner, after, last, time)"
            " VALUES (?, ?, ?, ?, ?)",
            (stream, owner, cursor, last, now),
        )
        conn.execute("UPDATE event_streams SET cursor = ? WHERE name = ?", (last, stream))
        return EventClaim(stream, owner, cursor, last, now)

    def _finishClaim(self, conn, claim) -> bool:
        return conn.execute(
            "DELETE FROM event_claims WHERE stream = ? AND owner = ?"
            " AND after = ? AND last = ? AND time = ?",
            (claim.stream, claim.owner, claim.after, claim.last, claim.time),
        ).rowcount > 0

    def _addToOutbox(self, conn, rows, claim) -> None:
        conn.executemany(
            "INSERT OR IGNORE INTO outbox (outbox, id, body, created, due, attempts)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            rows,
        )
        if claim is not None:
            self._finishClaim(conn, claim)

    def _takeFromOutbox(self, conn, outbox, now, lease, limit) -> list:
        rows = conn.execute(
            "SELECT id, body, created, attempts FROM outbox"
            " WHERE outbox = ? AND due <= ? ORDER BY due, id LIMIT ?",
            (outbox, now, limit),
        ).fetchall()
        due = now + lease
        conn.executemany(
            "UPDATE outbox SET due = ? WHERE outbox = ? AND id = ?",
            [(due, outbox, id) for id, _, _, _ in rows],
        )
        return [
            OutboxBatch(id=id, body=body, created=created, due=due, attempts=attempts)
            for id, body, created, attempts in rows
        ]


    # -- SMS submissions (ISMSSubmissions, issue 15) ----------------------

    _SMS_COLUMNS = "message_id, queue_id, recipient, part, parts, time, tag, metadata"

    def addSMSSubmission(self, submission) -> Deferred:
        if not isinstance(submission, SMSSubmission):
            return fail(TypeError("an SMSSubmission is needed"))
        try:
            metadata = json.dumps(submission.metadata)
        except (TypeError, ValueError):
            return fail()
        row = (
            submission.message_id, submission.queue_id, submission.recipient,
            submission.part, submission.parts, submission.time, submission.tag, metadata,
        )
        return self._run(self._execute, (
            f"INSERT OR REPLACE INTO sms_submissions ({self._SMS_COLUMNS})"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
        ), row).addCallback(lambda _: None)

    @staticmethod
    def _smsFromRow(row) -> SMSSubmission:
        message_id, queue_id, recipient, part, parts, time, tag, metadata = row
        return SMSSubmission(
            message_id=message_id, queue_id=queue_id, recipient=recipient, part=part,
            parts=parts, time=time, tag=tag, metadata=json.loads(metadata),
        )

    def findSMSSubmission(self, message_id) -> Deferred:
        try:
            message_id = normaliseSMSMessageID(message_id)
        except ValueError:
            return fail()
        return self._run(self._selectSMS, "message_id = ?", (message_id,)).addCallback(
            lambda found: found[0] if found else None
        )

    def smsSubmissions(self, queue_id, recipient) -> Deferred:
        return self._run(
            self._selectSMS, "queue_id = ? AND recipient = ? ORDER BY part, time",
            (str(queue_id), str(recipient)),
        )

    def _selectSMS(self, where: str, params: tuple) -> list:
        rows = self._connection().execute(
            f"SELECT {self._SMS_COLUMNS} FROM sms_submissions WHERE {where}", params
        ).fetchall()
        return [self._smsFromRow(row) for row in rows]

    def pruneSMSSubmissions(self, before, limit=10000) -> Deferred:
        try:
            before, limit = checkPruneArguments(before, limit)
        except ValueError:
            return fail()
        return self._run(self._execute, (
            "DELETE FROM sms_submissions WHERE message_id IN"
            " (SELECT message_id FROM sms_submissions WHERE time < ? ORDER BY time LIMIT ?)"
        ), (before, limit))
