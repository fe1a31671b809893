"""The official eval script's boxed fallback, re-implemented from reading it (Su-my/TRAPO @982cb8f,
eval_scripts/oat_math_grader.py ``boxed_reward_fn(response, gold, fast=False)``, from the OAT project).

The fallback reads the content of the last ``\\boxed{...}`` of the WHOLE text (no tail cut) and accepts it
when ANY of three checks passes:

    mathd   the MATH-dataset normalisation (\\text{} unwrapped, fracs/sqrt fixed, unit words removed,
            "k = " dropped...) gives equal strings                                     (:37-350, :974-981)
    sympy   the Hendrycks normalisation, then per tuple element a sympy difference that simplifies to 0
            (integers and unreduced fractions must match exactly)                 (:654-870, :934-971)
    verify  math-verify on the boxed content against the gold, each wrapped in $...$, no fallback
            (its extraction_mode=["first_match"] acts as "any_match")              (:601-651)

Quirks kept on purpose, because they decide official scores: ``\\fbox`` is searched only when the text
has no ``\\boxed``, and then the content is never read (the "\\boxed{" strip fails): a lone \\fbox scores 0;
a gold holding ``\\boxed`` is reduced to its box first. Differences: the unit words are our own list of
measurement words, not the official ~300 MathQA-derived ones (its data, not copied: there lone letters are unit
words too, so "(c)" equals "(a)" under mathd, which ours does not reproduce); the official 1-second alarms inside the verify check are left to the caller's
per-item timeout (SIGALRM is the pool worker's), and the sympy normalisation needs pylatexenc for LaTeX
(without it a LaTeX answer stays as written, as when the official latex_to_text raises).
"""

from __future__ import annotations

import functools
import logging
import re
from itertools import zip_longest

_log = logging.getLogger(__name__)

# Unit words the MATH normalisation strips, each also with an "s". Our own list of measurement words: the
# official grader strips a longer MathQA-derived list (which also holds lone letters, so that there "(c)"
# equals "(a)"); that list is the official grader's data and is not copied here, so an answer whose unit only
# that list names can grade differently (docs/official.md).
_UNIT_WORDS = ("degree", "deg", "mph", "kmph", "km", "cm", "mm", "ft", "foot", "feet", "inch", "yard", "mile",
               "meter", "metre", "centimeter", "kilometer", "kg", "gm", "gram", "lb", "pound", "ounce", "liter",
               "litre", "second", "minute", "hour", "day", "week", "month", "year", "dollar", "cent", "unit",
               "sq m", "sq ft", "sq units", "square units", "square feet", "square meter")
_UNITS = _UNIT_WORDS + tuple(u + "s" for u in _UNIT_WORDS)
_HENDRYCKS_UNITS = ("degree", "cm", "centimeter", "meter", "mile", "second", "minute", "hour", "day", "week",
                    "month", "year", "foot", "feet", "inch", "yard")
_TEXT_WRAPPED = re.compile(r"^\\text\{(?P<text>.+?)\}$")
_TUPLE_CHARS = "()[]"


# ----------------------------------------------------------------------------------------- the box


def boxed_content(text: str) -> str | None:
    """The official extract_answer: the content of the last \\boxed{...} (braces counted from the command
    on), or None (no \\boxed, unbalanced braces, or a box whose span does not start with "\\boxed{")."""
    if "\\boxed" not in text:
        return None  # the \fbox search behind this guard never runs
    start = text.rfind("\\boxed")
    depth = 0
    for j in range(start, len(text)):
        if text[j] == "{":
            depth += 1
        if text[j] == "}":
            depth -= 1
            if depth == 0:
                span = text[start:j + 1]
                return span[len("\\boxed{"):-1] if span.startswith("\\boxed{") else None
    return None


# ------------------------------------------------------------------------------------------- mathd


def _fix_fracs(s: str) -> str:
    """\\frac12 -> \\frac{1}{2}, \\frac1{2} -> \\frac{1}{2}; a one-character tail leaves the string as is."""
    head, *rest = s.split("\\frac")
    out = head
    for part in rest:
        out += "\\frac"
        if part[0] == "{":  # an empty tail raises, as the official code does
            out += part
        elif len(part) < 2:
            return s
        elif part[1] != "{":
            out += "{" + part[0] + "}{" + part[1] + "}" + part[2:]
        else:
            out += "{" + part[0] + "}" + part[1] + part[2:]
    return out


def _fix_a_slash_b(s: str) -> str:
    parts = s.split("/")
    if len(parts) != 2:
        return s
    try:
        a, b = int(parts[0]), int(parts[1])
    except ValueError:
        return s
    return "\\frac{" + str(a) + "}{" + str(b) + "}" if s == f"{a}/{b}" else s


def _fix_sqrt(s: str) -> str:
    if "\\sqrt" not in s:
        return s
    head, *rest = s.split("\\sqrt")
    return head + "".join("\\sqrt" + p if p[0] == "{" else "\\sqrt{" + p[0] + "}" + p[1:] for p in rest)


