"""Reward parity across math-verify versions: grade one corpus by the official training rule with whatever
math-verify is installed, then compare two such runs.

The official rule (Su-my/TRAPO verl/trapo_src/math_verify_reward.py:48-50, library default timeouts):
``verify(parse("$" + gold + "$"), parse(response))`` on the whole decoded response. Each response is graded
as decoded with special tokens skipped and kept (the official decode keeps them: an EOS text at the end).
The script needs only math-verify (no torch, no project import), so a scratch venv holding another version
runs it as is:

    python tools/reward_parity.py grade OUT.json        # once per math-verify version
    python tools/reward_parity.py compare A.json B.json  # flips between the two, and skip vs keep
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "trapo_megatron" / "assets"
EOS_TEXTS = ("<|im_end|>", "<|endoftext|>")
TEST_TABLES = {"tests/test_reward_math.py": ("PAIRS", "MODES_DISAGREE"),
               "tests/test_eval_official.py": ("DISAGREE",), "tests/test_official_grader.py": ("DECIDED_BY",)}

# Hand-written borderline answers: (response, gold). Forms where graders are known to differ.
BORDERLINE = [
    ("\\boxed{50\\%}", "50"), ("\\boxed{50}", "50\\%"), ("\\boxed{0.5}", "50\\%"),
    ("\\boxed{5 \\text{ cm}}", "5"), ("\\boxed{5\\text{cm}^2}", "5"), ("\\boxed{90^\\circ}", "90"),
    ("\\boxed{\\$18.90}", "18.90"), ("\\boxed{1,000}", "1000"), ("\\boxed{1\\,000}", "1000"),
    ("\\boxed{x = 3}", "3"), ("\\boxed{3}", "x=3"), ("\\boxed{y = 2x + 1}", "2x+1"),
    ("\\boxed{2, 3}", "3, 2"), ("\\boxed{2 \\text{ and } 3}", "2, 3"), ("\\boxed{\\pm 2}", "2, -2"),
    ("\\boxed{(2, \\infty)}", "x > 2"), ("\\boxed{[1, 3)}", "[1,3)"), ("\\boxed{\\{1, 2\\}}", "1, 2"),
    ("\\boxed{\\dfrac{3}{4}}", "\\frac34"), ("\\boxed{7\\frac{3}{4}}", "\\frac{31}{4}"), ("\\boxed{0.75}", "3/4"),
    ("\\boxed{-\\frac{1}{2}}", "\\frac{-1}{2}"), ("\\boxed{1.5e3}", "1500"), ("\\boxed{3.14}", "\\pi"),
    ("\\boxed{\\sqrt[3]{2}}", "2^{1/3}"), ("\\boxed{1010_2}", "10"), ("\\boxed{2^{10}}", "1024"),
    ("\\boxed{(A)}", "A"), ("\\boxed{\\text{(C)}}", "C"), ("\\boxed{\\textbf{(B) }7}", "7"),
    ("\\boxed{3:4}", "\\frac{3}{4}"), ("\\boxed{\\infty}", "\\infty"), ("\\boxed{\\emptyset}", "\\varnothing"),
    ("\\boxed{i}", "\\sqrt{-1}"), ("\\boxed{e}", "2.718"), ("\\boxed{\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}}",
                                                              "\\begin{pmatrix}1\\\\2\\end{pmatrix}"),
    ("The answer is 12 apples.", "12"), ("Answer: $\\frac{1}{3}$", "1/3"), ("\\boxed{3} and \\boxed{4}", "4"),
    ("\\boxed{\\text{Yes}}", "\\text{Yes}"), ("\\boxed{10^\\circ \\text{C}}", "10"), ("\\boxed{\\approx 3.3}", "10/3"),
    ("x = \\boxed{2}", "2.0"), ("\\boxed{\\tfrac{1}{2}}", "0.5"), ("\\boxed{12\\%}", "0.12"),
]


def _test_tables() -> list[tuple[str, str, str]]:
    """(source, response, gold) from the tests' hand-written tables (string expressions only)."""
    out = []
    for path, names in TEST_TABLES.items():
        for node in ast.parse((ROOT / path).read_text()).body:
            if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) in names:
                rows = eval(compile(ast.Expression(node.value), path, "eval"), {"__builtins__": {}})
                out += [(f"{path}:{node.targets[0].id}", r[0], r[1]) for r in rows]
    return out


