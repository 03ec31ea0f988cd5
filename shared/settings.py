"""Settings plumbing shared by broker and connector.

Each component declares its settings once, as a pydantic-settings class whose fields carry
their help text. From that one declaration come the environment variables, the YAML config
file keys, the click options (``options_from_settings``) and the README tables
(``markdown_table``). Precedence: command line > environment > config file > defaults.
"""

from __future__ import annotations

import contextvars
import difflib
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, NoReturn, TypeVar, get_args, get_origin

import click
import yaml
from pydantic import ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

from shared.errors import ConfigError

_CONFIG_FILE: contextvars.ContextVar[Path | None] = contextvars.ContextVar(
    "remotellm_config_file", default=None
)

S = TypeVar("S", bound=BaseSettings)


def split_list(value: Any) -> Any:
    """Repeatable options come from the environment as comma-separated lists."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class YamlFileSource(PydanticBaseSettingsSource):
    """Reads the ``--config`` YAML file.

    Keys are the field names or the flag names, with dashes or underscores. Unlike the
    environment (where other ``REMOTELLM_*`` variables may belong to something else), every
    key in the file must be a setting: a misspelled one is an error, not silently ignored.
    """

    def __init__(self, settings_cls: type[BaseSettings]) -> None:
        super().__init__(settings_cls)
        path = _CONFIG_FILE.get()
        self._data: dict[str, Any] = {}
        if path is not None:
            try:
                loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            except (OSError, yaml.YAMLError) as exc:
                raise ConfigError(f"cannot read config file {path}: {exc}") from exc
            if not isinstance(loaded, dict):
                raise ConfigError(f"config file {path} must hold a mapping of settings")
            self._data = _known_keys(settings_cls, path, loaded)

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return {k: v for k, v in self._data.items() if k in self.settings_cls.model_fields}


def _key_names(cls: type[BaseSettings]) -> dict[str, str]:
    """Every spelling a config file may use for a field (underscored), mapped to the field."""
    names: dict[str, str] = {}
    for name, field in cls.model_fields.items():
        names[name] = name
        names.setdefault(flag_for(name, field).lstrip("-").replace("-", "_"), name)
    return names


def _known_keys(cls: type[BaseSettings], path: Path, loaded: dict[Any, Any]) -> dict[str, Any]:
    names = _key_names(cls)
    data: dict[str, Any] = {}
    for key, value in loaded.items():
        field = names.get(str(key).replace("-", "_"))
        if field is None:
            raise ConfigError(f"unknown setting {str(key)!r} in {path}{_suggest(str(key), cls)}")
        if field in data:
            raise ConfigError(f"setting {field!r} is given twice in {path}")
        data[field] = value
    return data


def _suggest(key: str, cls: type[BaseSettings]) -> str:
    close = difflib.get_close_matches(key.replace("-", "_"), list(cls.model_fields), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


class FileAwareSettings(BaseSettings):
    """Base class: sources are init (command line) > environment > YAML config file."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, YamlFileSource(settings_cls))


@contextmanager
def _config_file(path: Path | None) -> Iterator[None]:
    token = _CONFIG_FILE.set(path)
    try:
        yield
    finally:
        _CONFIG_FILE.reset(token)


def load_settings(cls: type[S], config_file: Path | None, overrides: dict[str, Any]) -> S:
    """Build settings: ``overrides`` (the command line) win over env, file and defaults."""
    given = _given(overrides)
    with _config_file(config_file):
        try:
            return cls(**given)
        except ValidationError as exc:
            raise ConfigError(_explain(exc, cls)) from exc


# Every command of both programs: -h as well as --help, help text wrapped at 100 columns.
CLI_CONTEXT: dict[str, Any] = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
F = TypeVar("F", bound=Callable[..., Any])


def _given(options: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in options.items() if v is not None and v != ()}


