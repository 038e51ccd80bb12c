"""The batches service ("MDS", an ``overnight serve``) seen from ``overnight console``
running as its own process: only through its OpenAI-compatible API, with the
official ``openai`` SDK.

``RemoteBatches`` is the planner's gateway (create, find, get, cancel; see
``InProcessBatches`` in ``planner.py``) and what the console's file proxy and its
job-create check call (files live at MDS).

Credentials. The console acts at MDS for each of its tenants with a key of that
tenant at MDS, from ``OVERNIGHT_CONSOLE_MDS_KEYS`` (``tenant:key,...``): the same
key for a user's request (upload, download, the input check) as for the planner's
background calls, so a job's file and its batch are always the same MDS tenant,
and the console never stores or forwards its users' own keys. In open mode (no
``OVERNIGHT_API_KEYS``) the one tenant may have a key there too; without one any
key is sent (an open MDS accepts it). A keyed console refuses to start while one
of its tenants has no MDS key (``check_mds_keys``).

That MDS files the batch under the job's tenant is checked on every create: the
batch id MDS derives from ``extra_body.overnight.job_id`` is a hash of its tenant
and the job id, so another tenant gives another id; such a batch is cancelled and
the create fails naming the setting to fix.

Errors. A 404 is ``NotFoundError``, other 4xx are the matching overnight errors.
No answer, a timeout, 429, a 5xx or a refused key (401/403) is
``BatchesUnavailable``: the planner tries again later, an HTTP caller gets 503.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import IO, Any

from overnight.api.edge import OPEN_TENANT
from overnight.batches.service import BatchCreate, batch_id_for_job
from overnight.console.planner import BatchesUnavailable, BatchView
from overnight.errors import ConflictError, InvalidRequestError, NotFoundError, OvernightError

__all__ = ["OPEN_KEY", "RemoteBatches", "check_mds_keys", "mds_base_url"]

log = logging.getLogger("overnight.console")

#: Sent for the open tenant when no MDS key is configured (an open MDS takes any key).
OPEN_KEY = "overnight-console"


def check_mds_keys(console_keys: dict[str, str], mds_keys: dict[str, str]) -> None:
    """Every tenant of the console's ``OVERNIGHT_API_KEYS`` needs a key at MDS."""
    missing = sorted(set(console_keys.values()) - set(mds_keys))
    if missing:
        raise ValueError(
            f"OVERNIGHT_CONSOLE_MDS_KEYS has no key for tenant {', '.join(map(repr, missing))} of OVERNIGHT_API_KEYS: "
            "the console acts at the metadata service with a key of the same tenant (tenant:key,...)")


