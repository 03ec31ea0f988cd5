"""The models file (``--models-file``): token prices per model and model aliases.

The file (YAML, strict keys; every part optional but ``currency`` when prices are given)::

    currency: EUR
    models:
      llama3.1:8b:
        input_per_million: 0.20
        output_per_million: 0.60
    aliases:
      chat:                      # a public name -> the real models to try, in order
        - {model: llama3.1:70b, connector: gpu-box}
        - llama3.1:8b

A model the file does not name has no price: its cost columns stay empty rather than 0,
so an unpriced model never looks free. Aliases: docs/aliases.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from broker.core.aliases import MAX_ALIASES, NO_ALIASES, Alias, AliasBook, Target, alias_problem
from shared.errors import ConfigError
from shared.model_names import model_name_problem, shown

MILLION = 1_000_000


class PricesFileError(ConfigError):
    """The models file is missing, not YAML, or has a wrong key or value (the message says)."""


class ModelPrice(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    input_per_million: float = Field(ge=0)
    output_per_million: float = Field(ge=0)


class TargetSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    connector: str | None = None


class ModelsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    currency: str | None = Field(None, min_length=1, max_length=16)
    models: dict[str, ModelPrice] = Field(default_factory=dict)
    aliases: dict[str, list[TargetSpec]] = Field(default_factory=dict, max_length=MAX_ALIASES)

    @field_validator("aliases", mode="before")
    @classmethod
    def _bare_names(cls, value: object) -> object:
        """A target written as a bare model name is ``{model: <name>}``."""
        if not isinstance(value, dict):
            return value
        return {
            name: [{"model": t} if isinstance(t, str) else t for t in targets]
            if isinstance(targets, list)
            else targets
            for name, targets in value.items()
        }

    @model_validator(mode="after")
    def _currency_with_prices(self) -> ModelsFile:
        if self.models and self.currency is None:
            raise ValueError("`currency` is required when `models` gives prices")
        return self


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


@dataclass(frozen=True, slots=True)
class ModelsCatalog:
    """What the models file says: prices (None when it gives none) and aliases."""

    prices: PriceBook | None = None
    aliases: AliasBook = NO_ALIASES


def parse_models_file(text: str, source: str) -> ModelsCatalog:
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
            "input_per_million, models.<model>.output_per_million, aliases.<name>: "
            "[<model> or {model, connector}, ...])"
        ) from exc
    aliases = _aliases(doc, source)
    if not doc.models or doc.currency is None:
        return ModelsCatalog(None, aliases)
    return ModelsCatalog(PriceBook(doc.currency, dict(doc.models)), aliases)


def _aliases(doc: ModelsFile, source: str) -> AliasBook:
    """The file's aliases, each checked: names and targets by the model-name rule."""
    book: dict[str, Alias] = {}
    for name, specs in doc.aliases.items():
        alias = Alias(name, tuple(Target(s.model, s.connector) for s in specs))
        names = [name, *(t.model for t in alias.targets)]
        problem = next(filter(None, map(model_name_problem, names)), None)
        problem = problem or alias_problem(alias, doc.aliases)
        if problem is not None:
            raise PricesFileError(f"{source}: aliases.{shown(name)}: {problem} (docs/aliases.md)")
        book[name] = alias
    return AliasBook(book)


def load_models_file(path: Path) -> ModelsCatalog:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PricesFileError(f"cannot read the models file {path}: {exc.strerror}") from exc
    return parse_models_file(text, str(path))


def load_prices(path: Path) -> PriceBook | None:
    """The file's prices; None when it gives none (aliases only)."""
    return load_models_file(path).prices