def _strip_mathd(s: str) -> str:
    """The MATH normalisation, step for step (any exception: the caller keeps the unstripped answer)."""
    s = s.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    s = re.sub(r"\\begin\{array\}\{.*?\}", r"\\begin{pmatrix}", s)
    s = re.sub(r"\\end\{array\}", r"\\end{pmatrix}", s)
    s = s.replace("bmatrix", "pmatrix").replace("tfrac", "frac").replace("dfrac", "frac")
    s = s.replace("\\neq", "\\ne").replace("\\leq", "\\le").replace("\\geq", "\\ge")
    s = s.replace("\\left", "").replace("\\right", "")
    no_text = re.sub(r"\\text\{.*?\}$", "", s).strip()
    if no_text not in ("", s):
        s = no_text
    for _ in range(2):
        for unit in _UNITS:  # the unit words are regex patterns as written ("q ." has a wildcard)
            cut = re.sub(r"(^|\W)" + unit + r"($|\W)", r"\1\2", s)
            if cut != "":
                s = cut
    s = s.replace("^{\\circ}", "").replace("^\\circ", "").replace("\\$", "")
    if "\\text{ " in s:
        parts = s.split("\\text{ ")
        if len(parts) != 2:
            raise ValueError("more than one '\\text{ '")
        s = parts[0]
    s = s.replace("\\%", "").replace(" .", " 0.").replace("{.", "{0.")
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    sides = s.split("=")
    if len(sides) == 2 and len(sides[0]) <= 2:
        s = sides[1]
    s = _fix_fracs(_fix_sqrt(s).replace(" ", ""))
    if s == "0.5":
        s = "\\frac{1}{2}"
    return _fix_a_slash_b(s)


def mathd_normalize(answer: str) -> str:
    answer = answer.strip()
    m = _TEXT_WRAPPED.search(answer)
    if m is not None:
        answer = m.group("text").strip()
    try:
        return _strip_mathd(answer)
    except Exception:  # noqa: BLE001 - the official normaliser gives up the same way
        return answer


def mathd_equal(given: str, gold: str) -> bool:
    return mathd_normalize(gold) == mathd_normalize(given)


# ------------------------------------------------------------------------------------------- sympy


