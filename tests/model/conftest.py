"""Fixtures for the embedded-model tests.

`prepared_model` prepares the default model once per session into the default cache dir
(`$SHUFFLEINFER_CACHE_DIR/models`, else `~/.cache/shuffleinfer/models`), the same
checkpoint the rest of the suite serves; it is a no-op once that cache holds it.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from shuffleinfer.model import DEFAULT_MODEL, get_embedded_model, prepare_model


@pytest.fixture(scope="session")
def prepared_model() -> Path:
    """Path of the prepared default model (downloads and converts it on first use, ~30 s)."""
    return prepare_model(DEFAULT_MODEL)


@pytest.fixture
def fake_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A zip shaped like the default model's wheel, with a dummy GGUF member.

    It lies outside `tmp_path`, which tests use as an empty cache dir.
    """
    spec = get_embedded_model(DEFAULT_MODEL)
    wheel_name = f"{spec.package.replace('-', '_')}-{spec.version}-py3-none-any.whl"
    wheel = tmp_path_factory.mktemp("wheel") / wheel_name
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(spec.gguf_member, b"GGUF not a real model")
    return wheel
