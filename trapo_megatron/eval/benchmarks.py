"""Local benchmark files in the formats the usual math suites ship, read into one item type.

Each format is a row of FORMATS: where the problem and the gold answer live, and how to get the answer out
of that column. Files are .jsonl, .json (a list of rows) or .parquet, read offline.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

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
    """Column holding the problem statement."""
    answer: str
    """Column holding the gold answer (or the solution it is extracted from)."""
    extract: Callable[[object], str]
    """Turns the answer column into the gold answer string math-verify compares with."""
    id_fields: tuple[str, ...] = ("unique_id", "id", "idx")
    """Columns tried in turn for a stable item id (the row number otherwise)."""


FORMATS: dict[str, Format] = {
    "math500": Format(problem="problem", answer="answer", extract=_text),
    "aime": Format(problem="problem", answer="answer", extract=_number),
    "amc": Format(problem="problem", answer="answer", extract=_number),
    "minerva": Format(problem="problem", answer="solution", extract=_boxed_in_solution),
    "olympiadbench": Format(problem="question", answer="final_answer", extract=_first_of_list),
}

SAMPLE_DIR = Path(__file__).resolve().parent.parent / "assets" / "eval_sample"
"""The shipped sample: one small file per format, named ``<format>.jsonl``."""


@dataclass(frozen=True)
class Item:
    benchmark: str
    id: str
    problem: str
    gold: str


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


def load_benchmark(path: str | Path, fmt: str, name: str | None = None) -> list[Item]:
    """Items of one benchmark file in format ``fmt`` (a key of FORMATS).

    Errors name the file, the row and the column."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown benchmark format {fmt!r}; choose one of {sorted(FORMATS)}")
    spec, name = FORMATS[fmt], name or fmt
    items = []
    for i, row in enumerate(read_rows(path)):
        for col in (spec.problem, spec.answer):
            if col not in row:
                raise ValueError(
                    f"{path} row {i}: format {fmt!r} needs column {col!r}; row has {sorted(row)}"
                )
        try:
            gold = spec.extract(row[spec.answer])
        except ValueError as e:
            raise ValueError(f"{path} row {i} column {spec.answer!r}: {e}") from None
        item_id = next((str(row[f]) for f in spec.id_fields if f in row), str(i))
        items.append(Item(benchmark=name, id=item_id, problem=str(row[spec.problem]), gold=gold))
    return items


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
    return [(fmt, fmt, SAMPLE_DIR / f"{fmt}.jsonl") for fmt in FORMATS]
