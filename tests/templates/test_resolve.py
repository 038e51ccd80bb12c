"""resolve(): the override allowlist, re-validation, and a frozen, storable record."""

from __future__ import annotations

import copy
import json

import pytest

from overnight.errors import InvalidRequestError
from overnight.templates import (
    DirectorySource,
    Resolved,
    TemplateNotFound,
    TemplateSchemaError,
    check_endpoint,
    resolve,
)
from tests.templates._yaml import PROFILE, template_yaml

ARGS = """\
engine_args:
  max_num_seqs: 64
  enable_prefix_caching: true
keep_alive_seconds: 10
"""


@pytest.fixture
def source(tdir):  # type: ignore[no-untyped-def]
    (tdir / "t.yaml").write_text(
        template_yaml("llama", "1.0", count=2, tp=2, extra_spec=ARGS) + "---\n" + PROFILE
        + "---\n" + template_yaml("tiny", "1.0", engine="mock", count=0)
    )
    return DirectorySource(tdir, reload_s=0)


def test_without_overrides_the_record_is_the_template_and_profile(source) -> None:  # type: ignore[no-untyped-def]
    r = resolve(source, {"name": "llama"}, {"name": "gpu-box"})
    assert (r.name, r.version, r.profile_name, r.gpus) == ("llama", "1.0", "gpu-box", 2)
    assert r.template == source.get_template("llama") and r.profile == source.get_profile("gpu-box")
    assert r.summary() == {"template": "llama", "version": "1.0", "profile": "gpu-box", "key": r.key()}
    assert json.loads(json.dumps(r.to_record())) == r.to_record()


def test_allowed_overrides_merge_append_and_scale(source) -> None:  # type: ignore[no-untyped-def]
    r = resolve(source, {"name": "llama", "version": "1.0", "overrides": {
        "spec": {
            "engine_args": {"max_num_seqs": 128, "enable_prefix_caching": None, "max_model_len": 4096},
            "engine": {"serve_args": ["--enforce-eager"], "ready_timeout_seconds": 1200},
            "parallelism": {"dp": 2},
            "keep_alive_seconds": 60,
        }
    }}, {"name": "gpu-box", "overrides": {
        "env": {"VLLM_LOGGING_LEVEL": "DEBUG"},
        "node_selector": {"zone": "a"},
        "tolerations": [{"key": "gpu", "operator": "Exists"}],
    }})
    spec = r.template.spec
    assert spec.engine_args == {"max_num_seqs": 128, "max_model_len": 4096}
    assert spec.engine.serve_args == ["--enforce-eager"] and spec.engine.ready_timeout_seconds == 1200
    # Two replicas of tp=2 need four accelerators.
    assert (spec.parallelism.tp, spec.parallelism.dp, spec.accelerator.count, r.gpus) == (2, 2, 4, 4)
    assert r.keep_alive_seconds == 60
    assert r.profile is not None
    assert r.profile.env == {"HF_HOME": "/data/hf", "VLLM_LOGGING_LEVEL": "DEBUG"}
    assert r.profile.node_selector == {"pool": "gpu", "zone": "a"}
    assert [t.key for t in r.profile.tolerations] == ["gpu"]
    assert r.to_record()["overrides"]["profile"]["env"] == {"VLLM_LOGGING_LEVEL": "DEBUG"}


def test_aibrix_style_overrides_without_spec(source) -> None:  # type: ignore[no-untyped-def]
    r = resolve(source, {"name": "llama", "overrides": {"engine_args": {"max_num_seqs": 8}}})
    assert r.template.spec.engine_args["max_num_seqs"] == 8


@pytest.mark.parametrize("overrides,param", [
    ({"spec": {"engine": {"image": "evil:latest"}}}, "model_template.overrides.spec.engine.image"),
    ({"engine": {"command": ["sh"]}}, "model_template.overrides.engine.command"),
    ({"spec": {"model_source": {"uri": "x"}}}, "model_template.overrides.spec.model_source"),
    ({"spec": {"parallelism": {"tp": 4}}}, "model_template.overrides.spec.parallelism.tp"),
    ({"name": "other"}, "model_template.overrides.name"),
    ({"spec": {"engine": "x"}}, "model_template.overrides.spec.engine"),
])
def test_other_template_overrides_are_refused_naming_the_field(source, overrides, param) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidRequestError) as info:
        resolve(source, {"name": "llama", "overrides": overrides})
    assert info.value.param == param
    assert info.value.message == (
        f"{param} is not overridable (allowed: spec.engine_args, spec.engine.serve_args, spec.parallelism.dp, "
        "spec.engine.ready_timeout_seconds, spec.keep_alive_seconds)"
    )


@pytest.mark.parametrize("overrides,param,text", [
    ({"secrets": {"X": {"env": "Y"}}}, "profile.overrides.secrets", "is not overridable"),
    ({"store_url": "sqlite:///x"}, "profile.overrides.store_url", "is not overridable"),
    ({"env": {"LD_PRELOAD": "/tmp/x.so"}}, "profile.overrides.env.LD_PRELOAD", "may not be set by an override"),
    ({"env": {"HF_HOME": "/tmp"}}, "profile.overrides.env.HF_HOME", "is set by the profile"),
    ({"env": {"HF_TOKEN": "x"}}, "profile.overrides.env.HF_TOKEN", "is set by the profile"),
])
def test_profile_overrides_are_allowlisted(source, overrides, param, text) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidRequestError) as info:
        resolve(source, {"name": "llama"}, {"name": "gpu-box", "overrides": overrides})
    assert info.value.param == param and text in info.value.message


