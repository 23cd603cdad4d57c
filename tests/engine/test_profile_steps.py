"""`shuffleinfer calibrate --profile`: the work each planned step does, the fit of a
profile measured on a fake engine, the saved model as the simulator loads it, flag
errors, and (marked `engine`) one quick run on the real engine."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import pytest

from shuffleinfer.cli import main
from shuffleinfer.engine.profile_report import format_report, format_table, write_plot
from shuffleinfer.engine.profile_steps import measure
from shuffleinfer.engine.step_plan import (
    FULL_PLAN,
    QUICK_PLAN,
    ProfilePlan,
    ScheduledRequest,
    StepShape,
    kv_geometry,
    make_plan,
    planned_steps,
    step_shape,
)
from shuffleinfer.sim.cost import LinearCost, fit_cost_model, make_cost_model


@pytest.mark.parametrize(("prompt_lens", "budget", "steps"), [
    ((256,), 1024, [StepShape(256, 256 ** 2)]),                       # whole prompt: l**2
    ((64,) * 4, 1024, [StepShape(256, 4 * 64 ** 2)]),                  # packed: 1/4 the attn
    ((1024 + 128,), 1024, [StepShape(1024, 1024 ** 2),                 # a later chunk attends
                           StepShape(128, 128 * (1024 + 128))]),       # to the earlier one too
    ((40, 40), 64, [StepShape(64, 40 * 40 + 24 * 24),                  # the second is split
                    StepShape(16, 16 * (24 + 16))]),
])
def test_planned_prefill_steps_charge_each_slice_s_times_offset_plus_s(
        prompt_lens: tuple[int, ...], budget: int, steps: list[StepShape]) -> None:
    assert planned_steps(prompt_lens, budget) == steps


def test_planned_decode_steps_count_prompt_plus_tokens_so_far() -> None:
    # Two prompts of 4 in steps of 6 tokens, 3 tokens each: the first decodes while the
    # second's prompt finishes; a decode's context is its prompt plus the tokens it made.
    assert planned_steps((4, 4), 6, max_tokens=3) == [
        StepShape(tokens=6, attn=4 * 4 + 2 * 2),
        StepShape(tokens=2, attn=2 * (2 + 2), batch=1, context=4 + 1),
        StepShape(batch=2, context=(4 + 2) + (4 + 1)),
        StepShape(batch=1, context=4 + 2),
    ]


def test_step_shape_reads_what_the_scheduler_scheduled() -> None:
    shape = step_shape([ScheduledRequest(prompt_len=512, num_computed_tokens=512 + 9,
                                         num_scheduled_tokens=1),       # 10th output token
                        ScheduledRequest(64, 64, 1),                    # 1st decode
                        ScheduledRequest(300, 100, 200)])               # last chunk at 100
    assert shape == StepShape(tokens=200, attn=200 * 300, batch=2, context=522 + 65)


@pytest.mark.parametrize("plan", [FULL_PLAN, QUICK_PLAN])
def test_the_plan_varies_attn_apart_from_tokens_and_leaves_decode_steps_to_time(
        plan: ProfilePlan) -> None:
    shapes = {s for case in plan.prefill for s in planned_steps(case.prompt_lens, plan.budget)}
    assert all(s.batch == 0 for s in shapes)
    by_tokens: dict[int, set[int]] = {}
    for s in shapes:
        by_tokens.setdefault(s.tokens, set()).add(s.attn)
    assert sum(len(attns) > 1 for attns in by_tokens.values()) >= 2
    for case in plan.decode:
        steps = planned_steps([case.prompt_len] * case.batch, plan.budget, case.max_tokens)
        whole = [s for s in steps if not s.tokens and s.batch == case.batch]
        assert len(whole) >= case.skip_steps + 4, case
    assert {c.batch for c in plan.decode} >= {1, 4}
    assert len({c.prompt_len for c in plan.decode}) >= 2
    longest = max(max(c.prompt_lens) for c in plan.prefill)
    assert plan.max_model_len > longest


def test_a_decode_batch_must_leave_room_to_prefill() -> None:
    with pytest.raises(ValueError, match="no room"):
        make_plan((16, 32), (32,), (16,))


TRUTH = LinearCost("truth", prefill_base_s=0.02, prefill_per_token_s=5e-4,
                   prefill_per_attn_s=2e-8, decode_base_s=0.03, decode_per_req_s=1e-3,
                   decode_per_ctx_s=2e-6, kv_bytes_per_token=46080, link_bytes_per_s=2e9)


class FakeEngine:
    """Steps as the plan says, timed by `TRUTH`; the first run of each prefill case and
    the first whole-batch decode step a second slower (kernels being built)."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.seen: set[tuple[int, ...]] = set()

    def run(self, prompt_lens: Sequence[int], max_tokens: int) -> list[tuple[StepShape, float]]:
        first_run = tuple(prompt_lens) not in self.seen
        self.seen.add(tuple(prompt_lens))
        steps, slow = [], True
        for s in planned_steps(prompt_lens, self.budget, max_tokens):
            seconds = TRUTH.step_s(s.tokens, s.attn, s.batch, s.context)
            if max_tokens == 1 and first_run:
                seconds += 1.0
            if s.batch == len(prompt_lens) and not s.tokens and slow:
                seconds, slow = seconds + 1.0, False
            steps.append((s, seconds))
        return steps


