"""Jinja2 templates from ``templates/`` (in the source tree) or ``shared/templates`` (wheel)."""

from __future__ import annotations

from datetime import UTC, datetime
from functools import cache
from pathlib import Path

import jinja2

_HERE = Path(__file__).resolve().parent


def template_dir() -> Path:
    for candidate in (_HERE / "templates", _HERE.parent / "templates"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("templates/ not found next to the package")


@cache
def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(template_dir()),
        # Our page templates are named *.html.j2: "html" alone matches only *.html, which
        # left every page unescaped (a connector's or user's name could inject markup).
        autoescape=jinja2.select_autoescape(["html", "html.j2"]),
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["utc"] = _utc  # a Unix time as "2026-12-01 23:05:09" (UTC)
    return env


def render(name: str, **context: object) -> str:
    return environment().get_template(name).render(**context)


def _utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")
