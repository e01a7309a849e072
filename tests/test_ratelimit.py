"""
Tests for L{smartrelay.ratelimit}: failure counting and lock-outs per key
(L{FailureLimiter}) and the login policy built on them (L{LoginLimiter}),
all on a fake clock.
"""

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from smartrelay.ratelimit import (
    MAX_USER_KEY,
    FailureLimiter,
    LoginLimited,
    LoginLimiter,
    clientKey,
    userKey,
)


def limiter(count=3, period=60.0, lockout=600.0, maxKeys=100):
    clock = Clock()
    clock.advance(1_700_000_000)
    return clock, FailureLimiter(clock, count, period, lockout, maxKeys)


class FailureLimiterTests(SynchronousTestCase):
    def failTimes(self, limiter, key, times=1):
        for _ in range(times):
            limiter.attempt(key)
            counted = limiter.failed(key)
        return counted

    def test_locksOutAtTheCount(self):
        """
        C{count} failures lock the key out for C{lockout} seconds; until
        then it may be tried, and other keys are not affected.
        """
        clock, failures = limiter(count=3)
        counted = self.failTimes(failures, "a", 2)
        self.assertEqual((counted.failures, counted.locked), (2, False))
        self.assertEqual(failures.retryAfter("a"), 0)
        counted = self.failTimes(failures, "a")
        self.assertEqual((counted.failures, counted.locked), (3, True))
        self.assertEqual(failures.retryAfter("a"), 600)
        self.assertEqual(failures.retryAfter("b"), 0)
        self.assertEqual(failures.lockouts, 1)
        clock.advance(599)
        self.assertEqual(failures.retryAfter("a"), 1)
        clock.advance(1)
        self.assertEqual(failures.retryAfter("a"), 0)
        # The count starts again from zero after the lock-out.
        self.assertEqual(failures.failures("a"), 0)
        self.assertFalse(self.failTimes(failures, "a", 2).locked)

    def test_slidingWindow(self):
        """
        Only failures within the last C{period} seconds count: C{count} of
        them within it lock the key out, spread out wider they never do.
        """
        clock, failures = limiter(count=3, period=60)
        self.failTimes(failures, "a", 2)
        clock.advance(59)
        self.assertEqual(failures.failures("a"), 2)
        clock.advance(1)
        self.assertEqual(failures.failures("a"), 0)
        for _ in range(10):
            self.assertFalse(self.failTimes(failures, "a").locked)
            clock.advance(30)
        self.assertEqual(failures.retryAfter("a"), 0)
        self.failTimes(failures, "b", 2)
        clock.advance(59)
        self.assertTrue(self.failTimes(failures, "b").locked)

    def test_attemptsInFlightCount(self):
        """
        Attempts begun and not ended count against the limit: with C{count}
        in flight, another may not begin, and may again once one ends.
        """
        clock, failures = limiter(count=3)
        for _ in range(3):
            failures.attempt("a")
        self.assertGreater(failures.retryAfter("a"), 0)
        failures.succeeded("a")
        self.assertEqual(failures.retryAfter("a"), 0)

    def test_successKeepsFailures(self):
        """
        A success does not reset the key's failures.
        """
        clock, failures = limiter(count=3)
        self.failTimes(failures, "a", 2)
        failures.attempt("a")
        failures.succeeded("a")
        self.assertEqual(failures.failures("a"), 2)

    def test_failureDuringLockOut(self):
        """
        An attempt begun before the lock-out that fails during it neither
        locks again nor lengthens the lock-out.
        """
        clock, failures = limiter(count=2)
        failures.attempt("a")
        self.failTimes(failures, "a", 2)
        clock.advance(100)
        counted = failures.failed("a")
        self.assertFalse(counted.locked)
        self.assertEqual(failures.retryAfter("a"), 500)
        self.assertEqual(failures.lockouts, 1)

    def test_boundedKeys(self):
        """
        At most C{maxKeys} keys are kept; the least recently used goes
        first, so a key being tried (an attacker's) stays.
        """
        clock, failures = limiter(count=3, maxKeys=3)
        self.failTimes(failures, "locked", 3)
        for key in ["x", "y", "z", "w"]:
            failures.retryAfter("locked")
            self.failTimes(failures, key)
        self.assertLessEqual(len(failures), 3)
        self.assertGreater(failures.retryAfter("locked"), 0)
        self.assertEqual(failures.failures("x"), 0)

    def test_idleKeysForgotten(self):
        """
        A key whose failures are forgiven and whose lock-out is over is
        dropped as other keys are used, so memory shrinks after an attack.
        """
        clock, failures = limiter(count=3, period=60, lockout=60)
        for i in range(20):
            self.failTimes(failures, f"k{i}")
        self.failTimes(failures, "locked", 3)
        self.assertEqual(len(failures), 21)
        clock.advance(61)
        for _ in range(15):
            failures.retryAfter("other")
        self.assertEqual(len(failures), 0)

    def test_clockGoingBack(self):
        """
        A clock that goes back neither forgives nor adds failures, and
        nothing becomes negative.
        """
        clock, failures = limiter(count=3)
        self.failTimes(failures, "a", 2)
        clock.advance(-1000)
        self.assertEqual(failures.failures("a"), 2)
        self.assertEqual(failures.retryAfter("a"), 0)
        self.assertTrue(self.failTimes(failures, "a").locked)
        self.assertGreater(failures.retryAfter("a"), 0)

    def test_endWithoutAttempt(self):
        """
        C{succeeded} for an unknown key does nothing; C{failed} without an
        C{attempt} still counts, never leaving a negative number in flight.
        """
        clock, failures = limiter(count=3)
        failures.succeeded("nobody")
        self.assertEqual(len(failures), 0)
        failures.failed("a")
        failures.attempt("a")
        self.assertEqual(failures.retryAfter("a"), 0)

    def test_badArguments(self):
        """
        Counts, periods, lock-outs and key limits that make no sense are
        refused with a clear ValueError.
        """
        clock = Clock()
        for count, period, lockout, maxKeys, message in [
            (0, 60, 60, 10, "failure count must be a positive integer"),
            (True, 60, 60, 10, "failure count must be a positive integer"),
            (2.5, 60, 60, 10, "failure count must be a positive integer"),
            (3, 0, 60, 10, "period must be a positive number"),
            (3, float("inf"), 60, 10, "period must be a positive number"),
            (3, "60", 60, 10, "period must be a positive number"),
            (3, 60, 0, 10, "lock-out must be more than 0"),
            (3, 60, -1, 10, "lock-out must be a number of seconds"),
            (3, 60, float("nan"), 10, "lock-out must be a number of seconds"),
            (3, 60, 60, 0, "maxKeys must be a positive integer"),
        ]:
            e = self.assertRaises(ValueError, FailureLimiter, clock, count, period, lockout, maxKeys)
            self.assertIn(message, str(e))

    @given(
        st.lists(
            st.tuples(st.floats(min_value=0, max_value=200), st.sampled_from(["a", "b", "c"])),
            max_size=200,
        )
    )
    def test_greedyGuesserIsBounded(self, steps):
        """
        However a guesser spaces its tries over keys, each key gets at most
        C{count} failures in any C{period}, and the limiter never holds
        more than C{maxKeys} keys.
        """
        clock, failures = limiter(count=5, period=300, lockout=900, maxKeys=3)
        allowed = {"a": 0, "b": 0, "c": 0}
        start = clock.seconds()
        for delay, key in steps:
            clock.advance(delay)
            retry = failures.retryAfter(key)
            self.assertGreaterEqual(retry, 0)
            if retry == 0:
                failures.attempt(key)
                failures.failed(key)
                allowed[key] += 1
            self.assertLessEqual(len(failures), 3)
        elapsed = clock.seconds() - start
        for key, count in allowed.items():
            self.assertLessEqual(count, 5 * (1 + elapsed / 300), key)

    @given(
        st.lists(st.floats(min_value=0, max_value=100), max_size=100),
    )
    def test_oneKeyBound(self, delays):
        """
        One key tried as soon as it may be: at most C{count} failures in
        any C{period}, and after the one that locks it, no attempt until
        the lock-out is over.
        """
        clock, failures = limiter(count=5, period=300, lockout=900)
        start = clock.seconds()
        allowed, lockedAt = 0, None
        for delay in delays:
            clock.advance(delay)
            if failures.retryAfter("a") == 0:
                if lockedAt is not None:
                    self.assertGreaterEqual(clock.seconds() - lockedAt, 900)
                failures.attempt("a")
                if failures.failed("a").locked:
                    lockedAt = clock.seconds()
                allowed += 1
        elapsed = clock.seconds() - start
        self.assertLessEqual(allowed, 5 * (1 + elapsed / 300))


