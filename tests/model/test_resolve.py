"""resolve_model: embedded names become local paths, anything else passes through."""

from __future__ import annotations

from pathlib import Path

import pytest

from shuffleinfer.model import DEFAULT_MODEL, resolve_model


@pytest.mark.parametrize(
    "model",
    [
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "facebook/opt-125m",
        "/models/llama-3-8b",
        "./checkpoints/smollm2",
        "smollm2-135m-instruct",  # names are case-sensitive: this is an HF-style id
    ],
)
def test_other_models_pass_through_untouched(model: str, tmp_path: Path) -> None:
    assert resolve_model(model, tmp_path) == model
    assert not any(tmp_path.iterdir())  # nothing prepared, nothing downloaded


def test_embedded_name_resolves_to_prepared_checkpoint(prepared_model: Path) -> None:
    resolved = resolve_model(DEFAULT_MODEL)
    assert resolved == str(prepared_model)
    assert (Path(resolved) / "model.safetensors").is_file()
