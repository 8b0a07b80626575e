"""The embedded world: determinism, disjoint splits, arithmetic, answers, the grader.

Answers are checked twice, independently of the generator: each solution line is recomputed
with Python, and each question is re-solved by a small reader written here from the
English alone (it knows the sentence shapes, not the generator's code).
"""
from __future__ import annotations

import random
import re
from collections import Counter

import pytest

from swiftjax.world import problems as W

CONFIGS = [
    W.WorldConfig(),
    W.WorldConfig(min_steps=3, max_steps=4, easy_max_operand=20, max_operand=50,
                  distractor_prob=1.0, max_tokens=None),
    W.WorldConfig(min_steps=1, max_steps=2, distractor_prob=0.0),
    W.WorldConfig(min_steps=5, max_steps=8, families=("ages", "combo"), max_tokens=None),
]

_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


@pytest.fixture(scope="module")
def problems():
    out = []
    for i, cfg in enumerate(CONFIGS):
        for split in W.SPLITS:
            out += [(cfg, split, p) for p in W.make_split(split, 400, cfg, seed=i)]
    return out


# ----------------------------------------------------------------------------- determinism


def test_same_seed_same_problems():
    a = W.make_split("train", 300, W.WorldConfig(), seed=7)
    b = W.make_split("train", 300, W.WorldConfig(), seed=7)
    assert a == b
    c = W.make_split("train", 300, W.WorldConfig(), seed=8)
    assert [p.question for p in a] != [p.question for p in c]


def test_prefix_stable_and_ids():
    long = W.make_split("test", 120, seed=3)
    short = W.make_split("test", 50, seed=3)
    assert long[:50] == short
    assert [p.id for p in long] == [f"test-{i:06d}" for i in range(120)]
    assert W.make_split("validation", 0) == []


def test_splits_disjoint_and_unique():
    cfg = W.WorldConfig()
    qs = {}
    for split, seed in [("train", 0), ("validation", 0), ("test", 0), ("test", 1)]:
        ps = W.make_split(split, 1500 if split == "train" else 500, cfg, seed)
        questions = [p.question for p in ps]
        assert len(set(questions)) == len(questions), f"duplicate questions in {split}"
        qs.setdefault(split, set()).update(questions)
    assert not qs["train"] & qs["validation"]
    assert not qs["train"] & qs["test"]
    assert not qs["validation"] & qs["test"]


def test_splits_disjoint_in_a_small_space():
    # ~5000 possible questions: independent streams would collide many times here.
    cfg = W.WorldConfig(families=("ages",), min_steps=1, max_steps=1, easy_max_operand=6,
                        max_operand=6, distractor_prob=0.0)
    train = {p.question for p in W.make_split("train", 1000, cfg, seed=0)}
    test = {p.question for p in W.make_split("test", 200, cfg, seed=0)}
    val = {p.question for p in W.make_split("validation", 200, cfg, seed=5)}
    assert len(train) == 1000 and len(test) == 200 and len(val) == 200
    assert not train & test and not train & val and not test & val


def test_mixture_covers_families_and_steps():
    ps = W.make_split("train", 2000)
    fam = Counter(p.family for p in ps)
    steps = Counter(p.steps for p in ps)
    assert set(fam) == set(W.FAMILIES)
    assert set(steps) == {1, 2, 3, 4}
    assert min(steps.values()) > 300 and min(fam.values()) > 250  # roughly uniform
    with_distractor = sum(bool(_DISTRACTOR.search(p.question)) for p in ps)
    assert 0.1 < with_distractor / len(ps) < 0.4


# ----------------------------------------------------------------------------- arithmetic

_LINE = re.compile(r"Step (\d+): (\d+) ([-+*/]) (\d+) = (\d+)")


