"""Models ShuffleInfer serves: embedded default models and `--model` resolution.

`resolve_model(name_or_path)` is what serving code calls: an embedded model's name
(`DEFAULT_MODEL`, "SmolLM2-135M-Instruct") becomes the path of a locally prepared
checkpoint; a Hugging Face id or a local path passes through unchanged.
"""

from shuffleinfer.model.convert import ModelPrepareError
from shuffleinfer.model.prepare import (
    default_cache_dir,
    prepare_model,
    prepared_model_path,
    resolve_model,
)
from shuffleinfer.model.registry import (
    DEFAULT_MODEL,
    EMBEDDED_MODELS,
    EmbeddedModel,
    UnknownModelError,
    get_embedded_model,
)

__all__ = [
    "DEFAULT_MODEL",
    "EMBEDDED_MODELS",
    "EmbeddedModel",
    "ModelPrepareError",
    "UnknownModelError",
    "default_cache_dir",
    "get_embedded_model",
    "prepare_model",
    "prepared_model_path",
    "resolve_model",
]
