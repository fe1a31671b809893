"""Local benchmark files in the formats the usual math suites ship, read into one item type.

Each format is a row of FORMATS: where the problem and the gold answer live (field paths, as in
data/dataset.py: "prompt[-1].content"), and how to get the answer out of that field. Files are .jsonl,
.json (a list of rows) or .parquet, read offline. "verl" is the official TRAPO/LUFFY eval layout
(data/valid.*.parquet); rows repeating a problem (AIME, AIME25 and AMC there hold each problem 32 times) are
merged into one item whose ``repeats`` counts them: each row is one sample of that problem.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from trapo_megatron.data.dataset import BadRowError, resolve
from trapo_megatron.reward.math_reward import last_boxed


def _text(value: object) -> str:
    return str(value).strip()


def _number(value: object) -> str:
    """AMC answers are floats in the common release (142.0): keep integers integral."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return _text(value)


def _boxed_in_solution(value: object) -> str:
    """Minerva ships a worked solution; the gold answer is its last \\boxed{}."""
    answer = last_boxed(str(value))
    if answer is None:
        raise ValueError("no \\boxed{} in the solution")
    return answer.strip()


def _first_of_list(value: object) -> str:
    """OlympiadBench's final_answer is a list of LaTeX strings, usually one, often wrapped in $...$."""
    items = value if isinstance(value, list) else [value]
    if not items:
        raise ValueError("empty final_answer list")
    return str(items[0]).strip().strip("$").strip()


@dataclass(frozen=True)
class Format:
    problem: str
    """Field path of the problem statement."""
    answer: str
    """Field path of the gold answer (or of the solution it is extracted from)."""
    extract: Callable[[object], str]
    """Turns the answer column into the gold answer string math-verify compares with."""
    id_fields: tuple[str, ...] = ("unique_id", "id", "idx", "extra_info.index")
    """Columns tried in turn for a stable item id (the row number otherwise)."""


FORMATS: dict[str, Format] = {
    "math500": Format(problem="problem", answer="answer", extract=_text),
    "aime": Format(problem="problem", answer="answer", extract=_number),
    "amc": Format(problem="problem", answer="answer", extract=_number),
    "minerva": Format(problem="problem", answer="solution", extract=_boxed_in_solution),
    "olympiadbench": Format(problem="question", answer="final_answer", extract=_first_of_list),
    "flat": Format(problem="problem", answer="answer", extract=_number),
    "verl": Format(problem="prompt[-1].content", answer="reward_model.ground_truth", extract=_text),
}

SAMPLE_DIR = Path(__file__).resolve().parent.parent / "assets" / "eval_sample"
"""The shipped sample: one small file per benchmark format, named ``<format>.jsonl``."""
SAMPLE_FORMATS = ("math500", "aime", "amc", "minerva", "olympiadbench")


@dataclass(frozen=True)
class Item:
    benchmark: str
    id: str
    problem: str
    gold: str
    repeats: int = 1
    """Rows of the file holding this problem (each row is one sample of it: official AIME files repeat 32x)."""


def read_rows(path: str | Path) -> list[dict]:
    """Rows of a .jsonl, .json (list) or .parquet file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"benchmark file {path} does not exist")
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if path.suffix == ".json":
        rows = json.loads(path.read_text())
        if not isinstance(rows, list):
            raise ValueError(f"{path}: a .json benchmark must hold a list of rows")
        return rows
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raise ValueError(f"{path}: unsupported benchmark file type {path.suffix!r} (.jsonl, .json, .parquet)")


def load_benchmark(path: str | Path, fmt: str, name: str | None = None, columns: dict[str, str] | None = None,
                   ) -> list[Item]:
    """Items of one benchmark file in format ``fmt`` (a key of FORMATS), repeated rows merged.

    ``columns`` overrides the format's field paths ({"problem": ..., "answer": ...}).
    Errors name the file, the row and the field."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown benchmark format {fmt!r}; choose one of {sorted(FORMATS)}")
    unknown = sorted(set(columns or {}) - {"problem", "answer"})
    if unknown:
        raise ValueError(f"{path}: column overrides {unknown} unknown; use problem= and answer=")
    spec, name = FORMATS[fmt], name or fmt
    spec = replace(spec, **(columns or {}))
    merged: dict[tuple[str, str], Item] = {}
    ids: set[str] = set()
    for i, row in enumerate(read_rows(path)):
        try:
            problem, raw = resolve(i, row, spec.problem), resolve(i, row, spec.answer)
        except BadRowError as e:
            raise ValueError(f"{path} {e}") from None
        for col, value in ((spec.problem, problem), (spec.answer, raw)):
            if value is None:
                raise ValueError(f"{path} row {i}: format {fmt!r} needs field {col!r}; row has {sorted(row)}")
        try:
            gold = spec.extract(raw)
        except ValueError as e:
            raise ValueError(f"{path} row {i} column {spec.answer!r}: {e}") from None
        key = (str(problem), gold)
        if key in merged:
            merged[key] = replace(merged[key], repeats=merged[key].repeats + 1)
            continue
        item_id = next((str(v) for f in spec.id_fields if (v := resolve(i, row, f)) is not None), str(i))
        item_id = item_id if item_id not in ids else f"row{i}"
        ids.add(item_id)
        merged[key] = Item(benchmark=name, id=item_id, problem=str(problem), gold=gold)
    return list(merged.values())


def parse_data_arg(arg: str) -> tuple[str, str, Path]:
    """``[NAME=]FORMAT:PATH`` -> (name, format, path); NAME defaults to FORMAT."""
    name, sep, rest = arg.partition("=")
    if not sep:
        name, rest = "", arg
    fmt, sep, path = rest.partition(":")
    if not sep or not path:
        raise ValueError(f"--data {arg!r} must look like [NAME=]FORMAT:PATH, FORMAT one of {sorted(FORMATS)}")
    if fmt not in FORMATS:
        raise ValueError(f"--data {arg!r}: unknown format {fmt!r}; choose one of {sorted(FORMATS)}")
    return name or fmt, fmt, Path(path)


def sample_benchmarks() -> list[tuple[str, str, Path]]:
    """(name, format, path) of every shipped sample file."""
    return [(fmt, fmt, SAMPLE_DIR / f"{fmt}.jsonl") for fmt in SAMPLE_FORMATS]
