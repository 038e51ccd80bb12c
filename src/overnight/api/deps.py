"""Request dependencies as named aliases: every route signature shows its tenant."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from overnight.api.edge import tenant_for_headers, tenant_from_scope
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
    """The tenant the edge middleware resolved from the API key (checked there,
    before the body is read). Open mode has one tenant; configured keys name theirs."""
    tenant = tenant_from_scope(request.scope)
    if tenant is None:  # a path the middleware treats as public
        tenant = tenant_for_headers(request.headers.raw, request.app.state.api_keys)
        if tenant is None:
            raise AuthError("Incorrect API key provided.")
    return tenant


StoreDep = Annotated[Store, Depends(_store)]
StorageDep = Annotated[Storage, Depends(_storage)]
SettingsDep = Annotated[Settings, Depends(_settings)]
SchedulerDep = Annotated[Scheduler, Depends(_scheduler)]
TenantDep = Annotated[str, Depends(_tenant)]
