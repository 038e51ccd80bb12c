"""A stand-in engine for the local runtime tests (standard library only, starts fast).

    python fake_engine.py --port P [--sleep S] [--never-listen] [--exit-after S --exit-code K]
        [--lines N] [--child] [--ignore-term] [--env-file PATH] [--health-status CODE]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--sleep", type=float, default=0.0, help="seconds before listening")
    ap.add_argument("--never-listen", action="store_true")
    ap.add_argument("--exit-after", type=float, default=None, help="exit this many seconds after start")
    ap.add_argument("--exit-code", type=int, default=0)
    ap.add_argument("--lines", type=int, default=0, help="print this many numbered lines at start")
    ap.add_argument("--child", action="store_true", help="spawn a grandchild that sleeps forever")
    ap.add_argument("--ignore-term", action="store_true", help="ignore SIGTERM (and so does the child)")
    ap.add_argument("--env-file", default=None)
    ap.add_argument("--health-status", type=int, default=200)
    args = ap.parse_args()

    if args.ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if args.env_file:
        with open(args.env_file + ".tmp", "w") as f:
            json.dump({"pid": os.getpid(), "env": dict(os.environ)}, f)
        os.replace(args.env_file + ".tmp", args.env_file)
    for i in range(args.lines):
        print(f"fake engine line {i + 1}", flush=True)
    if args.child:
        # Inherits SIG_IGN for SIGTERM when --ignore-term is set.
        subprocess.Popen([sys.executable, "-c", "import time\nwhile True: time.sleep(1)"])
    if args.exit_after is not None:
        def _exit() -> None:
            time.sleep(args.exit_after)
            print(f"fake engine exiting with {args.exit_code}", flush=True)
            os._exit(args.exit_code)

        threading.Thread(target=_exit, daemon=True).start()
    time.sleep(args.sleep)
    if args.never_listen:
        while True:
            time.sleep(1)

    status = args.health_status

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            code = status if self.path == "/health" else 200
            body = b'{"ok": true}'
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    print(f"fake engine listening on {args.port}", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