def test_a_profile_fits_the_model_that_timed_it_and_saves_what_the_simulator_loads(
        tmp_path: Path) -> None:
    samples, num_unplanned = measure(FakeEngine(FULL_PLAN.budget), FULL_PLAN, repeats=2)
    assert num_unplanned == 0
    decode = [s for s in samples if s.shape.batch]
    assert len(decode) == len(FULL_PLAN.decode)
    assert [s.case for s in samples if s.shape.tokens == 128] == [
        "prefill 1x128", "prefill 4x32", "prefill 1x1152 step 2/2"]
    model, report = fit_cost_model(
        "cpu", [(s.shape.tokens, s.shape.attn, s.seconds) for s in samples if not s.shape.batch],
        [(s.shape.batch, s.shape.context, s.seconds) for s in decode],
        kv_bytes_per_token=46080, link_bytes_per_s=2e9, source="fake")
    assert report.prefill_mean_rel_error < 1e-6 and report.decode_mean_rel_error < 1e-3
    assert model.prefill_per_attn_s == pytest.approx(TRUTH.prefill_per_attn_s, rel=1e-6)
    assert model.decode_per_ctx_s == pytest.approx(TRUTH.decode_per_ctx_s, rel=1e-2)

    path = tmp_path / "calibration" / "cpu-cost-model.json"
    model.save(path)
    loaded = make_cost_model("cpu", path)
    assert loaded == model
    assert loaded.prefill_s(512, 512 ** 2) == pytest.approx(TRUTH.prefill_s(512, 512 ** 2))
    table = format_table(samples, model)
    assert "prefill 1x1152 step 2/2" in table and "decode 32x512" in table
    assert "mean relative error" in format_report(model, report)
    write_plot(samples, model, path.with_suffix(".png"), "fake")
    assert path.with_suffix(".png").read_bytes().startswith(b"\x89PNG")


def test_kv_bytes_per_token_come_from_the_hf_config() -> None:
    smollm = SimpleNamespace(num_hidden_layers=30, num_attention_heads=9,
                             num_key_value_heads=3, head_dim=64, hidden_size=576,
                             dtype="bfloat16")
    assert kv_geometry(smollm, "float32").bytes_per_token == 2 * 30 * 3 * 64 * 4 == 46080
    assert kv_geometry(smollm, "auto").bytes_per_token == 46080 // 2   # the model's own
    no_gqa = SimpleNamespace(num_hidden_layers=2, num_attention_heads=4, hidden_size=256)
    assert kv_geometry(no_gqa, "float16").bytes_per_token == 2 * 2 * 4 * 64 * 2
    with pytest.raises(ValueError, match="float8"):
        kv_geometry(smollm, "float8")


@pytest.mark.parametrize(("args", "named"), [
    (["--profile-quick"], "--profile-quick needs --profile"),
    (["--profile", "--sizes", "64,128"], "--sizes"),
    (["--profile", "--threshold", "0.5"], "--threshold"),
])
def test_profile_flags_that_make_no_sense_exit_2_naming_the_flag(
        args: list[str], named: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["calibrate", *args]) == 2
    err = capsys.readouterr().err
    assert "shuffleinfer calibrate: error:" in err and named in err


@pytest.mark.engine
def test_profile_on_the_real_engine(tmp_path: Path) -> None:
    out = tmp_path / "cpu.json"
    # enforce_eager skips torch.compile (over a minute on 2 cores); the numbers are not
    # what this test checks, only that a model comes out the simulator can load.
    command = [sys.executable, "-m", "shuffleinfer", "calibrate", "--profile",
               "--profile-quick", "--repeats", "1", "--out", str(out),
               "--engine-arg", "enforce_eager=true"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env=os.environ | {"VLLM_CPU_KVCACHE_SPACE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    model = make_cost_model("cpu", out)
    assert model.name == "cpu" and model.kv_bytes_per_token == 46080
    assert min(model.prefill_base_s, model.prefill_per_token_s, model.prefill_per_attn_s,
               model.decode_base_s, model.decode_per_req_s, model.decode_per_ctx_s) >= 0
    assert model.link_bytes_per_s > 0 and "shuffleinfer calibrate --profile" in model.source
    assert model.prefill_s(64, 64 ** 2) > 0 and model.decode_s(4, 200) > 0
    assert "decode 4x32" in done.stdout and "mean relative error" in done.stdout
    assert out.with_suffix(".png").read_bytes().startswith(b"\x89PNG")
