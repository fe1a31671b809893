"""The official TRAPO/LUFFY file layouts, written by the tests with pyarrow (no download).

Schemas as the official files ship them (Su-my/TRAPO data/valid.*.parquet, read with pyarrow; the training
file is LUFFY's openr1 parquet from Elliott/Openr1-Math-46k-8192, data/prepare_train.py, plus the expert
list TRAPO reads in trapo_src/rl_dataset_with_target.py):

    data_source: string
    prompt: list<struct<content: string, role: string>>      # [system, user]; the problem is prompt[-1]
    target: list<struct<content: string, role: string>>      # train only: LUFFY's one expert trace
    ability: string                                          # "math"
    reward_model: struct<ground_truth: string, style: string>
    extra_info: struct<index: int64, split: string>          # train: + answer_list: list<string>
    __index_level_0__: int64                                 # valid only (a pandas index)

The six eval files hold the official row counts: AIME, AIME25 and AMC repeat each problem 32 times
(960 / 960 / 2,656 rows for 30 / 30 / 83 problems); MATH-500, Minerva and OlympiadBench one row per problem.
Problems here are synthetic "a+b" sums so a tiny model and the graders have something definite to work on.
"""

from __future__ import annotations

from pathlib import Path

# The system turn the official eval files carry (the official eval drops it: --remove_system True).
EVAL_SYSTEM = ("Your task is to follow a systematic, thorough reasoning process before providing the final "
               "solution. ... include the answer in \\boxed{} for closed-form results.")
TRAIN_SYSTEM = "You are a helpful assistant."

# name -> (problems, rows per problem, data_source)
VALID = {
    "aime": (30, 32, "aime"),
    "aime25": (30, 32, "aime25"),
    "amc": (83, 32, "amc"),
    "math": (500, 1, "math"),
    "minerva": (272, 1, "minerva"),
    "olympiad_bench": (675, 1, "olympiad_bench"),
}


def _schema(train: bool):
    import pyarrow as pa

    turn = pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))
    extra = [("index", pa.int64()), ("split", pa.string())] + ([("answer_list", pa.list_(pa.string()))]
                                                              if train else [])
    fields = [("data_source", pa.string()), ("prompt", turn)] + ([("target", turn)] if train else []) + [
        ("ability", pa.string()),
        ("reward_model", pa.struct([("ground_truth", pa.string()), ("style", pa.string())])),
        ("extra_info", pa.struct(extra)),
    ] + ([] if train else [("__index_level_0__", pa.int64())])
    return pa.schema(fields)


def problem(i: int) -> tuple[str, str]:
    a, b = 100 + 7 * i, 200 + 13 * i
    return f"Compute ${a}+{b}$.", str(a + b)


def expert(i: int, variant: int) -> str:
    """An R1-style trace: the thinking (the official expert text) and a final answer after it."""
    gold = problem(i)[1]
    how = ["Add the units, then the tens, then the hundreds.", "Round up, add, then take back the rounding."]
    return (f"<think>\nSolution {variant} of row {i}: {how[variant]}\n\nThe sum is {gold}.\n</think>\n\n"
            f"So the answer is $\\boxed{{{gold}}}$.")


def train_row(i: int) -> dict:
    q, gold = problem(i)
    return {
        "data_source": "openr1",
        "prompt": [{"content": TRAIN_SYSTEM, "role": "system"}, {"content": q, "role": "user"}],
        "target": [{"content": expert(i, 0), "role": "assistant"}],
        "ability": "math",
        "reward_model": {"ground_truth": gold, "style": "rule"},
        "extra_info": {"index": i, "split": "default", "answer_list": [expert(i, 0), expert(i, 1)]},
    }


def write_train(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows, schema=_schema(train=True)), path)
    return path


def valid_rows(name: str) -> list[dict]:
    num_problems, repeats, source = VALID[name]
    rows = []
    for i in range(num_problems):
        q, gold = problem(i)
        if name == "amc":
            gold = f"{gold}.0"  # the official AMC golds are float strings ("142.0")
        for _ in range(repeats):
            rows.append({
                "data_source": source,
                "prompt": [{"content": EVAL_SYSTEM, "role": "system"}, {"content": q, "role": "user"}],
                "ability": "math",
                "reward_model": {"ground_truth": gold, "style": "rule"},
                "extra_info": {"index": i, "split": "default"},  # repeats share the index, as shipped
                "__index_level_0__": i,
            })
    return rows


def write_valid(folder: Path) -> dict[str, Path]:
    """The six official eval files, valid.<name>.parquet, in ``folder``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in VALID:
        out[name] = folder / f"valid.{name}.parquet"
        pq.write_table(pa.Table.from_pylist(valid_rows(name), schema=_schema(train=False)), out[name])
    return out
