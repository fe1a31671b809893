"""OpenR1-Math-style rows -> validated, tokenized examples.

A row holds a problem, a gold answer and one or two expert solutions (a string, or a list of strings in one
column, or a second column). Every row is checked; a bad row is either an error that names the row index
and the field (``on_bad_row="error"``) or a counted skip (``"skip"``): silent data loss is never an option.

Loading goes through Hugging Face ``datasets``: a local .jsonl/.json/.parquet file or a folder of them
(works offline), or a hub dataset name when online.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

from trapo_megatron.data.prefix import think_text
from trapo_megatron.data.prompts import PromptConfig, encode_prompt

# File suffix -> `datasets` builder name.
_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


@dataclass(kw_only=True)
class DataConfig:
    """Where the rows are, what their columns are called, and what to do with a bad one."""

    path: str
    """A local .jsonl/.json/.parquet file, a folder of them, or a hub dataset name (needs network)."""
    split: str = "train"
    """Split to read for hub datasets (local files always give "train")."""
    problem_column: str = "problem"
    """Column with the problem statement (the user turn of the prompt)."""
    answer_column: str = "answer"
    """Gold answer; ints and floats are accepted and turned into strings."""
    solution_column: str = "solution"
    """Expert solution: a string, or a list of strings (the second, if any, guides the last micro-group)."""
    second_solution_column: str | None = None
    """Optional column with a second expert solution (used when the solution column holds only one)."""
    solution_ok_column: str | None = None
    """Optional list-of-bools column parallel to a list solution column (OpenR1-Math-220k's
    "correctness_math_verify" beside "generations"): only solutions marked True are kept."""
    expert_text: Literal["full", "think"] = "full"
    """"think": only the text inside <think>...</think> (the official code); "full": the solution as is."""
    max_prompt_tokens: int = 1024
    """A prompt longer than this (in tokens, template included) is a bad row."""
    max_solution_tokens: int | None = None
    """An expert solution longer than this (in tokens, before EOS) is a bad row; None = no limit."""
    on_bad_row: Literal["error", "skip"] = "error"
    """"error": raise BadRowError naming row and field; "skip": drop the row and count why."""
    max_rows: int | None = None
    """Read only the first rows (tests, smoke runs)."""

    def __post_init__(self) -> None:
        if self.on_bad_row not in ("error", "skip"):
            raise ValueError(f"data.on_bad_row must be 'error' or 'skip', got {self.on_bad_row!r}")
        if self.expert_text not in ("full", "think"):
            raise ValueError(f"data.expert_text must be 'full' or 'think', got {self.expert_text!r}")
        if self.max_prompt_tokens < 1:
            raise ValueError(f"data.max_prompt_tokens must be >= 1, got {self.max_prompt_tokens}")


class BadRowError(ValueError):
    """A row failed validation; the message names the row index and the field."""

    def __init__(self, index: int, column: str, kind: str, detail: str = ""):
        super().__init__(f"row {index}: field {column!r} {kind}{detail}")
        self.index, self.column, self.kind = index, column, kind


@dataclass
class Example:
    """One validated prompt. ``solution_ids`` holds 1 or 2 expert solutions as token ids (no EOS)."""

    index: int
    problem: str
    answer: str
    prompt_ids: list[int]
    solution_ids: list[list[int]]


@dataclass
class LoadStats:
    """Rows read, kept, and skipped by "column: reason" (reported once after loading)."""

    num_rows: int = 0
    num_kept: int = 0
    skipped: Counter = field(default_factory=Counter)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())


def load_rows(cfg: DataConfig):
    """The raw rows as a ``datasets.Dataset``."""
    import datasets

    path = cfg.path
    if os.path.isfile(path):
        builder = _BUILDERS.get(os.path.splitext(path)[1])
        if builder is None:
            raise ValueError(f"data.path {path!r}: unknown file type; use one of {sorted(_BUILDERS)}")
        ds = datasets.load_dataset(builder, data_files=path, split="train")
    elif os.path.isdir(path):
        files = sorted(f for f in os.listdir(path) if os.path.splitext(f)[1] in _BUILDERS)
        builders = {_BUILDERS[os.path.splitext(f)[1]] for f in files}
        if len(builders) != 1:
            raise ValueError(f"data.path {path!r} must hold files of one type among {sorted(_BUILDERS)}")
        ds = datasets.load_dataset(
            builders.pop(), data_files=[os.path.join(path, f) for f in files], split="train"
        )
    else:
        ds = datasets.load_dataset(path, split=cfg.split)
    if cfg.max_rows is not None:
        ds = ds.select(range(min(cfg.max_rows, len(ds))))
    return ds


def _text(index: int, column: str, value: Any) -> str:
    if value is None:
        raise BadRowError(index, column, "is missing")
    if not isinstance(value, str):
        raise BadRowError(index, column, "is not a string", f" (got {type(value).__name__})")
    if not value.strip():
        raise BadRowError(index, column, "is empty")
    return value


def _keep_ok(index: int, solutions: list[str], flags: Any, cfg: DataConfig) -> list[str]:
    if not isinstance(flags, list) or len(flags) != len(solutions):
        raise BadRowError(index, str(cfg.solution_ok_column), "does not match the solution list")
    kept = [s for s, ok in zip(solutions, flags, strict=True) if ok is True]
    if not kept:
        raise BadRowError(index, str(cfg.solution_ok_column), "marks no solution correct")
    return kept


def validate_row(index: int, row: dict, cfg: DataConfig) -> tuple[str, str, list[str]]:
    """(problem, answer, solutions) of a row, or BadRowError naming the row and the field."""
    problem = _text(index, cfg.problem_column, row.get(cfg.problem_column))
    answer = row.get(cfg.answer_column)
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    answer = _text(index, cfg.answer_column, answer)
    raw = row.get(cfg.solution_column)
    values = raw if isinstance(raw, list) else [raw]
    if not values:
        raise BadRowError(index, cfg.solution_column, "is an empty list")
    solutions = [_text(index, cfg.solution_column, v) for v in values]
    if cfg.solution_ok_column is not None:
        solutions = _keep_ok(index, solutions, row.get(cfg.solution_ok_column), cfg)
    if cfg.second_solution_column is not None and row.get(cfg.second_solution_column) is not None:
        solutions.append(_text(index, cfg.second_solution_column, row[cfg.second_solution_column]))
    if cfg.expert_text == "think":
        solutions = [think_text(s) for s in solutions]
    return problem, answer, solutions[:2]


def tokenize_row(
    index: int,
    problem: str,
    answer: str,
    solutions: list[str],
    cfg: DataConfig,
    prompt: PromptConfig,
    tokenizer,
) -> Example:
    """Tokenize a validated row; a prompt or solution over its limit is a BadRowError."""
    prompt_ids = encode_prompt(problem, prompt, tokenizer)
    if len(prompt_ids) > cfg.max_prompt_tokens:
        raise BadRowError(
            index,
            cfg.problem_column,
            "gives a prompt over the limit",
            f" ({len(prompt_ids)} tokens > data.max_prompt_tokens={cfg.max_prompt_tokens})",
        )
    solution_ids = [list(tokenizer(s, add_special_tokens=False)["input_ids"]) for s in solutions]
    for ids in solution_ids:
        if cfg.max_solution_tokens is not None and len(ids) > cfg.max_solution_tokens:
            raise BadRowError(
                index,
                cfg.solution_column,
                "is over the limit",
                f" ({len(ids)} tokens > data.max_solution_tokens={cfg.max_solution_tokens})",
            )
    return Example(
        index=index, problem=problem, answer=answer, prompt_ids=prompt_ids, solution_ids=solution_ids
    )


def build_examples(rows, cfg: DataConfig, prompt: PromptConfig, tokenizer) -> tuple[list[Example], LoadStats]:
    """Validate and tokenize ``rows`` (any iterable of dicts); skip or raise on bad rows per ``cfg``."""
    stats, examples = LoadStats(), []
    for index, row in enumerate(rows):
        stats.num_rows += 1
        try:
            fields = validate_row(index, row, cfg)
            examples.append(tokenize_row(index, *fields, cfg, prompt, tokenizer))
        except BadRowError as err:
            if cfg.on_bad_row == "error":
                raise
            stats.skipped[f"{err.column}: {err.kind}"] += 1
    stats.num_kept = len(examples)
    return examples, stats


def load_examples(cfg: DataConfig, prompt: PromptConfig, tokenizer) -> tuple[list[Example], LoadStats]:
    """Load, check columns, validate and tokenize: the training prompts of a run."""
    ds = load_rows(cfg)
    wanted = [cfg.problem_column, cfg.answer_column, cfg.solution_column]
    missing = [c for c in wanted if c not in ds.column_names]
    if missing:
        raise ValueError(f"data.path {cfg.path!r} has no column(s) {missing}; columns are {ds.column_names}")
    return build_examples(ds, cfg, prompt, tokenizer)
