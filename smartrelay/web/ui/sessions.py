"""
Server-side sessions of the reports UI: a random id in an HttpOnly cookie,
everything else here, in memory.

A session ends when it has been idle for C{idle} seconds, when it is
C{lifetime} seconds old, or at logout (L{Sessions.end}); after a restart
every session is gone and the operators log in again.  The ids are kept as
their SHA-256 (a look-up reveals nothing through timing, and a memory dump
holds no usable cookie), and at most C{maxSessions} live at once (the
least recently used goes first).
"""

import collections
import hashlib
import secrets
from typing import Optional

import attrs
from twisted.internet.interfaces import IReactorTime

__all__ = ["Session", "Sessions"]


def _digest(sessionID: str) -> str:
    return hashlib.sha256(sessionID.encode("utf-8", "replace")).hexdigest()


@attrs.define
class Session:
    """
    One logged-in operator.

    @ivar id: the cookie's value (only for the response that sets it).
    @ivar user: the user name of C{[web] users_file}.
    @ivar csrf: the token every form of this session carries.
    @ivar created: POSIX seconds of the login.
    @ivar seen: POSIX seconds of the last request.
    """

    id: str = attrs.field(repr=False)
    user: str
    csrf: str = attrs.field(repr=False)
    created: float
    seen: float


class Sessions:
    """
    The live sessions, on an injected clock.
    """

    def __init__(
        self,
        clock: IReactorTime,
        idle: float = 3600.0,
        lifetime: float = 12 * 3600.0,
        maxSessions: int = 10_000,
    ) -> None:
        if not idle > 0 or not lifetime > 0 or maxSessions < 1:
            raise ValueError("idle, lifetime and maxSessions must be positive")
        self.clock = clock
        self.idle = float(idle)
        self.lifetime = float(lifetime)
        self.maxSessions = maxSessions
        self._sessions: "collections.OrderedDict[str, Session]" = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    def create(self, user: str) -> Session:
        """
        A new session for C{user}, with a new id and CSRF token.
        """
        now = self.clock.seconds()
        session = Session(
            id=secrets.token_urlsafe(32),
            user=user,
            csrf=secrets.token_urlsafe(32),
            created=now,
            seen=now,
        )
        self._sessions[_digest(session.id)] = session
        while len(self._sessions) > self.maxSessions:
            self._sessions.popitem(last=False)
        return session

    def _alive(self, session: Session, now: float) -> bool:
        return now - session.seen < self.idle and now - session.created < self.lifetime

    def get(self, sessionID: Optional[str]) -> Optional[Session]:
        """
        The live session of a cookie's value (and it was seen now), or
        L{None} for an unknown, ended or expired one.
        """
        if not sessionID:
            return None
        key = _digest(sessionID)
        session = self._sessions.get(key)
        if session is None:
            return None
        now = self.clock.seconds()
        if not self._alive(session, now):
            del self._sessions[key]
            return None
        session.seen = now
        self._sessions.move_to_end(key)
        self._prune(now)
        return session

    def _prune(self, now: float) -> None:
        # The least recently seen first: stop at the first live one.
        while self._sessions:
            key, oldest = next(iter(self._sessions.items()))
            if self._alive(oldest, now):
                return
            del self._sessions[key]

    def end(self, sessionID: Optional[str]) -> bool:
        """
        Log a session out; whether it was live.
        """
        if not sessionID:
            return False
        return self._sessions.pop(_digest(sessionID), None) is not None

    def endUser(self, user: str) -> int:
        """
        End every session of C{user} (say, when the user is removed); how
        many.
        """
        keys = [k for k, s in self._sessions.items() if s.user == user]
        for key in keys:
            del self._sessions[key]
        return len(keys)
