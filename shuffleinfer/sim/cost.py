"""Cost models: how long one engine step takes, and how long a KV hand-over takes.

A step's latency is linear in its work, the form DistServe's simulator fits:
- prefill part: `prefill_base + prefill_per_token * T + prefill_per_attn * A`, with T the
  prompt tokens batched in the step and A the attention work, the sum over the step's
  prompt slices of `s * (o + s)` for a slice of `s` tokens at offset `o` in its prompt
  (a whole prompt of `l` tokens gives `l**2`, DistServe's term);
- decode part: `decode_base + decode_per_req * B + decode_per_ctx * C`, with B the
  decodes in the step and C their summed context (prompt plus tokens so far);
- a colocated step that does both costs the larger base plus both variable parts.
KV hand-over of `n` tokens takes `n * kv_bytes_per_token / link_bytes_per_s`.

Models are chosen by name (`COST_MODELS`): GPU ones from published coefficients, and
`cpu`, fitted on this machine by `shuffleinfer calibrate --profile` (`fit_cost_model`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from shuffleinfer.scheduler.policies.registry import lookup


@dataclass(frozen=True)
class LinearCost:
    """Step and hand-over latency, in seconds."""

    name: str
    prefill_base_s: float
    prefill_per_token_s: float
    prefill_per_attn_s: float
    decode_base_s: float
    decode_per_req_s: float
    decode_per_ctx_s: float
    kv_bytes_per_token: float
    link_bytes_per_s: float
    source: str = ""
    """Where the coefficients come from."""

    def prefill_s(self, tokens: int, attn: float) -> float:
        return self.prefill_base_s + self.prefill_per_token_s * tokens \
            + self.prefill_per_attn_s * attn

    def decode_s(self, batch: int, context: int) -> float:
        return self.decode_base_s + self.decode_per_req_s * batch \
            + self.decode_per_ctx_s * context

    def step_s(self, tokens: int, attn: float, batch: int, context: int) -> float:
        """A step with `tokens` of prompt work and `batch` decodes (either may be 0)."""
        if batch == 0:
            return self.prefill_s(tokens, attn)
        if tokens == 0:
            return self.decode_s(batch, context)
        return max(self.prefill_base_s, self.decode_base_s) \
            + self.prefill_per_token_s * tokens + self.prefill_per_attn_s * attn \
            + self.decode_per_req_s * batch + self.decode_per_ctx_s * context

    def handover_s(self, tokens: int) -> float:
        return tokens * self.kv_bytes_per_token / self.link_bytes_per_s

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> LinearCost:
        try:
            return cls(**json.loads(Path(path).read_text()))
        except (OSError, ValueError, TypeError) as e:
            raise ValueError(f"{path}: not a cost model file: {e}") from None


_MS = 1e-3

# DistServe's simulator, OPT-13B on one A100-80GB SXM (TP 1), fitted in milliseconds:
# prefill = 16.4569 + 0.0926475 * sum(l) + 6.47479e-06 * sum(l**2); decode (batch < 95) =
# 19.9347 + 0.000626936 * sum(context) + 0.0385070 * batch. Source: LLMServe/DistServe,
# simdistserve/estimators/profile_data/profiler-a100-80g.distserve.json ("facebook/opt-13b",
# "1"), read by simdistserve/estimators/time_estimator.py. KV of OPT-13B in fp16:
# 2 (K, V) * 40 layers * 5120 * 2 bytes = 800 KiB per token; links: the paper's
# clusters hand KV over NVLink within a node (~150 GB/s usable) or 200 Gb/s InfiniBand.
A100_OPT13B = LinearCost(
    name="a100-opt13b",
    prefill_base_s=16.456860431694288 * _MS, prefill_per_token_s=0.09264750660897617 * _MS,
    prefill_per_attn_s=6.474785740229194e-06 * _MS,
    decode_base_s=19.934702624895458 * _MS, decode_per_req_s=0.03850697740828398 * _MS,
    decode_per_ctx_s=0.0006269356524350583 * _MS,
    kv_bytes_per_token=2 * 40 * 5120 * 2, link_bytes_per_s=25e9,
    source="DistServe simdistserve profiler-a100-80g.distserve.json, facebook/opt-13b TP=1; "
           "KV over 200 Gb/s InfiniBand")

COST_MODELS: dict[str, LinearCost] = {A100_OPT13B.name: A100_OPT13B}


def default_profile_path(cache_dir: Path | None = None) -> Path:
    """Where `calibrate --profile` saves the fitted CPU model (beside the calibrations)."""
    from shuffleinfer.model.prepare import default_cache_dir

    return (cache_dir or default_cache_dir()) / "calibration" / "cpu-cost-model.json"


def make_cost_model(name: str, profile: Path | None = None) -> LinearCost:
    """A cost model by name: `cpu` is read from `profile` (default: what
    `calibrate --profile` saved); others are built in. Unknown names list the known."""
    if name == "cpu":
        path = profile or default_profile_path()
        if not path.is_file():
            raise ValueError(f"no CPU cost model at {path}: run `shuffleinfer calibrate "
                             "--profile` first, or pick one of "
                             f"{', '.join(sorted(COST_MODELS))}")
        return LinearCost.load(path)
    return lookup(COST_MODELS, name, "cost model")


@dataclass(frozen=True)
class FitReport:
    """How well a fitted model reproduces the steps it was fitted on."""

    num_prefill_steps: int
    num_decode_steps: int
    prefill_mean_rel_error: float
    decode_mean_rel_error: float


def fit_cost_model(name: str, prefill: list[tuple[int, float, float]],
                   decode: list[tuple[int, int, float]], *, kv_bytes_per_token: float,
                   link_bytes_per_s: float, source: str = "") -> tuple[LinearCost, FitReport]:
    """Least-squares fit of the step model to measured steps: `prefill` as (tokens, attn,
    seconds), `decode` as (batch, context, seconds). See `fit_steps`."""
    steps = [StepSample(int(t), a, 0, 0, s) for t, a, s in prefill] \
        + [StepSample(0, 0.0, int(b), int(c), s) for b, c, s in decode]
    return fit_steps(name, steps, kv_bytes_per_token=kv_bytes_per_token,
                     link_bytes_per_s=link_bytes_per_s, source=source)


@dataclass(frozen=True)
class StepSample:
    """One measured engine step: prompt tokens and attention work (`LinearCost`'s T and
    A), decodes and their summed context (B and C), and its seconds."""

    tokens: int
    attn: float
    batch: int
    context: int
    seconds: float


def fit_steps(name: str, steps: list[StepSample], *, kv_bytes_per_token: float,
              link_bytes_per_s: float, source: str = "") -> tuple[LinearCost, FitReport]:
    """Least-squares fit of the step model to measured steps. The decode part is fitted on
    the steps without prompt work; the prefill part on the others, less their decodes'
    share by that fit (so steps that mix both, as a colocated engine runs, count too).
    Errors are weighed relative to each step's latency (a 10 ms step matters as much as a
    1 s one). Coefficients are kept >= 0 (a negative one is dropped and the rest refitted)
    so no step is predicted faster when it does more work. Raises ValueError with fewer
    than 3 steps of a kind."""
    prefill = [s for s in steps if s.tokens > 0]
    decode = [s for s in steps if s.tokens == 0]
    if len(prefill) < 3 or len(decode) < 3:
        raise ValueError(f"need at least 3 prefill and 3 decode steps, got {len(prefill)} "
                         f"and {len(decode)}")
    d = np.array([(s.batch, s.context, s.seconds) for s in decode], dtype=float)
    dc = _nonnegative_lstsq(np.column_stack([np.ones(len(d)), d[:, 0], d[:, 1]]), d[:, 2])
    p = np.array([(s.tokens, s.attn, s.seconds - dc[1] * s.batch - dc[2] * s.context)
                  for s in prefill], dtype=float)
    pc = _nonnegative_lstsq(np.column_stack([np.ones(len(p)), p[:, 0], p[:, 1]]),
                            np.maximum(p[:, 2], 1e-6))
    model = LinearCost(name, prefill_base_s=pc[0], prefill_per_token_s=pc[1],
                       prefill_per_attn_s=pc[2], decode_base_s=dc[0], decode_per_req_s=dc[1],
                       decode_per_ctx_s=dc[2], kv_bytes_per_token=kv_bytes_per_token,
                       link_bytes_per_s=link_bytes_per_s, source=source)

    def error(kind: list[StepSample]) -> float:
        return float(np.mean([abs(model.step_s(s.tokens, s.attn, s.batch, s.context)
                                  - s.seconds) / s.seconds for s in kind]))

    return model, FitReport(len(prefill), len(decode), error(prefill), error(decode))


def _nonnegative_lstsq(x: np.ndarray, y: np.ndarray) -> list[float]:
    keep = list(range(x.shape[1]))
    w = 1.0 / np.maximum(y, 1e-9)[:, None]  # relative errors
    while True:
        coef, *_ = np.linalg.lstsq((x * w)[:, keep], y * w[:, 0], rcond=None)
        if (coef >= 0).all() or len(keep) == 1:
            full = [0.0] * x.shape[1]
            for i, c in zip(keep, coef, strict=True):
                full[i] = max(float(c), 0.0)
            return full
        keep.pop(int(np.argmin(coef)))

