"""The mock inference engine behind ``overnight mock-engine``.

A fast OpenAI-compatible fake LLM server for trying overnight without a GPU,
for tests, and as a load target for throughput benchmarks. See
:mod:`overnight.mock_engine.app` for endpoints, latency model and the
deterministic ``[[mock:...]]`` test triggers.
"""

from overnight.mock_engine.app import MockEngineApp, MockEngineConfig, create_app, run, serve

__all__ = ["MockEngineApp", "MockEngineConfig", "create_app", "run", "serve"]
