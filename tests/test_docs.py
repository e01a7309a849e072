"""
Tests that keep the operator documentation (C{README.md}, C{docs/}) true
to the code: every configuration key documented with its real default,
every console command, SMTP reply, control header, event type and web
route mentioned, and every link inside the repository.

C{etc/smartrelay.ini} is checked against the schema in
L{tests.test_config.ExampleFileTests}; here only its C{Default:} comments.
"""

import argparse
import os
import re
from urllib.parse import urlsplit

import attrs
from twisted.trial.unittest import SynchronousTestCase

from smartrelay import cli, tap
from smartrelay.config import _PARSE, NAMED_SECTIONS, SECTIONS, sectionKeys
from smartrelay.events import EVENT_TYPES
from smartrelay.smtp import controls
from smartrelay.web.tracking import TrackingApp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")


def read(*path: str) -> str:
    with open(os.path.join(ROOT, *path), encoding="utf-8") as f:
        return f.read()


def markdownFiles() -> list[str]:
    """
    The repository-relative paths of README.md and every page in docs/.
    """
    return ["README.md"] + sorted(
        os.path.join("docs", name) for name in os.listdir(DOCS) if name.endswith(".md")
    )


#: Every section class with how its INI headers are written: a plain
#: section by its name, a named one by its prefix.
ALL_SECTIONS = {
    **{name: cls for name, (_, cls) in SECTIONS.items()},
    **{prefix: cls for prefix, (_, cls) in NAMED_SECTIONS.items()},
}


def documentedKeys() -> dict[str, dict[str, str]]:
    """
    The keys docs/configuration.md documents: section (a named section by
    its prefix) -> key -> the text of its default cell.
    """
    found: dict[str, dict[str, str]] = {}
    section = None
    for line in read("docs", "configuration.md").splitlines():
        heading = re.match(r"## `\[([a-z_]+)(?::[A-Z]+)?\]`", line)
        if heading is not None:
            section = heading.group(1)
            found.setdefault(section, {})
            continue
        if line.startswith("## "):
            section = None
            continue
        row = re.match(r"\| `([a-z0-9_]+)` \| ([^|]*) \|", line)
        if row is not None and section is not None:
            found[section][row.group(1)] = row.group(2).strip()
    return found


def field(sectionClass: type, key: str) -> attrs.Attribute:
    return attrs.fields_dict(sectionClass)[key]


def schemaDefault(attribute: attrs.Attribute):
    default = attribute.default
    if isinstance(default, attrs.Factory):
        return default.factory()
    return default


#: How the default cell of a key without a default written as a value
#: begins (what "not set", required, or a default worked out at start-up,
#: is called).
UNSET_WORDS = ("not set", "empty", "inherited", "required")

#: Keys whose default depends on the machine or is too long to write in a
#: table cell; the docs describe it in words.
DESCRIBED_DEFAULTS = {("smartrelay", "hostname"), ("delivery", "throttle_patterns")}


