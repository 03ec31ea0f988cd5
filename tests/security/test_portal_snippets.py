"""Model names (chosen by whoever runs a connector) in the portal's copy-paste snippets.

A connector can serve a model named ``x'; touch pwned; echo '``. The keys page pastes
the first live model into a shell snippet and a Python snippet; a user who copies them
must run the request and nothing else. The snippets run here in bash with a stand-in
``curl`` that records its arguments, and are parsed as Python.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
from pathlib import Path

import pytest

from broker.portal.pages import connector_command, examples

HOSTILE = [
    "x'; touch pwned; echo '",
    'x"; touch pwned; echo "',
    "$(touch pwned)",
    "`touch pwned`",
    "a\nb'\"\\ $HOME",
    "llama3:8b",
]

FAKE_CURL = """#!/usr/bin/env python3
import json, sys
json.dump(sys.argv[1:], open("curl-args.json", "w"))
"""


@pytest.mark.parametrize("model", HOSTILE)
def test_the_shell_snippets_run_the_request_and_nothing_else(tmp_path: Path, model: str) -> None:
    (tmp_path / "curl").write_text(FAKE_CURL)
    (tmp_path / "curl").chmod(0o755)
    snippet = examples("http://127.0.0.1:8443/v1", model, "sk-" + "0" * 32)
    script = snippet.env + "\n" + snippet.curl + "\n"
    env = {"PATH": f"{tmp_path}:{os.environ['PATH']}", "HOME": str(tmp_path)}
    subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, check=True, timeout=20)
    assert not (tmp_path / "pwned").exists()
    args = json.loads((tmp_path / "curl-args.json").read_text())
    assert args[0] == "http://127.0.0.1:8443/v1/chat/completions"
    assert json.loads(args[args.index("-d") + 1])["model"] == model
    assert "Authorization: Bearer sk-" + "0" * 32 in args


@pytest.mark.parametrize("model", HOSTILE)
def test_the_python_snippet_names_the_model_as_one_string(model: str) -> None:
    tree = ast.parse(examples("http://127.0.0.1:8443/v1", model, None).python)
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and n.keywords]
    given = {k.arg: k.value for call in calls for k in call.keywords}
    assert isinstance(given["model"], ast.Constant) and given["model"].value == model
    assert len(calls) == 1  # nothing else is called with arguments


def test_the_connector_command_quotes_the_broker_url(tmp_path: Path) -> None:
    command = connector_command("http://h:1/$(touch pwned)")
    assert "'http://h:1/$(touch pwned)'" in command
