"""GSM8K: loading, final-answer extraction and numeric grading.

Reference solutions end with ``#### <number>`` (commas as thousands separators). Model
solutions in OpenAI's ``example_model_solutions.jsonl`` put their final answer after
``A: ``. Extraction from model text tries, in order: the last ``\\boxed{...}`` (chat models
asked for it), the last ``A: `` line, the last ``#### `` line, then the last number anywhere in
the text. Grading compares numbers, so
``18``, ``18.0``, ``$18.`` and ``1,8`` ... er, ``1,800`` vs ``1800`` compare by value.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

from swiftjax.data.math import last_boxed

__all__ = [
    "load_gsm8k",
    "extract_reference",
    "extract_answer",
    "parse_number",
    "canonical",
    "grade",
]

# A number: optional sign, digits with optional thousands commas, optional decimals,
# or a bare decimal such as ".5"; optionally a simple fraction a/b.
_NUM = r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+"
_NUM_RE = re.compile(rf"(?<![\w.])(?:{_NUM})(?:\s*/\s*(?:\d+(?:\.\d+)?))?")
_LAST_NUM_RE = re.compile(rf"(?:{_NUM})")


def load_gsm8k(path) -> list[dict]:
    """Read a GSM8K jsonl file: rows {'question', 'answer'} -> list of
    {'question': str, 'answer': str (worked solution), 'final': str | None (the number after
    '#### ', commas removed)}. Raises ValueError naming the line of a malformed row."""
    path = Path(path)
    out = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got invalid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            for key in ("question", "answer"):
                if not isinstance(row.get(key), str):
                    raise ValueError(f"{path}:{lineno}: expected a string field {key!r}, got {row.get(key)!r:.40}")
            out.append(
                {"question": row["question"], "answer": row["answer"], "final": extract_reference(row["answer"])}
            )
    return out


def extract_reference(solution: str) -> str | None:
    """The final answer of a reference solution: the text after the last '#### ', with commas
    (and surrounding spaces) removed; None when there is no '####'."""
    if not isinstance(solution, str) or "####" not in solution:
        return None
    tail = solution.rsplit("####", 1)[1].strip()
    tail = tail.splitlines()[0].strip() if tail else ""
    tail = tail.replace(",", "")
    return tail or None


def _segment_after(text: str, marker: str) -> str | None:
    idx = text.rfind(marker)
    if idx < 0:
        return None
    seg = text[idx + len(marker):].strip()
    seg = seg.splitlines()[0].strip() if seg else ""
    return seg or None


def _first_number(segment: str) -> str | None:
    m = _NUM_RE.search(segment.replace("$", " ").replace("\u2212", "-"))
    return m.group(0) if m else None


def extract_answer(text: str) -> str | None:
    """The final numeric answer of a model solution as a string (commas kept), or None.

    Order: the first number inside the last ``\\boxed{...}``; else after the last 'A: '; else
    after the last '####'; else the last number in the text. A marker followed by no number
    gives None (the solution committed to a non-numeric answer) rather than a number from the
    working.
    """
    if not isinstance(text, str):
        return None
    if "\\boxed" in text or "\\fbox" in text:
        boxed = last_boxed(text)
        return _first_number(boxed.replace("\\,", "").replace("{,}", ",")) if boxed else None
    for marker in ("A:", "####"):
        if marker in text:
            seg = _segment_after(text, marker)
            return _first_number(seg) if seg else None
    nums = _LAST_NUM_RE.findall(text.replace("\u2212", "-"))
    return nums[-1] if nums else None


def parse_number(s) -> float | None:
    """A number from a short answer string: '1,800' -> 1800.0, '$18.' -> 18.0, '-3.5' -> -3.5,
    '3/4' -> 0.75, '50%' -> 50.0. None when nothing parses (never raises)."""
    if isinstance(s, (int, float)) and not isinstance(s, bool):
        return float(s) if math.isfinite(float(s)) else None
    if not isinstance(s, str):
        return None
    t = s.strip().replace("$", "").replace("%", "").replace("\u2212", "-").strip().rstrip(".").strip()
    m = _NUM_RE.fullmatch(t)
    if not m:
        return None
    try:
        if "/" in t:
            a, b = (x.strip().replace(",", "") for x in t.split("/"))
            den = float(b)
            return float(a) / den if den != 0 else None
        return float(t.replace(",", ""))
    except (ValueError, OverflowError):
        return None


def canonical(s) -> str | None:
    """A canonical string for an answer (for majority vote): '1,800' / '1800.0' -> '1800';
    non-numeric -> None."""
    x = parse_number(s)
    if x is None:
        return None
    if x == int(x) and abs(x) < 1e15:
        return str(int(x))
    return repr(round(x, 9))


def _gold_number(gold) -> float | None:
    if isinstance(gold, str) and "####" in gold:
        return parse_number(extract_reference(gold))
    x = parse_number(gold)
    if x is not None:
        return x
    return parse_number(extract_answer(gold)) if isinstance(gold, str) else None


def grade(pred, gold) -> bool:
    """True when the model's final answer equals the reference numerically.

    Args:
      pred: a model solution (text; extracted with :func:`extract_answer`) or a bare answer.
      gold: a reference solution with '#### ', or a bare number / numeric string.
    Numbers compare with a relative tolerance of 1e-6. Anything malformed gives False; never raises.
    """
    try:
        x = parse_number(pred)
        if x is None:
            x = parse_number(extract_answer(pred))
        y = _gold_number(gold)
        if x is None or y is None:
            return False
        return math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-9)
    except Exception:  # grading must never take a run down
        return False