class KeyTests(SynchronousTestCase):
    def test_clientKeys(self):
        """
        IPv4 addresses are their own key, IPv4-mapped IPv6 ones count as
        IPv4, an IPv6 address counts as its /64, anything else as its text.
        """
        self.assertEqual(clientKey("192.0.2.7"), "192.0.2.7")
        self.assertEqual(clientKey("::ffff:192.0.2.7"), "192.0.2.7")
        self.assertEqual(clientKey("2001:db8:1:2:aaaa::1"), "2001:db8:1:2::/64")
        self.assertEqual(clientKey("2001:db8:1:2:bbbb::9"), clientKey("2001:db8:1:2::5"))
        self.assertNotEqual(clientKey("2001:db8:1:3::1"), clientKey("2001:db8:1:2::1"))
        self.assertEqual(clientKey("/run/smartrelay.sock"), "/run/smartrelay.sock")
        self.assertEqual(len(clientKey("x" * 1000)), MAX_USER_KEY)

    def test_userKeys(self):
        """
        User names are their own key up to L{MAX_USER_KEY} characters;
        longer ones are a hash, different for different names.
        """
        self.assertEqual(userKey("app1"), "app1")
        long1, long2 = userKey("a" * 1000), userKey("a" * 999 + "b")
        self.assertTrue(long1.startswith("sha256:"))
        self.assertNotEqual(long1, long2)
        self.assertLess(len(long1), 100)
        self.assertTrue(userKey("\udcff" * 100).startswith("sha256:"))


class LoginLimiterTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def makeLimiter(self, **kwargs):
        defaults = dict(clientRate=(3, 300.0), userRate=(5, 3600.0), lockout=900.0, service="TEST")
        defaults.update(kwargs)
        return LoginLimiter(self.clock, **defaults)

    def failTimes(self, limiter, client, user, times=1):
        delays = []
        for _ in range(times):
            delays.append(limiter.begin(client, user).failed())
        return delays

    def login(self, limiter, client, user):
        limiter.begin(client, user).succeeded()

    def test_clientLockedOut(self):
        """
        One address failing C{clientRate} times, whatever the user names,
        is refused for any user name (scope C{client}) until the lock-out
        ends; the refusals and the lock-out are counted.
        """
        limiter = self.makeLimiter()
        for user in ["a", "b", "c"]:
            self.failTimes(limiter, "192.0.2.1", user)
        refusal = self.assertRaises(LoginLimited, limiter.begin, "192.0.2.1", "d")
        self.assertEqual((refusal.scope, refusal.retryAfter), ("client", 900))
        self.assertEqual(limiter.clientRetryAfter("192.0.2.1"), 900)
        self.assertEqual(limiter.counts, {"failed": 3, "locked": 1, "refused": 2})
        self.clock.advance(900)
        limiter.begin("192.0.2.1", "d")

    def test_rightPasswordFromElsewhere(self):
        """
        While one address is locked out for guessing a user's password,
        the user logs in from another address.
        """
        limiter = self.makeLimiter()
        self.failTimes(limiter, "192.0.2.1", "app1", 3)
        self.assertRaises(LoginLimited, limiter.begin, "192.0.2.1", "app1")
        self.login(limiter, "198.51.100.7", "app1")

    def test_oneAddressCannotLockTheUserOut(self):
        """
        One address guessing one user name is locked out long before the
        per-user limit: the user name itself is never locked, so even an
        address the user never logged in from may try.
        """
        limiter = self.makeLimiter()
        for _ in range(10):
            try:
                self.failTimes(limiter, "192.0.2.1", "app1")
            except LoginLimited:
                pass
        self.assertEqual(limiter.perUser.failures("app1"), 3)
        limiter.begin("203.0.113.5", "app1")

    def test_distributedGuessingLocksTheUserName(self):
        """
        Many addresses guessing one user's password together lock the user
        name out (scope C{user}) for addresses it has not logged in from;
        the address the user logged in from before still may.
        """
        limiter = self.makeLimiter()
        self.login(limiter, "198.51.100.7", "app1")
        for i in range(5):
            self.failTimes(limiter, f"192.0.2.{i}", "app1")
        refusal = self.assertRaises(LoginLimited, limiter.begin, "203.0.113.5", "app1")
        self.assertEqual(refusal.scope, "user")
        limiter.begin("203.0.113.5", "other")
        self.login(limiter, "198.51.100.7", "app1")

    def test_trustedPairOnALockedAddress(self):
        """
        An address locked out by failures for other user names still lets
        a user that logged in from it lately try; guessing that user's
        password from there is limited like an address of its own.
        """
        limiter = self.makeLimiter()
        self.login(limiter, "192.0.2.1", "app1")
        self.failTimes(limiter, "192.0.2.1", "other", 3)
        self.assertRaises(LoginLimited, limiter.begin, "192.0.2.1", "other")
        self.assertEqual(limiter.clientRetryAfter("192.0.2.1"), 0)
        self.login(limiter, "192.0.2.1", "app1")
        self.failTimes(limiter, "192.0.2.1", "app1", 3)
        refusal = self.assertRaises(LoginLimited, limiter.begin, "192.0.2.1", "app1")
        self.assertEqual(refusal.scope, "pair")

    def test_trustExpires(self):
        """
        A pair stays trusted for C{trustTime} after its last success.
        """
        limiter = self.makeLimiter(trustTime=3600)
        self.login(limiter, "192.0.2.1", "app1")
        self.failTimes(limiter, "192.0.2.1", "x", 3)
        self.clock.advance(1800)
        self.login(limiter, "192.0.2.1", "app1")
        self.clock.advance(3599)
        limiter.begin("192.0.2.1", "app1").abandoned()
        self.clock.advance(1)
        self.failTimes(limiter, "192.0.2.9", "y", 3)
        self.failTimes(limiter, "192.0.2.1", "z", 3)
        self.assertRaises(LoginLimited, limiter.begin, "192.0.2.1", "app1")

    def test_trustBounded(self):
        """
        At most C{maxKeys} pairs are trusted; the oldest is forgotten first.
        """
        limiter = self.makeLimiter(maxKeys=2)
        for user in ["a", "b", "c"]:
            self.login(limiter, "192.0.2.1", user)
        self.assertEqual(len(limiter._trusted), 2)
        self.assertNotIn(("192.0.2.1", "a"), limiter._trusted)

    def test_delaysGrowWithTheClientsFailures(self):
        """
        The delay before answering a failure starts at C{delay} and doubles
        with each recent failure of the address, up to C{maxDelay}.
        """
        limiter = self.makeLimiter(
            clientRate=(10, 900.0), userRate=(100, 3600.0), delay=1.0, maxDelay=15.0
        )
        delays = self.failTimes(limiter, "192.0.2.1", "app1", 6)
        self.assertEqual(delays, [1, 2, 4, 8, 15, 15])
        self.assertEqual(self.failTimes(limiter, "192.0.2.2", "app1"), [1])

    def test_trustedPairDelayFollowsThePair(self):
        """
        For a trusted pair the delay follows the pair's own failures, not
        those of others at the same address.
        """
        limiter = self.makeLimiter(clientRate=(10, 900.0), delay=1.0)
        self.login(limiter, "192.0.2.1", "app1")
        self.failTimes(limiter, "192.0.2.1", "other", 5)
        self.assertEqual(self.failTimes(limiter, "192.0.2.1", "app1"), [1])

    def test_noDelay(self):
        """
        With C{delay} 0 failures are answered at once.
        """
        limiter = self.makeLimiter(delay=0)
        self.assertEqual(self.failTimes(limiter, "192.0.2.1", "app1", 2), [0, 0])

    def test_concurrentAttempts(self):
        """
        Attempts in flight count: an address cannot start more password
        checks at once than its remaining allowance.
        """
        limiter = self.makeLimiter()
        attempts = [limiter.begin("192.0.2.1", f"u{i}") for i in range(3)]
        self.assertRaises(LoginLimited, limiter.begin, "192.0.2.1", "u9")
        for attempt in attempts:
            attempt.failed()
        self.assertEqual(limiter.perClient.lockouts, 1)

    def test_abandonedCountsNothing(self):
        """
        An attempt abandoned (the check itself failed) counts neither as a
        failure nor as a success, and ending an attempt twice counts once.
        """
        limiter = self.makeLimiter()
        attempt = limiter.begin("192.0.2.1", "app1")
        attempt.abandoned()
        attempt.failed()
        attempt.succeeded()
        self.assertEqual(limiter.perClient.failures("192.0.2.1"), 0)
        self.assertEqual(limiter.perClient.retryAfter("192.0.2.1"), 0)
        self.assertEqual(limiter._trusted, {})
        attempt = limiter.begin("192.0.2.1", "app1")
        self.assertEqual(attempt.failed(), 1)
        self.assertEqual(attempt.failed(), 0)
        self.assertEqual(limiter.counts["failed"], 1)

    def test_ipv6Neighbours(self):
        """
        Addresses of one IPv6 /64 share one client count.
        """
        limiter = self.makeLimiter()
        for i in range(3):
            self.failTimes(limiter, f"2001:db8::{i + 1}", "app1")
        self.assertRaises(LoginLimited, limiter.begin, "2001:db8::ffff", "other")
        limiter.begin("2001:db8:0:1::1", "other")

    def test_limitsOff(self):
        """
        Without limits nothing is ever refused (delays still apply).
        """
        limiter = self.makeLimiter(clientRate=None, userRate=None, delay=1.0)
        delays = self.failTimes(limiter, "192.0.2.1", "app1", 50)
        self.assertEqual(delays, [0.0] * 50)
        self.assertEqual(limiter.clientRetryAfter("192.0.2.1"), 0)

    def test_lockOutLogged(self):
        """
        Each lock-out is one warning naming the service, the scope, the
        client address and the user name; failures below the limit and
        refusals write nothing.
        """
        limiter = self.makeLimiter()
        self.failTimes(limiter, "192.0.2.1", "app\x1b1", 3)
        for _ in range(5):
            self.assertRaises(LoginLimited, limiter.begin, "192.0.2.1", "app1")
        [event] = [e for e in self.logged if e.get("log_namespace", "").startswith("smartrelay.ratelimit")]
        self.assertEqual(
            (event["scope"], event["client"], event["user"], event["service"]),
            ("client", "192.0.2.1", "app\x1b1", "TEST"),
        )
        from twisted.logger import formatEvent

        self.assertEqual(
            formatEvent(event),
            "TEST: client locked out for 900s after 3 failed logins; "
            "last: client 192.0.2.1 user 'app\\x1b1'",
        )

    def test_badArguments(self):
        """
        Negative or non-finite delays, trust times and lock-outs are
        refused with a clear ValueError.
        """
        for kwargs, message in [
            ({"delay": -1}, "the delay must be a number of seconds"),
            ({"maxDelay": float("inf")}, "the longest delay must be"),
            ({"trustTime": 0}, "the trust time must be more than 0"),
            ({"lockout": 0}, "the lock-out must be more than 0"),
            ({"maxKeys": 0}, "maxKeys must be a positive integer"),
            ({"clientRate": (0, 60)}, "failure count must be a positive integer"),
            ({"userRate": (5, -1)}, "period must be a positive number"),
        ]:
            e = self.assertRaises(ValueError, self.makeLimiter, **kwargs)
            self.assertIn(message, str(e))

    @given(
        st.lists(
            st.tuples(
                st.integers(min_value=0, max_value=4),
                st.sampled_from(["app1", "app2", "guess"]),
                st.floats(min_value=0, max_value=120),
                st.booleans(),
            ),
            max_size=150,
        )
    )
    def test_guessersNeverLockTheUserOut(self, steps):
        """
        Whatever other addresses guess, for whichever user names and at
        whatever pace, the real user who logged in from its own address
        is never refused there, and an address that has failed
        C{clientRate} times within the window is refused until its
        lock-out ends.
        """
        limiter = self.makeLimiter(clientRate=(3, 300.0), userRate=(5, 3600.0))
        self.login(limiter, "198.51.100.7", "app1")
        # A model of the per-address rule: failure times, locked until.
        model = {i: ([], 0.0) for i in range(5)}
        for attacker, user, delay, realUserNow in steps:
            self.clock.advance(delay)
            now = self.clock.seconds()
            times, lockedUntil = model[attacker]
            try:
                attempt = limiter.begin(f"192.0.2.{attacker}", user)
            except LoginLimited:
                pass
            else:
                self.assertLessEqual(lockedUntil, now, "a locked-out address was let in")
                attempt.failed()
                times = [t for t in times if t > now - 300] + [now]
                if len(times) == 3:
                    times, lockedUntil = [], now + 900
                model[attacker] = (times, lockedUntil)
            if realUserNow:
                self.login(limiter, "198.51.100.7", "app1")
        self.login(limiter, "198.51.100.7", "app1")
