# -*- test-case-name: tests.test_reload -*-
"""
C{SIGHUP}: re-read the configuration and what it names, and apply what can
change while the relay runs, without closing a listener or a connection.

Applied at once:

  - the SMTP AUTH users: C{[smtp] auth_file} is read again (also when
    only the file changed), and a path set or removed turns AUTH on or
    off for the next sessions;
  - C{[smtp] allowed_clients}, C{max_recipients}, C{max_connections},
    C{max_connections_per_client};
  - C{[web] api_tokens}: the tokens the API accepts (added or revoked);
  - C{[feedback] soft_bounce_limit} and C{soft_bounce_window} (when soft
    bounces put an address on the suppression list).

An access log file (C{[web] access_log} set to a path) is reopened, for
logrotate, whatever else the reload finds.

Every other key that differs from the running configuration is named in
one log line as needing a restart (among them C{[smartrelay] secret}, the
token keys: the re-wrap worker processes and the links already sent hold
them).  A configuration or users file that does not load is logged, and
the running one is kept whole.
"""

import signal
from typing import Any, Callable, Optional

import attrs
from twisted.internet.defer import Deferred, DeferredLock
from twisted.logger import Logger

from smartrelay.auth import AuthFileError, HashedPasswordChecker, PasswordFile
from smartrelay.config import (
    NAMED_SECTIONS,
    SECTIONS,
    Config,
    ConfigError,
    defaultConfig,
    loadConfig,
    sectionKeys,
)

__all__ = ["RELOADABLE", "ReloadReport", "Reloader", "changedKeys", "installReloadSignal"]

#: The keys applied by a reload, as C{(section, key)}.
RELOADABLE = frozenset({
    ("smtp", "auth_file"),
    ("smtp", "allowed_clients"),
    ("smtp", "max_recipients"),
    ("smtp", "max_connections"),
    ("smtp", "max_connections_per_client"),
    ("web", "api_tokens"),
    ("feedback", "soft_bounce_limit"),
    ("feedback", "soft_bounce_window"),
})

#: Why some keys need a restart, for the log line.
_WHY = {
    ("smartrelay", "secret"): "the token keys",
}


def changedKeys(old: Config, new: Config) -> list[tuple[str, str]]:
    """
    The keys whose values differ, as C{(section, key)} in section order; a
    named section added or removed is C{(section, "")}.
    """
    changed = []
    for section, (field, sectionClass) in SECTIONS.items():
        before, after = getattr(old, field), getattr(new, field)
        for key in sectionKeys(sectionClass):
            if getattr(before, key) != getattr(after, key):
                changed.append((section, key))
    for prefix, (field, sectionClass) in NAMED_SECTIONS.items():
        before, after = getattr(old, field), getattr(new, field)
        for name in list(before) + [n for n in after if n not in before]:
            section = f"{prefix}:{name}"
            if name not in before or name not in after:
                changed.append((section, ""))
                continue
            for key in sectionKeys(sectionClass):
                if getattr(before[name], key) != getattr(after[name], key):
                    changed.append((section, key))
    return changed


def _describe(keys) -> str:
    parts = []
    for section, key in keys:
        text = f"[{section}] {key}" if key else f"[{section}]"
        why = _WHY.get((section, key))
        parts.append(f"{text} ({why})" if why else text)
    return ", ".join(parts)


@attrs.frozen
class ReloadReport:
    """
    What one reload did.

    @ivar applied: the changed keys now in effect, C{(section, key)}.
    @ivar restart: the changed keys that need a restart.
    @ivar users: the number of AUTH users now, or L{None} without AUTH.
    @ivar problem: why nothing was applied (a file did not load), or L{None}.
    """

    applied: tuple = ()
    restart: tuple = ()
    users: Optional[int] = None
    problem: Optional[str] = None


