"""A tiny LLaMA-architecture GGUF model for end-to-end tests, made here: no download.

Written with the ``gguf`` package (a dev dependency). The model is what a real engine needs
to load and serve, and nothing more:

- a SentencePiece-style ("llama") vocabulary of control tokens, the 256 byte-fallback tokens
  ``<0x00>`` .. ``<0xFF>`` (any UTF-8 prompt tokenizes) and one token per printable ASCII
  character (``U+2581`` stands for the space), so a prompt costs about one token a character;
- a chat template, so ``/v1/chat/completions`` formats messages;
- deterministic random weights (``seed``) arranged so the model only ever *generates*
  printable ASCII and never end-of-sequence: ``max_tokens=N`` yields exactly N tokens,
  finish reason ``length``, and every chunk is valid UTF-8.

How generation stays printable: channel 0 of the residual stream carries a constant. Token
embeddings put ``BIAS_LEVEL`` there and no attention or feed-forward output ever writes to it,
so after the final RMS norm channel 0 is always clearly positive. The output rows of every
token that must not be generated (control and byte tokens) read only channel 0, with a
negative weight: their logits stay far below the printable tokens', whose rows read only the
other channels.

    uv run python -m tests.support.tiny_gguf --out tiny.gguf [--n-embd 512 --n-layer 8]
"""

from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import gguf
import numpy as np
import numpy.typing as npt

UNK, BOS, EOS = 0, 1, 2
SPACE = "\u2581"  # SentencePiece's word-boundary mark: the space character
BIAS_LEVEL = 2.0  # channel 0 of every embedding, times sqrt(n_embd)
BLOCKED_WEIGHT = -6.0  # output weight on channel 0 of the tokens never generated
PRINTABLE_SPREAD = 2.0  # about the standard deviation of the printable tokens' logits

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '### ' + message['role'] + ':\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- elif message['content'] -%}"
    "{%- for part in message['content'] if part['type'] == 'text' -%}{{ part['text'] }}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{ '\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '### assistant:\n' }}{%- endif -%}"
)

Matrix = npt.NDArray[np.float32]


@dataclass(frozen=True)
class TinyModel:
    """The shape of a generated model; the defaults make a ~0.5 MB model that answers fast."""

    n_embd: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_ff: int = 128
    n_ctx: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head or self.n_embd < 8:
            raise ValueError("n_embd must be at least 8 and a multiple of n_head")

    @property
    def cache_name(self) -> str:
        """A file name that changes with the shape and with this generator's source."""
        digest = hashlib.sha256(Path(__file__).read_bytes())
        digest.update(json.dumps(asdict(self), sort_keys=True).encode())
        return f"tiny-{self.n_embd}x{self.n_layer}-{digest.hexdigest()[:12]}.gguf"


@dataclass(frozen=True)
class Vocab:
    tokens: list[str]
    scores: list[float]
    types: list[gguf.TokenType]
    printable: list[int]  # the ids the model may generate


def build_vocab() -> Vocab:
    tokens = ["<unk>", "<s>", "</s>"]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    tokens += [f"<0x{byte:02X}>" for byte in range(256)]
    types += [gguf.TokenType.BYTE] * 256
    first_printable = len(tokens)
    tokens += [SPACE if code == 0x20 else chr(code) for code in range(0x20, 0x7F)]
    types += [gguf.TokenType.NORMAL] * (len(tokens) - first_printable)
    scores = [0.0 if kind != gguf.TokenType.NORMAL else -1.0 for kind in types]
    return Vocab(tokens, scores, types, list(range(first_printable, len(tokens))))


