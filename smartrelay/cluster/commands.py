"""
Commands for the node that owns a queued message.

Each node has its own spool, so only the node that accepted a message can
retry it now or take it out of the queue.  A queue id names that node (its
first two characters are the C{[smartrelay] node_id}); with a shared store
an API request to any node reaches it:

  - the node asked posts the command to the owner's mailbox in the store
    (L{IMailboxes}: C{node:<id>}, a Redis list with a TTL) and waits for
    the answer in its own mailbox, at most L{COMMAND_TIMEOUT} seconds;
  - every node takes what is in its mailbox every L{POLL_INTERVAL} seconds
    (one Lua script call), runs the commands through its handler and
    posts each answer back;
  - before posting, the node asked checks the live-node registry
    (L{smartrelay.cluster.nodes}): a command for a node with no live
    heartbeat, or none within the last two heartbeat intervals (not on
    C{nodes-fresh}), fails at once (L{NodeUnavailable}) instead of
    waiting;
  - a command not taken before its deadline is dropped by its node
    rather than run late, and the mailbox of a node that never comes back
    expires by itself.

The answer is the owner's own: what the same request to the owner would
have answered (a document with its HTTP status).  Besides retries and
deletes, the queue views ask every live node for its part
(C{queueSummary}, C{queuePage}, C{destinations}, C{queued}; see
L{smartrelay.web.queries.QueueActions.answer}); an answer longer than a
mailbox message may be (L{MAX_MAILBOX_MESSAGE}) is replaced by a 500
C{answer_too_large} error.  This module knows
nothing of HTTP: the handler and the caller (L{smartrelay.web.queries})
agree on C{{"status": ..., "body": ...}}.
"""

import json
import os
from collections import deque
from typing import Any, Callable, Optional

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from smartrelay.cluster.nodes import FRESH, NODES
from smartrelay.store.interfaces import (
    MAX_MAILBOX_MESSAGE,
    IMailboxes,
    checkMailboxPost,
    checkMailboxTake,
)

__all__ = [
    "COMMAND_TIMEOUT",
    "POLL_INTERVAL",
    "LocalMailboxes",
    "NodeCommands",
    "NodeTimeout",
    "NodeUnavailable",
    "StoreUnreachable",
    "mailboxBackend",
    "ownerOf",
]

#: Seconds between two looks into this node's mailbox.
POLL_INTERVAL = 0.25

#: Seconds the node asked waits for the owner's answer.
COMMAND_TIMEOUT = 10.0

#: Messages taken from the mailbox at once.
_TAKE = 100


class NodeUnavailable(Exception):
    """
    The node that owns the message has no live heartbeat in the store.
    """

    def __init__(self, node: str) -> None:
        super().__init__(node)
        self.node = node


class NodeTimeout(Exception):
    """
    The owner did not answer within the timeout (the command may still
    have been run).
    """

    def __init__(self, node: str, timeout: float) -> None:
        super().__init__(node, timeout)
        self.node = node
        self.timeout = timeout


class StoreUnreachable(Exception):
    """
    The store could not be asked (the live nodes, or the owner's mailbox).
    """


def ownerOf(queue_id: str) -> str:
    """
    The node id (two upper-case hex digits) in C{queue_id}.
    """
    return queue_id[:2].upper()


def _ids(names) -> set:
    return {name.split("-")[0].upper() for name in names}


def mailboxName(node: str) -> str:
    return f"node:{node}"


@implementer(IMailboxes)
@attrs.define
class LocalMailboxes:
    """
    L{IMailboxes} in this process (tests; a store without mailboxes has
    one node, which needs none).  Every Deferred has fired when returned.
    """

    _boxes: dict = attrs.field(factory=dict, init=False)

    def postToMailbox(self, mailbox, message, ttl) -> Deferred:
        return maybeDeferred(self._post, mailbox, message, ttl)

    def _post(self, mailbox, message, ttl) -> None:
        mailbox, message, ttl = checkMailboxPost(mailbox, message, ttl)
        self._boxes.setdefault(mailbox, deque()).append(message)

    def takeFromMailbox(self, mailbox, limit) -> Deferred:
        return maybeDeferred(self._take, mailbox, limit)

    def _take(self, mailbox, limit) -> list:
        mailbox, limit = checkMailboxTake(mailbox, limit)
        box = self._boxes.get(mailbox)
        taken = []
        while box and len(taken) < limit:
            taken.append(box.popleft())
        if box is not None and not box:
            del self._boxes[mailbox]
        return taken


