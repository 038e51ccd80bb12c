"""Which endpoints a tenant may name: URL rules and the SSRF allowlist."""

from __future__ import annotations

import pytest

from overnight.runtimes.egress import EndpointPolicy, EndpointRefused, check_endpoint_url, check_header_value


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://127.0.0.1:99999", "Port out of range"),
        ("http://", "no host"),
        ("http://[::1", "Invalid IPv6"),
        ("http://x:0", "port 0"),
        ("http://h:abc", "not a valid URL"),
        ("ftp://h", "http or https"),
        ("h:8000", "http or https"),
        ("http://u:p@h", "credentials"),
        ("http://h/v1?x=1", "query"),
        ("http://h/a b", "visible ASCII"),
        ("http://h/\r\nX: y", "visible ASCII"),
        ("http://hé", "visible ASCII"),
        ("http://[zz]:1", "not a valid URL"),
        ("http://bad_host!:1", "invalid host"),
        (None, "http(s) URL"),
    ],
)
def test_malformed_endpoints_are_refused_with_the_reason(url, why) -> None:
    with pytest.raises(EndpointRefused, match=why.replace("(", r"\(").replace(")", r"\)")):
        check_endpoint_url(url)


def test_a_good_endpoint_is_normalized() -> None:
    assert check_endpoint_url("http://10.0.0.5:8000/v1/") == "http://10.0.0.5:8000/v1"
    assert check_endpoint_url("https://[::1]:443") == "https://[::1]:443"


def test_header_values_must_be_visible_ascii() -> None:
    assert check_header_value("sk-abc_123") is None
    for bad in ("a\r\nGET /smuggled HTTP/1.1", "a\nb", "a\x00", "caf\u00e9", "\u2603", "a b"):
        assert check_header_value(bad)


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data",
        "http://[fe80::1]:80",
        "http://metadata.google.internal",
        "http://metadata",
        "http://100.100.100.200",
        "http://[::ffff:169.254.169.254]",
    ],
)
async def test_metadata_addresses_are_refused_in_every_mode(url) -> None:
    for policy in (EndpointPolicy(None), EndpointPolicy("*"), EndpointPolicy("0.0.0.0/0,::/0", keyed=True)):
        with pytest.raises(EndpointRefused, match="metadata"):
            await policy.check(url)


async def test_a_name_resolving_to_a_metadata_address_is_refused(monkeypatch) -> None:
    import overnight.runtimes.egress as egress

    async def fake_resolve(host, port):
        return [egress.ipaddress.ip_address("169.254.169.254")]

    monkeypatch.setattr(egress, "_resolve", fake_resolve)
    with pytest.raises(EndpointRefused, match="metadata"):
        await EndpointPolicy(None).check("http://innocent.example:80")


async def test_metadata_is_allowed_only_when_listed_specifically() -> None:
    assert await EndpointPolicy("169.254.169.254/32").check("http://169.254.169.254") == "http://169.254.169.254"
    assert await EndpointPolicy("metadata").check("http://metadata:80")
    with pytest.raises(EndpointRefused):
        await EndpointPolicy("169.254.169.254/32").check("http://169.254.1.1")


async def test_open_mode_allows_any_endpoint_keyed_mode_only_the_default_engine() -> None:
    assert await EndpointPolicy(None).check("http://127.0.0.1:8100")
    keyed = EndpointPolicy(None, keyed=True, default_url="http://127.0.0.1:8100")
    assert await keyed.check("http://127.0.0.1:8100/v1/")  # the server's own engine, any spelling
    with pytest.raises(EndpointRefused, match="keyed mode"):
        await keyed.check("http://127.0.0.1:8200")


async def test_allowlist_of_prefixes_hosts_and_ranges() -> None:
    p = EndpointPolicy("http://gpu1:8000/v1, vllm.internal, *.pool.internal, 10.0.0.0/8", keyed=True)
    for ok in ("http://gpu1:8000/v1", "http://gpu1:8000/v1/x", "http://vllm.internal:9",
               "http://a.pool.internal", "http://10.2.3.4:8000"):
        assert await p.check(ok, resolve=False)
    for bad in ("http://gpu1:8000/v10", "https://gpu1:8000/v1", "http://gpu1:8001/v1",
                "http://vllm.internal.evil.com", "http://11.0.0.1"):
        with pytest.raises(EndpointRefused):
            await p.check(bad, resolve=False)
    with pytest.raises(EndpointRefused, match="not allowed"):
        await p.check("http://127.0.0.1:1")


async def test_hosts_are_resolved_against_ranges() -> None:
    assert await EndpointPolicy("127.0.0.0/8,::1/128", keyed=True).check("http://localhost:1")
    with pytest.raises(EndpointRefused):
        await EndpointPolicy("10.0.0.0/8", keyed=True).check("http://localhost:1")


def test_none_refuses_every_tenant_endpoint_and_bad_entries_are_reported() -> None:
    assert not EndpointPolicy("none").allow_any
    with pytest.raises(ValueError, match="not an IP range"):
        EndpointPolicy("10.0.0.0/99")
    with pytest.raises(ValueError, match="entry"):
        EndpointPolicy("http://[::1")


def test_a_bad_allowlist_setting_stops_the_server_at_start() -> None:
    from pydantic import ValidationError

    from overnight.config import Settings

    with pytest.raises(ValidationError, match="10.0.0.0/99"):
        Settings(allowed_endpoints="10.0.0.0/99")
    assert Settings(allowed_endpoints="*, 10.0.0.0/8").allowed_endpoints


async def test_an_engine_overnight_provisioned_is_trusted_only_while_it_lives() -> None:
    from overnight.runtimes.egress import EndpointPolicy, EndpointRefused

    policy = EndpointPolicy(None, keyed=True)
    with pytest.raises(EndpointRefused):
        await policy.check("http://127.0.0.1:9123/v1")
    policy.trust("http://127.0.0.1:9123")
    assert await policy.check("http://127.0.0.1:9123/v1") == "http://127.0.0.1:9123/v1"
    with pytest.raises(EndpointRefused):
        await policy.check("http://127.0.0.1:9124")  # only that engine
    policy.trust("http://127.0.0.1:9123", live=False)
    with pytest.raises(EndpointRefused):
        await policy.check("http://127.0.0.1:9123/v1")