def test_every_solution_line_is_right(problems):
    for cfg, split, p in problems:
        lines = p.solution.split("\n")
        assert len(lines) == p.steps + 1, p
        assert cfg.min_steps <= p.steps <= cfg.max_steps
        assert p.family in cfg.families
        assert split in p.id
        numbers_in_question = {int(x) for x in re.findall(r"\d+", p.question)}
        results = []
        for i, line in enumerate(lines[:-1], 1):
            m = _LINE.fullmatch(line)
            assert m, f"bad line {line!r} in {p}"
            k, a, op, b, c = int(m[1]), int(m[2]), m[3], int(m[4]), int(m[5])
            assert k == i
            if op == "/":
                assert b != 0 and a % b == 0, line
                assert a // b == c, line
            else:
                assert _OPS[op](a, b) == c, line
            assert 0 <= c <= cfg.max_result
            # every operand is a number of the question or an earlier result
            for x in (a, b):
                assert x in numbers_in_question or x in results, (x, p)
            results.append(c)
        assert re.fullmatch(r"Answer: (\d+)", lines[-1]), lines[-1]
        assert int(lines[-1].split()[-1]) == p.answer == results[-1]
        if cfg.max_tokens is not None:
            assert W.count_tokens(p.question) + W.count_tokens(p.solution) + 4 <= cfg.max_tokens


def test_operands_bounded_by_difficulty(problems):
    for cfg, _, p in problems:
        bound = cfg.operand_bound(p.steps)
        lo = cfg.easy_max_operand
        assert lo <= bound <= cfg.max_operand
    cfg = W.WorldConfig(min_steps=1, max_steps=4, easy_max_operand=10, max_operand=40)
    assert [cfg.operand_bound(n) for n in (1, 2, 3, 4)] == [10, 20, 30, 40]


def test_words_are_in_vocabulary(problems):
    vocab = set(W.vocabulary())
    for _, _, p in problems:
        for w in re.findall(r"[A-Za-z]+", p.question + " " + p.solution):
            assert w in vocab, (w, p.question)
        assert p.question.isascii() and p.solution.isascii()


# ----------------------------------------------------------------------------- an independent reader

_NUM = r"(\d+)"
_DISTRACTOR = re.compile(
    r"It is \d+ degrees outside\.|The shop is \d+ miles away\.|The \w+ (?:has \d+ seats|is \d+ years old)\."
)
_PERSON_DISTRACTOR = re.compile(r"[A-Z][a-z]+ (?:has \d+ [a-z]+|is \d+ years old)\.")


def _sentences(q: str) -> list[str]:
    return re.findall(r"[^.?]+[.?]", q)


def _read_shopping(q):
    total, pay, change = 0, None, False
    for s in _sentences(q):
        s = s.strip()
        if m := re.search(rf"buys {_NUM} \w+ (?:at|that cost) {_NUM} dollars each", s):
            total += int(m[1]) * int(m[2])
        elif m := re.search(rf"pays {_NUM} dollars for a \w+|costs {_NUM} dollars more", s):
            total += int(m[1] or m[2])
        elif m := re.search(rf"pays with {_NUM} dollars|gives the clerk {_NUM} dollars", s):
            pay = int(m[1] or m[2])
        elif re.search(r"change|get back", s):
            change = True
        elif not re.search(r"spend", s):
            _ignore(s)
    return pay - total if change else total


def _read_sharing(q):
    value = None
    for s in _sentences(q):
        s = s.strip()
        if value is None and (m := re.search(rf"has {_NUM} \w+ (?:with|of \w+ with) {_NUM}", s)):
            value = int(m[1]) * int(m[2])
        elif value is None and (m := re.search(rf"(?:has|collects) {_NUM} \w+\.", s)):
            value = int(m[1])
        elif m := re.search(rf"(?:finds|buys|gets|wins) {_NUM} more", s):
            value += int(m[1])
        elif m := re.search(rf"(?:loses {_NUM} of them|gives away {_NUM}|sells {_NUM}|gives {_NUM} to)", s):
            value -= int(next(g for g in m.groups() if g))
        elif m := re.search(rf"(?:among|between) {_NUM} ", s):
            assert value % int(m[1]) == 0
            value //= int(m[1])
        elif m := re.search(rf"do {_NUM} of them get", s):
            value *= int(m[1])
        elif not re.search(r"does each one get", s):
            _ignore(s)
    return value


