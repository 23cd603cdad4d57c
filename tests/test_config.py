"""`ServeConfig` and `load_config`: a YAML file gives defaults, flags override it, and
every mistake is refused naming the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from shuffleinfer.config import ServeConfig, load_config


def write_yaml(tmp_path: Path, data: Any) -> Path:
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_flags_override_the_yaml_file(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, {"num_prefill": 3, "num_decode": 2, "chunk_size": 256,
                                 "prefill_policy": "round_robin"})
    config = load_config(path, {"num_decode": 5, "chunk_size": 1024})
    assert (config.num_prefill, config.num_decode, config.chunk_size) == (3, 5, 1024)
    assert config.prefill_policy == "round_robin"
    assert config.num_instances == 8


def test_no_file_and_no_flags_give_the_defaults() -> None:
    assert load_config(None, {}) == ServeConfig.model_validate({})
    empty = ServeConfig.model_validate({})
    assert (empty.num_prefill, empty.num_decode, empty.dtype) == (1, 1, "auto")


def test_engine_args_flags_add_to_the_files_engine_args(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, {"engine_args": {"max_num_seqs": 8, "enforce_eager": True}})
    config = load_config(path, {"engine_args": {"max_num_seqs": 16, "seed": 1}})
    assert config.engine_args == {"max_num_seqs": 16, "enforce_eager": True, "seed": 1}


def test_config_written_as_yaml_loads_back_equal(tmp_path: Path) -> None:
    config = ServeConfig.model_validate({
        "num_prefill": 2, "dtype": "float32", "cache_dir": tmp_path / "models",
        "engine_args": {"max_num_seqs": 4}, "api_key": "secret", "admin_token": "admin"})
    path = write_yaml(tmp_path, config.model_dump(mode="json"))
    assert load_config(path, {}) == config


def test_unknown_yaml_key_is_named(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, {"num_prefill": 2, "num_prefil": 3})
    with pytest.raises(ValidationError, match="num_prefil\n"):
        load_config(path, {})


@pytest.mark.parametrize(("text", "message"), [
    ("- num_prefill\n- 2\n", "expected a mapping of options, got list"),
    ("num_prefill: [1\n", "not valid YAML"),
])
def test_malformed_yaml_is_a_value_error_naming_the_file(tmp_path: Path, text: str,
                                                         message: str) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as err:
        load_config(path, {})
    assert "broken.yaml" in str(err.value)


def test_empty_yaml_file_means_defaults(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_config(path, {}) == ServeConfig.model_validate({})


@pytest.mark.parametrize(("field", "value"), [
    ("chunk_size", 0), ("num_prefill", -1), ("num_decode", 0), ("port", 70_000),
    ("dtype", "float8"), ("kv_lease_s", 0), ("max_model_len", 8), ("kv_cache_gib", 0),
    ("prefill_policy", "nope"), ("decode_policy", "nope"),
])
def test_out_of_range_values_are_refused_naming_the_field(field: str, value: Any) -> None:
    with pytest.raises(ValidationError) as err:
        load_config(None, {field: value})
    assert [e["loc"] for e in err.value.errors()] == [(field,)]


def test_unknown_policy_error_lists_the_known_policies() -> None:
    with pytest.raises(ValidationError, match="known: least_load, power_of_two, random, "
                       "round_robin, shuffle"):
        ServeConfig.model_validate({"decode_policy": "fastest"})


@pytest.mark.parametrize("owned", ["model", "kv_transfer_config", "max_num_batched_tokens",
                                   "dtype", "max_model_len"])
def test_engine_args_cannot_set_what_serve_owns(owned: str) -> None:
    with pytest.raises(ValidationError, match=f"set {owned} with its own option"):
        ServeConfig.model_validate({"engine_args": {owned: "x", "max_num_seqs": 8}})


def test_config_cannot_be_changed_after_construction() -> None:
    config = ServeConfig.model_validate({})
    with pytest.raises(ValidationError):
        config.num_prefill = 4  # type: ignore[misc]