class _Weights:
    """Random matrices in numpy's (rows=outputs, columns=inputs) order, as GGUF wants them."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def normal(self, rows: int, cols: int, scale: float) -> Matrix:
        return self.rng.normal(0.0, scale, size=(rows, cols)).astype(np.float32)

    def projection(self, n_out: int, n_in: int, *, keep_bias: bool = False) -> Matrix:
        """A random linear map; ``keep_bias``: it never writes residual channel 0."""
        matrix = self.normal(n_out, n_in, 1.0 / np.sqrt(n_in))
        if keep_bias:
            matrix[0, :] = 0.0
        return matrix


def _embeddings(weights: _Weights, n_vocab: int, n_embd: int) -> Matrix:
    table = weights.normal(n_vocab, n_embd, 1.0)
    table[:, 0] = BIAS_LEVEL * np.sqrt(n_embd)
    return table


def _output(weights: _Weights, vocab: Vocab, n_embd: int) -> Matrix:
    table = np.zeros((len(vocab.tokens), n_embd), dtype=np.float32)
    table[:, 0] = BLOCKED_WEIGHT
    rows = np.array(vocab.printable)
    table[rows, 0] = 0.0
    # After the norm the other channels are about 0.5 each: spread the logits by about
    # PRINTABLE_SPREAD so the output looks random but no token dominates.
    scale = PRINTABLE_SPREAD / (0.5 * np.sqrt(n_embd - 1))
    table[rows, 1:] = weights.normal(len(rows), n_embd - 1, scale)
    return table


def _add_metadata(writer: gguf.GGUFWriter, model: TinyModel, vocab: Vocab) -> None:
    writer.add_name("remotellm-tiny-random")
    writer.add_context_length(model.n_ctx)
    writer.add_embedding_length(model.n_embd)
    writer.add_block_count(model.n_layer)
    writer.add_feed_forward_length(model.n_ff)
    writer.add_head_count(model.n_head)
    writer.add_head_count_kv(model.n_head)
    writer.add_rope_dimension_count(model.n_embd // model.n_head)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(vocab.tokens))
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(vocab.tokens)
    writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    writer.add_unk_token_id(UNK)
    writer.add_bos_token_id(BOS)
    writer.add_eos_token_id(EOS)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)


def _add_layer(writer: gguf.GGUFWriter, weights: _Weights, model: TinyModel, i: int) -> None:
    d, ff = model.n_embd, model.n_ff
    ones = np.ones(d, dtype=np.float32)
    writer.add_tensor(f"blk.{i}.attn_norm.weight", ones)
    for name in ("attn_q", "attn_k", "attn_v"):
        writer.add_tensor(f"blk.{i}.{name}.weight", weights.projection(d, d))
    writer.add_tensor(f"blk.{i}.attn_output.weight", weights.projection(d, d, keep_bias=True))
    writer.add_tensor(f"blk.{i}.ffn_norm.weight", ones)
    writer.add_tensor(f"blk.{i}.ffn_gate.weight", weights.projection(ff, d))
    writer.add_tensor(f"blk.{i}.ffn_up.weight", weights.projection(ff, d))
    writer.add_tensor(f"blk.{i}.ffn_down.weight", weights.projection(d, ff, keep_bias=True))


def write_model(path: Path, model: TinyModel) -> None:
    """Write ``model`` as a GGUF file at ``path``."""
    vocab = build_vocab()
    weights = _Weights(model.seed)
    writer = gguf.GGUFWriter(path, arch="llama")
    _add_metadata(writer, model, vocab)
    writer.add_tensor("token_embd.weight", _embeddings(weights, len(vocab.tokens), model.n_embd))
    for i in range(model.n_layer):
        _add_layer(writer, weights, model, i)
    writer.add_tensor("output_norm.weight", np.ones(model.n_embd, dtype=np.float32))
    writer.add_tensor("output.weight", _output(weights, vocab, model.n_embd))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a tiny random LLaMA GGUF model.")
    parser.add_argument("--out", type=Path, default=Path("tiny.gguf"))
    defaults = TinyModel()
    for field in ("n_embd", "n_layer", "n_head", "n_ff", "n_ctx", "seed"):
        flag = "--" + field.replace("_", "-")
        parser.add_argument(flag, type=int, default=getattr(defaults, field), dest=field)
    args = vars(parser.parse_args(argv))
    out = args.pop("out")
    model = TinyModel(**args)
    write_model(out, model)
    print(f"wrote {out}: {model}")


if __name__ == "__main__":
    main()
