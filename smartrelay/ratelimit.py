# -*- test-case-name: tests.test_ratelimit -*-
"""
Limits on repeated failures: wrong passwords over SMTP AUTH now, the web
login and API tokens later.

L{FailureLimiter} counts the recent failures of one kind of key (a client
address, a user name) in a sliding window and locks a key out for a while
once it has too many (fail2ban's C{maxretry} within C{findtime}, then
C{bantime}).  L{LoginLimiter} combines three of them into the policy for a login
(a client address and a user name), the way fail2ban, Postfix's anvil and
Dovecot's auth penalty each do part of it:

* B{per client} (an IPv4 address, or the C{/64} an IPv6 address is in,
  since anyone with IPv6 has a whole C{/64}): the tight limit.  After
  C{clientRate} failures (so many within so many seconds) the client is
  locked out for C{lockout} seconds:
  its attempts are refused at once, without checking the password (a
  refused attempt costs no scrypt hash).  This is what stops one machine
  guessing, whatever user names it tries.
* B{per user name}, over all clients: a much looser limit (C{userRate}),
  against many machines guessing one user's password together.  It never
  locks out a client the user has logged in from recently (below), so an
  attacker cannot lock the real user out from the addresses the user
  works from.
* B{trusted pairs}: after a successful login the pair (client, user) is
  trusted for C{trustTime} seconds.  A trusted pair is not refused for the
  client's or the user's lock-out (a misconfigured application on a shared
  address, or a botnet guessing the user's password, does not lock the real
  user out), only for its own: the pair itself is limited like a client
  (C{clientRate}), so someone sharing the address (the same NAT, the same
  host) who guesses that user's password gets no more tries than from an
  address of their own.

A user who has not logged in from an address recently (a new host during
a distributed attack on that user name) is refused while the user name is
locked; that is the price of the per-user limit, and it ends with the
lock-out.  Trust lives in memory and starts empty after a restart.

Failures also earn a delay before the failure is answered, growing with
the client's (for a trusted pair, the pair's) recent failures: C{delay}
seconds after the first, doubling with each further one up to C{maxDelay}
(Dovecot's auth penalty).  It slows down one connection's guesses and
costs the relay only a timer.

Attempts still in flight count against the limits, so a client that opens
many connections at once cannot get more password checks started than
its remaining allowance.

Memory is bounded: each limiter keeps at most C{maxKeys} keys (the least
recently used one is dropped first), each with at most its C{count}
latest failure times, and forgets a key once its failures are older than
the window and its lock-out is over.  Under a flood of new keys (a botnet
spraying user names) the least recently seen are forgotten first, which
may free a key early; a key being tried stays.  Everything takes the time
from an injected clock (C{IReactorTime}).
"""

import collections
import hashlib
import ipaddress
import math
from typing import Hashable, Optional

import attrs
from twisted.logger import Logger

__all__ = ["FailureLimiter", "LoginLimiter", "LoginLimited", "LoginAttempt", "clientKey"]

#: Longest user name kept as it is in a limiter's keys; longer ones are
#: kept as a hash, so an attacker's long names cannot fill memory.
MAX_USER_KEY = 64


def clientKey(address: str) -> str:
    """
    The key that counts failures for a client address: the IPv4 address
    (an IPv4-mapped IPv6 address as IPv4), the C{/64} network of an IPv6
    address, or, for a peer that is not an IP address (a UNIX socket), the
    text as it is (shortened to L{MAX_USER_KEY} characters).
    """
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address[:MAX_USER_KEY]
    if ip.version == 6:
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def userKey(user: str) -> str:
    """
    The key that counts failures for a user name: the name, or a hash of
    it when it is longer than L{MAX_USER_KEY} characters.
    """
    if len(user) <= MAX_USER_KEY:
        return user
    digest = hashlib.sha256(user.encode("utf-8", "surrogatepass")).hexdigest()
    return "sha256:" + digest[:32]


def _checkRate(count: int, period: float) -> None:
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"the failure count must be a positive integer, got {count!r}")
    if not (isinstance(period, (int, float)) and math.isfinite(period) and period > 0):
        raise ValueError(f"the period must be a positive number of seconds, got {period!r}")


def _checkSeconds(what: str, value: float, positive: bool = False) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{what} must be a number of seconds, got {value!r}")
    if positive and value == 0:
        raise ValueError(f"{what} must be more than 0 seconds")


@attrs.frozen
class Counted:
    """
    What L{FailureLimiter.failed} counted.

    @ivar failures: the key's recent failures, the new one included.
    @ivar locked: this failure locked the key out.
    """

    failures: int
    locked: bool


