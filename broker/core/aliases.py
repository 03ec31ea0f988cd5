"""Model aliases: a public name for an ordered list of real models, each optionally pinned
to one connector name (docs/aliases.md). Pure: no I/O, no clock.

How a pinned target is routed without a second queue discipline: the relay state keys its
queues by a *route*, and a session serves, besides each of its models, that model pinned to
its own name (``model#name``, from ``session_routes``). A request for a pinned target is
queued under the pinned route, so only a session of that name takes it; in memory and in
Redis alike, with no change to either. ``#`` is not allowed in a model name
(shared/model_names.py), so a route splits at its first ``#`` without ambiguity and no API
user can name a pinned route directly.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

PIN = "#"
MAX_TARGETS = 16
MAX_ALIASES = 1000
CONNECTOR_NAME_MAX = 200  # as a connector registers it (shared/protocol.py)


@dataclass(frozen=True, slots=True)
class Target:
    """A real model, served by any connector or only by the one named ``connector``."""

    model: str
    connector: str | None = None

    @property
    def route(self) -> str:
        """What the relay state queues a request for this target under."""
        return self.model if self.connector is None else f"{self.model}{PIN}{self.connector}"

    def shown(self) -> str:
        return self.model if self.connector is None else f"{self.model} on {self.connector}"


@dataclass(frozen=True, slots=True)
class Alias:
    name: str
    targets: tuple[Target, ...]

    def serving_now(self, live: Mapping[str, Sequence[str]]) -> Target | None:
        """The first target a live connector serves (``live``: model -> connector names)."""
        for target in self.targets:
            names = live.get(target.model)
            if names and (target.connector is None or target.connector in names):
                return target
        return None


@dataclass(frozen=True, slots=True)
class AliasBook:
    aliases: Mapping[str, Alias]

    def get(self, name: str) -> Alias | None:
        return self.aliases.get(name)

    def __len__(self) -> int:
        return len(self.aliases)


NO_ALIASES = AliasBook({})


def session_routes(models: Iterable[str], name: str) -> list[str]:
    """What a session named ``name`` serving ``models`` takes requests for."""
    plain = list(models)
    return plain + [f"{m}{PIN}{name}" for m in plain]


def serves(route: str, models: Iterable[str], name: str) -> bool:
    """Whether a session named ``name`` serving ``models`` takes requests for ``route``."""
    return route in session_routes(models, name)


def public_model(route: str) -> str:
    """The model a route is for (a pinned route's model; a plain route is the model)."""
    return route.split(PIN, 1)[0]


def is_pinned(route: str) -> bool:
    return PIN in route


def public_models(routes: Iterable[str]) -> frozenset[str]:
    """A session's models without its pinned routes."""
    return frozenset(r for r in routes if PIN not in r)


def fold_routes(counts: Mapping[str, int]) -> dict[str, int]:
    """Counts per route summed per model (queue depths, slot waits)."""
    out: dict[str, int] = {}
    for route, n in counts.items():
        model = public_model(route)
        out[model] = out.get(model, 0) + n
    return out


def connector_name_problem(name: str) -> str | None:
    if not name or len(name) > CONNECTOR_NAME_MAX:
        return f"a connector name has 1 to {CONNECTOR_NAME_MAX} characters"
    if not name.isprintable():
        return "a connector name may not hold control characters"
    return None


def alias_problem(alias: Alias, aliases: Iterable[str]) -> str | None:
    """Why ``alias`` is not valid among ``aliases`` (every alias name in the file), or None.

    Targets are real models only: a target naming another alias would read as a chain (and
    could loop), so it is refused. A target may name the alias itself: the real model of
    that name, which the alias shadows (docs/aliases.md).
    """
    if not alias.targets:
        return "an alias needs at least one target"
    if len(alias.targets) > MAX_TARGETS:
        return f"an alias has at most {MAX_TARGETS} targets"
    if len(set(alias.targets)) != len(alias.targets):
        return "a target is listed twice"
    others = set(aliases) - {alias.name}
    for target in alias.targets:
        if target.model in others:
            return (
                f"target {target.model!r} is another alias; targets are real models "
                "(an alias never points at an alias)"
            )
        if target.connector is not None:
            problem = connector_name_problem(target.connector)
            if problem is not None:
                return problem
    return None
