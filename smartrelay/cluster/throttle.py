"""
Adaptive throttles that hold across every node sharing the store.

A C{421}, or a temporary reply matching C{[delivery] throttle_patterns},
halves a destination's connection and rate budget for a cool-down; each
quiet cool-down then doubles it again (L{smartrelay.outbound.pool}).  With
a shared store the provider that said "slow down" to one node is slowed
down by all of them, and they recover together:

  - the state is a L{ThrottleState} in the store (L{IThrottles}): a level
    (halvings), when the first recovery step is due and the cool-down.
    Recovery is a function of time, so no node writes a recovery step and
    none can take one twice; every node computes the same steps;
  - a trigger is atomic in the store (a Lua script on Redis) and takes the
    level the node had in force: a reply to a budget another node has
    already halved does not halve it again, it only starts the cool-down
    again;
  - every node reads the throttled destinations every L{REFRESH_INTERVAL}
    seconds (one script call; nothing when none is throttled) and applies
    them, also to destinations it has not sent to yet;
  - a node applies the deeper of its own last trigger and the cluster's
    state, so an unreachable store never makes it less polite than it
    would be alone: while the store cannot be reached its own triggers
    still apply, and the cluster's last known state keeps recovering on
    its schedule;
  - a trigger that could not be written (the store unreachable) is kept,
    the deepest per destination with its time (the node's own state after
    it), and written once the store answers again (C{replayThrottle}, at
    the first call that succeeds: a read, within a second): the other
    nodes then back off too, for what is left of it.  The replay merges
    it (L{merged}): as deep as the stored state and the replayed one,
    over no later than the later of the two, so it never lasts longer
    than it would have had it been written at its time; one already over
    is dropped.

On SQLite and memory (one node) the same objects run over L{LocalThrottles};
both back ends pass the contract suite of C{tests/test_cluster_throttle.py}.
"""

from typing import Any, Callable, Optional

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from smartrelay.store.interfaces import (
    MAX_THROTTLE_LEVEL,
    IThrottles,
    ThrottleState,
    checkLeaseName,
    checkThrottleArguments,
    checkThrottleState,
    checkTime,
    merged,
    triggered,
)

__all__ = [
    "LocalThrottles",
    "SharedThrottle",
    "ThrottleBoard",
    "REFRESH_INTERVAL",
    "throttleBackend",
]

#: Seconds between two reads of the cluster's throttles: another node's
#: throttle applies here this soon.
REFRESH_INTERVAL = 1.0


@implementer(IThrottles)
@attrs.define
class LocalThrottles:
    """
    L{IThrottles} in this process (the SQLite and memory stores, which
    serve one node).  Every Deferred has fired when it is returned.
    """

    _states: dict = attrs.field(factory=dict, init=False)

    def triggerThrottle(self, destination, seen, reason, now, cooldown) -> Deferred:
        return maybeDeferred(self._trigger, destination, seen, reason, now, cooldown)

    def _trigger(self, destination, seen, reason, now, cooldown) -> ThrottleState:
        destination, seen, reason, now, cooldown = checkThrottleArguments(
            destination, seen, reason, now, cooldown
        )
        state = triggered(self._states.get(destination), seen, reason, now, cooldown)
        self._states[destination] = state
        return state

    def throttleStates(self, now) -> Deferred:
        return maybeDeferred(self._live, now)

    def replayThrottle(self, destination, state, now) -> Deferred:
        return maybeDeferred(self._replay, destination, state, now)

    def _replay(self, destination, state, now) -> Optional[ThrottleState]:
        checkLeaseName("destination", destination)
        state = checkThrottleState("state", state)
        now = checkTime("now", now)
        if now is None:
            raise ValueError("now must be POSIX seconds, not None")
        result = merged(self._states.get(destination), state, now)
        if result is None:
            self._states.pop(destination, None)
        else:
            self._states[destination] = result
        return result

    def _live(self, now) -> dict:
        now = checkTime("now", now)
        if now is None:
            raise ValueError("now must be POSIX seconds, not None")
        for name in [n for n, s in self._states.items() if s.levelAt(now) == 0]:
            del self._states[name]
        return dict(self._states)