@attrs.define
class _Record:
    #: When the recent failures happened, oldest first; only the last
    #: C{count} are kept, which is all the limit needs to know.
    times: collections.deque
    lockedUntil: float = 0.0
    pending: int = 0


class FailureLimiter:
    """
    Recent failures per key, with a lock-out once there are too many.

    C{count} failures of a key within C{period} seconds (a sliding window,
    as fail2ban's C{maxretry} within C{findtime}) lock it out for
    C{lockout} seconds; the count starts again from zero when the lock-out
    ends.

    A key may be tried (L{retryAfter} is 0) while it is not locked out and
    its recent failures plus its attempts in flight (L{attempt} not yet
    followed by L{failed} or L{succeeded}) are fewer than C{count}.

    @ivar count: failures within C{period} that lock a key out.
    @ivar period: seconds, the window in which failures count.
    @ivar lockout: seconds a key stays locked out.
    @ivar maxKeys: most keys remembered.
    @ivar lockouts: how many lock-outs there have been.
    """

    def __init__(
        self,
        clock,
        count: int,
        period: float,
        lockout: float,
        maxKeys: int = 10_000,
    ) -> None:
        _checkRate(count, period)
        _checkSeconds("the lock-out", lockout, positive=True)
        if isinstance(maxKeys, bool) or not isinstance(maxKeys, int) or maxKeys < 1:
            raise ValueError(f"maxKeys must be a positive integer, got {maxKeys!r}")
        self.clock = clock
        self.count = count
        self.period = float(period)
        self.lockout = float(lockout)
        self.maxKeys = maxKeys
        self.lockouts = 0
        self._records: "collections.OrderedDict[Hashable, _Record]" = collections.OrderedDict()

    def __len__(self) -> int:
        """
        How many keys are remembered (for tests and metrics).
        """
        return len(self._records)

    def _now(self) -> float:
        return self.clock.seconds()

    def _expire(self, record: _Record, now: float) -> None:
        times, horizon = record.times, now - self.period
        while times and times[0] <= horizon:
            times.popleft()

    def _idle(self, record: _Record, now: float) -> bool:
        if record.pending or record.lockedUntil > now:
            return False
        return not record.times or record.times[-1] <= now - self.period

    def _lookup(self, key: Hashable, now: float, create: bool) -> Optional[_Record]:
        records = self._records
        record = records.get(key)
        if record is not None:
            records.move_to_end(key)
            self._expire(record, now)
        elif create:
            record = records[key] = _Record(collections.deque(maxlen=self.count))
            while len(records) > self.maxKeys:
                records.popitem(last=False)
        # Forget up to two keys that have nothing left to remember, oldest
        # first, so that memory shrinks back after an attack.
        for _ in range(2):
            oldest = next(iter(records), None)
            if oldest is None or oldest == key or not self._idle(records[oldest], now):
                break
            del records[oldest]
        return record

    def failures(self, key: Hashable) -> int:
        """
        The failures of C{key} in the last C{period} seconds (counting
        again from 0 after a lock-out).
        """
        record = self._records.get(key)
        if record is None:
            return 0
        self._expire(record, self._now())
        return len(record.times)

    def retryAfter(self, key: Hashable) -> float:
        """
        Seconds before C{key} may be tried again; 0 if it may be tried now.
        """
        now = self._now()
        record = self._lookup(key, now, create=False)
        if record is None:
            return 0.0
        if record.lockedUntil > now:
            return record.lockedUntil - now
        recent = len(record.times)
        if recent + record.pending < self.count:
            return 0.0
        # Too many attempts in flight: one more is allowed once they end,
        # or once the oldest failure leaves the window.
        if recent:
            return max(1.0, record.times[0] + self.period - now)
        return 1.0

    def attempt(self, key: Hashable) -> None:
        """
        An attempt for C{key} has started (call L{failed} or L{succeeded}
        when it ends).
        """
        record = self._lookup(key, self._now(), create=True)
        record.pending += 1

    def failed(self, key: Hashable) -> Counted:
        """
        The attempt for C{key} failed.

        @return: the recent failures of C{key}, this one included, and
            whether this one locked the key out.
        """
        now = self._now()
        record = self._lookup(key, now, create=True)
        record.pending = max(0, record.pending - 1)
        if record.lockedUntil > now:
            # Begun before the lock-out: nothing more to count.
            return Counted(self.count, False)
        record.times.append(now)
        recent = len(record.times)
        if recent < self.count:
            return Counted(recent, False)
        record.lockedUntil = now + self.lockout
        record.times.clear()
        self.lockouts += 1
        return Counted(recent, True)

    def succeeded(self, key: Hashable) -> None:
        """
        The attempt for C{key} succeeded: its failures are kept (a success
        for one user must not reset a client's count).
        """
        record = self._lookup(key, self._now(), create=False)
        if record is not None:
            record.pending = max(0, record.pending - 1)


