"""Training rows (flat OpenR1-style, or the verl/LUFFY/TRAPO parquet as shipped) -> validated, tokenized examples.

A row holds a problem, a gold answer and one or two expert solutions (a string, or a list of strings in one
field, or a second field). Fields are named by PATHS into the row, so nested files are read as they ship:
``prompt[-1].content`` (the last chat turn), ``reward_model.ground_truth``, ``extra_info.answer_list[0]``.
``data.format`` names a known layout (FORMATS); a ``data.*_column`` set explicitly overrides its entry.

Every row is checked; a bad row is either an error that names the row index and the field
(``on_bad_row="error"``) or a skip recorded with its index, field and reason (``"skip"``), and the load
report (rows read, kept, skipped by reason) is printed and written to the run directory; more skips than
``data.max_skipped_fraction`` fail the run at start. Silent data loss is never an option.

Loading goes through Hugging Face ``datasets``: a local .jsonl/.json/.parquet file or a folder of them
(works offline), or a hub dataset name when online.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from trapo_megatron.data.prefix import think_text
from trapo_megatron.data.prompts import PromptConfig, encode_prompt

# File suffix -> `datasets` builder name.
_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}

# data.format -> where each field lives (paths into a row; None: the layout has no such field).
FORMATS: dict[str, dict[str, str | None]] = {
    # problem / answer / solution columns as plain strings (a list of solutions allowed)
    "flat": {"problem_column": "problem", "answer_column": "answer", "solution_column": "solution",
             "second_solution_column": None, "solution_ok_column": None},
    # verl parquet as TRAPO ships it (LUFFY's openr1 file + the expert list, data/prepare_train.py;
    # trapo_src/rl_dataset_with_target.py reads prompt[-1].content and extra_info.answer_list[0] and [1])
    "verl": {"problem_column": "prompt[-1].content", "answer_column": "reward_model.ground_truth",
             "solution_column": "extra_info.answer_list", "second_solution_column": None,
             "solution_ok_column": None},
    # verl parquet as LUFFY ships it: one expert trace in the `target` chat list
    "luffy": {"problem_column": "prompt[-1].content", "answer_column": "reward_model.ground_truth",
              "solution_column": "target[-1].content", "second_solution_column": None,
              "solution_ok_column": None},
    # open-r1/OpenR1-Math-220k: several generations, each with a math-verify verdict
    "openr1": {"problem_column": "problem", "answer_column": "answer", "solution_column": "generations",
               "second_solution_column": None, "solution_ok_column": "correctness_math_verify"},
}


@dataclass(kw_only=True)
class DataConfig:
    """Where the rows are, what their columns are called, and what to do with a bad one."""

    path: str
    """A local .jsonl/.json/.parquet file, a folder of them, or a hub dataset name (needs network)."""
    split: str = "train"
    """Split to read for hub datasets (local files always give "train")."""
    format: Literal["flat", "verl", "luffy", "openr1"] = "flat"
    """Row layout (FORMATS in data/dataset.py): "flat" problem/answer/solution strings; "verl" the TRAPO
    parquet (prompt chat list, reward_model.ground_truth, extra_info.answer_list); "luffy" the same with the
    expert in target[-1].content; "openr1" OpenR1-Math-220k (generations + correctness_math_verify).
    A *_column set below overrides the format's entry."""
    problem_column: str | None = None
    """Path to the problem statement (the user turn of the prompt), e.g. "prompt[-1].content"; None: the
    format's. Paths: names joined by "." and list indices in brackets ([0], [-1])."""
    answer_column: str | None = None
    """Path to the gold answer (ints and floats become strings); None: the format's."""
    solution_column: str | None = None
    """Path to the expert solution: a string, or a list of strings (the first two are kept: the second, if
    any, guides the last micro-group); None: the format's."""
    second_solution_column: str | None = None
    """Optional path to a second expert solution (used when the solution field holds only one)."""
    solution_ok_column: str | None = None
    """Optional path to a list of bools parallel to a list solution field (OpenR1-Math-220k's
    "correctness_math_verify" beside "generations"): only solutions marked True are kept."""
    expert_text: Literal["full", "think"] = "full"
    """"think": the stripped text inside <think>...</think>, else the whole stripped solution (the official
    code); "full": the solution as is."""
    max_prompt_tokens: int = 1024
    """A prompt longer than this (in tokens, template included) is a bad row."""
    max_solution_tokens: int | None = None
    """Limit on an expert solution (in tokens, before EOS); None = no limit. What a longer one does:
    long_solution."""
    long_solution: Literal["bad_row", "truncate"] = "bad_row"
    """A solution over max_solution_tokens: "bad_row" (see on_bad_row); "truncate" cut to its first
    max_solution_tokens tokens, before the EOS and the prefix cut (the official code's right truncation to
    max_response_length, verl/trapo_src/rl_dataset_with_target.py:199-209)."""
    on_bad_row: Literal["error", "skip"] = "error"
    """"error": raise BadRowError naming row and field; "skip": drop the row and count why."""
    max_rows: int | None = None
    """Read only the first rows (tests, smoke runs)."""
    order: Literal["seeded", "randperm"] = "seeded"
    """The data order (train/sampler.py): "seeded" a shuffle per epoch using every prompt; "randperm" the
    official sampler, torch.randperm per epoch from one seeded generator, with drop_last
    (verl/trapo_src/rl_dataset_with_target.py:427-461, mix_trainer.py:309-318)."""
    order_seed: int | None = None
    """Seed of the data order; None: run.seed (the official: 47, verl/trapo_src/rl_dataset_with_target.py:443)."""
    max_skipped_fraction: float = 0.1
    """With on_bad_row="skip": more skipped rows than this fraction of the rows read fails the run at start
    (1.0: never)."""

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"data.format must be one of {sorted(FORMATS)}, got {self.format!r}")
        for name, default in FORMATS[self.format].items():
            if getattr(self, name) is None:
                setattr(self, name, default)
        for name in FORMATS[self.format]:
            value = getattr(self, name)
            if value is not None:
                try:
                    parse_path(value)
                except ValueError as e:
                    raise ValueError(f"data.{name}: {e}") from None
        if not 0.0 <= self.max_skipped_fraction <= 1.0:
            raise ValueError(f"data.max_skipped_fraction must lie in [0, 1], got {self.max_skipped_fraction}")
        if self.on_bad_row not in ("error", "skip"):
            raise ValueError(f"data.on_bad_row must be 'error' or 'skip', got {self.on_bad_row!r}")
        if self.order not in ("seeded", "randperm"):
            raise ValueError(f"data.order must be 'seeded' or 'randperm', got {self.order!r}")
        if self.long_solution not in ("bad_row", "truncate"):
            raise ValueError(f"data.long_solution must be 'bad_row' or 'truncate', got {self.long_solution!r}")
        if self.expert_text not in ("full", "think"):
            raise ValueError(f"data.expert_text must be 'full' or 'think', got {self.expert_text!r}")
        if self.max_prompt_tokens < 1:
            raise ValueError(f"data.max_prompt_tokens must be >= 1, got {self.max_prompt_tokens}")


