"""The e2e tests' model generator writes a GGUF a llama engine can load and only speak ASCII."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from tests.support.tiny_gguf import EOS, TinyModel, build_vocab, write_model

SMALL = TinyModel(n_embd=16, n_layer=1, n_head=2, n_ff=32)


def _string(reader: gguf.GGUFReader, key: str) -> str:
    field = reader.get_field(key)
    assert field is not None, key
    return bytes(field.parts[field.data[0]]).decode()


def test_the_file_reads_back_as_a_llama_model(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    write_model(path, SMALL)
    reader = gguf.GGUFReader(path)
    assert _string(reader, "general.architecture") == "llama"
    assert _string(reader, "tokenizer.ggml.model") == "llama"
    assert "add_generation_prompt" in _string(reader, "tokenizer.chat_template")
    tokens = reader.get_field("tokenizer.ggml.tokens")
    assert tokens is not None and len(tokens.data) == len(build_vocab().tokens)
    names = {tensor.name for tensor in reader.tensors}
    assert {"token_embd.weight", "output.weight", "blk.0.ffn_down.weight"} <= names
    assert len(names) == 3 + 9 * SMALL.n_layer


def test_every_byte_has_a_fallback_token() -> None:
    tokens = set(build_vocab().tokens)
    assert all(f"<0x{byte:02X}>" in tokens for byte in range(256))


def test_only_printable_tokens_are_ever_likely(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    write_model(path, SMALL)
    tensors = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(path).tensors}
    hidden = tensors["token_embd.weight"]  # any residual: channel 0 holds the constant
    normed = hidden / np.sqrt((hidden**2).mean(axis=1, keepdims=True))
    logits = normed @ tensors["output.weight"].T
    printable = build_vocab().printable
    blocked = np.setdiff1d(np.arange(logits.shape[1]), printable)
    assert EOS in blocked
    assert (logits[:, blocked].max(axis=1) < logits[:, printable].max(axis=1) - 15).all()


def test_the_cache_name_follows_the_shape() -> None:
    assert TinyModel().cache_name == TinyModel().cache_name
    assert TinyModel().cache_name != TinyModel(n_layer=3).cache_name