class LoginLimited(Exception):
    """
    A login attempt was refused without checking the password.

    @ivar retryAfter: seconds until it may be tried again.
    @ivar scope: why: C{"client"}, C{"user"} or C{"pair"} (the client's,
        the user name's or the trusted pair's lock-out); for logs, never
        for the client.
    """

    def __init__(self, retryAfter: float, scope: str) -> None:
        super().__init__(retryAfter, scope)
        self.retryAfter = retryAfter
        self.scope = scope

    def __str__(self) -> str:
        return f"login refused ({self.scope} locked out) for {self.retryAfter:.0f}s"


@attrs.define(eq=False)
class LoginAttempt:
    """
    One login allowed by L{LoginLimiter.begin}; end it with exactly one of
    L{failed}, L{succeeded} or L{abandoned} (further calls do nothing).

    @ivar client: the client's key (L{clientKey}).
    @ivar user: the user name's key (L{userKey}).
    @ivar name: the user name as given (shortened), for log lines.
    @ivar trusted: the pair (client, user) had logged in recently.
    """

    limiter: "LoginLimiter"
    client: str
    user: str
    name: str
    trusted: bool
    _reserved: list
    _ended: bool = False

    def _end(self) -> bool:
        if self._ended:
            return False
        self._ended = True
        return True

    def failed(self) -> float:
        """
        The password was wrong.

        @return: seconds to wait before answering.
        """
        if not self._end():
            return 0.0
        return self.limiter._failed(self)

    def succeeded(self) -> None:
        """
        The password was right: the pair (client, user) is trusted now.
        """
        if self._end():
            self.limiter._succeeded(self)

    def abandoned(self) -> None:
        """
        The attempt ended without an answer (the checker failed): nothing
        is counted.
        """
        if self._end():
            for limiter, key, scope in self._reserved:
                limiter.succeeded(key)


