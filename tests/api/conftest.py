"""Fixtures for the api tests: a real tokenizer, a scripted fake backend, an HTTP client.

The tokenizer is the default model's when available (`SHUFFLEINFER_TEST_MODEL`, else
`~/.cache/shuffleinfer/models/SmolLM2-135M-Instruct`); otherwise (or with
`SHUFFLEINFER_TEST_MODEL=builtin`) a byte-level tokenizer
built in memory, with a BOS token both in its chat template and added by `encode`, so the
double-BOS trap is live. Neither needs the network.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from shuffleinfer.api import create_app
from shuffleinfer.protocol import (
    FinishReason,
    GenerateRequest,
    HealthReport,
    InstanceLoad,
    InstanceRole,
    KVTransferStats,
    PredictionStats,
    RoleChangeError,
    TokenDelta,
    TokenLogprob,
    UnknownInstanceError,
)

DEFAULT_MODEL_DIR = Path.home() / ".cache/shuffleinfer/models/SmolLM2-135M-Instruct"
CHATML_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
REPLY = "Hello there, friend!"
API_KEY = "test-key"


def build_byte_tokenizer() -> Any:
    """A byte-level HF tokenizer with `<s>` BOS and a ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(["<s>", "</s>", "<|im_start|>", "<|im_end|>"])
    bos_id = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", bos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>",
                                   eos_token="</s>", chat_template=CHATML_TEMPLATE)


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    """The default model's tokenizer if it is on disk, else the in-memory byte tokenizer.

    `SHUFFLEINFER_TEST_MODEL=builtin` forces the in-memory one.
    """
    model_dir = os.environ.get("SHUFFLEINFER_TEST_MODEL")
    if model_dir == "builtin":
        return build_byte_tokenizer()
    path = Path(model_dir) if model_dir else DEFAULT_MODEL_DIR
    if (path / "tokenizer_config.json").exists():
        # Not AutoTokenizer: it imports torch, which takes seconds on a busy machine.
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(path)
    if model_dir:
        pytest.fail(f"SHUFFLEINFER_TEST_MODEL={model_dir} has no tokenizer_config.json")
    return build_byte_tokenizer()


