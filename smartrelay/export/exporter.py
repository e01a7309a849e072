# -*- test-case-name: tests.test_export -*-
"""
The exporter (DESIGN section 1.7b): every C{[export] interval}, the events
stored since the last file go into a new file in C{[export] directory}.

Each file is one claim of the store's C{export} stream
(L{smartrelay.store.interfaces.IEventStreams}): the claim (a range of the
store's insertion order, owned by this node) is durable before the file is
written, and finished only once the file is in place, so after a crash the
same claim comes back and is written again under the same name, or, if the
file had been renamed in already, only finished.  Every event is in
exactly one file; none twice, none missed; nothing is written for an
interval without events.

A file is written aside (C{.NAME.tmp} in the same directory), fsynced,
linked in under its name (never over an existing file) and the directory
fsynced; a file once there is never touched again.  Names sort by time:
C{events-<node>-<claim time, UTC>-<first sequence number>.jsonl[.gz]}.

With C{[export] command}, the program runs after each new file with the
file's path as its last argument; a marker C{.NAME.command} (written with
the file) stays until it exits 0, so a failure is retried with back-off,
also after a restart.
"""

import gzip as gziplib
import os
import shutil
import signal
import time as _time
from typing import Any, Callable, Optional, Sequence

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from smartrelay.diskio import fsyncDirectory, unlinkQuietly
from smartrelay.export.formats import encode, extension, header
from smartrelay.store.interfaces import EventClaim, IEventStreams

