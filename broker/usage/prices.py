"""Per-model token prices from ``--models-file``: what usage costs, shown next to it.

The file (YAML, strict keys)::

    currency: EUR
    models:
      llama3.1:8b:
        input_per_million: 0.20
        output_per_million: 0.60

A model the file does not name has no price: its cost columns stay empty rather than 0,
so an unpriced model never looks free.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared.errors import ConfigError

MILLION = 1_000_000


class PricesFileError(ConfigError):
    """The models file is missing, not YAML, or has a wrong key or value (the message says)."""


class ModelPrice(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    input_per_million: float = Field(ge=0)
    output_per_million: float = Field(ge=0)


class ModelsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    currency: str = Field(min_length=1, max_length=16)
    models: dict[str, ModelPrice]


@dataclass(frozen=True, slots=True)
class Cost:
    input: float
    output: float

    @property
    def total(self) -> float:
        return self.input + self.output


@dataclass(frozen=True, slots=True)
class PriceBook:
    currency: str
    prices: dict[str, ModelPrice]

    def cost(self, model: str, tokens_in: int, tokens_out: int) -> Cost | None:
        """What ``model``'s tokens cost, or None when the file gives it no price."""
        price = self.prices.get(model)
        if price is None:
            return None
        return Cost(
            tokens_in * price.input_per_million / MILLION,
            tokens_out * price.output_per_million / MILLION,
        )


def parse_prices(text: str, source: str) -> PriceBook:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PricesFileError(f"{source} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise PricesFileError(
            f"{source}: expected a mapping with `currency` and `models` "
            "(see docs/usage.md, 'Prices')"
        )
    try:
        doc = ModelsFile.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise PricesFileError(
            f"{source}: {where}: {first['msg']} (keys: currency, models.<model>."
            "input_per_million, models.<model>.output_per_million)"
        ) from exc
    return PriceBook(doc.currency, dict(doc.models))


def load_prices(path: Path) -> PriceBook:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PricesFileError(f"cannot read the models file {path}: {exc.strerror}") from exc
    return parse_prices(text, str(path))
