"""
Tests for C{smartrelay export} (L{smartrelay.commands.export}): from a
SQLite store on disk (C{--config}) and over a fake API server.
"""

import csv
import io
import json
import os

from twisted.internet.defer import maybeDeferred
from twisted.trial.unittest import SynchronousTestCase

from smartrelay.cli import Console, main
from smartrelay.events import Event
from smartrelay.export import formats
from smartrelay.store.sqlite import SQLiteStore
from tests.test_cli_api import TOKEN, CommandTestsMixin, _TTY

T0 = 1_900_000_000.0  # 2030: after "now"


def event(n, type="delivered", **kw):
    """
    A numbered event, C{n} seconds after T0.
    """
    return Event(type=type, queue_id="2A/01-00001-00000001", recipient=f"r{n}@example.com",
                 time=T0 + n, id=f"e{n}", **kw)


class StoreExportTests(SynchronousTestCase):
    """
    C{smartrelay export --config FILE} reads the store directly.
    """

    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.config = os.path.join(self.dir, "relay.ini")
        with open(self.config, "w") as f:
            f.write(f"[smartrelay]\ndata_dir = {self.dir}\n")
        store = SQLiteStore(os.path.join(self.dir, "smartrelay.sqlite"), maybeDeferred)
        self.successResultOf(store.start())
        self.events = [
            event(1, "accepted", tag="t"),
            event(2, "bounced", detail={"kind": "hard", "diagnostic": 'say "no", then\nbye'}),
            event(3, "delivered", metadata={"user": "42"}),
            event(4, "opened"),
        ]
        self.successResultOf(store.appendEvents(self.events))
        self.successResultOf(store.close())

    def run_(self, *argv, tty=False):
        console = Console(stdin=io.StringIO(), stdout=io.StringIO(),
                          stderr=_TTY() if tty else io.StringIO())
        status = main(["export", "--config", self.config, *argv], console)
        return status, console.stdout.getvalue(), console.stderr.getvalue()

    def test_jsonl(self):
        """
        Every event, oldest first, one section 1.7 object a line.
        """
        status, out, err = self.run_("--since", "2026-01-01", "--until", str(T0 + 100))
        self.assertEqual((status, err), (0, ""))
        self.assertEqual([json.loads(line) for line in out.splitlines()],
                         [e.asDict() for e in self.events])

    def test_csvParses(self):
        """
        C{--format csv}: a header row of the section 1.7 keys, then rows
        Python's csv module reads back (detail as JSON, null empty).
        """
        status, out, _ = self.run_("--format", "csv", "--until", str(T0 + 100))
        self.assertEqual(status, 0)
        rows = list(csv.DictReader(io.StringIO(out, newline="")))
        self.assertEqual(list(rows[0]), list(formats.COLUMNS))
        self.assertEqual([r["id"] for r in rows], ["e1", "e2", "e3", "e4"])
        self.assertEqual(json.loads(rows[1]["detail"])["diagnostic"], 'say "no", then\nbye')
        self.assertEqual(rows[1]["tag"], "")
        self.assertEqual(json.loads(rows[2]["metadata"]), {"user": "42"})

    def test_filters(self):
        """
        C{--type} (one or several) and the time range select events;
        C{--until} is exclusive.
        """
        _, out, _ = self.run_("--type", "bounced", "--until", str(T0 + 100))
        self.assertEqual([json.loads(l)["id"] for l in out.splitlines()], ["e2"])
        _, out, _ = self.run_("--type", "opened,accepted", "--until", str(T0 + 100))
        self.assertEqual([json.loads(l)["id"] for l in out.splitlines()], ["e1", "e4"])
        _, out, _ = self.run_("--since", str(T0 + 2), "--until", str(T0 + 4))
        self.assertEqual([json.loads(l)["id"] for l in out.splitlines()], ["e2", "e3"])

    def test_untilDefaultsToNow(self):
        """
        Without C{--until}, the export ends now: these events (in the
        future) are left out.
        """
        status, out, _ = self.run_("--since", "2026-01-01")
        self.assertEqual((status, out), (0, ""))

    def test_progressOnTerminal(self):
        """
        On a terminal, a progress bar with the count goes to standard
        error; the output is unchanged.
        """
        status, out, err = self.run_("--since", str(T0), "--until", str(T0 + 5), tty=True)
        self.assertEqual(len(out.splitlines()), 4)
        self.assertIn("exporting [", err)
        self.assertIn("4 events", err)

    def test_badArguments(self):
        """
        Bad times, types and formats are one line and exit status 2.
        """
        for argv, text in [
            (["--since", "yesterday"], "--since: expected an RFC 3339 time"),
            (["--type", "bounce"], "--type: unknown event type 'bounce'"),
            (["--format", "xml"], "invalid choice"),
            (["--since", str(T0 + 10), "--until", str(T0)], "--since must be before --until"),
        ]:
            status, out, err = self.run_(*argv)
            self.assertEqual((status, out), (2, ""), argv)
            self.assertIn(text, err)
            self.assertEqual(len(err.strip().splitlines()), 1, err)

    def test_noStore(self):
        """
        A data_dir without a store is an error (status 1) and creates
        nothing.
        """
        empty = os.path.join(self.dir, "empty")
        os.makedirs(empty)
        with open(self.config, "w") as f:
            f.write(f"[smartrelay]\ndata_dir = {empty}\n")
        status, out, err = self.run_()
        self.assertEqual(status, 1)
        self.assertIn("no event store at", err)
        self.assertEqual(os.listdir(empty), [])

    def test_badConfig(self):
        """
        A configuration that does not parse is one line, status 2.
        """
        with open(self.config, "w") as f:
            f.write("[export]\nformat = xml\n")
        status, _, err = self.run_()
        self.assertEqual(status, 2)
        self.assertIn("[export] format", err)


class ApiExportTests(CommandTestsMixin, SynchronousTestCase):
    """
    Without C{--config}, C{smartrelay export} walks the API's events.
    """

    def test_jsonl(self):
        """
        The API's events, one a line, through its pages.
        """
        status, out, err = self.run_("export", "--since", "2026-12-01")
        self.assertEqual((status, err), (0, ""))
        self.assertEqual([json.loads(l) for l in out.splitlines()], self.api.events)
        [(_, path, query, _)] = [r for r in self.api.requests if r[1].endswith("/events")]
        self.assertIn("until", query)

    def test_csv(self):
        """
        CSV from the API parses too.
        """
        status, out, _ = self.run_("export", "--format", "csv", "--type", "delivered")
        rows = list(csv.DictReader(io.StringIO(out, newline="")))
        self.assertEqual([r["id"] for r in rows], [e["id"] for e in self.api.events])
        self.assertEqual(json.loads(rows[0]["detail"]), {"code": 250, "remote": "mx.test"})

    def test_noToken(self):
        """
        Without a token: one line, status 2.
        """
        status, _, err = self.run_("export", token=None)
        self.assertEqual(status, 2)
        self.assertIn("no API token", err)
