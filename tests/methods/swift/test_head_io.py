"""A saved SWIFT head: checksummed, committed by head.json, never moved or deleted by a read."""
import json
import os

import numpy as np
import pytest

from swiftjax.features import FeatureSpec
from swiftjax.methods.swift.head_io import load_head, save_head

SPEC = FeatureSpec(layers="all", mode="token_logprobs", k=4)


def _params(seed=0, f=6):
    rng = np.random.default_rng(seed)
    return {"kernel": rng.normal(size=(f, 2)).astype(np.float32), "bias": rng.normal(size=(2,)).astype(np.float32)}


def _listing(path):
    return sorted((p.name, p.stat().st_size) for p in path.iterdir())


def test_round_trip_and_provenance(tmp_path):
    p = _params()
    save_head(tmp_path / "head", p, SPEC, {"model": {"digest": "abc"}})
    q, spec, meta = load_head(tmp_path / "head")
    np.testing.assert_array_equal(q["kernel"], p["kernel"])
    np.testing.assert_array_equal(q["bias"], p["bias"])
    assert spec == SPEC and meta["info"]["model"]["digest"] == "abc"


def test_flipped_bytes_are_a_clear_error_and_nothing_moves(tmp_path):
    save_head(tmp_path / "head", _params(), SPEC, {})
    w = next((tmp_path / "head").glob("weights-*.npz"))
    data = bytearray(w.read_bytes())
    data[-40] ^= 0xFF  # same size, different content (inside the arrays)
    w.write_bytes(bytes(data))
    before = _listing(tmp_path / "head")
    with pytest.raises(ValueError, match="checksum mismatch"):
        load_head(tmp_path / "head")
    assert _listing(tmp_path / "head") == before


def test_wrong_kernel_shape_in_head_json_never_makes_the_head_unloadable(tmp_path):
    save_head(tmp_path / "head", _params(), SPEC, {})
    meta_file = tmp_path / "head" / "head.json"
    good = meta_file.read_text()
    meta = json.loads(good)
    meta["kernel_shape"] = [7, 2]
    meta_file.write_text(json.dumps(meta))
    before = _listing(tmp_path / "head")
    with pytest.raises(ValueError, match="kernel_shape"):
        load_head(tmp_path / "head")
    assert _listing(tmp_path / "head") == before
    meta_file.write_text(good)
    load_head(tmp_path / "head")  # still there, still good


def test_replacing_keeps_a_complete_head_at_every_step(tmp_path, monkeypatch):
    save_head(tmp_path / "head", _params(0), SPEC, {"n": 0})
    # a kill after the new weights are written but before head.json is replaced: the old head loads
    import swiftjax.methods.swift.head_io as hio

    real = hio.atomic_file

    def killed(path, *a, **kw):
        if str(path).endswith("head.json"):
            raise KeyboardInterrupt("killed")
        return real(path, *a, **kw)

    monkeypatch.setattr(hio, "atomic_file", killed)
    with pytest.raises(KeyboardInterrupt):
        save_head(tmp_path / "head", _params(1), SPEC, {"n": 1})
    monkeypatch.setattr(hio, "atomic_file", real)
    q, _, meta = load_head(tmp_path / "head")
    assert meta["info"]["n"] == 0
    np.testing.assert_array_equal(q["kernel"], _params(0)["kernel"])
    assert len(list((tmp_path / "head").glob("weights-*.npz"))) == 2  # an orphan, removed by the next save
    save_head(tmp_path / "head", _params(2), SPEC, {"n": 2})
    assert len(list((tmp_path / "head").glob("weights-*.npz"))) == 1
    assert load_head(tmp_path / "head")[2]["info"]["n"] == 2
    assert not list((tmp_path / "head").glob(".*"))  # no temp files left
    mode = (tmp_path / "head" / "head.json").stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask


def test_non_finite_weights_are_refused(tmp_path):
    p = _params()
    p["kernel"][0, 0] = np.nan
    with pytest.raises(ValueError, match="finite"):
        save_head(tmp_path / "head", p, SPEC, {})
    with pytest.raises(ValueError, match="expected a trained head directory"):
        load_head(tmp_path / "nothing")
