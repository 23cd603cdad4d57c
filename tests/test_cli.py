"""`shuffleinfer serve`: every invalid option exits with 2 and a message naming it, before
anything starts; valid options reach `serve` as one config, flags over the YAML file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import shuffleinfer.serve
from shuffleinfer.cli import main
from shuffleinfer.config import ServeConfig


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> list[ServeConfig]:
    """Replaces the real `serve` (Ray, engines, HTTP); collects the configs it gets."""
    calls: list[ServeConfig] = []

    def fake_serve(config: ServeConfig) -> int:
        calls.append(config)
        return 0

    monkeypatch.setattr(shuffleinfer.serve, "serve", fake_serve)
    return calls


def run(argv: list[str]) -> int:
    """Exit code of `shuffleinfer ARGV`, whether argparse exits or main returns."""
    try:
        return main(argv)
    except SystemExit as e:
        return int(e.code or 0)


@pytest.mark.parametrize(("args", "named"), [
    (["--bogus"], "--bogus"),
    (["--chunk-size", "0"], "--chunk-size"),
    (["--num-prefill", "-1"], "--num-prefill"),
    (["--num-decode", "0"], "--num-decode"),
    (["--dtype", "float8"], "--dtype"),
    (["--prefill-policy", "nope"], "--prefill-policy"),
    (["--decode-policy", "nope"], "--decode-policy"),
    (["--predictor", "oracle"], "--predictor"),
    (["--predictor-push-s", "0"], "--predictor-push-s"),
    (["--port", "abc"], "--port"),
    (["--port", "70000"], "--port"),
    (["--kv-lease-s", "0"], "--kv-lease-s"),
    (["--kv-overlap", "sometimes"], "--kv-overlap"),
    (["--engine-arg", "model=x"], "--engine-arg"),
    (["--engine-arg", "max_num_seqs"], "--engine-arg"),
    (["--admin-token", ""], "--admin-token"),
])
def test_invalid_option_exits_2_naming_it(args: list[str], named: str, served: list[ServeConfig],
                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["serve", *args]) == 2
    err = capsys.readouterr().err
    assert named in err
    assert "Traceback" not in err
    assert served == []


def test_engine_arg_owned_by_serve_says_which_option_to_use(
        served: list[ServeConfig], capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["serve", "--engine-arg", "max_model_len=99"]) == 2
    assert "set max_model_len with its own option" in capsys.readouterr().err


@pytest.mark.parametrize(("yaml_text", "named"), [
    ("num_prefill: 2\nnum_prefil: 3\n", "num_prefil"),
    ("chunk_size: 4\n", "--chunk-size"),
    ("num_prefill: [1\n", "not valid YAML"),
    ("- a list\n", "expected a mapping"),
])
def test_invalid_yaml_file_exits_2_naming_the_problem(
        tmp_path: Path, yaml_text: str, named: str, served: list[ServeConfig],
        capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "serve.yaml"
    path.write_text(yaml_text)
    assert run(["serve", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err
    assert served == []


def test_missing_yaml_file_exits_2(tmp_path: Path, served: list[ServeConfig],
                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["serve", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err
    assert served == []


def test_engine_args_are_parsed_as_json_values(served: list[ServeConfig]) -> None:
    assert run(["serve", "--engine-arg", "max_num_seqs=8", "--engine-arg", "enforce-eager=true",
                "--engine-arg", "tokenizer_mode=auto", "--engine-arg",
                'override_generation_config={"temperature": 0.5}']) == 0
    (config,) = served
    assert config.engine_args == {"max_num_seqs": 8, "enforce_eager": True,
                                  "tokenizer_mode": "auto",
                                  "override_generation_config": {"temperature": 0.5}}
    assert isinstance(config.engine_args["max_num_seqs"], int)


def test_flags_override_the_config_file(tmp_path: Path, served: list[ServeConfig]) -> None:
    path = tmp_path / "serve.yaml"
    path.write_text("num_prefill: 3\nnum_decode: 2\nport: 9000\n"
                    "engine_args:\n  max_num_seqs: 4\n  enforce_eager: true\n")
    assert run(["serve", "--config", str(path), "--num-decode", "4",
                "--engine-arg", "max_num_seqs=8", "--cache-dir", str(tmp_path)]) == 0
    (config,) = served
    assert (config.num_prefill, config.num_decode, config.port) == (3, 4, 9000)
    assert config.engine_args == {"max_num_seqs": 8, "enforce_eager": True}
    assert config.cache_dir == tmp_path


def test_admin_token_comes_from_the_flag_else_the_environment(
    served: list[ServeConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SHUFFLEINFER_ADMIN_TOKEN", "from-env")
    assert run(["serve", "--admin-token", "from-flag"]) == 0
    assert run(["serve"]) == 0
    flagged, unflagged = served
    assert flagged.admin_token == "from-flag"
    assert shuffleinfer.serve.admin_token(flagged) == "from-flag"
    assert unflagged.admin_token is None
    assert shuffleinfer.serve.admin_token(unflagged) == "from-env"
    monkeypatch.delenv("SHUFFLEINFER_ADMIN_TOKEN")
    assert shuffleinfer.serve.admin_token(unflagged) is None


def test_every_serve_option_is_documented(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["serve", "--help"]) == 0
    out = capsys.readouterr().out
    for name, field in ServeConfig.model_fields.items():
        flag = "--engine-arg" if name == "engine_args" else f"--{name.replace('_', '-')}"
        assert flag in out, flag
        assert field.description, name


def test_invalid_config_fails_before_ray_or_vllm_is_imported() -> None:
    code = ("import sys; from shuffleinfer.cli import main; rc = main(['serve', "
            "'--chunk-size', '0']); "
            "print(rc, sorted(m for m in ('ray', 'vllm', 'torch') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60)
    assert result.stdout.strip() == "2 []"
    assert "--chunk-size" in result.stderr


def test_console_script_exits_2_on_unknown_flag() -> None:
    script = Path(sys.executable).with_name("shuffleinfer")
    if not script.exists():
        pytest.skip("console script not installed in this environment")
    result = subprocess.run([str(script), "serve", "--bogus"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2
    assert "--bogus" in result.stderr


@pytest.mark.parametrize(("value", "overlap"), [(None, True), ("false", False),
                                                ("off", False), ("true", True)])
def test_kv_overlap_is_on_by_default_and_can_be_turned_off(
        value: str | None, overlap: bool, served: list[ServeConfig]) -> None:
    assert run(["serve", *(["--kv-overlap", value] if value else [])]) == 0
    (config,) = served
    assert config.kv_overlap is overlap
