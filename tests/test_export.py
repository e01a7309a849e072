"""
Tests for L{smartrelay.export.exporter} and L{smartrelay.export.formats}:
export files on a memory store and a fake clock, crashes at every step,
the command after each file.
"""

import csv
import gzip
import io
import json
import os

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from smartrelay.events import Event
from smartrelay.export import formats
from smartrelay.export.exporter import (
    COMMAND_RETRIES,
    EXPORT_RETRY,
    STREAM,
    CommandFailed,
    ExportFile,
    Exporter,
    fileName,
    prepareDirectory,
)
from smartrelay.store.interfaces import EventClaim
from smartrelay.store.memory import MemoryStore

T0 = 1_796_000_000.0


def synchronous(f, *args, **kwargs):
    """
    A C{runInThread} that runs C{f} at once.
    """
    return maybeDeferred(f, *args, **kwargs)


def event(n, type="delivered", **kw):
    """
    A numbered event.
    """
    return Event(
        type=type, queue_id="2A/01-00001-00000001", recipient=f"r{n}@example.com",
        time=T0 + n, id=f"e{n}", **kw,
    )


def readFile(path):
    """
    The events' ids in an export file (JSONL or CSV, gzipped or not).
    """
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", newline="") as f:
        text = f.read()
    if ".csv" in path:
        rows = list(csv.DictReader(io.StringIO(text)))
        return [row["id"] for row in rows]
    return [json.loads(line)["id"] for line in text.splitlines()]


class Commands:
    """
    A fake C{runCommand}: records argv lists; each call's Deferred is kept
    to be fired by the test.
    """

    def __init__(self):
        self.calls = []

    def __call__(self, argv):
        d = Deferred()
        self.calls.append((list(argv), d))
        return d


class PatchableStore:
    """
    A L{MemoryStore} whose methods a test may replace.
    """

    def __init__(self):
        self._store = MemoryStore()

    def __getattr__(self, name):
        return getattr(self._store, name)


