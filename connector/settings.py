"""Connector settings: declared once; CLI flags, env variables, YAML keys, docs derive from it."""

from __future__ import annotations

import hashlib
import ipaddress
import re
import socket
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, ValidationInfo, field_validator, model_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from shared.protocol import UploadMode
from shared.settings import FileAwareSettings, split_list

SECONDS = 1.0
NAME_MAX = 200  # RegisterRequest.name's limit
AUTO: Literal["auto"] = "auto"


def default_name(llm_url: str, host: str | None = None) -> str:
    """``<host>:<LLM address>``, e.g. ``gpu-box:localhost-11434``.

    Distinct for each connector on one host (one per engine or GPU, each with its own LLM
    URL) and the same after a restart, so a restarted connector replaces its own session.
    """
    url = urlsplit(llm_url)
    parts = [url.hostname or "llm"]
    if url.port is not None:
        parts.append(str(url.port))
    parts.extend(p for p in url.path.split("/") if p)
    address = re.sub(r"[^A-Za-z0-9._-]+", "-", "-".join(parts)).strip("-")
    name = f"{host or socket.gethostname()}:{address}"
    if len(name) > NAME_MAX:
        # Keep long names distinct: cut, then add a short digest of the whole.
        digest = hashlib.sha256(name.encode()).hexdigest()[:8]
        name = name[: NAME_MAX - 9] + "-" + digest
    return name


def read_token_file(path: Path) -> str:
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read the token file {path}: {exc}") from exc
    if not token:
        raise ValueError(f"the token file {path} is empty")
    return token


def default_data_dir() -> Path:
    return Path.home() / ".local" / "share" / "remotellm" / "connector"


CREDENTIALS_FILE = "credentials"