def mailboxBackend(store: Any) -> tuple:
    """
    The L{IMailboxes} for C{store}: the store itself where it provides it
    (Redis), else L{None}: one node, nothing to send.

    @return: C{(backend or None, shared)}.
    """
    if IMailboxes.providedBy(store):
        return store, True
    return None, False


@attrs.define(eq=False, slots=False, repr=False)
class NodeCommands(Service):
    """
    Sends commands to the node that owns a message, and runs the commands
    sent to this one.

    @ivar backend: an L{IMailboxes} shared by the nodes.
    @ivar leases: the L{ILeases <smartrelay.store.interfaces.ILeases>}
        holding the node registry (its lease names start with the node id).
    @ivar clock: an L{IReactorTime}.
    @ivar node: this node's id (C{"2A"}).
    @ivar handler: C{handler(op, args) -> Deferred[dict]} runs a command
        here and answers C{{"status": int, "body": JSON}}; it does not fail.
    @ivar pollInterval: seconds between two looks into the mailbox.
    @ivar timeout: seconds to wait for an answer.
    """

    backend: Any
    leases: Any
    clock: Any
    node: str
    handler: Callable[[str, dict], Any]
    pollInterval: float = POLL_INTERVAL
    timeout: float = COMMAND_TIMEOUT
    _waiting: dict = attrs.field(factory=dict, init=False)
    _serial: int = attrs.field(default=0, init=False)
    _name: str = attrs.field(factory=lambda: os.urandom(6).hex(), init=False)
    _loop: Any = attrs.field(default=None, init=False)
    _polling: bool = attrs.field(default=False, init=False)
    _running: set = attrs.field(factory=set, init=False)
    #: Whether the last look into the mailbox succeeded.
    reachable: bool = attrs.field(default=True, init=False)

    log = Logger()

    def __repr__(self) -> str:
        return f"<NodeCommands node={self.node} waiting={len(self._waiting)}>"

    # -- service ---------------------------------------------------------------

    def startService(self) -> None:
        Service.startService(self)
        self._loop = LoopingCall(self.poll)
        self._loop.clock = self.clock
        self._loop.start(self.pollInterval, now=True).addErrback(
            lambda f: self.log.failure("reading the node's command mailbox stopped", f)
        )

    def stopService(self) -> Optional[Deferred]:
        Service.stopService(self)
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        for request, (d, timer) in list(self._waiting.items()):
            timer.cancel()
            del self._waiting[request]
            d.errback(NodeTimeout(request.split("/")[0], 0.0))
        return None

    # -- asking another node -----------------------------------------------------

    def isElsewhere(self, queue_id: str) -> bool:
        """
        Whether C{queue_id} was accepted by another node than this one.
        """
        return ownerOf(queue_id) != self.node

    def liveNodes(self) -> Deferred:
        """
        The ids of the nodes with a live heartbeat (a lease on C{nodes}).

        @rtype: L{Deferred} firing with a L{set}.
        """
        return Deferred.fromCoroutine(self._nodeStates()).addCallback(lambda both: both[0])

    def nodeStates(self) -> Deferred:
        """
        The ids of the registered nodes (a live lease on C{nodes}) and of
        those that beat within the last two heartbeat intervals (also on
        C{nodes-fresh}).  While no node at all is on C{nodes-fresh} (nodes
        of a version that did not write it) every registered node counts
        as fresh.

        @rtype: L{Deferred} firing with C{(registered, fresh)}, two L{set}s.
        """
        return Deferred.fromCoroutine(self._nodeStates())

    async def _nodeStates(self) -> tuple:
        now = self.clock.seconds()
        registered = _ids(await maybeDeferred(self.leases.liveLeases, NODES, now))
        fresh = _ids(await maybeDeferred(self.leases.liveLeases, FRESH, now))
        if not fresh:
            fresh = set(registered)
        return registered, fresh & registered

    def request(
        self, node: str, op: str, args: dict, timeout: Optional[float] = None
    ) -> Deferred:
        """
        Run C{op} with C{args} on C{node} and wait for its answer, at most
        C{timeout} seconds (default: L{timeout}).

        @rtype: L{Deferred} firing with the answer (C{{"status", "body"}});
            it fails with L{NodeUnavailable}, L{NodeTimeout} or
            L{StoreUnreachable}.
        """
        return Deferred.fromCoroutine(
            self._request(node, op, args, self.timeout if timeout is None else timeout)
        )

    async def _request(self, node: str, op: str, args: dict, timeout: float) -> dict:
        try:
            registered, fresh = await self.nodeStates()
        except Exception as e:
            raise StoreUnreachable(str(e) or type(e).__name__) from e
        if node not in fresh:
            raise NodeUnavailable(node)
        self._serial += 1
        request = f"{node}/{self._name}/{self._serial}"
        now = self.clock.seconds()
        message = json.dumps(
            {
                "kind": "command",
                "id": request,
                "from": self.node,
                "op": op,
                "args": args,
                "deadline": now + timeout,
            }
        )
        answer: Deferred = Deferred()

        def expire() -> None:
            if self._waiting.pop(request, None) is not None:
                answer.errback(NodeTimeout(node, timeout))

        self._waiting[request] = (answer, self.clock.callLater(timeout, expire))
        try:
            await maybeDeferred(
                self.backend.postToMailbox, mailboxName(node), message, self.timeout + 60
            )
        except Exception as e:
            waiting = self._waiting.pop(request, None)
            if waiting is not None:
                waiting[1].cancel()
            raise StoreUnreachable(str(e) or type(e).__name__) from e
        return await answer

    # -- this node's mailbox --------------------------------------------------

    def poll(self) -> Deferred:
        """
        Take what is in this node's mailbox: run the commands, hand the
        answers to their requests (the loop does it every C{pollInterval}).
        """
        return Deferred.fromCoroutine(self._poll())

    async def _poll(self) -> None:
        if self._polling:
            return
        self._polling = True
        try:
            messages = await maybeDeferred(
                self.backend.takeFromMailbox, mailboxName(self.node), _TAKE
            )
        except Exception:
            self._unreachable(Failure())
            return
        finally:
            self._polling = False
        self._reachable()
        for text in messages:
            self._received(text)

    def _received(self, text: str) -> None:
        try:
            message = json.loads(text)
            kind, request = message["kind"], message["id"]
            if not isinstance(request, str) or kind not in ("answer", "command"):
                raise ValueError(kind)
            if kind == "command" and not (
                isinstance(message.get("deadline"), (int, float))
                and isinstance(message.get("from"), str)
            ):
                raise ValueError("deadline")
        except (ValueError, KeyError, TypeError):
            self.log.warn(
                "dropped an unreadable message from the mailbox: {text!r}", text=text[:200]
            )
            return
        if kind == "answer":
            waiting = self._waiting.pop(request, None)
            if waiting is None:
                # Too late: the request has timed out.
                return
            d, timer = waiting
            timer.cancel()
            d.callback(message.get("answer"))
        else:
            d = Deferred.fromCoroutine(self._run(message))
            self._running.add(d)

            def ran(result: Any) -> None:
                self._running.discard(d)
                if isinstance(result, Failure):
                    self.log.failure("running a command failed", result)

            d.addBoth(ran)

    async def _run(self, message: dict) -> None:
        op, sender = message.get("op"), message.get("from")
        if self.clock.seconds() > message["deadline"]:
            self.log.warn(
                "dropped a {op} command from node {sender} that came after its deadline",
                op=op,
                sender=sender,
            )
            return
        self.log.info(
            "{op} of {args} asked by node {sender}", op=op, args=message.get("args"), sender=sender
        )
        try:
            answer = await maybeDeferred(self.handler, op, message.get("args") or {})
        except Exception:
            self.log.failure("the {op} command from node {sender} failed", op=op, sender=sender)
            error = {
                "code": "internal_error",
                "message": "internal error on the owning node; see its log",
            }
            answer = {"status": 500, "body": {"error": error}}
        reply = json.dumps({"kind": "answer", "id": message["id"], "answer": answer})
        if len(reply) > MAX_MAILBOX_MESSAGE:
            self.log.warn(
                "the answer to the {op} command from node {sender} is too long to send "
                "({length} characters)",
                op=op,
                sender=sender,
                length=len(reply),
            )
            error = {
                "code": "answer_too_large",
                "message": f"node {self.node}'s answer to {op} is longer than "
                f"{MAX_MAILBOX_MESSAGE} characters",
            }
            reply = json.dumps(
                {
                    "kind": "answer",
                    "id": message["id"],
                    "answer": {"status": 500, "body": {"error": error}},
                }
            )
        try:
            await maybeDeferred(
                self.backend.postToMailbox, mailboxName(sender), reply, self.timeout + 60
            )
        except Exception:
            self.log.failure(
                "could not answer the {op} command of node {sender}", op=op, sender=sender
            )

    def _unreachable(self, failure: Failure) -> None:
        if self.reachable:
            self.reachable = False
            self.log.warn(
                "cannot read this node's command mailbox in the store ({why}); retry "
                "and delete requests made to other nodes for its messages wait until "
                "it answers",
                why=failure.getErrorMessage() or failure.type.__name__,
            )

    def _reachable(self) -> None:
        if not self.reachable:
            self.reachable = True
            self.log.info("the store answers again: this node takes commands from the others")