class FakeBackend:
    """A `Backend` that streams `REPLY` token by token and records what happened.

    The first delta comes from "prefill-0", the rest from "decode-0". It stops with
    "length" at max_tokens, else "stop" at the end of the reply. Set `first_delay_s` /
    `delay_s` for known TTFT / inter-token gaps, `fail_at`/`error` to raise before the
    delta with that index, `script` to replace the deltas altogether.
    """

    def __init__(self, tokenizer: Any, *, max_model_len: int = 256) -> None:
        self.model_name = "fake/model-path"
        self.max_model_len = max_model_len
        self.tokenizer = tokenizer
        self.reply_ids: list[int] = tokenizer.encode(REPLY, add_special_tokens=False)
        self.first_delay_s = 0.0
        self.delay_s = 0.0
        self.fail_at: int | None = None
        self.error: BaseException = RuntimeError("engine exploded")
        self.script: Callable[[GenerateRequest], list[TokenDelta]] | None = None
        self.ready = True
        self.health_instances: tuple[InstanceLoad, ...] | None = None
        self.failovers: dict[str, int] = {}
        self.kv = KVTransferStats()
        self.predictions = PredictionStats()
        self.requests: list[GenerateRequest] = []
        self.completed: list[str] = []
        self.aborted: list[str] = []
        """req_ids whose iterator was closed (or cancelled) before it finished."""
        self.loads: dict[str, InstanceLoad] = {load.instance_id: load for load in (
            InstanceLoad("prefill-0", "prefill", ready=True, num_waiting_reqs=2,
                         num_queued_prompt_tokens=300),
            InstanceLoad("prefill-1", "prefill", ready=True),
            InstanceLoad("decode-0", "decode", ready=True, num_running_reqs=1,
                         kv_cache_usage=0.25),
            InstanceLoad("decode-1", "decode", ready=True),
        )}
        """What the admin routes see and change (`health()` does not read it)."""

    def deltas_for(self, request: GenerateRequest) -> list[TokenDelta]:
        """The scripted output of `request`."""
        if self.script is not None:
            return self.script(request)
        ids = self.reply_ids[: request.sampling.max_tokens]
        finish: FinishReason = "length" if len(ids) < len(self.reply_ids) else "stop"
        num_top = request.sampling.logprobs
        deltas = []
        for i, token_id in enumerate(ids):
            text = self.tokenizer.decode([token_id])
            logprobs = None
            if num_top is not None:
                top = tuple((f"alt{k}", -1.0 - k) for k in range(num_top))
                logprobs = (TokenLogprob(token_id, text, -0.25 * (i + 1), top),)
            deltas.append(TokenDelta(
                token_ids=(token_id,), text=text, logprobs=logprobs,
                finish_reason=finish if i == len(ids) - 1 else None,
                prefill_instance="prefill-0" if i == 0 else None,
                decode_instance="decode-0" if i > 0 else None))
        return deltas

    def generate(self, request: GenerateRequest) -> AsyncIterator[TokenDelta]:
        """Stream the scripted deltas of `request`."""
        return self._stream(request)

    async def _stream(self, request: GenerateRequest) -> AsyncIterator[TokenDelta]:
        self.requests.append(request)
        try:
            for i, delta in enumerate(self.deltas_for(request)):
                await asyncio.sleep(self.first_delay_s if i == 0 else self.delay_s)
                if self.fail_at == i:
                    raise self.error
                yield delta
        except (GeneratorExit, asyncio.CancelledError):
            self.aborted.append(request.req_id)
            raise
        self.completed.append(request.req_id)

    async def health(self) -> HealthReport:
        """Ready when `self.ready`; one prefill and one decode instance (or, when set,
        `self.health_instances`, ready when all of them are)."""
        if self.health_instances is not None:
            return HealthReport(ready=all(x.ready for x in self.health_instances),
                                instances=self.health_instances)
        return HealthReport(ready=self.ready, instances=(
            InstanceLoad("prefill-0", "prefill", ready=self.ready),
            InstanceLoad("decode-0", "decode", ready=True, num_running_reqs=1),
        ))

    async def kv_stats(self) -> KVTransferStats:
        """The current `self.kv`; its `seconds` are drained like a real backend's."""
        stats = self.kv
        self.kv = dataclasses.replace(stats, transports={
            name: dataclasses.replace(t, seconds=()) for name, t in stats.transports.items()})
        return stats

    async def prediction_stats(self) -> PredictionStats:
        """The current `self.predictions`; its samples are drained like a real backend's."""
        stats = self.predictions
        self.predictions = dataclasses.replace(stats, abs_errors=(), predict_seconds=())
        return stats

    async def failover_stats(self) -> dict[str, int]:
        """The current `self.failovers`."""
        return dict(self.failovers)

    async def instances(self) -> tuple[InstanceLoad, ...]:
        """Every instance in `self.loads`."""
        return tuple(self.loads.values())

    async def drain(self, instance_id: str) -> InstanceLoad:
        """Mark it draining, unless it is flipping or its role's last active instance."""
        load = self._load(instance_id)
        if load.state == "flipping":
            raise RoleChangeError(f"{instance_id} is flipping")
        if load.state == "active":
            self._refuse_if_last_active(load)
        return self._set(load, state="draining")

    async def resume(self, instance_id: str) -> InstanceLoad:
        """Mark it active again, unless it is flipping."""
        load = self._load(instance_id)
        if load.state == "flipping":
            raise RoleChangeError(f"{instance_id} is flipping")
        return self._set(load, state="active")

    async def flip(self, instance_id: str, role: InstanceRole | None = None) -> InstanceLoad:
        """Mark it flipping (it never finishes here), after the protocol's checks."""
        load = self._load(instance_id)
        if role == load.role:
            raise RoleChangeError(f"{instance_id} already is a {role} instance")
        if load.state == "flipping":
            raise RoleChangeError(f"{instance_id} is already flipping")
        if load.state == "active":
            self._refuse_if_last_active(load)
        return self._set(load, state="flipping")

    def _load(self, instance_id: str) -> InstanceLoad:
        if instance_id not in self.loads:
            raise UnknownInstanceError(instance_id)
        return self.loads[instance_id]

    def _refuse_if_last_active(self, load: InstanceLoad) -> None:
        others = [other for other in self.loads.values() if other.role == load.role
                  and other.state == "active" and other.instance_id != load.instance_id]
        if not others:
            raise RoleChangeError(f"{load.instance_id} is the last active {load.role} "
                                  "instance")

    def _set(self, load: InstanceLoad, **changes: Any) -> InstanceLoad:
        self.loads[load.instance_id] = dataclasses.replace(load, **changes)
        return self.loads[load.instance_id]


@pytest.fixture
def backend(tokenizer: Any) -> FakeBackend:
    """A fresh fake backend per test."""
    return FakeBackend(tokenizer)


@pytest.fixture
def app(backend: FakeBackend) -> FastAPI:
    """The api over the fake backend, served as "smol"."""
    return create_app(backend, served_model_name="smol")


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client talking to `app` in-process."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        yield http


def parse_sse(body: str) -> list[Any]:
    """The `data:` payloads of an SSE body, JSON-decoded ("[DONE]" kept as a string).

    Fails on anything but `data: <payload>\\n\\n` framing.
    """
    import json

    assert body.endswith("\n\n"), body[-50:]
    events = []
    for block in body[:-2].split("\n\n"):
        assert block.startswith("data: ") and "\n" not in block, block
        payload = block[len("data: "):]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text as {(sample name, sorted labels): value}."""
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def metric(text: str, name: str, **labels: str) -> float:
    """One sample's value from Prometheus text (0 when absent)."""
    return metric_samples(text).get((name, tuple(sorted(labels.items()))), 0.0)
