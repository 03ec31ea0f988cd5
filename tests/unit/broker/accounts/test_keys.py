from __future__ import annotations

import hashlib
import os
import re
import stat
from pathlib import Path

import pytest
import yaml

from broker.accounts.keys import CREDENTIALS_FILE, KeyStore, bearer, hash_secret
from shared.errors import ConfigError


def _store(
    tmp_path: Path,
    users: list[str] | None = None,
    tokens: list[str] | None = None,
    config: Path | None = None,
) -> KeyStore:
    return KeyStore(
        static_user_keys=users or [],
        static_connector_tokens=tokens or [],
        connector_config=config,
        data_dir=tmp_path / "data",
    )


def _write(path: Path, data: object) -> None:
    """Write and make sure the change is visible even on a coarse-mtime filesystem."""
    before = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data), encoding="utf-8")
    if path.stat().st_mtime_ns <= before:
        os.utime(path, ns=(before + 1_000_000_000, before + 1_000_000_000))


def test_hash_secret_is_sha256_hex() -> None:
    assert hash_secret("sk-abc") == hashlib.sha256(b"sk-abc").hexdigest()


def test_static_keys_and_tokens(tmp_path: Path) -> None:
    ks = _store(tmp_path, users=["sk-one", "sk-two"], tokens=["ct-one"])
    one, two = ks.user("sk-one"), ks.user("sk-two")
    assert one is not None and two is not None
    assert one.id != two.id
    assert not one.blocked
    conn = ks.connector("ct-one")
    assert conn is not None
    assert conn.upstream_api_key is None
    assert ks.has_users and ks.has_connectors


@pytest.mark.parametrize("wrong", ["sk-one ", "SK-ONE", "sk-on", "sk-onee", "", "ct-one"])
def test_wrong_user_key_refused(tmp_path: Path, wrong: str) -> None:
    ks = _store(tmp_path, users=["sk-one"], tokens=["ct-one"])
    assert ks.user(wrong) is None


@pytest.mark.parametrize("wrong", ["ct-on", "ct-one\n", "sk-one", ""])
def test_wrong_connector_token_refused(tmp_path: Path, wrong: str) -> None:
    ks = _store(tmp_path, users=["sk-one"], tokens=["ct-one"])
    assert ks.connector(wrong) is None


def test_empty_store(tmp_path: Path) -> None:
    ks = _store(tmp_path)
    assert not ks.has_users
    assert not ks.has_connectors


def test_connectors_yaml_maps_token_to_key_and_name(tmp_path: Path) -> None:
    cfg = tmp_path / "connectors.yaml"
    _write(
        cfg,
        {
            "connectors": [
                {"token": "tok-gpu", "llm_api_key": "sk-llama", "name": "gpu-box"},
                {"token": "tok-bare"},
            ]
        },
    )
    ks = _store(tmp_path, config=cfg)
    gpu = ks.connector("tok-gpu")
    assert gpu is not None
    assert (gpu.name, gpu.upstream_api_key) == ("gpu-box", "sk-llama")
    bare = ks.connector("tok-bare")
    assert bare is not None
    assert (bare.name, bare.upstream_api_key) == (None, None)
    assert gpu.id != bare.id
    assert ks.connector("sk-llama") is None


@pytest.mark.parametrize(
    "content",
    [
        "connectors: {token: x}\n",
        "connectors:\n  - name: no-token\n",
        "connectors:\n  - token: 12345\n",
        "- just\n- a list\n",
        "connectors: [unclosed\n",
    ],
)
def test_bad_connectors_yaml_refused_at_start(tmp_path: Path, content: str) -> None:
    cfg = tmp_path / "connectors.yaml"
    _write(cfg, content)
    with pytest.raises(ConfigError, match=re.escape(str(cfg))):
        _store(tmp_path, config=cfg)


def test_missing_connectors_yaml_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        _store(tmp_path, config=tmp_path / "nope.yaml")


def test_empty_connectors_yaml_is_no_connectors(tmp_path: Path) -> None:
    cfg = tmp_path / "connectors.yaml"
    _write(cfg, "")
    assert not _store(tmp_path, config=cfg).has_connectors


def test_ensure_credentials_generates_and_stores_hashes_only(tmp_path: Path) -> None:
    ks = _store(tmp_path)
    creds = ks.ensure_credentials()
    assert creds.user_key is not None and creds.connector_token is not None
    assert re.fullmatch(r"sk-[0-9a-f]{32}", creds.user_key)
    assert len(creds.connector_token) >= 32
    assert creds.connector_token != creds.user_key

    path = tmp_path / "data" / CREDENTIALS_FILE
    assert ks.credentials_path == path
    text = path.read_text()
    assert creds.user_key not in text
    assert creds.user_key.removeprefix("sk-") not in text
    assert creds.connector_token not in text
    assert hash_secret(creds.user_key) in text
    assert hash_secret(creds.connector_token) in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    left = [p.name for p in path.parent.iterdir() if p.name != f".{CREDENTIALS_FILE}.lock"]
    assert left == [CREDENTIALS_FILE]  # no temp left

    assert ks.user(creds.user_key) is not None
    assert ks.connector(creds.connector_token) is not None


