"""A connector's registration as the relay states take it, with test defaults."""

from __future__ import annotations

from collections.abc import Iterable

from broker.core import Registration
from shared.protocol import UploadMode


def registration(
    name: str = "c1",
    *,
    owner: str = "o",
    models: Iterable[str] = ("m",),
    capacity: int = 1,
    upload_mode: UploadMode = UploadMode.STREAM,
    upstream_api_key: str | None = None,
    instance_id: str | None = None,
) -> Registration:
    return Registration(
        owner=owner,
        name=name,
        instance_id=instance_id or "i-" + name,
        models=frozenset(models),
        capacity=capacity,
        capacity_source="--capacity",
        version="t",
        upload_mode=upload_mode,
        upstream_api_key=upstream_api_key,
    )
