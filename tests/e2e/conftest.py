"""Fixtures for end-to-end tests: real llama.cpp servers and real broker/connector processes."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.llama import (
    LlamaServer,
    LlamaSetupError,
    ensure_model,
    ensure_venv,
    start_llama_server,
)
from tests.support.tiny_gguf import TinyModel

# The slow variant (about 100 tokens/s on 2 cores) keeps a long stream running for seconds.
TINY_MODEL = TinyModel()
SLOW_MODEL = TinyModel(n_embd=512, n_layer=8)


def _serve(
    tmp_path_factory: pytest.TempPathFactory, spec: TinyModel, alias: str, n_ctx: int
) -> Iterator[LlamaServer]:
    try:
        python = ensure_venv()
        model = ensure_model(spec)
        server = start_llama_server(
            python, model, alias, tmp_path_factory.mktemp("llama"), n_ctx=n_ctx
        )
    except LlamaSetupError as exc:
        pytest.fail(f"cannot provide a llama.cpp server: {exc}", pytrace=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    """llama.cpp with the tiny random model as ``tiny``, n_ctx 512."""
    yield from _serve(tmp_path_factory, TINY_MODEL, "tiny", n_ctx=512)


@pytest.fixture(scope="session")
def llama_slow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    """llama.cpp with the bigger random model as ``tiny-slow`` (~100 tokens/s), n_ctx 2048."""
    yield from _serve(tmp_path_factory, SLOW_MODEL, "tiny-slow", n_ctx=2048)
