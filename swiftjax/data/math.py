"""MATH answers: extraction, normalisation and grading.

Stages (each tested on its own), as in the reference graders:

1. extraction: the content of the last ``\\boxed{...}`` (or ``\\fbox{...}``, or
   ``\\boxed 5``) with balanced braces (:func:`last_boxed`);
2. normalisation (:func:`normalize`, PRM800K/Hendrycks style): strip spaces, ``\\left``/
   ``\\right``, ``\\!`` and other spacing commands, ``$``, ``^\\circ``, ``\\%``, units in
   ``\\text{...}``; ``\\dfrac``/``\\tfrac`` -> ``\\frac``, ``\\frac12`` -> ``\\frac{1}{2}``,
   ``\\sqrt3`` -> ``\\sqrt{3}``, ``a/b`` -> ``\\frac{a}{b}``, thousands separators and
   trailing ``.0`` removed, ``x = 5`` -> ``5``, ``(A)`` -> ``A``;
3. comparison (:func:`is_equiv`): equal strings after normalisation; else equal numbers with
   relative tolerance 1e-4 (two plain integers compare exactly: a deviation from the
   reference, where 1e-4 makes 9999 equal 10000; decimals, ``\\frac{a}{b}``, mixed numbers such as
   ``1\\frac{1}{4}``; with a percent sign on either side, x vs x/100 too); else tuples
   element by element; else symbolic equality with sympy, **only if sympy is importable**
   (it is not a dependency of swiftjax) and under a timeout.

:func:`grade` never raises: anything malformed grades False.
"""
from __future__ import annotations

import functools
import math
import re
import signal
import threading

__all__ = [
    "last_boxed",
    "extract_answer",
    "normalize",
    "to_number",
    "answer_key",
    "is_equiv",
    "symbolic_equal",
    "grade",
]

REL_TOL = 1e-4
SYMPY_TIMEOUT_S = 3.0

# ----------------------------------------------------------------------------- braces


