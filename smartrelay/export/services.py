"""
The exporter and the webhook sender built from the configuration, for
L{smartrelay.service} (which adds them to the relay once its store is
open).
"""

import os
import shutil
import socket
from typing import Any, Callable, Optional

from smartrelay.config import ConfigError
from smartrelay.export.exporter import Exporter, ProcessRunner
from smartrelay.ssrf import URLRefused, checkResolved, checkURL, hostAddress
from smartrelay.export.webhooks import AgentPoster, WebhookSender

#: Threads for the export files' blocking work.
EXPORT_THREADS = 1


def owner(config) -> str:
    """
    The name this node claims the store's streams under: its node id.
    """
    return "%02X" % config.relay.node_id


def makeExporter(config, reactor, store, runner: Callable[[str, int], Any]) -> Optional[Exporter]:
    """
    The exporter of C{[export]}, or L{None} without C{directory}.

    @param runner: C{runner(name, threads)} makes a thread pool's
        C{runInThread} (L{smartrelay.service.IThreadPools.runner}).
    """
    export = config.export
    if export.directory is None:
        return None
    checkExport(export)
    return Exporter(
        store=store,
        clock=reactor,
        directory=export.directory,
        owner=owner(config),
        runInThread=runner("export", EXPORT_THREADS),
        format=export.format,
        gzip=export.gzip,
        interval=export.interval,
        command=export.command,
        runCommand=ProcessRunner(reactor, export.command_timeout) if export.command else None,
    )


def checkExport(export) -> None:
    """
    At start-up: the export directory can be made and written to, and the
    command's program exists and may be run.

    @raise ConfigError: one line naming the key.
    """
    directory = export.directory
    try:
        os.makedirs(directory, 0o750, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create {directory}: {e.strerror or e}",
                          section="export", key="directory") from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ConfigError(f"{directory} is not writable", section="export", key="directory")
    if export.command:
        program = export.command[0]
        found = program if os.sep in program else shutil.which(program)
        if found is None or not os.path.isfile(found) or not os.access(found, os.X_OK):
            raise ConfigError(f"{program}: no such program (or not executable)",
                              section="export", key="command")


def checkWebhookTarget(config, getaddrinfo: Callable = socket.getaddrinfo) -> None:
    """
    At start-up, resolve the C{[webhooks] url}'s host name once and refuse
    it if every address is loopback, private, link-local or multicast
    (unless C{allow_private}).  A name that does not resolve now is left
    to the checks at connection time (the receiver's DNS may be back by
    then).

    @raise ConfigError: one line naming C{[webhooks] url}.
    """
    webhooks = config.webhooks
    if webhooks.url is None or webhooks.allow_private:
        return
    parts = checkURL(webhooks.url, webhooks.allow_private)
    host = parts.hostname
    if hostAddress(host) is not None:
        return
    try:
        infos = getaddrinfo(host, parts.port or 443, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return
    addresses = sorted({info[4][0] for info in infos})
    try:
        checkResolved(host, addresses, False)
    except URLRefused as e:
        raise ConfigError(
            f"{webhooks.url}: {e}", section="webhooks", key="url"
        ) from None


def makeWebhooks(config, reactor, store) -> Optional[WebhookSender]:
    """
    The webhook sender of C{[webhooks]}, or L{None} without C{url}.
    """
    webhooks = config.webhooks
    if webhooks.url is None:
        return None
    return WebhookSender(
        store=store,
        clock=reactor,
        poster=AgentPoster(
            reactor, webhooks.allow_private, timeout=webhooks.timeout,
            maxConnections=webhooks.concurrency,
        ),
        url=webhooks.url,
        secret=webhooks.secret,
        owner=owner(config),
        events=webhooks.events,
        batch=webhooks.batch,
        maxAge=webhooks.max_age,
        concurrency=webhooks.concurrency,
        # A POST ends (answered or abandoned) within its timeout; then
        # the batch is removed or deferred at once.
        lease=2 * webhooks.timeout + 5.0,
    )
