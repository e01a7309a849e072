"""
The reports UI's page frame and building blocks, as L{twisted.web.template}
tags (which escape every string they are given, in text and attributes):
the layout with the navigation, the C{q} search box and the logout form on
every page; tables that can also be downloaded as CSV; times and rates.
"""

import csv
import io
from typing import Optional, Sequence, Union
from urllib.parse import urlencode

import attrs
from twisted.web.template import Tag, flatten, tags

__all__ = [
    "Download",
    "Link",
    "Redirect",
    "Page",
    "Table",
    "csvBytes",
    "percent",
    "render",
    "shortTime",
]

#: (path, label) of the navigation.
NAVIGATION = (
    ("/", "Dashboard"),
    ("/events", "Events"),
    ("/bounces", "Bounces"),
    ("/suppressions", "Suppressions"),
    ("/queue", "Queue"),
    ("/domains", "Domains"),
)

SEARCH_HINT = "queue id, recipient, tag or Message-ID"


@attrs.frozen
class Redirect:
    """
    A C{303 See Other} to a path of the UI.
    """

    location: str
    cookies: tuple = ()


@attrs.frozen
class Download:
    """
    A file to download (CSV).
    """

    body: bytes
    contentType: bytes
    filename: str


@attrs.frozen
class Link:
    """
    A table cell that links somewhere (its text in a CSV download).
    """

    text: str
    href: str


Cell = Union[str, int, float, None, Link, Tag]


@attrs.define
class Table:
    """
    A table of a page, also downloadable as C{NAME.csv}.

    @ivar name: its name in the download's query (C{table=NAME}).
    @ivar caption: what it shows.
    @ivar headers: the column names.
    @ivar rows: tuples of cells.
    """

    name: str
    caption: str
    headers: Sequence[str]
    rows: list = attrs.field(factory=list)


@attrs.define
class Page:
    """
    What a UI handler answers: a title, the body's tags and the tables it
    holds (by name, for C{?format=csv&table=NAME}).
    """

    title: str
    body: list = attrs.field(factory=list)
    tables: dict = attrs.field(factory=dict)
    status: int = 200
    notice: Optional[str] = None

    def add(self, *children) -> "Page":
        self.body.extend(children)
        return self

    def table(self, table: Table, query: dict, empty: str = "Nothing to show.") -> Tag:
        """
        Register C{table} and give its tag, with a link to its CSV.
        """
        self.tables[table.name] = table
        link = dict(query)
        link.update(format="csv", table=table.name)
        head = tags.thead(tags.tr(*[tags.th(h, scope="col") for h in table.headers]))
        body = tags.tbody(*[tags.tr(*[tags.td(_cell(c)) for c in row]) for row in table.rows])
        section = tags.section(
            tags.table(tags.caption(table.caption), head, body),
            **{"class": "table"},
        )
        if not table.rows:
            section(tags.p(empty, **{"class": "empty"}))
        section(
            tags.p(
                tags.a(
                    f"Download “{table.caption}” as CSV",
                    href="?" + urlencode(link),
                    **{"class": "csv"},
                )
            )
        )
        return section


def _cell(value: Cell):
    if isinstance(value, Link):
        return tags.a(value.text, href=value.href)
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:,.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return value


def _csvValue(value: Cell) -> str:
    if isinstance(value, Link):
        value = value.text
    if value is None:
        return ""
    if isinstance(value, Tag):
        value = "".join(c for c in value.children if isinstance(c, str))
    text = str(value)
    # A cell a spreadsheet would run as a formula is quoted as text.
    if text[:1] in ("=", "+", "-", "@", "\t", "\r"):
        text = "'" + text
    return text


def csvBytes(table: Table) -> bytes:
    """
    The table as CSV (header row, CRLF, UTF-8), cells that a spreadsheet
    would take for formulas made text.
    """
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(table.headers)
    for row in table.rows:
        writer.writerow([_csvValue(c) for c in row])
    return out.getvalue().encode("utf-8")


def shortTime(value: Optional[str]) -> Optional[str]:
    """
    An RFC 3339 time as C{2026-12-07 10:00:01 UTC}.
    """
    if not value:
        return None
    text = value.replace("T", " ")
    if text.endswith("Z"):
        text = text[:-1]
    return text.split(".")[0] + " UTC"


def percent(value: Optional[float], digits: int = 2) -> str:
    if value is None:
        return "—"
    return f"{value * 100:.{digits}f} %"


def _searchForm(q: str) -> Tag:
    return tags.form(
        tags.label("Search", **{"for": "q", "class": "visually-hidden"}),
        tags.input(
            id="q", name="q", type="search", value=q, placeholder=SEARCH_HINT,
            **{"aria-label": f"Search: {SEARCH_HINT}"},
        ),
        tags.button("Search", type="submit"),
        action="/search",
        method="get",
        role="search",
        **{"class": "search"},
    )


def layout(page: Page, user: Optional[str], csrf: Optional[str], q: str = "",
           current: str = "") -> Tag:
    """
    The whole document of a page.
    """
    header = tags.header(tags.a("smartrelay", href="/", **{"class": "brand"}))
    if user is not None:
        items = []
        for path, label in NAVIGATION:
            link = tags.a(label, href=path)
            if path == current:
                link(**{"aria-current": "page"})
            items.append(tags.li(link))
        header(tags.nav(tags.ul(*items), **{"aria-label": "Sections"}))
    header(_searchForm(q))
    if user is not None:
        header(
            tags.form(
                tags.input(type="hidden", name="csrf", value=csrf or ""),
                tags.span(user, **{"class": "user"}),
                tags.button("Log out", type="submit"),
                action="/logout",
                method="post",
                **{"class": "logout"},
            )
        )
    main = Tag("main")(tags.h1(page.title), id="main")
    if page.notice:
        main(tags.p(page.notice, role="status", **{"class": "notice"}))
    main(*page.body)
    return tags.html(
        tags.head(
            tags.meta(charset="utf-8"),
            tags.meta(name="viewport", content="width=device-width, initial-scale=1"),
            tags.title(f"{page.title} · smartrelay"),
            tags.link(rel="stylesheet", href="/static/ui.css"),
        ),
        tags.body(tags.a("Skip to content", href="#main", **{"class": "skip"}), header, main),
        lang="en",
    )


def render(document: Tag) -> bytes:
    """
    The document as HTML bytes.  Everything in it is synchronous, so the
    flattening is done when this returns.
    """
    out: list = []
    d = flatten(None, document, out.append)
    failures: list = []
    d.addErrback(failures.append)
    if failures:
        failures[0].raiseException()
    return b"<!DOCTYPE html>\n" + b"".join(out)