class LoginLimiter:
    """
    The failed-login policy for one service (see the module docstring).

    Use: C{attempt = limiter.begin(client, user)} (raises L{LoginLimited}
    for a refusal), check the password, then C{attempt.failed()} (returns
    the delay before the answer) or C{attempt.succeeded()}.  When the user
    name is not known yet (the SMTP AUTH command before its exchange),
    L{clientRetryAfter} says whether the client would be refused anyway.

    @ivar counts: C{failed}, C{refused} and C{locked} (lock-outs begun), for
        metrics.
    """

    log = Logger()

    def __init__(
        self,
        clock,
        clientRate: Optional[tuple[int, float]] = (10, 900.0),
        userRate: Optional[tuple[int, float]] = (100, 3600.0),
        lockout: float = 900.0,
        delay: float = 1.0,
        maxDelay: float = 15.0,
        trustTime: float = 30 * 86400.0,
        maxKeys: int = 10_000,
        service: str = "login",
    ) -> None:
        """
        @param clientRate: (failures, seconds) for a client and for a
            trusted pair, or L{None} for no limit per client.
        @param userRate: (failures, seconds) for a user name over all
            clients that are not trusted for it, or L{None} for none.
        @param lockout: seconds a client, user name or pair stays locked.
        @param delay: seconds before answering the first failure; doubles
            with each recent failure.  0 for no delay.
        @param maxDelay: the longest delay.
        @param trustTime: seconds a pair stays trusted after a success.
        @param maxKeys: most keys each limiter, and the trusted pairs, keep.
        @param service: what the log lines name (C{"SMTP AUTH"}).
        """
        _checkSeconds("the delay", delay)
        _checkSeconds("the longest delay", maxDelay)
        _checkSeconds("the trust time", trustTime, positive=True)
        _checkSeconds("the lock-out", lockout, positive=True)
        if isinstance(maxKeys, bool) or not isinstance(maxKeys, int) or maxKeys < 1:
            raise ValueError(f"maxKeys must be a positive integer, got {maxKeys!r}")
        self.clock = clock
        self.service = service
        self.delay = float(delay)
        self.maxDelay = float(maxDelay)
        self.trustTime = float(trustTime)
        self.maxKeys = maxKeys

        def limiter(rate: Optional[tuple[int, float]]) -> Optional[FailureLimiter]:
            if rate is None:
                return None
            return FailureLimiter(clock, rate[0], rate[1], lockout, maxKeys)

        self.perClient = limiter(clientRate)
        self.perPair = limiter(clientRate)
        self.perUser = limiter(userRate)
        self.counts: collections.Counter = collections.Counter()
        self._trusted: "collections.OrderedDict[tuple[str, str], float]" = (
            collections.OrderedDict()
        )
        self._trustedUsers: collections.Counter = collections.Counter()

    # -- trust --------------------------------------------------------------

    def _expireTrust(self, now: float) -> None:
        trusted = self._trusted
        while trusted:
            pair, until = next(iter(trusted.items()))
            if until > now and len(trusted) <= self.maxKeys:
                break
            self._forgetTrust(pair)

    def _forgetTrust(self, pair: tuple[str, str]) -> None:
        del self._trusted[pair]
        client = pair[0]
        self._trustedUsers[client] -= 1
        if self._trustedUsers[client] <= 0:
            del self._trustedUsers[client]

    def _isTrusted(self, pair: tuple[str, str], now: float) -> bool:
        self._expireTrust(now)
        return pair in self._trusted

    def _trust(self, pair: tuple[str, str], now: float) -> None:
        if pair in self._trusted:
            self._trusted.move_to_end(pair)
        else:
            self._trustedUsers[pair[0]] += 1
        # The trust times are all equally long, so insertion order is
        # expiry order and the oldest entry is the first to expire.
        self._trusted[pair] = now + self.trustTime
        self._expireTrust(now)

    # -- attempts -----------------------------------------------------------

    def clientRetryAfter(self, client: str) -> float:
        """
        Seconds before any login from C{client} may be tried: more than 0
        only if the client is locked out and no user is trusted from it.
        A refusal here is counted; the caller answers it.
        """
        if self.perClient is None:
            return 0.0
        key = clientKey(client)
        self._expireTrust(self.clock.seconds())
        if self._trustedUsers.get(key):
            return 0.0
        wait = self.perClient.retryAfter(key)
        if wait > 0:
            self.counts["refused"] += 1
        return wait

    def begin(self, client: str, user: str) -> LoginAttempt:
        """
        Start a login of C{user} from C{client}.

        @raise LoginLimited: if it is refused (counted); the password must
            not be checked.
        """
        now = self.clock.seconds()
        c, u = clientKey(client), userKey(user)
        pair = (c, u)
        trusted = self._isTrusted(pair, now)
        if trusted:
            checks = [(self.perPair, pair, "pair")]
        else:
            checks = [(self.perClient, c, "client"), (self.perUser, u, "user")]
        for limiter, key, scope in checks:
            if limiter is None:
                continue
            wait = limiter.retryAfter(key)
            if wait > 0:
                self.counts["refused"] += 1
                raise LoginLimited(wait, scope)
        # What the attempt counts against: the client always (an address
        # that keeps failing is suspect whatever it is trusted for), and
        # the user name, or for a trusted pair the pair.  The first of
        # them sets the delay.
        if trusted:
            reserved = [(self.perPair, pair, "pair"), (self.perClient, c, "client")]
        else:
            reserved = [(self.perClient, c, "client"), (self.perUser, u, "user")]
        reserved = [entry for entry in reserved if entry[0] is not None]
        for limiter, key, scope in reserved:
            limiter.attempt(key)
        return LoginAttempt(self, c, u, user[:100], trusted, reserved)

    def _failed(self, attempt: LoginAttempt) -> float:
        self.counts["failed"] += 1
        failures = 0
        for limiter, key, scope in attempt._reserved:
            counted = limiter.failed(key)
            if scope != "user" and not failures:
                # The delay follows the client's (a trusted pair's) own
                # failures, never the user name's: a botnet guessing the
                # user's password must not slow the real user down.
                failures = counted.failures
            if counted.locked:
                self.counts["locked"] += 1
                self.log.warn(
                    "{service}: {scope} locked out for {lockout:g}s after {failures} "
                    "failed logins; last: client {client} user {user!r}",
                    service=self.service,
                    scope=scope,
                    lockout=limiter.lockout,
                    failures=limiter.count,
                    client=attempt.client,
                    user=attempt.name,
                )
        if not self.delay or failures <= 0:
            return 0.0
        return min(self.maxDelay, self.delay * 2 ** min(failures - 1, 64))

    def _succeeded(self, attempt: LoginAttempt) -> None:
        for limiter, key, scope in attempt._reserved:
            limiter.succeeded(key)
        self._trust((attempt.client, attempt.user), self.clock.seconds())
