"""The prepared checkpoint is a plain bf16 Llama checkpoint with a ChatML chat template."""

from __future__ import annotations

from pathlib import Path


def test_config_loads_as_plain_llama_in_bf16(prepared_model: Path) -> None:
    import torch
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(prepared_model))
    assert config.model_type == "llama"
    assert config.architectures == ["LlamaForCausalLM"]
    assert config.dtype == torch.bfloat16
    assert getattr(config, "quantization_config", None) is None  # else vLLM tries GGUF
    assert config.tie_word_embeddings
    # 30 layers x 3 KV heads x 64 dims x (K and V) x 2 bytes = 22.5 KiB of KV per token.
    kv_bytes_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * 64 * 2
    assert config.head_dim == 64
    assert kv_bytes_per_token == 22.5 * 1024


def test_tokenizer_renders_chatml(prepared_model: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(prepared_model))
    assert tokenizer.chat_template
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert isinstance(text, str)
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.model_max_length == 8192
