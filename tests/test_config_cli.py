"""YAML configs with key=value overrides, and the CLI's error handling."""
import pytest

from swiftjax import cli
from swiftjax.config import apply_overrides, config_from_argv, load_config, to_dataclass
from swiftjax.sampling import SamplingConfig


def test_overrides_are_typed_and_strict(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("a: 1\nsec:\n  lr: 0.1\n  layers: [1, 2]\n")
    child = tmp_path / "child.yaml"
    child.write_text("base: base.yaml\nsec:\n  lr: 0.5\n")
    cfg = load_config(child, ["sec.layers=[3, 4, 5]", "a=true", "+extra.k=x", "sec.lr=1e-3"])
    assert cfg == {"a": True, "sec": {"lr": 1e-3, "layers": [3, 4, 5]}, "extra": {"k": "x"}}
    with pytest.raises(ValueError, match="unknown key 'sec.lrr'"):
        apply_overrides(cfg, ["sec.lrr=1"])
    with pytest.raises(ValueError, match="expected key=value"):
        apply_overrides(cfg, ["sec.lr"])
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_config_from_argv_takes_optional_file_then_overrides(tmp_path):
    defaults = {"a": 1, "sec": {"lr": 0.1}}
    f = tmp_path / "c.yaml"
    f.write_text("sec:\n  lr: 0.5\n")
    assert config_from_argv([], defaults) == defaults
    assert config_from_argv(None, defaults) == defaults
    assert config_from_argv(["a=2"], defaults) == {"a": 2, "sec": {"lr": 0.1}}
    assert config_from_argv([str(f)], defaults) == {"a": 1, "sec": {"lr": 0.5}}
    assert config_from_argv([str(f), "sec.lr=3e-4", "a=0"], defaults) == {"a": 0, "sec": {"lr": 3e-4}}
    assert defaults == {"a": 1, "sec": {"lr": 0.1}}  # not mutated
    with pytest.raises(ValueError, match="expected key=value"):  # a second file is not an override
        config_from_argv([str(f), str(f)], defaults)
    with pytest.raises(ValueError, match="does not exist"):
        config_from_argv([str(tmp_path / "nope.yaml"), "a=2"], defaults)


def test_to_dataclass_names_unknown_keys():
    sc = to_dataclass(SamplingConfig, {"max_new_tokens": 5, "eos_ids": [2, 6]})
    assert sc.eos_ids == (2, 6)
    with pytest.raises(ValueError, match=r"unknown keys \['temp'\]"):
        to_dataclass(SamplingConfig, {"temp": 1.0})


def test_cli_usage_and_unknown_command(capsys):
    assert cli.main([]) == 0
    assert "commands:" in capsys.readouterr().out
    assert cli.main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err


def test_cli_reports_bad_input_without_traceback(capsys, tmp_path):
    assert cli.main(["sample", "model=" + str(tmp_path)]) == 2
    assert "expected a tokenizer" in capsys.readouterr().err
