"""
Tests for the shape of the import graph of L{smartrelay}: which parts may
import which, read from the source with L{ast} (nothing is imported).
"""

import ast
import os
from collections import defaultdict

from twisted.trial.unittest import SynchronousTestCase

import smartrelay

PACKAGE = os.path.dirname(os.path.abspath(smartrelay.__file__))


def moduleName(path: str) -> str:
    """
    The dotted name of the module at C{path}, a file under L{PACKAGE}.
    """
    relative = os.path.relpath(path, os.path.dirname(PACKAGE))
    parts = relative[: -len(".py")].split(os.sep)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def importsOf(source: str, context: str) -> set:
    """
    The C{smartrelay} names that the module C{context} (its dotted name,
    ending in C{.__init__} for a package) imports, anywhere in C{source}
    (inside functions too).  C{from smartrelay import spool} yields both
    C{smartrelay} and C{smartrelay.spool}.
    """
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = context.split(".")[: -node.level]
                module = ".".join(base + ([module] if module else []))
            found.add(module)
            found.update(f"{module}.{a.name}" for a in node.names)
    return {m for m in found if m == "smartrelay" or m.startswith("smartrelay.")}


def importGraph() -> dict:
    """
    Module name → the names of the C{smartrelay} modules it imports (only
    names that are modules of the package).
    """
    sources = {}
    for directory, _, files in os.walk(PACKAGE):
        for file in files:
            if file.endswith(".py"):
                path = os.path.join(directory, file)
                with open(path, encoding="utf-8") as f:
                    sources[moduleName(path)] = (path, f.read())
    graph = {}
    for name, (path, source) in sources.items():
        isPackage = path.endswith("__init__.py")
        context = name + ".__init__" if isPackage else name
        graph[name] = {m for m in importsOf(source, context) if m in sources} - {name}
    return graph


def unit(module: str) -> str:
    """
    The part of the relay C{module} belongs to: its subpackage
    (C{smartrelay.engine}) or, for a top-level module, itself.
    """
    return ".".join(module.split(".")[:2])


class LayerTests(SynchronousTestCase):
    def test_graphFound(self):
        """
        The graph is read from the package: it knows the modules and at
        least the imports every relay has.
        """
        graph = importGraph()
        self.assertIn("smartrelay.spool", graph["smartrelay.service"])
        self.assertIn("smartrelay.message", graph["smartrelay.spool"])

    def test_messageModelStandsAlone(self):
        """
        The message model imports no other part of the relay.
        """
        self.assertEqual(importGraph()["smartrelay.message"], set())

    def test_engineDoesNotImportTheSpool(self):
        """
        The re-wrap engine works on the message model, never on the spool
        that stores it.
        """
        for module, imported in importGraph().items():
            if unit(module) == "smartrelay.engine":
                self.assertNotIn("smartrelay.spool", imported, module)

    def test_controlsKnowNoReplies(self):
        """
        The control headers raise their own error; which SMTP reply it
        becomes is the submission policy's decision.
        """
        self.assertNotIn("smartrelay.smtp.replies", importGraph()["smartrelay.smtp.controls"])

    def test_noImportRunsBackUp(self):
        """
        Between the parts of the relay (subpackages and top-level modules)
        imports form no cycle: each part only imports parts below it.
        """
        edges = defaultdict(set)
        for module, imported in importGraph().items():
            for target in imported:
                if unit(target) != unit(module):
                    edges[unit(module)].add(unit(target))
        done: set = set()

        def visit(part: str, path: list) -> None:
            if part in path:
                cycle = path[path.index(part) :] + [part]
                self.fail("imports run in a circle: " + " -> ".join(cycle))
            if part in done:
                return
            for target in sorted(edges[part]):
                visit(target, path + [part])
            done.add(part)

        for part in sorted(edges):
            visit(part, [])

    def test_schedulerParts(self):
        """
        The delivery scheduler is a service composing parts, each of which
        knows only what it is given: none imports the scheduler, the
        session loop and the hand-out of sessions know nothing of recipient
        state (the queue) or of the suppression check, and the queue knows
        nothing of sessions.
        """
        graph = importGraph()
        parts = ["queue", "dispatch", "sessions", "outcomes", "throttling", "checks", "parking"]
        for part in parts:
            self.assertNotIn(
                "smartrelay.outbound.scheduler", graph[f"smartrelay.outbound.{part}"], part
            )
        for part in ("dispatch", "sessions"):
            for unknown in ("queue", "checks", "parking"):
                self.assertNotIn(
                    f"smartrelay.outbound.{unknown}", graph[f"smartrelay.outbound.{part}"], part
                )
        for unknown in ("dispatch", "sessions", "session", "pool"):
            self.assertNotIn(
                f"smartrelay.outbound.{unknown}", graph["smartrelay.outbound.queue"], unknown
            )

    def test_remoteSessions(self):
        """
        The sessions in the worker processes are a connector below the
        scheduler: L{smartrelay.outbound.remote} knows the session and the
        worker pool, nothing of the scheduler or its parts, and the worker
        pool knows nothing of delivery.
        """
        graph = importGraph()
        remote = graph["smartrelay.outbound.remote"]
        for unknown in ("scheduler", "queue", "dispatch", "sessions", "outcomes", "parking"):
            self.assertNotIn(f"smartrelay.outbound.{unknown}", remote, unknown)
        self.assertFalse(
            [
                name
                for name in graph["smartrelay.engine.workers"]
                if name.startswith("smartrelay.") and not name.startswith("smartrelay.engine")
            ]
        )
