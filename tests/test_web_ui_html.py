"""
Property tests for the reports UI's page building
(L{smartrelay.web.ui.html}, L{smartrelay.web.ui.charts}): whatever text
the relay shows, the page has only the markup the UI wrote, and the text
reads back as it was.
"""

import csv
import html.parser
import io

from hypothesis import given, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from smartrelay.web.ui.charts import lineChart, rateChart
from smartrelay.web.ui.html import Link, Page, Table, csvBytes, layout, render

#: Every element a page may have.
ALLOWED = {
    "html", "head", "meta", "title", "link", "body", "a", "header", "nav", "ul", "li",
    "form", "label", "input", "button", "span", "main", "h1", "h2", "p", "section",
    "table", "caption", "thead", "tbody", "tr", "th", "td", "svg", "line", "text", "g",
    "polyline", "circle", "rect",
}

_pieces = st.sampled_from(
    list("<>&\"'=/ abcxyz;:()\n\t\\`\u2028") + ["<img src=x onerror=", "<script>", "-->"]
)
hostile = st.lists(_pieces, max_size=20).map("".join) | st.text(max_size=40)


class Collector(html.parser.HTMLParser):
    """
    The elements, attributes and the text of each table cell of a page.
    """

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags = []
        self.attributes = []
        self.cells = []
        self._cell = None

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attributes.extend(name for name, _ in attrs)
        if tag == "td":
            self._cell = []

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self.cells.append("".join(self._cell))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def parsed(page: Page, user="admin", q="") -> Collector:
    collector = Collector()
    collector.feed(render(layout(page, user, "token", q=q)).decode("utf-8"))
    return collector


class EscapingProperties(SynchronousTestCase):
    """
    Text from anywhere never becomes markup.
    """

    @given(text=hostile, href=hostile, user=hostile, q=hostile)
    def test_textStaysText(self, text, href, user, q):
        """Cells, links, the user name, the search text and the title add no element or attribute."""
        page = Page(title=text)
        table = Table("t", text, [text, "b"], [(text, Link(text, "/x?" + href))])
        page.add(page.table(table, {"q": text}))
        collector = parsed(page, user=user, q=q)
        self.assertLessEqual(set(collector.tags), ALLOWED)
        self.assertFalse([a for a in collector.attributes if a.startswith("on")])
        self.assertEqual(collector.cells[0], text)

    @given(label=hostile)
    def test_chartLabels(self, label):
        """A chart's label (which names a tag and a domain) adds no element."""
        page = Page(title="c")
        page.add(lineChart(label, [0, 3600], [(label, "#000000", [1, 2])], "hour"))
        page.add(rateChart(label, [0, 3600], [0.001, 0.01], 0.003, "hour"))
        collector = parsed(page)
        self.assertLessEqual(set(collector.tags), ALLOWED)
        self.assertFalse([a for a in collector.attributes if a.startswith("on")])

    @given(cells=st.lists(hostile, min_size=1, max_size=4))
    def test_csvNeverAFormula(self, cells):
        """No CSV cell starts with a character a spreadsheet reads as a formula."""
        table = Table("t", "T", ["h"] * len(cells), [tuple(cells)])
        rows = list(csv.reader(io.StringIO(csvBytes(table).decode("utf-8"), newline="")))
        for cell in rows[1]:
            self.assertNotIn(cell[:1], ("=", "+", "-", "@", "\t", "\r"))

