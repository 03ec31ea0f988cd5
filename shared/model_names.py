"""The one rule for a model name, wherever one enters (registration, model updates,
enrollment, the API's ``model`` field).

Real engines name models like ``llama3.2:3b-instruct-q4_K_M``, ``org/model@rev`` or
``gpt-4o-mini+ft``: letters, digits and ``. _ : / @ + -``. Nothing else is needed, and
leaving out quotes, spaces, ``;``, ``$``, backquotes and control characters makes a name
safe to show in HTML, logs, metrics labels and copy-paste shell snippets. A leading ``-``
would read as an option on a command line, so a name may not start with one.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

MODEL_NAME_MAX = 200
MODEL_NAME_CHARS = "A-Z a-z 0-9 . _ : / @ + -"
_NAME = re.compile(r"[A-Za-z0-9._:/@+][A-Za-z0-9._:/@+\-]*")


class InvalidModelName(ValueError):
    """A model name outside the rule; the message says which rule and shows the name safely."""


def model_name_problem(name: str) -> str | None:
    """Why ``name`` is not a valid model name, or None if it is."""
    if not name:
        return "a model name may not be empty"
    if len(name) > MODEL_NAME_MAX:
        return f"a model name has at most {MODEL_NAME_MAX} characters (this one has {len(name)})"
    if _NAME.fullmatch(name) is None:
        return (
            f"model name {shown(name)} may hold only {MODEL_NAME_CHARS} and may not start with '-'"
        )
    return None


def is_model_name(name: str) -> bool:
    return model_name_problem(name) is None


def check_model_names(names: Iterable[str]) -> list[str]:
    """``names`` without duplicates, in order; InvalidModelName for the first bad one."""
    seen: dict[str, None] = {}
    for name in names:
        problem = model_name_problem(name)
        if problem is not None:
            raise InvalidModelName(problem)
        seen.setdefault(name, None)
    return list(seen)


def split_valid(names: Iterable[str]) -> tuple[list[str], list[str]]:
    """The valid names (first of each), and why each invalid one is not (for a warning)."""
    valid: dict[str, None] = {}
    problems: list[str] = []
    for name in names:
        problem = model_name_problem(name)
        if problem is None:
            valid.setdefault(name, None)
        else:
            problems.append(problem)
    return list(valid), problems


def shown(name: str, limit: int = 60) -> str:
    """A name for a message: truncated, non-printable and quote characters escaped."""
    cut = name[:limit]
    text = cut.encode("unicode_escape").decode("ascii").replace("'", "\\'")
    return f"'{text}'" + ("..." if len(name) > limit else "")
