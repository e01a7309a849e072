"""
The parked recipients' index in L{smartrelay.outbound.parking.Parking}:
kept by queue id (one tuple for a message's one parked recipient), and
always agreeing with the plain model of "which recipient is parked where".
"""

from hypothesis import given, strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from smartrelay.outbound.parking import Parking
from smartrelay.outbound.session import Reply
from smartrelay.outbound.testing import Delays, makeEntry

REFUSED = Reply(451, "4.4.1", "cannot connect: Connection refused")
KEYS = ("relay:a.test:25", "relay:b.test:25")
ADDRESSES = ("x@one.example", "y@one.example", "z@two.example")


class Harness:
    """
    A L{Parking} with recording callbacks and a model of what it holds.
    """

    def __init__(self):
        self.clock = Clock()
        self.clock.advance(1_700_000_000.0)
        self.recorded, self.released = [], []
        self.parking = Parking(
            clock=self.clock,
            retry=Delays((60, 300)),
            maxAge=86400.0,
            record=self.recorded.append,
            expire=lambda entry, changes, events: None,
            release=lambda entry, addresses: self.released.append((entry.queue_id, list(addresses))),
            opening=lambda key: False,
        )
        self.entries = {}
        #: (queue id, address) → destination key
        self.model = {}

    def entry(self, queue_id):
        if queue_id not in self.entries:
            self.entries[queue_id] = makeEntry(queue_id, list(ADDRESSES), received=self.clock.seconds())
        return self.entries[queue_id]

    def park(self, key, queue_id, addresses):
        if self.parking.get(key) is None:
            self.parking.suspend(key, REFUSED, key)
        self.parking.park(key, self.entry(queue_id), addresses)
        for address in addresses:
            self.model[(queue_id, address)] = key

    def forget(self, queue_id, domain):
        self.parking.forget(queue_id, domain)
        for member in [m for m in self.model if m[0] == queue_id]:
            if domain is None or member[1].endswith("@" + domain):
                del self.model[member]

    def recover(self, key):
        self.parking.recovered(key)
        self.clock.advance(0)
        for member in [m for m, k in self.model.items() if k == key]:
            del self.model[member]

    def check(self, case):
        parking = self.parking
        case.assertEqual(len(parking), len(self.model))
        for queue_id in self.entries:
            for address in ADDRESSES:
                case.assertEqual((queue_id, address) in parking, (queue_id, address) in self.model)
        for key in KEYS:
            suspension = parking.get(key)
            here = {m for m, k in self.model.items() if k == key}
            if suspension is None:
                case.assertEqual(here, set())
                continue
            case.assertEqual(suspension.count, len(here))
            case.assertEqual(parking.state(key)["parked"], len(here))
            case.assertEqual(set(suspension.members), {q for q, _ in here})


operations = st.lists(
    st.one_of(
        st.tuples(
            st.just("park"),
            st.sampled_from(KEYS),
            st.sampled_from("ABC"),
            st.lists(st.sampled_from(ADDRESSES), min_size=1, max_size=3, unique=True),
        ),
        st.tuples(st.just("forget"), st.sampled_from("ABC"), st.sampled_from([None, "one.example"])),
        st.tuples(st.just("recover"), st.sampled_from(KEYS)),
    ),
    max_size=30,
)


class ParkingIndexTests(SynchronousTestCase):
    """
    The index agrees with the model whatever is parked, forgotten and
    released, in any order.
    """

    @given(operations)
    def test_agreesWithModel(self, ops):
        """Counts, membership and each suspension's messages follow every park, forget and release."""
        harness = Harness()
        for op, *args in ops:
            getattr(harness, op)(*args)
            harness.check(self)

    def test_severalOfOneMessage(self):
        """Two recipients of one message parked at one destination count twice and keep the message a member until both are gone."""
        harness = Harness()
        harness.park(KEYS[0], "A", ["x@one.example", "y@one.example"])
        suspension = harness.parking.get(KEYS[0])
        self.assertEqual((suspension.count, list(suspension.members)), (2, ["A"]))
        harness.forget("A", None)
        self.assertEqual((suspension.count, list(suspension.members)), (0, []))
        harness.check(self)

    def test_probeTakesOneRecipient(self):
        """At the retry time one recipient of a message with two parked is released as the probe; the other stays parked."""
        harness = Harness()
        harness.park(KEYS[0], "A", ["x@one.example", "y@one.example"])
        harness.clock.advance(60)
        self.assertEqual(harness.released, [("A", ["x@one.example"])])
        self.assertIn(("A", "y@one.example"), harness.parking)
        self.assertNotIn(("A", "x@one.example"), harness.parking)
        self.assertEqual(harness.parking.get(KEYS[0]).count, 1)

    def test_releaseAll(self):
        """Recovery releases every parked recipient of a message in one call, and nothing stays counted."""
        harness = Harness()
        harness.park(KEYS[0], "A", ["x@one.example", "y@one.example"])
        harness.park(KEYS[0], "B", ["x@one.example"])
        harness.recover(KEYS[0])
        self.assertEqual(
            sorted(harness.released), [("A", ["x@one.example", "y@one.example"]), ("B", ["x@one.example"])]
        )
        self.assertEqual(len(harness.parking), 0)
        harness.check(self)

    def test_recordedOnce(self):
        """A recipient parked twice before the bulk record gets one deferral, not two."""
        harness = Harness()
        harness.park(KEYS[0], "A", ["x@one.example"])
        harness.park(KEYS[0], "A", ["x@one.example"])
        harness.clock.advance(1)
        ((entry, changes, events),) = harness.recorded[0]
        self.assertEqual([c.address for c in changes], ["x@one.example"])

    def test_movedBetweenDestinations(self):
        """A recipient parked again at another destination leaves the first one's count."""
        harness = Harness()
        harness.park(KEYS[0], "A", ["x@one.example", "z@two.example"])
        harness.park(KEYS[1], "A", ["x@one.example"])
        self.assertEqual(harness.parking.get(KEYS[0]).count, 1)
        self.assertEqual(harness.parking.get(KEYS[1]).count, 1)
        harness.check(self)

    def test_lastDeferral(self):
        """A parked recipient's last deferral is made from its suspension when asked; others have none."""
        harness = Harness()
        harness.park(KEYS[0], "A", ["x@one.example"])
        detail = harness.parking.lastDeferral("A", "x@one.example")
        self.assertEqual(detail["suspended"], KEYS[0])
        self.assertEqual(detail["code"], 451)
        self.assertEqual(detail["status"], "4.4.1")
        self.assertEqual(detail["attempts"], 0)
        self.assertEqual(detail["next_attempt"], "2023-11-14T22:14:20.000Z")
        self.assertTrue(detail["reply"].startswith("delivery temporarily suspended: "))
        self.assertIsNone(harness.parking.lastDeferral("A", "y@one.example"))
        self.assertIsNone(harness.parking.lastDeferral("B", "x@one.example"))
        harness.recover(KEYS[0])
        self.assertIsNone(harness.parking.lastDeferral("A", "x@one.example"))

    def test_lastDeferralLikeTheEvent(self):
        """The detail asked for equals the one the bulk record's event carried."""
        harness = Harness()
        harness.park(KEYS[0], "A", ["x@one.example"])
        harness.clock.advance(1)
        ((entry, changes, events),) = harness.recorded[0]
        self.assertEqual(harness.parking.lastDeferral("A", "x@one.example"), events[0][2])
