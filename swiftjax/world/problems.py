"""The embedded world: seeded arithmetic word problems with worked solutions.

Five families of short templated problems (``shopping``, ``sharing``, ``rates``, ``ages``,
``combo``) drawn from a fixed vocabulary of names, items and verbs. Every solution is a list
of calculation lines ``Step i: a op b = c`` (op in ``+ - * /``, all values non-negative
integers, divisions exact) followed by ``Answer: n``, where ``n`` is the last step's result::

    Question: Mia buys 3 pens at 4 dollars each. She pays with 20 dollars.
              How much change does she get?
    Solution: Step 1: 3 * 4 = 12
              Step 2: 20 - 12 = 8
              Answer: 8

Difficulty comes from :class:`WorldConfig`: the range of step counts, the operand bound
(it grows linearly from ``easy_max_operand`` for the fewest steps to ``max_operand`` for
the most, so short problems use small numbers and long ones bigger numbers), the chance of
an irrelevant distractor sentence with a number, the families enabled and a token budget.

Splits are deterministic and disjoint: each split draws from its own seeded stream
(``random.Random`` seeded with a string, stable across Python versions and processes),
and a question belongs to exactly one split, decided by a hash of its text, so a question
of one split can never appear in another whatever the seeds and sizes. Problems are
deduplicated within a split, and ``make_split(name, n)`` is a prefix of
``make_split(name, m)`` for n <= m.

The grader (:func:`extract_answer`, :func:`grade`) reads the integer after the last
``Answer:`` and never raises on any text.
"""
from __future__ import annotations

import dataclasses
import hashlib
import numbers
import random
import re
from typing import Callable, Iterator

__all__ = [
    "FAMILIES",
    "SPLITS",
    "WorldConfig",
    "Problem",
    "make_split",
    "iter_split",
    "split_of",
    "vocabulary",
    "count_tokens",
    "PHRASES",
    "extract_answer",
    "grade",
]

SPLITS = ("train", "validation", "test")
FAMILIES = ("shopping", "sharing", "rates", "ages", "combo")
# Largest number of steps each family can produce (the smallest is 1 for all).
_FAMILY_MAX_STEPS = {"shopping": 4, "sharing": 4, "rates": 4, "ages": 6, "combo": 8}
# Share of the question-hash space given to each split (out of 100).
_SPLIT_BUCKETS = {"test": range(0, 10), "validation": range(10, 20), "train": range(20, 100)}
# Tokens the chat format adds around a question and its solution:
# <bos> <|user|> ... <|assistant|> ... <|end|>.
_FORMAT_TOKENS = 4


