"""Request dependencies as named aliases: every route signature shows its tenant."""

from __future__ import annotations

import hashlib
from typing import Annotated

from fastapi import Depends, Request

from overnight.config import Settings
from overnight.errors import OvernightError
from overnight.scheduler.loop import Scheduler
from overnight.storage.base import Storage
from overnight.store.base import Store

__all__ = ["SchedulerDep", "SettingsDep", "StorageDep", "StoreDep", "TenantDep", "AuthError"]


class AuthError(OvernightError):
    code = "invalid_api_key"


def _store(request: Request) -> Store:
    return request.app.state.store


def _storage(request: Request) -> Storage:
    return request.app.state.storage


def _settings(request: Request) -> Settings:
    return request.app.state.settings


def _scheduler(request: Request) -> Scheduler:
    return request.app.state.scheduler


def _tenant(request: Request) -> str:
    """With configured API keys, the key names the tenant; in open mode each distinct
    key is its own tenant (and no key is the ``anonymous`` tenant)."""
    auth = request.headers.get("authorization", "")
    key = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
    keys: dict[str, str] = request.app.state.api_keys
    if keys:
        if key not in keys:
            raise AuthError("Incorrect API key provided.")
        return keys[key]
    if not key:
        return "anonymous"
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:16]


StoreDep = Annotated[Store, Depends(_store)]
StorageDep = Annotated[Storage, Depends(_storage)]
SettingsDep = Annotated[Settings, Depends(_settings)]
SchedulerDep = Annotated[Scheduler, Depends(_scheduler)]
TenantDep = Annotated[str, Depends(_tenant)]
