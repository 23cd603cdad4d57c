"""Cost models: the fit recovers known coefficients from noisy synthetic steps and says how
far off it is; the published GPU model is looked up by name; bad names and files are
refused clearly."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from shuffleinfer.sim.cost import A100_OPT13B, LinearCost, fit_cost_model, make_cost_model

TRUE = LinearCost("true", prefill_base_s=0.02, prefill_per_token_s=0.002,
                  prefill_per_attn_s=1e-7, decode_base_s=0.03, decode_per_req_s=0.0015,
                  decode_per_ctx_s=2e-6, kv_bytes_per_token=1000, link_bytes_per_s=1e9)


def synthetic(noise: float, seed: int = 0) -> tuple[list, list]:
    rng = random.Random(seed)
    prefill = []
    for tokens in (32, 64, 128, 256, 512, 1024, 2048):
        for pieces in (1, 4):
            attn = pieces * (tokens / pieces) ** 2
            t = TRUE.prefill_s(tokens, attn) * (1 + rng.uniform(-noise, noise))
            prefill.append((tokens, attn, t))
    decode = []
    for batch in (1, 4, 16, 32, 64):
        for per_req_ctx in (64, 512, 2048):
            ctx = batch * per_req_ctx
            t = TRUE.decode_s(batch, ctx) * (1 + rng.uniform(-noise, noise))
            decode.append((batch, ctx, t))
    return prefill, decode


def test_fit_recovers_the_coefficients_of_noiseless_steps() -> None:
    prefill, decode = synthetic(noise=0.0)
    model, report = fit_cost_model("fit", prefill, decode, kv_bytes_per_token=1000,
                                   link_bytes_per_s=1e9)
    for field in ("prefill_base_s", "prefill_per_token_s", "prefill_per_attn_s",
                  "decode_base_s", "decode_per_req_s", "decode_per_ctx_s"):
        assert getattr(model, field) == pytest.approx(getattr(TRUE, field), rel=1e-6)
    assert report.prefill_mean_rel_error < 1e-9 and report.decode_mean_rel_error < 1e-9


def test_fit_error_reports_the_noise() -> None:
    prefill, decode = synthetic(noise=0.10, seed=1)
    _, report = fit_cost_model("fit", prefill, decode, kv_bytes_per_token=1000,
                               link_bytes_per_s=1e9)
    assert 0.01 < report.prefill_mean_rel_error < 0.10
    assert 0.01 < report.decode_mean_rel_error < 0.10
    assert (report.num_prefill_steps, report.num_decode_steps) == (14, 15)


def test_no_coefficient_is_negative() -> None:
    # Steps that fall with more context would fit a negative slope: it is dropped.
    decode = [(1, 100, 0.05), (1, 1000, 0.049), (1, 5000, 0.048), (8, 100, 0.06)]
    prefill, _ = synthetic(noise=0.0)
    model, _ = fit_cost_model("fit", prefill, decode, kv_bytes_per_token=1,
                              link_bytes_per_s=1)
    assert model.decode_per_ctx_s == 0.0 and model.decode_per_req_s > 0


def test_too_few_steps_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 3 prefill and 3 decode"):
        fit_cost_model("fit", [(1, 1, 1.0)], [(1, 1, 1.0)] * 3, kv_bytes_per_token=1,
                       link_bytes_per_s=1)


def test_models_by_name_and_from_file(tmp_path: Path) -> None:
    assert make_cost_model("a100-opt13b") is A100_OPT13B
    # DistServe's fit: a 512-token prompt on OPT-13B/A100 takes about 66 ms.
    assert A100_OPT13B.prefill_s(512, 512**2) == pytest.approx(0.0655, rel=0.01)
    with pytest.raises(ValueError, match="known: a100-opt13b"):
        make_cost_model("h100-magic")
    with pytest.raises(ValueError, match="calibrate --profile"):
        make_cost_model("cpu", tmp_path / "missing.json")
    TRUE.save(tmp_path / "cpu.json")
    assert make_cost_model("cpu", tmp_path / "cpu.json") == TRUE
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a cost model file"):
        make_cost_model("cpu", tmp_path / "bad.json")
