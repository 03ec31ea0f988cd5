from __future__ import annotations

import os

import pytest


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No REMOTELLM_* variable from the developer's shell leaks into a settings test."""
    for name in list(os.environ):
        if name.startswith("REMOTELLM_"):
            monkeypatch.delenv(name)
    return monkeypatch
