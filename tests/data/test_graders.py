"""GSM8K and MATH answer extraction, normalisation and grading; agreement with real labels."""
from __future__ import annotations

import json
import threading
import time

import pytest
from realdata import GSM8K_KEYS, data_file

from swiftjax.data import gsm8k
from swiftjax.data import math as mg

# ----------------------------------------------------------------------------- GSM8K


@pytest.mark.parametrize(
    "sol, want",
    [
        ("so 3+4=7\n#### 7", "7"),
        ("#### 1,234", "1234"),
        ("#### -5\n", "-5"),
        ("a #### 1 then #### 2", "2"),
        ("no marker 42", None),
        (None, None),
    ],
)
def test_gsm8k_extract_reference(sol, want):
    assert gsm8k.extract_reference(sol) == want


@pytest.mark.parametrize(
    "text, want",
    [
        ("She makes 9 * 2 = $<<9*2=18>>18\nA: 18", "18"),
        ("A: $1,800.", "1,800"),
        ("A: -1.8 billion", "-1.8"),
        ("first A: 3\nthen A: 4", "4"),
        ("work 12 and 13\nA: 10+John's age", "10"),
        ("work 12\nA: none", None),  # committed to a non-number: no fallback
        ("so 3 + 4 = 7.\nThe answer is \\boxed{7}. Check: 9", "7"),  # boxed wins over the last number
        ("\\boxed{3} no, \\boxed{\\$1,800}", "1,800"),  # the last box; a dollar sign inside
        ("A: 5\n\\boxed{12 \\text{ apples}}", "12"),  # boxed wins over 'A:'
        ("total \\boxed{1\\,000}", "1000"),  # LaTeX thin-space thousands
        ("\\boxed{x} and 3", None),  # a box with no number: no fallback
        ("blah\n#### 7", "7"),
        ("no markers: 3 apples and 5 pears", "5"),
        ("truncated 3333333333333", "3333333333333"),
        ("", None),
        (None, None),
    ],
)
def test_gsm8k_extract_answer(text, want):
    assert gsm8k.extract_answer(text) == want


@pytest.mark.parametrize(
    "pred, gold, want",
    [
        ("A: 18", "#### 18", True),
        ("A: $1,800.", "x\n#### 1,800", True),
        ("18.0", "18", True),
        ("A: 1/5", "0.2", True),
        ("A: 17", "#### 18", False),
        ("A: 18", "A: 18", True),  # gold given as the model-solutions ground_truth style
        ("the answer is 5", 5, True),
        ("A: abc", "#### 5", False),
        (None, "#### 5", False),
        ("A: 5", None, False),
        (object(), {}, False),
        ("A: 1/0", "#### 0", False),
    ],
)
def test_gsm8k_grade(pred, gold, want):
    assert gsm8k.grade(pred, gold) is want


def test_gsm8k_parse_and_canonical():
    assert gsm8k.parse_number("1,800") == 1800.0
    assert gsm8k.parse_number("$18.") == 18.0
    assert gsm8k.parse_number("50%") == 50.0
    assert gsm8k.parse_number("1,8") is None
    assert gsm8k.parse_number("twelve") is None
    assert gsm8k.canonical("1,800.0") == "1800"
    assert gsm8k.canonical("2.50") == "2.5"
    assert gsm8k.canonical(None) is None


def test_load_gsm8k_tmp(tmp_path):
    p = tmp_path / "g.jsonl"
    p.write_text(json.dumps({"question": "q", "answer": "w\n#### 1,000"}) + "\n\n")
    assert gsm8k.load_gsm8k(p) == [{"question": "q", "answer": "w\n#### 1,000", "final": "1000"}]
    p.write_text(json.dumps({"question": "q", "answer": "#### 1"}) + "\n" + json.dumps({"question": "q"}) + "\n")
    with pytest.raises(ValueError, match=r":2: .*'answer'"):
        gsm8k.load_gsm8k(p)
    p.write_text("{not json\n")
    with pytest.raises(ValueError, match=":1:"):
        gsm8k.load_gsm8k(p)


def test_gsm8k_real_test_split():
    rows = gsm8k.load_gsm8k(data_file("gsm8k_test.jsonl"))
    assert len(rows) == 1319
    assert all(r["final"] is not None and gsm8k.parse_number(r["final"]) is not None for r in rows)


def test_gsm8k_grader_agrees_with_model_solution_labels():
    path = data_file("gsm8k_test_model_solutions.jsonl")
    recs = [json.loads(line) for line in path.open()]
    agree = total = 0
    for rec in recs:
        for key in GSM8K_KEYS:
            ok = gsm8k.grade(rec[key]["solution"], rec["ground_truth"])
            agree += ok == rec[key]["is_correct"]
            total += 1
    frac = agree / total
    print(f"\nGSM8K grader vs is_correct: {agree}/{total} = {100 * frac:.2f}%")
    assert total == 1319 * 4
    assert frac >= 0.99