def _match_brace(s: str, open_idx: int) -> int | None:
    """Index of the '}' closing the '{' at ``open_idx`` (escaped \\{ \\} ignored), or None."""
    depth = 0
    i = open_idx
    while i < len(s):
        c = s[i]
        if c == "\\" and i + 1 < len(s) and s[i + 1] in "{}":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` (balanced braces) in ``text``.

    ``\\boxed 42`` (space form) gives the token up to the next space or ``$``. None when
    there is no box or its braces do not balance.
    """
    if not isinstance(text, str):
        return None
    idx = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if idx < 0:
        return None
    name = "\\boxed" if text.startswith("\\boxed", idx) else "\\fbox"
    j = idx + len(name)
    k = j
    while k < len(text) and text[k].isspace():
        k += 1
    if k > j and k < len(text) and text[k] != "{":  # "\boxed 5"
        m = re.match(r"[^\s$]+", text[k:])
        return m.group(0) if m else None
    j = k
    if j >= len(text) or text[j] != "{":
        return None
    end = _match_brace(text, j)
    if end is None:
        return None
    return text[j + 1 : end]


def extract_answer(text: str) -> str | None:
    """The final answer of a MATH solution: :func:`last_boxed` of it, or None."""
    return last_boxed(text)


# ----------------------------------------------------------------------------- normalisation

_TEXT_CMDS = ("\\text", "\\textbf", "\\textrm", "\\mbox", "\\mathrm", "\\mathbf")


def _text_groups(s: str) -> list[tuple[int, int, str]]:
    """(start, end, content) of each \\text{...}-like group, outermost only."""
    out = []
    i = 0
    while i < len(s):
        hit = None
        for cmd in sorted(_TEXT_CMDS, key=len, reverse=True):
            if s.startswith(cmd, i) and s.startswith("{", i + len(cmd)):
                hit = cmd
                break
        if hit is None:
            i += 1
            continue
        open_idx = i + len(hit)
        end = _match_brace(s, open_idx)
        if end is None:
            break
        out.append((i, end + 1, s[open_idx + 1 : end]))
        i = end + 1
    return out


def _handle_text(s: str) -> str:
    """Units such as ``100\\text{ cm}`` are dropped; a wrapper such as ``\\text{(A)}`` is unwrapped."""
    groups = _text_groups(s)
    if not groups:
        return s
    stripped, unwrapped, last = [], [], 0
    for a, b, content in groups:
        stripped.append(s[last:a])
        unwrapped.append(s[last:a] + content)
        last = b
    stripped.append(s[last:])
    unwrapped.append(s[last:])
    rest = "".join(stripped)
    if re.search(r"\d", rest):  # a number with unit words after it
        return rest
    return "".join(unwrapped)


def _fix_fracs(s: str) -> str:
    """\\frac12 -> \\frac{1}{2}, \\frac1{72} -> \\frac{1}{72}, \\frac{1}2 -> \\frac{1}{2}."""
    parts = s.split("\\frac")
    out = parts[0]
    for part in parts[1:]:
        out += "\\frac"
        args, rest = [], part
        for _ in range(2):
            if rest.startswith("{"):
                end = _match_brace(rest, 0)
                if end is None:
                    return s
                args.append(rest[: end + 1])
                rest = rest[end + 1 :]
            elif rest and (rest[0].isalnum()):
                args.append("{" + rest[0] + "}")
                rest = rest[1:]
            else:
                return s
        out += "".join(args) + rest
    return out


def _fix_sqrt(s: str) -> str:
    """\\sqrt3 -> \\sqrt{3}, \\sqrt x -> \\sqrt{x} (one character)."""
    return re.sub(r"\\sqrt\s*([A-Za-z0-9])", r"\\sqrt{\1}", s)


def _normalize_flag(ans) -> tuple[str, bool]:
    """(normalised string, whether a percent sign was removed)."""
    if ans is None:
        return "", False
    s = str(ans).strip()
    s = s.replace("\n", "").replace("\r", "")
    s = s.replace("\\!", "")
    s = re.sub(r"\\[,;:> ]", "", s)  # thin/medium/thick spaces
    s = s.replace("{,}", ",")
    s = re.sub(r"\\[dtc]frac", r"\\frac", s)
    s = re.sub(r"\\left(?![a-zA-Z])", "", s)
    s = re.sub(r"\\right(?![a-zA-Z])", "", s)
    s = s.replace("\\displaystyle", "")
    s = re.sub(r"\^\s*\{\s*\\circ\s*\}", "", s)
    s = re.sub(r"\^\s*\\circ", "", s)
    s = s.replace("\\circ", "").replace("\u00b0", "")
    s = s.replace("\\$", "").replace("$", "")
    s = _handle_text(s)
    pct = "%" in s
    s = s.replace("\\%", "").replace("%", "")
    # drop spaces, but keep one where it ends a command before a letter ("\pi r" != "\pir")
    s = re.sub(r"(\\[a-zA-Z]+)\s+(?=[a-zA-Z])", "\\1\x00", s)
    s = re.sub(r"\s+", "", s).replace("\x00", " ")
    # "x=5" / "k = -3" -> right-hand side when the left is a short variable name
    if s.count("=") == 1:
        lhs, rhs = s.split("=")
        if rhs and re.fullmatch(r"[A-Za-z]\w?|\\[a-zA-Z]+", lhs):
            s = rhs
    s = _fix_sqrt(s)
    s = _fix_fracs(s)
    s = re.sub(r"\^\{(\w)\}", r"^\1", s)  # x^{2} -> x^2
    m = re.fullmatch(r"(-?\d+)/(\d+)", s)
    if m:
        s = f"\\frac{{{m.group(1)}}}{{{m.group(2)}}}"
    s = re.sub(r"(^|[^\d])\.(\d)", r"\g<1>0.\2", s)  # .5 -> 0.5, -.5 -> -0.5, {.5 -> {0.5
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    if re.fullmatch(r"-?\d+\.\d*", s):  # trailing zeros / point of a decimal: 5.0 -> 5, 2.50 -> 2.5
        s = s.rstrip("0").rstrip(".")
        if s in ("", "-", "-0"):
            s = "0"
    elif len(s) > 1 and s.endswith("."):
        s = s[:-1]
    m = re.fullmatch(r"\(([A-Z])\)", s)
    if m:
        s = m.group(1)
    return s, pct


def normalize(ans) -> str:
    """Normalised form of a MATH answer string (see module docstring); '' for None/empty."""
    try:
        return _normalize_flag(ans)[0]
    except Exception:
        return ""


_FLOAT = r"-?\d+(?:\.\d+)?"


def to_number(s: str) -> float | None:
    """Value of a normalised answer when it is a plain number: '3', '-0.25', '\\frac{3}{4}',
    '-\\frac{1}{2}', '1\\frac{1}{4}' (mixed number); None otherwise."""
    if not isinstance(s, str) or not s:
        return None
    try:
        if re.fullmatch(_FLOAT, s):
            return float(s)
        m = re.fullmatch(r"(-?)\\frac\{(" + _FLOAT + r")\}\{(" + _FLOAT + r")\}", s)
        if m:
            num, den = float(m.group(2)), float(m.group(3))
            if den == 0:
                return None
            return (-1.0 if m.group(1) else 1.0) * num / den
        m = re.fullmatch(r"(-?)(\d+)\\frac\{(\d+)\}\{(\d+)\}", s)
        if m:
            whole, num, den = float(m.group(2)), float(m.group(3)), float(m.group(4))
            if den == 0:
                return None
            return (-1.0 if m.group(1) else 1.0) * (whole + num / den)
    except (ValueError, OverflowError):
        return None
    return None


def answer_key(ans) -> str | None:
    """A hashable key for majority vote: numbers by value (10 significant digits), others by
    their normalised string; None for a missing/empty answer."""
    s = normalize(ans)
    if not s:
        return None
    x = to_number(s)
    if x is not None and math.isfinite(x):
        return f"num:{x:.10g}"
    return s


# ----------------------------------------------------------------------------- sympy stage


@functools.cache
def _sympy():
    """The sympy module if importable, else None (sympy is optional)."""
    try:
        import sympy  # noqa: F401
        from sympy.parsing import sympy_parser  # noqa: F401

        return sympy
    except Exception:
        return None


_FUNCS = ("sqrt", "pi", "oo", "log", "sin", "cos", "tan", "exp")
_LATEX_WORDS = {
    "\\cdot": "*",
    "\\times": "*",
    "\\div": "/",
    "\\pi": "pi",
    "\\infty": "oo",
    "\\ln": "log",
    "\\log": "log",
    "\\sin": "sin",
    "\\cos": "cos",
    "\\tan": "tan",
    "\\exp": "exp",
}


def _replace_cmd_args(s: str, cmd: str, nargs: int, fmt) -> str | None:
    """Replace each ``cmd{a}{b}`` by fmt(a, b) (innermost first through recursion)."""
    while True:
        idx = s.find(cmd)
        if idx < 0:
            return s
        j = idx + len(cmd)
        opt = None
        if cmd == "\\sqrt" and s.startswith("[", j):
            k = s.find("]", j)
            if k < 0:
                return None
            opt = s[j + 1 : k]
            j = k + 1
        args = []
        for _ in range(nargs):
            if not s.startswith("{", j):
                return None
            end = _match_brace(s, j)
            if end is None:
                return None
            args.append(s[j + 1 : end])
            j = end + 1
        s = s[:idx] + fmt(*args, opt=opt) + s[j:]


def _latex_to_expr(s: str) -> str | None:
    """A normalised LaTeX answer as a restricted sympy expression string, or None when it uses
    anything outside the small supported grammar (so nothing unexpected reaches eval)."""
    if len(s) > 200:
        return None
    s = _replace_cmd_args(s, "\\frac", 2, lambda a, b, opt: f"(({a})/({b}))")
    if s is None:
        return None
    s = _replace_cmd_args(
        s,
        "\\sqrt",
        1,
        lambda a, opt: f"(({a})**(1/({opt})))" if opt else f"sqrt({a})",
    )
    if s is None:
        return None
    for k in sorted(_LATEX_WORDS, key=len, reverse=True):
        s = re.sub(re.escape(k) + r"(?![a-zA-Z])", _LATEX_WORDS[k], s)
    if "\\" in s:
        return None
    s = s.replace("{", "(").replace("}", ")").replace("^", "**")
    if not re.fullmatch(r"[0-9a-zA-Z+\-*/(). ]+", s):
        return None
    # size guard (numeric powers are checked on the parsed tree, see _too_big)
    if s.count("**") > 4 or re.search(r"\d{40,}", s):
        return None
    # identifiers: whitelisted function names or single-letter symbols
    def split_word(m: re.Match) -> str:
        word, toks, i = m.group(0), [], 0
        while i < len(word):
            for f in _FUNCS:
                if word.startswith(f, i):
                    toks.append(f)
                    i += len(f)
                    break
            else:
                toks.append(word[i])
                i += 1
        return "*".join(toks)

    return re.sub(r"[A-Za-z]+", split_word, s)


def _parse(expr: str, evaluate: bool = True):
    sp = _sympy()
    from sympy.parsing.sympy_parser import (
        convert_xor,
        implicit_multiplication_application,
        parse_expr,
        standard_transformations,
    )

    local = {c: sp.Symbol(c) for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"}
    local.update({"sqrt": sp.sqrt, "pi": sp.pi, "oo": sp.oo, "log": sp.log, "sin": sp.sin,
                  "cos": sp.cos, "tan": sp.tan, "exp": sp.exp})
    tr = standard_transformations + (implicit_multiplication_application, convert_xor)
    return parse_expr(expr, local_dict=local, transformations=tr, evaluate=evaluate)


def _too_big(expr) -> bool:
    """Whether an unevaluated expression holds a numeric power too large to evaluate
    (e.g. 10^{10^{10}}): big-integer arithmetic runs in C, where no timeout can stop it."""
    sp = _sympy()
    for node in sp.preorder_traversal(expr):
        if isinstance(node, sp.Pow) and node.base.is_number and node.exp.is_number:
            try:
                e = abs(complex(sp.N(node.exp, 15)))
                b = abs(complex(sp.N(node.base, 15)))
            except Exception:
                return True
            if not math.isfinite(e) or e * math.log10(b + 2.0) > 300:
                return True
    return False


def _symbolic_core(a: str, b: str) -> bool:
    sp = _sympy()
    ea, eb = _latex_to_expr(a), _latex_to_expr(b)
    if ea is None or eb is None:
        return False
    if _too_big(_parse(ea, evaluate=False)) or _too_big(_parse(eb, evaluate=False)):
        return False
    x, y = _parse(ea), _parse(eb)
    if sp.simplify(x - y) == 0:
        return True
    if not x.free_symbols and not y.free_symbols:
        vx, vy = complex(sp.N(x)), complex(sp.N(y))
        scale = max(abs(vx), abs(vy))
        return abs(vx - vy) <= REL_TOL * scale
    return False


class _Timeout(Exception):
    pass


def _run_with_timeout(fn, timeout: float | None):
    """Run ``fn()``; raise _Timeout after ``timeout`` seconds. Uses SIGALRM in the main thread
    (interrupts pure-Python work), else a daemon thread that is abandoned on timeout."""
    if timeout is None or timeout <= 0:
        return fn()
    main = threading.current_thread() is threading.main_thread()
    if main and hasattr(signal, "setitimer") and signal.getitimer(signal.ITIMER_REAL)[0] == 0:

        def on_alarm(signum, frame):
            raise _Timeout()

        old = signal.signal(signal.SIGALRM, on_alarm)
        try:
            signal.setitimer(signal.ITIMER_REAL, timeout)
            return fn()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - carried to the caller
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise _Timeout()
    if "error" in box:
        raise box["error"]
    return box.get("value")


def symbolic_equal(a: str, b: str, timeout: float | None = SYMPY_TIMEOUT_S) -> bool | None:
    """Symbolic equality of two normalised answers with sympy; None when sympy is not
    importable (the stage is skipped), False on parse failure or timeout."""
    if _sympy() is None:
        return None
    try:
        return bool(_run_with_timeout(lambda: _symbolic_core(a, b), timeout))
    except BaseException as e:  # noqa: BLE001 - sympy can raise nearly anything
        if isinstance(e, KeyboardInterrupt):
            raise
        return False


# ----------------------------------------------------------------------------- comparison


def _split_top(s: str) -> list[str]:
    """Split on commas outside brackets."""
    parts, depth, cur = [], 0, ""
    for c in s:
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        if c == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += c
    parts.append(cur)
    return parts


def _tuple_parts(s: str) -> tuple[str, list[str]] | None:
    """(outer brackets, elements) of '(a,b)', '[a,b)', 'a,b'; None when not a tuple."""
    brackets, inner = "", s
    if s[:1] in "([{" and s[-1:] in ")]}":
        brackets, inner = s[0] + s[-1], s[1:-1]
    parts = _split_top(inner)
    return (brackets, parts) if len(parts) > 1 else None


def _num_equal(x: float, y: float, pct: bool) -> bool:
    if math.isclose(x, y, rel_tol=REL_TOL):
        return True
    return pct and (math.isclose(x, y / 100, rel_tol=REL_TOL) or math.isclose(x / 100, y, rel_tol=REL_TOL))


def _equiv(na: str, pa: bool, nb: str, pb: bool, timeout, depth: int = 0) -> bool:
    if not na or not nb:
        return False
    if na == nb:
        return True
    x, y = to_number(na), to_number(nb)
    if x is not None and y is not None:
        if re.fullmatch(r"-?\d+", na) and re.fullmatch(r"-?\d+", nb) and not (pa or pb):
            return int(na) == int(nb)  # two integers: exact (1e-4 would make 9999 == 10000)
        return _num_equal(x, y, pa or pb)
    # tuples / intervals / lists: same outer brackets (or none), same length, element-wise
    if depth == 0:
        ta, tb = _tuple_parts(na), _tuple_parts(nb)
        if ta is not None or tb is not None:
            if ta is None or tb is None or ta[0] != tb[0] or len(ta[1]) != len(tb[1]):
                return False
            return all(_equiv(u, pa, v, pb, timeout, depth + 1) for u, v in zip(ta[1], tb[1]))
    return bool(symbolic_equal(na, nb, timeout))


def is_equiv(a, b, timeout: float | None = SYMPY_TIMEOUT_S) -> bool:
    """Whether two final answers (not whole solutions) are equal: string after
    :func:`normalize`, then numerically (rel. tol 1e-4), then element-wise for tuples, then
    symbolically when sympy is importable. Never raises."""
    try:
        na, pa = _normalize_flag(a)
        nb, pb = _normalize_flag(b)
        return _equiv(na, pa, nb, pb, timeout)
    except Exception:
        return False


def _answer_of(x) -> str | None:
    if x is None:
        return None
    x = str(x)
    if "\\boxed" in x or "\\fbox" in x:
        return last_boxed(x)
    return x


def grade(pred, gold, timeout: float | None = SYMPY_TIMEOUT_S) -> bool:
    """True when ``pred`` is a correct answer to a problem whose reference is ``gold``.

    Args:
      pred: a model solution (its last \\boxed{} is taken) or a bare answer.
      gold: a reference solution (last \\boxed{}) or a bare reference answer.
    Never raises: a missing box, unbalanced braces or any parse error grade False.
    """
    try:
        a, b = _answer_of(pred), _answer_of(gold)
        if a is None or b is None:
            return False
        return is_equiv(a, b, timeout)
    except Exception:
        return False