class BadRowError(ValueError):
    """A row failed validation; the message names the row index and the field."""

    def __init__(self, index: int, column: str, kind: str, detail: str = ""):
        super().__init__(f"row {index}: field {column!r} {kind}{detail}")
        self.index, self.column, self.kind, self.detail = index, column, kind, detail


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
    """Rows read, kept, and skipped: counted by "field: reason", and each skipped row by index."""

    num_rows: int = 0
    num_kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    skipped_rows: list[dict] = field(default_factory=list)
    """One {"index", "field", "reason"} per skipped row, in row order."""

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def skip(self, err: BadRowError) -> None:
        self.skipped[f"{err.column}: {err.kind}"] += 1
        self.skipped_rows.append({"index": err.index, "field": err.column, "reason": f"{err.kind}{err.detail}"})

    def report(self, path: str, cfg: DataConfig) -> dict:
        """The load report as plain data (what `trapo data inspect` prints and runs write as JSON)."""
        columns = {name: getattr(cfg, name) for name in FORMATS[cfg.format]}
        return {"path": path, "format": cfg.format, "columns": columns, "num_rows": self.num_rows,
                "num_kept": self.num_kept, "num_skipped": self.num_skipped, "skipped_by_reason": dict(self.skipped),
                "skipped_rows": self.skipped_rows}

    def summary(self, path: str) -> str:
        """One line per reason, for the start of a run's log."""
        head = f"data {path}: {self.num_rows} rows read, {self.num_kept} kept, {self.num_skipped} skipped"
        return "\n".join([head] + [f"  skipped {n}: {why}" for why, n in self.skipped.most_common()])


# ------------------------------------------------------------------------------------------- paths
_NAME = r"[A-Za-z_][\w-]*"
_PATH = re.compile(rf"{_NAME}(?:\.{_NAME}|\[-?\d+\])*")
_STEP = re.compile(rf"({_NAME})|\[(-?\d+)\]")


def parse_path(path: str) -> tuple[str | int, ...]:
    """ "prompt[-1].content" -> ("prompt", -1, "content"): names joined by ".", list indices in brackets."""
    if not _PATH.fullmatch(path):
        raise ValueError(f"bad field path {path!r}; write a column name, then .name or [index] steps, "
                         "e.g. prompt[-1].content")
    return tuple(name if name else int(i) for name, i in _STEP.findall(path))


