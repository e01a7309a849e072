"""
L{smartrelay.message}: what many messages have alike is kept once.
"""

import copy
import json
import pickle

from twisted.trial.unittest import SynchronousTestCase

from smartrelay.message import EMPTY, Recipient, SharedDict, SpoolEntry, _Recent

CLIENT = {"ip": "192.0.2.1", "helo": "app.example", "user": None, "tls": False}


def entry(queue_id, **kwargs):
    return SpoolEntry(queue_id, "app@example.org", [Recipient("a@example.com")], 1.0, 10, **kwargs)


class SharingTests(SynchronousTestCase):
    """
    Entries share their sender, client, tag and options with recent
    entries that have equal ones.
    """

    def test_sharedClient(self):
        """Two messages from one client hold one client dict, equal to what was given."""
        first = entry("Q1", client=dict(CLIENT))
        second = entry("Q2", client=dict(CLIENT))
        self.assertIs(first.client, second.client)
        self.assertEqual(first.client, CLIENT)
        self.assertIsInstance(first.client, dict)

    def test_sharedSender(self):
        """Equal senders built apart are one string."""
        a = entry("Q1")
        b = SpoolEntry("Q2", "".join(["app@", "example.org"]), [], 1.0, 1)
        self.assertIs(a.sender, b.sender)

    def test_emptyMappings(self):
        """No metadata and no options are the one shared empty mapping."""
        e = entry("Q1", metadata={}, options={})
        self.assertIs(e.metadata, EMPTY)
        self.assertIs(e.options, EMPTY)
        self.assertIs(entry("Q2").client, EMPTY)

    def test_metadataNotShared(self):
        """Metadata (usually one message's own) is kept as given."""
        metadata = {"order": "1234"}
        self.assertIs(entry("Q1", metadata=metadata).metadata, metadata)

    def test_refusesChanges(self):
        """A shared dict refuses every change with a TypeError instead of changing other messages."""
        shared = entry("Q1", client=dict(CLIENT)).client
        for change in (
            lambda: shared.__setitem__("ip", "x"),
            lambda: shared.__delitem__("ip"),
            lambda: shared.update(ip="x"),
            lambda: shared.pop("ip"),
            lambda: shared.popitem(),
            lambda: shared.setdefault("new", 1),
            lambda: shared.clear(),
        ):
            self.assertRaises(TypeError, change)
        self.assertEqual(shared, CLIENT)

    def test_newDictAssigned(self):
        """Assigning a new dict to a field shares it too."""
        e = entry("Q1")
        e.options = {"clicks": False}
        self.assertIsInstance(e.options, SharedDict)
        self.assertEqual(e.options, {"clicks": False})

    def test_serialisable(self):
        """A shared dict is JSON, pickles back to an equal shared dict, and copies as itself."""
        shared = entry("Q1", client=dict(CLIENT)).client
        self.assertEqual(json.loads(json.dumps(shared)), CLIENT)
        back = pickle.loads(pickle.dumps(entry("Q1", client=dict(CLIENT))))
        self.assertEqual(back.client, CLIENT)
        self.assertIs(copy.deepcopy(shared), shared)
        self.assertEqual(dict(shared), CLIENT)

    def test_unhashableKept(self):
        """A client dict with unhashable values is kept as given."""
        odd = {"ip": "192.0.2.1", "extra": ["list"]}
        self.assertIs(entry("Q1", client=odd).client, odd)

    def test_bounded(self):
        """The memory of recent values forgets everything when it is full."""
        recent = _Recent(size=3)
        values = [recent.string("v%d" % n) for n in range(3)]
        again = "".join(["v", "0"])
        self.assertIs(recent.string(again), again)
        self.assertEqual(values, ["v0", "v1", "v2"])
        self.assertLessEqual(len(recent._seen), 3)
        self.assertIsNone(recent.string(None))
