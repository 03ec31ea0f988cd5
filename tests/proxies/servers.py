"""Real proxy software for the proxy tests: squid, nginx and mitmproxy from Debian packages.

Each runs as a child process on a free 127.0.0.1 port with a config written to a private
directory, and is stopped by its fixture. The directory is world-accessible because squid
and nginx started as root drop to an unprivileged user for their workers and logs.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.support.net import free_port

SQUID = "/usr/sbin/squid"
NGINX = "/usr/sbin/nginx"
MITMDUMP = "/usr/bin/mitmdump"
NCSA_AUTH = "/usr/lib/squid/basic_ncsa_auth"
PROXY_USER, PROXY_PASSWORD = "alice", "s3cret-pw"
VERSIONS: dict[str, str] = {}  # reported at the end of the run


def need(path: str, package: str) -> str:
    """The binary, or a failure naming the Debian package that provides it (no skips)."""
    if not Path(path).exists():
        raise AssertionError(f"{path} is missing: apt-get install -y {package}")
    return path


def open_dir(prefix: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o777)
    return path


def wait_listening(
    port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 15.0
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"exited with {proc.returncode}:\n{_tail(log)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise AssertionError(f"nothing listens on {port}:\n{_tail(log)}") from None
            time.sleep(0.05)


def _tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return "(no log)"


@dataclass
class ProxyProcess:
    name: str
    port: int
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None
    version: str = ""
    config: str = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, args: list[str], log_name: str = "console.log") -> None:
        log = self.workdir / log_name
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        wait_listening(self.port, self.proc, log)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def log(self, name: str) -> str:
        return _tail(self.workdir / name, 1_000_000)


# -- squid ---------------------------------------------------------------------------------

SQUID_CONF = """\
# Debian's default ACLs (CONNECT only to 443; no WebSocket upgrades: squid 5 forwards no
# Upgrade header unless http_upgrade_request_protocols allows it), plus basic auth.
http_port 127.0.0.1:{port}
pid_filename {dir}/squid.pid
cache_log {dir}/cache.log
access_log stdio:{dir}/access.log
coredump_dir {dir}
cache deny all
pinger_enable off
netdb_filename none
shutdown_lifetime 0 seconds
{extra}
auth_param basic program {auth} {dir}/passwd
auth_param basic realm corporate proxy
acl authed proxy_auth REQUIRED
acl SSL_ports port 443
acl Safe_ports port 80
acl Safe_ports port 21
acl Safe_ports port 443
acl Safe_ports port 70
acl Safe_ports port 210
acl Safe_ports port 1025-65535
acl Safe_ports port 280
acl Safe_ports port 488
acl Safe_ports port 591
acl Safe_ports port 777
acl CONNECT method CONNECT
http_access deny !Safe_ports
http_access deny CONNECT !SSL_ports
http_access allow localhost authed
http_access deny all
"""


def start_squid(extra: str = "") -> ProxyProcess:
    need(SQUID, "squid")
    workdir = open_dir("squid-")
    hashed = subprocess.run(
        ["openssl", "passwd", "-apr1", PROXY_PASSWORD], capture_output=True, text=True, check=True
    ).stdout.strip()
    passwd = workdir / "passwd"
    passwd.write_text(f"{PROXY_USER}:{hashed}\n")
    passwd.chmod(0o644)
    port = free_port()
    conf = SQUID_CONF.format(port=port, dir=workdir, auth=need(NCSA_AUTH, "squid"), extra=extra)
    (workdir / "squid.conf").write_text(conf)
    squid = ProxyProcess("squid", port, workdir, config=conf)
    squid.version = subprocess.run([SQUID, "-v"], capture_output=True, text=True).stdout.split(
        "\n"
    )[0]
    VERSIONS["squid"] = squid.version
    squid.start([SQUID, "-N", "-f", str(workdir / "squid.conf")])
    return squid


def squid_url(squid: ProxyProcess, user: str = PROXY_USER, password: str = PROXY_PASSWORD) -> str:
    return f"http://{user}:{password}@127.0.0.1:{squid.port}"


# -- nginx ---------------------------------------------------------------------------------

NGINX_CONF = """\
{user}
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log info;
events {{ worker_connections 256; }}
http {{
    log_format relay '$request_method $uri $status $request_length $body_bytes_sent '
                     '$request_time $upstream_response_time';
    access_log {dir}/access.log relay;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server {{
        listen 127.0.0.1:{port};
{server}
    }}
}}
"""

# nginx's defaults: request and response buffering on, client_max_body_size 1m,
# proxy_read_timeout 60s. Only what a proxy_pass needs at all.
DEFAULT_LOCATION = """\
            proxy_pass http://127.0.0.1:{upstream};
            proxy_http_version 1.1;"""

# What docs/proxies.md recommends (as deploy/nginx/remotellm.conf does, without TLS).
RECOMMENDED_SERVER = """\
        client_max_body_size 16m;
        proxy_http_version 1.1;
        proxy_set_header Host $host;
        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        proxy_set_header X-Forwarded-Proto $scheme;
        proxy_buffering off;
        proxy_cache off;
        proxy_read_timeout 660s;
        proxy_send_timeout 660s;
        location /relay/ {{
            proxy_pass http://127.0.0.1:{upstream};
            proxy_request_buffering off;
            client_max_body_size 0;
        }}
        location / {{
            proxy_pass http://127.0.0.1:{upstream};
        }}"""


def start_nginx(
    upstream: int, location: str = DEFAULT_LOCATION, server: str | None = None
) -> ProxyProcess:
    """nginx in front of the broker: one ``location /`` (defaults), or a whole ``server``."""
    need(NGINX, "nginx-light")
    workdir = open_dir("nginx-")
    port = free_port()
    user = "user root;" if os.geteuid() == 0 else ""
    if server is None:
        server = "        location / {{\n" + location + "\n        }}"
    conf = NGINX_CONF.format(
        user=user, dir=workdir, port=port, server=server.format(upstream=upstream)
    )
    (workdir / "nginx.conf").write_text(conf)
    nginx = ProxyProcess("nginx", port, workdir, config=conf)
    nginx.version = subprocess.run([NGINX, "-v"], capture_output=True, text=True).stderr.strip()
    VERSIONS["nginx"] = nginx.version
    nginx.start(
        [
            NGINX,
            "-p",
            str(workdir),
            "-e",
            str(workdir / "error.log"),
            "-c",
            str(workdir / "nginx.conf"),
        ]
    )
    return nginx


@dataclass
class NginxHit:
    method: str
    uri: str
    status: int
    request_length: int


def nginx_hits(nginx: ProxyProcess) -> list[NginxHit]:
    hits = []
    for line in nginx.log("access.log").splitlines():
        parts = line.split()
        if len(parts) >= 4:
            hits.append(NginxHit(parts[0], parts[1], int(parts[2]), int(parts[3])))
    return hits


# -- mitmproxy -----------------------------------------------------------------------------


def start_mitmproxy(upstream_ca: Path) -> ProxyProcess:
    """mitmdump as a TLS-intercepting forward proxy with its own CA (in its confdir).

    It verifies the broker against ``upstream_ca`` as a corporate proxy verifies the
    internet, and re-signs what it shows the connector with its own CA.
    """
    need(MITMDUMP, "mitmproxy")
    workdir = open_dir("mitm-")
    port = free_port()
    args = [
        MITMDUMP,
        "--listen-host",
        "127.0.0.1",
        "--listen-port",
        str(port),
        "--set",
        f"confdir={workdir}",
        "--set",
        f"ssl_verify_upstream_trusted_ca={upstream_ca}",
        "--flow-detail",
        "1",
    ]
    mitm = ProxyProcess("mitmproxy", port, workdir, config=" ".join(args[1:]))
    version = subprocess.run([MITMDUMP, "--version"], capture_output=True, text=True).stdout
    mitm.version = version.splitlines()[0] if version else "mitmproxy"
    VERSIONS["mitmproxy"] = mitm.version
    env_home = {**os.environ, "HOME": str(workdir)}
    log = workdir / "console.log"
    with log.open("wb") as out:
        mitm.proc = subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env_home
        )
    wait_listening(port, mitm.proc, log)
    return mitm


def mitm_ca(mitm: ProxyProcess) -> Path:
    return mitm.workdir / "mitmproxy-ca-cert.pem"


# -- a self-signed certificate for the broker ----------------------------------------------


@dataclass(frozen=True)
class BrokerCert:
    certfile: Path
    keyfile: Path


def make_broker_cert(directory: Path, cn: str = "RemoteLLM test broker") -> BrokerCert:
    """A self-signed certificate for 127.0.0.1 and localhost (it is its own CA)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    certfile = directory / "broker.pem"
    keyfile = directory / "broker.key"
    certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    certfile.chmod(0o644)
    return BrokerCert(certfile, keyfile)
