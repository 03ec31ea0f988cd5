"""Page templates escape what they show; text templates (the banner) stay as written."""

from __future__ import annotations

from shared.templates import environment, render


def test_page_templates_escape_markup() -> None:
    html = render("portal/error.html.j2", title="<b>x</b>", what="<i>", todo="&", retry=False)
    assert "<b>x</b>" not in html and "&lt;b&gt;x&lt;/b&gt;" in html
    assert "&lt;i&gt;" in html and "&amp;" in html


def test_text_templates_are_not_escaped() -> None:
    decide = environment().autoescape
    assert callable(decide)
    assert decide("portal/admin/users.html.j2") is True
    assert decide("banner.txt.j2") is False  # the terminal banner prints commands as is


def test_utc_filter() -> None:
    assert environment().filters["utc"](0) == "1970-01-01 00:00:00"