def _read_rates(q):
    total, goal, left = 0, None, False
    for s in _sentences(q):
        s = s.strip()
        if m := re.search(rf"(?:at {_NUM} miles per hour|goes {_NUM} miles each hour|reads {_NUM} pages each day|"
                          rf"makes {_NUM} \w+ each hour) for {_NUM} (?:hours|days)", s):
            rate = int(next(g for g in m.groups()[:-1] if g))
            total += rate * int(m.groups()[-1])
        elif m := re.search(rf"(?:travels|reads|makes) {_NUM} more", s):
            total += int(m[1])
        elif m := re.search(rf"trip is {_NUM} miles long|book has {_NUM} pages|order is for {_NUM} ", s):
            goal = int(next(g for g in m.groups() if g))
        elif re.search(r"left|must it go|still|need", s):
            left = True
        elif not re.search(r"How many", s):
            _ignore(s)
    return goal - total if left else total


def _read_ages(q):
    age = {}
    for s in _sentences(q):
        s = s.strip()
        if m := re.fullmatch(rf"(\w+) is {_NUM} years old\.", s):
            age[m[1]] = int(m[2])
        elif m := re.fullmatch(rf"(\w+) is {_NUM} years older than (\w+)\.", s):
            age[m[1]] = age[m[3]] + int(m[2])
        elif m := re.fullmatch(rf"(\w+) is {_NUM} years younger than (\w+)\.", s):
            age[m[1]] = age[m[3]] - int(m[2])
        elif m := re.fullmatch(rf"(\w+) is {_NUM} times as old as (\w+)\.", s):
            age[m[1]] = age[m[3]] * int(m[2])
        elif m := re.fullmatch(r"How old is (\w+)\?", s):
            return age[m[1]]
        elif m := re.fullmatch(rf"How old will (\w+) be in {_NUM} years\?", s):
            return age[m[1]] + int(m[2])
        elif m := re.fullmatch(rf"How old was (\w+) {_NUM} years ago\?", s):
            return age[m[1]] - int(m[2])
        else:
            _ignore(s)
    raise AssertionError(f"no question in {q!r}")


def _read_combo(q):
    value = None
    for s in _sentences(q):
        s = s.strip()
        if value is None and (m := re.search(rf"(?:has|collects) {_NUM} \w+\.", s)):
            value = int(m[1])
        elif m := re.search(rf"(?:finds|buys|gets|wins) {_NUM} more", s):
            value += int(m[1])
        elif m := re.search(rf"(?:loses {_NUM} of them|gives away {_NUM}|sells {_NUM}|gives {_NUM} to)", s):
            value -= int(next(g for g in m.groups() if g))
        elif m := re.search(rf"has {_NUM} times as many", s):
            value *= int(m[1])
        elif m := re.search(rf"splits them into {_NUM} equal piles", s):
            assert value % int(m[1]) == 0
            value //= int(m[1])
        elif not re.search(r"How many \w+ does \w+ have", s):
            _ignore(s)
    return value


def _ignore(sentence):
    """Only the known distractor shapes may be skipped by a reader."""
    ok = _DISTRACTOR.fullmatch(sentence) or _PERSON_DISTRACTOR.fullmatch(sentence)
    assert ok, f"reader does not understand {sentence!r}"


_READERS = {"shopping": _read_shopping, "sharing": _read_sharing, "rates": _read_rates,
            "ages": _read_ages, "combo": _read_combo}


def test_answers_follow_from_the_question(problems):
    for _, _, p in problems:
        assert _READERS[p.family](p.question) == p.answer, p


def test_distractors_leave_pronouns_unambiguous(problems):
    for _, _, p in problems:
        later = [s.strip() for s in _sentences(p.question)[1:]]
        if re.search(r"\b(?:[Ss]he|[Hh]e)\b", p.question):
            assert not any(_PERSON_DISTRACTOR.fullmatch(s) for s in later), p.question
        if re.search(r"\bit\b", p.question):
            assert not re.search(r"The \w+ (?:has \d+ seats|is \d+ years old)|The shop is", p.question), p.question


# ----------------------------------------------------------------------------- grader