#: The store stream the exporter reads.
STREAM = "export"
#: Events per store read.
PAGE = 1000
#: Seconds before a failed command is run again (the last one repeats).
COMMAND_RETRIES = (10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
#: Seconds before an export that failed (store or disk trouble) is tried
#: again, at most (never later than the next interval).
EXPORT_RETRY = 30.0

_TMP_SUFFIX = ".tmp"
_COMMAND_SUFFIX = ".command"


def fileName(claim: EventClaim, format: str, gzip: bool) -> str:
    """
    The name of the file of C{claim}: the same for the same claim, so a
    claim written again after a crash is recognised.
    """
    stamp = _time.strftime("%Y%m%dT%H%M%SZ", _time.gmtime(claim.time))
    node = "".join(c if c.isalnum() or c in "-_" else "_" for c in claim.owner)
    return f"events-{node}-{stamp}-{claim.after + 1:012d}{extension(format, gzip)}"


class ExportFile:
    """
    One export file being written, aside, in a thread (every method
    blocks).
    """

    def __init__(self, directory: str, name: str, format: str, gzip: bool, mtime: float):
        self.directory = directory
        self.name = name
        self.format = format
        self.path = os.path.join(directory, name)
        self.tmp = os.path.join(directory, "." + name + _TMP_SUFFIX)
        self.marker = os.path.join(directory, "." + name + _COMMAND_SUFFIX)
        self.count = 0
        self._raw = open(self.tmp, "wb")
        self._out: Any = self._raw
        if gzip:
            self._out = gziplib.GzipFile(
                filename=name[: -len(".gz")],
                mode="wb",
                fileobj=self._raw,
                compresslevel=6,
                mtime=int(mtime),
            )
        self._out.write(header(format).encode("utf-8"))

    def write(self, events: list) -> None:
        # "replace": a lone surrogate (never valid UTF-8) must not stop the
        # export for good.
        self._out.write(encode(self.format, events).encode("utf-8", "replace"))
        self.count += len(events)

    def commit(self, marker: bool) -> None:
        """
        fsync, then put the file in place under its name (never replacing
        a file) and fsync the directory.

        @param marker: also leave the C{.NAME.command} marker.
        """
        if self._out is not self._raw:
            self._out.close()
        self._raw.flush()
        os.fsync(self._raw.fileno())
        self._raw.close()
        if marker:
            with open(self.marker, "wb") as f:
                os.fsync(f.fileno())
        try:
            os.link(self.tmp, self.path)
        except FileExistsError:
            raise
        except OSError:
            # A file system without hard links: rename, after checking.
            if os.path.exists(self.path):
                raise FileExistsError(self.path) from None
            os.rename(self.tmp, self.path)
        else:
            os.unlink(self.tmp)
        fsyncDirectory(self.directory)

    def abort(self) -> None:
        try:
            self._raw.close()
        finally:
            unlinkQuietly(self.tmp)


def prepareDirectory(directory: str) -> list[str]:
    """
    Make the export directory if needed, remove files left half-written
    by a crash, and list the files whose command has not succeeded yet
    (oldest first).  Blocking.
    """
    os.makedirs(directory, 0o750, exist_ok=True)
    pending = []
    for entry in sorted(os.listdir(directory)):
        if not entry.startswith("."):
            continue
        if entry.endswith(_TMP_SUFFIX):
            unlinkQuietly(os.path.join(directory, entry))
        elif entry.endswith(_COMMAND_SUFFIX):
            name = entry[1 : -len(_COMMAND_SUFFIX)]
            if os.path.exists(os.path.join(directory, name)):
                pending.append(name)
            else:
                unlinkQuietly(os.path.join(directory, entry))
    return pending


class CommandFailed(Exception):
    """
    The export command did not exit 0 (or could not be started, or ran
    too long); the message says how, in one line.
    """


class _CommandProtocol(ProcessProtocol):
    """
    Collects the last few KiB of a command's output and its end.
    """

    KEEP = 4096

    def __init__(self, done: Deferred):
        self.done = done
        self.output = b""

    def childDataReceived(self, fd, data):
        self.output = (self.output + data)[-self.KEEP :]

    def processEnded(self, reason):
        self.done.callback(reason.value)


@attrs.define
class ProcessRunner:
    """
    Runs an export command with C{reactor.spawnProcess}, in the relay's
    environment, killed after C{timeout} seconds.

    @ivar reactor: provides C{IReactorProcess} and C{IReactorTime}.
    """

    reactor: Any
    timeout: float = 600.0
    _running: set = attrs.field(factory=set, init=False)

    def __call__(self, argv: Sequence[str]) -> Deferred:
        return Deferred.fromCoroutine(self._run(list(argv)))

    async def _run(self, argv: list) -> None:
        program = shutil.which(argv[0]) if os.sep not in argv[0] else argv[0]
        if program is None or not os.access(program, os.X_OK):
            raise CommandFailed(f"{argv[0]}: no such program")
        ended: Deferred = Deferred()
        protocol = _CommandProtocol(ended)
        transport = self.reactor.spawnProcess(
            protocol, program, argv, env=dict(os.environ), childFDs={0: "r", 1: "r", 2: "r"}
        )
        transport.closeStdin()
        self._running.add(transport)
        timedOut = []

        def kill():
            timedOut.append(True)
            try:
                transport.signalProcess(signal.SIGKILL)
            except Exception:
                pass

        timer = self.reactor.callLater(self.timeout, kill)
        try:
            reason = await ended
        finally:
            self._running.discard(transport)
            if timer.active():
                timer.cancel()
        output = " ".join(protocol.output.decode("utf-8", "replace").split())[-300:]
        if timedOut:
            raise CommandFailed(f"{argv[0]} ran longer than {self.timeout:g}s and was killed")
        code = getattr(reason, "exitCode", None)
        if code != 0:
            signal_ = getattr(reason, "signal", None)
            how = f"exit status {code}" if signal_ is None else f"signal {signal_}"
            raise CommandFailed(f"{argv[0]} failed ({how})" + (f": {output}" if output else ""))

    def stop(self) -> None:
        """
        Stop the commands still running (their files keep their marker and
        are handed to the command again at the next start).
        """
        for transport in list(self._running):
            try:
                transport.signalProcess("TERM")
            except Exception:
                pass


class Exporter(Service):
    """
    Writes the store's events to export files every C{interval} seconds
    (the first right after start-up), and runs the command on new files.

    @ivar lastFile: the name of the newest file written, or L{None}.
    @ivar files: files written by this run.
    @ivar exported: events written by this run.
    @ivar failures: exports that failed (store or disk trouble), by this
        run.
    @ivar commandFailures: command runs that failed.
    @ivar pendingCommands: files whose command has not succeeded yet.
    """

    log = Logger()

    def __init__(
        self,
        *,
        store: IEventStreams,
        clock: IReactorTime,
        directory: str,
        owner: str,
        runInThread: Callable[..., Deferred],
        format: str = "jsonl",
        gzip: bool = False,
        interval: float = 300.0,
        command: Optional[Sequence[str]] = None,
        runCommand: Optional[Callable[[Sequence[str]], Deferred]] = None,
        commandRetries: Sequence[float] = COMMAND_RETRIES,
    ):
        if command and runCommand is None:
            raise ValueError("a command needs runCommand")
        self.store = store
        self.clock = clock
        self.directory = directory
        self.owner = owner
        self.runInThread = runInThread
        self.format = format
        self.gzip = gzip
        self.interval = interval
        self.command = tuple(command) if command else None
        self.runCommand = runCommand
        self.commandRetries = tuple(commandRetries)
        self.lastFile: Optional[str] = None
        self.files = 0
        self.exported = 0
        self.failures = 0
        self.commandFailures = 0
        self.pendingCommands: set = set()
        self._timer = None
        self._running: Deferred = succeed(None)
        self._prepared = False
        self._commandTimers: dict = {}
        self._commandsRunning: dict = {}

    # -- the service -----------------------------------------------------

    def startService(self) -> None:
        Service.startService(self)
        self._schedule(0)

    def stopService(self) -> Deferred:
        Service.stopService(self)
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        for timer in self._commandTimers.values():
            if timer.active():
                timer.cancel()
        self._commandTimers.clear()
        stop = getattr(self.runCommand, "stop", None)
        if stop is not None:
            stop()
        return self._running

    def _schedule(self, delay: float) -> None:
        if self.running:
            self._timer = self.clock.callLater(delay, self._tick)

    def _tick(self) -> None:
        self._timer = None
        self._running = Deferred.fromCoroutine(self._exportAll())
        self._running.addBoth(self._ticked)

    def _ticked(self, result) -> None:
        delay = self.interval
        if isinstance(result, Failure):
            self.failures += 1
            self.log.failure("export: could not write the events to {directory}", result,
                             directory=self.directory)
            delay = min(self.interval, EXPORT_RETRY)
        self._schedule(delay)

    async def _exportAll(self) -> None:
        if not self._prepared:
            pending = await self.runInThread(prepareDirectory, self.directory)
            self._prepared = True
            for name in pending:
                self._commandLater(name, 0)
        await self.exportOnce()

    # -- one file ----------------------------------------------------------

    async def exportOnce(self) -> Optional[str]:
        """
        Write the events since the last file (or the ones of this node's
        unfinished claim) to a new file.

        @return: the new file's name, or L{None} if there were no events.
        """
        claim = await self.store.claimEvents(STREAM, self.owner, self.clock.seconds())
        if claim is None:
            return None
        name = fileName(claim, self.format, self.gzip)
        path = os.path.join(self.directory, name)
        there = await self.runInThread(os.path.exists, path)
        written = None
        if there:
            # Written before a crash that came before the claim was
            # finished: it holds exactly this claim.
            self.log.info("export: {name} was written before a restart", name=name)
        else:
            count = await self._write(claim, name)
            if count:
                written = name
                self.files += 1
                self.exported += count
                self.lastFile = name
                self.log.info("export: {count} event(s) to {path}", count=count, path=path)
        await self.store.finishClaim(claim)
        if written is not None and self.command:
            self._commandLater(written, 0)
        return written

    async def _write(self, claim: EventClaim, name: str) -> int:
        run = self.runInThread
        file = await run(ExportFile, self.directory, name, self.format, self.gzip, claim.time)
        try:
            page = await self.store.claimedEvents(claim, limit=PAGE)
            while True:
                # Read the next page while this one is written.
                nextPage = None
                if page.cursor is not None:
                    nextPage = self.store.claimedEvents(claim, cursor=page.cursor, limit=PAGE)
                if page.events:
                    await run(file.write, page.events)
                if nextPage is None:
                    break
                page = await nextPage
            if file.count == 0:
                # Every event of the claim was pruned meanwhile.
                await run(file.abort)
                return 0
            await run(file.commit, bool(self.command))
        except BaseException:
            await run(file.abort)
            raise
        return file.count

    # -- the command -------------------------------------------------------

    def _commandLater(self, name: str, attempt: int) -> None:
        if not self.command or not self.running:
            return
        self.pendingCommands.add(name)
        if name in self._commandTimers or name in self._commandsRunning:
            return
        delay = 0 if attempt == 0 else self.commandRetries[
            min(attempt - 1, len(self.commandRetries) - 1)
        ]
        self._commandTimers[name] = self.clock.callLater(delay, self._runCommand, name, attempt)

    def _runCommand(self, name: str, attempt: int) -> None:
        del self._commandTimers[name]
        path = os.path.join(self.directory, name)
        d = self.runCommand([*self.command, path])
        self._commandsRunning[name] = d
        d.addCallback(lambda _: self.runInThread(
            unlinkQuietly, os.path.join(self.directory, "." + name + _COMMAND_SUFFIX)
        ))

        def done(result):
            del self._commandsRunning[name]
            if isinstance(result, Failure):
                self.commandFailures += 1
                why = result.getErrorMessage() if result.check(CommandFailed) else repr(result.value)
                delay = self.commandRetries[min(attempt, len(self.commandRetries) - 1)]
                self.log.error(
                    "export: command for {name} failed: {why}; trying again in {delay:g}s",
                    name=name, why=why, delay=delay,
                )
                self._commandLater(name, attempt + 1)
            else:
                self.pendingCommands.discard(name)
                self.log.info("export: command done for {name}", name=name)

        d.addBoth(done)
