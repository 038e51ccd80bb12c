"""Template and profile documents: every error names the file, the document and the field."""

from __future__ import annotations

import pytest

from overnight.templates import DirectorySource
from overnight.templates.schema import TemplateSchemaError, looks_like_secret, parse_profile, parse_template
from tests.templates._yaml import PROFILE, template_yaml


def _template(**spec_changes: object) -> dict:
    spec = {
        "engine": {"type": "vllm"},
        "model_source": {"type": "huggingface", "uri": "Qwen/Qwen3-0.6B"},
        "accelerator": {"type": "H100", "count": 1},
        "supported_endpoints": ["/v1/chat/completions"],
    }
    spec.update(spec_changes)
    return {"name": "qwen", "version": "1", "spec": spec}


def _issues(data: dict, *, profile: bool = False) -> list[str]:
    with pytest.raises(TemplateSchemaError) as info:
        (parse_profile if profile else parse_template)(data, where="f.yaml: document 1")
    return info.value.issues


def test_parallelism_error_names_file_document_and_field(tdir) -> None:  # type: ignore[no-untyped-def]
    good = template_yaml("other")
    bad = template_yaml("llama-8b", count=2, tp=4)
    (tdir / "llama.yaml").write_text(good + "---\n" + bad)
    source = DirectorySource(tdir)
    assert source.errors() == [
        f"{tdir}/llama.yaml: document 2 (llama-8b): spec.parallelism: tp*pp*dp*ep = 4*1*1*1 = 4 "
        "but accelerator.count = 2"
    ]
    assert source.get_template("other").name == "other"


def test_every_problem_of_a_document_is_listed_with_its_path() -> None:
    data = _template(
        engine={"type": "vllm", "serve_args": ["--port", "9000"], "ready_timeout_seconds": 0},
        engine_args={"port": 1, "gpu_memory_utilization": 1.5, "max_num_seqs": 0, "bad key": 1},
        model_source={"type": "gcs", "uri": "x"},
        supported_endpoints=["v1/chat"],
        colour="blue",
    )
    issues = _issues(data)
    expected_paths = [
        "spec.engine.ready_timeout_seconds",
        "spec.model_source.type",
        "spec.engine_args.bad key",
        "spec.engine_args.port",
        "spec.engine_args.gpu_memory_utilization",
        "spec.engine_args.max_num_seqs",
        "spec.supported_endpoints",
        "spec.colour: unknown field",
    ]
    for path in expected_paths:
        assert any(line.startswith(f"f.yaml: document 1: {path}") for line in issues), (path, issues)


def test_reserved_serve_args_and_engine_args_say_where_the_value_belongs() -> None:
    issues = _issues(_template(engine={"type": "vllm", "serve_args": ["--served-model-name=x"]},
                               engine_args={"tensor_parallel_size": 2}))
    assert "f.yaml: document 1: spec.engine.serve_args[0]: --served-model-name is set by overnight; remove it" in issues
    assert "f.yaml: document 1: spec.engine_args.tensor_parallel_size: set by overnight: use spec.parallelism.tp" in issues


def test_unknown_engine_type_needs_a_command_with_a_port_placeholder() -> None:
    issues = _issues(_template(engine={"type": "trtllm"}))
    assert issues[0].startswith("f.yaml: document 1: spec.engine.type: overnight has no built-in command")
    issues = _issues(_template(engine={"type": "trtllm", "command": ["trtllm-serve", "m"]}))
    assert issues[0].startswith("f.yaml: document 1: spec.engine.command: must contain '{port}'")
    t = parse_template(_template(engine={"type": "TRTLLM", "command": ["trtllm-serve", "m", "--port", "{port}"]}))
    assert t.spec.engine.type == "trtllm"


def test_mock_and_cpu_engines_hold_no_gpu() -> None:
    t = parse_template(_template(engine={"type": "mock"}, accelerator={"type": "cpu", "count": 0},
                                 parallelism={"dp": 2}))
    assert t.spec.accelerator.gpus == 0
    # AIBrix's cpu templates count cores; overnight still gives them no GPU.
    t = parse_template(_template(accelerator={"type": "cpu", "count": 2}, parallelism={"tp": 2}))
    assert t.spec.accelerator.gpus == 0