class ConnectorSettings(FileAwareSettings):
    model_config = SettingsConfigDict(env_prefix="REMOTELLM_", extra="ignore")

    broker_url: str = Field(
        description="The broker's URL, http:// or https:// (e.g. https://llm.example.com)."
    )
    broker_token: str | None = Field(
        None,
        repr=False,
        description="This connector's token, given by the broker operator. A command line is "
        "visible to every local user (ps): prefer REMOTELLM_BROKER_TOKEN or --broker-token-file.",
        json_schema_extra={
            "doc_default": "(none: <data-dir>/credentials, else enroll: docs/enrollment.md)"
        },
    )
    broker_token_file: Path | None = Field(
        None,
        validate_default=True,
        description="File holding this connector's token (surrounding whitespace is ignored); "
        "instead of --broker-token.",
    )
    data_dir: Path = Field(
        default_factory=default_data_dir,
        description="Where an enrolled connector keeps its token (`credentials`, mode 600) and, "
        "while it waits for approval, its enrollment secret.",
        json_schema_extra={"doc_default": "~/.local/share/remotellm/connector"},
    )
    llm_url: str = Field(
        "http://localhost:11434",
        description="Base URL of the local OpenAI-compatible LLM server (Ollama, llama.cpp, "
        "vLLM, LM Studio).",
    )
    models: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Model to serve (repeatable; env: comma-separated). Default: discover them "
        "from the LLM's /v1/models and keep them current.",
        json_schema_extra={"flag": "--model"},
    )
    name: str = Field(
        "",
        max_length=NAME_MAX,
        description="Name of this connector: a restarted connector with the same name replaces "
        "its old session; two running connectors of one token need different names.",
        json_schema_extra={"doc_default": "<host>:<LLM address>, e.g. gpu-box:localhost-11434"},
    )
    capacity: int | Literal["auto"] = Field(
        AUTO,
        description="Requests served at the same time: a number, or auto (ask the engine: "
        "llama.cpp's llama-server reports its slots; others get 64).",
    )
    health_port: int | None = Field(
        None, ge=0, le=65535, description="Port for /health and /ready (off when not set)."
    )
    health_host: str = Field("127.0.0.1", description="Address of the health server.")
    log_level: str = Field("info", description="debug, info, warning or error.")
    trace_hops: bool = Field(
        False,
        description="Log one hop_trace line (info level) per relayed request with the time "
        "each hop was reached (docs/performance.md, remotellm-bench local --trace); for "
        "diagnosing latency, off in production.",
    )
    log_format: Literal["auto", "json", "console"] = Field(
        "auto", description="json, console, or auto (console on a TTY, else JSON)."
    )
    upload_mode: UploadMode = Field(
        UploadMode.AUTO,
        description="How responses go back: mux (one long-lived POST carries every response; "
        "stream where the broker does not offer it), stream (one chunked POST per response), "
        "parts (small POSTs, for proxies that buffer request bodies) or auto (probe the path "
        "at registration: mux where it streams bodies, else parts).",
    )
    poll_mode: Literal["auto", "stream", "classic"] = Field(
        "auto",
        description="How work arrives: stream (one long-poll answer carries items as they "
        "come, saving an HTTP exchange per request), classic (one answer per batch) or auto "
        "(stream when the probe shows the path delivers responses incrementally).",
    )
    proxy: str | None = Field(
        None,
        description="Proxy URL for reaching the broker (http://user:pass@host:port); default: "
        "HTTPS_PROXY / HTTP_PROXY / NO_PROXY from the environment.",
    )
    ca_bundle: Path | None = Field(
        None,
        description="CA bundle (PEM) to verify the broker, e.g. a TLS-intercepting proxy's root; "
        "default: SSL_CERT_FILE or the system trust store.",
    )
    insecure: bool = Field(
        False,
        description="Do not verify the broker's TLS certificate (loudly logged; testing only).",
    )
    http2: bool = Field(False, description="Talk to the broker over HTTP/2 where the path allows.")
    llm_api_key: str | None = Field(
        None,
        description="API key for the local LLM, used when the broker does not send one.",
    )
    llm_connect_timeout: float = Field(
        10 * SECONDS, gt=0, description="Seconds to connect to the local LLM."
    )
    llm_read_timeout: float = Field(
        600 * SECONDS,
        gt=0,
        description="Seconds the local LLM may stay silent (a long prompt being processed).",
    )
    model_refresh: float = Field(
        60 * SECONDS, gt=0, description="Seconds between model discoveries (without --model)."
    )
    drain_timeout: float = Field(
        30 * SECONDS, ge=0, description="Seconds to finish in-flight requests on SIGTERM."
    )

    @property
    def token(self) -> str:
        """The connector token: --broker-token, the environment, --broker-token-file, or the
        credentials file enrollment wrote."""
        if self.broker_token is None:
            raise ValueError(
                "no connector token: set REMOTELLM_BROKER_TOKEN, give --broker-token-file, "
                "or enroll (remotellm-connector enroll)"
            )
        return self.broker_token

    @property
    def credentials_path(self) -> Path:
        """Where enrollment keeps the token it received (docs/enrollment.md)."""
        return self.data_dir / CREDENTIALS_FILE

    @field_validator("broker_token_file")
    @classmethod
    def _one_token(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        given = info.data.get("broker_token")
        if value is not None and given:
            raise ValueError(
                "give the token once: --broker-token-file or --broker-token / "
                "REMOTELLM_BROKER_TOKEN, not both"
            )
        if value is not None:
            read_token_file(value)
        return value

    @field_validator("capacity", mode="before")
    @classmethod
    def _capacity(cls, value: object) -> object:
        if isinstance(value, str):
            text = value.strip().lower()
            if text == AUTO:
                return AUTO
            if not text.isdigit():
                raise ValueError(f"must be a positive whole number or auto, not {value!r}")
            value = int(text)
        if isinstance(value, int) and not isinstance(value, bool) and not 1 <= value <= 10_000:
            raise ValueError("must be between 1 and 10000 (or auto)")
        return value

    @model_validator(mode="after")
    def _derive(self) -> ConnectorSettings:
        if self.broker_token_file is not None:
            self.broker_token = read_token_file(self.broker_token_file)
        elif not self.broker_token and self.credentials_path.is_file():
            self.broker_token = read_token_file(self.credentials_path)
        if not self.broker_token:
            self.broker_token = None  # no token: `run` and `enroll` ask the broker to join
        if not self.name.strip():
            self.name = default_name(self.llm_url)
        return self

    @field_validator("models", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        return split_list(value)

    @field_validator("ca_bundle")
    @classmethod
    def _readable(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"{value} is not a file (a PEM bundle of CA certificates)")
        return value

    @field_validator("broker_url", "llm_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")


def cleartext_broker(url: str) -> bool:
    """True when ``url`` is plain http:// to a host other than this machine.

    Then the connector token, the enrollment secret and every prompt and answer cross the
    network readable by anyone on the path; loopback (a TLS-terminating sidecar, tests) is
    fine.
    """
    parts = urlsplit(url)
    if parts.scheme != "http":
        return False
    host = (parts.hostname or "").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True