@pytest.mark.parametrize("text, expected", [
    ("Answer: 17", 17),
    ("Step 1: 3 * 4 = 12\nAnswer: 12", 12),
    ("Answer:17", 17),
    ("Answer:   17.", 17),
    ("Answer: 1,234", 1234),
    ("Answer: 1,234,567.", 1234567),
    ("Answer: $45", 45),
    ("Answer: -5", -5),
    ("Answer: 12.0", 12),
    ("Answer: 8 dollars", 8),
    ("answer: 9", 9),
    ("Answer:\n 42", 42),
    ("Answer: 3<|end|>", 3),
    ("Answer: 1\nAnswer: 2", 2),
    ("Answer: 5 Answer: 7.", 7),
    ("Answer: 5 Answer: x", None),  # the last one decides
    ("", None),
    ("no answer here 17", None),
    ("Answer:", None),
    ("Answer: ", None),
    ("Answer: abc", None),
    ("Answer: 12.5", None),
    ("Answer: 12abc", None),
    ("Answer: 1,23", None),
    ("Answer: 1,2345", None),
    ("Answer: ١٢", None),
    ("Answer: １２", None),
    ("Answer: −5", None),
    ("Answer: - 5", None),
    ("Answer: " + "9" * 5000, None),
    ("Answer: 123456789012345678901234567890", 123456789012345678901234567890),
    (None, None),
    (17, None),
    (b"Answer: 3", None),
])
def test_extract_answer_table(text, expected):
    assert W.extract_answer(text) == expected


def test_extract_answer_never_raises_on_noise():
    rng = random.Random(0)
    alphabet = "Answer: 0123456789,.-+$ \n\t\u00e9\u0661\uff11\U0001f600<|end|>abc\x00\ud800"
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        out = W.extract_answer(text)
        assert out is None or isinstance(out, int)
    for _ in range(300):
        raw = bytes(rng.randrange(256) for _ in range(rng.randint(0, 60)))
        W.extract_answer("Answer: " + raw.decode("utf-8", errors="surrogateescape"))


def test_grade(problems):
    for _, _, p in problems[:300]:
        assert W.grade(p.solution, p.answer)
        assert not W.grade(p.solution, p.answer + 1)
        assert not W.grade(p.solution.replace("Answer:", "Result:"), p.answer)
    assert W.grade("Answer: 0", 0) and not W.grade("", 0)
    assert W.grade("Answer: 7", __import__("numpy").int64(7))
    for bad in (7.0, "7", None, True):
        with pytest.raises(ValueError, match="answer"):
            W.grade("Answer: 7", bad)


# ----------------------------------------------------------------------------- bad inputs

@pytest.mark.parametrize("kwargs", [
    dict(min_steps=0), dict(min_steps=3, max_steps=2), dict(max_steps=9),
    dict(easy_max_operand=2), dict(easy_max_operand=40, max_operand=30),
    dict(max_result=50), dict(distractor_prob=1.5), dict(distractor_prob=-0.1),
    dict(families=()), dict(families=("shopping", "cooking")), dict(families="ages"),
    dict(families=("ages", "ages")), dict(max_steps=6, families=("shopping", "rates")),
    dict(max_tokens=10), dict(min_steps=1.0),
])
def test_bad_config_raises(kwargs):
    with pytest.raises(ValueError, match="WorldConfig"):
        W.WorldConfig(**kwargs)


def test_bad_split_arguments_raise():
    with pytest.raises(ValueError, match="split"):
        W.make_split("dev", 3)
    with pytest.raises(ValueError, match="n:"):
        W.make_split("train", -1)
    with pytest.raises(ValueError, match="cfg"):
        W.make_split("train", 1, cfg={"min_steps": 1})
    with pytest.raises(ValueError, match="seed"):
        W.make_split("train", 1, seed="0")


def test_exhausted_space_raises():
    cfg = W.WorldConfig(families=("ages",), min_steps=1, max_steps=1, easy_max_operand=5,
                        max_operand=5, distractor_prob=0.0)
    stream = W.iter_split("test", cfg, max_rejects=3000)
    with pytest.raises(ValueError, match="exhausted"):
        for _ in range(100_000):
            next(stream)
