"""The shipped toy task of the CPU demo: 3-digit addition with column-step expert solutions.

A row is ``{"problem": "347+285=", "answer": "632", "solution": "7+5+0=12;4+8+1=13;3+2+1=06;\\boxed{632}"}``.
The prompt is the raw problem (template "plain"); the expert solution adds the columns from the units up,
one step per column written ``<digit of a>+<digit of b>+<carry in>=<carry out><sum digit>;`` and ends with
the sum in ``\\boxed{}``, which is what math-verify grades. The steps matter: a tiny model that has to
produce the sum in one shot rarely gets it right, and an expert prefix (the first columns) makes the rest
easier, which is the situation TRAPO's prefix guidance is built for.

The tokenizer is a tiny byte-level BPE in Qwen2's own format (NFC, Qwen2's pre-tokenizer regex, byte-level
mapping), trained from scratch with the ``tokenizers`` library on the task text. Its alphabet is printable
ASCII plus newline, so any such text round-trips; training learns only the merges the task text allows:
``;\\`` and ``boxed``. Digits are always single tokens, so decode(encode(x)) == x and
encode(prompt + solution) == encode(prompt) + encode(solution), which the trainer needs to cut expert
prefixes at token level. Every prompt is exactly 8 tokens. Being in Qwen2's format matters: in a qwen2
checkpoint, transformers' AutoTokenizer always rebuilds the tokenizer as ``Qwen2Tokenizer`` (BPE vocab and
merges from tokenizer.json, its own pre-tokenizer), which would silently change any other design.

Plain python (plus ``tokenizers``/``transformers`` for the tokenizer): no megatron, vllm or nemo_run.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TypedDict

EOS_TOKEN = "<|endoftext|>"
"""Id 0. End of sequence and padding (as in Qwen2): generation stops on it; the SFT target ends with it."""
ALPHABET = "\n" + "".join(chr(c) for c in range(32, 127))
"""Characters the tokenizer knows (printable ASCII and newline); the BPE has no unknown token."""

DEMO_ASSETS = Path(__file__).resolve().parents[1] / "assets" / "demo"
"""Shipped by tools/make_demo_assets.py: train.jsonl, heldout.jsonl, tokenizer/, model/ (a full HF checkpoint)."""

MIN_OPERAND = 100
MAX_OPERAND = 999
NUM_HELDOUT = 256


class ToyRow(TypedDict):
    """One jsonl row, e.g. ``{"problem": "347+285=", "answer": "632",
    "solution": "7+5+0=12;4+8+1=13;3+2+1=06;\\boxed{632}"}``."""

    problem: str
    answer: str
    solution: str


def problem_text(a: int, b: int) -> str:
    """The prompt: ``"347+285="``."""
    return f"{a}+{b}="


def operands(problem: str) -> tuple[int, int]:
    """The two operands of a :func:`problem_text` prompt: ``"347+285="`` -> (347, 285)."""
    a, b = problem.removesuffix("=").split("+")
    return int(a), int(b)


def expert_solution(a: int, b: int) -> str:
    """Column steps from the units up, then the boxed sum.

    347+285 -> ``7+5+0=12;4+8+1=13;3+2+1=06;\\boxed{632}``: each step is ``da+db+carry_in=`` followed by
    two digits, the carry out and the column's sum digit. The boxed sum has no leading zero.
    """
    if not (MIN_OPERAND <= a <= MAX_OPERAND and MIN_OPERAND <= b <= MAX_OPERAND):
        raise ValueError(f"operands must be in {MIN_OPERAND}..{MAX_OPERAND}, got {a}, {b}")
    steps, carry = [], 0
    for da, db in zip(reversed(str(a)), reversed(str(b))):
        total = int(da) + int(db) + carry
        steps.append(f"{da}+{db}+{carry}={total:02d};")
        carry = total // 10
    return "".join(steps) + "\\boxed{" + str(a + b) + "}"


def make_row(a: int, b: int) -> ToyRow:
    return ToyRow(problem=problem_text(a, b), answer=str(a + b), solution=expert_solution(a, b))


def expert_solution_swapped(a: int, b: int) -> str:
    """Style B of the two-style task: the same column steps with the two result digits swapped, the column's
    sum digit first and the carry out second.

    347+285 -> ``7+5+0=21;4+8+1=31;3+2+1=60;\\boxed{632}``. Alone it is as valid as style A (the carry in of
    each step is the second digit of the step before); blended token by token with style A (the first digit
    from one style, the second from the other) the carries go wrong and so does the boxed sum.
    """
    steps = expert_solution(a, b).split(";")
    swapped = [s[:-2] + s[-1] + s[-2] for s in steps[:-1]]  # "7+5+0=12" -> "7+5+0=21"
    return ";".join(swapped + steps[-1:])


def _draw_pairs(rng: random.Random, num: int, taken: set[tuple[int, int]]) -> list[tuple[int, int]]:
    """``num`` new operand pairs; a pair and its commuted twin both count as taken afterwards."""
    if num + len(taken) // 2 > (MAX_OPERAND - MIN_OPERAND + 1) ** 2 // 2:
        raise ValueError(f"cannot draw {num} distinct problems")
    pairs = []
    while len(pairs) < num:
        a, b = rng.randint(MIN_OPERAND, MAX_OPERAND), rng.randint(MIN_OPERAND, MAX_OPERAND)
        if (a, b) in taken:
            continue
        taken.update({(a, b), (b, a)})
        pairs.append((a, b))
    return pairs


def make_splits(
    num_train: int, num_heldout: int = NUM_HELDOUT, seed: int = 0
) -> tuple[list[ToyRow], list[ToyRow]]:
    """(train, held-out) rows, deterministic in ``seed``.

    The held-out problems are drawn first, so they do not change with ``num_train``. The splits are
    disjoint even up to commutation: if ``a+b=`` is held out, neither ``a+b=`` nor ``b+a=`` is in train;
    no problem repeats within a split either.
    """
    rng = random.Random(seed)
    taken: set[tuple[int, int]] = set()
    heldout = [make_row(a, b) for a, b in _draw_pairs(rng, num_heldout, taken)]
    train = [make_row(a, b) for a, b in _draw_pairs(rng, num_train, taken)]
    return train, heldout


def make_splits_two_styles(
    num_train: int, num_heldout: int = NUM_HELDOUT, seed: int = 0, swapped_fraction: float = 0.5
) -> tuple[list[ToyRow], list[ToyRow]]:
    """The two-style task: the same problems as ``make_splits`` (same seed, same operands); each train row's
    expert solution is style B (``expert_solution_swapped``) with probability ``swapped_fraction``, else
    style A (``expert_solution``), drawn from its own seeded stream. Held-out rows carry style A (they are
    graded on the answer alone)."""
    train, heldout = make_splits(num_train, num_heldout, seed)
    rng = random.Random(f"two-styles-{seed}")
    for row in train:
        if rng.random() < swapped_fraction:
            a, b = operands(row["problem"])
            row["solution"] = expert_solution_swapped(a, b)
    return train, heldout


def is_style_a(row: ToyRow) -> bool:
    """Whether ``row``'s solution is written in style A (carry first). A few rows read the same in both
    styles (every column's carry equals its sum digit, e.g. 5+6+0=11): they count as style A."""
    a, b = operands(row["problem"])
    return row["solution"] == expert_solution(a, b)


def write_jsonl(rows: Iterable[dict], path: str | Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def read_jsonl(path: str | Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def train_tokenizer(rows: Iterable[ToyRow], model_max_length: int = 128):
    """A byte-level BPE in Qwen2's format trained on problems + solutions; save it with ``save_pretrained``.

    Returns a ``transformers`` ``Qwen2Tokenizer``: ``<|endoftext|>`` (id 0) is EOS and PAD, no BOS is added,
    nothing is added around the text. Ids 1..96 are the alphabet in byte-level form (space is ``Ġ``,
    newline ``Ċ``), sorted; the learned merges follow.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX, Qwen2Tokenizer

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok = Tokenizer(
        models.BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False)
    )
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False), byte_level]
    )
    tok.decoder = decoders.ByteLevel()
    alphabet = sorted({byte_level.pre_tokenize_str(c)[0][0] for c in ALPHABET})
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=alphabet,
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator((row["problem"] + row["solution"] for row in rows), trainer=trainer)
    bpe = json.loads(tok.to_str())["model"]
    return Qwen2Tokenizer(
        vocab=bpe["vocab"],
        merges=[tuple(m) for m in bpe["merges"]],
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