@dataclass(frozen=True)
class ProgramSettings(Generic[S]):
    """One program's ``--config`` option and settings-or-exit, shared by all its commands.

    Options given to the group before a subcommand (``remotellm-broker --data-dir d users
    list``) are kept in the click context by ``remember`` and apply to the subcommand too.
    A configuration error is the user's to fix: one line on stderr and exit status 2.
    """

    cls: type[S]
    program: str
    config_env: str

    def config_option(self, func: F) -> F:
        return click.option(
            "--config",
            "config_file",
            type=click.Path(exists=True, dir_okay=False, path_type=Path),
            default=None,
            envvar=self.config_env,
            help="YAML file with any of the settings below (keys as the option names).",
        )(func)

    def load(self, config_file: Path | None, options: dict[str, Any]) -> S:
        try:
            return load_settings(self.cls, config_file, options)
        except ConfigError as exc:
            self.fail(str(exc), 2)

    def remember(
        self, ctx: click.Context, config_file: Path | None, options: dict[str, Any]
    ) -> None:
        ctx.obj = {"config_file": config_file, **options}

    def load_sub(
        self,
        ctx: click.Context,
        config_file: Path | None = None,
        options: dict[str, Any] | None = None,
    ) -> S:
        """A subcommand's settings: its own options over those given before it."""
        given = _given(dict(ctx.obj or {}))
        given.update(_given(options or {}))
        config = config_file or given.pop("config_file", None)
        given.pop("config_file", None)
        return self.load(config, given)

    def fail(self, message: str, code: int = 1) -> NoReturn:
        click.echo(f"{self.program}: {message}", err=True)
        sys.exit(code)


def _explain(exc: ValidationError, cls: type[BaseSettings]) -> str:
    prefix = str(cls.model_config.get("env_prefix", ""))
    lines = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        if not loc:  # a rule across fields (a model validator): its message names them
            lines.append(str(err["msg"]).removeprefix("Value error, "))
            continue
        name = loc[0]
        field = cls.model_fields.get(name)
        flag = flag_for(name, field) if field is not None else "--" + name.replace("_", "-")
        env = prefix + name.upper()
        lines.append(f"{flag} / {env}: {err['msg']}")
    return "invalid settings:\n  " + "\n  ".join(lines)


def _is_list(annotation: Any) -> bool:
    if get_origin(annotation) is list:
        return True
    return any(get_origin(a) is list for a in get_args(annotation))


def _is_bool(annotation: Any) -> bool:
    return annotation is bool


def flag_for(name: str, field: FieldInfo) -> str:
    """The option's flag: the field name with dashes, unless the field names its own."""
    extra = field.json_schema_extra
    if isinstance(extra, dict) and isinstance(extra.get("flag"), str):
        return str(extra["flag"])
    return "--" + name.replace("_", "-")


def options_from_settings(
    cls: type[BaseSettings], skip: frozenset[str] = frozenset()
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A decorator adding one click option per settings field, each defaulting to None."""

    prefix = str(cls.model_config.get("env_prefix", ""))

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        for name, field in reversed(list(cls.model_fields.items())):
            if name in skip:
                continue
            flag = flag_for(name, field)
            default = default_text(field)
            shown = f"; default: {default}" if default else ""
            help_text = f"{field.description or ''}  [env: {prefix}{name.upper()}{shown}]"
            if _is_list(field.annotation):
                func = click.option(flag, name, multiple=True, default=None, help=help_text)(func)
            elif _is_bool(field.annotation):
                func = click.option(f"{flag}/--no-{flag[2:]}", name, default=None, help=help_text)(
                    func
                )
            else:
                func = click.option(flag, name, default=None, help=help_text)(func)
        return func

    return decorate


def default_text(field: FieldInfo) -> str:
    if field.is_required():
        return "(required)"
    extra = field.json_schema_extra
    if isinstance(extra, dict) and isinstance(extra.get("doc_default"), str):
        return str(extra["doc_default"])
    default = field.get_default(call_default_factory=True)
    if default is None or default == []:
        return ""
    if isinstance(default, bool):
        return "true" if default else "false"
    return str(default)


def markdown_table(cls: type[BaseSettings], skip: frozenset[str] = frozenset()) -> str:
    """The settings as a README table: option, env variable, default, meaning."""
    prefix = str(cls.model_config.get("env_prefix", ""))
    rows = ["| option | environment | default | meaning |", "|---|---|---|---|"]
    for name, field in cls.model_fields.items():
        if name in skip:
            continue
        flag = flag_for(name, field)
        env = prefix + name.upper()
        default = default_text(field)
        shown = f"`{default}`" if default else ""
        desc = (field.description or "").replace("|", "\\|")
        rows.append(f"| `{flag}` | `{env}` | {shown} | {desc} |")
    return "\n".join(rows)