def mds_base_url(url: str) -> str:
    """The SDK's base URL: ``http://host:port`` or ``.../v1``, always ending in ``/v1``."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


def _error_body(exc: Any) -> dict[str, Any]:
    body = getattr(exc, "body", None)
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        body = body["error"]
    return body if isinstance(body, dict) else {}


class RemoteBatches:
    """The planner's batches gateway, and the file calls, over MDS's API."""

    def __init__(self, url: str, *, keys: dict[str, str], timeout_s: float = 60.0, max_retries: int = 2,
                 http_client: Any = None) -> None:
        """``max_retries``: the SDK's own, for calls that may be repeated (all but the
        upload; a repeated create returns the same batch). ``http_client``: the SDK's
        HTTP client to use (tests hand one with a stand-in transport)."""
        import openai  # the [client] extra; ``overnight console`` says so when it is missing

        self._openai = openai
        self.url = url.rstrip("/")
        self.keys = keys
        self._base = openai.AsyncOpenAI(base_url=mds_base_url(url), api_key=OPEN_KEY, timeout=timeout_s,
                                        max_retries=max_retries, http_client=http_client)
        self._clients: dict[str, Any] = {}

    async def aclose(self) -> None:
        await self._base.close()  # the per-tenant copies share its connection pool

    def client(self, tenant: str) -> Any:
        """The SDK client acting for ``tenant`` at MDS (one pool for all tenants)."""
        c = self._clients.get(tenant)
        if c is None:
            key = self.keys.get(tenant)
            if key is None:
                if tenant != OPEN_TENANT:
                    # check_mds_keys ran at start; a tenant without a key cannot reach here
                    raise BatchesUnavailable(f"no key for tenant {tenant!r} at the metadata service "
                                             "(OVERNIGHT_CONSOLE_MDS_KEYS)")
                key = OPEN_KEY
            c = self._clients[tenant] = self._base.with_options(api_key=key)
        return c

    def _error(self, exc: Exception, tenant: str) -> OvernightError:
        """The SDK's exception as overnight's own."""
        o = self._openai
        where = f"the metadata service at {self.url}"
        if isinstance(exc, o.APIConnectionError):  # also APITimeoutError
            return BatchesUnavailable(f"{where} is unreachable ({exc.message or type(exc).__name__})")
        if not isinstance(exc, o.APIStatusError):
            return BatchesUnavailable(f"{where} answered unexpectedly: {exc}")
        status = exc.status_code
        body = _error_body(exc)
        message = str(body.get("message") or exc.message)
        code, param = body.get("code"), body.get("param")
        if status in (401, 403):
            return BatchesUnavailable(f"{where} refused the console's key for tenant {tenant!r} ({status}: "
                                      f"{message}); check OVERNIGHT_CONSOLE_MDS_KEYS")
        if status == 429 or status >= 500:
            return BatchesUnavailable(f"{where} answered {status}: {message}")
        if status == 404:
            return NotFoundError(message, code=code)
        if status == 409:
            return ConflictError(message, code=code)
        return InvalidRequestError(message, param=param, code=code)

    # -- the planner's gateway -------------------------------------------------------------------
    async def create(self, *, tenant: str, job_id: str, body: BatchCreate) -> BatchView:
        """Create the job's batch (a repeat returns the same one: MDS names it by the job id)."""
        ext = {**(body.extension or {}), "job_id": job_id}
        extra: dict[str, Any] = {}
        if body.output_expires_after is not None:
            extra["output_expires_after"] = body.output_expires_after
        c = self.client(tenant)
        try:
            b = await c.batches.create(
                input_file_id=body.input_file_id, endpoint=body.endpoint, completion_window=body.completion_window,
                metadata=body.metadata, extra_body={"overnight": ext}, **extra)
        except Exception as exc:
            raise self._error(exc, tenant) from None
        expected = batch_id_for_job(tenant, job_id)
        if b.id != expected:
            # MDS filed it under another tenant than the job's: useless to the job, and
            # invisible to the job's tenant there. Take it back, and say what to fix.
            try:
                await c.batches.cancel(b.id)
            except Exception as exc:  # it stays a batch of the key's tenant at MDS
                log.warning("batch %s of job %s (another tenant's at MDS): cancel failed: %s", b.id, job_id, exc)
            raise ConflictError(
                f"the metadata service filed the batch under another tenant than {tenant!r} (batch {b.id}, "
                f"cancelled): OVERNIGHT_CONSOLE_MDS_KEYS must give tenant {tenant!r} a key that the metadata "
                f"service's OVERNIGHT_API_KEYS maps to {tenant!r}", code="tenant_mismatch")
        return self._view(b)

    async def find(self, *, tenant: str, job_id: str) -> BatchView | None:
        try:
            return await self.get(tenant=tenant, batch_id=batch_id_for_job(tenant, job_id))
        except NotFoundError:
            return None

    async def get(self, *, tenant: str, batch_id: str) -> BatchView:
        try:
            return self._view(await self.client(tenant).batches.retrieve(batch_id))
        except Exception as exc:
            raise self._error(exc, tenant) from None

    async def cancel(self, *, tenant: str, batch_id: str) -> BatchView:
        try:
            return self._view(await self.client(tenant).batches.cancel(batch_id))
        except Exception as exc:
            raise self._error(exc, tenant) from None

    @staticmethod
    def _view(b: Any) -> BatchView:
        rc = b.request_counts
        usage = b.usage.model_dump(exclude_unset=True) if getattr(b, "usage", None) is not None else None
        errors = None
        if b.errors is not None and b.errors.data:
            errors = [e.model_dump(exclude_none=True) for e in b.errors.data]
        return BatchView(
            id=b.id, status=b.status, total=rc.total if rc else 0, completed=rc.completed if rc else 0,
            failed=rc.failed if rc else 0, usage=usage or None, output_file_id=b.output_file_id,
            error_file_id=b.error_file_id, errors=errors, in_progress_at=b.in_progress_at,
            finalizing_at=b.finalizing_at, cancelling_at=b.cancelling_at,
        )

    # -- files (they live at MDS) ---------------------------------------------------------------
    async def input_file(self, *, tenant: str, file_id: str) -> str:
        """The purpose of the tenant's file at MDS; a 404 names it."""
        try:
            f = await self.client(tenant).files.retrieve(file_id)
        except Exception as exc:
            err = self._error(exc, tenant)
            if isinstance(err, NotFoundError):
                raise NotFoundError(f"No such File object: {file_id}", code="file_not_found") from None
            raise err from None
        return str(f.purpose)

    async def upload(self, *, tenant: str, filename: str, file: IO[bytes], purpose: str,
                     expires_after: dict[str, Any] | None = None) -> dict[str, Any]:
        """Upload to MDS as the tenant; the file object as MDS wrote it. Not retried
        by the SDK: the stream is read once."""
        extra: dict[str, Any] = {"expires_after": expires_after} if expires_after else {}
        try:
            f = await self.client(tenant).with_options(max_retries=0).files.create(
                file=(filename, file), purpose=purpose, **extra)
        except Exception as exc:
            raise self._error(exc, tenant) from None
        return f.model_dump(exclude_unset=True)

    async def content(self, *, tenant: str, file_id: str) -> tuple[dict[str, str], AsyncIterator[bytes]]:
        """The file's bytes from MDS as they arrive, and the headers to answer with."""
        ctx = self.client(tenant).files.with_streaming_response.content(file_id)
        try:
            resp = await ctx.__aenter__()
        except Exception as exc:
            raise self._error(exc, tenant) from None
        headers = {k: resp.headers[k] for k in ("content-length", "content-disposition", "content-type")
                   if k in resp.headers}

        async def chunks() -> AsyncIterator[bytes]:
            try:
                async for chunk in resp.iter_bytes():
                    yield chunk
            finally:
                await ctx.__aexit__(None, None, None)

        return headers, chunks()
