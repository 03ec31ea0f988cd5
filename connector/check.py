"""``remotellm-connector check``: a network diagnostic, one line per step.

Each step prints a verdict (``ok``, ``warn``, ``FAIL``, ``skip``), what it found and, when
something is wrong, a hint. The steps follow the connector's own path to the broker —
proxy, DNS, TCP, CONNECT tunnel, TLS, token, streamed uploads — then the local LLM. A step
that cannot run because an earlier one failed is skipped. Nothing here changes state on
the broker: the token is tried on the probe endpoint, never by registering (that would
replace a running connector's session).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from connector import tls
from connector.broker_client import BrokerClient
from connector.errors import BrokerRejected, BrokerUnavailable, CertificateError, SessionLost
from connector.proxy import ProxyChoice, TunnelError, choose_proxy, open_tunnel
from connector.settings import ConnectorSettings
from connector.upstream import Upstream, UpstreamError
from shared.protocol import UploadMode

Verdict = Literal["ok", "warn", "fail", "skip"]
_SHOWN = {"ok": "ok", "warn": "warn", "fail": "FAIL", "skip": "skip"}
STEP_TIMEOUT = 10.0


@dataclass(frozen=True)
class Step:
    name: str
    verdict: Verdict
    detail: str
    hint: str = ""

    def line(self) -> str:
        text = f"{_SHOWN[self.verdict]:<4}  {self.name:<7} {self.detail}"
        return f"{text} -- hint: {self.hint}" if self.hint else text


class Checker:
    def __init__(
        self,
        settings: ConnectorSettings,
        out: Callable[[str], None] = print,
        timeout: float = STEP_TIMEOUT,
    ) -> None:
        self.settings = settings
        self.out = out
        self.timeout = timeout
        self.steps: list[Step] = []
        url = urlsplit(settings.broker_url)
        self.https = url.scheme == "https"
        self.host = url.hostname or ""
        self.port = url.port or (443 if self.https else 80)
        self.proxy: ProxyChoice = choose_proxy(settings.broker_url, settings.proxy)

    @property
    def failed(self) -> bool:
        return any(step.verdict == "fail" for step in self.steps)

    def _add(self, step: Step) -> Step:
        self.steps.append(step)
        self.out(step.line())
        return step

    async def _run(self, name: str, step: Callable[[], Awaitable[Step]]) -> Step:
        """One step; a bug or a surprise in it is reported as its failure, not a traceback."""
        try:
            return self._add(await step())
        except Exception as exc:
            return self._add(Step(name, "fail", f"unexpected error: {exc!r}"))

    async def run(self) -> bool:
        """Run every step; True when none failed."""
        s = self.settings
        self.out(f"remotellm-connector check: broker {s.broker_url}, local LLM {s.llm_url}")
        self._add(self._proxy_step())
        trust = self._add(self._trust_step())
        reachable = trust.verdict != "fail"
        steps = (
            ("dns", self._dns),
            ("tcp", self._tcp),
            ("tunnel", self._tunnel),
            ("tls", self._tls),
        )
        for name, step in steps:
            if not reachable:
                break
            reachable = (await self._run(name, step)).verdict != "fail"
        if reachable:
            token = await self._run("token", self._token)
            if token.verdict == "ok":
                await self._run("upload", self._upload)
            else:
                self._add(Step("upload", "skip", "not tried: the token step failed"))
        else:
            self._add(Step("token", "skip", "not tried: the broker is not reachable"))
            self._add(Step("upload", "skip", "not tried: the broker is not reachable"))
        await self._run("llm", self._llm)
        problems = sum(step.verdict == "fail" for step in self.steps)
        self.out("all checks passed" if not problems else f"{problems} check(s) failed")
        return not problems

    # -- steps ----------------------------------------------------------------------------

    def _proxy_step(self) -> Step:
        p = self.proxy
        if p.url is None:
            why = "NO_PROXY matches the broker" if p.source == "NO_PROXY" else "no proxy set"
            return Step("proxy", "ok", f"direct connection ({why})")
        scheme = urlsplit(p.url).scheme
        if scheme not in ("http", "https"):
            return Step(
                "proxy",
                "fail",
                f"{p.shown} (from {p.source}) is a {scheme}:// proxy",
                "the connector speaks to http:// proxies (CONNECT for https:// brokers)",
            )
        return Step("proxy", "ok", f"{p.shown} (from {p.source})")

    def _trust_step(self) -> Step:
        if not self.https:
            local = self.host in ("127.0.0.1", "localhost", "::1")
            if local:
                return Step("trust", "ok", "plain http:// to this machine: no TLS involved")
            return Step(
                "trust",
                "warn",
                "plain http:// broker URL: the token and all traffic cross the network unencrypted",
                "serve the broker over https:// (--certfile/--keyfile or a reverse proxy)",
            )
        try:
            trust = tls.trust_for(self.settings)
        except (OSError, ssl.SSLError) as exc:
            return Step(
                "trust",
                "fail",
                f"cannot load the CA bundle: {exc}",
                "--ca-bundle (or SSL_CERT_FILE) must name a readable PEM file",
            )
        if trust.context is None:
            return Step(
                "trust",
                "warn",
                "--insecure: the broker's certificate is NOT verified",
                "anyone on the path can read and change the traffic; use --ca-bundle instead",
            )
        return Step("trust", "ok", f"verifying the broker's certificate with {trust.source}")

    def _target(self) -> tuple[str, int, str]:
        """Where the first TCP connection goes: the proxy, or the broker itself."""
        if self.proxy.url is not None:
            proxy = urlsplit(self.proxy.url)
            default = 443 if proxy.scheme == "https" else 80
            return proxy.hostname or "", proxy.port or default, "proxy"
        return self.host, self.port, "broker"

    async def _dns(self) -> Step:
        host, port, what = self._target()
        loop = asyncio.get_running_loop()
        try:
            infos = await asyncio.wait_for(
                loop.getaddrinfo(host, port, type=0, proto=0), self.timeout
            )
        except (OSError, TimeoutError) as exc:
            hint = "check the host name"
            if what == "broker":
                hint += (
                    " in --broker-url, or your DNS; a network that reaches the internet only "
                    "through a proxy needs HTTPS_PROXY or --proxy"
                )
            else:
                hint += " of the proxy (--proxy / HTTPS_PROXY)"
            return Step("dns", "fail", f"cannot resolve the {what} {host}: {exc}", hint)
        addresses = sorted({str(info[4][0]) for info in infos})
        note = " (the proxy resolves the broker's name)" if what == "proxy" else ""
        return Step("dns", "ok", f"{host} -> {', '.join(addresses[:3])}{note}")

    async def _tcp(self) -> Step:
        host, port, what = self._target()
        started = time.perf_counter()
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), self.timeout)
        except TimeoutError:
            return Step(
                "tcp",
                "fail",
                f"no answer from the {what} at {host}:{port} within {self.timeout:g} s",
                "a firewall drops the traffic; on a corporate network set HTTPS_PROXY or --proxy",
            )
        except OSError as exc:
            return Step(
                "tcp",
                "fail",
                f"cannot connect to the {what} at {host}:{port}: {exc.strerror or exc}",
                f"is the {what} running and is the port right?",
            )
        writer.close()
        elapsed = (time.perf_counter() - started) * 1000.0
        return Step("tcp", "ok", f"connected to the {what} at {host}:{port} in {elapsed:.0f} ms")

    async def _tunnel(self) -> Step:
        if self.proxy.url is None:
            return Step("tunnel", "skip", "no proxy: direct connection")
        if not self.https:
            return Step("tunnel", "skip", "plain http:// broker: the proxy forwards each request")
        try:
            _, writer = await open_tunnel(self.proxy.url, self.host, self.port, self.timeout)
        except TunnelError as exc:
            return Step("tunnel", "fail", str(exc), _tunnel_hint(exc.status, self.port))
        except (OSError, TimeoutError) as exc:
            return Step("tunnel", "fail", f"CONNECT through the proxy failed: {exc!r}")
        writer.close()
        return Step("tunnel", "ok", f"the proxy opened a tunnel to {self.host}:{self.port}")

    async def _tls(self) -> Step:
        if not self.https:
            return Step("tls", "skip", "plain http:// broker URL")
        trust = tls.trust_for(self.settings)
        ctx = trust.context or tls.unverified_context()
        try:
            _, writer = await tls.open_broker_stream(
                self.settings.broker_url, self.proxy.url, ctx, self.timeout
            )
        except ssl.SSLCertVerificationError as exc:
            info = await tls.inspect_certificate(self.settings.broker_url, self.proxy.url)
            issuer = f"; issuer: {info.issuer}" if info else ""
            subject = f"; certificate for {info.subject}" if info else ""
            return Step(
                "tls",
                "fail",
                f"certificate verification failed: {exc.verify_message}{subject}{issuer}",
                tls.hint(exc, info),
            )
        except (ssl.SSLError, OSError, TimeoutError) as exc:
            return Step(
                "tls",
                "fail",
                f"TLS handshake failed: {exc!r}",
                "is the broker really serving https:// on that port?",
            )
        try:
            ssl_object = writer.get_extra_info("ssl_object")
            der = ssl_object.getpeercert(binary_form=True) if ssl_object else None
            version = ssl_object.version() if ssl_object else "?"
        finally:
            writer.close()
        if not der:
            return Step("tls", "ok", f"{version} handshake done")
        info = tls.cert_info(der)
        verified = "verified" if trust.context is not None else "NOT verified"
        return Step(
            "tls",
            "ok" if trust.context is not None else "warn",
            f"{version}, certificate for {info.subject} issued by {info.issuer} ({verified})",
        )

    async def _token(self) -> Step:
        if self.settings.broker_token is None:
            return Step(
                "token",
                "fail",
                f"no connector token (none given, none in {self.settings.credentials_path})",
                "set REMOTELLM_BROKER_TOKEN or --broker-token-file, or ask to join with "
                "`remotellm-connector enroll` (docs/enrollment.md)",
            )
        client = BrokerClient(self.settings)
        try:
            await client.probe(pieces=1, gap=0.0)
        except CertificateError as exc:
            return Step("token", "fail", str(exc))
        except BrokerRejected as exc:
            return Step("token", "fail", f"refused: {exc}", _http_hint(str(exc)))
        except SessionLost as exc:
            return Step(
                "token",
                "fail",
                f"the broker URL answered 404 ({exc})",
                "--broker-url must be the broker's base URL (e.g. https://llm.example.com)",
            )
        except BrokerUnavailable as exc:
            return Step("token", "fail", str(exc), _http_hint(str(exc)))
        finally:
            await client.aclose()
        return Step("token", "ok", "the broker accepted the connector token")

    async def _upload(self) -> Step:
        client = BrokerClient(self.settings)
        try:
            result = await client.probe()
        except (BrokerUnavailable, BrokerRejected, SessionLost) as exc:
            return Step("upload", "fail", f"the upload probe failed: {exc}", _http_hint(str(exc)))
        finally:
            await client.aclose()
        how = f"{result.chunks} piece(s) spread over {result.spread_ms:.0f} ms"
        forced = self.settings.upload_mode
        if result.incremental:
            mode = forced.value
            if forced is UploadMode.AUTO:
                mode = "mux (one long-lived upload; stream where the broker does not offer it)"
            return Step(
                "upload", "ok", f"streamed uploads arrive incrementally ({how}); mode: {mode}"
            )
        if forced in (UploadMode.STREAM, UploadMode.MUX):
            return Step(
                "upload",
                "fail",
                f"something on the path buffers request bodies ({how}) but --upload-mode "
                f"{forced.value} is set: answers would reach users only when complete",
                "use --upload-mode auto (the default) or parts",
            )
        return Step(
            "upload",
            "ok",
            f"something on the path buffers request bodies ({how}): parts mode "
            "(small POSTs) is used",
        )

    async def _llm(self) -> Step:
        upstream = Upstream(self.settings)
        try:
            models = await upstream.models(timeout=self.timeout)
        except UpstreamError as exc:
            return Step(
                "llm",
                "fail",
                f"cannot list models at {self.settings.llm_url}/v1/models: {exc}",
                "is the LLM server (Ollama, llama.cpp, vLLM, LM Studio) running? Set --llm-url "
                "to its base URL",
            )
        finally:
            await upstream.aclose()
        if not models:
            return Step(
                "llm", "warn", f"{self.settings.llm_url} lists no models", "load a model first"
            )
        shown = ", ".join(models[:8]) + (" …" if len(models) > 8 else "")
        missing = [m for m in self.settings.models if m not in models]
        if missing:
            return Step(
                "llm",
                "warn",
                f"{len(models)} model(s): {shown}; not listed: {', '.join(missing)}",
                "--model names must match the LLM's model IDs",
            )
        return Step("llm", "ok", f"{self.settings.llm_url} serves {len(models)} model(s): {shown}")


def _tunnel_hint(status: int, port: int) -> str:
    if status == 407:
        return "the proxy wants credentials: --proxy http://USER:PASS@HOST:PORT (or in HTTPS_PROXY)"
    if status == 403 and port != 443:
        return (
            f"the proxy refuses tunnels to port {port}; most allow only 443: serve the broker "
            "(or its reverse proxy) on port 443"
        )
    if status == 403:
        return "the proxy's policy blocks this host: ask for the broker's host to be allowed"
    return "the proxy could not open the tunnel: check --proxy / HTTPS_PROXY"


def _http_hint(text: str) -> str:
    if "HTTP 401" in text:
        return (
            "the broker does not know this token: check REMOTELLM_BROKER_TOKEN, "
            "--broker-token-file or --broker-token"
        )
    if "HTTP 407" in text:
        return "the proxy wants credentials: --proxy http://USER:PASS@HOST:PORT"
    if "HTTP 403" in text:
        return "refused (by the broker or a proxy on the way): check the token and proxy policy"
    if "HTTP 413" in text:
        return "a proxy limits request bodies: use --upload-mode parts"
    if any(f"HTTP {s}" in text for s in (502, 503, 504)):
        return "a proxy on the way could not reach the broker, or the broker is down"
    if "ConnectError" in text or "ConnectTimeout" in text:
        return "the broker is not reachable from here: see the steps above"
    return ""


async def run_check(settings: ConnectorSettings, out: Callable[[str], None] = print) -> bool:
    return await Checker(settings, out).run()
