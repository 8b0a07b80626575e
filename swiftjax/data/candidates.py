"""Candidate sets: the jsonl format shared by generation, scoring and Best-of-N.

One JSON object per line, one line per candidate::

    {"prompt_id": str, "index": int (0-based, generation order), "prompt": str,
     "text": str, "token_ids": list[int] | null, "answer": str | null, "correct": bool,
     "scores": {name: float}   # optional
     "gold": str               # optional: the reference answer, for re-grading}

:func:`group` turns rows into [P, N] arrays in generation order for :mod:`swiftjax.bon`.
Converters build candidate sets from the two real pools under ``../shared/data``.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np

from swiftjax import bon
from swiftjax._io import atomic_file
from swiftjax.data import gsm8k
from swiftjax.data import math as math_grader

__all__ = [
    "REQUIRED",
    "validate_row",
    "write_candidates",
    "read_candidates",
    "cached_candidates",
    "key_path",
    "group",
    "from_gsm8k_model_solutions",
    "GSM8K_SOLUTION_KEYS",
    "from_math_bon",
    "report_math_bon",
]

REQUIRED = ("prompt_id", "index", "prompt", "text", "token_ids", "answer", "correct")
OPTIONAL = ("scores", "gold", "token_confidence")
GSM8K_SOLUTION_KEYS = ("6b_finetuning", "6b_verification", "175b_finetuning", "175b_verification")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def validate_row(row, where: str = "row") -> dict:
    """Check one candidate row; returns it unchanged or raises ValueError naming ``where``
    (e.g. 'file.jsonl:12') and the field."""
    if not isinstance(row, Mapping):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for key in REQUIRED:
        if key not in row:
            raise ValueError(f"{where}: missing field {key!r} (required: {', '.join(REQUIRED)})")
    extra = set(row) - set(REQUIRED) - set(OPTIONAL)
    if extra:
        raise ValueError(f"{where}: unexpected field(s) {sorted(extra)}; allowed optional: {list(OPTIONAL)}")
    checks = {
        "prompt_id": (lambda v: isinstance(v, str), "a string"),
        "index": (lambda v: _is_int(v) and v >= 0, "a non-negative int"),
        "prompt": (lambda v: isinstance(v, str), "a string"),
        "text": (lambda v: isinstance(v, str), "a string"),
        "token_ids": (lambda v: v is None or (isinstance(v, list) and all(_is_int(t) for t in v)),
                      "a list of ints or null"),
        "answer": (lambda v: v is None or isinstance(v, str), "a string or null"),
        "correct": (lambda v: isinstance(v, bool), "a bool"),
    }
    for key, (ok, what) in checks.items():
        if not ok(row[key]):
            raise ValueError(f"{where}: field {key!r}: expected {what}, got {row[key]!r:.60}")
    if "scores" in row:
        sc = row["scores"]
        if not isinstance(sc, Mapping):
            raise ValueError(f"{where}: field 'scores': expected an object {{name: float}}, got {type(sc).__name__}")
        for name, v in sc.items():
            if not isinstance(name, str) or not _is_num(v) or not math.isfinite(v):
                raise ValueError(f"{where}: field 'scores': expected finite numbers by name, got {name!r}: {v!r}")
    if "token_confidence" in row:
        tc, ids = row["token_confidence"], row["token_ids"]
        if not (isinstance(tc, list) and all(_is_num(v) and math.isfinite(v) for v in tc)):
            raise ValueError(f"{where}: field 'token_confidence': expected a list of finite numbers, got {tc!r:.60}")
        if ids is not None and len(tc) != len(ids):
            raise ValueError(f"{where}: field 'token_confidence': expected one number per token ({len(ids)}), "
                             f"got {len(tc)}")
    if "gold" in row and not isinstance(row["gold"], str):
        raise ValueError(f"{where}: field 'gold': expected a string, got {row['gold']!r:.60}")
    return row


def write_candidates(path, rows: Iterable[Mapping]) -> int:
    """Write rows as jsonl atomically: a temp file in the same folder, then ``os.replace``.

    Each row is validated first; on any error (bad row, failing iterator, full disk) the temp
    file is removed and an existing file at ``path`` is left as it was. Returns the number
    of rows written.
    """
    n = 0
    with atomic_file(path, "w", encoding="utf-8") as f:
        for row in rows:
            validate_row(row, f"row {n}")
            f.write(json.dumps(dict(row), ensure_ascii=False, allow_nan=False) + "\n")
            n += 1
    return n


def key_path(path) -> Path:
    """Where :func:`cached_candidates` keeps the key of the candidate file ``path``."""
    path = Path(path)
    return path.with_name(path.name + ".key.json")


def cached_candidates(path, key: Mapping, make_rows: Callable[[], Iterable[Mapping]]) -> list[dict]:
    """Candidate rows cached at ``path`` and reused while ``key`` is unchanged.

    ``key`` names everything that determines the rows (problems, sampling settings, batch layout,
    the model's sha256); it is stored beside the file (:func:`key_path`) *after* the rows, both
    atomically, so a missing or different key means "sample again" and a run killed in between
    resamples instead of reading stale rows. ``make_rows()`` is called only on a miss.
    """
    path = Path(path)
    kp = key_path(path)
    want = json.dumps(key, sort_keys=True, default=str, indent=1) + "\n"
    if path.is_file() and kp.is_file() and kp.read_text(encoding="utf-8") == want:
        return read_candidates(path)
    kp.unlink(missing_ok=True)
    rows = [dict(r) for r in make_rows()]
    write_candidates(path, rows)
    with atomic_file(kp, "w", encoding="utf-8") as f:
        f.write(want)
    return rows


def _decode_line(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: expected UTF-8 text, got byte 0x{raw[e.start]:02x} at column {e.start + 1} "
                         f"({e.reason})") from None


def read_candidates(path) -> list[dict]:
    """Read and validate a candidate jsonl file (blank lines skipped). Raises ValueError
    naming the file, the 1-based line number and the offending field."""
    path = Path(path)
    rows = []
    with path.open("rb") as f:  # decoded line by line, so a bad byte is named by its line
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            line = _decode_line(raw, where)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: expected a JSON object, got invalid JSON ({e.msg})") from None
            rows.append(validate_row(row, where))
    return rows


def group(rows: Iterable[Mapping]) -> tuple[list[str], dict]:
    """Rows -> (prompt_ids [P], arrays) in generation order.

    Prompts keep the order of their first row; candidates are ordered by ``index``, which
    must run 0..N-1 without gaps or repeats, with the same N for every prompt.

    Returns:
      prompt_ids: list of P ids.
      arrays: {"correct": bool [P, N], "answers": P lists of N (str | None),
               "texts": P lists of N str, "scores": {name: float64 [P, N]}}; a score
               name must be present on every row or on none.
    """
    by_prompt: dict[str, dict[int, Mapping]] = {}
    for i, row in enumerate(rows):
        validate_row(row, f"row {i}")
        cands = by_prompt.setdefault(row["prompt_id"], {})
        if row["index"] in cands:
            raise ValueError(f"row {i}: prompt {row['prompt_id']!r} has index {row['index']} twice")
        cands[row["index"]] = row
    if not by_prompt:
        raise ValueError("rows: expected at least one candidate, got none")
    ids = list(by_prompt)
    n = len(by_prompt[ids[0]])
    for pid in ids:
        cands = by_prompt[pid]
        if len(cands) != n:
            raise ValueError(
                f"prompt {pid!r}: expected N={n} candidates (as prompt {ids[0]!r}), got {len(cands)}"
            )
        missing = sorted(set(range(n)) - set(cands))
        if missing:
            raise ValueError(f"prompt {pid!r}: expected indices 0..{n - 1}, missing {missing[:5]} (gap)")
    ordered = [[by_prompt[pid][j] for j in range(n)] for pid in ids]
    names: list[str] = []
    for row in (r for grp in ordered for r in grp):
        for name in row.get("scores", {}):
            if name not in names:
                names.append(name)
    scores = {}
    for name in names:
        arr = np.empty((len(ids), n), dtype=np.float64)
        for p, grp in enumerate(ordered):
            for j, row in enumerate(grp):
                sc = row.get("scores", {})
                if name not in sc:
                    raise ValueError(
                        f"prompt {ids[p]!r} index {j}: score {name!r} missing (present on other rows)"
                    )
                arr[p, j] = sc[name]
        scores[name] = arr
    arrays = {
        "correct": np.array([[r["correct"] for r in grp] for grp in ordered], dtype=bool),
        "answers": [[r["answer"] for r in grp] for grp in ordered],
        "texts": [[r["text"] for r in grp] for grp in ordered],
        "scores": scores,
    }
    return ids, arrays


def _read_jsonl(path) -> Iterable[tuple[int, dict]]:
    path = Path(path)
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield lineno, json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None


def from_gsm8k_model_solutions(path) -> list[dict]:
    """Candidate rows from OpenAI's GSM8K ``example_model_solutions.jsonl``.

    Four candidates per question in the fixed order :data:`GSM8K_SOLUTION_KEYS`;
    ``correct`` is the file's ``is_correct``; ``answer`` is our extraction
    (:func:`swiftjax.data.gsm8k.extract_answer`, canonicalised) or None; ``gold`` the number
    after 'A: ' in ``ground_truth``; ``prompt_id`` 'gsm8k-test-<line index>'.
    """
    rows = []
    for q, (lineno, rec) in enumerate(_read_jsonl(path)):
        for key in ("question", "ground_truth", *GSM8K_SOLUTION_KEYS):
            if key not in rec:
                raise ValueError(f"{path}:{lineno}: missing field {key!r}")
        gold = gsm8k.canonical(gsm8k.extract_answer(rec["ground_truth"]))
        for j, key in enumerate(GSM8K_SOLUTION_KEYS):
            sol = rec[key]
            if not isinstance(sol, Mapping) or not isinstance(sol.get("solution"), str) \
                    or not isinstance(sol.get("is_correct"), bool):
                raise ValueError(f"{path}:{lineno}: field {key!r}: expected {{is_correct: bool, solution: str}}")
            ans = gsm8k.extract_answer(sol["solution"])
            row = {
                "prompt_id": f"gsm8k-test-{q}",
                "index": j,
                "prompt": rec["question"],
                "text": sol["solution"],
                "token_ids": None,
                "answer": gsm8k.canonical(ans) if gsm8k.canonical(ans) is not None else ans,
                "correct": sol["is_correct"],
            }
            if gold is not None:
                row["gold"] = gold
            rows.append(row)
    return rows


def from_math_bon(path, score_name: str = "qwen72b_rm") -> list[dict]:
    """Candidate rows from Qwen2.5-Math's ``math_cot_100.jsonl`` (Best-of-8 with RM scores).

    N candidates per problem from ``response``; ``answer`` = ``pred``; ``correct`` = ``score``;
    ``scores`` = {score_name: ``pred_score``}; ``gold`` = ``gt``; ``prompt_id`` = str(``idx``).
    """
    rows = []
    for lineno, rec in _read_jsonl(path):
        for key in ("idx", "question", "gt", "response", "pred", "score", "pred_score"):
            if key not in rec:
                raise ValueError(f"{path}:{lineno}: missing field {key!r}")
        n = len(rec["response"])
        for key in ("pred", "score", "pred_score"):
            if len(rec[key]) != n:
                raise ValueError(f"{path}:{lineno}: field {key!r}: expected {n} entries, got {len(rec[key])}")
        for j in range(n):
            s = rec["pred_score"][j]
            s = s[0] if isinstance(s, list) and len(s) == 1 else s
            if not _is_num(s):
                raise ValueError(f"{path}:{lineno}: pred_score[{j}]: expected a number or [number], got {s!r}")
            rows.append({
                "prompt_id": str(rec["idx"]),
                "index": j,
                "prompt": rec["question"],
                "text": rec["response"][j],
                "token_ids": None,
                "answer": rec["pred"][j] if rec["pred"][j] not in (None, "") else None,
                "correct": bool(rec["score"][j]),
                "scores": {score_name: float(s)},
                "gold": str(rec["gt"]),
            })
    return rows


def report_math_bon(path, ks=None) -> dict:
    """Best-of-N report for the MATH Best-of-8 set with the Qwen2.5-Math-RM-72B scores.

    Curves (accuracy %, keys "1".."8"): random, oracle, majority (over
    :func:`swiftjax.data.math.answer_key` of ``pred``), pass@k, ``qwen72b_rm`` (BoN with the
    RM), ``neg_length`` (BoN with minus the response length in characters, a weak second
    score) and their ``ranking`` / ``scaling`` combinations. Also: the agreement of our MATH
    grader (``pred`` vs ``gold``) with the file's ``score`` labels.
    """
    rows = from_math_bon(path)
    ids, arr = group(rows)
    correct = arr["correct"]
    p, n = correct.shape
    ks = list(range(1, n + 1)) if ks is None else ks
    rm = arr["scores"]["qwen72b_rm"]
    neg_len = -np.array([[len(t) for t in grp] for grp in arr["texts"]], dtype=np.float64)
    keys = [[math_grader.answer_key(a) for a in grp] for grp in arr["answers"]]
    table = bon.bon_table(
        correct,
        scores={"qwen72b_rm": rm, "neg_length": neg_len},
        answers=keys,
        ks=ks,
        combos={
            "qwen72b_rm+neg_length/ranking": ("qwen72b_rm", "neg_length", "ranking"),
            "qwen72b_rm+neg_length/scaling": ("qwen72b_rm", "neg_length", "scaling"),
        },
    )
    table["pass@k"] = {str(k): v for k, v in bon.pass_at_k(correct, ks).items()}
    golds = [r["gold"] for r in rows]
    graded = [math_grader.grade(r["answer"], g) for r, g in zip(rows, golds)]
    agree = float(np.mean(np.array(graded) == np.array([r["correct"] for r in rows])))
    return {"prompts": p, "n": n, "curves": table, "grader_agreement": agree}