def test_second_store_on_same_data_dir_generates_nothing(tmp_path: Path) -> None:
    creds = _store(tmp_path).ensure_credentials()
    path = tmp_path / "data" / CREDENTIALS_FILE
    before = path.read_bytes()
    again = _store(tmp_path)
    assert creds.user_key is not None and creds.connector_token is not None
    assert again.user(creds.user_key) is not None
    assert again.connector(creds.connector_token) is not None
    assert again.ensure_credentials() == type(creds)(None, None)
    assert path.read_bytes() == before


def test_ensure_credentials_creates_only_what_is_missing(tmp_path: Path) -> None:
    ks = _store(tmp_path, users=["sk-static"])
    creds = ks.ensure_credentials()
    assert creds.user_key is None
    assert creds.connector_token is not None
    data = yaml.safe_load((tmp_path / "data" / CREDENTIALS_FILE).read_text())
    assert "users" not in data
    assert len(data["connectors"]) == 1


def test_generated_keys_differ_between_data_dirs(tmp_path: Path) -> None:
    a = _store(tmp_path / "a").ensure_credentials()
    b = _store(tmp_path / "b").ensure_credentials()
    assert a.user_key != b.user_key
    assert a.connector_token != b.connector_token


def test_reload_without_change_is_a_no_op(tmp_path: Path) -> None:
    cfg = tmp_path / "connectors.yaml"
    _write(cfg, {"connectors": [{"token": "t1"}]})
    ks = _store(tmp_path, config=cfg)
    assert ks.reload() is False
    assert ks.connector("t1") is not None


def test_reload_picks_up_changed_connectors_yaml(tmp_path: Path) -> None:
    cfg = tmp_path / "connectors.yaml"
    _write(cfg, {"connectors": [{"token": "t1", "llm_api_key": "k1"}]})
    ks = _store(tmp_path, tokens=["static"], config=cfg)
    _write(cfg, {"connectors": [{"token": "t2", "llm_api_key": "k2", "name": "new"}]})
    assert ks.reload() is True
    assert ks.connector("t1") is None
    t2 = ks.connector("t2")
    assert t2 is not None
    assert (t2.name, t2.upstream_api_key) == ("new", "k2")
    assert ks.connector("static") is not None  # static tokens survive a reload


def test_reload_picks_up_blocked_user(tmp_path: Path) -> None:
    ks = _store(tmp_path)
    creds = ks.ensure_credentials()
    assert creds.user_key is not None
    path = ks.credentials_path
    data = yaml.safe_load(path.read_text())
    data["users"][0]["blocked"] = True
    _write(path, data)
    assert ks.reload() is True
    user = ks.user(creds.user_key)
    assert user is not None
    assert user.blocked


def test_broken_yaml_on_reload_keeps_old_view(tmp_path: Path) -> None:
    cfg = tmp_path / "connectors.yaml"
    _write(cfg, {"connectors": [{"token": "t1"}]})
    ks = _store(tmp_path, config=cfg)
    _write(cfg, "connectors: [ {token: t2\n")
    assert ks.reload() is False
    assert ks.connector("t1") is not None
    assert ks.connector("t2") is None
    # Once the operator fixes the file, it is picked up.
    _write(cfg, {"connectors": [{"token": "t2"}]})
    assert ks.reload() is True
    assert ks.connector("t1") is None
    assert ks.connector("t2") is not None


def test_deleted_connectors_yaml_on_reload_keeps_old_view(tmp_path: Path) -> None:
    cfg = tmp_path / "connectors.yaml"
    _write(cfg, {"connectors": [{"token": "t1"}]})
    ks = _store(tmp_path, config=cfg)
    cfg.unlink()
    assert ks.reload() is False
    assert ks.connector("t1") is not None


