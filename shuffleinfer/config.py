"""User-facing configuration of `shuffleinfer serve`.

One `ServeConfig` can be written as YAML (`--config FILE.yaml`) and overridden by CLI
flags. Unknown keys and out-of-range values are errors naming the field. vLLM engine
arguments pass through untouched in `engine_args`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from shuffleinfer.scheduler.policies.admission import ADMISSION_POLICIES
from shuffleinfer.scheduler.policies.flip import FLIP_POLICIES, FlipConfig
from shuffleinfer.scheduler.policies.placement import (
    PLACEMENT_POLICIES,
    PREFILL_PLACEMENT_POLICIES,
)
from shuffleinfer.scheduler.policies.prefill_order import PREFILL_ORDER_POLICIES
from shuffleinfer.scheduler.policies.registry import lookup

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


class ServeConfig(BaseModel):
    """Everything `shuffleinfer serve` needs to start a cluster and its HTTP server."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    model: str = Field(DEFAULT_MODEL_NAME, description=(
        "Embedded model name, Hugging Face model id, or local path."))
    served_model_name: str | None = Field(None, description=(
        "Name clients put in `model`; defaults to the model argument."))
    host: str = Field("127.0.0.1", description="HTTP bind address.")
    port: int = Field(8000, ge=0, le=65535, description="HTTP port (0 picks a free one).")
    num_prefill: int = Field(1, ge=1, le=1024, description="Prefill instances.")
    num_decode: int = Field(1, ge=1, le=1024, description="Decode instances.")
    chunk_size: int | None = Field(None, ge=16, le=1 << 20, description=(
        "Prefill chunk in tokens (vLLM max_num_batched_tokens on every instance). None: "
        "the calibrated chunk size for this model if `shuffleinfer calibrate` saved one, "
        "else 512."))
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description=(
            "Model and KV cache dtype, the same on every instance. auto: float32 on CPU "
            "(bf16 near-ties flip greedy answers of small models), the model's own on GPU."))
    max_model_len: int | None = Field(4096, ge=16, description=(
        "Context length; None uses the model's own."))
    kv_cache_gib: int = Field(2, ge=1, description=(
        "KV cache per instance on CPU, GiB (VLLM_CPU_KVCACHE_SPACE)."))
    cpus_per_instance: int = Field(1, ge=1, description=(
        "Cores bound to each instance's engine on CPU (and its Ray CPU request)."))
    kv_host: str | None = Field(None, description=(
        "Interface the KV servers bind to. Default: 127.0.0.1 on a local Ray, each node's "
        "own address when joining a cluster (--address)."))
    kv_transport: Literal["auto", "tcp", "shm", "nccl"] = Field("auto", description=(
        "KV hand-over wire. auto picks per prefill/decode pair: same host -> shm (nccl "
        "between GPUs), across hosts -> nccl between GPUs, else tcp."))
    kv_overlap: bool = Field(True, description=(
        "Overlap the KV hand-over with the prefill: each finished chunk's KV is copied out "
        "while the next chunks compute, so only the last chunk is left when the prefill "
        "ends. False: the decode pulls the whole prompt's KV after the prefill."))
    kv_lease_s: float = Field(30.0, gt=0, description=(
        "Seconds a prefilled KV cache waits for its decode before it is freed."))
    address: str | None = Field(None, description=(
        "Ray cluster to join (auto or HOST:PORT); None starts a local one."))
    prefill_resources: dict[str, float] = Field(default_factory=dict, description=(
        "Custom Ray resources each prefill instance requests, e.g. {\"prefill_pool\": 1}: "
        "prefill instances land only on nodes that offer them."))
    decode_resources: dict[str, float] = Field(default_factory=dict, description=(
        "Custom Ray resources each decode instance requests."))
    prefill_node_labels: dict[str, str] = Field(default_factory=dict, description=(
        "Ray node labels a prefill instance's node must carry (a label selector)."))
    decode_node_labels: dict[str, str] = Field(default_factory=dict, description=(
        "Ray node labels a decode instance's node must carry."))
    gpus_per_instance: int = Field(1, ge=1, le=64, description=(
        "GPUs per instance on GPU nodes = its tensor-parallel size; they are reserved "
        "in one placement group on one node."))
    max_restarts: int = Field(0, ge=-1, description=(
        "Times Ray restarts a dead instance actor (-1: without limit)."))
    max_num_requests: int = Field(1024, ge=1, le=1 << 20, description=(
        "Generation requests the server holds at once (running or waiting anywhere in the "
        "cluster); past it, new ones are refused at once with HTTP 429 and Retry-After, "
        "so a burst cannot grow queues and memory without bound."))
    retry_after_s: int = Field(1, ge=1, le=3600, description=(
        "Seconds a refused (429) client is told to wait before retrying (Retry-After)."))
    api_key: str | None = Field(None, min_length=1, description=(
        "If set, /v1 needs this Bearer token."))
    admin_token: str | None = Field(None, min_length=1, description=(
        "Bearer token required by the /admin routes; if unset, the environment variable "
        "SHUFFLEINFER_ADMIN_TOKEN; if neither, admin routes answer 403."))
    prefill_policy: str = Field("least_load", description="Prefill placement policy.")
    decode_policy: str = Field("least_load", description="Decode placement policy.")
    prefill_order: str = Field("sjf", description=(
        "Order of each prefill instance's own queue: fcfs, sjf or ljf by prompt length, "
        "sorted within windows of --sched-window arrivals (the paper's best: sjf)."))
    sched_window: int = Field(16, ge=1, le=1 << 16, description=(
        "Prompts are reordered only within windows of this many arrivals."))
    admission: str = Field("greedy", description=(
        "Decode admission on each decode instance: greedy, reserve_static (the predicted "
        "KV need fits now) or reserve_dynamic (it fits once the shortest running decode "
        "ends)."))
    heavy_threshold_tokens: int = Field(128, ge=0, description=(
        "A decode predicted to output more than this is heavy (shuffle placement)."))
    monitor_interval_ms: int = Field(100, ge=10, le=60_000, description=(
        "How often the cluster monitor gathers every instance's load for placement and "
        "flips."))
    flip_policy: str = Field("idle_or_imbalance", description=(
        "When an instance changes role: never, idle (idle for --flip-idle-s while the other "
        "role is all busy) or idle_or_imbalance (also a sustained imbalance between prefill "
        "queueing delay and decode KV use)."))
    flip_idle_s: float = Field(60.0, gt=0, description=(
        "Seconds an instance must be idle before it may flip."))
    flip_options: dict[str, float] = Field(default_factory=dict, description=(
        "Other flip thresholds, JSON: sustain_s, prefill_delay_high_s, prefill_delay_low_s, "
        "decode_utilisation_low, decode_utilisation_high, min_instances_per_role."))
    predictor: str = Field("ngram", description=(
        "Output-length predictor: ngram (learns online from finished requests) or "
        "running_median."))
    predictor_state: Path | None = Field(None, description=(
        "File the predictor's learned state is loaded from at start (if it exists) and "
        "saved to as it learns and on shutdown."))
    predictor_push_s: float = Field(5.0, gt=0, description=(
        "Seconds between pushes of the learner's newer model to the prefill instances."))
    cache_dir: Path | None = Field(None, description=(
        "Where embedded models are prepared (default ~/.cache/shuffleinfer/models)."))
    engine_args: dict[str, Any] = Field(default_factory=dict, description=(
        "Extra vLLM engine arguments, passed through as given."))

    @field_validator("prefill_policy", "decode_policy", "prefill_order", "admission",
                     "flip_policy")
    @classmethod
    def _known_policy(cls, name: str, info: ValidationInfo) -> str:
        registries: dict[str, Mapping[str, object]] = {
            "prefill_policy": PREFILL_PLACEMENT_POLICIES, "decode_policy": PLACEMENT_POLICIES,
            "prefill_order": PREFILL_ORDER_POLICIES, "admission": ADMISSION_POLICIES,
            "flip_policy": FLIP_POLICIES}
        lookup(registries[str(info.field_name)], name, "policy")
        return name

    @field_validator("flip_options")
    @classmethod
    def _flip_options(cls, options: dict[str, float]) -> dict[str, float]:
        if "flip_idle_s" in options:
            raise ValueError("set flip_idle_s with --flip-idle-s")
        FlipConfig.model_validate(options)
        return options

    def flip_config(self) -> FlipConfig:
        """The flip policy's thresholds."""
        return FlipConfig.model_validate({**self.flip_options, "flip_idle_s": self.flip_idle_s})

    @field_validator("predictor")
    @classmethod
    def _known_predictor(cls, name: str) -> str:
        from shuffleinfer.scheduler.predictors import PREDICTORS

        if name not in PREDICTORS:
            raise ValueError(f"unknown predictor {name!r}; known: {', '.join(PREDICTORS)}")
        return name

    @field_validator("prefill_resources", "decode_resources")
    @classmethod
    def _custom_only(cls, resources: dict[str, float]) -> dict[str, float]:
        builtin = {"CPU", "GPU", "memory", "object_store_memory"} & set(resources)
        if builtin:
            raise ValueError(f"{', '.join(sorted(builtin))} is not a custom resource; use "
                             "--cpus-per-instance / --gpus-per-instance")
        negative = [k for k, v in resources.items() if v <= 0]
        if negative:
            raise ValueError(f"resource amounts must be > 0: {', '.join(negative)}")
        return resources

    @field_validator("engine_args")
    @classmethod
    def _not_owned(cls, args: dict[str, Any]) -> dict[str, Any]:
        owned = {"model", "kv_transfer_config", "max_num_batched_tokens", "dtype",
                 "max_model_len", "tensor_parallel_size"} & set(args)
        if owned:
            raise ValueError(f"set {', '.join(sorted(owned))} with its own option, "
                             "not through engine_args")
        return args

    @property
    def num_instances(self) -> int:
        return self.num_prefill + self.num_decode


def load_config(path: Path | None, overrides: dict[str, Any]) -> ServeConfig:
    """Read a YAML config (if any) and apply CLI overrides on top; raises ValueError or
    pydantic.ValidationError naming the bad field."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML: {e}") from e
        if loaded is not None and not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a mapping of options, got {type(loaded).__name__}")
        data = dict(loaded or {})
    overrides = dict(overrides)
    file_engine_args, flag_engine_args = data.get("engine_args"), overrides.get("engine_args")
    if isinstance(file_engine_args, dict) and isinstance(flag_engine_args, dict):
        # Flags override the file key by key: one --engine-arg must not drop the others.
        overrides["engine_args"] = {**file_engine_args, **flag_engine_args}
    data.update(overrides)
    return ServeConfig.model_validate(data)
