"""GGUF file -> plain Hugging Face checkpoint (bf16 safetensors), and a generation check.

transformers reads a GGUF file and dequantises it to float, but the model it returns still
says `quantization_config: {quant_method: gguf}`, which would send vLLM down its GGUF
path. So the weights are moved into a freshly built `LlamaForCausalLM` whose config holds
nothing GGUF-specific, and that one is saved.

torch and transformers are imported inside the functions: importing `shuffleinfer.model`
(e.g. to pass a Hugging Face id through `resolve_model`) must stay cheap.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SAVE_DTYPE = "bfloat16"
"""dtype of the saved weights: vLLM's CPU backend runs bf16 about 1.6x faster than fp32."""

# Keys of a GGUF-loaded config that describe the GGUF file or the loading run, not the model.
_GGUF_CONFIG_LEFTOVERS = (
    "quantization_config",
    "_name_or_path",
    "_model_name_or_path",
    "transformers_version",
    "dtype",
    "torch_dtype",
)


class ModelPrepareError(RuntimeError):
    """Preparing an embedded model failed (download, conversion or the generation check)."""


def log(message: str) -> None:
    """Write one progress line to stderr (stdout is kept for the CLI's result)."""
    print(f"[shuffleinfer.model] {message}", file=sys.stderr, flush=True)


def convert_gguf(gguf_path: Path, out_dir: Path, *, chat_template_fallback: str) -> None:
    """Write a bf16 safetensors checkpoint of the Llama model in `gguf_path` to `out_dir`.

    Writes config.json, generation_config.json, model.safetensors and the tokenizer files
    (with a chat template: the GGUF file's own, else `chat_template_fallback`).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    source_dir, gguf_name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(source_dir, gguf_file=gguf_name)
    if not tokenizer.chat_template:
        log("the GGUF file has no chat template; using the registry's")
        tokenizer.chat_template = chat_template_fallback

    gguf_model = AutoModelForCausalLM.from_pretrained(
        source_dir, gguf_file=gguf_name, dtype=torch.float32
    )
    if not isinstance(gguf_model, LlamaForCausalLM):
        raise ModelPrepareError(
            f"{gguf_path.name}: expected a Llama model, got {type(gguf_model).__name__}"
        )
    config_dict = {
        key: value
        for key, value in gguf_model.config.to_dict().items()
        if key not in _GGUF_CONFIG_LEFTOVERS
    }
    state_dict = gguf_model.state_dict()
    del gguf_model

    config = LlamaConfig.from_dict(config_dict)
    _check_tied_embeddings(config.tie_word_embeddings, state_dict)
    model = LlamaForCausalLM(config).to(getattr(torch, SAVE_DTYPE))
    model.load_state_dict(state_dict, strict=True)
    model.tie_weights()
    model.eval()

    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    # The GGUF tokenizer knows no length limit; vLLM and transformers read this one.
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(out_dir)
    _add_legacy_dtype_key(out_dir / "config.json")


def _check_tied_embeddings(tied: bool, state_dict: dict) -> None:
    """Refuse a config whose `tie_word_embeddings` disagrees with the weights it came with."""
    import torch

    embed, lm_head = state_dict["model.embed_tokens.weight"], state_dict.get("lm_head.weight")
    if tied and lm_head is not None and not torch.equal(embed, lm_head):
        raise ModelPrepareError(
            "config says tie_word_embeddings=True but lm_head differs from the embeddings"
        )
    if not tied and lm_head is None:
        raise ModelPrepareError("config says tie_word_embeddings=False but there is no lm_head")


def _add_legacy_dtype_key(config_path: Path) -> None:
    """Also write `torch_dtype`: transformers 5 writes only `dtype`; older readers need it."""
    config = json.loads(config_path.read_text())
    config["torch_dtype"] = config.get("dtype") or SAVE_DTYPE
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def check_checkpoint_files(checkpoint_dir: Path) -> None:
    """Raise unless the saved checkpoint looks servable: no GGUF traces, a chat template."""
    from transformers import AutoTokenizer

    config = json.loads((checkpoint_dir / "config.json").read_text())
    if "quantization_config" in config:
        raise ModelPrepareError(f"{checkpoint_dir}/config.json still has a quantization_config")
    if config.get("architectures") != ["LlamaForCausalLM"]:
        raise ModelPrepareError(f"unexpected architectures {config.get('architectures')!r}")
    if not list(checkpoint_dir.glob("*.safetensors")):
        raise ModelPrepareError(f"no safetensors weights in {checkpoint_dir}")
    if not AutoTokenizer.from_pretrained(str(checkpoint_dir)).chat_template:
        raise ModelPrepareError(f"the tokenizer saved in {checkpoint_dir} has no chat template")


def generate_check_answer(checkpoint_dir: Path, prompt: str, max_new_tokens: int = 16) -> str:
    """Greedily answer the chat message `prompt` with transformers; return the answer text."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint_dir))
    model = LlamaForCausalLM.from_pretrained(str(checkpoint_dir), dtype=torch.bfloat16)
    model.eval()
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        # transformers 5 annotates `generate`'s self with a protocol mypy cannot match.
        output_ids = model.generate(  # type: ignore[misc]
            **inputs,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
        )
    new_ids = output_ids[0, inputs["input_ids"].shape[1] :]
    return str(tokenizer.decode(new_ids, skip_special_tokens=True)).strip()
