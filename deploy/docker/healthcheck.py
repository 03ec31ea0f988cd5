"""Docker HEALTHCHECK for the RemoteLLM images: exit 0 when the health port says so.

    python healthcheck.py ENV_PREFIX DEFAULT_PORT [PATH]

ENV_PREFIX is REMOTELLM_BROKER_ or REMOTELLM_; the port and host come from the same
variables the program reads (<prefix>HEALTH_PORT, <prefix>HEALTH_HOST). Standard library
only, so it runs with the image's Python and no extra package.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

WILDCARD_HOSTS = ("", "0.0.0.0", "::", "[::]")


def health_url(prefix: str, default_port: str, path: str) -> str | None:
    port = os.environ.get(f"{prefix}HEALTH_PORT", "").strip() or default_port
    if port == "0":
        return None  # health server turned off: nothing to check
    host = os.environ.get(f"{prefix}HEALTH_HOST", "").strip()
    if host in WILDCARD_HOSTS:
        host = "127.0.0.1"
    elif ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}{path}"


def main(argv: list[str]) -> int:
    if len(argv) not in (3, 4):
        print(__doc__, file=sys.stderr)
        return 2
    url = health_url(argv[1], argv[2], argv[3] if len(argv) == 4 else "/health")
    if url is None:
        print("health port is off; nothing to check")
        return 0
    try:
        with urllib.request.urlopen(url, timeout=4) as response:
            ok = response.status == 200
    except (urllib.error.URLError, OSError) as exc:
        print(f"{url}: {exc}", file=sys.stderr)
        return 1
    print(f"{url}: {'ok' if ok else 'not ok'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
