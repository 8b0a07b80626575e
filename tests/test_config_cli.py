"""YAML configs with key=value overrides, and the CLI's error handling."""
import dataclasses

import pytest

from swiftjax import cli
from swiftjax.config import build, parse_typed
from swiftjax.sampling import SamplingConfig


@dataclasses.dataclass(frozen=True)
class _Sec:
    lr: float = 0.1
    layers: tuple[int, ...] = (1,)


@dataclasses.dataclass(frozen=True)
class _Cfg:
    a: int = 1
    flag: bool = False
    name: str | None = None
    sec: _Sec = _Sec(lr=0.2)


def test_yaml_base_and_overrides_are_typed_and_strict(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("a: 3\nsec:\n  layers: [1, 2]\n")
    child = tmp_path / "child.yaml"
    child.write_text("base: base.yaml\nsec:\n  lr: 0.5\n")
    cfg = parse_typed(_Cfg, [str(child), "sec.layers=[3, 4, 5]", "flag=true", "sec.lr=1e-3", "name=x"])
    assert cfg == _Cfg(a=3, flag=True, name="x", sec=_Sec(lr=1e-3, layers=(3, 4, 5)))
    assert parse_typed(_Cfg, ["a=2"]).sec.lr == 0.2  # a section keeps its parent's default instance
    with pytest.raises(ValueError, match="sec.lrr: unknown key"):
        parse_typed(_Cfg, ["sec.lrr=1"])
    with pytest.raises(ValueError, match="expected key=value"):
        parse_typed(_Cfg, [str(child), "sec.lr"])
    with pytest.raises(ValueError, match="does not exist"):
        parse_typed(_Cfg, [str(tmp_path / "nope.yaml")])
    with pytest.raises(ValueError, match="a: expected an int, got 2.5"):
        parse_typed(_Cfg, ["a=2.5"])
    with pytest.raises(ValueError, match="unknown key; expected one of"):
        parse_typed(_Cfg, ["nope=1"])


def test_build_names_unknown_keys_and_types():
    sc = build(SamplingConfig, {"max_new_tokens": 5, "eos_ids": [2, 6]})
    assert sc.eos_ids == (2, 6)
    with pytest.raises(ValueError, match="temp: unknown key"):
        build(SamplingConfig, {"temp": 1.0})
    with pytest.raises(ValueError, match="temperature: expected a finite number"):
        build(SamplingConfig, {"temperature": float("nan")})


def test_cli_usage_and_unknown_command(capsys):
    assert cli.main([]) == 0
    assert "commands:" in capsys.readouterr().out
    assert cli.main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err


def test_cli_reports_bad_input_without_traceback(capsys, tmp_path):
    assert cli.main(["sample", "model=" + str(tmp_path)]) == 2
    assert "expected a tokenizer" in capsys.readouterr().err
