"""Tenant-named engines: which endpoints are allowed (SSRF), header-safe API keys,
API keys sealed at rest, and extension fields in range. In process, with a raw
socket engine that records every byte it receives."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import orjson
import pytest
from cryptography.fernet import Fernet

from overnight.api.app import create_app
from overnight.config import Settings
from tests.factories import fake_dns

FAST = dict(checkpoint_interval_s=0.05, heartbeat_s=0.2, scheduler_poll_s=0.05, backoff_base_s=0.01, backoff_max_s=0.05)
LINE = {"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": "m", "messages": [{"role": "user", "content": "hi"}]}}


class RawEngine:
    """An HTTP/1.1 engine on a bare socket: answers every request with a chat completion
    and keeps every byte it received, so a smuggled request would show up here."""

    def __init__(self) -> None:
        self.received = b""
        self.server: asyncio.base_events.Server | None = None

    async def __aenter__(self) -> RawEngine:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                body = await reader.readexactly(length)
                self.received += head + body
                answer = orjson.dumps({"object": "chat.completion", "usage": {"prompt_tokens": 1, "completion_tokens": 2}})
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%b"
                             % (len(answer), answer))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()


async def _app(tmp_path: Path, **settings):
    app = create_app(Settings(data_dir=tmp_path, engine_url="http://127.0.0.1:9", **FAST, **settings))
    return app


def _client(app, key: str = "key-a") -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test",
                             headers={"Authorization": f"Bearer {key}"})


async def _create(c: httpx.AsyncClient, ext: dict, key: str = "overnight") -> httpx.Response:
    f = (await c.post("/v1/files", files={"file": ("in.jsonl", orjson.dumps(LINE) + b"\n")},
                      data={"purpose": "batch"})).json()
    return await c.post("/v1/batches", json={"input_file_id": f["id"], "endpoint": "/v1/chat/completions",
                                             "completion_window": "24h", key: ext})


async def _completed(app, ext: dict) -> str:
    """Create a batch with ``ext`` and wait until it completes; its id."""
    async with _client(app) as c:
        r = await _create(c, ext)
        assert r.status_code == 200, r.text
        bid = r.json()["id"]
        deadline = time.monotonic() + 15
        while (b := (await c.get(f"/v1/batches/{bid}")).json())["status"] != "completed":
            assert time.monotonic() < deadline, b
            await asyncio.sleep(0.05)
    return bid


async def _bad(app, ext: dict, param: str, *, key: str = "overnight") -> dict:
    async with _client(app) as c:
        r = await _create(c, ext, key)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param, err
    return err


KEYED = dict(api_keys="key-a:alice")


@pytest.mark.parametrize("endpoint", ["http://127.0.0.1:99999", "http://", "http://[::1", "http://h:0",
                                      "http://h/x y", "http://u:p@h:1"])
async def test_an_endpoint_no_client_could_use_is_400_naming_the_field(tmp_path, endpoint) -> None:
    app = await _app(tmp_path)
    async with app.router.lifespan_context(app):
        err = await _bad(app, {"runtime": {"endpoint": endpoint}}, "overnight.runtime.endpoint")
        assert "runtime.endpoint" in err["message"]


async def test_keyed_mode_refuses_tenant_endpoints_unless_allowlisted(tmp_path) -> None:
    # max_running_batches=0: nothing is dispatched to these made-up engines.
    app = await _app(tmp_path, max_running_batches=0, **KEYED)
    async with app.router.lifespan_context(app):
        err = await _bad(app, {"runtime": {"endpoint": "http://10.1.2.3:8000"}}, "aibrix.runtime.endpoint", key="aibrix")
        assert err["code"] == "endpoint_not_allowed" and "keyed mode" in err["message"]
        async with _client(app) as c:  # the server's own engine is always allowed
            assert (await _create(c, {"runtime": {"endpoint": "http://127.0.0.1:9/v1"}})).status_code == 200
    app = await _app(tmp_path, allowed_endpoints="10.0.0.0/8", max_running_batches=0, **KEYED)
    async with app.router.lifespan_context(app):
        async with _client(app) as c:
            assert (await _create(c, {"runtime": {"endpoint": "http://10.1.2.3:8000"}})).status_code == 200


@pytest.mark.parametrize("endpoint", ["http://169.254.169.254/latest", "http://metadata.google.internal",
                                      "http://[fe80::1]:80", "http://100.100.100.200"])
async def test_metadata_endpoints_are_refused_even_in_open_mode(tmp_path, endpoint) -> None:
    app = await _app(tmp_path, allowed_endpoints="*")
    async with app.router.lifespan_context(app):
        err = await _bad(app, {"runtime": {"endpoint": endpoint}}, "overnight.runtime.endpoint")
        assert "metadata" in err["message"]


@pytest.mark.parametrize("api_key", ["k\r\nX-Injected: 1\r\n\r\nGET /smuggled HTTP/1.1", "k\n", "k\x00", "caf\u00e9",
                                     "\u2603", ""])
async def test_a_header_unsafe_api_key_is_400_and_not_echoed(tmp_path, api_key) -> None:
    app = await _app(tmp_path)
    async with app.router.lifespan_context(app):
        err = await _bad(app, {"runtime": {"endpoint": "http://127.0.0.1:8100", "api_key": api_key}},
                         "overnight.runtime.api_key")
        assert not api_key or api_key not in err["message"]


@pytest.mark.parametrize(("field", "value"), [("max_concurrency", 10**30), ("max_concurrency", 0),
                                              ("priority", 10**30), ("max_concurrency", 2**63)])
async def test_extension_integers_out_of_range_are_400_naming_the_field(tmp_path, field, value) -> None:
    app = await _app(tmp_path)
    async with app.router.lifespan_context(app):
        err = await _bad(app, {field: value}, f"overnight.{field}")
        assert field in err["message"]


async def test_keyed_mode_without_a_secret_key_refuses_an_api_key(tmp_path) -> None:
    app = await _app(tmp_path, allowed_endpoints="*", **KEYED)
    async with app.router.lifespan_context(app):
        err = await _bad(app, {"runtime": {"endpoint": "http://127.0.0.1:8100", "api_key": "sk-tenant"}},
                         "overnight.runtime.api_key")
        assert "OVERNIGHT_SECRET_KEY" in err["message"]


async def test_open_mode_creates_a_private_key_file(tmp_path) -> None:
    app = await _app(tmp_path)
    async with app.router.lifespan_context(app):
        key_file = tmp_path / "secret.key"
        assert key_file.stat().st_mode & 0o777 == 0o600
        first = key_file.read_text()
    app = await _app(tmp_path)
    async with app.router.lifespan_context(app):
        assert key_file.read_text() == first  # never replaced: sealed keys stay readable


async def test_api_key_is_sealed_at_rest_and_still_reaches_the_engine(tmp_path) -> None:
    secret = "sk-tenant-VERY-secret-123"
    async with RawEngine() as engine:
        app = await _app(tmp_path, allowed_endpoints="127.0.0.1/32", secret_key=Fernet.generate_key().decode(), **KEYED)
        async with app.router.lifespan_context(app):
            bid = await _completed(app, {"runtime": {"endpoint": engine.url, "api_key": secret}})
            rec = await app.state.store.get_batch(bid)
            assert secret not in orjson.dumps(rec.options).decode()
        assert f"Authorization: Bearer {secret}\r\n".encode() in engine.received
    stored = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
    assert secret.encode() not in stored  # not in the database files, WAL or spool


async def test_a_trusted_console_key_may_name_its_provisions_and_no_other_key_may(tmp_path) -> None:
    # key-c is the key a console running as its own process uses for alice here
    # (OVERNIGHT_TRUSTED_CONSOLE_KEYS): what it names is what it provisioned.
    from overnight.batches.service import CONSOLE_PROVISIONED
    from overnight.errors import OvernightError

    ssh = {"type": "ssh", "host": "203.0.113.7", "port": 22, "user": "root", "engine_port": 8000,
           "provision_id": "prov-1", "host_key": "203.0.113.7 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl",
           "command": ["vllm", "serve", "m", "--port", "{port}"], "secrets": {"HF_TOKEN": "HF_TOKEN"}}
    app = await _app(tmp_path, max_running_batches=0, api_keys="key-a:alice,key-c:alice",
                     trusted_console_keys="key-c", runtimes="endpoint,ssh")
    async with app.router.lifespan_context(app):
        for ext in ({"runtime": {"endpoint": "http://10.1.2.3:8000"}}, {"runtime": ssh}):
            async with _client(app, "key-a") as user:
                r = await _create(user, ext)
                assert r.status_code == 400 and r.json()["error"]["code"] == "endpoint_not_allowed", r.text
            async with _client(app, "key-c") as console:
                r = await _create(console, ext)
                assert r.status_code == 200, r.text
            rec = await app.state.store.get_batch(r.json()["id"])
            assert rec.tenant == "alice" and rec.options[CONSOLE_PROVISIONED] is True
            await app.state.scheduler.engines.check(rec)  # and again when it is claimed
            # The same batch without the mark (as a user's would be) is refused at the claim.
            rec.options.pop(CONSOLE_PROVISIONED)
            with pytest.raises(OvernightError) as exc:
                await app.state.scheduler.engines.check(rec)
            assert exc.value.code == "endpoint_not_allowed"
        async with _client(app, "key-a") as user:  # the mark is the server's, never a client's field
            r = await _create(user, {"runtime": {"endpoint": "http://10.1.2.3:8000"}, CONSOLE_PROVISIONED: True})
            assert r.status_code == 400 and r.json()["error"]["param"] == f"overnight.{CONSOLE_PROVISIONED}"
        async with _client(app, "key-c") as console:  # a batch naming no engine carries no mark
            r = await _create(console, {})
            assert r.status_code == 200
            assert CONSOLE_PROVISIONED not in (await app.state.store.get_batch(r.json()["id"])).options


def test_a_trusted_console_key_must_be_an_api_key(tmp_path) -> None:
    with pytest.raises(ValueError, match="OVERNIGHT_TRUSTED_CONSOLE_KEYS entry 2 is not one of OVERNIGHT_API_KEYS"):
        Settings(data_dir=tmp_path, api_keys="a:alice", trusted_console_keys="a,b").console_key_set()
    # open mode takes any key as the console's (no key is checked there)
    assert Settings(data_dir=tmp_path, trusted_console_keys=" c ,").console_key_set() == {"c"}


# -- DNS rebinding: a tenant's endpoint is checked at every connect, and connected to as checked --
async def test_connect_addresses_are_the_names_addresses_now_each_one_checked(monkeypatch) -> None:
    from overnight.runtimes.egress import EndpointPolicy, EndpointRefused

    table = {"engine.test": ["10.0.0.5"]}
    fake_dns(monkeypatch, table)
    # A suffix entry: only a host named exactly, or a range inside it, unlocks the blocked addresses.
    policy = EndpointPolicy("*.test,10.0.0.0/8", keyed=True, default_url="http://127.0.0.1:9")
    assert await policy.connect_addresses("http://engine.test:8000") == ["10.0.0.5"]
    assert await policy.connect_addresses("http://10.0.0.7:8000") == ["10.0.0.7"]
    assert await policy.connect_addresses("http://127.0.0.1:9/v1") is None  # the server's own engine: by name
    policy.trust("http://203.0.113.9:8000")
    assert await policy.connect_addresses("http://203.0.113.9:8000/v1") is None  # the console's: by name
    table["engine.test"] = ["169.254.169.254"]  # the name now points at the metadata service
    with pytest.raises(EndpointRefused, match="cloud-metadata"):
        await policy.connect_addresses("http://engine.test:8000")
    table["engine.test"] = []
    with pytest.raises(EndpointRefused, match="does not resolve"):
        await policy.connect_addresses("http://engine.test:8000")
    open_mode = EndpointPolicy(None)
    table["anything.test"] = ["198.51.100.4", "169.254.169.254"]  # one bad address is enough
    with pytest.raises(EndpointRefused):
        await open_mode.connect_addresses("http://anything.test")


async def test_a_tenant_endpoint_is_connected_to_at_the_checked_address_under_its_name(tmp_path, monkeypatch) -> None:
    # engine.test resolves only through the policy's lookup (patched here): the system
    # resolver knows no such name, so the batch completes only if the pool connects to
    # the address the policy checked; the engine still sees the name in Host.
    from overnight.batches.service import CONSOLE_PROVISIONED
    from overnight.errors import RetryableEngineError

    async with RawEngine() as engine:
        port = int(engine.url.rsplit(":", 1)[1])
        table = {"engine.test": ["127.0.0.1"]}
        fake_dns(monkeypatch, table)
        app = await _app(tmp_path, allowed_endpoints="*.test", **KEYED)
        async with app.router.lifespan_context(app):
            bid = await _completed(app, {"runtime": {"endpoint": f"http://engine.test:{port}"}})
            assert f"Host: engine.test:{port}\r\n".encode() in engine.received
            # The name now points at the metadata service: a new connection is refused
            # before anything is sent, though the batch passed every earlier check.
            rec = await app.state.store.get_batch(bid)
            rec.id = "batch_other"  # a batch of its own: a fresh client, no idle connection
            engines = app.state.scheduler.engines
            engines._clients.clear()
            table["engine.test"] = ["169.254.169.254"]
            sent = len(engine.received)
            with pytest.raises(RetryableEngineError, match="checked again at connect"):
                await engines.client_for(rec).send("/v1/chat/completions", b"{}")
            assert len(engine.received) == sent
            # A console-provisioned batch (trusted console key) is connected to by name.
            rec.options[CONSOLE_PROVISIONED] = True
            assert engines._pinned(rec) is False
            rec.options.pop(CONSOLE_PROVISIONED)
            assert engines._pinned(rec) is True
