"""
C{twistd smartrelay}: command-line options and the service maker.

Thin on purpose: the wiring lives in L{smartrelay.service.makeRelayService},
which tests call with a memory reactor.
"""

import gc
import os
import sys

from twisted.internet.error import ReactorNotRunning
from twisted.python import usage

from smartrelay.config import ConfigError, defaultConfig, loadConfig
from smartrelay.ids import ID_STATE_FILE, loadIDState


class Options(usage.Options):
    synopsis = "[--config PATH]"
    longdesc = (
        "Run the smartrelay transactional mail relay.  Without --config it "
        "uses the built-in defaults: SMTP submission on 127.0.0.1:2525 and "
        "all state under ./var/."
    )
    optParameters = [
        ["config", "c", None, "Path to the INI configuration file."],
    ]

    def postOptions(self):
        problem = checkLogger(getattr(self, "parent", None))
        if problem is not None:
            stopWith(problem)
        try:
            if self["config"] is None:
                self.relayConfig = defaultConfig()
            else:
                self.relayConfig = loadConfig(self["config"])
            problem = checkDataDirectory(self.relayConfig.relay.data_dir)
        except ConfigError as e:
            problem = str(e)
        if problem is not None:
            stopWith(problem)


def stopWith(problem: str) -> None:
    """
    One clear line and a non-zero exit: a config mistake is not a usage
    mistake, so no usage text and no traceback.
    """
    sys.stderr.write("smartrelay: %s\n" % (problem,))
    raise SystemExit(1)


def checkLogger(twistdOptions) -> "str | None":
    """
    The JSON log observer writes to standard output, which a daemon does
    not have (twistd points it at C{/dev/null}): refuse it without C{-n}
    rather than lose every log line.

    @param twistdOptions: twistd's own options (the parent of ours), or
        L{None} when ours were parsed alone.
    @return: None, or a one-line problem.
    """
    if twistdOptions is None:
        return None
    try:
        logger, foreground = twistdOptions["logger"], twistdOptions["nodaemon"]
    except KeyError:
        return None
    if logger == "smartrelay.logs.jsonObserver" and not foreground:
        return (
            "--logger smartrelay.logs.jsonObserver writes to standard output: "
            "run twistd with -n (--nodaemon), or drop --logger to use --logfile"
        )
    return None


def checkDataDirectory(path: str):
    """
    Can the relay keep its state in C{path}?  Creates it if missing.

    @return: None, or a one-line problem naming the key.
    """
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError as e:
        return "[smartrelay] data_dir: cannot create %s: %s" % (path, e.strerror)
    if not os.access(path, os.W_OK | os.X_OK):
        return "[smartrelay] data_dir: %s is not writable" % (path,)
    statePath = os.path.join(path, ID_STATE_FILE)
    try:
        loadIDState(statePath)
    except (OSError, ValueError) as e:
        return (
            "%s is damaged (%s): it keeps queue ids unique across restarts; "
            "restore it, or remove it only if no queue id from this data_dir "
            "may be reused" % (statePath, e)
        )
    return None


def makeService(options):
    from twisted.internet import reactor

    from smartrelay.service import makeRelayService

    try:
        service = makeRelayService(options.relayConfig, reactor)
    except ConfigError as e:
        # Found while building (the DKIM self-test, a key file gone since
        # the options were checked): one line too, as in postOptions.
        if e.source == "<config>" and options["config"] is not None:
            e.source = options["config"]
        stopWith(str(e))
    tuneCollector()
    service.whenReady().addCallbacks(lambda _: freezeStartUp(), _startFailed, errbackArgs=(reactor,))
    # SIGHUP re-reads the configuration and the users (smartrelay.reload).
    from smartrelay.reload import Reloader, installReloadSignal

    installReloadSignal(reactor, Reloader.forService(service, options["config"]))
    return service


#: The garbage collector's thresholds in a relay process (Python's are
#: 700, 10, 10).  A relay allocates a few hundred objects per message, few
#: of them in reference cycles; collecting the youngest generation every
#: 50,000 allocations instead of every 700, and the whole heap a tenth as
#: often, took a parked recipient's bulk record from 36 to 20 us of CPU
#: (bench/accept.py --mode parked), for at most some megabytes of cyclic
#: garbage waiting a little longer.
COLLECTOR_THRESHOLDS = (50_000, 20, 100)


def tuneCollector(collector=gc) -> None:
    """
    Set the relay process's garbage collector thresholds.
    """
    collector.set_threshold(*COLLECTOR_THRESHOLDS)


def freezeStartUp(collector=gc) -> None:
    """
    Once the relay is up: what start-up made (modules, the configuration,
    the queue recovered from the spool, which may be a million messages)
    lives as long as the process, so it is collected once more and then
    moved out of the collector's reach (C{gc.freeze}); full collections
    then walk only what came since.
    """
    collector.collect()
    collector.freeze()


def _startFailed(failure, reactor) -> None:
    """
    The relay could not start (the service has logged why): stop, and
    exit with status 1 once the reactor has shut down.
    """
    reactor.addSystemEventTrigger("after", "shutdown", os._exit, 1)
    try:
        reactor.stop()
    except ReactorNotRunning:
        pass
