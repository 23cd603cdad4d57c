"""Translate between ShuffleInfer's messages and vLLM's sampling params and outputs.

A request's `max_tokens` and `min_tokens` count the first token, which the prefill leg
samples; the decode leg samples the rest from prompt + first token.
"""

from __future__ import annotations

from typing import Any

from vllm import SamplingParams
from vllm.outputs import RequestOutput
from vllm.sampling_params import RequestOutputKind

from shuffleinfer.protocol import FinishReason, SamplingOptions, TokenDelta, TokenLogprob


def _base(opts: SamplingOptions, *, max_tokens: int, min_tokens: int,
          kv_transfer_params: dict[str, Any] | None) -> SamplingParams:
    extra = {"kv_transfer_params": kv_transfer_params} if kv_transfer_params else None
    return SamplingParams(
        max_tokens=max_tokens,
        min_tokens=min_tokens,
        temperature=opts.temperature,
        top_p=opts.top_p,
        seed=opts.seed,
        stop=list(opts.stop) or None,
        ignore_eos=opts.ignore_eos,
        logprobs=opts.logprobs,
        output_kind=RequestOutputKind.DELTA,
        extra_args=extra,
    )


def prefill_params(opts: SamplingOptions, transfer_id: str | None) -> SamplingParams:
    """The prefill leg: one token; its KV is kept for a decode only if more are wanted."""
    kv = {"do_remote_decode": True, "transfer_id": transfer_id} if transfer_id else None
    return _base(opts, max_tokens=1, min_tokens=min(opts.min_tokens, 1),
                 kv_transfer_params=kv)


def decode_params(opts: SamplingOptions, kv_transfer_params: dict[str, Any]) -> SamplingParams:
    """The decode leg: everything after the first token, reading the prefill's KV."""
    return _base(opts, max_tokens=opts.max_tokens - 1,
                 min_tokens=max(opts.min_tokens - 1, 0),
                 kv_transfer_params=dict(kv_transfer_params))


def colocated_params(opts: SamplingOptions) -> SamplingParams:
    """One engine doing both legs (the baseline)."""
    return _base(opts, max_tokens=opts.max_tokens, min_tokens=opts.min_tokens,
                 kv_transfer_params=None)


def _finish_reason(reason: str | None) -> FinishReason | None:
    if reason is None:
        return None
    if reason in ("stop", "length", "abort", "error"):
        return reason  # type: ignore[return-value]
    return "stop"


def to_delta(output: RequestOutput, num_top: int = 0, *, prefill_instance: str | None = None,
             decode_instance: str | None = None) -> TokenDelta:
    """One DELTA-mode RequestOutput to a TokenDelta (logprobs only if asked for)."""
    comp = output.outputs[0]
    logprobs = None
    if comp.logprobs is not None:
        entries = []
        for token_id, position in zip(comp.token_ids, comp.logprobs, strict=False):
            if position is None:
                continue
            chosen = position[token_id]
            top = sorted(position.values(), key=lambda lp: lp.rank or 0)[:num_top]
            entries.append(TokenLogprob(
                token_id=token_id, token=chosen.decoded_token or "", logprob=chosen.logprob,
                top=tuple((lp.decoded_token or "", lp.logprob) for lp in top)))
        logprobs = tuple(entries)
    return TokenDelta(
        token_ids=tuple(comp.token_ids),
        text=comp.text,
        logprobs=logprobs,
        finish_reason=_finish_reason(comp.finish_reason) if output.finished else None,
        prefill_instance=prefill_instance,
        decode_instance=decode_instance,
    )