class ExporterTests(SynchronousTestCase):
    """
    L{Exporter} writes every event to exactly one file.
    """

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(T0 + 1000)
        self.store = PatchableStore()
        self.directory = self.mktemp()
        self.errors = []
        globalLogPublisher.addObserver(self.errors.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.errors.append)

    def exporter(self, **kw):
        options = dict(
            store=self.store, clock=self.clock, directory=self.directory, owner="2A",
            runInThread=synchronous, interval=60.0,
        )
        options.update(kw)
        exporter = Exporter(**options)
        exporter.startService()
        self.addCleanup(exporter.stopService)
        self.clock.advance(0)
        return exporter

    def append(self, *events):
        self.successResultOf(self.store.appendEvents(list(events)))

    def files(self):
        return sorted(os.listdir(self.directory))

    def allExported(self):
        return [i for name in self.files() if not name.startswith(".")
                for i in readFile(os.path.join(self.directory, name))]

    def test_emptyIntervalWritesNothing(self):
        """
        Without events no file is written, interval after interval.
        """
        self.exporter()
        self.clock.advance(600)
        self.assertEqual(self.files(), [])

    def test_eachIntervalOneFile(self):
        """
        The events of each interval go into one new JSONL file; every
        event is in exactly one file and earlier files stay as they were.
        """
        self.append(event(1), event(2))
        exporter = self.exporter()
        [first] = self.files()
        self.assertRegex(first, r"^events-2A-\d{8}T\d{6}Z-000000000001\.jsonl$")
        with open(os.path.join(self.directory, first), "rb") as f:
            before = f.read()
        self.append(event(3))
        self.clock.advance(60)
        self.append(event(4), event(5))
        self.clock.advance(60)
        self.assertEqual(len(self.files()), 3)
        self.assertEqual(self.allExported(), ["e1", "e2", "e3", "e4", "e5"])
        with open(os.path.join(self.directory, first), "rb") as f:
            self.assertEqual(f.read(), before)
        self.assertEqual((exporter.files, exporter.exported), (3, 5))

    def test_jsonLinesAreTheEventModel(self):
        """
        Each line is the event's DESIGN section 1.7 object.
        """
        e = event(1, type="bounced", tag="t", metadata={"k": "é"}, detail={"kind": "hard"})
        self.append(e)
        self.exporter()
        [name] = self.files()
        with open(os.path.join(self.directory, name), encoding="utf-8") as f:
            self.assertEqual([json.loads(line) for line in f], [e.asDict()])

    def test_csvGzip(self):
        """
        C{format = csv} with C{gzip = on}: a gzip file of CSV with a header
        row that Python's csv module reads back, detail as JSON.
        """
        self.append(event(1, detail={"reason": 'a "quoted", comma\nline'}), event(2))
        self.exporter(format="csv", gzip=True)
        [name] = self.files()
        self.assertTrue(name.endswith(".csv.gz"))
        with gzip.open(os.path.join(self.directory, name), "rt", newline="") as f:
            rows = list(csv.reader(f))
        self.assertEqual(rows[0], list(formats.COLUMNS))
        self.assertEqual(json.loads(rows[1][7]), {"reason": 'a "quoted", comma\nline'})
        self.assertEqual([row[0] for row in rows[1:]], ["e1", "e2"])
        self.assertEqual(rows[1][5], "")

    def test_crashAfterRenameBeforeFinish(self):
        """
        A file that was renamed in before a crash, its claim not finished:
        the next run finds it, writes nothing again, and goes on after it.
        """
        self.append(event(1), event(2))
        claim = self.successResultOf(self.store.claimEvents(STREAM, "2A", T0 + 900))
        os.makedirs(self.directory)
        name = fileName(claim, "jsonl", False)
        f = ExportFile(self.directory, name, "jsonl", False, claim.time)
        f.write(self.successResultOf(self.store.claimedEvents(claim)).events)
        f.commit(marker=False)
        self.append(event(3))
        self.exporter()
        self.assertEqual(self.files(), [name])
        self.clock.advance(60)
        self.assertEqual(self.allExported(), ["e1", "e2", "e3"])

    def test_crashBeforeRename(self):
        """
        A crash while the file was written aside: the half-written file is
        removed and the claim is written again, whole, once.
        """
        self.append(event(1), event(2))
        claim = self.successResultOf(self.store.claimEvents(STREAM, "2A", T0 + 900))
        os.makedirs(self.directory)
        name = fileName(claim, "jsonl", False)
        tmp = os.path.join(self.directory, "." + name + ".tmp")
        with open(tmp, "w") as f:
            f.write('{"id": "e1"')
        self.append(event(3))
        self.exporter()
        self.assertEqual(self.files(), [name])
        self.assertEqual(readFile(os.path.join(self.directory, name)), ["e1", "e2"])
        self.clock.advance(60)
        self.assertEqual(self.allExported(), ["e1", "e2", "e3"])

    def test_storeFailureRetried(self):
        """
        If the store fails, nothing is written, the failure is logged and
        the export is tried again after at most L{EXPORT_RETRY} seconds.
        """
        broken = [True]
        claimEvents = self.store.claimEvents

        def flaky(*args, **kw):
            if broken:
                return fail(RuntimeError("store down"))
            return claimEvents(*args, **kw)

        self.store.claimEvents = flaky
        self.append(event(1))
        exporter = self.exporter(interval=3600.0)
        self.assertEqual(self.files(), [])
        self.assertEqual(exporter.failures, 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        broken.clear()
        self.clock.advance(EXPORT_RETRY)
        self.assertEqual(self.allExported(), ["e1"])

    def test_prunedClaimWritesNothing(self):
        """
        A claim whose events were all pruned meanwhile writes no file and
        leaves nothing behind.
        """
        self.append(event(1))
        self.successResultOf(self.store.claimEvents(STREAM, "2A", T0))
        self.successResultOf(self.store.pruneEvents(T0 + 10))
        self.exporter()
        self.assertEqual(self.files(), [])
        self.assertIsNone(self.successResultOf(self.store.claimEvents(STREAM, "2A", T0)))

    def test_twoNodesShareAStore(self):
        """
        Two nodes exporting from one store write disjoint files that
        between them hold every event.
        """
        self.append(event(1), event(2))
        self.exporter(owner="01")
        self.append(event(3))
        self.exporter(owner="02")
        names = self.files()
        self.assertEqual([n.split("-")[1] for n in names], ["01", "02"])
        self.assertEqual(self.allExported(), ["e1", "e2", "e3"])

    def test_commandAfterEachFile(self):
        """
        The command runs with the new file's path as its last argument; its
        marker goes once it succeeds.
        """
        commands = Commands()
        self.append(event(1))
        exporter = self.exporter(command=["upload", "--to", "x"], runCommand=commands)
        [name] = [n for n in self.files() if not n.startswith(".")]
        [(argv, d)] = commands.calls
        self.assertEqual(argv, ["upload", "--to", "x", os.path.join(self.directory, name)])
        self.assertIn("." + name + ".command", self.files())
        d.callback(None)
        self.assertEqual(self.files(), [name])
        self.assertEqual(exporter.pendingCommands, set())

    def test_commandFailureRetriedWithBackOff(self):
        """
        A failed command is logged and run again after the retry delays.
        """
        commands = Commands()
        self.append(event(1))
        exporter = self.exporter(command=["upload"], runCommand=commands)
        commands.calls[0][1].errback(CommandFailed("upload failed (exit status 3)"))
        self.assertEqual(exporter.commandFailures, 1)
        messages = [e.get("log_format", "") for e in self.errors if e.get("why")]
        self.assertTrue(any("failed" in m for m in messages), messages)
        self.clock.advance(COMMAND_RETRIES[0] - 0.5)
        self.assertEqual(len(commands.calls), 1)
        self.clock.advance(0.5)
        self.assertEqual(len(commands.calls), 2)
        commands.calls[1][1].errback(CommandFailed("again"))
        self.clock.advance(COMMAND_RETRIES[1])
        self.assertEqual(len(commands.calls), 3)
        commands.calls[2][1].callback(None)
        self.assertEqual(exporter.pendingCommands, set())

    def test_commandPendingAtStart(self):
        """
        A file whose command had not succeeded when the relay stopped gets
        it at the next start; a marker without its file is removed.
        """
        os.makedirs(self.directory)
        for name in ("events-a.jsonl", ".events-a.jsonl.command", ".gone.jsonl.command"):
            open(os.path.join(self.directory, name), "w").close()
        commands = Commands()
        self.exporter(command=["upload"], runCommand=commands)
        self.assertEqual(
            [argv for argv, _ in commands.calls],
            [["upload", os.path.join(self.directory, "events-a.jsonl")]],
        )
        self.assertNotIn(".gone.jsonl.command", self.files())

    def test_stopWaitsForTheExport(self):
        """
        C{stopService} fires once the export in progress is written.
        """
        gate = Deferred()
        claimEvents = self.store.claimEvents
        self.store.claimEvents = lambda *a, **kw: gate.addCallback(lambda _: claimEvents(*a, **kw))
        self.append(event(1))
        exporter = self.exporter()
        stopped = exporter.stopService()
        self.assertNoResult(stopped)
        gate.callback(None)
        self.successResultOf(stopped)
        self.assertEqual(len(self.files()), 1)
        self.clock.advance(3600)
        self.assertEqual(len(self.files()), 1)

    def test_fileNameStable(self):
        """
        A claim's file name depends only on the claim.
        """
        claim = EventClaim("export", "2A", 41, 90, 1_800_000_000.5)
        self.assertEqual(
            fileName(claim, "csv", True), "events-2A-20270115T080000Z-000000000042.csv.gz"
        )

    def test_prepareDirectory(self):
        """
        L{prepareDirectory} creates the directory and clears half-written
        files, keeping finished ones.
        """
        directory = os.path.join(self.mktemp(), "a", "b")
        self.assertEqual(prepareDirectory(directory), [])
        for name in ("events-1.jsonl", ".events-2.jsonl.tmp"):
            open(os.path.join(directory, name), "w").close()
        self.assertEqual(prepareDirectory(directory), [])
        self.assertEqual(os.listdir(directory), ["events-1.jsonl"])

    def test_neverReplacesAFile(self):
        """
        Putting a file in place fails rather than replace one of that name.
        """
        os.makedirs(self.directory)
        path = os.path.join(self.directory, "x.jsonl")
        with open(path, "w") as f:
            f.write("old")
        f = ExportFile(self.directory, "x.jsonl", "jsonl", False, T0)
        f.write([event(1)])
        self.assertRaises(FileExistsError, f.commit, False)
        with open(path) as f:
            self.assertEqual(f.read(), "old")


eventStrategy = st.builds(
    Event,
    type=st.sampled_from(["delivered", "bounced", "opened"]),
    queue_id=st.none() | st.text(max_size=20),
    recipient=st.none() | st.text(max_size=30),
    time=st.floats(min_value=0, max_value=4e9),
    tag=st.none() | st.text(max_size=10),
    metadata=st.dictionaries(st.text(max_size=5), st.text(max_size=10), max_size=3),
    detail=st.dictionaries(st.text(max_size=5), st.text(max_size=10) | st.integers(), max_size=3),
    id=st.text(min_size=1, max_size=10),
)


class FormatTests(SynchronousTestCase):
    """
    The JSONL and CSV encodings read back to the events.
    """

    @given(st.lists(eventStrategy, max_size=5))
    def test_csvRoundTrip(self, events):
        """
        Any events, as CSV, read back with Python's csv module to their
        fields (metadata and detail as JSON, null as empty).
        """
        text = formats.header("csv") + formats.encode("csv", events)
        rows = list(csv.reader(io.StringIO(text, newline="")))
        self.assertEqual(rows[0], list(formats.COLUMNS))
        self.assertEqual(len(rows), len(events) + 1)
        for event, row in zip(events, rows[1:]):
            d = event.asDict()
            self.assertEqual(row[0], d["id"])
            self.assertEqual(row[4], d["recipient"] or "")
            self.assertEqual(json.loads(row[7]), d["detail"])

    @given(st.lists(eventStrategy, max_size=5))
    def test_jsonlRoundTrip(self, events):
        """
        Any events, as JSON lines, read back to their section 1.7 objects.
        """
        text = formats.encode("jsonl", events)
        self.assertEqual(
            [json.loads(line) for line in text.split("\n")[:-1]],
            [e.asDict() for e in events],
        )

    def test_unknownFormat(self):
        """
        An unknown format is a L{ValueError}.
        """
        self.assertRaises(ValueError, formats.encode, "xml", [])


class FastPathTests(SynchronousTestCase):
    """
    The export's fast encodings give the same text as the event model's.
    """

    @given(st.floats(min_value=0, max_value=4e9) | st.integers(0, 4_000_000_000).map(
        lambda n: n + 0.9995))
    def test_rfc3339(self, seconds):
        """
        L{formats.rfc3339} is L{smartrelay.events.rfc3339} for any time.
        """
        from smartrelay.events import rfc3339

        self.assertEqual(formats.rfc3339(seconds), rfc3339(seconds))

    @given(eventStrategy)
    def test_jsonLine(self, event):
        """
        A line is the compact JSON of the event's section 1.7 object, keys
        in order.
        """
        self.assertEqual(
            formats.jsonLine(event),
            json.dumps(event.asDict(), ensure_ascii=False, separators=(",", ":")) + "\n",
        )
        self.assertEqual(formats.jsonLine(event.asDict()), formats.jsonLine(event))
        self.assertEqual(formats.csvRow(event.asDict()), formats.csvRow(event))


class FakeProcessReactor(Clock):
    """
    A clock with C{spawnProcess}: records each child, whose end the test
    decides.
    """

    def __init__(self):
        Clock.__init__(self)
        self.spawned = []

    def spawnProcess(self, protocol, program, args, env=None, childFDs=None):
        test = self

        class Transport:
            signals = []

            def closeStdin(self):
                pass

            def signalProcess(self, name):
                self.signals.append(name)

        transport = Transport()
        self.spawned.append((protocol, program, list(args), transport))
        protocol.makeConnection(transport)
        return transport


class ProcessRunnerTests(SynchronousTestCase):
    """
    L{ProcessRunner} runs the export command and reports how it ended.
    """

    def setUp(self):
        from smartrelay.export.exporter import ProcessRunner

        self.reactor = FakeProcessReactor()
        self.runner = ProcessRunner(self.reactor, timeout=60)

    def end(self, exitCode=0, signal=None, output=b""):
        from twisted.internet.error import ProcessDone, ProcessTerminated
        from twisted.python.failure import Failure

        protocol, _, _, _ = self.reactor.spawned[-1]
        if output:
            protocol.childDataReceived(2, output)
        reason = ProcessDone(0) if exitCode == 0 and signal is None else ProcessTerminated(
            exitCode, signal)
        protocol.processEnded(Failure(reason))

    def test_success(self):
        """
        The program is found on PATH and run with the arguments; exit 0
        is success.
        """
        d = self.runner(["sh", "-c", "true", "/x/file.jsonl"])
        [(_, program, args, _)] = self.reactor.spawned
        self.assertTrue(program.endswith("/sh"))
        self.assertEqual(args, ["sh", "-c", "true", "/x/file.jsonl"])
        self.end(0)
        self.successResultOf(d)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_failure(self):
        """
        A non-zero exit status fails with its number and the end of the
        output, in one line.
        """
        d = self.runner(["sh"])
        self.end(3, output=b"upload:\n  denied\n")
        failure = self.failureResultOf(d, CommandFailed)
        self.assertEqual(str(failure.value), "sh failed (exit status 3): upload: denied")

    def test_timeout(self):
        """
        A command running past the timeout is killed and fails.
        """
        d = self.runner(["sh"])
        self.reactor.advance(60)
        [(_, _, _, transport)] = self.reactor.spawned
        self.assertEqual(transport.signals, [9])
        self.end(None, signal=9)
        failure = self.failureResultOf(d, CommandFailed)
        self.assertIn("ran longer than 60s and was killed", str(failure.value))

    def test_noSuchProgram(self):
        """
        A program that is not there fails without starting anything.
        """
        self.failureResultOf(self.runner(["no-such-program-xyz"]), CommandFailed)
        self.assertEqual(self.reactor.spawned, [])

    def test_stop(self):
        """
        C{stop} terminates the commands still running.
        """
        self.runner(["sh"])
        self.runner.stop()
        [(_, _, _, transport)] = self.reactor.spawned
        self.assertEqual(transport.signals, ["TERM"])