# ----------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    """Difficulty knobs of the world (frozen: usable as a static argument / dict key).

    min_steps, max_steps: each problem draws its number of calculation steps uniformly from
        [min_steps, max_steps] (1 <= min <= max <= 8; families that cannot make that many
        steps are skipped for that problem).
    easy_max_operand, max_operand: the bound on the free numbers of a problem grows linearly
        from easy_max_operand (at min_steps) to max_operand (at max_steps). Counts,
        multipliers and divisors stay in [2, 9]; derived numbers (a payment, a trip length,
        a pile that divides evenly) may exceed the bound.
    max_result: every intermediate and final result lies in [0, max_result].
    distractor_prob: probability of one extra sentence with an irrelevant number.
    families: names from FAMILIES to draw from (uniformly among those able to make the
        drawn number of steps).
    max_tokens: reject problems whose chat-formatted question + solution would exceed this
        many tokens of :mod:`swiftjax.world.tokenizer` (None: no limit).
    """

    min_steps: int = 1
    max_steps: int = 4
    easy_max_operand: int = 12
    max_operand: int = 30
    max_result: int = 999
    distractor_prob: float = 0.25
    families: tuple[str, ...] = FAMILIES
    max_tokens: int | None = 96

    def __post_init__(self):
        for f in ("min_steps", "max_steps", "easy_max_operand", "max_operand", "max_result"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool):
                raise ValueError(f"WorldConfig.{f}: expected an int, got {v!r}")
        if not 1 <= self.min_steps <= self.max_steps <= 8:
            raise ValueError(
                "WorldConfig: expected 1 <= min_steps <= max_steps <= 8, got "
                f"min_steps={self.min_steps}, max_steps={self.max_steps}"
            )
        if not 5 <= self.easy_max_operand <= self.max_operand:
            raise ValueError(
                "WorldConfig: expected 5 <= easy_max_operand <= max_operand, got "
                f"easy_max_operand={self.easy_max_operand}, max_operand={self.max_operand}"
            )
        if self.max_result < 100 or self.max_result < self.max_operand:
            raise ValueError(
                f"WorldConfig.max_result: expected >= max(100, max_operand), got {self.max_result}"
            )
        p = self.distractor_prob
        if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 <= p <= 1.0:
            raise ValueError(f"WorldConfig.distractor_prob: expected a float in [0, 1], got {p!r}")
        fams = self.families
        if isinstance(fams, str) or not isinstance(fams, tuple) or not fams:
            raise ValueError(f"WorldConfig.families: expected a non-empty tuple of names, got {fams!r}")
        bad = [f for f in fams if f not in FAMILIES]
        if bad or len(set(fams)) != len(fams):
            raise ValueError(
                f"WorldConfig.families: expected distinct names from {FAMILIES}, got {fams!r}"
            )
        for n in range(self.min_steps, self.max_steps + 1):
            if not any(_FAMILY_MAX_STEPS[f] >= n for f in fams):
                raise ValueError(
                    f"WorldConfig: no enabled family makes {n} steps (families={fams!r}; "
                    f"most steps per family: {_FAMILY_MAX_STEPS})"
                )
        mt = self.max_tokens
        if mt is not None and (not isinstance(mt, int) or isinstance(mt, bool) or mt < 40):
            raise ValueError(f"WorldConfig.max_tokens: expected None or an int >= 40, got {mt!r}")

    def operand_bound(self, steps: int) -> int:
        """Bound on free operands for a problem of ``steps`` steps (linear in steps)."""
        if self.max_steps == self.min_steps:
            return self.max_operand
        frac = (steps - self.min_steps) / (self.max_steps - self.min_steps)
        return int(round(self.easy_max_operand + frac * (self.max_operand - self.easy_max_operand)))


@dataclasses.dataclass(frozen=True)
class Problem:
    """One problem. ``id`` is '<split>-<index:06d>'; ``solution`` is the worked solution
    ('Step 1: a op b = c' lines then 'Answer: n'); ``answer`` the exact integer; ``steps``
    the number of calculation lines."""

    id: str
    question: str
    solution: str
    answer: int
    family: str
    steps: int


# ----------------------------------------------------------------------------- vocabulary

_NAMES = {
    "Mia": "f", "Ana": "f", "Emma": "f", "Lily": "f", "Zoe": "f", "Sara": "f", "Nora": "f",
    "Ella": "f", "Tom": "m", "Ben": "m", "Leo": "m", "Sam": "m", "Max": "m", "Jack": "m",
    "Omar": "m", "Ravi": "m",
}
_PRON = {"f": ("She", "she"), "m": ("He", "he")}
_ITEMS = ("apples", "pens", "books", "cups", "toys", "hats", "notebooks", "candles", "plates",
          "balls", "shirts", "pencils")
_EXTRAS = ("gift", "snack", "card", "map", "lamp", "poster")
_THINGS = ("marbles", "stickers", "cookies", "cards", "shells", "coins", "beads", "stamps",
           "candies", "grapes")
_CONTAINERS = ("boxes", "bags", "jars", "packs")
_GROUPS = ("friends", "kids", "cousins", "classmates")
_VEHICLES = ("car", "train", "bus", "bike", "boat", "truck")
_MAKERS = ("machine", "robot", "printer")
_GOODS = ("toys", "cups", "cards", "bottles")
_PAYMENTS = (10, 20, 50, 100, 200, 500, 1000)

_T = {
    # shopping
    "buy": ("{name} buys {q} {item} at {p} dollars each.",
            "{name} buys {q} {item} that cost {p} dollars each."),
    "buy2": ("{Pron} also buys {q} {item} at {p} dollars each.",
             "Then {pron} buys {q} {item} at {p} dollars each."),
    "extra": ("{Pron} also pays {p} dollars for a {extra}.",
              "A {extra} costs {p} dollars more."),
    "pay": ("{Pron} pays with {p} dollars.", "{Pron} gives the clerk {p} dollars."),
    "q_spend": ("How many dollars does {pron} spend?", "How much does {pron} spend in total?"),
    "q_change": ("How much change does {pron} get?", "How many dollars does {pron} get back?"),
    # sharing
    "have": ("{name} has {a} {things}.", "{name} collects {a} {things}."),
    "boxes": ("{name} has {b} {containers} with {c} {things} in each.",
              "{name} has {b} {containers} of {things} with {c} in each."),
    "more": ("{Pron} finds {d} more.", "{Pron} buys {d} more.", "{Pron} gets {d} more.",
             "{Pron} wins {d} more."),
    "less": ("{Pron} loses {d} of them.", "{Pron} gives away {d}.", "{Pron} sells {d}.",
             "{Pron} gives {d} to {other}."),
    "share": ("{Pron} shares them equally among {k} {groups}.",
              "{Pron} splits them evenly between {k} {groups}."),
    "q_each": ("How many {things} does each one get?", "How many does each one get?"),
    "q_group": ("How many {things} do {m} of them get in total?",
                "How many {things} do {m} of them get together?"),
    # rates
    "drive": ("A {vehicle} travels at {r} miles per hour for {t} hours.",
              "A {vehicle} goes {r} miles each hour for {t} hours."),
    "drive2": ("Then it travels at {r} miles per hour for {t} hours.",
               "Then it goes {r} miles each hour for {t} hours."),
    "drive_extra": ("Then it travels {e} more miles.",),
    "trip": ("The trip is {D} miles long.",),
    "q_drive": ("How many miles does it travel?", "How many miles does it go in total?"),
    "q_trip": ("How many miles are left?", "How many more miles must it go?"),
    "read": ("{name} reads {r} pages each day for {t} days.",),
    "read2": ("Then {pron} reads {r} pages each day for {t} days.",),
    "read_extra": ("Then {pron} reads {e} more pages.",),
    "book": ("The book has {D} pages.",),
    "q_read": ("How many pages does {pron} read?", "How many pages does {pron} read in total?"),
    "q_book": ("How many pages are left?", "How many pages does {pron} still have to read?"),
    "make": ("A {maker} makes {r} {goods} each hour for {t} hours.",),
    "make2": ("Then it makes {r} {goods} each hour for {t} hours.",),
    "make_extra": ("Then it makes {e} more {goods}.",),
    "order": ("An order is for {D} {goods}.",),
    "q_make": ("How many {goods} does it make?", "How many {goods} does it make in total?"),
    "q_order": ("How many more {goods} does it need to make?", "How many {goods} are still needed?"),
    # ages
    "age": ("{name} is {x} years old.",),
    "older": ("{b} is {y} years older than {a}.",),
    "younger": ("{b} is {y} years younger than {a}.",),
    "times": ("{b} is {k} times as old as {a}.",),
    "q_age": ("How old is {name}?",),
    "q_future": ("How old will {name} be in {z} years?",),
    "q_past": ("How old was {name} {z} years ago?",),
    # combo (an inventory changing step by step)
    "mul": ("Then {pron} has {k} times as many.",),
    "div": ("{Pron} splits them into {k} equal piles and keeps one pile.",),
    "q_now": ("How many {things} does {name} have now?", "How many {things} does {pron} have at the end?"),
    # distractors
    # distractors; a problem told with 'she'/'he' gets no 'person' one and a problem told
    # with 'it' no 'thing' one, so that pronouns stay unambiguous
    "dis_person": ("{other} has {n} {things}.", "{other} is {n} years old."),
    "dis_thing": ("The shop is {n} miles away.", "The {vehicle} has {n} seats.",
                  "The {vehicle} is {n} years old."),
    "dis_weather": ("It is {n} degrees outside.",),
}
_SOLUTION_WORDS = ("Step", "Answer")
# Fixed solution markers the tokenizer keeps whole (one token each, no leading space).
PHRASES = tuple(f"Step {i}:" for i in range(1, 9)) + ("Answer:",)


def vocabulary() -> tuple[str, ...]:
    """Every word (maximal run of ASCII letters) any problem or solution can contain,
    sorted. The tokenizer makes each one a single token."""
    words: set[str] = set(_SOLUTION_WORDS) | set(_NAMES)
    for lst in (_ITEMS, _EXTRAS, _THINGS, _CONTAINERS, _GROUPS, _VEHICLES, _MAKERS, _GOODS):
        words.update(lst)
    for pair in _PRON.values():
        words.update(pair)
    for variants in _T.values():
        for t in variants:
            words.update(re.findall(r"[A-Za-z]+", re.sub(r"\{[^}]*\}", " ", t)))
    return tuple(sorted(words))


# The tokenizer's pre-tokenization, restated for counting: a phrase is one token, a word,
# digit or operator with its optional leading space one token, any other character one.
_COUNT_RE = re.compile(r"Step [1-8]:|Answer:| ?[A-Za-z]+| ?[0-9]| ?[-+*/=]|[\s\S]")


def count_tokens(text: str) -> int:
    """Number of tokens :mod:`swiftjax.world.tokenizer` gives a world text (exact for
    texts made of :func:`vocabulary` words; special tokens not included)."""
    return len(_COUNT_RE.findall(text))


# ----------------------------------------------------------------------------- families

Step = tuple[int, str, int, int]


class _Reject(Exception):
    """A draw broke a constraint; the caller draws again."""


def _apply(a: int, op: str, b: int) -> Step:
    if op == "+":
        c = a + b
    elif op == "-":
        c = a - b
    elif op == "*":
        c = a * b
    else:
        if b == 0 or a % b:
            raise _Reject
        c = a // b
    if c < 0:
        raise _Reject
    return (a, op, b, c)


def _say(rng: random.Random, key: str, **kw) -> str:
    return rng.choice(_T[key]).format(**kw)


def _person(rng: random.Random, exclude=()) -> tuple[str, str, str]:
    name = rng.choice([n for n in _NAMES if n not in exclude])
    cap, low = _PRON[_NAMES[name]]
    return name, cap, low


def _small(cap: int) -> int:
    return max(2, min(9, cap))


def _parts(rng: random.Random, n: int) -> tuple[bool, bool, bool]:
    """(second, extra, final) flags with 1 + 2*second + extra + final == n, n in 1..4."""
    options = {
        1: [(False, False, False)],
        2: [(False, True, False), (False, False, True)],
        3: [(True, False, False), (False, True, True)],
        4: [(True, False, True)],
    }[n]
    return rng.choice(options)


def _shopping(rng: random.Random, n: int, cap: int):
    name, Pron, pron = _person(rng)
    second, extra, change = _parts(rng, n)
    item1, item2 = rng.sample(_ITEMS, 2)
    facts, steps = [], []
    q, p = rng.randint(2, _small(cap)), rng.randint(2, cap)
    steps.append(_apply(q, "*", p))
    facts.append(_say(rng, "buy", name=name, q=q, item=item1, p=p))
    total = steps[-1][3]
    if second:
        q, p = rng.randint(2, _small(cap)), rng.randint(2, cap)
        steps.append(_apply(q, "*", p))
        facts.append(_say(rng, "buy2", Pron=Pron, pron=pron, q=q, item=item2, p=p))
        steps.append(_apply(total, "+", steps[-1][3]))
        total = steps[-1][3]
    if extra:
        p = rng.randint(2, cap)
        facts.append(_say(rng, "extra", Pron=Pron, p=p, extra=rng.choice(_EXTRAS)))
        steps.append(_apply(total, "+", p))
        total = steps[-1][3]
    if change:
        above = [m for m in _PAYMENTS if m > total]
        if not above:
            raise _Reject
        pay = above[0] if rng.random() < 0.7 or len(above) == 1 else above[1]
        facts.append(_say(rng, "pay", Pron=Pron, p=pay))
        steps.append(_apply(pay, "-", total))
        question = _say(rng, "q_change", pron=pron)
    else:
        question = _say(rng, "q_spend", pron=pron)
    return facts, question, steps, {name}, "person"


def _sharing(rng: random.Random, n: int, cap: int):
    name, Pron, pron = _person(rng)
    other = _person(rng, {name})[0]
    things, containers, groups = rng.choice(_THINGS), rng.choice(_CONTAINERS), rng.choice(_GROUPS)
    # n = boxes + adjust + 1 (share) + group
    options = [f for f in [(b, a, g) for b in (0, 1) for a in (0, 1) for g in (0, 1)]
               if sum(f) + 1 == n]
    boxes, adjust, group = rng.choice(options)
    k = rng.randint(3 if group else 2, _small(cap))
    facts, steps = [], []
    if boxes:
        b, c = rng.randint(2, _small(cap)), rng.randint(2, cap)
        facts.append(_say(rng, "boxes", name=name, b=b, c=c, containers=containers, things=things))
        steps.append(_apply(b, "*", c))
        value = steps[-1][3]
    else:
        value = None
    if adjust:
        if value is None:
            value = rng.randint(4, cap)
            facts.append(_say(rng, "have", name=name, a=value, things=things))
        if rng.random() < 0.5:
            d = (-value) % k + k * rng.randint(0, max(0, cap // k - 1))
            d = d or k
            facts.append(_say(rng, "more", Pron=Pron, d=d))
            steps.append(_apply(value, "+", d))
        else:
            d = value % k + k * rng.randint(0, max(0, cap // k - 1))
            if d == 0:
                d = k
            if d >= value:
                raise _Reject
            facts.append(_say(rng, "less", Pron=Pron, d=d, other=other))
            steps.append(_apply(value, "-", d))
        value = steps[-1][3]
    if value is None:
        value = k * rng.randint(2, cap)
        facts.append(_say(rng, "have", name=name, a=value, things=things))
    if value % k:
        divisors = [j for j in range(3 if group else 2, 10) if value % j == 0 and j < value]
        if not divisors:
            raise _Reject
        k = rng.choice(divisors)
    facts.append(_say(rng, "share", Pron=Pron, k=k, groups=groups))
    steps.append(_apply(value, "/", k))
    if group:
        m = rng.randint(2, k - 1)
        steps.append(_apply(steps[-1][3], "*", m))
        question = _say(rng, "q_group", things=things, m=m)
    else:
        question = _say(rng, "q_each", things=things)
    return facts, question, steps, {name, other}, "person"


def _rates(rng: random.Random, n: int, cap: int):
    kind = rng.choice(("drive", "read", "make"))
    name, Pron, pron = _person(rng)
    second, extra, left = _parts(rng, n)
    kw = dict(name=name, Pron=Pron, pron=pron, vehicle=rng.choice(_VEHICLES),
              maker=rng.choice(_MAKERS), goods=rng.choice(_GOODS))
    goal_key, q_key, q_left_key = {"drive": ("trip", "q_drive", "q_trip"),
                                   "read": ("book", "q_read", "q_book"),
                                   "make": ("order", "q_make", "q_order")}[kind]
    facts, steps = [], []
    r, t = rng.randint(2, cap), rng.randint(2, _small(cap))
    facts.append(_say(rng, kind, r=r, t=t, **kw))
    steps.append(_apply(r, "*", t))
    total = steps[-1][3]
    if second:
        r, t = rng.randint(2, cap), rng.randint(2, _small(cap))
        facts.append(_say(rng, kind + "2", r=r, t=t, **kw))
        steps.append(_apply(r, "*", t))
        steps.append(_apply(total, "+", steps[-1][3]))
        total = steps[-1][3]
    if extra:
        e = rng.randint(2, cap)
        facts.append(_say(rng, kind + "_extra", e=e, **kw))
        steps.append(_apply(total, "+", e))
        total = steps[-1][3]
    if left:
        goal = total + rng.randint(1, 3 * cap)
        facts.insert(0, _say(rng, goal_key, D=goal, **kw))
        steps.append(_apply(goal, "-", total))
        question = _say(rng, q_left_key, **kw)
    else:
        question = _say(rng, q_key, **kw)
    return facts, question, steps, {name}, "person" if kind == "read" else "it"


def _ages(rng: random.Random, n: int, cap: int):
    relations = n if n == 1 or rng.random() < 0.5 else n - 1
    people: list[str] = []
    for _ in range(relations + 1):
        people.append(_person(rng, set(people))[0])
    age = rng.randint(4, cap)
    facts = [_say(rng, "age", name=people[0], x=age)]
    steps: list[Step] = []
    used_times = False
    for a, b in zip(people, people[1:]):
        choices = ["older", "younger"] + ([] if used_times or age > 40 else ["times"])
        rel = rng.choice(choices)
        if rel == "times":
            k = rng.randint(2, 3)
            used_times = True
            facts.append(_say(rng, "times", a=a, b=b, k=k))
            steps.append(_apply(age, "*", k))
        elif rel == "older":
            y = rng.randint(2, cap)
            facts.append(_say(rng, "older", a=a, b=b, y=y))
            steps.append(_apply(age, "+", y))
        else:
            if age <= 3:
                raise _Reject
            y = rng.randint(1, min(cap, age - 2))
            facts.append(_say(rng, "younger", a=a, b=b, y=y))
            steps.append(_apply(age, "-", y))
        age = steps[-1][3]
    last = people[-1]
    if relations == n:
        question = _say(rng, "q_age", name=last)
    elif age > 3 and rng.random() < 0.4:
        z = rng.randint(1, min(cap, age - 2))
        question = _say(rng, "q_past", name=last, z=z)
        steps.append(_apply(age, "-", z))
    else:
        z = rng.randint(2, cap)
        question = _say(rng, "q_future", name=last, z=z)
        steps.append(_apply(age, "+", z))
    if steps[-1][3] > 120:
        raise _Reject
    return facts, question, steps, set(people), None


def _combo(rng: random.Random, n: int, cap: int, max_result: int):
    name, Pron, pron = _person(rng)
    other = _person(rng, {name})[0]
    things = rng.choice(_THINGS)
    value = rng.randint(2, cap)
    facts = [_say(rng, "have", name=name, a=value, things=things)]
    steps: list[Step] = []
    for _ in range(n):
        options = ["+", "+", "-", "-", "*", "/"]
        rng.shuffle(options)
        for op in options:
            if op == "+":
                d = rng.randint(2, cap)
                facts.append(_say(rng, "more", Pron=Pron, d=d))
            elif op == "-":
                if value < 3:
                    continue
                d = rng.randint(1, min(cap, value - 1))
                facts.append(_say(rng, "less", Pron=Pron, d=d, other=other))
            elif op == "*":
                d = rng.randint(2, 3 if value > 50 else _small(cap))
                if value * d > max_result:
                    continue
                facts.append(_say(rng, "mul", pron=pron, k=d))
            else:
                divs = [j for j in range(2, 10) if value % j == 0 and j < value]
                if not divs:
                    continue
                d = rng.choice(divs)
                facts.append(_say(rng, "div", Pron=Pron, k=d))
            steps.append(_apply(value, op, d))
            value = steps[-1][3]
            break
        else:
            raise _Reject
    question = _say(rng, "q_now", things=things, name=name, pron=pron)
    return facts, question, steps, {name, other}, "person"


_GENERATORS: dict[str, Callable] = {
    "shopping": _shopping,
    "sharing": _sharing,
    "rates": _rates,
    "ages": _ages,
}


def _distractor(rng: random.Random, cap: int, used: set[str], pronoun: str | None) -> str:
    """An irrelevant sentence with a number, about no one the problem uses; ``pronoun``
    ('person' for she/he, 'it', None) rules out the kind a pronoun could point back to."""
    kinds = {"person": ("dis_thing", "dis_weather"), "it": ("dis_person", "dis_weather"),
             None: ("dis_person", "dis_thing", "dis_weather")}[pronoun]
    return _say(rng, rng.choice(kinds), other=_person(rng, used)[0], n=rng.randint(2, cap),
                things=rng.choice(_THINGS), vehicle=rng.choice(_VEHICLES))


def _solution(steps: list[Step]) -> str:
    lines = [f"Step {i}: {a} {op} {b} = {c}" for i, (a, op, b, c) in enumerate(steps, 1)]
    lines.append(f"Answer: {steps[-1][3]}")
    return "\n".join(lines)


def _draw(rng: random.Random, cfg: WorldConfig) -> tuple[str, str, int, str, int] | None:
    """One candidate (question, solution, answer, family, steps), or None if rejected."""
    n = rng.randint(cfg.min_steps, cfg.max_steps)
    fams = [f for f in cfg.families if _FAMILY_MAX_STEPS[f] >= n]
    family = rng.choice(fams)
    cap = cfg.operand_bound(n)
    try:
        if family == "combo":
            facts, question, steps, used, pronoun = _combo(rng, n, cap, cfg.max_result)
        else:
            facts, question, steps, used, pronoun = _GENERATORS[family](rng, n, cap)
    except _Reject:
        return None
    if len(steps) != n or any(not 0 <= s[3] <= cfg.max_result for s in steps):
        return None
    solution = _solution(steps)
    plain = " ".join(facts + [question])
    text = plain
    if rng.random() < cfg.distractor_prob:
        facts.insert(rng.randint(1, len(facts)), _distractor(rng, cap, used, pronoun))
        text = " ".join(facts + [question])
    if cfg.max_tokens is not None:
        budget = cfg.max_tokens - _FORMAT_TOKENS - count_tokens(solution)
        if count_tokens(text) > budget:  # drop the distractor first, then the problem
            text = plain
            if count_tokens(text) > budget:
                return None
    return text, solution, steps[-1][3], family, n


# ----------------------------------------------------------------------------- splits


def split_of(question: str) -> str:
    """The one split a question text belongs to (by a SHA-256 hash of its text):
    'test' ~10%, 'validation' ~10%, 'train' ~80% of the question space."""
    bucket = int.from_bytes(hashlib.sha256(question.encode("utf-8")).digest()[:8], "big") % 100
    for name, rng_ in _SPLIT_BUCKETS.items():
        if bucket in rng_:
            return name
    raise AssertionError("unreachable")


def _check_split(name) -> None:
    if name not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS}, got {name!r}")


def iter_split(name: str, cfg: WorldConfig | None = None, seed: int = 0,
               max_rejects: int = 200_000) -> Iterator[Problem]:
    """Endless deterministic stream of distinct problems of split ``name``.

    Raises ValueError when ``max_rejects`` draws in a row give nothing new (the config's
    problem space is exhausted)."""
    _check_split(name)
    cfg = WorldConfig() if cfg is None else cfg
    if not isinstance(cfg, WorldConfig):
        raise ValueError(f"cfg: expected a WorldConfig, got {type(cfg).__name__}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed: expected an int, got {seed!r}")
    rng = random.Random(f"swiftjax.world/{seed}/{name}")
    seen: set[str] = set()
    index, misses = 0, 0
    while True:
        draw = _draw(rng, cfg)
        if draw is None or draw[0] in seen or split_of(draw[0]) != name:
            misses += 1
            if misses > max_rejects:
                raise ValueError(
                    f"make_split({name!r}): the problem space of {cfg} is exhausted after "
                    f"{index} distinct problems; widen the config or ask for fewer"
                )
            continue
        misses = 0
        seen.add(draw[0])
        question, solution, answer, family, steps = draw
        yield Problem(f"{name}-{index:06d}", question, solution, answer, family, steps)
        index += 1


def make_split(name: str, n: int, cfg: WorldConfig | None = None, seed: int = 0) -> list[Problem]:
    """The first ``n`` problems of split ``name`` in {'train', 'validation', 'test'}.

    Deterministic in (name, cfg, seed); splits are disjoint by question text for any seeds;
    ``make_split(name, n)`` is a prefix of ``make_split(name, m)`` when n <= m."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"n: expected a non-negative int, got {n!r}")
    stream = iter_split(name, cfg, seed)
    return [next(stream) for _ in range(n)]


