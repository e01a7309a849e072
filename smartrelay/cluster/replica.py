"""
The local, durable replica of the suppression list: what a node checks
recipients against while the store cannot be reached, so that a Redis
outage never sends blind.

L{SuppressionReplica} copies the whole list from the store every
C{interval} seconds (page by page, C{listSuppressions}), keeps it in memory
for checks and writes it to C{data_dir/suppression-replica.jsonl} (a new
file, fsynced, renamed over the old one, in a thread), so a node that
restarts during an outage still has it.  The copy's age is counted from
the start of the sync that made it: a recipient is checked against it only
while that age is at most C{[smartrelay] suppression_max_staleness};
otherwise the scheduler holds the recipient and retries later.

When the store comes back without its data (L{storeLostData}: a Redis
restarted without persistence, or a new one), the copy is not replaced by
the empty list: it is put back into the store first, and until that is
done it is merged into every check
(L{DurableSuppressions <smartrelay.cluster.suppressions.DurableSuppressions>}),
so an address unsubscribed before the loss is not mailed after it.
"""

import json
import os
from collections.abc import Mapping
from typing import Any, Callable, Optional

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from smartrelay.store.interfaces import SuppressionEntry, checkAddresses

__all__ = ["SuppressionReplica", "REPLICA_FILE"]

REPLICA_FILE = "suppression-replica.jsonl"

#: Entries per page when copying the list from the store.
PAGE = 1000


def _writeSnapshot(path: str, synced: float, entries: list) -> None:
    """
    Write the replica file: a header line, then one entry per line;
    durable (fsync) and atomic (rename) before it replaces the old one.
    """
    temporary = path + ".new"
    with open(temporary, "w", encoding="utf-8") as f:
        f.write(json.dumps({"synced": synced, "count": len(entries)}) + "\n")
        for entry in entries:
            f.write(json.dumps(attrs.asdict(entry), separators=(",", ":")) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)
    directory = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _readSnapshot(path: str) -> Optional[tuple]:
    """
    @return: C{(synced, entries)} from the replica file, or L{None} if there
        is none, or it is damaged or incomplete (it is then ignored).
    """
    try:
        with open(path, encoding="utf-8") as f:
            header = json.loads(f.readline())
            entries = [SuppressionEntry(**json.loads(line)) for line in f]
    except FileNotFoundError:
        return None
    except (ValueError, TypeError, KeyError, AttributeError):
        return None
    if not isinstance(header, dict) or header.get("count") != len(entries):
        return None
    return float(header["synced"]), entries


