"""Connector settings: declared once; CLI flags, env variables, YAML keys, docs derive from it."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from shared.protocol import UploadMode
from shared.settings import FileAwareSettings, split_list

SECONDS = 1.0


class ConnectorSettings(FileAwareSettings):
    model_config = SettingsConfigDict(env_prefix="REMOTELLM_", extra="ignore")

    broker_url: str = Field(
        description="The broker's URL, http:// or https:// (e.g. https://llm.example.com)."
    )
    broker_token: str = Field(description="This connector's token, given by the broker operator.")
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
        default_factory=socket.gethostname,
        description="Name of this connector (a restarted connector with the same name replaces "
        "its old session).",
        json_schema_extra={"doc_default": "the host name"},
    )
    capacity: int = Field(4, ge=1, le=10_000, description="Requests served at the same time.")
    health_port: int | None = Field(
        None, ge=0, le=65535, description="Port for /health and /ready (off when not set)."
    )
    health_host: str = Field("127.0.0.1", description="Address of the health server.")
    log_level: str = Field("info", description="debug, info, warning or error.")
    log_format: Literal["auto", "json", "console"] = Field(
        "auto", description="json, console, or auto (console on a TTY, else JSON)."
    )
    upload_mode: UploadMode = Field(
        UploadMode.AUTO,
        description="How responses go back: stream (one chunked POST), parts (small POSTs, for "
        "proxies that buffer request bodies) or auto (probe the path at registration).",
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