def test_defaults_follow_aibrix() -> None:
    t = parse_template(_template(engine={"type": "vllm", "health_endpoint": ""}))
    assert t.version == "1" and t.status == "active"
    e = t.spec.engine
    assert (e.invocation, e.health_endpoint, e.ready_timeout_seconds, e.metrics_endpoint, e.port) == (
        "http_server", "/health", 600, "/metrics", 8000)
    assert t.spec.deployment_mode == "dedicated" and t.spec.keep_alive_seconds == 0
    p = t.spec.parallelism
    assert (p.tp, p.pp, p.dp, p.ep) == (1, 1, 1, 1)


def test_a_float_version_must_be_quoted() -> None:
    data = _template()
    data["version"] = 1.10
    assert _issues(data) == ["f.yaml: document 1: version: quote it: YAML reads it as the number 1.1 (and 1.10 as 1.1)"]


def test_templates_carry_no_secrets() -> None:
    token = "hf_" + "aBcD1234" * 4
    issues = _issues(_template(engine={"type": "vllm", "serve_args": ["--api-key", token]},
                               engine_args={"api_key": "letmein"}))
    assert any(i.startswith("f.yaml: document 1: spec.engine.serve_args[1]: looks like a secret value") for i in issues)
    assert any(i.startswith("f.yaml: document 1: spec.engine_args.api_key: looks like a secret value") for i in issues)
    assert not any(token in i or "letmein" in i for i in issues)


def test_profile_secrets_are_references_never_values() -> None:
    token = "hf_" + "aBcD1234" * 4
    issues = _issues({
        "name": "p",
        "secrets": {"HF_TOKEN": token, "BOTH": {"env": "A", "secret_key_ref": {"name": "s", "key": "k"}}},
        "env": {"OPENAI_API_KEY": "sk-whatever-1", "RANDOM": "Zx9" * 8, "HF_HUB_DISABLE_TOKEN": "1"},
        "store_url": "postgresql://overnight:hunter2@db/overnight",
        "storage_url": "s3://bucket/prefix?secret_access_key=abc",
    }, profile=True)
    assert issues == [
        "f.yaml: document 1: store_url: has a password in it; give credentials through the profile's secrets",
        "f.yaml: document 1: storage_url: has a credential in its 'secret_access_key' parameter; "
        "give credentials through the profile's secrets",
        "f.yaml: document 1: secrets.HF_TOKEN: a secret is given by reference ({env: VAR} or "
        "{secret_key_ref: {name, key}}), never by value",
        "f.yaml: document 1: secrets.BOTH: give exactly one of env or secret_key_ref",
        "f.yaml: document 1: env.OPENAI_API_KEY: looks like a secret value; declare it under secrets "
        "(e.g. OPENAI_API_KEY: {env: OPENAI_API_KEY})",
        "f.yaml: document 1: env.RANDOM: looks like a secret value; declare it under secrets "
        "(e.g. RANDOM: {env: RANDOM})",
    ]
    assert not any(token in i or "hunter2" in i or "sk-whatever" in i for i in issues)


def test_a_good_profile_with_kubernetes_spellings() -> None:
    import yaml

    p = parse_profile({k: v for k, v in yaml.safe_load(PROFILE).items() if k != "kind"} | {
        "secrets": {"HF_TOKEN": {"env": "HF_TOKEN"}, "S3_KEY": {"secretKeyRef": {"name": "s3-creds", "key": "key"}}},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "env": {"OMP_NUM_THREADS": 4, "VLLM_USE_V1": True},
        "keep_alive_seconds": 30,
    })
    assert p.secrets["S3_KEY"].secret_key_ref is not None and p.secrets["S3_KEY"].secret_key_ref.name == "s3-creds"
    assert p.env == {"OMP_NUM_THREADS": "4", "VLLM_USE_V1": "true"}
    assert p.node_selector == {"pool": "gpu"} and p.keep_alive_seconds == 30


@pytest.mark.parametrize("value,secret", [
    ("hf_abcdefghijklmnopqrstuvwx", True),
    ("sk-proj-abc123def456", True),
    ("AKIAIOSFODNN7EXAMPLE", True),
    ("Zx9Zx9Zx9Zx9Zx9Zx9Zx9Zx9", True),
    ("AWS_SECRET_ACCESS_KEY", False),
    ("/data/models/llama-3.1-8b", False),
    ("meta-llama/Llama-3.1-8B-Instruct", False),
    ("nvidia.com/gpu", False),
    ("q8Xk2Lm9Pz4Rt7Wv3Ny6", True),
    ('{"architectures":["Qwen2VLForConditionalGeneration"]}', False),
    ("/templates/Llama3ChatTemplate2024v1.jinja", False),
])
def test_looks_like_secret(value: str, secret: bool) -> None:
    assert looks_like_secret(value) is secret
