"""`trapo data inspect FILE`: what a training file holds and how a run would read it.

Prints the field paths found in the first row (with their types), one parsed example (problem, answer,
expert solutions as the run would use them) and the load report (rows read, kept, skipped by reason and
index). Without --tokenizer the rows are validated but not tokenized (prompt/solution token limits unchecked).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from trapo_megatron.config import ConfigError, apply_overrides, from_dict


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="<action>", required=True)
    p = sub.add_parser("inspect", help="columns, a parsed example and the load report of a data file")
    p.add_argument("path", help="a .jsonl/.json/.parquet file or a folder of them")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder: also check the token limits")
    p.add_argument("--max-rows", type=int, default=None, help="read only the first N rows")
    p.add_argument("--json", action="store_true", help="print the load report as JSON only")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="data.* fields, e.g. format=verl solution_column=extra_info.answer_list")


def field_paths(value: Any, prefix: str = "") -> list[tuple[str, str]]:
    """(path, type) of every leaf of one row, lists shown by their first element: ("prompt[0].role", "str")."""
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in field_paths(v, f"{prefix}.{k}" if prefix else k)]
    if isinstance(value, (list, tuple)):
        if not value:
            return [(prefix, "list (empty)")]
        return [(path, f"{kind}, list of {len(value)}" if path == f"{prefix}[0]" else kind)
                for path, kind in field_paths(value[0], f"{prefix}[0]")]
    return [(prefix, type(value).__name__)]


def _clip(text: str, n: int = 200) -> str:
    return text if len(text) <= n else f"{text[:n]}... ({len(text)} chars)"


def run_data(args: argparse.Namespace) -> int:
    from trapo_megatron.data.dataset import BadRowError, DataConfig, LoadStats, load_rows, validate_row

    try:
        overrides = apply_overrides({"path": args.path, "max_rows": args.max_rows}, args.overrides)
        cfg = from_dict(DataConfig, overrides, prefix="data")
        rows = load_rows(cfg)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"trapo data inspect: {e}", file=sys.stderr)
        return 2
    if args.tokenizer:
        from transformers import AutoTokenizer

        from trapo_megatron.data.dataset import build_examples
        from trapo_megatron.data.prompts import PromptConfig

        cfg.on_bad_row = "skip"
        _, stats = build_examples(rows, cfg, PromptConfig(), AutoTokenizer.from_pretrained(args.tokenizer))
    else:
        stats = LoadStats()
        for index, row in enumerate(rows):
            stats.num_rows += 1
            try:
                validate_row(index, row, cfg)
                stats.num_kept += 1
            except BadRowError as err:
                stats.skip(err)
    report = stats.report(cfg.path, cfg)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{cfg.path}: {len(rows)} rows; fields of row 0:")
    for path, kind in field_paths(rows[0]) if len(rows) else []:
        print(f"  {path}: {kind}")
    print(f"read as data.format={cfg.format!r}: " + ", ".join(f"{k}={v!r}" for k, v in report["columns"].items()))
    first_ok = next((i for i in range(len(rows)) if i not in {r["index"] for r in stats.skipped_rows}), None)
    if first_ok is not None:
        problem, answer, solutions = validate_row(first_ok, rows[first_ok], cfg)
        print(f"example (row {first_ok}):\n  problem: {_clip(problem)!r}\n  answer: {answer!r}")
        for i, s in enumerate(solutions):
            print(f"  solution[{i}] ({cfg.expert_text}): {_clip(s)!r}")
    print(stats.summary(cfg.path))
    for r in stats.skipped_rows[:20]:
        print(f"    row {r['index']}: {r['field']}: {r['reason']}")
    if len(stats.skipped_rows) > 20:
        print(f"    ... {len(stats.skipped_rows) - 20} more (--json lists every row)")
    return 0
