"""
Queue ids (DESIGN section 1.3): C{NN/BB-CCCCC-TTTTTTTT}.

* C{NN}: the node id, two hex digits (C{[smartrelay] node_id}).
* C{BB}: the boot generation, two hex digits, incremented (mod 256) every
  time the relay starts.
* C{CCCCC}: a decimal counter within one second, C{00000}-C{99999}.
* C{TTTTTTTT}: a logical clock in seconds, hex: the wall clock, but never
  going backwards and never below the persisted I{floor}.

Uniqueness across restarts does not depend on the wall clock: each start
reads the persisted state (boot generation and a lease on logical seconds),
starts its logical clock above every second a previous run may have used,
and persists a new lease before the first id is handed out.  While running,
the lease is renewed ahead of time (see L{QueueIDGenerator.leaseWanted}).
"""

import json
import os
import re
from typing import Callable, Optional

import attrs

from smartrelay.diskio import fsyncDirectory

QUEUE_ID_RE = re.compile(r"^[0-9A-F]{2}/[0-9A-F]{2}-[0-9]{5}-[0-9A-F]{8}$")

#: The id state's file name under data_dir.
ID_STATE_FILE = "queue-ids.json"

#: How far ahead of the logical clock a lease reaches, in seconds.
LEASE = 120
MAX_COUNTER = 99999


class LeaseExpired(Exception):
    """
    The logical clock reached the end of the persisted lease (its renewal
    failed or is late): handing out an id now could repeat one after a
    restart, so none is handed out.
    """


def isQueueID(text: str) -> bool:
    """
    Does C{text} look like a queue id?
    """
    return QUEUE_ID_RE.match(text) is not None


def fileName(queueID: str) -> str:
    """
    The spool file stem for a queue id: the C{/} removed.
    """
    return queueID.replace("/", "")


def queueIDFromFileName(stem: str) -> Optional[str]:
    """
    The inverse of L{fileName}, or None if C{stem} is not one.
    """
    candidate = stem[:2] + "/" + stem[2:]
    return candidate if isQueueID(candidate) else None


@attrs.frozen
class IDState:
    """
    What must survive a restart: the last boot generation and the first
    logical second that the next run may use.
    """

    boot: int = 0
    floor: int = 0

    @classmethod
    def parse(cls, text: str) -> "IDState":
        """
        @raise ValueError: C{text} is not a saved state.
        """
        try:
            data = json.loads(text)
            boot, floor = data["boot"], data["floor"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError("not a queue id state file (%s)" % (e,)) from None
        if not (isinstance(boot, int) and isinstance(floor, int)):
            raise ValueError("boot and floor must be integers")
        return cls(boot=boot % 256, floor=max(0, floor))

    def serialize(self) -> str:
        return json.dumps({"boot": self.boot, "floor": self.floor})


def loadIDState(path: str) -> IDState:
    """
    Read the persisted id state; a missing file is a first start.

    @raise ValueError: the file exists but is damaged.  The caller must not
        guess: ids could repeat.
    """
    try:
        with open(path, encoding="ascii") as f:
            text = f.read()
    except FileNotFoundError:
        return IDState()
    return IDState.parse(text)


def saveIDState(path: str, state: IDState) -> None:
    """
    Durably replace the id state file (temp file, fsync, rename, fsync dir).
    Blocking: call it from a thread.
    """
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, state.serialize().encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsyncDirectory(os.path.dirname(path) or ".")


def startRun(
    previous: IDState, now: float, node: int = 0
) -> tuple[IDState, "QueueIDGenerator"]:
    """
    Begin a new run: the state to persist before the first id, and the
    generator for this run.
    """
    boot = (previous.boot + 1) % 256
    start = max(int(now), previous.floor)
    generator = QueueIDGenerator(
        boot=boot, second=start, leaseUntil=start + LEASE, node=node
    )
    return IDState(boot=boot, floor=start + LEASE), generator


@attrs.define
class QueueIDGenerator:
    """
    Hands out queue ids for one run of the relay.

    @ivar second: the logical clock; never decreases.
    @ivar leaseUntil: the first second not covered by the persisted floor.
    """

    boot: int
    second: int
    leaseUntil: int
    node: int = 0
    counter: int = 0
    _renewing: bool = False

    def next(self, now: float) -> str:
        """
        A new queue id; C{now} is the wall clock in POSIX seconds.
        """
        now = int(now)
        second, counter = self.second, self.counter
        if now > second:
            second, counter = now, 0
        elif counter > MAX_COUNTER:
            second, counter = second + 1, 0
        if second >= self.leaseUntil:
            raise LeaseExpired(
                "queue id lease ends at %d, logical clock at %d" % (self.leaseUntil, second)
            )
        self.second, self.counter = second, counter
        self.counter += 1
        return "%02X/%02X-%05d-%08X" % (
            self.node,
            self.boot,
            counter,
            self.second & 0xFFFFFFFF,
        )

    def leaseWanted(self, now: float) -> Optional[IDState]:
        """
        If the lease should be extended, the state to persist (and the
        caller must call L{leaseRenewed} or L{leaseFailed} when done);
        otherwise None.  Call it after each id and periodically.
        """
        current = max(self.second, int(now))
        if self._renewing or current < self.leaseUntil - LEASE // 2:
            return None
        self._renewing = True
        return IDState(boot=self.boot, floor=current + LEASE)

    def leaseRenewed(self, state: IDState) -> None:
        self._renewing = False
        self.leaseUntil = max(self.leaseUntil, state.floor)

    def leaseFailed(self) -> None:
        self._renewing = False


def renewLease(
    generator: QueueIDGenerator,
    now: float,
    persist: Callable[[IDState], "object"],
):
    """
    Extend C{generator}'s lease if it wants it, using C{persist}, which
    returns a Deferred that fires once the state is durable.
    """
    state = generator.leaseWanted(now)
    if state is None:
        return
    d = persist(state)
    d.addCallbacks(
        lambda _: generator.leaseRenewed(state),
        lambda f: (generator.leaseFailed(), f)[1],
    )
    return d
