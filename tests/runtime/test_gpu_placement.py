"""GPU nodes (skipped on CPU machines): an instance spanning two GPUs runs vLLM tensor
parallel inside its STRICT_PACK placement group, and prefill/decode still hand over."""

from __future__ import annotations

import os
from collections.abc import Iterator

import httpx
import pytest

from tests.serve_process import running_serve

pytestmark = [pytest.mark.gpu, pytest.mark.engine]

# Tensor parallel needs a model whose heads divide by 2 (the default model's 9 do not).
MODEL = os.environ.get("SHUFFLEINFER_TP_TEST_MODEL", "Qwen/Qwen2.5-0.5B-Instruct")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    import torch

    if torch.cuda.device_count() < 4:
        pytest.skip("needs 4 GPUs: 1 prefill + 1 decode instance of 2 GPUs each")
    args = ["--model", MODEL, "--gpus-per-instance", "2", "--max-model-len", "2048"]
    with running_serve(args, tmp_path_factory.mktemp("gpu") / "serve.log") as url:
        yield url


def test_tensor_parallel_instances_serve(server: str) -> None:
    reply = httpx.post(f"{server}/v1/completions", timeout=120, json={
        "model": MODEL, "prompt": "The capital of France is",
        "max_tokens": 8, "temperature": 0})
    assert reply.status_code == 200, reply.text
    assert "Paris" in reply.json()["choices"][0]["text"]
    instances = httpx.get(f"{server}/health").json()["instances"]
    assert {i["instance_id"] for i in instances} == {"prefill-0", "decode-0"}
    assert all(i["ready"] for i in instances)