def resolve(index: int, row: dict, path: str) -> Any:
    """The value at ``path`` in ``row`` (None when a name or an index is absent); BadRowError when the path
    goes through a value of the wrong kind (a name into a non-mapping, an index into a non-list)."""
    value: Any = row
    for step in parse_path(path):
        if value is None:
            return None
        if isinstance(step, str):
            if not isinstance(value, dict):
                raise BadRowError(index, path, "is not reachable", f" (got {type(value).__name__} before {step!r})")
            value = value.get(step)
        else:
            if not isinstance(value, (list, tuple)):
                raise BadRowError(index, path, "is not reachable", f" (got {type(value).__name__} before [{step}])")
            value = value[step] if -len(value) <= step < len(value) else None
    return value


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
    if not isinstance(flags, (list, tuple)) or len(flags) != len(solutions):
        raise BadRowError(index, str(cfg.solution_ok_column), "does not match the solution list")
    kept = [s for s, ok in zip(solutions, flags, strict=True) if ok is True]
    if not kept:
        raise BadRowError(index, str(cfg.solution_ok_column), "marks no solution correct")
    return kept


def validate_row(index: int, row: dict, cfg: DataConfig, with_solutions: bool = True,
                 ) -> tuple[str, str, list[str]]:
    """(problem, answer, solutions) of a row, or BadRowError naming the row and the field.
    ``with_solutions=False`` (held-out problems): no expert solution is read, ``solutions`` is []."""
    problem = _text(index, cfg.problem_column, resolve(index, row, cfg.problem_column))
    answer = resolve(index, row, cfg.answer_column)
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    answer = _text(index, cfg.answer_column, answer)
    if not with_solutions:
        return problem, answer, []
    raw = resolve(index, row, cfg.solution_column)
    values = list(raw) if isinstance(raw, (list, tuple)) else [raw]
    if not values:
        raise BadRowError(index, cfg.solution_column, "is an empty list")
    solutions = [_text(index, cfg.solution_column, v) for v in values]
    if cfg.solution_ok_column is not None:
        solutions = _keep_ok(index, solutions, resolve(index, row, cfg.solution_ok_column), cfg)
    second = resolve(index, row, cfg.second_solution_column) if cfg.second_solution_column else None
    if second is not None:
        solutions.append(_text(index, cfg.second_solution_column, second))
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
    if cfg.long_solution == "truncate" and cfg.max_solution_tokens is not None:
        solution_ids = [ids[:cfg.max_solution_tokens] for ids in solution_ids]
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


def build_examples(rows, cfg: DataConfig, prompt: PromptConfig, tokenizer, with_solutions: bool = True,
                   ) -> tuple[list[Example], LoadStats]:
    """Validate and tokenize ``rows`` (any iterable of dicts); skip or raise on bad rows per ``cfg``."""
    stats, examples = LoadStats(), []
    for index, row in enumerate(rows):
        stats.num_rows += 1
        try:
            fields = validate_row(index, row, cfg, with_solutions)
            examples.append(tokenize_row(index, *fields, cfg, prompt, tokenizer))
        except BadRowError as err:
            if cfg.on_bad_row == "error":
                raise
            stats.skip(err)
    stats.num_kept = len(examples)
    return examples, stats


def load_examples(cfg: DataConfig, prompt: PromptConfig, tokenizer, with_solutions: bool = True,
                  ) -> tuple[list[Example], LoadStats]:
    """Load, check columns, validate and tokenize: the training prompts of a run."""
    ds = load_rows(cfg)
    wanted = [cfg.problem_column, cfg.answer_column] + ([cfg.solution_column] if with_solutions else [])
    missing = [c for c in wanted if parse_path(c)[0] not in ds.column_names]
    if missing:
        raise ValueError(f"data.path {cfg.path!r} has no column(s) {missing} (data.format={cfg.format!r}); "
                         f"columns are {ds.column_names}")
    return build_examples(ds, cfg, prompt, tokenizer, with_solutions)


def check_load(stats: LoadStats, cfg: DataConfig) -> None:
    """Fail at start when nothing is usable or more rows were skipped than data.max_skipped_fraction."""
    if stats.num_kept == 0:
        raise ValueError(f"{cfg.path}: no usable rows ({stats.num_rows} rows, skipped {dict(stats.skipped)})")
    fraction = stats.num_skipped / max(stats.num_rows, 1)
    if fraction > cfg.max_skipped_fraction:
        raise ValueError(
            f"{cfg.path}: {stats.num_skipped} of {stats.num_rows} rows skipped ({fraction:.1%} > "
            f"data.max_skipped_fraction={cfg.max_skipped_fraction}); by reason: {dict(stats.skipped)}; "
            "each row is listed in the load report"
        )


def load_for_run(cfg: DataConfig, prompt: PromptConfig, tokenizer, report_path: Path | None = None,
                 with_solutions: bool = True) -> list[Example]:
    """A run's examples: loaded, the load report printed and written to ``report_path`` (None on the ranks
    that do not report), then checked against the skip ceiling."""
    examples, stats = load_examples(cfg, prompt, tokenizer, with_solutions)
    if report_path is not None:
        print(stats.summary(cfg.path), flush=True)
        report_path.parent.mkdir(parents=True, exist_ok=True)
        report_path.write_text(json.dumps(stats.report(cfg.path, cfg), indent=2))
    check_load(stats, cfg)
    return examples
