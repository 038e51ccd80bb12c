"""ConfigMapSource: labelled ConfigMaps through the real client against the fake API server."""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import textwrap
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import yaml

from overnight.errors import KubernetesError
from overnight.runtimes.kubernetes.client import Kube, KubeConfig, RetryPolicy
from overnight.templates import DirectorySource, ProfileNotFound, TemplateInvalidError, TemplateNotFound
from overnight.templates.configmap import DEFAULT_SELECTOR, CombinedSource, ConfigMapSource, read_config_map
from overnight.templates.source import TemplateSourceError
from tests.kubernetes.fake_apiserver import FakeApiServer
from tests.templates._yaml import PROFILE, template_yaml

FAST = RetryPolicy(attempts=3, base_s=0.01, max_s=0.05)
LABEL = {"overnight.dev/templates": "true"}


def configmap(name: str, data: dict[str, str], *, namespace: str = "default", labels: dict[str, str] | None = None,
              binary: dict[str, str] | None = None) -> dict:
    obj = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": namespace, "labels": LABEL if labels is None else labels},
        "data": data,
    }
    if binary is not None:
        obj["binaryData"] = binary
    return obj


def aibrix_list(key: str, *docs: str) -> str:
    """``{templates: [...]}`` / ``{profiles: [...]}`` as AIBrix writes its ConfigMap keys."""
    items = []
    for doc in docs:
        body = "\n".join(line for line in doc.splitlines() if not line.startswith("kind:"))
        items.append("- " + textwrap.indent(body, "  ")[2:])
    return f"{key}:\n" + "\n".join(items) + "\n"