def corpus() -> list[tuple[str, str, str]]:
    """(source, response, gold): the demo's expert solutions (right and with a wrong gold), the shipped eval
    sample's responses, the tests' adversarial tables and the borderline cases above."""
    rows = []
    for name in ("train.jsonl", "heldout.jsonl"):
        for line in (ASSETS / "demo" / name).read_text().splitlines()[:300]:
            ex = json.loads(line)
            rows += [(f"demo/{name}", ex["solution"], ex["answer"]),
                     (f"demo/{name} wrong gold", ex["solution"], str(int(ex["answer"]) + 1))]
    golds = {}
    for bench, key in (("math500", "unique_id"), ("aime", "id"), ("amc", "id")):
        for line in (ASSETS / "eval_sample" / f"{bench}.jsonl").read_text().splitlines():
            ex = json.loads(line)
            golds[(bench, str(ex[key]))] = str(ex["answer"])
    for line in (ASSETS / "eval_sample" / "responses.jsonl").read_text().splitlines():
        item = json.loads(line)
        gold = golds.get((item["benchmark"], item["id"]))
        rows += [(f"eval_sample/{item['benchmark']}", r, gold) for r in item["responses"] if gold is not None]
    return rows + _test_tables() + [("borderline", r, g) for r, g in BORDERLINE]


def grade(response: str, gold: str) -> float:
    from math_verify import parse, verify

    try:
        return float(verify(parse("$" + gold + "$"), parse(response)))
    except Exception:  # noqa: BLE001 - the official reward scores a failure 0
        return 0.0


def run_grade(out: Path) -> None:
    rows = [{"source": s, "response": r, "gold": g, "skip": grade(r, g), "keep": grade(r + EOS_TEXTS[0], g),
             "keep_endoftext": grade(r + EOS_TEXTS[1], g)} for s, r, g in corpus()]
    out.write_text(json.dumps({"math_verify": version("math-verify"), "rows": rows}))
    print(f"math-verify {version('math-verify')}: {len(rows)} responses, {sum(r['skip'] for r in rows):.0f} right")


def run_compare(a: Path, b: Path) -> None:
    ra, rb = (json.loads(p.read_text()) for p in (a, b))
    va, vb = ra["math_verify"], rb["math_verify"]
    rows = list(zip(ra["rows"], rb["rows"], strict=True))
    print(f"{len(rows)} responses; math-verify {va} vs {vb}")
    for key in ("skip", "keep", "keep_endoftext"):
        flips = [(x["source"], x["response"][:70], x["gold"], x[key], y[key]) for x, y in rows if x[key] != y[key]]
        print(f"  decoded {key}: {len(flips)} flips")
        for f in flips:
            print(f"    {f[0]}: {f[1]!r} gold {f[2]!r}: {va} {f[3]:.0f}, {vb} {f[4]:.0f}")
    for name, r in ((va, ra), (vb, rb)):
        skipkeep = [(x["source"], x["response"][:70], x["gold"]) for x in r["rows"] if x["skip"] != x["keep"]]
        print(f"  {name}: special tokens skipped vs kept: {len(skipkeep)} flips {skipkeep[:5]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("grade").add_argument("out", type=Path)
    cmp = sub.add_parser("compare")
    cmp.add_argument("a", type=Path)
    cmp.add_argument("b", type=Path)
    args = parser.parse_args(argv)
    if args.cmd == "grade":
        run_grade(args.out)
    else:
        run_compare(args.a, args.b)
    return 0


if __name__ == "__main__":
    sys.exit(main())
