"""What the portal pages show: rendering, examples, live models, the static files."""

from __future__ import annotations

import json
import mimetypes
import shlex
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from quart import Response

from broker.broker_state import BrokerState
from shared.templates import render, template_dir

STATIC_FILES = ("portal.css", "portal.js", "playground.js", "markdown.js", "chat.js")


async def live_models(state: BrokerState) -> list[str]:
    """The models live right now and the aliases (docs/aliases.md), as /v1/models lists
    them (the one place the portal asks the relay core)."""
    return sorted(set((await state.relay.view()).live_models) | set(state.aliases.aliases))


def page(name: str, status: int = 200, **context: object) -> Response:
    html = render(f"portal/{name}.html.j2", **context)
    return Response(html, status=status, content_type="text/html; charset=utf-8")


@dataclass(frozen=True, slots=True)
class Examples:
    env: str
    curl: str
    python: str


def examples(base_url: str, model: str, key: str | None) -> Examples:
    """Paste-ready snippets; they read the key from OPENAI_API_KEY set in ``env``.

    Model names come from connectors, so every value is quoted for where it lands: shell
    words with ``shlex.quote``, the JSON body as JSON and then as one shell word, Python
    strings as Python literals. Pasting a snippet runs nothing but the request.
    """
    url = shlex.quote(base_url)
    shown = shlex.quote(key or "sk-…your key…")
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hello!"}]})
    env = (
        f"export OPENAI_BASE_URL={url}\n"
        f"export OPENAI_API_BASE={url}   # older tools (aider, Continue)\n"
        f"export OPENAI_API_KEY={shown}"
    )
    curl = (
        f"curl {shlex.quote(base_url + '/chat/completions')} \\\n"
        '  -H "Authorization: Bearer $OPENAI_API_KEY" \\\n'
        '  -H "Content-Type: application/json" \\\n'
        f"  -d {shlex.quote(body)}"
    )
    python = (
        "from openai import OpenAI\n\n"
        "client = OpenAI()  # reads OPENAI_BASE_URL and OPENAI_API_KEY\n"
        "reply = client.chat.completions.create(\n"
        f"    model={_py_str(model)},\n"
        '    messages=[{"role": "user", "content": "Hello!"}],\n'
        ")\n"
        "print(reply.choices[0].message.content)"
    )
    return Examples(env=env, curl=curl, python=python)


def _py_str(value: str) -> str:
    """A Python string literal, double-quoted when that needs no escape (the usual case)."""
    literal = repr(value)
    if literal.startswith("'") and '"' not in value and "\\" not in literal:
        return '"' + literal[1:-1] + '"'
    return literal


def connector_command(base_url: str) -> str:
    """As the broker's banner prints it: the token in the environment, not in ``ps``."""
    return (
        "REMOTELLM_BROKER_TOKEN=ct-PASTE-YOUR-TOKEN \\\n"
        f"  uv run remotellm-connector --broker-url {shlex.quote(base_url)} \\\n"
        "  --llm-url http://localhost:11434"
    )


@cache
def _static(name: str) -> tuple[bytes, str]:
    path: Path = template_dir() / "portal" / "static" / name
    kind = mimetypes.guess_type(name)[0] or "application/octet-stream"
    if kind.startswith("text/") or kind.endswith("javascript"):
        kind += "; charset=utf-8"
    return path.read_bytes(), kind


def static_file(name: str) -> Response | None:
    if name not in STATIC_FILES:
        return None
    body, kind = _static(name)
    return Response(body, content_type=kind, headers={"Cache-Control": "public, max-age=300"})