def test_overrides_are_validated_again(source) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(TemplateSchemaError) as info:
        resolve(source, {"name": "llama", "overrides": {"engine_args": {"gpu_memory_utilization": 2, "port": 1}}})
    assert info.value.param == "model_template.overrides"
    assert info.value.issues == [
        "model_template.overrides (llama 1.0): spec.engine_args.gpu_memory_utilization: must be a number in (0, 1], "
        "not 2",
        "model_template.overrides (llama 1.0): spec.engine_args.port: set by overnight: the runtime chooses the port",
    ]
    with pytest.raises(TemplateSchemaError) as info:
        resolve(source, {"name": "llama", "overrides": {"spec": {"engine": {"serve_args": ["--port", "1"]}}}})
    assert info.value.issues == [
        "model_template.overrides (llama 1.0): spec.engine.serve_args[0]: --port is set by overnight; remove it"
    ]
    with pytest.raises(TemplateSchemaError) as info:
        resolve(source, {"name": "llama"}, {"name": "gpu-box", "overrides": {"env": {"MY_TOKEN": "abc"}}})
    assert info.value.issues[0].startswith("profile.overrides (gpu-box): env.MY_TOKEN: looks like a secret value")
    with pytest.raises(InvalidRequestError, match="must be an integer >= 1"):
        resolve(source, {"name": "llama", "overrides": {"spec": {"parallelism": {"dp": 0}}}})


def test_bad_references(source) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidRequestError) as info:
        resolve(source, {"version": "1.0"})
    assert info.value.param == "model_template.name"
    with pytest.raises(InvalidRequestError) as info:
        resolve(source, {"name": "llama", "revision": "x"})
    assert info.value.message == "model_template.revision is not a field (allowed: name, version, overrides)"
    with pytest.raises(InvalidRequestError) as info:
        resolve(source, {"name": "llama"}, {"name": "gpu-box", "version": "1"})
    assert info.value.param == "profile.version"
    with pytest.raises(TemplateNotFound, match="'nope'"):
        resolve(source, {"name": "nope"})


def test_the_record_is_frozen(source, tdir) -> None:  # type: ignore[no-untyped-def]
    r = resolve(source, {"name": "llama"}, {"name": "gpu-box"})
    record = r.to_record()
    kept = copy.deepcopy(record)
    # Editing the template file afterwards changes new resolutions, never this one.
    (tdir / "t.yaml").write_text((tdir / "t.yaml").read_text().replace("max_num_seqs: 64", "max_num_seqs: 32"))
    assert source.refresh() is True
    assert resolve(source, {"name": "llama"}, {"name": "gpu-box"}).template.spec.engine_args["max_num_seqs"] == 32
    assert r.template.spec.engine_args["max_num_seqs"] == 64 and r.to_record() == kept
    # The record handed out is a copy.
    record["template"]["spec"]["engine_args"]["max_num_seqs"] = 1
    assert r.to_record() == kept
    back = Resolved.from_record(json.loads(json.dumps(kept)))
    assert back == r and back.key() == r.key() and back.to_record() == kept


def test_key_is_stable_and_tells_engines_apart(source) -> None:  # type: ignore[no-untyped-def]
    a = resolve(source, {"name": "llama"}, {"name": "gpu-box"})
    b = resolve(source, {"name": "llama", "version": "1.0"}, {"name": "gpu-box"})
    assert a.key() == b.key() and len(a.key()) == 32
    assert resolve(source, {"name": "llama"}).key() != a.key()
    assert resolve(source, {"name": "llama", "overrides": {"engine_args": {"max_num_seqs": 1}}},
                   {"name": "gpu-box"}).key() != a.key()
    # Overrides that change nothing resolve to the same engine.
    same = resolve(source, {"name": "llama", "overrides": {"engine_args": {"max_num_seqs": 64}}}, {"name": "gpu-box"})
    assert same.key() == a.key()
    # Deprecating the version changes the catalog, not the engine.
    f = source.directory / "t.yaml"
    f.write_text(f.read_text().replace('name: llama\nversion: "1.0"\nstatus: active', 'name: llama\nversion: "1.0"\nstatus: deprecated'))
    deprecated = resolve(source, {"name": "llama", "version": "1.0"}, {"name": "gpu-box"})
    assert deprecated.template.status == "deprecated" and deprecated.key() == a.key()


def test_from_record_names_the_bad_field() -> None:
    with pytest.raises(TemplateSchemaError, match="record: template: required"):
        Resolved.from_record({"profile": None})
    with pytest.raises(TemplateSchemaError) as info:
        Resolved.from_record({"template": {"name": "x", "spec": {}}, "profile": None})
    assert "record: template: spec.engine: Field required" in info.value.issues


def test_keep_alive_is_the_longer_of_template_and_profile(source) -> None:  # type: ignore[no-untyped-def]
    assert resolve(source, {"name": "llama"}).keep_alive_seconds == 10
    r = resolve(source, {"name": "llama", "overrides": {"keep_alive_seconds": 0}}, {"name": "gpu-box"})
    assert r.keep_alive_seconds == 0
    (source.directory / "p.yaml").write_text("kind: Profile\nname: warm\nkeep_alive_seconds: 300\n")
    assert resolve(source, {"name": "llama"}, {"name": "warm"}).keep_alive_seconds == 300


def test_check_endpoint(source) -> None:  # type: ignore[no-untyped-def]
    r = resolve(source, {"name": "llama"})
    check_endpoint(r, "/v1/chat/completions")
    check_endpoint(r, "/v1/chat/completions/")
    with pytest.raises(InvalidRequestError) as info:
        check_endpoint(r, "/v1/embeddings")
    assert info.value.param == "endpoint" and info.value.code == "unsupported_endpoint"
    assert info.value.message == (
        "model template 'llama' version '1.0' does not serve /v1/embeddings (supported_endpoints: /v1/chat/completions)"
    )
