"""The tokens-per-day chart: pure markup from data, accessible, nothing unescaped."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from broker.portal.svg_chart import DayBar, fill_days, nice_ceiling, short, tokens_chart

NS = {"svg": "http://www.w3.org/2000/svg"}


def _parse(markup: str) -> ET.Element:
    return ET.fromstring(markup)


@pytest.mark.parametrize(
    ("value", "expected"), [(0, 1), (1, 1), (7, 10), (10, 10), (11, 20), (150, 200), (4001, 5000)]
)
def test_nice_ceiling(value: int, expected: int) -> None:
    assert nice_ceiling(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [(0, "0"), (12.5, "12.5"), (999, "999"), (1000, "1k"), (12345, "12.3k"), (2e6, "2M")],
)
def test_short_labels(value: float, expected: str) -> None:
    assert short(value) == expected


def test_every_day_of_the_period_gets_a_bar() -> None:
    bars = fill_days([DayBar("2026-11-29", 5, 7)], "2026-11-28", "2026-12-01")
    assert [b.day for b in bars] == ["2026-11-28", "2026-11-29", "2026-11-30", "2026-12-01"]
    assert [b.total for b in bars] == [0, 12, 0, 0]


def test_chart_is_valid_accessible_svg_with_stacked_bars() -> None:
    bars = [DayBar("2026-11-30", 100, 300), DayBar("2026-12-01", 50, 0)]
    root = _parse(tokens_chart(bars, "Tokens per day"))
    assert root.get("role") == "img"
    assert root.get("aria-labelledby") == "tokens-chart-title tokens-chart-desc"
    assert root.find("svg:title", NS) is not None
    assert root.findtext("svg:title", namespaces=NS) == "Tokens per day"
    desc = root.findtext("svg:desc", namespaces=NS) or ""
    assert "450 tokens" in desc and "2026-11-30 with 400 tokens" in desc
    groups = root.findall("svg:g", NS)
    assert [g.get("data-day") for g in groups] == ["2026-11-30", "2026-12-01"]
    first = groups[0].findall("svg:rect", NS)
    assert [r.get("class") for r in first] == ["in", "out"]
    # The axis tops out at a round 500: the 400-token bar is 4/5 of the plot height.
    heights = sum(float(r.get("height") or 0) for r in first)
    assert heights == pytest.approx((220 - 16 - 40) * 400 / 500, abs=0.2)
    assert len(groups[1].findall("svg:rect", NS)) == 1  # no empty "out" rect
    texts = [t.text for t in root.iter("{http://www.w3.org/2000/svg}text")]
    assert "500" in texts and "tokens" in texts and "11-30" in texts
    assert "style=" not in tokens_chart(bars, "x")  # the CSP allows no inline style


def test_empty_period_says_so() -> None:
    root = _parse(tokens_chart([], "Tokens"))
    assert "no tokens in this period" in ET.tostring(root, encoding="unicode")


def test_text_is_escaped() -> None:
    markup = tokens_chart([DayBar("2026-12-01", 1, 1)], '<script>alert("x")</script>')
    assert "<script>" not in markup
    assert _parse(markup).findtext("svg:title", namespaces=NS) == '<script>alert("x")</script>'


def test_many_days_get_few_labels() -> None:
    bars = fill_days([], "2026-11-01", "2026-11-30")
    labels = [
        t.text
        for t in _parse(tokens_chart(bars, "t")).iter("{http://www.w3.org/2000/svg}text")
        if t.text and t.text[:2] == "11"
    ]
    assert 4 <= len(labels) <= 9 and labels[-1] == "11-30"
    assert "11-29" not in labels  # no label crowding the last one
