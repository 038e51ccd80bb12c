"""Template documents for the tests, as YAML text."""

from __future__ import annotations

import textwrap


def template_yaml(name: str = "llama-8b", version: str = "1.0", *, status: str = "active", engine: str = "vllm",
                  count: int = 1, tp: int = 1, extra_spec: str = "") -> str:
    acc_type = "cpu" if count == 0 else "H100"
    body = f"""\
    kind: ModelDeploymentTemplate
    name: {name}
    version: "{version}"
    status: {status}
    spec:
      engine:
        type: {engine}
      model_source:
        type: huggingface
        uri: meta-llama/Llama-3.1-8B-Instruct
      accelerator:
        type: {acc_type}
        count: {count}
      parallelism:
        tp: {tp}
      supported_endpoints: [/v1/chat/completions]
    """
    return textwrap.dedent(body) + textwrap.indent(textwrap.dedent(extra_spec), "  ")


PROFILE = """\
kind: Profile
name: gpu-box
secrets:
  HF_TOKEN: {env: HF_TOKEN}
env:
  HF_HOME: /data/hf
node_selector: {pool: gpu}
"""
