"""A request's continuation after its decode instance died: the tokens already sent join
the prompt and leave the budgets; everything else stays."""

from __future__ import annotations

from shuffleinfer.protocol import GenerateRequest, SamplingOptions
from shuffleinfer.runtime.legs import continuation


def test_the_continuation_carries_the_sent_tokens_in_its_prompt() -> None:
    request = GenerateRequest("cmpl-1", (1, 2, 3), SamplingOptions(
        max_tokens=10, temperature=0.0, stop=("\n",), min_tokens=4, ignore_eos=True),
        prompt_text="hi", is_chat=True)
    after = continuation(request, [7, 8, 9], 1)
    assert after.req_id == "cmpl-1~1"
    assert after.prompt_token_ids == (1, 2, 3, 7, 8, 9)
    assert (after.sampling.max_tokens, after.sampling.min_tokens) == (7, 1)
    assert (after.sampling.stop, after.sampling.ignore_eos, after.prompt_text, after.is_chat) \
        == (("\n",), True, "hi", True)
    assert continuation(request, list(range(6)), 2).sampling.min_tokens == 0