@attrs.define
class Reloader:
    """
    Applies a re-read configuration to a running L{RelayService
    <smartrelay.service.RelayService>}.

    @ivar service: the relay (its C{policy}, C{bounceSuppressor} and
        C{runDeliveryIO} are used).
    @ivar load: reads and validates the configuration (blocking: it runs in
        C{runInThread}).
    @ivar runInThread: C{run(f, *args) -> Deferred}, off the reactor thread.
    @ivar running: the configuration in effect: at first the one the
        relay started with, then with each applied key updated.
    """

    log = Logger()

    service: Any
    load: Callable[[], Config]
    runInThread: Callable[..., Deferred]
    running: Config
    _lock: DeferredLock = attrs.field(factory=DeferredLock, init=False)

    @classmethod
    def forService(cls, service, path: Optional[str]) -> "Reloader":
        """
        A reloader reading C{path} (the built-in defaults when L{None}) in
        the service's delivery I/O threads.
        """
        load = defaultConfig if path is None else (lambda: loadConfig(path))
        return cls(service=service, load=load, runInThread=service.runDeliveryIO,
                   running=service.config)

    def reload(self) -> Deferred:
        """
        Re-read and apply; one reload at a time (a second waits for the
        first).

        @return: a L{Deferred} firing with a L{ReloadReport}; it never fails.
        """
        d = self._lock.run(lambda: Deferred.fromCoroutine(self._reload()))

        def failed(failure):
            self.log.failure("reload failed; the running configuration is kept", failure)
            return ReloadReport(problem=str(failure.value))

        return d.addErrback(failed)

    async def _reload(self) -> ReloadReport:
        if not self.service.running:
            # Stopping (or not started): the threads may be gone.
            self.log.info("reload: the relay is not running; nothing re-read")
            return ReloadReport(problem="the relay is not running")
        self.log.info("reload: re-reading the configuration")
        reopen = getattr(getattr(self.service, "accessLog", None), "reopen", None)
        if reopen is not None:
            reopen()
        try:
            new = await self.runInThread(self.load)
        except ConfigError as e:
            self.log.error("reload: {problem}; the running configuration is kept",
                           problem=str(e))
            return ReloadReport(problem=str(e))
        passwords = None
        if new.smtp.auth_file is not None:
            try:
                passwords = await self.runInThread(PasswordFile.load, new.smtp.auth_file)
            except AuthFileError as e:
                self.log.error("reload: {problem}; the running configuration is kept",
                               problem=str(e))
                return ReloadReport(problem=str(e))

        changed = changedKeys(self.running, new)
        applied = tuple(k for k in changed if k in RELOADABLE)
        restart = tuple(k for k in changed if k not in RELOADABLE)
        self._applyUsers(passwords)
        policy, smtp = self.service.policy, new.smtp
        policy.allowedClients = smtp.allowed_clients
        policy.maxRecipients = smtp.max_recipients
        policy.maxConnections = smtp.max_connections
        policy.maxConnectionsPerClient = smtp.max_connections_per_client
        api = getattr(self.service, "api", None)
        if api is not None and tuple(api.tokens) != new.web.api_tokens:
            self.log.info("reload: {count} API token(s) now accepted", count=len(new.web.api_tokens))
            api.tokens = new.web.api_tokens
        suppressor = self.service.bounceSuppressor
        suppressor.softLimit = new.feedback.soft_bounce_limit
        suppressor.softWindow = new.feedback.soft_bounce_window
        self.running = attrs.evolve(
            self.running,
            smtp=attrs.evolve(
                self.running.smtp,
                auth_file=smtp.auth_file,
                allowed_clients=smtp.allowed_clients,
                max_recipients=smtp.max_recipients,
                max_connections=smtp.max_connections,
                max_connections_per_client=smtp.max_connections_per_client,
            ),
            web=attrs.evolve(self.running.web, api_tokens=new.web.api_tokens),
            feedback=attrs.evolve(
                self.running.feedback,
                soft_bounce_limit=new.feedback.soft_bounce_limit,
                soft_bounce_window=new.feedback.soft_bounce_window,
            ),
        )
        if applied:
            self.log.info("reload: applied {keys}", keys=_describe(applied))
        if restart:
            self.log.warn("reload: {keys} changed: restart smartrelay to apply",
                          keys=_describe(restart))
        users = None if passwords is None else len(passwords.hashes)
        self.log.info("reload: done")
        return ReloadReport(applied=applied, restart=restart, users=users)

    def _applyUsers(self, passwords: Optional[PasswordFile]) -> None:
        """
        Make C{passwords} the AUTH users of the next logins (L{None}: no
        AUTH), logging who was added, removed or changed.
        """
        policy = self.service.policy
        checker = policy.checker
        old = dict(checker.passwords.hashes) if isinstance(checker, HashedPasswordChecker) else {}
        if passwords is None:
            if checker is not None:
                self.log.info("reload: SMTP AUTH is off ([smtp] auth_file unset)")
            policy.checker = None
            return
        new = dict(passwords.hashes)
        added = sorted(set(new) - set(old))
        removed = sorted(set(old) - set(new))
        updated = sorted(u for u in set(new) & set(old) if new[u] != old[u])
        if isinstance(checker, HashedPasswordChecker):
            checker.passwords = passwords
        else:
            policy.checker = HashedPasswordChecker(passwords, self.service.runDeliveryIO)
        self.log.info(
            "reload: {count} SMTP AUTH user(s) from {path}: {added} added, {removed} removed, "
            "{updated} with a new password",
            count=len(new), path=passwords.source,
            added=len(added), removed=len(removed), updated=len(updated),
        )


def installReloadSignal(reactor, reloader: Reloader, signals: Any = signal) -> Callable:
    """
    Make C{SIGHUP} call C{reloader.reload} on the reactor thread.

    @param signals: the L{signal} module (tests pass a stand-in).
    @return: the handler installed.
    """

    def handler(signum, frame) -> None:
        reactor.callFromThread(reloader.reload)

    signals.signal(signals.SIGHUP, handler)
    return handler