# ----------------------------------------------------------------------------- grading

_KEY_RE = re.compile(r"answer\s*:", re.IGNORECASE)
_NUM_RE = re.compile(
    r"\s*\$?\s*(?P<sign>[-+]?)(?P<num>[0-9]{1,3}(?:,[0-9]{3})+(?![0-9])|[0-9]+)(?P<frac>\.[0-9]+)?"
)
_MAX_DIGITS = 60


def extract_answer(text) -> int | None:
    """The integer after the last 'Answer:' (case-insensitive) in ``text``, else None.

    Tolerates spaces or newlines after the colon, a '$', a sign, thousands commas
    ('1,234'), a trailing '.0', and anything after the number that does not continue it
    (a period, words, an end token). Malformed -> None: no 'Answer:', no digits after the
    last one, a fraction ('2.5'), a number glued to letters ('12abc'), broken grouping
    ('1,23'), more than 60 digits, non-ASCII digits, non-string input. Never raises."""
    try:
        if not isinstance(text, str):
            return None
        last = None
        for last in _KEY_RE.finditer(text):
            pass
        if last is None:
            return None
        m = _NUM_RE.match(text, last.end())
        if m is None:
            return None
        frac = m.group("frac")
        if frac is not None and frac.strip(".0"):
            return None
        after = text[m.end():m.end() + 2]
        if after[:1].isalnum() or after[:1] == "_":
            return None
        if after[:1] in (",", ".") and after[1:2].isdigit():
            return None
        digits = m.group("num").replace(",", "")
        if len(digits) > _MAX_DIGITS:
            return None
        value = int(digits)
        return -value if m.group("sign") == "-" else value
    except Exception:  # the grader must never raise on model output
        return None


def grade(text, answer: int) -> bool:
    """True iff :func:`extract_answer` of ``text`` equals the integer ``answer``."""
    if isinstance(answer, bool) or not isinstance(answer, numbers.Integral):
        raise ValueError(f"answer: expected an int, got {type(answer).__name__} {answer!r}")
    got = extract_answer(text)
    return got is not None and got == int(answer)
