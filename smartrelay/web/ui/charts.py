"""
Charts of the reports UI as inline SVG, drawn on the server from the
statistics counters (L{smartrelay.web.queries.Queries.stats} without bounce
reasons): no script, no style attributes (presentation attributes only, so
the page's Content-Security-Policy allows them), a C{<title>} and an
C{aria-label} for screen readers, and the numbers also in a table beside.
"""

from datetime import datetime, timezone
from typing import Optional, Sequence

from twisted.web.template import Tag

__all__ = ["SERIES", "SMS_SERIES", "fillBuckets", "lineChart", "rateChart", "seriesValues"]

#: What the events chart draws: (label, how to read a bucket, colour);
#: colours from the Okabe-Ito palette, told apart by people with colour
#: blindness.
SERIES = (
    ("accepted", lambda b: b["counts"].get("accepted", 0), "#0072B2"),
    ("delivered", lambda b: b["counts"].get("delivered", 0), "#009E73"),
    ("deferred", lambda b: b["counts"].get("deferred", 0), "#E69F00"),
    ("hard bounces", lambda b: b["hard_bounces"], "#D55E00"),
    ("soft bounces", lambda b: b["soft_bounces"], "#CC79A7"),
    ("complained", lambda b: b["counts"].get("complained", 0), "#000000"),
    ("opened", lambda b: b["counts"].get("opened", 0), "#56B4E9"),
    ("clicked", lambda b: b["counts"].get("clicked", 0), "#7A6A00"),
)

#: What the SMS chart draws (parts: one event per part of a text); the
#: colours are those of the mail series with the same meaning.
SMS_SERIES = (
    ("SMS parts submitted", lambda b: b["counts"].get("sms_submitted", 0), "#0072B2"),
    ("SMS parts delivered", lambda b: b["counts"].get("sms_delivered", 0), "#009E73"),
    ("SMS parts failed", lambda b: b["counts"].get("sms_failed", 0), "#D55E00"),
)
#: The index in L{SERIES} (and so the legend's swatch class) of each
#: L{SMS_SERIES} colour.
SMS_SWATCHES = (0, 1, 3)

WIDTH, HEIGHT = 720, 240
LEFT, RIGHT, TOP, BOTTOM = 56, 12, 12, 36


def _svg(label: str, *children) -> Tag:
    return Tag("svg")(
        Tag("title")(label),
        *children,
        xmlns="http://www.w3.org/2000/svg",
        viewBox=f"0 0 {WIDTH} {HEIGHT}",
        width=str(WIDTH),
        height=str(HEIGHT),
        role="img",
        **{"aria-label": label, "class": "chart"},
    )


def fillBuckets(buckets: Sequence[dict], starts: Sequence[float]) -> list:
    """
    One bucket per start time in C{starts} (POSIX seconds), the store's
    where it had one (it leaves out buckets without events), else an
    empty one.
    """
    byStart = {}
    for bucket in buckets:
        when = datetime.fromisoformat(bucket["start"].replace("Z", "+00:00")).timestamp()
        byStart[int(when)] = bucket
    empty = {
        "counts": {},
        "hard_bounces": 0,
        "soft_bounces": 0,
        "unique_opens": 0,
        "unique_clicks": 0,
        "rates": {"complaint": None},
    }
    filled = []
    for start in starts:
        bucket = byStart.get(int(start))
        filled.append(dict(empty, start=start) if bucket is None else dict(bucket, start=start))
    return filled


def seriesValues(buckets: Sequence[dict], series: Sequence = SERIES) -> list:
    """
    (label, colour, [value per bucket]) for each of C{series} (L{SERIES}
    or L{SMS_SERIES}).
    """
    return [(label, colour, [read(b) for b in buckets]) for label, read, colour in series]


def _niceMax(value: float) -> float:
    if value <= 0:
        return 1
    magnitude = 10 ** (len(str(int(value))) - 1)
    for step in (1, 2, 5, 10):
        if value <= step * magnitude:
            return step * magnitude
    return 10 * magnitude  # pragma: no cover


def _label(start: float, interval: str) -> str:
    when = datetime.fromtimestamp(start, timezone.utc)
    return when.strftime("%H:%M" if interval == "hour" else "%d %b")


