"""Which engine endpoints a tenant may name, and what a usable endpoint URL is.

A tenant's ``runtime.endpoint`` makes the server POST to that URL (and GET its
``/metrics``) and hand the answers back in the tenant's output file, so an
unchecked endpoint lets any tenant reach whatever the server can reach (SSRF).
``EndpointPolicy`` decides, from ``OVERNIGHT_ALLOWED_ENDPOINTS``:

- unset: any endpoint in open mode (no API keys, one user), none in keyed mode;
- ``*``: any endpoint; ``none``: no tenant endpoint at all;
- otherwise a comma-separated allowlist of URL prefixes (``http://10.0.0.5:8000``),
  hosts (``vllm.internal``, ``*.gpu.internal``) and IP ranges (``10.0.0.0/8``).

Link-local and cloud-metadata addresses are refused in every mode unless an entry
names them specifically (a host, URL prefix, or a range inside the blocked one).
Host names are resolved (off the event loop) and every address they resolve to is
checked. The server's own default engine is always allowed.

A check at create or claim says nothing of where a name points a moment later:
``connect_addresses`` checks again when a tenant endpoint's client opens a
connection and gives the addresses to connect to (``HttpPool``'s ``resolve``), so
the address connected to is the address checked.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from overnight.executor.engine import engine_base_url

__all__ = ["EndpointPolicy", "EndpointRefused", "check_endpoint_url", "check_header_value"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Addresses no tenant may reach unless the operator lists them: link-local (cloud
#: metadata services live there) and the metadata addresses outside it.
BLOCKED_NETWORKS: tuple[IPNetwork, ...] = tuple(
    ipaddress.ip_network(n)
    for n in ("169.254.0.0/16", "fe80::/10", "100.100.100.200/32", "fd00:ec2::254/128")
)
BLOCKED_HOSTS = frozenset(
    {"metadata", "metadata.google.internal", "metadata.goog", "instance-data", "instance-data.ec2.internal"}
)

_MAX_URL_CHARS = 2048
_HOST_RE = re.compile(r"^[a-z0-9_](?:[a-z0-9_.-]*[a-z0-9_])?$")


class EndpointRefused(ValueError):
    """The endpoint is malformed or not allowed; the message says why."""


def check_endpoint_url(url: object) -> str:
    """The URL without a trailing slash, or ``EndpointRefused`` saying what is wrong.

    Everything the HTTP client will need is checked here, so an accepted URL can
    always become a client: scheme, host, port range, no credentials, query or
    fragment, and only visible ASCII (the path goes into the request line)."""
    if not isinstance(url, str) or not url:
        raise EndpointRefused("must be an http(s) URL such as 'http://10.0.0.5:8000'")
    if len(url) > _MAX_URL_CHARS:
        raise EndpointRefused(f"is longer than {_MAX_URL_CHARS} characters")
    if any(not 0x21 <= ord(c) <= 0x7E for c in url):
        raise EndpointRefused("may only contain visible ASCII characters (no spaces or control characters)")
    try:
        u = urlsplit(url)
        port = u.port
    except ValueError as exc:
        raise EndpointRefused(f"is not a valid URL ({exc})") from None
    if u.scheme not in ("http", "https"):
        raise EndpointRefused(f"must use http or https, not {u.scheme or 'no scheme'!r}")
    if "@" in u.netloc:
        raise EndpointRefused("must not contain credentials; pass the key as runtime.api_key")
    host = u.hostname
    if not host:
        raise EndpointRefused("has no host")
    if port is not None and not 1 <= port <= 65535:
        raise EndpointRefused(f"has port {port}; a port is 1-65535")
    if u.query or u.fragment or "?" in url or "#" in url:
        raise EndpointRefused("must not have a query or fragment")
    if "[" in u.netloc:
        try:
            ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError:
            raise EndpointRefused(f"has an invalid IPv6 address {host!r}") from None
    elif not _HOST_RE.match(host):
        raise EndpointRefused(f"has an invalid host name {host!r}")
    return url.rstrip("/")


def check_header_value(value: str) -> str | None:
    """Why ``value`` cannot be sent in an HTTP header (None when it can): only
    visible ASCII, so no CR/LF can inject headers or a second request."""
    if any(not 0x21 <= ord(c) <= 0x7E for c in value):
        return "may only contain visible ASCII characters (no spaces, CR, LF or other control characters)"
    return None


def _ip(host: str) -> IPAddress | None:
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def _blocked(addr: IPAddress) -> bool:
    return any(addr.version == n.version and addr in n for n in BLOCKED_NETWORKS)


@dataclass(frozen=True)
class _Prefix:
    scheme: str
    host: str
    port: int
    path: str

    @classmethod
    def of(cls, url: str) -> _Prefix:
        u = urlsplit(url)
        port = u.port or (443 if u.scheme == "https" else 80)
        return cls(u.scheme, (u.hostname or "").rstrip("."), port, u.path.rstrip("/"))

    def covers(self, other: _Prefix) -> bool:
        if (self.scheme, self.host, self.port) != (other.scheme, other.host, other.port):
            return False
        # Whole path segments: "/v1" covers "/v1" and "/v1/x", not "/v10".
        return other.path == self.path or other.path.startswith(self.path + "/")


class EndpointPolicy:
    """Decides whether a tenant may send a batch to an endpoint (see module doc)."""

    def __init__(
        self, allowed: str | None = None, *, keyed: bool = False, default_url: str | None = None,
        setting: str = "OVERNIGHT_ALLOWED_ENDPOINTS",
    ) -> None:
        #: The setting ``allowed`` came from, for messages (webhook URLs have their own).
        self.setting = setting
        #: Engine base URLs overnight itself provisioned (the console's resources):
        #: allowed while they live, whatever a tenant could name (``trust``/``untrust``).
        self.trusted: set[str] = set()
        self.allow_any = False
        self.prefixes: list[_Prefix] = []
        self.hosts: set[str] = set()
        self.suffixes: list[str] = []
        self.networks: list[IPNetwork] = []
        self.default = _Prefix.of(engine_base_url(default_url)) if default_url else None
        if allowed is None:
            self.allow_any = not keyed
            self.describe = ("open mode: any endpoint" if not keyed else
                             "keyed mode: only the default engine" if setting == "OVERNIGHT_ALLOWED_ENDPOINTS"
                             else f"keyed mode: none unless {setting} lists it")
            return
        self.describe = f"{setting}={allowed!r}"
        for raw in allowed.split(","):
            entry = raw.strip().lower()
            if not entry or entry == "none":
                continue
            if entry == "*":
                self.allow_any = True
            elif entry.startswith(("http://", "https://")):
                try:
                    self.prefixes.append(_Prefix.of(check_endpoint_url(entry)))
                except EndpointRefused as exc:
                    raise ValueError(f"{setting} entry {raw.strip()!r} {exc}") from None
            elif entry.startswith("*."):
                self.suffixes.append(entry[1:].rstrip("."))
            elif "/" in entry or _ip(entry) is not None:
                try:
                    self.networks.append(ipaddress.ip_network(entry, strict=False))
                except ValueError:
                    raise ValueError(f"{setting} entry {raw.strip()!r} is not an IP range") from None
            elif _HOST_RE.match(entry):
                self.hosts.add(entry.rstrip("."))
            else:
                raise ValueError(
                    f"{setting} entry {raw.strip()!r} is not a URL prefix, host or IP range"
                )

    def trust(self, url: str, live: bool = True) -> None:
        """Allow (``live``) or stop allowing an engine overnight provisioned itself
        (a console job's resource): its batches are not tenant-named endpoints. An
        ``ssh://user@host:port`` target is a machine the batch's SSH runtime starts
        its engine on (``is_trusted`` answers for it)."""
        base = url if url.startswith("ssh://") else engine_base_url(url)
        if live:
            self.trusted.add(base)
        else:
            self.trusted.discard(base)

    def is_trusted(self, target: str) -> bool:
        """Was ``target`` (an engine URL or ``ssh://user@host:port``) provisioned by
        this process's console and is it still live?"""
        return target in self.trusted or (not target.startswith("ssh://")
                                          and engine_base_url(target) in self.trusted)

    async def check(self, url: str, *, resolve: bool = True) -> str:
        """The normalized URL if a tenant may use it; else ``EndpointRefused``.

        With ``resolve`` a host name is looked up (``loop.getaddrinfo``) and every
        address it has must pass; a name that does not resolve passes only on an
        allowlist entry that needs no address (the check runs again before dispatch)."""
        url = check_endpoint_url(url)
        target = _Prefix.of(url)
        if self._exempt(url):
            return url
        host = target.host
        literal = _ip(host)
        addrs: list[IPAddress] = [literal] if literal is not None else []
        unresolved = False
        if literal is None and resolve:
            addrs = await _resolve(host, target.port)
            unresolved = not addrs
        self._judge(target, addrs, unresolved)
        return url

    def _exempt(self, url: str) -> bool:
        """The server's own default engine, or one its console provisioned and holds."""
        if self.default is not None and self.default.covers(_Prefix.of(engine_base_url(url))):
            return True
        return bool(self.trusted) and engine_base_url(url) in self.trusted

    async def connect_addresses(self, url: str) -> list[str] | None:
        """Where a connection to a tenant's ``url`` may go, decided now: None to connect
        by name (an exempt engine), else the addresses its host has at this moment,
        every one of them allowed (``EndpointRefused`` otherwise). Connecting to these,
        not to the name, leaves no window between the check and the connect for the
        name to point somewhere else (DNS rebinding)."""
        if self._exempt(url):
            return None
        target = _Prefix.of(url)
        literal = _ip(target.host)
        addrs = [literal] if literal is not None else await _resolve(target.host, target.port)
        if not addrs:
            raise EndpointRefused(f"has a host {target.host!r} that does not resolve")
        self._judge(target, addrs, False)
        return [str(a) for a in addrs]

    def _judge(self, target: _Prefix, addrs: list[IPAddress], unresolved: bool) -> None:
        """Refuse (``EndpointRefused``) a target whose host has ``addrs``, unless allowed."""
        host = target.host
        named = any(p.covers(target) for p in self.prefixes) or host in self.hosts
        if host in BLOCKED_HOSTS or any(_blocked(a) for a in addrs):
            # Only an entry naming this host, or a range inside the blocked one, unlocks it.
            specific = named or (addrs and all(
                any(n.version == a.version and a in n and any(n.subnet_of(b) for b in BLOCKED_NETWORKS
                                                              if b.version == n.version) for n in self.networks)
                for a in addrs
            ))
            if not specific:
                raise EndpointRefused(
                    f"points at a link-local or cloud-metadata address ({host}); the server's operator "
                    f"must list it in {self.setting} to allow it"
                )
            return
        if self.allow_any or named or any(host.endswith(s) for s in self.suffixes):
            return
        if addrs and self.networks and all(any(n.version == a.version and a in n for n in self.networks) for a in addrs):
            return
        if unresolved and self.networks:
            raise EndpointRefused(f"has a host {host!r} that does not resolve, so it cannot be checked")
        raise EndpointRefused(f"is not allowed on this server ({self.describe})")


async def _resolve(host: str, port: int) -> list[IPAddress]:
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return []
    out: list[IPAddress] = []
    for info in infos:
        addr = _ip(str(info[4][0]))
        if addr is not None and addr not in out:
            out.append(addr)
    return out