async def until(check: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


def has_template(source: ConfigMapSource | CombinedSource, name: str, version: str | None = None) -> Callable[[], bool]:
    def check() -> bool:
        try:
            return source.get_template(name, version) is not None
        except (TemplateNotFound, TemplateInvalidError):
            return False

    return check


def lists(fake: FakeApiServer, namespace: str = "default") -> int:
    return len([r for r in fake.requests if r.method == "GET" and not r.query.get("watch")
                and r.path == f"/api/v1/namespaces/{namespace}/configmaps"])


@pytest.fixture
def fake() -> Iterator[FakeApiServer]:
    with FakeApiServer() as server:
        yield server


@pytest.fixture
async def kube(fake: FakeApiServer) -> AsyncIterator[Kube]:
    async with Kube(KubeConfig(api_url=fake.url), retry=FAST, request_timeout_s=5) as k:
        yield k


@pytest.fixture
async def make(kube: Kube) -> AsyncIterator[Callable[..., ConfigMapSource]]:
    made: list[ConfigMapSource] = []

    def factory(namespaces: str | list[str] = "default", **kwargs: object) -> ConfigMapSource:
        kwargs = {"retry_s": 0.02, "max_retry_s": 0.1, "watch_timeout_s": 30, **kwargs}
        source = ConfigMapSource(kube, namespaces, **kwargs)  # type: ignore[arg-type]
        made.append(source)
        return source

    yield factory
    for source in made:
        await source.aclose()


# ---------------------------------------------------------------------------
# reading


async def test_templates_and_profiles_from_labelled_configmaps(fake: FakeApiServer, make) -> None:  # type: ignore[no-untyped-def]
    fake.create(configmap("aibrix", {
        "templates.yaml": aibrix_list("templates", template_yaml("a"), template_yaml("b", "2.0")),
        "profiles.yaml": aibrix_list("profiles", PROFILE, "kind: Profile\nname: small\n"),
    }))
    fake.create(configmap("docs", {
        "many.yml": template_yaml("c") + "---\n" + template_yaml("c", "2.0") + "---\nkind: Profile\nname: other\n",
        "README": "not read",
        ".hidden.yaml": "not: read: at all",
    }))
    fake.create(configmap("unlabelled", {"t.yaml": template_yaml("nope")}, labels={}))
    fake.create(configmap("labelled-false", {"t.yaml": template_yaml("nope2")},
                          labels={"overnight.dev/templates": "false"}))
    source = make()
    assert source.selector == DEFAULT_SELECTOR
    await source.start()
    await source.ready(timeout_s=5)
    assert source.errors() == []
    assert [(t.name, t.version) for t in source.list_templates()] == [
        ("a", "1.0"), ("b", "2.0"), ("c", "2.0"), ("c", "1.0")]
    assert [p.name for p in source.list_profiles()] == ["gpu-box", "other", "small"]
    assert source.get_template("c").version == "2.0"
    assert source.locate_template("b")[0] == "configmap default/aibrix key templates.yaml: document 1, templates[1] (b)"
    assert source.locate_template("c", "1.0")[0] == "configmap default/docs key many.yml: document 1 (c)"
    assert source.locate_profile("small")[0] == "configmap default/aibrix key profiles.yaml: document 1, profiles[1] (small)"
    with pytest.raises(TemplateNotFound):
        source.get_template("nope")
    with pytest.raises(TemplateNotFound):
        source.get_template("nope2")
    # The request carried the selector: unlabelled ConfigMaps never left the server.
    assert {r.query.get("labelSelector") for r in fake.requests if "configmaps" in r.path} == {DEFAULT_SELECTOR}


async def test_change_deletion_and_label_removal_are_seen_without_restart(fake: FakeApiServer, make) -> None:  # type: ignore[no-untyped-def]
    fake.create(configmap("m", {"t.yaml": template_yaml("m", "1.0")}))
    fake.create(configmap("p", {"p.yaml": PROFILE}))
    fake.create(configmap("q", {"q.yaml": template_yaml("q")}))
    source = make()
    await source.start()
    await source.ready(timeout_s=5)
    assert source.get_template("m").version == "1.0"

    fake.patch("ConfigMap", "default", "m", {"data": {"t.yaml": template_yaml("m", "2.0")}})
    await until(has_template(source, "m", "2.0"))
    with pytest.raises(TemplateNotFound):
        source.get_template("m", "1.0")

    fake.patch("ConfigMap", "default", "m", {"data": {"more.yaml": template_yaml("n")}})  # a new key
    await until(has_template(source, "n"))
    fake.patch("ConfigMap", "default", "m", {"data": {"more.yaml": None}})  # the key removed
    await until(lambda: not has_template(source, "n")())

    fake.delete("ConfigMap", "default", "p")
    await until(lambda: not source.list_profiles())
    with pytest.raises(ProfileNotFound):
        source.get_profile("gpu-box")

    fake.patch("ConfigMap", "default", "q", {"metadata": {"labels": {"overnight.dev/templates": None}}})
    await until(lambda: not has_template(source, "q")())
    fake.create(configmap("late", {"t.yaml": template_yaml("late")}))
    await until(has_template(source, "late"))
    assert source.errors() == []
    assert lists(fake) == 1  # all of it from one watch


async def test_a_broken_configmap_is_reported_and_the_others_keep_working(fake: FakeApiServer, make) -> None:  # type: ignore[no-untyped-def]
    fake.create(configmap("good", {"t.yaml": template_yaml("good") + "---\n" + PROFILE}))
    fake.create(configmap("bad", {"t.yaml": template_yaml("bad", "1.0", count=2, tp=4),
                                  "fine.yaml": template_yaml("fine")}))
    fake.create(configmap("empty", {"notes.txt": "x"}))
    source = make()
    await source.start()
    await source.ready(timeout_s=5)
    errors = source.errors()
    assert len(errors) == 2
    assert errors[0].startswith("configmap default/bad key t.yaml: document 1 (bad): spec.parallelism: tp*pp*dp*ep")
    assert errors[1] == "configmap default/empty: no key ends in .yaml or .yml (keys: notes.txt); nothing read from it"
    with pytest.raises(TemplateInvalidError) as info:
        source.get_template("bad")
    assert info.value.issues == [errors[0]]
    assert source.get_template("good").name == "good" and source.get_template("fine").name == "fine"
    assert source.get_profile("gpu-box").name == "gpu-box"

    # It is fixed, then its YAML breaks: what it defined fails with the YAML error, as a file's would.
    fake.patch("ConfigMap", "default", "bad", {"data": {"t.yaml": template_yaml("bad", "1.0")}})
    await until(has_template(source, "bad"))
    fake.patch("ConfigMap", "default", "bad", {"data": {"t.yaml": "kind: ModelDeploymentTemplate\nname: bad\nspec: {engine: [\n"}})
    await until(lambda: not has_template(source, "bad")())
    with pytest.raises(TemplateInvalidError) as info:
        source.get_template("bad")
    assert info.value.message.startswith("model template 'bad' is invalid:\nconfigmap default/bad key t.yaml: line 4: not valid YAML")
    assert source.get_template("fine").name == "fine" and source.get_template("good").name == "good"


async def test_binary_data_keys_are_read_as_text(fake: FakeApiServer, make) -> None:  # type: ignore[no-untyped-def]
    fake.create(configmap("bin", {}, binary={
        "t.yaml": base64.b64encode(template_yaml("bin").encode()).decode(),
        "latin1.yaml": base64.b64encode(b"name: caf\xe9\n").decode(),
    }))
    source = make()
    await source.start()
    await source.ready(timeout_s=5)
    assert source.get_template("bin").name == "bin"
    [error] = source.errors()
    assert error.startswith("configmap default/bin key latin1.yaml: cannot be read: binaryData is not UTF-8 text")


async def test_two_namespaces_and_a_duplicate_across_them(fake: FakeApiServer, make) -> None:  # type: ignore[no-untyped-def]
    fake.create(configmap("t", {"t.yaml": template_yaml("a") + "---\n" + template_yaml("shared")}, namespace="team-a"))
    fake.create(configmap("t", {"t.yaml": template_yaml("b") + "---\n" + template_yaml("shared")}, namespace="team-b"))
    fake.create(configmap("t", {"t.yaml": template_yaml("c")}, namespace="team-c"))  # not configured
    source = make("team-a, team-b")
    assert source.namespaces == ("team-a", "team-b")
    await source.start()
    await source.ready(timeout_s=5)
    assert [t.name for t in source.list_templates()] == ["a", "b"]
    assert source.errors() == [
        "configmap team-b/t key t.yaml: document 2 (shared): template 'shared' version '1.0' is also defined in "
        "configmap team-a/t key t.yaml: document 2 (shared)"
    ]
    with pytest.raises(TemplateInvalidError) as info:
        source.get_template("shared")
    assert "configmap team-a/t" in info.value.message and "configmap team-b/t" in info.value.message
    fake.patch("ConfigMap", "team-b", "t", {"data": {"t.yaml": template_yaml("b")}})
    await until(has_template(source, "shared"))
    assert source.errors() == []
    assert source.locate_template("shared")[0] == "configmap team-a/t key t.yaml: document 2 (shared)"


@pytest.mark.parametrize("as_http", [False, True], ids=["error-event", "http-410"])
async def test_a_watch_410_still_converges(fake: FakeApiServer, make, as_http: bool) -> None:  # type: ignore[no-untyped-def]
    fake.expired_as_http = as_http
    fake.create(configmap("m", {"t.yaml": template_yaml("m", "1.0")}))
    fake.create(configmap("gone", {"t.yaml": template_yaml("gone")}))
    source = make()
    await source.start()
    await source.ready(timeout_s=5)
    await until(lambda: fake.watches_open() > 0)
    with fake.atomically():  # changes the open watch never delivers; then the server forgets them
        fake.close_watches()
        fake.patch("ConfigMap", "default", "m", {"data": {"t.yaml": template_yaml("m", "2.0")}})
        fake.delete("ConfigMap", "default", "gone")
        fake.create(configmap("new", {"t.yaml": template_yaml("new")}))
        fake.expire_history()
    await until(lambda: has_template(source, "m", "2.0")() and has_template(source, "new")())
    assert not has_template(source, "gone")()
    assert lists(fake) == 2  # re-listed after the 410
    fake.patch("ConfigMap", "default", "new", {"data": {"t.yaml": template_yaml("new", "3.0")}})
    await until(has_template(source, "new", "3.0"))
    assert source.errors() == []


async def test_api_down_keeps_the_last_good_catalog_and_says_it_is_stale(
    fake: FakeApiServer, make, caplog: pytest.LogCaptureFixture
) -> None:
    fake.create(configmap("m", {"t.yaml": template_yaml("m", "1.0")}))
    fake.create(configmap("old", {"t.yaml": template_yaml("old")}))
    source = make()
    await source.start()
    await source.ready(timeout_s=5)
    await until(lambda: fake.watches_open() > 0)
    caplog.set_level(logging.WARNING, logger="overnight.templates")

    fake.fail_next(0, times=10**6)  # every request: the connection drops unanswered
    fake.close_watches()
    await until(lambda: any("cannot be read since" in e for e in source.errors()))
    [stale] = source.errors()
    assert stale.startswith(f"configmaps in namespace default ({DEFAULT_SELECTOR}): cannot be read since ")
    assert "cannot reach the API server" in stale and stale.endswith("serving what was read before")
    assert source.get_template("m").version == "1.0" and source.get_template("old").name == "old"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings and "keeping what was read before" in warnings[0].getMessage()
    assert len(warnings) < 5  # one per kind of failure, not one per retry

    # Changed while unreachable; seen once it answers again, the deletion included.
    fake.patch("ConfigMap", "default", "m", {"data": {"t.yaml": template_yaml("m", "2.0")}})
    fake.delete("ConfigMap", "default", "old")
    await asyncio.sleep(0.2)
    assert source.get_template("m").version == "1.0"
    fake.clear_faults()
    await until(lambda: source.errors() == [])
    assert source.get_template("m").version == "2.0"
    with pytest.raises(TemplateNotFound):
        source.get_template("old")
    assert lists(fake) >= 2


async def test_ready_fails_fast_when_listing_is_forbidden(fake: FakeApiServer, make) -> None:  # type: ignore[no-untyped-def]
    fake.fail_next(403, times=10**6, message='configmaps is forbidden: User "x" cannot list resource "configmaps"')
    source = make("default,other")
    await source.start()
    started = time.monotonic()
    with pytest.raises(TemplateSourceError) as info:
        await source.ready(timeout_s=10)
    assert time.monotonic() - started < 5
    # whichever namespace was refused first
    assert info.value.message.startswith("templates ConfigMaps cannot be listed: namespace ")
    assert "configmaps is forbidden" in info.value.message
    await until(lambda: all("cannot be listed since" in e for e in source.errors()))
    assert [e.split(":")[0] for e in source.errors()] == [
        f"configmaps in namespace {ns} ({DEFAULT_SELECTOR})" for ns in ("default", "other")]


async def test_ready_times_out_naming_the_namespace_and_the_error(fake: FakeApiServer, make) -> None:  # type: ignore[no-untyped-def]
    fake.fail_next(503, times=10**6, message="etcd is down")
    source = make()
    assert source.errors() == [f"configmaps in namespace default ({DEFAULT_SELECTOR}): not listed yet"]
    with pytest.raises(RuntimeError, match="start"):
        await source.ready(timeout_s=1)
    await source.start()
    with pytest.raises(TemplateSourceError) as info:
        await source.ready(timeout_s=0.5)
    assert "not listed after 0.5s" in info.value.message and "etcd is down" in info.value.message
    fake.clear_faults()
    fake.create(configmap("m", {"t.yaml": template_yaml("m")}))
    await source.ready(timeout_s=5)  # it kept trying
    assert source.get_template("m").name == "m" and source.errors() == []


async def test_a_source_built_from_a_config_opens_and_closes_its_client(fake: FakeApiServer, tmp_path: Path) -> None:
    fake.create(configmap("m", {"t.yaml": template_yaml("m")}, namespace="batch"))
    path = fake.write_kubeconfig(tmp_path / "config")
    source = ConfigMapSource(KubeConfig(kubeconfig=str(path)), ["batch"], retry=FAST, watch_timeout_s=30)
    async with source:
        await source.ready(timeout_s=5)
        assert source.get_template("m").name == "m"
        await until(lambda: fake.watches_open() > 0)
        with pytest.raises(RuntimeError, match="started already"):
            await source.start()
    assert source._kube._client is None  # closed by aclose()


async def test_a_config_that_does_not_load_fails_start(tmp_path: Path) -> None:
    source = ConfigMapSource(KubeConfig(kubeconfig=str(tmp_path / "missing")), "default")
    with pytest.raises(KubernetesError, match="no such file"):
        await source.start()


def test_settings_are_checked() -> None:
    kube = Kube(KubeConfig(api_url="http://127.0.0.1:1"))
    with pytest.raises(TemplateSourceError, match="at least one namespace"):
        ConfigMapSource(kube, " , ")
    with pytest.raises(TemplateSourceError, match="'Team_A' is not a namespace name"):
        ConfigMapSource(kube, "default,Team_A")
    with pytest.raises(TemplateSourceError, match="selector: empty"):
        ConfigMapSource(kube, "default", selector=" ")
    assert ConfigMapSource(kube, ["a", "b", "a"], selector="team=x").namespaces == ("a", "b")


def test_read_config_map_reparses_only_changed_keys() -> None:
    first = read_config_map(configmap("m", {"a.yaml": template_yaml("a"), "b.yaml": template_yaml("b")}))
    second = read_config_map(configmap("m", {"a.yaml": template_yaml("a"), "b.yaml": template_yaml("b", "2.0")}), first)
    assert second.keys["a.yaml"] is first.keys["a.yaml"]
    assert second.keys["b.yaml"] is not first.keys["b.yaml"]


# ---------------------------------------------------------------------------
# a directory and ConfigMaps together


async def test_combined_source_detects_a_template_in_both(fake: FakeApiServer, make, tdir: Path) -> None:  # type: ignore[no-untyped-def]
    (tdir / "a.yaml").write_text(template_yaml("m", "1.0") + "---\n" + template_yaml("files-only") + "---\n" + PROFILE)
    fake.create(configmap("t", {"t.yaml": template_yaml("m", "1.0") + "---\n" + template_yaml("m", "2.0")
                                + "---\nkind: Profile\nname: cm-profile\n"}))
    directory = DirectorySource(tdir, reload_s=0)
    configmaps = make()
    combined = CombinedSource(directory, configmaps)
    await configmaps.start()
    await configmaps.ready(timeout_s=5)
    assert combined.errors() == [
        f"configmap default/t key t.yaml: document 1 (m): template 'm' version '1.0' is also defined in "
        f"{tdir}/a.yaml: document 1 (m)"
    ]
    with pytest.raises(TemplateInvalidError) as info:
        combined.get_template("m", "1.0")
    assert f"{tdir}/a.yaml" in info.value.message and "configmap default/t key t.yaml" in info.value.message
    assert combined.get_template("m", "2.0").version == "2.0"
    assert combined.get_template("files-only").name == "files-only"
    assert [p.name for p in combined.list_profiles()] == ["cm-profile", "gpu-box"]
    assert combined.catalog() is combined.catalog()  # merged once while nothing changes

    # Changes in either part are seen through the combination.
    fake.patch("ConfigMap", "default", "t", {"data": {"t.yaml": template_yaml("m", "2.0")
                                                      + "---\nkind: Profile\nname: cm-profile\n"}})
    await until(lambda: combined.errors() == [])
    assert combined.locate_template("m", "1.0")[0] == f"{tdir}/a.yaml: document 1 (m)"
    (tdir / "a.yaml").write_text(PROFILE.replace("gpu-box", "gpu-box-2"))
    assert directory.refresh() is True
    assert [p.name for p in combined.list_profiles()] == ["cm-profile", "gpu-box-2"]


async def test_combined_source_reports_a_profile_in_both_and_stale_configmaps(fake: FakeApiServer, make, tdir: Path) -> None:  # type: ignore[no-untyped-def]
    (tdir / "p.yaml").write_text(PROFILE)
    fake.create(configmap("p", {"p.yaml": PROFILE}))
    configmaps = make()
    combined = CombinedSource(DirectorySource(tdir), configmaps)
    assert combined.errors() == [f"configmaps in namespace default ({DEFAULT_SELECTOR}): not listed yet"]
    await configmaps.start()
    await configmaps.ready(timeout_s=5)
    assert combined.errors() == [
        f"configmap default/p key p.yaml: document 1 (gpu-box): profile 'gpu-box' is also defined in "
        f"{tdir}/p.yaml: document 1 (gpu-box)"
    ]
    with pytest.raises(TemplateInvalidError):
        combined.get_profile("gpu-box")
    with pytest.raises(ValueError, match="at least one"):
        CombinedSource()


# ---------------------------------------------------------------------------
# docs/templates.md, "Templates from ConfigMaps"

DOC = (Path(__file__).resolve().parents[2] / "docs" / "templates.md").read_text()


def _doc_blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", DOC, re.S)


def _doc_configmap() -> dict:
    [manifest] = [yaml.safe_load(b) for b in _doc_blocks("yml") if "kind: ConfigMap" in b]
    return manifest


def test_the_docs_configmap_is_labelled_and_reads_clean() -> None:
    manifest = _doc_configmap()
    key, value = DEFAULT_SELECTOR.split("=")
    assert manifest["metadata"]["labels"][key] == value
    read = read_config_map(manifest)
    assert [load.issues for load in read.loads()] == [(), ()]
    names = [n for load in read.loads() for n in load.names()]
    assert names == [("profile", "team-a"), ("template", "qwen2.5-0.5b-instruct")]


def test_the_docs_role_grants_list_and_watch_on_configmaps() -> None:
    [block] = [b for b in _doc_blocks("yml") if "kind: Role" in b]
    role, binding = yaml.safe_load_all(block)
    [rule] = role["rules"]
    assert rule["resources"] == ["configmaps"] and {"list", "watch"} <= set(rule["verbs"])
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["metadata"]["namespace"] == role["metadata"]["namespace"]


def test_the_docs_python_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    [block] = _doc_blocks("py")
    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    with FakeApiServer() as fake:
        fake.create(_doc_configmap())
        monkeypatch.setenv("KUBECONFIG", str(fake.write_kubeconfig(tmp_path / "config")))
        exec(compile(block, "docs/templates.md", "exec"), {"__name__": "docs"})  # noqa: S102 - our own documentation
    assert capsys.readouterr().out == "vllm/vllm-openai:v0.11.0\n"
