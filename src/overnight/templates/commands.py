"""The command line that starts a template's engine, and the local runtime's spec.

Commands keep the literal ``{host}`` and ``{port}`` placeholders; the runtime
fills them in (it picks a free port). The engine serves the model under the
template's ``name`` (``--served-model-name``), so request lines use it as ``model``.

``engine_args`` become flags in key order: ``max_num_seqs: 256`` ->
``--max-num-seqs 256``; a list -> the flag then each item; a mapping -> the flag
then its JSON; ``null`` -> nothing; ``true`` -> the bare flag; ``false`` ->
``--no-<flag>`` for vLLM (its boolean flags all take the ``--no-`` form, so a
default-on feature such as prefix caching can be turned off) and nothing for the
other engines (SGLang's boolean flags are switches that default off).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from typing import Any

from overnight.errors import RuntimeStartError
from overnight.templates.resolve import Resolved
from overnight.templates.schema import ModelDeploymentTemplate

__all__ = ["engine_command", "flags", "local_spec"]

#: SGLang names for vLLM-style engine_args (as AIBrix's adapter maps them).
_SGLANG_NAMES = {
    "max_num_seqs": "max_running_requests",
    "gpu_memory_utilization": "mem_fraction_static",
    "max_model_len": "context_length",
}
_DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16"}


def _text(value: Any) -> str:
    if isinstance(value, Mapping):
        return json.dumps(value, separators=(",", ":"), sort_keys=True)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def flags(args: Mapping[str, Any], *, rename: Mapping[str, str] | None = None, no_prefix: bool = False) -> list[str]:
    """``engine_args`` as command-line flags (see the module docstring)."""
    out: list[str] = []
    for key in sorted(args):
        value = args[key]
        norm = key.replace("-", "_")
        name = (rename or {}).get(norm, norm).replace("_", "-")
        flag = f"--{name}"
        if value is None:
            continue
        if value is True:
            out.append(flag)
        elif value is False:
            if no_prefix:
                out.append(f"--no-{name}")
        elif isinstance(value, list):
            if value:
                out += [flag, *(_text(v) for v in value)]
        else:
            out += [flag, _text(value)]
    return out


def _quantization(t: ModelDeploymentTemplate) -> list[str]:
    q = t.spec.quantization
    out: list[str] = []
    if q.weight:
        dtype = _DTYPES.get(q.weight.lower())
        out += ["--dtype", dtype] if dtype else ["--quantization", q.weight]
    if q.kv_cache:
        out += ["--kv-cache-dtype", q.kv_cache]
    return out


def _vllm(t: ModelDeploymentTemplate) -> list[str]:
    s = t.spec
    argv = ["vllm", "serve", s.model_source.uri, "--host", "{host}", "--port", "{port}", "--served-model-name", t.name]
    if s.model_source.revision:
        argv += ["--revision", s.model_source.revision]
    if s.model_source.tokenizer_path:
        argv += ["--tokenizer", s.model_source.tokenizer_path]
    if s.model_source.chat_template_path:
        argv += ["--chat-template", s.model_source.chat_template_path]
    argv += s.engine.serve_args
    argv += flags(s.engine_args, no_prefix=True)
    p = s.parallelism
    for size, flag in ((p.tp, "--tensor-parallel-size"), (p.pp, "--pipeline-parallel-size"),
                       (p.dp, "--data-parallel-size")):
        if size > 1:
            argv += [flag, str(size)]
    if p.ep > 1:  # vLLM sizes expert parallelism from tp*dp itself
        argv.append("--enable-expert-parallel")
    return argv + _quantization(t)


def _sglang(t: ModelDeploymentTemplate) -> list[str]:
    s = t.spec
    argv = ["python", "-m", "sglang.launch_server", "--model-path", s.model_source.uri,
            "--host", "{host}", "--port", "{port}", "--served-model-name", t.name, "--enable-metrics"]
    if s.model_source.revision:
        argv += ["--revision", s.model_source.revision]
    if s.model_source.tokenizer_path:
        argv += ["--tokenizer-path", s.model_source.tokenizer_path]
    if s.model_source.chat_template_path:
        argv += ["--chat-template", s.model_source.chat_template_path]
    argv += s.engine.serve_args
    argv += flags(s.engine_args, rename=_SGLANG_NAMES)
    p = s.parallelism
    for size, flag in ((p.tp, "--tp-size"), (p.pp, "--pp-size"), (p.dp, "--dp-size"), (p.ep, "--ep-size")):
        if size > 1:
            argv += [flag, str(size)]
    return argv + _quantization(t)


def _mock(t: ModelDeploymentTemplate) -> list[str]:
    s = t.spec
    argv = [sys.executable, "-m", "overnight.cli.main", "mock-engine",
            "--host", "{host}", "--port", "{port}", "--model", t.name]
    return argv + s.engine.serve_args + flags(s.engine_args)


_BUILDERS = {"vllm": _vllm, "sglang": _sglang, "mock": _mock}


def engine_command(template: ModelDeploymentTemplate | Resolved) -> list[str]:
    """The argv that starts the engine, with ``{host}`` / ``{port}`` left for the runtime.

    ``spec.engine.command`` replaces the derived command; ``serve_args`` and
    ``engine_args`` (as plain flags) are appended to it."""
    t = template.template if isinstance(template, Resolved) else template
    engine = t.spec.engine
    if engine.command is not None:
        return [*engine.command, *engine.serve_args, *flags(t.spec.engine_args)]
    return _BUILDERS[engine.type](t)


def local_spec(resolved: Resolved, *, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The ``local`` runtime's spec for this template and profile.

    ``env`` holds the profile's ``env`` and its secrets read from ``environ``
    (default ``os.environ``) at this moment: the result may hold secret values, so
    build it when starting the engine and never store it. Raises
    ``RuntimeStartError`` naming a secret that cannot be read here."""
    t = resolved.template
    env: dict[str, str] = {}
    profile = resolved.profile
    if profile is not None:
        env.update(profile.env)
        source = os.environ if environ is None else environ
        for var, ref in profile.secrets.items():
            where = f"profile {profile.name!r}: secrets.{var}"
            if ref.env is None:
                raise RuntimeStartError(
                    f"{where} is a Kubernetes Secret reference; the local runtime reads only environment "
                    "variables ({env: VAR})"
                )
            if ref.env not in source:
                raise RuntimeStartError(f"{where}: environment variable {ref.env} is not set for overnight")
            env[var] = source[ref.env]
    return {
        "type": "local",
        "name": t.name,
        "command": engine_command(t),
        "env": env,
        "health_endpoint": t.spec.engine.health_endpoint,
        "ready_timeout_seconds": t.spec.engine.ready_timeout_seconds,
        "gpus": t.spec.accelerator.gpus,
    }