def test_credentials_file_entries_are_honoured(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / CREDENTIALS_FILE).write_text(
        yaml.safe_dump(
            {
                "users": [
                    {"id": "u1", "name": "alice", "key_sha256": hash_secret("sk-alice")},
                    {"id": "u2", "key_sha256": hash_secret("sk-bob"), "blocked": True},
                    "garbage",
                ],
                "connectors": [
                    {"id": "c1", "token_sha256": hash_secret("ct-1"), "llm_api_key": "up"},
                ],
            }
        )
    )
    ks = _store(tmp_path)
    alice, bob = ks.user("sk-alice"), ks.user("sk-bob")
    assert alice is not None and bob is not None
    assert (alice.id, alice.name, alice.blocked) == ("u1", "alice", False)
    assert bob.blocked
    conn = ks.connector("ct-1")
    assert conn is not None
    assert conn.upstream_api_key == "up"


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("Bearer abc", "abc"),
        ("bearer abc", "abc"),
        ("BEARER abc", "abc"),
        ("Bearer   abc  ", "abc"),
        ("Bearer sk-0123456789abcdef", "sk-0123456789abcdef"),
        ("Bearer", None),
        ("Bearer ", None),
        ("Bearer    ", None),
        ("Basic YWxhZGRpbjpvcGVu", None),
        ("Token abc", None),
        ("abc", None),
        ("", None),
        (None, None),
    ],
)
def test_bearer(header: str | None, token: str | None) -> None:
    assert bearer(header) == token


# -- stable IDs ------------------------------------------------------------------------------

ID = re.compile(r"^[uc]-[0-9a-f]{8}$")


def _ids(ks: KeyStore, users: list[str], tokens: list[str]) -> dict[str, str]:
    found = {k: ks.user(k) for k in users} | {t: ks.connector(t) for t in tokens}
    assert all(v is not None for v in found.values())
    return {k: v.id for k, v in found.items() if v is not None}


def test_static_ids_survive_reordering(tmp_path: Path) -> None:
    users, tokens = ["sk-one", "sk-two", "sk-three"], ["ct-one", "ct-two"]
    before = _ids(_store(tmp_path, users=users, tokens=tokens), users, tokens)
    after = _ids(_store(tmp_path, users=users[::-1], tokens=tokens[::-1]), users, tokens)
    fewer = _ids(_store(tmp_path, users=users[1:], tokens=tokens[1:]), users[1:], tokens[1:])
    assert before == after
    assert fewer == {k: before[k] for k in users[1:] + tokens[1:]}
    assert len(set(before.values())) == len(before)
    assert all(ID.match(i) for i in before.values())
    assert before["sk-one"] == "u-" + hash_secret("sk-one")[:8]
    assert before["ct-one"] == "c-" + hash_secret("ct-one")[:8]


def test_ids_hold_no_secret(tmp_path: Path) -> None:
    secret = "sk-" + "ab" * 16
    ks = _store(tmp_path, users=[secret], tokens=["ct-" + "cd" * 24])
    user = ks.user(secret)
    assert user is not None
    assert secret[3:11] not in user.id and secret not in user.name


def test_connectors_yaml_ids_survive_reordering(tmp_path: Path) -> None:
    cfg = tmp_path / "connectors.yaml"
    entries = [{"token": "t1"}, {"token": "t2", "name": "gpu"}, {"token": "t3", "id": "lab"}]
    _write(cfg, {"connectors": entries})
    before = _ids(_store(tmp_path, config=cfg), [], ["t1", "t2", "t3"])
    _write(cfg, {"connectors": entries[::-1]})
    after = _ids(_store(tmp_path, config=cfg), [], ["t1", "t2", "t3"])
    assert before == after
    assert before["t3"] == "lab"
    assert before["t1"] == "c-" + hash_secret("t1")[:8]


def test_same_token_static_or_in_file_has_one_id(tmp_path: Path) -> None:
    cfg = tmp_path / "connectors.yaml"
    _write(cfg, {"connectors": [{"token": "t1"}]})
    from_file = _ids(_store(tmp_path, config=cfg), [], ["t1"])
    static = _ids(_store(tmp_path / "other", tokens=["t1"]), [], ["t1"])
    assert from_file == static


def test_duplicate_explicit_ids_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "connectors.yaml"
    _write(cfg, {"connectors": [{"token": "t1", "id": "x"}, {"token": "t2", "id": "x"}]})
    with pytest.raises(ConfigError, match="two entries have the id 'x'"):
        _store(tmp_path, config=cfg)


def test_generated_credentials_get_hash_ids(tmp_path: Path) -> None:
    ks = _store(tmp_path)
    creds = ks.ensure_credentials()
    assert creds.user_key is not None and creds.connector_token is not None
    ids = _ids(ks, [creds.user_key], [creds.connector_token])
    assert ids[creds.user_key] == "u-" + hash_secret(creds.user_key)[:8]
    assert ids[creds.connector_token] == "c-" + hash_secret(creds.connector_token)[:8]


def test_credentials_entries_without_id_get_distinct_hash_ids(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    users = [{"key_sha256": hash_secret(k)} for k in ("sk-a", "sk-b")]
    (data_dir / CREDENTIALS_FILE).write_text(yaml.safe_dump({"users": users}))
    ids = _ids(_store(tmp_path), ["sk-a", "sk-b"], [])
    assert ids == {k: "u-" + hash_secret(k)[:8] for k in ("sk-a", "sk-b")}