def test_gsm8k_reference_answers_match_model_solution_ground_truth():
    tests = gsm8k.load_gsm8k(data_file("gsm8k_test.jsonl"))
    recs = [json.loads(line) for line in data_file("gsm8k_test_model_solutions.jsonl").open()]
    assert all(gsm8k.grade(r["ground_truth"], t["answer"]) for r, t in zip(recs, tests))


# ----------------------------------------------------------------------------- MATH: extraction


@pytest.mark.parametrize(
    "text, want",
    [
        (r"so $\boxed{42}$.", "42"),
        (r"\boxed{1} then \boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"\boxed{\left\{ 1, \{2\} \right\}}", r"\left\{ 1, \{2\} \right\}"),
        (r"\fbox{7}", "7"),
        (r"\boxed {3}", "3"),
        (r"$\boxed 5$", "5"),
        (r"\boxed{\frac{1}{2}", None),  # unbalanced
        ("no box 5", None),
        (None, None),
        (r"\boxed{}", ""),
    ],
)
def test_last_boxed(text, want):
    assert mg.last_boxed(text) == want


@pytest.mark.parametrize(
    "raw, want",
    [
        (r" \dfrac{1}{9} ", r"\frac{1}{9}"),
        (r"\tfrac12", r"\frac{1}{2}"),
        (r"\frac1{72}", r"\frac{1}{72}"),
        (r"\left( 1, 2 \right)", "(1,2)"),
        (r"900,\!000,\!000", "900000000"),
        (r"10{,}000", "10000"),
        (r"48^\circ", "48"),
        (r"120^{\circ}", "120"),
        (r"\$6", "6"),
        ("$6$", "6"),
        (r"198\%", "198"),
        (r"100\text{ square units}", "100"),
        (r"5\text{ cm}^2", "5^2"),
        (r"\text{(A)}", "A"),
        (r"\text{4:30 p.m.}", "4:30p.m"),  # trailing period dropped
        (r"\pi r^2", r"\pi r^2"),  # a space that ends a command survives
        (r"\frac {1} {2}", r"\frac{1}{2}"),
        ("(B)", "B"),
        ("x = 5", "5"),
        (r"\sqrt3", r"\sqrt{3}"),
        ("3/4", r"\frac{3}{4}"),
        ("-1/2", r"\frac{-1}{2}"),
        ("5.0", "5"),
        ("2.50", "2.5"),
        ("5.", "5"),
        (".5", "0.5"),
        ("-.5", "-0.5"),
        ("x^{2}", "x^2"),
        (r"\displaystyle 4a - 2", "4a-2"),
        (None, ""),
    ],
)
def test_normalize(raw, want):
    assert mg.normalize(raw) == want


@pytest.mark.parametrize(
    "s, want",
    [
        ("3", 3.0),
        ("-0.25", -0.25),
        (r"\frac{3}{4}", 0.75),
        (r"-\frac{1}{2}", -0.5),
        (r"\frac{-1}{2}", -0.5),
        (r"1\frac{1}{4}", 1.25),
        (r"-2\frac{1}{2}", -2.5),
        (r"\frac{1}{0}", None),
        (r"\sqrt{2}", None),
        ("x", None),
        ("", None),
    ],
)
def test_to_number(s, want):
    got = mg.to_number(s)
    assert got == (pytest.approx(want) if want is not None else None)


# ----------------------------------------------------------------------------- MATH: comparison


@pytest.mark.parametrize(
    "a, b, want",
    [
        (r"\dfrac{1}{9}", r"\frac{1}{9}", True),  # string stage
        ("0.5", r"\frac12", True),  # numeric stage
        (r"1\frac{1}{4}", "1.25", True),
        ("3,250", "3250", True),
        ("37.50", "37.5", True),
        ("0.33333", r"\frac{1}{3}", True),  # rel tol 1e-4
        ("0.333", r"\frac{1}{3}", False),
        ("9999", "10000", False),  # integers compare exactly
        ("10000.5", "10000", True),
        (r"25\%", "0.25", True),  # percent
        ("25", "0.25", False),
        ("(0.5, 2)", r"\left(\frac12,2\right)", True),  # tuples element-wise
        ("(1,2)", "[1,2]", False),
        ("(1,2)", "(1,2,3)", False),
        ("(1,2)", "1,2", False),
        ("1,2", "1, 2.0", True),
        ("A", "C", False),
        ("", "", False),
        (r"\text{4:30 p.m.}", "4:30", False),
    ],
)
def test_is_equiv_string_numeric_tuple(a, b, want):
    assert mg.is_equiv(a, b) is want


SYMBOLIC = [
    (r"\frac{\sqrt{2}}{2}", r"\frac{1}{\sqrt{2}}"),
    ("2x+2", "2(x+1)"),
    (r"\pi r^2", r"r^{2}\pi"),
    (r"2\sqrt{3}", r"\sqrt{12}"),
    (r"\frac{\pi}{4}", "0.785398"),
    ("(x+1)(x-1)", "x^2-1"),  # bracketed but not a tuple
]


@pytest.mark.parametrize("a, b", SYMBOLIC)
def test_symbolic_stage_with_sympy(a, b):
    pytest.importorskip("sympy")
    assert mg.is_equiv(a, b)
    assert not mg.is_equiv(a, b + "+1")


@pytest.mark.parametrize("a, b", SYMBOLIC)
def test_symbolic_stage_skipped_without_sympy(monkeypatch, a, b):
    monkeypatch.setattr(mg, "_sympy", lambda: None)
    assert mg.symbolic_equal(a, b) is None
    assert mg.is_equiv(a, b) is False
    assert mg.is_equiv("0.5", r"\frac12")  # other stages still work


def test_symbolic_rejects_unsafe_or_huge_inputs():
    pytest.importorskip("sympy")
    assert mg._latex_to_expr("__import__('os').system('true')") is None
    assert mg.symbolic_equal("10^{10^{10}}", "10^{10^{10}}+0x") is False  # power guard
    assert mg.grade("10^{10^{10}}", "1") is False
    assert mg.grade("2^{10}", "1024") is True
    assert mg._latex_to_expr(r"\frac{1}{2}x") == "((1)/(2))x"
    assert mg._latex_to_expr(r"\sqrt[3]{8}") == "((8)**(1/(3)))"


def _sleepy(a, b):
    time.sleep(30)
    return True


def test_symbolic_timeout_main_thread(monkeypatch):
    pytest.importorskip("sympy")
    monkeypatch.setattr(mg, "_symbolic_core", _sleepy)
    assert mg.symbolic_equal("x", "y", timeout=0.2) is False


def test_symbolic_timeout_worker_thread(monkeypatch):
    pytest.importorskip("sympy")
    monkeypatch.setattr(mg, "_symbolic_core", lambda a, b: time.sleep(2) or True)
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("r", mg.symbolic_equal("x", "y", timeout=0.2)))
    t.start()
    t.join()
    assert out["r"] is False


