"""The mock inference engine behind ``overnight mock-engine``.

A fast OpenAI-compatible fake LLM server for trying overnight without a GPU,
for tests, and as a load target for throughput benchmarks. See
:mod:`overnight.mock_engine.app` for endpoints and the latency model, and
:mod:`overnight.mock_engine.directives` for the deterministic ``[[mock:...]]``
test triggers.
"""

from overnight.mock_engine.app import MockEngineApp, create_app
from overnight.mock_engine.config import MockEngineConfig
from overnight.mock_engine.server import run, serve
from overnight.mock_engine.stats import MockEngineStats

__all__ = ["MockEngineApp", "MockEngineConfig", "MockEngineStats", "create_app", "run", "serve"]
