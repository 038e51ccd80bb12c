"""A stand-in service: acquires one local engine, writes its handle, then waits to be killed.

    python service_stub.py LOG_DIR INSTALLATION_ID HANDLE_OUT SPEC_JSON
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

from overnight.runtimes.gpus import GpuPool
from overnight.runtimes.local import LocalRuntime


async def main() -> None:
    log_dir, installation_id, out, spec = sys.argv[1:5]
    rt = LocalRuntime(log_dir=Path(log_dir), installation_id=installation_id, gpus=GpuPool(gpus=[]))
    handle = await rt.acquire(json.loads(spec), owner="batch_stub")
    await rt.wait_ready(handle, timeout_s=30)
    Path(out + ".tmp").write_text(json.dumps(handle))
    os.replace(out + ".tmp", out)
    await asyncio.sleep(3600)


asyncio.run(main())
