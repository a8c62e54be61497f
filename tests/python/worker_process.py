"""Starting a worker process on loopback and waiting for it: shared by the demo evaluation
(models/evaluate_demo.py) and the GPU check (scripts/gpu/check_demo.py). Standard library only,
so it imports where grpcio does not."""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.request


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, worker: subprocess.Popen, seconds: float = 120.0) -> None:
    """Polls `url` until it answers 200; fails if the worker exits first or `seconds` pass."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        if worker.poll() is not None:
            raise RuntimeError(f"the worker exited with status {worker.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the worker was not ready at {url} within {seconds:.0f} s")