class ConfigurationTests(SynchronousTestCase):
    """
    docs/configuration.md and the configuration schema agree.
    """

    def test_everyKeyDocumented(self) -> None:
        """
        Every section and key of the schema has a row in
        docs/configuration.md, and every row is a key of the schema.
        """
        documented = documentedKeys()
        self.assertEqual(sorted(documented), sorted(ALL_SECTIONS))
        for section, sectionClass in ALL_SECTIONS.items():
            self.assertEqual(
                sorted(documented[section]), sorted(sectionKeys(sectionClass)), section
            )

    def test_defaults(self) -> None:
        """
        A default written as a value reads, with the key's own parser, as
        the schema's default; any other is one the schema has as not set
        (or required).
        """
        for section, keys in documentedKeys().items():
            sectionClass = ALL_SECTIONS[section]
            for key, cell in keys.items():
                attribute = field(sectionClass, key)
                default = schemaDefault(attribute)
                where = f"[{section}] {key}: {cell!r}"
                if (section, key) in DESCRIBED_DEFAULTS:
                    self.assertFalse(cell.startswith("`"), where)
                    continue
                value = re.match(r"`([^`]*)`", cell)
                if value is not None:
                    self.assertEqual(attribute.metadata[_PARSE](value.group(1)), default, where)
                else:
                    self.assertTrue(cell.startswith(UNSET_WORDS), where)
                    self.assertIn(default, (None, (), attrs.NOTHING), where)
                    self.assertEqual(
                        cell.startswith("required"), default is attrs.NOTHING, where
                    )

    def test_exampleDefaultComments(self) -> None:
        """
        The "Default:" comment above each key of etc/smartrelay.ini's plain
        sections, when it gives a value, reads as the schema's default.
        """
        checked = 0
        section = None
        comment: list[str] = []
        for line in read("etc", "smartrelay.ini").splitlines():
            header = re.fullmatch(r"(#?)\[([^\]]+)\]", line)
            if header is not None:
                # The commented-out examples of named sections are skipped.
                section = None if header.group(1) else header.group(2)
                comment = []
                continue
            setting = re.match(r"#?([a-z0-9_]+) =", line)
            if setting is not None and section in SECTIONS:
                # The last one above: keys set one after the other share
                # the comment before them, or each has its own.
                stated = re.findall(r"Default: ([^#]*)", "#".join(comment))
                key = setting.group(1)
                self.assertTrue(stated, f"[{section}] {key} has no Default: comment")
                attribute = field(SECTIONS[section][1], key)
                text = stated[-1].strip()
                if (section, key) not in DESCRIBED_DEFAULTS and not text.startswith(
                    ("not set", "empty", "the ")
                ):
                    self.assertEqual(
                        attribute.metadata[_PARSE](text), schemaDefault(attribute),
                        f"[{section}] {key}: {text!r}",
                    )
                    checked += 1
            elif line.startswith(("#", ";")):
                comment.append(line.lstrip("#; "))
            elif not line.strip():
                comment = []
        self.assertGreater(checked, 30)


def subcommands() -> dict[str, argparse.ArgumentParser]:
    """
    The sub-commands of the C{smartrelay} console: name -> parser.
    """
    parser = cli._buildParser()
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


class CommandTests(SynchronousTestCase):
    """
    docs/commands.md and the command lines agree.
    """

    def test_everySubcommand(self) -> None:
        """
        Every sub-command of C{smartrelay} has its own section in
        docs/commands.md, with each of its options, and every such section
        is a sub-command.
        """
        text = read("docs", "commands.md")
        documented = re.findall(r"(?m)^### `smartrelay ([a-z-]+)`$", text)
        commands = subcommands()
        self.assertEqual(sorted(documented), sorted(commands))
        for name, parser in commands.items():
            for action in parser._actions:
                for option in action.option_strings:
                    if option.startswith("--") and option != "--help":
                        self.assertIn(f"`{option}", text, f"smartrelay {name} {option}")

    def test_twistdOptions(self) -> None:
        """
        Every option of C{twistd smartrelay} is in docs/commands.md.
        """
        text = read("docs", "commands.md")
        options = tap.Options()
        for long, short, *_ in options.optParameters + getattr(options, "optFlags", []):
            self.assertIn(f"`--{long}", text)
            if short:
                self.assertIn(f"`-{short}", text)


class SMTPTests(SynchronousTestCase):
    """
    docs/smtp.md and the submission listener agree.
    """

    #: Where the listener's replies are written.
    SOURCES = ("protocol.py", "submission.py", "replies.py", "feedback.py", "connections.py")

    def test_everyReply(self) -> None:
        """
        Every reply code and enhanced status the listener's source writes
        appears in docs/smtp.md.
        """
        text = read("docs", "smtp.md")
        found = set()
        for name in self.SOURCES:
            source = read("smartrelay", "smtp", name)
            found.update(
                re.findall(
                    r"(?:reply|_sendCode|SMTPReply)\(\s*(\d{3}),\s*\"(\d\.\d{1,3}\.\d{1,3})\"",
                    source,
                )
            )
            found.update(re.findall(r"b\"(\d{3}) (\d\.\d{1,3}\.\d{1,3}) ", source))
        self.assertGreater(len(found), 20)
        for code, status in sorted(found):
            self.assertIn(f"`{code} {status} ", text)

    def test_everyControlHeader(self) -> None:
        """
        Every control header the submission side reads is in docs/smtp.md.
        """
        text = read("docs", "smtp.md").lower()
        for header in controls._KNOWN:
            self.assertIn(f"`{header}`", text)
        self.assertIn("`x-smartrelay-metadata-key`", text)