def _is_float(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _is_int(x: float) -> bool:
    try:
        return abs(x - round(x)) <= 1e-7
    except (OverflowError, ValueError):
        return False


def _strip_thousands_commas(s: str) -> str:
    pattern = re.compile(r"(\d)(,)(\d\d\d)($|\D)")
    while (nxt := pattern.sub(r"\1\3\4", s)) != s:
        s = nxt
    return s


def _str_is_int(s: str) -> bool:
    try:
        return _is_int(float(_strip_thousands_commas(s)))
    except ValueError:
        return False


def _latex_to_text(expr: str) -> str:
    from pylatexenc import latex2text  # the official sympy path's LaTeX reader

    expr = expr.replace("\\tfrac", "\\frac").replace("\\dfrac", "\\frac").replace("\\frac", " \\frac")
    expr = latex2text.LatexNodes2Text().latex_to_text(expr)
    for symbol, name in (("√", "sqrt"), ("π", "pi"), ("∞", "inf"), ("∪", "U"), ("·", "*"), ("×", "*")):
        expr = expr.replace(symbol, name)
    return expr.strip()


@functools.cache
def _warn_no_pylatexenc() -> None:
    _log.warning("pylatexenc is not installed: the official sympy check reads LaTeX answers as written")


def hendrycks_normalize(expr: str) -> str:
    m = _TEXT_WRAPPED.search(expr)
    if m is not None:
        expr = m.group("text")
    expr = expr.replace("\\%", "%").replace("\\$", "$").replace("$", "").replace("%", "")
    expr = expr.replace(" or ", " , ").replace(" and ", " , ")
    expr = expr.replace("million", "*10^6").replace("billion", "*10^9").replace("trillion", "*10^12")
    for unit in _HENDRYCKS_UNITS:
        expr = re.sub(unit + r"(es)?(s)? *(\^[0-9]+)?", "", expr)
    expr = re.sub(r"\^ *\\circ", "", expr)
    if expr and expr[0] == "{" and expr[-1] == "}":
        expr = expr[1:-1]
    expr = re.sub(r",\\! *", "", expr)
    if _is_float(expr) and _is_int(float(expr)):
        expr = str(round(float(expr)))
    if "\\" in expr:
        try:
            expr = _latex_to_text(expr)
        except ImportError:
            _warn_no_pylatexenc()
        except Exception:  # noqa: BLE001, S110 - the official normaliser keeps the text on any failure
            pass
    expr = re.sub("- *", "-", expr)
    expr = re.sub("([0-9]) +([0-9])", r"\1+\2", expr)  # a mixed number 7 3/4 -> 7+3/4
    expr = expr.replace(" ", "").replace("{", "").replace("}", "").lower()
    if _str_is_int(expr):
        expr = str(int(float(expr.replace(",", ""))))
    return expr


def _sympy_allowed(expr: str) -> bool:
    """Not text and not a function of more than two unknowns; no powers that could hang sympy."""
    letters = {c for c in expr.replace("sqrt", "").replace("frac", "") if c.isalpha()}
    if len(letters) > 2 or "^{" in expr or "^(" in expr:
        return False
    return re.search(r"\^[0-9]+\^", expr) is None and re.search(r"\^[0-9][0-9]+", expr) is None


def _sympy_difference_is_zero(gold: str, given: str) -> bool:
    from sympy import simplify
    from sympy.parsing import sympy_parser

    expr = f"({gold})-({given})"
    if not _sympy_allowed(expr):
        return False
    transformations = sympy_parser.standard_transformations + (sympy_parser.implicit_multiplication_application,)
    try:
        return simplify(sympy_parser.parse_expr(expr.replace("^", "**"), transformations=transformations)) == 0
    except Exception:  # noqa: BLE001 - unparsable: not equal
        return False


def _tuple_elements(expr: str) -> list[str]:
    expr = _strip_thousands_commas(expr)
    if not expr:
        return []
    inner = expr[1:-1]
    if (len(expr) > 2 and expr[0] in _TUPLE_CHARS and expr[-1] in _TUPLE_CHARS
            and not any(c in inner for c in _TUPLE_CHARS)):
        return [e.strip() for e in inner.split(",")]
    return [expr]


def _is_frac(s: str) -> bool:
    return re.search(r"^-?[0-9]+.?/0*[1-9][0-9]*.?$", s) is not None


def sympy_equal(given: str, gold: str) -> bool:
    g, a = hendrycks_normalize(gold), hendrycks_normalize(given)
    if g == a:
        return True
    if not a:
        return False
    gold_elems, given_elems = _tuple_elements(g), _tuple_elements(a)
    if len(gold_elems) > 1 and (g[0] != a[0] or g[-1] != a[-1]):
        return False  # an interval's brackets must match
    if len(gold_elems) != len(given_elems):
        return False
    for x, y in zip(gold_elems, given_elems, strict=True):
        if _is_frac(x) and _is_frac(y):
            ok = x == y  # an unreduced fraction is not the reduced one
        elif _str_is_int(x) != _str_is_int(y):
            ok = False  # an integer gold needs an integer answer
        else:
            ok = _sympy_difference_is_zero(x, y)
        if not ok:
            return False
    return True


# ------------------------------------------------------------------------------------------ verify


def _repetitive(s: str) -> bool:
    """The official guard: the adjacent-suffix common-prefix total over n(n+1)/2 above 0.2, with the
    suffix order of its prefix doubling (which stops once the doubled length reaches n - 1)."""
    codes = [ord(c) for c in s]
    n = len(codes)
    if n <= 1:
        return False

    def dense_ranks(keys: list) -> list[int]:
        index = {v: i for i, v in enumerate(sorted(set(keys)))}
        return [index[v] for v in keys]

    rank, k = dense_ranks(codes), 1
    while k < n - 1:
        rank = dense_ranks(list(zip_longest(rank, rank[k:], fillvalue=-1)))
        k <<= 1
    order = [0] * n
    for i, r in enumerate(rank):
        order[r] = i
    total, h = 0, 0
    for i in range(n):
        if rank[i] == n - 1:
            h = 0
            continue
        j = order[rank[i] + 1]
        while i + h < n and j + h < n and codes[i + h] == codes[j + h]:
            h += 1
        total += h
        h = max(h - 1, 0)
    return total * 2 / (n * (n + 1)) > 0.2


def verify_equal(given: str, gold: str) -> bool:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    try:
        if any(len(x) > 128 and _repetitive(x) for x in (given, gold)):
            return False
        if hendrycks_normalize(gold) == hendrycks_normalize(given):
            return True
        config = (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())

        def read(x: str) -> list:
            # the official passes extraction_mode=["first_match"]; math-verify compares it with the string
            # "first_match", so the list behaves as its default "any_match" (parser.py, 0.6.0 and 0.9.0)
            return parse(x if "$" in x else f"${x}$", extraction_config=config, fallback_mode="no_fallback",
                         extraction_mode="any_match", parsing_timeout=None)

        return bool(verify(read(gold), read(given), timeout_seconds=None))
    except Exception:  # noqa: BLE001 - the official check scores any failure as wrong
        return False


FALLBACK_CHECKS = {"mathd": mathd_equal, "sympy": sympy_equal, "verify": verify_equal}
"""The official boxed fallback's checks, in its order: (given, gold) -> bool; any True accepts."""


def boxed_fallback(response: str, gold: str) -> float:
    """``boxed_reward_fn(response, gold, fast=False)``: 1.0 iff a check accepts the last box's content."""
    given = boxed_content(response)
    if given is None:
        return 0.0
    if "\\boxed" in gold:
        gold = boxed_content(gold)
        if gold is None:
            return 0.0
    return float(any(check(given, gold) for check in FALLBACK_CHECKS.values()))
