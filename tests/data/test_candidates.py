"""Candidate-set jsonl: validation, atomic writes, grouping, converters of the real pools."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
from realdata import GSM8K_KEYS, data_file

from swiftjax.data import candidates as cs


def make_rows(p=3, n=4, seed=0, scores=("a", "b")):
    rng = random.Random(seed)
    rows = []
    for i in range(p):
        for j in range(n):
            row = {
                "prompt_id": f"q{i}",
                "index": j,
                "prompt": f"prompt {i}",
                "text": f"answer text {i}-{j} \u00e9",
                "token_ids": [rng.randrange(100) for _ in range(rng.randrange(1, 5))] if j % 2 else None,
                "answer": str(rng.randrange(3)) if j != 1 else None,
                "correct": rng.random() < 0.5,
            }
            if scores:
                row["scores"] = {s: rng.uniform(-1, 1) for s in scores}
            rows.append(row)
    return rows


def test_round_trip(tmp_path):
    rows = make_rows()
    rows[0]["gold"] = "7"
    path = tmp_path / "sub" / "c.jsonl"
    assert cs.write_candidates(path, rows) == len(rows)
    assert cs.read_candidates(path) == rows
    assert [p.name for p in path.parent.iterdir()] == ["c.jsonl"]  # no temp files left


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    rows = make_rows()
    path = tmp_path / "c.jsonl"

    def failing():
        yield rows[0]
        yield rows[1]
        raise RuntimeError("generation died")

    with pytest.raises(RuntimeError):
        cs.write_candidates(path, failing())
    assert list(tmp_path.iterdir()) == []

    bad = [rows[0], {**rows[1], "correct": "yes"}]
    with pytest.raises(ValueError, match="row 1.*'correct'"):
        cs.write_candidates(path, bad)
    assert list(tmp_path.iterdir()) == []

    # an existing file survives a failed rewrite untouched
    cs.write_candidates(path, rows[:2])
    before = path.read_bytes()
    with pytest.raises(RuntimeError):
        cs.write_candidates(path, failing())
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.jsonl"]


def test_cached_candidates_reuses_only_under_the_same_key(tmp_path):
    path = tmp_path / "c.jsonl"
    calls = []

    def sampler(seed):
        def make():
            calls.append(seed)
            return make_rows(seed=seed)
        return make

    first = cs.cached_candidates(path, {"seed": 0, "model": "abc"}, sampler(0))
    assert first == make_rows(seed=0) and calls == [0]
    # same key (key order does not matter): read back, no sampling
    assert cs.cached_candidates(path, {"model": "abc", "seed": 0}, sampler(99)) == first and calls == [0]
    # another key: resampled and the key replaced
    second = cs.cached_candidates(path, {"seed": 1, "model": "abc"}, sampler(1))
    assert second == make_rows(seed=1) and calls == [0, 1]
    assert json.loads(cs.key_path(path).read_text())["seed"] == 1
    # rows without their key (a run killed between the two writes) are never trusted
    cs.key_path(path).unlink()
    assert cs.cached_candidates(path, {"seed": 1, "model": "abc"}, sampler(1)) == second and calls == [0, 1, 1]
    # a failing sampler leaves no key, the earlier rows untouched and no temp files
    def broken():
        raise RuntimeError("sampling died")
    with pytest.raises(RuntimeError, match="sampling died"):
        cs.cached_candidates(path, {"seed": 2}, broken)
    assert not cs.key_path(path).exists() and cs.read_candidates(path) == second
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl"]


@pytest.mark.parametrize("field", cs.REQUIRED)
def test_read_names_line_and_missing_field(tmp_path, field):
    rows = make_rows(p=1, n=3)
    del rows[2][field]
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=rf"c\.jsonl:3: missing field '{field}'"):
        cs.read_candidates(path)


@pytest.mark.parametrize(
    "field, value",
    [("index", -1), ("index", 1.0), ("index", True), ("prompt_id", 3), ("token_ids", [1, "2"]),
     ("answer", 5), ("correct", 1), ("scores", {"a": "x"}), ("scores", [1.0]), ("text", None),
     ("token_confidence", [1.0, "x"]), ("token_confidence", [1.0] * 99), ("token_confidence", [float("nan")])],
)
def test_read_rejects_bad_types(tmp_path, field, value):
    rows = make_rows(p=1, n=2)
    rows[1][field] = value
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=rf":2: field '{field}'"):
        cs.read_candidates(path)


def test_read_rejects_bad_json_and_extra_fields(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps(make_rows(p=1, n=1)[0]) + "\n\n{oops\n")
    with pytest.raises(ValueError, match=r":3: expected a JSON object"):
        cs.read_candidates(path)
    path.write_text(json.dumps({**make_rows(p=1, n=1)[0], "extra": 1}) + "\n")
    with pytest.raises(ValueError, match=":1: unexpected field"):
        cs.read_candidates(path)


def test_read_names_the_line_of_a_non_utf8_byte(tmp_path):
    rows = make_rows(p=1, n=3)
    lines = [json.dumps(r, ensure_ascii=False).encode("utf-8") for r in rows]
    lines[1] = lines[1].replace(b'"text": "', b'"text": "caf\xe9 ', 1)  # latin-1 e-acute
    assert b"\xe9" in lines[1]
    path = tmp_path / "c.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    col = lines[1].index(b"\xe9") + 1
    with pytest.raises(ValueError, match=rf"c\.jsonl:2: expected UTF-8 text, got byte 0xe9 at column {col} "):
        cs.read_candidates(path)
    # real UTF-8 (and CRLF line ends) still read
    rows[1]["text"] = "caf\u00e9 \u2713"
    path.write_bytes(b"".join(json.dumps(r, ensure_ascii=False).encode("utf-8") + b"\r\n" for r in rows))
    assert cs.read_candidates(path) == rows


def test_group_orders_by_index_and_matches_reference():
    rows = make_rows(p=4, n=5, seed=3)
    shuffled = rows[:]
    random.Random(1).shuffle(shuffled)
    ids, arr = cs.group(shuffled)
    # reference: prompts in order of first appearance, candidates by index
    want_ids = []
    for r in shuffled:
        if r["prompt_id"] not in want_ids:
            want_ids.append(r["prompt_id"])
    assert ids == want_ids
    lookup = {(r["prompt_id"], r["index"]): r for r in rows}
    for p, pid in enumerate(ids):
        for j in range(5):
            r = lookup[(pid, j)]
            assert arr["correct"][p, j] == r["correct"]
            assert arr["answers"][p][j] == r["answer"]
            assert arr["texts"][p][j] == r["text"]
            for name in ("a", "b"):
                assert arr["scores"][name][p, j] == r["scores"][name]
    assert arr["correct"].dtype == bool and arr["correct"].shape == (4, 5)


def test_group_errors():
    rows = make_rows(p=2, n=3)
    with pytest.raises(ValueError, match="expected N=3"):
        cs.group(rows[:-1])  # unequal N
    gap = [r for r in rows if not (r["prompt_id"] == "q1" and r["index"] == 1)]
    gap += [{**rows[-1], "index": 5}]
    with pytest.raises(ValueError, match="gap"):
        cs.group(gap)
    with pytest.raises(ValueError, match="twice"):
        cs.group(rows + [rows[0]])
    partial = [dict(r) for r in rows]
    partial[4] = {k: v for k, v in partial[4].items() if k != "scores"}
    with pytest.raises(ValueError, match="score 'a' missing"):
        cs.group(partial)
    with pytest.raises(ValueError, match="at least one"):
        cs.group([])
    ids, arr = cs.group(make_rows(p=2, n=2, scores=()))
    assert arr["scores"] == {}


def test_gsm8k_converter_on_real_file(tmp_path):
    path = data_file("gsm8k_test_model_solutions.jsonl")
    rows = cs.from_gsm8k_model_solutions(path)
    ids, arr = cs.group(rows)
    assert len(ids) == 1319 and arr["correct"].shape == (1319, 4)
    recs = [json.loads(line) for line in path.open()]
    want = np.array([[rec[k]["is_correct"] for k in GSM8K_KEYS] for rec in recs])
    np.testing.assert_array_equal(arr["correct"], want)
    assert arr["texts"][5] == [recs[5][k]["solution"] for k in GSM8K_KEYS]
    assert all(r["prompt"] == recs[int(r["prompt_id"].rsplit("-", 1)[1])]["question"] for r in rows[:40])
    # answers: a correct candidate's extracted answer equals the gold number
    for r in rows:
        if r["correct"]:
            assert r["answer"] == r["gold"]
    out = tmp_path / "gsm8k_cands.jsonl"
    cs.write_candidates(out, rows)
    assert cs.read_candidates(out) == rows


def test_math_converter_on_real_file():
    path = data_file("math_cot_100_bon8_qwen_rm.jsonl")
    rows = cs.from_math_bon(path)
    ids, arr = cs.group(rows)
    assert len(ids) == 100 and arr["correct"].shape == (100, 8)
    recs = [json.loads(line) for line in path.open()]
    np.testing.assert_array_equal(arr["correct"], np.array([rec["score"] for rec in recs]))
    np.testing.assert_array_equal(
        arr["scores"]["qwen72b_rm"], np.array([[s[0] for s in rec["pred_score"]] for rec in recs])
    )
    assert arr["answers"][3] == recs[3]["pred"]
    assert ids == [str(rec["idx"]) for rec in recs]


def _ref_bon(scores, correct, k):
    hits = 0
    for s_row, c_row in zip(scores, correct):
        best = max(range(k), key=lambda i: (s_row[i], -i))  # max score, earliest on ties
        hits += c_row[best]
    return 100.0 * hits / len(scores)


def test_report_math_bon():
    path = data_file("math_cot_100_bon8_qwen_rm.jsonl")
    rep = cs.report_math_bon(path)
    json.dumps(rep)
    curves = rep["curves"]
    assert rep["prompts"] == 100 and rep["n"] == 8
    expected = {"random", "oracle", "majority", "qwen72b_rm", "neg_length", "pass@k",
                "qwen72b_rm+neg_length/ranking", "qwen72b_rm+neg_length/scaling"}
    assert set(curves) == expected
    recs = [json.loads(line) for line in path.open()]
    rm = [[s[0] for s in rec["pred_score"]] for rec in recs]
    lab = [rec["score"] for rec in recs]
    for k in range(1, 9):
        assert curves["qwen72b_rm"][str(k)] == pytest.approx(_ref_bon(rm, lab, k))
        assert curves["oracle"][str(k)] == pytest.approx(100.0 * np.mean([any(r[:k]) for r in lab]))
        assert curves["oracle"][str(k)] >= curves["qwen72b_rm"][str(k)]
    assert curves["random"]["1"] == curves["qwen72b_rm"]["1"] == curves["majority"]["1"]
    assert rep["grader_agreement"] >= 0.98
    print("\n" + "\n".join(f"{name:32s} " + " ".join(f"{v:5.1f}" for v in c.values())
                           for name, c in curves.items()))
    print(f"grader agreement {100 * rep['grader_agreement']:.2f}%")