@pytest.mark.parametrize(
    "pred, gold, want",
    [
        (r"... so the answer is $\boxed{\dfrac{3}{8}}$.", r"\frac{3}{8}", True),
        (r"\boxed{5}", r"solution \boxed{5}", True),
        (r"\boxed{4}", r"\boxed{5}", False),
        ("no box at all", "5", False),
        (r"\boxed{5", "5", False),
        (None, "5", False),
        ("5", None, False),
        (12, "12", True),
        (object(), "1", False),
        ("\\" * 500, "1", False),
    ],
)
def test_math_grade_never_raises(pred, gold, want):
    assert mg.grade(pred, gold) is want


def test_answer_key():
    assert mg.answer_key("0.5") == mg.answer_key(r"\frac{1}{2}") == mg.answer_key(r"\dfrac12")
    assert mg.answer_key("1.1") == mg.answer_key(r"1\frac{1}{10}")
    assert mg.answer_key("x+1") == "x+1"
    assert mg.answer_key("") is None and mg.answer_key(None) is None


def test_math_grader_agrees_with_qwen_labels():
    path = data_file("math_cot_100_bon8_qwen_rm.jsonl")
    recs = [json.loads(line) for line in path.open()]
    agree = agree_text = total = 0
    for rec in recs:
        for pred, text, label in zip(rec["pred"], rec["response"], rec["score"]):
            agree += mg.grade(pred, rec["gt"]) == label
            agree_text += mg.grade(text, rec["gt"]) == label  # our own \boxed extraction
            total += 1
    print(f"\nMATH grader (pred vs gt) vs score: {agree}/{total} = {100 * agree / total:.2f}%; "
          f"from response text: {agree_text}/{total} = {100 * agree_text / total:.2f}%")
    assert total == 800
    assert agree / total >= 0.98
    assert agree_text / total >= 0.98


def test_math500_reference_answers_grade_themselves():
    path = data_file("math500_test.jsonl")
    recs = [json.loads(line) for line in path.open()]
    hits = sum(mg.grade(r["solution"], r["answer"]) for r in recs)
    print(f"\nMATH-500: last \\boxed of solution equals answer for {hits}/{len(recs)}")
    assert hits / len(recs) >= 0.98
