"""`shuffleinfer serve` in a subprocess for tests that need the real thing: started in
its own process group, waited for until /health says 200, stopped with SIGINT (the
server's own shutdown path) and killed if it does not stop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

STARTUP_TIMEOUT_S = 900


def free_port() -> int:
    """A free TCP port on loopback."""
    from shuffleinfer.engine.instance import free_port as free_port_on

    return free_port_on("127.0.0.1")


@contextmanager
def running_serve(args: Sequence[str], log_path: Path,
                  env: Mapping[str, str] | None = None) -> Iterator[str]:
    """Yield the base URL of `shuffleinfer serve ARGS` once it is healthy; fail the test
    with the end of its log if it exits or is not ready in time."""
    port = free_port()
    cmd = [sys.executable, "-m", "shuffleinfer", "serve", "--port", str(port), *args]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                env=dict(env) if env is not None else None,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"shuffleinfer serve exited with {proc.returncode}:\n"
                            f"{log_path.read_text()[-4000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not ready in {STARTUP_TIMEOUT_S} s:\n"
                            f"{log_path.read_text()[-4000:]}")
            time.sleep(2)
        yield url
    finally:
        stop_group(proc, signal.SIGINT)


def stop_group(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    """Signal a process group, then kill it if it has not exited within 60 s."""
    try:
        os.killpg(proc.pid, sig)
        proc.wait(timeout=60)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
