"""The engine command per engine type, and the local runtime's spec (run for real with the mock engine)."""

from __future__ import annotations

import sys

import httpx
import pytest
import yaml

from overnight.errors import RuntimeStartError
from overnight.templates import StaticSource, engine_command, local_spec, resolve
from overnight.templates.schema import parse_template


def _t(engine_type: str, **spec: object) -> dict:
    base: dict = {
        "engine": {"type": engine_type},
        "model_source": {"type": "huggingface", "uri": "meta-llama/Llama-3.1-70B-Instruct"},
        "accelerator": {"type": "H100", "count": 4},
        "parallelism": {"tp": 2, "dp": 2},
        "supported_endpoints": ["/v1/chat/completions"],
    }
    base.update(spec)
    return {"name": "llama-70b", "version": "2", "spec": base}


ENGINE_ARGS = {
    "max_num_seqs": 256,
    "gpu_memory_utilization": 0.9,
    "max_model_len": 8192,
    "enable_prefix_caching": False,
    "enforce_eager": True,
    "unset_flag": None,
    "speculative_config": {"method": "ngram", "num_speculative_tokens": 4},
    "allowed_origins": ["a", "b"],
}


def test_vllm_command() -> None:
    t = parse_template(_t(
        "vllm",
        engine={"type": "vllm", "serve_args": ["--disable-log-requests"]},
        model_source={"type": "huggingface", "uri": "meta-llama/Llama-3.1-70B-Instruct", "revision": "main"},
        engine_args=ENGINE_ARGS,
        quantization={"weight": "fp8", "kv_cache": "fp8_e5m2"},
    ))
    assert engine_command(t) == [
        "vllm", "serve", "meta-llama/Llama-3.1-70B-Instruct", "--host", "{host}", "--port", "{port}",
        "--served-model-name", "llama-70b", "--revision", "main",
        "--disable-log-requests",
        "--allowed-origins", "a", "b",
        "--no-enable-prefix-caching",
        "--enforce-eager",
        "--gpu-memory-utilization", "0.9",
        "--max-model-len", "8192",
        "--max-num-seqs", "256",
        "--speculative-config", '{"method":"ngram","num_speculative_tokens":4}',
        "--tensor-parallel-size", "2", "--data-parallel-size", "2",
        "--quantization", "fp8", "--kv-cache-dtype", "fp8_e5m2",
    ]


def test_vllm_pipeline_expert_parallel_and_dtype() -> None:
    t = parse_template(_t("vllm", accelerator={"type": "H100", "count": 8}, parallelism={"pp": 2, "ep": 4},
                          quantization={"weight": "bf16"}))
    assert engine_command(t)[9:] == ["--pipeline-parallel-size", "2", "--enable-expert-parallel", "--dtype", "bfloat16"]


def test_sglang_command() -> None:
    t = parse_template(_t("sglang", engine_args=ENGINE_ARGS, quantization={"weight": "awq", "kv_cache": "fp8_e4m3"}))
    assert engine_command(t) == [
        "python", "-m", "sglang.launch_server", "--model-path", "meta-llama/Llama-3.1-70B-Instruct",
        "--host", "{host}", "--port", "{port}", "--served-model-name", "llama-70b", "--enable-metrics",
        "--allowed-origins", "a", "b",
        "--enforce-eager",
        "--mem-fraction-static", "0.9",
        "--context-length", "8192",
        "--max-running-requests", "256",
        "--speculative-config", '{"method":"ngram","num_speculative_tokens":4}',
        "--tp-size", "2", "--dp-size", "2",
        "--quantization", "awq", "--kv-cache-dtype", "fp8_e4m3",
    ]


def test_mock_command() -> None:
    t = parse_template(_t("mock", accelerator={"type": "cpu", "count": 0}, parallelism={},
                          engine={"type": "mock", "serve_args": ["--output-tokens", "4"]},
                          engine_args={"latency_ms": 5}))
    assert engine_command(t) == [
        sys.executable, "-m", "overnight.cli.main", "mock-engine", "--host", "{host}", "--port", "{port}",
        "--model", "llama-70b", "--output-tokens", "4", "--latency-ms", "5",
    ]


def test_a_command_replaces_the_derived_one() -> None:
    t = parse_template(_t("vllm", engine={"type": "vllm", "command": ["/opt/vllm/bin/vllm", "serve", "m",
                                                                      "--port", "{port}"],
                                          "serve_args": ["--seed", "1"]},
                          engine_args={"max_num_seqs": 8}))
    assert engine_command(t) == ["/opt/vllm/bin/vllm", "serve", "m", "--port", "{port}", "--seed", "1",
                                 "--max-num-seqs", "8"]


PROFILE = {
    "name": "box",
    "env": {"HF_HOME": "/data/hf"},
    "secrets": {"HF_TOKEN": {"env": "MY_HF_TOKEN"}},
}


def test_local_spec_takes_env_and_secrets_from_the_profile() -> None:
    from overnight.runtimes.local import LocalSpec

    source = StaticSource([_t("vllm", engine={"type": "vllm", "ready_timeout_seconds": 900})], [PROFILE])
    r = resolve(source, {"name": "llama-70b"}, {"name": "box"})
    spec = local_spec(r, environ={"MY_HF_TOKEN": "s3cr3t-value"})
    assert spec == {
        "type": "local",
        "name": "llama-70b",
        "command": engine_command(r),
        "env": {"HF_HOME": "/data/hf", "HF_TOKEN": "s3cr3t-value"},
        "health_endpoint": "/health",
        "ready_timeout_seconds": 900,
        "gpus": 4,
    }
    LocalSpec.model_validate(spec)  # the runtime accepts it as it is
    assert "s3cr3t-value" not in str(r.to_record())  # the record keeps the reference only
    with pytest.raises(RuntimeStartError, match="secrets.HF_TOKEN: environment variable MY_HF_TOKEN is not set"):
        local_spec(r, environ={})
    k8s = StaticSource([_t("vllm")], [{"name": "k", "secrets": {"X": {"secret_key_ref": {"name": "s", "key": "k"}}}}])
    with pytest.raises(RuntimeStartError, match="Kubernetes Secret reference"):
        local_spec(resolve(k8s, {"name": "llama-70b"}, {"name": "k"}), environ={})


async def test_the_mock_template_starts_under_the_local_runtime(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The derived mock command really starts an engine that serves the template's name."""
    from pathlib import Path

    from overnight.runtimes.gpus import GpuPool
    from overnight.runtimes.local import LocalRuntime

    example = Path(__file__).resolve().parents[2] / "examples" / "templates" / "mock.yaml"
    doc = yaml.safe_load(example.read_text())
    doc.pop("kind")
    r = resolve(StaticSource([doc]), {"name": doc["name"]})
    runtime = LocalRuntime(log_dir=tmp_path / "engines", installation_id="templates-test", gpus=GpuPool(gpus=[]))
    handle = await runtime.acquire(local_spec(r), owner="t1")
    try:
        endpoint = await runtime.wait_ready(handle, timeout_s=30)
        async with httpx.AsyncClient() as client:
            models = (await client.get(f"{endpoint.url}/v1/models")).json()
        assert models["data"][0]["id"] == doc["name"]
    finally:
        await runtime.release(handle)
    assert not await runtime.alive(handle)
