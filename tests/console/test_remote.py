"""``RemoteBatches`` against a stand-in batches service (the SDK's HTTP client with a
handler for a transport): what each answer becomes, what is sent, and which key.
The real service is in ``test_console_process.py``."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

import openai
import pytest

from overnight.batches.service import BatchCreate, batch_id_for_job
from overnight.config import Settings, parse_tenant_keys
from overnight.console.planner import BatchesUnavailable
from overnight.console.remote import OPEN_KEY, RemoteBatches, check_mds_keys, mds_base_url
from overnight.errors import ConflictError, InvalidRequestError, NotFoundError

#: The HTTP library the installed SDK is built on (httpx, or its successor), for its MockTransport.
HTTP = sys.modules[openai.DefaultAsyncHttpxClient.__mro__[1].__module__.split(".")[0]]

URL = "http://mds.test:8000"


def batch_json(batch_id: str, **extra: Any) -> dict[str, Any]:
    return {"id": batch_id, "object": "batch", "endpoint": "/v1/chat/completions", "input_file_id": "file-1",
            "completion_window": "24h", "status": "in_progress", "created_at": 100, "in_progress_at": 101,
            "request_counts": {"total": 10, "completed": 4, "failed": 1}, "metadata": {"overnight_job_id": "job_1"},
            **extra}


class StandIn:
    """Answers each request with ``handler(request) -> (status, json)`` and keeps what it got."""

    def __init__(self, handler: Callable[[Any], tuple[int, Any]]) -> None:
        self.handler = handler
        self.requests: list[Any] = []

    def __call__(self, request: Any) -> Any:
        self.requests.append(request)
        status, body = self.handler(request)
        return HTTP.Response(status, json=body)

    def gateway(self, keys: dict[str, str] | None = None) -> RemoteBatches:
        return RemoteBatches(URL, keys=keys if keys is not None else {"alice": "ka"}, max_retries=0,
                             http_client=openai.DefaultAsyncHttpxClient(transport=HTTP.MockTransport(self)))


def err(status: int, message: str, **fields: Any) -> tuple[int, Any]:
    return status, {"error": {"message": message, "type": "invalid_request_error", **fields}}


BODY = BatchCreate(input_file_id="file-1", endpoint="/v1/chat/completions", completion_window="24h",
                   metadata={"overnight_job_id": "job_1"}, extension={"priority": 3, "runtime": {"endpoint": "http://e"}})


async def test_create_sends_the_extension_with_the_job_id_as_the_tenant_and_maps_the_batch() -> None:
    want = batch_id_for_job("alice", "job_1")
    s = StandIn(lambda r: (200, batch_json(want, finalizing_at=105, usage={"input_tokens": 3, "output_tokens": 4,
                                                                            "total_tokens": 7},
                                           errors={"object": "list", "data": [{"code": "x", "message": "m"}]})))
    gw = s.gateway()
    view = await gw.create(tenant="alice", job_id="job_1", body=BODY)
    await gw.aclose()
    [req] = s.requests
    assert str(req.url) == URL + "/v1/batches" and req.headers["authorization"] == "Bearer ka"
    sent = json.loads(req.content)
    assert sent["overnight"] == {"priority": 3, "runtime": {"endpoint": "http://e"}, "job_id": "job_1"}
    assert sent["metadata"] == {"overnight_job_id": "job_1"} and sent["input_file_id"] == "file-1"
    assert (view.id, view.status, view.total, view.completed, view.failed) == (want, "in_progress", 10, 4, 1)
    assert (view.in_progress_at, view.finalizing_at, view.cancelling_at) == (101, 105, None)
    assert view.usage == {"input_tokens": 3, "output_tokens": 4, "total_tokens": 7}
    assert view.errors == [{"code": "x", "message": "m"}]


async def test_a_batch_filed_under_another_tenant_is_taken_back_and_the_create_fails() -> None:
    other = batch_id_for_job("bob", "job_1")
    s = StandIn(lambda r: (200, batch_json(other, status="cancelling" if r.url.path.endswith("/cancel")
                                           else "validating")))
    gw = s.gateway()
    with pytest.raises(ConflictError, match="another tenant than 'alice'") as e:
        await gw.create(tenant="alice", job_id="job_1", body=BODY)
    await gw.aclose()
    assert e.value.code == "tenant_mismatch" and "OVERNIGHT_CONSOLE_MDS_KEYS" in e.value.message
    assert [(r.method, r.url.path) for r in s.requests] == [("POST", "/v1/batches"),
                                                          ("POST", f"/v1/batches/{other}/cancel")]


@pytest.mark.parametrize(("answer", "error", "text"), [
    (err(404, "No such Batch object: b"), NotFoundError, "No such Batch object: b"),
    (err(400, "bad window", param="completion_window", code="invalid"), InvalidRequestError, "bad window"),
    (err(409, "already completed", code="invalid_state"), ConflictError, "already completed"),
    (err(500, "store down"), BatchesUnavailable, "answered 500: store down"),
    (err(503, "draining"), BatchesUnavailable, "answered 503"),
    (err(429, "slow down"), BatchesUnavailable, "answered 429"),
    (err(401, "Incorrect API key provided."), BatchesUnavailable, "refused the console's key for tenant 'alice'"),
    (err(403, "no"), BatchesUnavailable, "OVERNIGHT_CONSOLE_MDS_KEYS"),
])
async def test_each_answer_becomes_overnights_own_error(answer: tuple[int, Any], error: type, text: str) -> None:
    gw = StandIn(lambda r: answer).gateway()
    with pytest.raises(error, match=text) as e:
        await gw.get(tenant="alice", batch_id="b")
    await gw.aclose()
    if isinstance(e.value, InvalidRequestError):
        assert e.value.param == "completion_window" and e.value.code == "invalid"


async def test_find_is_none_on_404_and_the_batch_otherwise() -> None:
    want = batch_id_for_job("alice", "job_1")
    s = StandIn(lambda r: (200, batch_json(want)) if r.url.path.endswith(want) else err(404, "No such Batch"))
    gw = s.gateway()
    assert (await gw.find(tenant="alice", job_id="job_1")).id == want
    assert await gw.find(tenant="alice", job_id="job_2") is None
    await gw.aclose()


async def test_unreachable_is_unavailable_naming_the_service() -> None:
    def refuse(request: Any) -> Any:
        raise HTTP.ConnectError("connection refused", request=request)

    gw = RemoteBatches(URL, keys={}, max_retries=0,
                       http_client=openai.DefaultAsyncHttpxClient(transport=HTTP.MockTransport(refuse)))
    with pytest.raises(BatchesUnavailable, match=f"the metadata service at {URL} is unreachable"):
        await gw.cancel(tenant="anonymous", batch_id="b")
    await gw.aclose()


async def test_each_tenant_uses_its_own_key_and_the_open_tenant_any() -> None:
    s = StandIn(lambda r: (200, {"id": "file-1", "object": "file", "bytes": 1, "created_at": 1, "filename": "x",
                                 "purpose": "batch"}))
    gw = s.gateway({"alice": "ka", "bob": "kb"})
    for tenant in ("alice", "bob", "anonymous"):
        assert await gw.input_file(tenant=tenant, file_id="file-1") == "batch"
    with pytest.raises(BatchesUnavailable, match="no key for tenant 'carol'"):
        gw.client("carol")
    await gw.aclose()
    assert [r.headers["authorization"] for r in s.requests] == ["Bearer ka", "Bearer kb", f"Bearer {OPEN_KEY}"]


async def test_a_missing_input_file_is_a_404_naming_it() -> None:
    gw = StandIn(lambda r: err(404, "No such File object: file-x")).gateway()
    with pytest.raises(NotFoundError, match="No such File object: file-nope") as e:
        await gw.input_file(tenant="alice", file_id="file-nope")
    await gw.aclose()
    assert e.value.code == "file_not_found"


def test_keys_and_urls() -> None:
    assert parse_tenant_keys(" alice:k1 , bob:k:2,") == {"alice": "k1", "bob": "k:2"}
    for bad, why in (("alice", "item 1 is not tenant:key"), ("a:k,:k2", "item 2"), ("a:k,a:j", "tenant 'a' twice")):
        with pytest.raises(ValueError, match=why):
            parse_tenant_keys(bad)
    check_mds_keys({"ka": "alice"}, {"alice": "x", "zed": "y"})
    with pytest.raises(ValueError, match="no key for tenant 'bob'"):
        check_mds_keys({"ka": "alice", "kb": "bob"}, {"alice": "x"})
    assert mds_base_url("http://h:1/") == "http://h:1/v1" == mds_base_url("http://h:1/v1/")
    assert Settings(metadata_service_url="http://h:1/").metadata_service_url == "http://h:1"
    with pytest.raises(ValueError, match="http"):
        Settings(metadata_service_url="h:1")
