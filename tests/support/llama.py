"""A real llama.cpp OpenAI-compatible server for end-to-end tests.

llama-cpp-python (``python -m llama_cpp.server``) with a tiny random-weight GGUF model made
by ``tests/support/tiny_gguf.py``: no model download, nothing needed beside the clone. The
engine lives in a venv of its own (never the project venv or uv.lock), installed once into a
cache dir and reused across runs:

- the engine: ``llama-cpp-python[server]`` from the package index (it compiles llama.cpp:
  minutes). A prebuilt wheel, when there is one, is an optional speed-up (seconds):
  ``$REMOTELLM_LLAMA_WHEEL`` or ``<repo>/../shared/upstream/llama_cpp_python-*.whl``;
- the venv: ``$REMOTELLM_LLAMA_VENV`` (default ``~/.cache/remotellm-test/llama-venv``);
  models are cached beside it, named after their shape and the generator's source.

The server runs as a plain ``subprocess.Popen`` so a session-scoped fixture can own it
whatever event loop the tests run in.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.support.net import free_port
from tests.support.tiny_gguf import TinyModel, write_model

REPO_ROOT = Path(__file__).resolve().parents[2]
# Optional: a prebuilt wheel here saves the compile. A fresh clone has no such folder.
UPSTREAM_DIR = REPO_ROOT.parent / "shared" / "upstream"
INSTALL_TIMEOUT = 30 * 60.0  # the index fallback compiles llama.cpp: minutes on 2 cores
READY_TIMEOUT = 60.0
_PROBE = "import llama_cpp, llama_cpp.server.app"  # ~2.5 s: after installing
# Cheap check that a cached venv is whole (a real import costs seconds on every run).
_QUICK_PROBE = (
    "import importlib.util as u, sys; sys.exit(not all(u.find_spec(m) for m in "
    "('llama_cpp', 'numpy', 'uvicorn', 'fastapi', 'sse_starlette', "
    "'starlette_context', 'pydantic_settings')))"
)


class LlamaSetupError(RuntimeError):
    """The llama.cpp engine could not be installed or started (the message says why)."""


def venv_dir() -> Path:
    env = os.environ.get("REMOTELLM_LLAMA_VENV")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "remotellm-test" / "llama-venv"


def cache_dir() -> Path:
    return venv_dir().parent


def find_wheel() -> Path | None:
    env = os.environ.get("REMOTELLM_LLAMA_WHEEL")
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise LlamaSetupError(f"REMOTELLM_LLAMA_WHEEL={env} is not a file")
        return path
    wheels = sorted(UPSTREAM_DIR.glob("llama_cpp_python-*.whl"))
    return wheels[-1] if wheels else None


def _python_in(venv: Path) -> Path:
    return venv / "bin" / "python"


def _run(cmd: list[str], what: str, timeout: float, env: dict[str, str] | None = None) -> None:
    try:
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, check=False, env=env
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LlamaSetupError(f"{what} failed: {exc}") from exc
    if done.returncode != 0:
        raise LlamaSetupError(
            f"{what} failed (exit {done.returncode}): {' '.join(cmd)}\n"
            f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )


def _imports_ok(python: Path, probe: str = _PROBE) -> bool:
    if not python.exists():
        return False
    done = subprocess.run([str(python), "-c", probe], capture_output=True, timeout=120, check=False)
    return done.returncode == 0


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One installer at a time (parallel test runs share the cache)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _install_env(*, source_build: bool) -> dict[str, str]:
    """The installer's environment.

    uv builds an sdist under a lock in its shared cache and gives up waiting after 5 minutes:
    a test run in another checkout compiling the same llama-cpp-python would fail this one.
    Wait as long as a compile may take instead, then reuse what it built.
    """
    env = dict(os.environ)
    env.setdefault("UV_LOCK_TIMEOUT", str(int(INSTALL_TIMEOUT)))
    if source_build:
        # Skip the multimodal library (a third of the compile), as the shared wheel does.
        env["CMAKE_ARGS"] = (env.get("CMAKE_ARGS", "") + " -DLLAVA_BUILD=OFF").strip()
    return env


def ensure_venv() -> Path:
    """The python of a venv where llama_cpp.server imports; install it if needed."""
    venv = venv_dir()
    python = _python_in(venv)
    with _locked(cache_dir() / "install.lock"):
        if _imports_ok(python, _QUICK_PROBE):
            return python
        wheel = find_wheel()
        target = f"{wheel}[server]" if wheel else "llama-cpp-python[server]"
        uv = shutil.which("uv")
        if venv.exists():
            shutil.rmtree(venv)
        if uv:
            _run([uv, "venv", "--python", sys.executable, str(venv)], "uv venv", 300)
            install = [uv, "pip", "install", "--python", str(python), target]
        else:
            _run([sys.executable, "-m", "venv", str(venv)], "python -m venv", 300)
            install = [str(python), "-m", "pip", "install", target]
        _run(install, f"installing {target}", INSTALL_TIMEOUT, _install_env(source_build=not wheel))
        if not _imports_ok(python):
            raise LlamaSetupError(f"{venv} still cannot run {_PROBE!r} after installing {target}")
        return python


def ensure_model(model: TinyModel) -> Path:
    """The GGUF of ``model`` (tests/support/tiny_gguf.py), made once into the cache dir."""
    out = cache_dir() / model.cache_name
    if out.is_file() and out.stat().st_size > 0:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}.gguf")
    try:
        write_model(tmp, model)
        os.replace(tmp, out)
    except (OSError, ValueError) as exc:
        raise LlamaSetupError(f"making {out.name} failed: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _find_prctl() -> Any:
    try:
        return ctypes.CDLL(None).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _find_prctl()  # looked up here: the child of a fork should not load libraries
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the test run dies, so no engine outlives it (Linux)."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class LlamaServer:
    """A running ``python -m llama_cpp.server``."""

    alias: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    n_ctx: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def start_llama_server(
    python: Path,
    model: Path,
    alias: str,
    log_dir: Path,
    *,
    n_ctx: int = 512,
    extra: tuple[str, ...] = ("--interrupt_requests", "False"),
) -> LlamaServer:
    """Start the server on a free loopback port; return once GET /v1/models lists ``alias``."""
    port = free_port()
    log_path = log_dir / f"llama-{alias}-{port}.log"
    cmd = [
        str(python),
        "-m",
        "llama_cpp.server",
        "--model",
        str(model),
        "--model_alias",
        alias,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_ctx",
        str(n_ctx),
        *extra,
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("REMOTELLM_")}
    env["PYTHONUNBUFFERED"] = "1"  # its "Disconnected from client" lines reach the log at once
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent
        )
    server = LlamaServer(alias, port, process, log_path, n_ctx)
    deadline = time.monotonic() + READY_TIMEOUT
    with httpx.Client(trust_env=False, timeout=2.0) as client:
        while True:
            if process.poll() is not None:
                raise LlamaSetupError(
                    f"llama_cpp.server exited with {process.returncode}: {' '.join(cmd)}\n"
                    + server.log_text()[-3000:]
                )
            with contextlib.suppress(httpx.HTTPError, ValueError):
                response = client.get(f"{server.url}/v1/models")
                ids = [m.get("id") for m in response.json().get("data", [])]
                if response.status_code == 200 and alias in ids:
                    return server
            if time.monotonic() > deadline:
                server.stop()
                raise LlamaSetupError(
                    f"llama_cpp.server did not answer /v1/models within {READY_TIMEOUT} s\n"
                    + server.log_text()[-3000:]
                )
            time.sleep(0.1)
