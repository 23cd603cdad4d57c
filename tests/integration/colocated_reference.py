"""Greedy outputs of one colocated, stock vLLM engine: the reference the disaggregated
path must match token for token. Run as a script (vLLM spawns processes):

    python colocated_reference.py MODEL PROMPTS.json OUT.json --max-tokens N --dtype D
        [--enforce-eager]
PROMPTS.json holds a list of token-id lists; OUT.json gets a list of
{"token_ids": [...], "text": "..."}.
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("prompts")
    parser.add_argument("out")
    parser.add_argument("--max-tokens", type=int, required=True)
    parser.add_argument("--max-model-len", type=int, required=True)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--enforce-eager", action="store_true")
    args = parser.parse_args()

    from vllm import LLM, SamplingParams

    prompts = json.loads(open(args.prompts).read())
    llm = LLM(model=args.model, dtype=args.dtype, max_model_len=args.max_model_len,
              enforce_eager=args.enforce_eager)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    result = [{"token_ids": list(o.outputs[0].token_ids), "text": o.outputs[0].text}
              for o in outputs]
    with open(args.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
