"""
What the sub-commands share: reading C{--config}, and running a coroutine
on the reactor from a synchronous command.
"""

from typing import Any, Awaitable, Callable, Optional

from smartrelay.commands.base import CommandError, UsageError
from smartrelay.config import ConfigError, defaultConfig, loadConfig


def readConfig(path: Optional[str], command: str):
    """
    The configuration in C{path} (the defaults when L{None}).

    @raise UsageError: it cannot be read or is not valid (exit status 2).
    """
    if path is None:
        return defaultConfig()
    try:
        return loadConfig(path)
    except ConfigError as e:
        raise UsageError(f"{command}: {e}") from None


def runOnReactor(work: Callable[[Any], Awaitable[Any]]) -> Any:
    """
    Run C{work(reactor)} on the global reactor until it is done and return
    its result, or raise what it raised (a command's one-line error).
    """
    from twisted.internet import task
    from twisted.internet.defer import Deferred

    box: dict = {}

    async def main(reactor) -> None:
        try:
            box["value"] = await work(reactor)
        except BaseException as e:  # handed to the caller below
            box["error"] = e

    try:
        task.react(lambda reactor: Deferred.fromCoroutine(main(reactor)))
    except SystemExit:
        pass
    if "error" in box:
        raise box["error"]
    if "value" not in box:
        raise CommandError("interrupted")
    return box["value"]