@attrs.define(eq=False, slots=False, repr=False)
class SuppressionReplica(Service):
    """
    A copy of the store's suppression list, kept current and on disk.

    @ivar store: the L{IStore} to copy from.
    @ivar clock: an L{IReactorTime}.
    @ivar path: the replica file.
    @ivar maxStaleness: seconds the copy may be old and still be used.
    @ivar interval: seconds between syncs.
    @ivar runInThread: C{runInThread(f, *args) -> Deferred}: where the
        file is read and written (a thread pool in the relay).
    @ivar pending: normalised address -> L{SuppressionEntry}: entries this
        node has kept for the store and the store does not have yet (the
        event log's C{pendingSuppressions}, replayed from its journal);
        checked as part of the copy whatever a sync brings.
    """

    store: Any
    clock: Any
    path: str
    maxStaleness: float = 600.0
    interval: float = 60.0
    runInThread: Callable = maybeDeferred
    pending: Mapping = attrs.field(factory=dict)
    _entries: dict = attrs.field(factory=dict, init=False)
    #: When the sync that made the copy started (clock seconds), or None.
    synced: Optional[float] = attrs.field(default=None, init=False)
    _loop: Any = attrs.field(default=None, init=False)
    _syncing: bool = attrs.field(default=False, init=False)
    #: Recipients checked against the copy because the store failed.
    checkedLocally: int = attrs.field(default=0, init=False)
    #: Recipients held because the copy was missing or too old.
    held: int = attrs.field(default=0, init=False)
    #: Whether the last sync failed (the store could not be read).
    failing: bool = attrs.field(default=False, init=False)
    #: Whether the copy must be put back into the store (it lost its data)
    #: and is meanwhile merged into every check.
    restoring: bool = attrs.field(default=False, init=False)
    #: Data losses of the store signalled so far.
    _losses: int = attrs.field(default=0, init=False)
    #: Unsubscribes that came by mail and cannot be attributed while the
    #: store cannot be reached: key (the report id) -> the entry for the
    #: address the report names, checked until L{releaseProvisional}.
    _provisional: dict = attrs.field(factory=dict, init=False)

    log = Logger()

    def __repr__(self) -> str:
        return f"<SuppressionReplica {len(self._entries)} entries synced={self.synced}>"

    def load(self) -> Deferred:
        """
        Read the replica file left by the last run (if any).
        """
        d = self.runInThread(_readSnapshot, self.path)

        def loaded(snapshot: Optional[tuple]) -> None:
            if snapshot is not None and (self.synced is None or snapshot[0] > self.synced):
                self.synced, entries = snapshot
                self._entries = {e.address: e for e in entries}

        def unreadable(failure: Any) -> None:
            self.log.warn(
                "cannot read the suppression replica {path} ({why}); starting without one",
                path=self.path,
                why=failure.getErrorMessage() or failure.type.__name__,
            )

        return d.addCallback(loaded).addErrback(unreadable)

    def startService(self) -> None:
        Service.startService(self)
        self._loop = LoopingCall(self.sync)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=True).addErrback(
            lambda f: self.log.failure("suppression replica sync stopped", f)
        )

    def stopService(self) -> None:
        Service.stopService(self)
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def sync(self) -> Deferred:
        """
        Copy the list from the store and write it to disk; a failure is
        logged and the old copy kept.
        """
        return Deferred.fromCoroutine(self._sync())

    async def _sync(self) -> None:
        if self._syncing:
            return
        self._syncing = True
        started = self.clock.seconds()
        try:
            while True:
                losses = self._losses
                if self.restoring:
                    await self._restore()
                started = self.clock.seconds()
                entries = await self._copy()
                if losses == self._losses:
                    break
                # The store lost its data while it was being copied: what
                # was read may be the empty list; put the copy back first.
            await self.runInThread(_writeSnapshot, self.path, started, entries)
        except Exception as e:
            self.failing = True
            self.log.warn(
                "could not refresh the local suppression replica ({why}); "
                "keeping the copy of {age}",
                why=str(e) or type(e).__name__,
                age="never" if self.synced is None else f"{started - self.synced:.0f}s ago",
            )
            return
        finally:
            self._syncing = False
        self._entries = {e.address: e for e in entries}
        self.synced = started
        self.failing = False

    async def _copy(self) -> list:
        """
        Every entry in the store, page by page.
        """
        entries, cursor = [], None
        while True:
            page = await maybeDeferred(self.store.listSuppressions, cursor=cursor, limit=PAGE)
            entries.extend(page.entries)
            cursor = page.cursor
            if cursor is None:
                return entries

    async def _restore(self) -> None:
        """
        Put every entry of the copy into the store (its upsert keeps an
        entry with a later time that a node wrote since).
        """
        losses = self._losses
        entries = list(self._entries.values())
        for start in range(0, len(entries), PAGE):
            await gatherResults(
                [
                    maybeDeferred(self.store.addSuppression, entry)
                    for entry in entries[start : start + PAGE]
                ],
                consumeErrors=True,
            )
        if losses == self._losses:
            self.restoring = False
        self.log.info(
            "put {count} suppressions from the local replica back into the store",
            count=len(entries),
        )

    def storeLostData(self) -> None:
        """
        The store came back without its data: keep the copy, merge it into
        every check and put it back into the store (now, and again at each
        sync until that succeeds).
        """
        self._losses += 1
        self.restoring = True
        self.log.warn(
            "the store lost its suppression list; putting this node's copy of"
            " {count} entries back",
            count=len(self._entries),
        )
        if self.running:
            # Not from inside the store's connection set-up, which calls this.
            self.clock.callLater(0, self.sync)

    def holdProvisionally(self, key: str, entry: SuppressionEntry) -> None:
        """
        Check recipients against C{entry} too, whatever syncs bring, until
        L{releaseProvisional}C{(key)}: an unsubscribe this node received
        and cannot put on the list yet (it never goes to the store from
        here).
        """
        self._provisional[key] = entry

    def releaseProvisional(self, key: str) -> None:
        """
        Stop checking against the entry held for C{key}, if any.
        """
        self._provisional.pop(key, None)

    def lookupProvisional(self, addresses: list, now: float) -> dict:
        """
        Like L{lookup}, against the provisional entries alone.
        """
        if not self._provisional:
            return {}
        held = {e.address: e for e in self._provisional.values()}
        found = {}
        for given, normalised in checkAddresses(addresses):
            entry = held.get(normalised)
            if entry is not None and entry.activeAt(now):
                found[given] = entry
        return found

    def remember(self, entry: SuppressionEntry) -> None:
        """
        Add an entry this node has just put on the list (in memory; the
        next sync writes it).
        """
        known = self._entries.get(entry.address)
        if known is None or entry.time >= known.time:
            self._entries[entry.address] = entry

    def __len__(self) -> int:
        """
        The entries in the copy.
        """
        return len(self._entries)

    def age(self, now: float) -> Optional[float]:
        """
        Seconds since the copy was made, or L{None} when there is none.
        """
        return None if self.synced is None else max(0.0, now - self.synced)

    def fresh(self, now: float) -> bool:
        """
        Whether the copy may be used at C{now}.
        """
        age = self.age(now)
        return age is not None and age <= self.maxStaleness

    def check(self, addresses: list, now: float) -> dict:
        """
        Like C{IStore.checkSuppressions}, against the copy (counted in
        L{checkedLocally}).

        @raise ValueError: for a bad address.
        """
        found = self.lookup(addresses, now)
        self.checkedLocally += len(addresses)
        return found

    def lookup(self, addresses: list, now: float, provisional: bool = True) -> dict:
        """
        Like L{check}, not counted.

        @param provisional: whether to include the provisional entries.
        """
        found = self.lookupProvisional(addresses, now) if provisional else {}
        for given, normalised in checkAddresses(addresses):
            entry = self._entries.get(normalised)
            if entry is None or not entry.activeAt(now):
                entry = self.pending.get(normalised)
            if entry is not None and entry.activeAt(now):
                found[given] = entry
        return found
