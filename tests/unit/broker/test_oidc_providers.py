"""--oidc-providers-file: what a provider needs, where its secret comes from, and the
messages that say what is wrong."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from broker.oidc_providers import load_providers
from broker.settings import BrokerSettings
from shared.errors import ConfigError

GOOD = {
    "name": "keycloak",
    "issuer": "https://sso.example.org/realms/office/",
    "client_id": "remotellm",
    "client_secret_env": "KC_SECRET",
    "groups_claim": "realm_access.roles",
    "allowed_groups": ["gpu-users"],
}


def write(tmp_path: Path, *providers: dict[str, object]) -> Path:
    path = tmp_path / "oidc.yaml"
    path.write_text(yaml.safe_dump({"providers": list(providers)}), encoding="utf-8")
    return path


def test_a_provider_with_its_secret_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KC_SECRET", "s3cret")
    (provider,) = load_providers(write(tmp_path, GOOD))
    assert provider.issuer == "https://sso.example.org/realms/office"
    assert provider.client_secret == "s3cret"
    assert provider.scopes == ("openid", "email", "profile")
    assert provider.label == "keycloak"


def test_a_secret_file_and_a_public_client(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("from-file\n", encoding="utf-8")
    entry = {**GOOD, "client_secret_file": str(secret), "scopes": ["email"]}
    del entry["client_secret_env"]
    public = {**GOOD, "name": "public", "allow_any_user": True, "allowed_groups": []}
    del public["client_secret_env"]
    first, second = load_providers(write(tmp_path, entry, public))
    assert first.client_secret == "from-file" and first.scopes == ("openid", "email")
    assert second.client_secret is None and second.allowed_groups == ()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"name": "gitlab"}, "not 'gitlab'"),
        ({"name": "Bad Name"}, "lowercase letters"),
        ({"issuer": "sso.example.org"}, "http(s) URL"),
        ({"allowed_groups": []}, "allow_any_user: true"),
        ({"client_secret_file": "/nonexistent"}, "not both"),
        ({"client_secret_env": "UNSET_VARIABLE_X"}, "UNSET_VARIABLE_X is not set"),
        ({"client_secret": "inline"}, "Extra inputs"),
        ({"groups_claim": "a b"}, "dotted path"),
    ],
)
def test_every_mistake_is_named(tmp_path: Path, change: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=None) as caught:
        load_providers(write(tmp_path, {**GOOD, **change}))
    assert message in str(caught.value)
    assert str(tmp_path) in str(caught.value)


def test_two_providers_cannot_share_a_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KC_SECRET", "s")
    with pytest.raises(ConfigError, match="share a name"):
        load_providers(write(tmp_path, GOOD, GOOD))


def test_the_setting_turns_the_portal_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KC_SECRET", "s")
    settings = BrokerSettings(oidc_providers_file=write(tmp_path, GOOD))
    assert settings.portal_enabled
    assert [p.name for p in settings.oidc_providers] == ["keycloak"]
    assert not BrokerSettings().portal_enabled
