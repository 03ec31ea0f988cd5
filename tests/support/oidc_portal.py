"""A broker whose key portal logs in through fake OpenID Connect providers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tests.support.fake_oidc import CLIENT_ID, CLIENT_SECRET, FakeOidc


def providers_file(folder: Path, providers: dict[str, FakeOidc], **entry: Any) -> Path:
    """``--oidc-providers-file`` naming each fake (by name), its secret in a file beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    secret = folder / "oidc-secret"
    secret.write_text(CLIENT_SECRET + "\n", encoding="utf-8")
    rows = []
    for name, fake in providers.items():
        row: dict[str, Any] = {
            "name": name,
            "label": f"{name.capitalize()} SSO",
            "issuer": fake.url,
            "client_id": CLIENT_ID,
            "client_secret_file": str(secret),
            "groups_claim": fake.groups_claim,
            "allowed_groups": ["gpu-users"],
        }
        row.update(entry)
        rows.append(row)
    path = folder / "oidc.yaml"
    path.write_text(yaml.safe_dump({"providers": rows}), encoding="utf-8")
    return path
