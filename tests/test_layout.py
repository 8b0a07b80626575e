"""Layout rules the codebase keeps (what a newcomer relies on when reading it)."""
import re
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "swiftjax"


def _code(path: Path) -> str:
    """Source without comments and docstrings/strings (good enough for these greps)."""
    text = path.read_text()
    text = re.sub(r'("""|\'\'\')(?:.|\n)*?\1', "", text)
    return "\n".join(line.split("#", 1)[0] for line in text.splitlines())


def _files(*parts):
    for p in parts:
        base = PKG / p
        yield from ([base] if base.suffix == ".py" else sorted(base.rglob("*.py")))


def test_methods_and_shared_code_never_import_the_world():
    shared = ["methods", "models", "data", "train", "convert", "sampling.py", "backbone.py", "logprobs.py",
              "batching.py", "sample.py", "bon.py", "config.py"]
    offenders = [str(f.relative_to(PKG)) for f in _files(*shared)
                 if re.search(r"swiftjax\.world|from swiftjax import world", _code(f))]
    assert offenders == []


def test_one_decoding_loop():
    """Every sampler runs swiftjax.sampling.decode_loop (run_sampler, stream); the only other while_loop is EBRM's
    gradient refinement of a reward (no tokens)."""
    loops = [(str(f.relative_to(PKG)), n) for f in _files(".") for n in [_code(f).count("while_loop(")] if n]
    assert sorted(loops) == [("methods/ebrm/energy.py", 1), ("sampling.py", 1)]


def test_typed_configs_are_the_only_defaults():
    assert [str(f.relative_to(PKG)) for f in _files(".") if re.search(r"^DEFAULTS\s*=", _code(f), re.M)] == []


def test_no_citations_outside_the_repository():
    assert [str(f.relative_to(PKG)) for f in _files(".") if "shared/specs" in f.read_text()] == []
