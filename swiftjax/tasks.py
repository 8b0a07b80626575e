"""A Task: what a problem is, how it is worded for the model and how an answer is graded.

Tasks: ``world`` (the embedded arithmetic world, generated), ``gsm8k`` and ``math500``
(jsonl files in their published formats) and ``jsonl`` (any jsonl file: the field names and the
grader come from the config). Every pipeline gets its problems and grades from a Task, so a
user's own benchmark is one config away.

Splits: ``train`` and ``test``. A task with one file for both (``train_path`` unset or equal to
``test_path``) takes the first ``n_test`` problems as the test split and the next ``n_train``
as the training split, so the two never overlap.

The prompt wording is part of the task: ``prompt`` is a string in which ``{question}`` is
replaced by the problem text (no other braces are interpreted, so ``\\boxed{}`` is safe).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Literal

from swiftjax._io import file_sha256
from swiftjax.config import build
from swiftjax.data import gsm8k
from swiftjax.data import math as math_grader

__all__ = ["TaskConfig", "Problem", "Task", "make_task", "DEFAULT_PROMPTS", "GRADERS"]

DEFAULT_PROMPTS = {
    "world": "{question}",
    "gsm8k": "{question}\nSolve the problem step by step. End with a line '#### <number>' giving the final answer.",
    "math500": "{question}\nPlease reason step by step, and put your final answer within \\boxed{}.",
    "jsonl": "{question}",
}


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """``name``: world | gsm8k | math500 | jsonl. ``n_train`` / ``n_test``: problems per split
    (null: all of the file). ``prompt``: the wording (null: the task's default). jsonl only:
    ``question_field``, ``answer_field`` (the gold answer or a reference solution), optional
    ``solution_field`` (a worked demonstration) and ``id_field``; ``grader``: gsm8k (numeric),
    math (boxed, symbolic) or exact (string match after strip)."""

    name: Literal["world", "gsm8k", "math500", "jsonl"] = "world"
    train_path: str | None = None
    test_path: str | None = None
    n_train: int | None = 1000
    n_test: int | None = 300
    seed: int = 0
    prompt: str | None = None
    question_field: str = "question"
    answer_field: str = "answer"
    solution_field: str | None = None
    id_field: str | None = None
    grader: Literal["gsm8k", "math", "exact"] = "gsm8k"

    def __post_init__(self):
        for k in ("n_train", "n_test"):
            v = getattr(self, k)
            if v is not None and v < 1:
                raise ValueError(f"{k}: expected a positive int or null, got {v}")
        if self.prompt is not None and "{question}" not in self.prompt:
            raise ValueError(f"prompt: expected a string containing '{{question}}', got {self.prompt!r}")


@dataclasses.dataclass(frozen=True)
class Problem:
    id: str                 # unique within the task
    question: str           # the problem text, before the task's wording
    gold: str               # the reference final answer
    solution: str | None    # a worked demonstration, when the task has one


def _exact(pred: str | None, gold: str) -> bool:
    return pred is not None and pred.strip() == str(gold).strip()


def _last_line(text: str) -> str | None:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else None


# grader name -> (extract(text) -> answer or None, equal(answer, gold) -> bool)
GRADERS = {
    "gsm8k": (gsm8k.extract_answer, gsm8k.grade),
    "math": (math_grader.extract_answer, math_grader.grade),
    "exact": (_last_line, _exact),
}
# Bumped whenever a grader's extraction or comparison changes, so candidate sets graded by the
# old one are not reused (their rows store the answers and verdicts). gsm8k 2: reads \\boxed{}.
GRADER_VERSIONS = {"gsm8k": 2, "math": 1, "exact": 1, "world": 2}  # world 2: a \\boxed{} integer when no "Answer:"


def _world_answer(text) -> int | None:
    """The world's answer: the integer after the last ``Answer:`` (the world's own format, what
    the world model writes), else the integer in the last ``\\boxed{}`` (what chat models
    trained on math write whatever the wording asks), else None."""
    from swiftjax.world.problems import extract_answer

    ans = extract_answer(text)
    if ans is None and isinstance(text, str):
        boxed = math_grader.last_boxed(text)
        if boxed is not None:
            ans = extract_answer("Answer: " + boxed.strip().strip("$").strip())
    return ans


def _read_jsonl(path: Path, where_field: str) -> list[tuple[int, dict]]:
    if not path.is_file():
        raise ValueError(f"{where_field}: expected a jsonl file, {path} "
                         + ("is a directory" if path.is_dir() else "does not exist"))
    rows = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{lineno}: expected UTF-8 text ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got invalid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append((lineno, row))
    return rows


class Task:
    """Problems and grading of one benchmark (see the module doc)."""

    def __init__(self, cfg: TaskConfig):
        self.cfg = cfg
        self.name = cfg.name
        self.prompt = cfg.prompt or DEFAULT_PROMPTS[cfg.name]
        grader = {"gsm8k": "gsm8k", "math500": "math", "world": "world"}.get(cfg.name, cfg.grader)
        self.grader = grader
        self._extract, self._equal = GRADERS.get(grader, (None, None))
        self._cache: dict[str, list[Problem]] = {}

    # ------------------------------------------------------------------ problems

    def user_message(self, problem: Problem) -> str:
        """The problem in the task's wording: what the model's user turn says."""
        return self.prompt.replace("{question}", problem.question)

    def problems(self, split: str) -> list[Problem]:
        if split not in ("train", "test"):
            raise ValueError(f"split: expected 'train' or 'test', got {split!r}")
        if split not in self._cache:
            self._cache[split] = self._load(split)
        return self._cache[split]

    def _load(self, split: str) -> list[Problem]:
        n = self.cfg.n_train if split == "train" else self.cfg.n_test
        if self.name == "world":
            from swiftjax.world.task import world_problems  # the world is one task among others

            return world_problems(split, n or 1000, self.cfg.seed)
        shared = self.cfg.train_path is None or self.cfg.train_path == self.cfg.test_path
        field = "task.test_path" if (split == "test" or shared) else "task.train_path"
        path = self.cfg.test_path if (split == "test" or shared) else self.cfg.train_path
        if not path:
            raise ValueError(f"{field}: expected the path of the task's jsonl file (task {self.name})")
        path = Path(path)
        rows = self._parse(path, field)
        if shared:
            n_test = self.cfg.n_test if self.cfg.n_test is not None else len(rows)
            if split == "test":
                out = rows[:n_test]
            else:
                rest = rows[n_test:]
                if not rest:
                    raise ValueError(f"task.n_train: {path} holds {len(rows)} problems, all taken by the test "
                                     f"split (n_test={n_test}); give task.train_path or a smaller task.n_test")
                out = rest[: n] if n is not None else rest
        else:
            out = rows[: n] if n is not None else rows
        if n is not None and len(out) < n:
            raise ValueError(f"task.n_{split}: expected {n} problems, {path} has only {len(out)} for the {split} split")
        return out

    def _parse(self, path: Path, field: str) -> list[Problem]:
        c = self.cfg
        qf, af, sf, idf = {"gsm8k": ("question", "answer", "answer", None),
                           "math500": ("problem", "answer", "solution", "unique_id")}.get(
            self.name, (c.question_field, c.answer_field, c.solution_field, c.id_field))
        out, seen = [], set()
        for lineno, row in _read_jsonl(path, field):
            where = f"{path}:{lineno}"
            for key in (qf, af) + ((sf,) if sf else ()):
                if not isinstance(row.get(key), (str, int, float)) or isinstance(row.get(key), bool):
                    raise ValueError(f"{where}: expected a field {key!r} (a string) for task {self.name}, "
                                     f"got {row.get(key)!r:.40}")
            gold = str(row[af])
            if self.name == "gsm8k":
                gold = gsm8k.extract_reference(gold)
                if gold is None:
                    raise ValueError(f"{where}: field 'answer': expected a GSM8K solution ending in '#### <number>'")
            pid = str(row[idf]) if idf and idf in row else f"{self.name}-{path.stem}-{lineno}"
            if pid in seen:
                raise ValueError(f"{where}: duplicate problem id {pid!r}")
            seen.add(pid)
            out.append(Problem(id=pid, question=str(row[qf]), gold=gold,
                               solution=str(row[sf]) if sf else None))
        if not out:
            raise ValueError(f"{path}: expected at least one problem, the file is empty")
        return out

    # ------------------------------------------------------------------ grading

    def grade(self, text: str, gold: str) -> tuple[str | None, bool]:
        """(the answer read from ``text`` or None, whether it is correct). Never raises."""
        if self.name == "world":
            ans = _world_answer(text)
            return (None if ans is None else str(ans)), ans is not None and ans == int(gold)
        try:
            ans = self._extract(text)
        except Exception:
            ans = None
        if self.grader == "math":
            return ans, bool(self._equal(text, gold))
        return ans, bool(ans is not None and self._equal(ans, gold))

    # ------------------------------------------------------------------ identity

    def describe(self) -> dict:
        """Everything the problems and grades depend on (for cache keys and results)."""
        d = dataclasses.asdict(self.cfg)
        d["prompt"] = self.prompt
        d["grader"] = self.grader
        d["grader_version"] = GRADER_VERSIONS[self.grader]
        for k in ("train_path", "test_path"):
            if d[k]:
                p = Path(d[k])
                d[k + "_sha256"] = file_sha256(p) if p.is_file() else None
        return d


def make_task(cfg: TaskConfig | dict | None = None) -> Task:
    if cfg is None:
        cfg = TaskConfig()
    if isinstance(cfg, dict):
        cfg = build(TaskConfig, cfg, "task")
    return Task(cfg)