def throttleBackend(store: Any) -> tuple:
    """
    The L{IThrottles} for C{store}: the store itself where it provides it
    (Redis, shared by the nodes), else a L{LocalThrottles}.

    @return: C{(backend, shared)}.
    """
    if IThrottles.providedBy(store):
        return store, True
    return LocalThrottles(), False


def _deeper(states: list, now: float) -> tuple:
    """
    The level in force at C{now} under the deepest of C{states} (L{None}s
    skipped), the state that sets it, and when that level next drops.
    """
    live = [s for s in states if s is not None and s.levelAt(now) > 0]
    if not live:
        return 0, None, None
    level = max(s.levelAt(now) for s in live)
    top = [s for s in live if s.levelAt(now) == level]
    # The level drops once every state holding it has stepped down.
    state = max(top, key=lambda s: (s.nextStep(now), s.until))
    return level, state, state.nextStep(now)


@attrs.define(eq=False)
class SharedThrottle:
    """
    One destination's throttle on this node: what L{Throttle
    <smartrelay.outbound.pool.Throttle>} is for a node alone (C{factor},
    C{until}, C{lastReason}, C{throttled}, C{trigger}, C{recover}), kept
    with the cluster.

    @ivar board: the L{ThrottleBoard} it belongs to.
    @ivar key: the destination key.
    @ivar cooldown: seconds between two steps of a trigger from here.
    @ivar onChange: called (no arguments) when a change made elsewhere
        (another node, a recovery step of a state read) changes the budget.
    @ivar own: this node's last trigger.
    @ivar cluster: the cluster's state, as last read or written.
    """

    board: "ThrottleBoard" = attrs.field(repr=False)
    key: str
    cooldown: float
    onChange: Optional[Callable[[], None]] = attrs.field(default=None, repr=False)
    own: Optional[ThrottleState] = None
    cluster: Optional[ThrottleState] = None
    _reported: tuple = attrs.field(default=(0, None), init=False)

    def _now(self) -> float:
        return self.board.clock.seconds()

    def _current(self) -> tuple:
        return _deeper([self.own, self.cluster], self._now())

    @property
    def level(self) -> int:
        """
        The halvings in force now.
        """
        return self._current()[0]

    @property
    def factor(self) -> float:
        """
        The share of the configured limits in force (1 = all).
        """
        return 2.0 ** -self.level

    @property
    def throttled(self) -> bool:
        return self.level > 0

    @property
    def until(self) -> Optional[float]:
        """
        When the budget next grows (clock seconds), or L{None} if whole.
        """
        return self._current()[2]

    @property
    def lastReason(self) -> Optional[str]:
        state = self._current()[1]
        return None if state is None else state.reason

    def _mark(self) -> bool:
        """
        Remember the budget in force; whether it differs from the last one
        remembered.
        """
        level, _, until = self._current()
        changed = level != self._reported[0]
        self._reported = (level, until)
        return changed

    def trigger(self, reason: str) -> bool:
        """
        A "slow down" reply: one halving more than in force now (down to
        1/16), a new cool-down; applied here at once and sent to the
        store, whose answer (the cluster's state) is applied when it comes.

        @return: whether the factor changed here.
        """
        now = self._now()
        seen = self.level
        self.own = triggered(self.own, seen, reason, now, self.cooldown)
        changed = self._mark()
        self.board._trigger(self, seen, reason, now)
        return changed

    def recover(self) -> bool:
        """
        Take note of the recovery steps due by now (they are a function of
        time: nothing is written anywhere).

        @return: whether the factor changed since last noted.
        """
        self._drop()
        return self._mark()

    def _drop(self) -> None:
        now = self._now()
        if self.own is not None and self.own.levelAt(now) == 0:
            self.own = None
        if self.cluster is not None and self.cluster.levelAt(now) == 0:
            self.cluster = None

    def _learn(self, state: Optional[ThrottleState]) -> None:
        """
        Apply the cluster's state (L{None}: not throttled there); tell
        C{onChange} when a trigger elsewhere changes the budget or its next
        step here (the steps of recovery are a matter of time, noted by
        L{recover}).
        """
        before, previous = self._reported, self.cluster
        self.cluster = state
        self._drop()
        level, _, until = self._current()
        if state is not None and state != previous and (level, until) != before:
            self._reported = (level, until)
            if self.onChange is not None:
                self.onChange()