def _axes(starts: Sequence[float], top: float, interval: str, percent: bool = False) -> list:
    plotW, plotH = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    parts = [
        Tag("line")(x1=str(LEFT), y1=str(TOP + plotH), x2=str(WIDTH - RIGHT),
                    y2=str(TOP + plotH), stroke="#444444"),
        Tag("line")(x1=str(LEFT), y1=str(TOP), x2=str(LEFT), y2=str(TOP + plotH),
                    stroke="#444444"),
    ]
    for fraction in (0, 0.5, 1):
        y = TOP + plotH * (1 - fraction)
        value = top * fraction
        text = f"{value * 100:.2g} %" if percent else f"{value:,.0f}"
        parts.append(
            Tag("text")(text, x=str(LEFT - 6), y=f"{y + 4:.1f}", fill="#222222",
                        **{"text-anchor": "end", "font-size": "11"})
        )
        if fraction:
            parts.append(Tag("line")(x1=str(LEFT), y1=f"{y:.1f}", x2=str(WIDTH - RIGHT),
                                     y2=f"{y:.1f}", stroke="#dddddd"))
    count = len(starts)
    if count:
        every = max(1, count // 6)
        for index in range(0, count, every):
            x = LEFT + plotW * (index + 0.5) / count
            parts.append(
                Tag("text")(_label(starts[index], interval), x=f"{x:.1f}",
                            y=str(HEIGHT - BOTTOM + 16), fill="#222222",
                            **{"text-anchor": "middle", "font-size": "11"})
            )
    return parts


def lineChart(label: str, starts: Sequence[float], series: list, interval: str) -> Tag:
    """
    The events over time: one polyline per series (with a marker per
    bucket, so one bucket still shows), value axis from 0.
    """
    plotW, plotH = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    top = _niceMax(max([max(values, default=0) for _, _, values in series], default=0))
    children = _axes(starts, top, interval)
    count = len(starts)
    for name, colour, values in series:
        points = []
        for index, value in enumerate(values):
            x = LEFT + plotW * (index + 0.5) / max(count, 1)
            y = TOP + plotH * (1 - value / top)
            points.append((x, y))
        group = Tag("g")(Tag("title")(name))
        if len(points) > 1:
            group(Tag("polyline")(
                points=" ".join(f"{x:.1f},{y:.1f}" for x, y in points),
                fill="none", stroke=colour, **{"stroke-width": "2"},
            ))
        for x, y in points:
            group(Tag("circle")(cx=f"{x:.1f}", cy=f"{y:.1f}", r="2.5", fill=colour))
        children.append(group)
    return _svg(label, *children)


def rateChart(
    label: str,
    starts: Sequence[float],
    rates: Sequence[Optional[float]],
    limit: float,
    interval: str,
) -> Tag:
    """
    A rate per bucket as bars against a limit (the dashed line); a bar
    over the limit is red.
    """
    plotW, plotH = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    top = max([limit * 2] + [r for r in rates if r is not None])
    children = _axes(starts, top, interval, percent=True)
    count = max(len(starts), 1)
    barW = max(1.0, plotW / count * 0.7)
    for index, rate in enumerate(rates):
        if not rate:
            continue
        height = plotH * rate / top
        x = LEFT + plotW * (index + 0.5) / count - barW / 2
        over = rate >= limit
        children.append(
            Tag("rect")(
                Tag("title")(f"{_label(starts[index], interval)}: {rate * 100:.3f} %"),
                x=f"{x:.1f}", y=f"{TOP + plotH - height:.1f}", width=f"{barW:.1f}",
                height=f"{height:.1f}", fill="#C00000" if over else "#0072B2",
                **{"class": "over" if over else "under"},
            )
        )
    y = TOP + plotH * (1 - limit / top)
    children.append(
        Tag("line")(x1=str(LEFT), y1=f"{y:.1f}", x2=str(WIDTH - RIGHT), y2=f"{y:.1f}",
                    stroke="#C00000", **{"stroke-dasharray": "6 4", "stroke-width": "1.5"})
    )
    children.append(
        Tag("text")(f"limit {limit * 100:.1f} %", x=str(WIDTH - RIGHT - 4), y=f"{y - 4:.1f}",
                    fill="#C00000", **{"text-anchor": "end", "font-size": "11"})
    )
    return _svg(label, *children)
