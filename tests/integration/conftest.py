"""A real deployment for the integration tests: `shuffleinfer serve` in a subprocess
(real Ray, one prefill and one decode vLLM engine, the real HTTP server), started once
per session, plus helpers to pick real prompts from ../shared/data."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.serve_process import running_serve

REPO = Path(__file__).resolve().parents[2]
PROMPTS_FILE = REPO.parent / "shared" / "data" / "prompts" / "mixed_tasks.jsonl.gz"
CHUNK_SIZE = 256
MAX_MODEL_LEN = 2048
MAX_NUM_REQUESTS = 24


@pytest.fixture(scope="session")
def model_path() -> str:
    from shuffleinfer.model import resolve_model

    return resolve_model("SmolLM2-135M-Instruct")


@pytest.fixture(scope="session")
def tokenizer(model_path: str):  # noqa: ANN201 - a Hugging Face tokenizer
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


# Module scope: its engines stop before other test modules start deployments of their own
# (three deployments at once would crowd this machine's memory).
@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Base URL of a running `shuffleinfer serve` (1 prefill + 1 decode, chunk 256, decodes
    placed by the shuffle policy with the learned length predictor, at most
    MAX_NUM_REQUESTS held at once)."""
    args = ["--chunk-size", str(CHUNK_SIZE), "--max-model-len", str(MAX_MODEL_LEN),
            "--kv-cache-gib", "1", "--decode-policy", "shuffle", "--predictor-push-s", "1",
            "--max-num-requests", str(MAX_NUM_REQUESTS), "--retry-after-s", "2"]
    with running_serve(args, tmp_path_factory.mktemp("serve") / "serve.log") as url:
        yield url


def real_chat_prompts(tokenizer, buckets: list[tuple[int, int]]) -> list[list[int]]:  # noqa: ANN001
    """One real prompt (chat-templated token ids) per [lo, hi) token-length bucket, taken
    in file order from the shared mixed-task prompts, so runs are reproducible."""
    found: dict[tuple[int, int], list[int]] = {}
    with gzip.open(PROMPTS_FILE, "rt") as f:
        for line in f:
            row = json.loads(line)
            text = tokenizer.apply_chat_template(row["messages"], add_generation_prompt=True,
                                                 tokenize=False)
            ids = tokenizer(text, add_special_tokens=False).input_ids
            for bucket in buckets:
                if bucket not in found and bucket[0] <= len(ids) < bucket[1]:
                    found[bucket] = ids
                    break
            if len(found) == len(buckets):
                break
    missing = [b for b in buckets if b not in found]
    if missing:
        raise RuntimeError(f"no prompt of {missing} tokens in {PROMPTS_FILE}")
    return [found[b] for b in buckets]


def metric_values(url: str, name: str) -> dict[str, float]:
    """Samples of one Prometheus metric from /metrics, keyed by their label text."""
    values: dict[str, float] = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            key, _, value = line.rpartition(" ")
            values[key[len(name):]] = float(value)
    return values