@attrs.define(eq=False, slots=False, repr=False)
class ThrottleBoard(Service):
    """
    This node's destinations' throttles, kept with the cluster's.

    @ivar backend: an L{IThrottles}.
    @ivar clock: an L{IReactorTime}.
    @ivar cooldown: C{[delivery] throttle_cooldown}.
    @ivar shared: whether C{backend} is shared with other nodes (Redis):
        then the board reads the cluster's states every C{refresh}
        seconds while running.
    @ivar refresh: seconds between two reads.
    """

    backend: Any
    clock: Any
    cooldown: float = 300.0
    shared: bool = False
    refresh: float = REFRESH_INTERVAL
    _throttles: dict = attrs.field(factory=dict, init=False)
    _known: dict = attrs.field(factory=dict, init=False)
    _loop: Any = attrs.field(default=None, init=False)
    _reading: bool = attrs.field(default=False, init=False)
    #: Whether the last call to the store succeeded.
    reachable: bool = attrs.field(default=True, init=False)
    #: Triggers not written yet (the store was unreachable): destination
    #: -> (this node's own state after the trigger, the trigger's time).
    _unwritten: dict = attrs.field(factory=dict, init=False)
    _replaying: set = attrs.field(factory=set, init=False)

    log = Logger()

    def __repr__(self) -> str:
        return f"<ThrottleBoard destinations={len(self._throttles)} shared={self.shared}>"

    def throttle(self, key: str, onChange: Optional[Callable[[], None]] = None) -> SharedThrottle:
        """
        The throttle of destination C{key} (made on first use, with the
        cluster's state as last read).

        @param onChange: see L{SharedThrottle.onChange}.
        """
        throttle = self._throttles.get(key)
        if throttle is None:
            throttle = SharedThrottle(self, key, self.cooldown, onChange)
            self._throttles[key] = throttle
            throttle.cluster = self._known.get(key)
            throttle._mark()
        elif onChange is not None:
            throttle.onChange = onChange
        return throttle

    # -- service ---------------------------------------------------------------

    def startService(self) -> None:
        Service.startService(self)
        if not self.shared:
            return
        self._loop = LoopingCall(self.read)
        self._loop.clock = self.clock
        self._loop.start(self.refresh, now=True).addErrback(
            lambda f: self.log.failure("reading the cluster's throttles stopped", f)
        )

    def stopService(self) -> Optional[Deferred]:
        Service.stopService(self)
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        return None

    # -- the store ---------------------------------------------------------------

    def read(self) -> Deferred:
        """
        Read the cluster's throttled destinations and apply them (the
        board does it every C{refresh} seconds).
        """
        return Deferred.fromCoroutine(self._read())

    async def _read(self) -> None:
        if self._reading:
            return
        self._reading = True
        try:
            states = await maybeDeferred(self.backend.throttleStates, self.clock.seconds())
        except Exception:
            self._unreachable(Failure())
            return
        finally:
            self._reading = False
        # Only the destinations throttled now or at the last read: a node
        # with thousands of destinations does not walk them every second.
        changed = set(states) | set(self._known)
        self._known = states
        for key in changed:
            throttle = self._throttles.get(key)
            if throttle is not None:
                throttle._learn(states.get(key))
        # Then the kept triggers, if any, are written over what was read.
        self._reachable()

    def _trigger(self, throttle: SharedThrottle, seen: int, reason: str, now: float) -> None:
        d = maybeDeferred(
            self.backend.triggerThrottle,
            throttle.key,
            min(seen, MAX_THROTTLE_LEVEL),
            reason,
            now,
            throttle.cooldown,
        )

        own = throttle.own

        def written(state: ThrottleState) -> None:
            # A trigger written from here covers those kept before it (it
            # went from the level they left in force).
            kept = self._unwritten.get(throttle.key)
            if kept is not None and kept[1] <= now:
                del self._unwritten[throttle.key]
            self._known[throttle.key] = state
            throttle._learn(state)
            self._reachable()

        def failed(failure: Failure) -> None:
            if failure.check(ValueError):
                self.log.failure(
                    "could not record the throttle of {destination}",
                    failure,
                    destination=throttle.key,
                )
                return
            self._unreachable(failure)
            kept = self._unwritten.get(throttle.key)
            if own is not None and (kept is None or kept[1] <= now):
                self._unwritten[throttle.key] = (own, now)
                self.log.info(
                    "the throttle of {destination} (1/{share} until {until}) is kept "
                    "to be written to the store when it answers",
                    destination=throttle.key,
                    share=2**own.level,
                    until=own.until,
                )

        d.addCallbacks(written, failed)

    def unwritten(self) -> dict:
        """
        The triggers kept to be written when the store answers again:
        destination -> this node's own state after the trigger.
        """
        return {key: state for key, (state, _) in self._unwritten.items()}

    def replay(self) -> Deferred:
        """
        Write the kept triggers into the store (done by itself once the
        store answers again).

        @rtype: L{Deferred} firing with the number written when all have
            been tried.
        """
        now = self.clock.seconds()
        ds, written = [], [0]
        for key, (state, at) in list(self._unwritten.items()):
            if key in self._replaying:
                continue
            if state.levelAt(now) == 0:
                # Over already: the cluster's would be too.
                del self._unwritten[key]
                continue
            self._replaying.add(key)
            d = maybeDeferred(self.backend.replayThrottle, key, state, now)

            def done(result, key=key, state=state, at=at):
                self._replaying.discard(key)
                if self._unwritten.get(key, (None, None))[1] == at:
                    del self._unwritten[key]
                written[0] += 1
                if result is None:
                    self._known.pop(key, None)
                else:
                    self._known[key] = result
                throttle = self._throttles.get(key)
                if throttle is not None:
                    throttle._learn(result)

            def failed(failure, key=key):
                self._replaying.discard(key)
                if failure.check(ValueError):
                    self._unwritten.pop(key, None)
                    self.log.failure(
                        "could not write the kept throttle of {destination}",
                        failure,
                        destination=key,
                    )
                    return
                self._unreachable(failure)

            ds.append(d.addCallbacks(done, failed))

        def report(_):
            if written[0]:
                self.log.info(
                    "wrote {count} throttle(s) triggered while the store was "
                    "unreachable; the other nodes back off for what is left of them",
                    count=written[0],
                )
            return written[0]

        return gatherResults(ds).addCallback(report)

    def _unreachable(self, failure: Failure) -> None:
        if self.reachable:
            self.reachable = False
            self.log.warn(
                "cannot reach the store for the cluster's throttles ({why}); this "
                "node's own throttles apply, and the cluster's last known ones "
                "recover on their schedule, until it answers",
                why=failure.getErrorMessage() or failure.type.__name__,
            )

    def _reachable(self) -> None:
        if not self.reachable:
            self.reachable = True
            self.log.info("the store answers again: throttles are cluster-wide again")
        if self._unwritten and len(self._replaying) < len(self._unwritten):
            self.replay()

    def state(self) -> dict:
        """
        For C{/metrics}: reachability, throttled destinations here.
        """
        return {
            "shared": self.shared,
            "reachable": self.reachable,
            "throttled": sum(1 for t in self._throttles.values() if t.throttled),
            "unwritten": len(self._unwritten),
        }