class EventTests(SynchronousTestCase):
    """
    docs/events.md names every event type.
    """

    def test_everyType(self) -> None:
        """
        Every event type is in docs/events.md.
        """
        text = read("docs", "events.md")
        for eventType in EVENT_TYPES:
            self.assertIn(f"`{eventType}`", text)


class WebTests(SynchronousTestCase):
    """
    docs/web.md lists the web server's routes.
    """

    def test_everyRoute(self) -> None:
        """
        Every route of the tracking site, with each of its methods, is in
        docs/web.md.
        """
        text = read("docs", "web.md")
        rules = list(TrackingApp.app.url_map.iter_rules())
        self.assertGreater(len(rules), 2)
        for rule in rules:
            path = re.sub(r"<[^>]*>", "TOKEN", rule.rule)
            rows = [line for line in text.splitlines() if f"BASE_URL{path}`" in line]
            self.assertTrue(rows, path)
            for method in rule.methods - {"OPTIONS"}:
                self.assertTrue(any(method in row for row in rows), f"{method} {path}")

    def test_apiRoutes(self):
        """
        Every route of the HTTP API, with each of its methods (HEAD aside),
        has a heading in docs/api.md, and is in the OpenAPI document.
        """
        from smartrelay.web.api import ApiApp
        from smartrelay.web.openapi import document

        text = read("docs", "api.md")
        paths = document()["paths"]
        rules = list(ApiApp.app.url_map.iter_rules())
        self.assertGreater(len(rules), 10)
        for rule in rules:
            names = re.findall(r"<(?:[a-z]+:)?([a-z_]+)>", rule.rule)
            documented = re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", lambda m: "<" + m.group(1).replace("_", "-") + ">", rule.rule)
            openapi = re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", r"{\1}", rule.rule)
            for method in rule.methods - {"OPTIONS", "HEAD"}:
                self.assertIn(f"### `{method} {documented}", text, f"{method} {rule.rule}")
                self.assertIn(method.lower(), paths.get(openapi, {}), f"{method} {openapi}")
            self.assertTrue(names or "<" not in rule.rule)


#: [text](target) links of Markdown, not images.
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """
    The anchor GitHub makes for a heading.
    """
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: str) -> set[str]:
    return {
        slug(line.lstrip("#"))
        for line in read(path).splitlines()
        if re.match(r"#{1,6} ", line)
    }


class LinkTests(SynchronousTestCase):
    """
    The README and docs/ link only inside the repository.
    """

    def test_linksResolve(self) -> None:
        """
        Every link in README.md and docs/ is an http(s) URL or a file (and
        heading) in the repository.
        """
        checked = 0
        for page in markdownFiles():
            for target in LINK.findall(read(page)):
                where = f"{page}: {target}"
                parts = urlsplit(target)
                if parts.scheme in ("http", "https"):
                    continue
                self.assertEqual(parts.scheme, "", where)
                self.assertFalse(parts.netloc, where)
                path = os.path.normpath(
                    os.path.join(ROOT, os.path.dirname(page), parts.path or os.path.basename(page))
                )
                self.assertTrue(path.startswith(ROOT + os.sep), where)
                self.assertTrue(os.path.exists(path), where)
                if parts.fragment:
                    self.assertIn(parts.fragment, anchors(os.path.relpath(path, ROOT)), where)
                checked += 1
        self.assertGreater(checked, 10)

    def test_noSharedFolder(self) -> None:
        """
        README.md and docs/ send nobody to files outside the clone.
        """
        for page in markdownFiles():
            text = read(page)
            self.assertNotIn("../shared", text, page)
            self.assertNotIn("shared folder", text, page)
            self.assertNotRegex(text, r"\]\(\.\./\.\.", page)

    def test_readmeLinksDocs(self) -> None:
        """
        The README links to the docs index.
        """
        self.assertIn("(docs/README.md)", read("README.md"))
