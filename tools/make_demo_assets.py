"""Regenerate the CPU demo's assets: data splits, tokenizer, tiny Qwen2 base model and its SFT warm-up.

    python tools/make_demo_assets.py                      # writes trapo_megatron/assets/demo/
    python tools/make_demo_assets.py --out /tmp/demo      # somewhere else
    python tools/make_demo_assets.py --task two_styles    # the second toy task: trapo_megatron/assets/two_styles/

Everything is seeded and runs on 2 CPU threads in well under a minute. Layout written under --out:
    train.jsonl, heldout.jsonl        rows {"problem", "answer", "solution"}
    tokenizer/                        the tokenizer alone (tokenizer.json, tokenizer_config.json)
    model/                            complete HF checkpoint: config, safetensors, generation config, tokenizer
    README.md                         how they were made and the measured base accuracy
The warm-up uses the first --num-warmup rows of train.jsonl; the held-out split is never trained on.

`--task two_styles` (the ablation's second task, docs/ablation.md): the same problems, but about half of the
train rows carry their expert solution in style B (toy_task.expert_solution_swapped: each column's two result
digits swapped), the rest in style A; the warm-up sees only the first --num-warmup style-A rows, so the base
model knows style A alone and expert prefixes come from both.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch

from trapo_megatron.data import toy_task

ASSETS = REPO / "trapo_megatron" / "assets"
TASKS = ("addition", "two_styles")
VOCAB_MULTIPLE = 16  # Megatron splits the vocabulary over TP ranks: keep it divisible


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=TASKS, default="addition",
                   help="addition: the demo's task; two_styles: expert solutions in two styles, warm-up on one")
    p.add_argument("--out", type=Path, default=None,
                   help="output directory (replaced; default trapo_megatron/assets/demo, or .../two_styles)")
    p.add_argument("--seed", type=int, default=0, help="seed for data, model init and warm-up order")
    p.add_argument("--num-train", type=int, default=4000, help="train rows")
    p.add_argument("--num-heldout", type=int, default=toy_task.NUM_HELDOUT, help="held-out rows")
    p.add_argument("--num-warmup", type=int, default=300, help="first train rows used for the SFT warm-up")
    p.add_argument(
        "--warmup-epochs", type=int, default=None,
        help="SFT warm-up epochs (0: ship the random init; default 10, 13 for two_styles, whose style-A rows "
             "need a few more to reach the demo's base accuracy)",
    )
    p.add_argument("--warmup-lr", type=float, default=1e-3, help="AdamW learning rate of the warm-up")
    p.add_argument("--warmup-batch", type=int, default=16, help="sequences per warm-up step")
    p.add_argument(
        "--max-new-tokens", type=int, default=40, help="generation budget of the greedy evaluation"
    )
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.warmup_epochs is None:
        args.warmup_epochs = 13 if args.task == "two_styles" else 10
    if args.out is None:
        args.out = ASSETS / ("demo" if args.task == "addition" else args.task)
    return args


def build_model(tokenizer, seed: int):
    """A 2-layer Qwen2 (hidden 128, 4 heads, 2 KV heads, tied embeddings) with a TP-divisible vocabulary."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    vocab_size = math.ceil(len(tokenizer) / VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    eos = tokenizer.eos_token_id
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_window_layers=2,
        max_position_embeddings=tokenizer.model_max_length,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True,
        bos_token_id=eos,  # as in Qwen2: no BOS is prepended, the id is <|endoftext|>
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config).float()


def sft_batches(tokenizer, rows, batch_size: int, generator: torch.Generator):
    """Yield (input_ids, labels) of teacher-forced prompt + solution + EOS; labels are -100 on the prompt.

    All prompts have 8 tokens; solutions differ by one token (3- or 4-digit sums), so pad to the longest
    with EOS and mask the padding out of the labels.
    """
    order = torch.randperm(len(rows), generator=generator).tolist()
    for start in range(0, len(order), batch_size):
        seqs, masks = [], []
        for i in order[start : start + batch_size]:
            prompt = tokenizer.encode(rows[i]["problem"])
            target = tokenizer.encode(rows[i]["solution"]) + [tokenizer.eos_token_id]
            seqs.append(prompt + target)
            masks.append([False] * len(prompt) + [True] * len(target))
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), tokenizer.pad_token_id)
        labels = torch.full((len(seqs), width), -100)
        for j, (s, m) in enumerate(zip(seqs, masks)):
            ids[j, : len(s)] = torch.tensor(s)
            labels[j, : len(s)] = torch.where(torch.tensor(m), torch.tensor(s), -100)
        yield ids, labels  # (B, T) each


def sft_warmup(model, tokenizer, rows, epochs: int, lr: float, batch_size: int, seed: int) -> list[float]:
    """Plain SFT on ``rows``; returns the mean token loss of each epoch."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for epoch in range(epochs):
        total, count = 0.0, 0
        for ids, labels in sft_batches(tokenizer, rows, batch_size, gen):
            loss = model(input_ids=ids, labels=labels).loss  # mean over unmasked target tokens
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            total, count = total + loss.item(), count + 1
        losses.append(total / count)
        print(f"  warm-up epoch {epoch + 1}/{epochs}: loss {losses[-1]:.4f}", flush=True)
    model.eval()
    return losses


@torch.no_grad()
def greedy_accuracy(model, tokenizer, rows, max_new_tokens: int) -> float:
    """Fraction of ``rows`` whose greedy completion math-verifies against the gold answer.

    All prompts have the same length, so the batch needs no padding.
    """
    from math_verify import parse, verify

    model.eval()
    ids = torch.tensor([tokenizer.encode(r["problem"]) for r in rows])  # (N, 8)
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    texts = tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
    correct = sum(verify(parse(r["answer"]), parse(t)) for r, t in zip(rows, texts))
    return correct / len(rows)


def num_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def write_readme(out: Path, args: argparse.Namespace, tokenizer, model, stats: dict) -> None:
    cfg = model.config
    merges = [
        t for t, i in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]) if len(t) > 1 and i > 0
    ]
    ex = next(r for r in toy_task.read_jsonl(out / "train.jsonl") if toy_task.is_style_a(r))  # the first row
    two = args.task == "two_styles"
    title = "Two-style toy task assets (the ablation's second task)" if two else "CPU demo assets"
    which = "style-A rows" if two else "rows"
    styles = f"""
Two styles (`--task two_styles`): {stats.get("num_style_b", 0)} of the {args.num_train} train rows carry their
expert solution in style B (`toy_task.expert_solution_swapped`: each column step writes its sum digit first
and the carry second, `7+5+0=21;`), the others in style A (`7+5+0=12;`). The warm-up below sees style A only,
so the base model knows one style; expert prefixes come from both. Alone each style is valid; a token-level
blend (one digit from each style) gets the carries, and so the sum, wrong. Held-out rows are graded on the
answer only. Example style-B row:

    {json.dumps(stats.get("example_b"))}
""" if two else ""
    text = f"""# {title}

Generated by `python tools/make_demo_assets.py{" --task two_styles" if two else ""}` (seed {args.seed}, \
{args.threads} torch threads); do not
edit by hand, re-run the script. Task, format and tokenizer are defined in `trapo_megatron/data/toy_task.py`.

## Task
3-digit addition `a+b=` with a, b in 100..999. The prompt is the raw problem (template "plain"); the expert
solution adds the columns from the units up (`digit+digit+carry_in=carry_out sum_digit;`) and boxes the sum;
the reward is math-verify on the response against `answer`. Example row:

    {json.dumps(ex)}
{styles}
- `train.jsonl`: {args.num_train} rows; `heldout.jsonl`: {args.num_heldout} rows. Splits are disjoint even up
  to commutation (a+b= held out means neither a+b= nor b+a= is in train); no problem repeats.
- Prompts are 8 tokens; solutions are 33 tokens (3-digit sum) or 34 (4-digit sum), plus EOS.

## Tokenizer (`tokenizer/`, also inside `model/`)
A tiny byte-level BPE in Qwen2's format (loads as `Qwen2Tokenizer`), trained from scratch with `tokenizers`
on the train rows: alphabet = printable ASCII + newline, merges learned from the task text only
({", ".join(f"`{t}`" for t in merges)}). Digits are single tokens, so decode(encode(x)) == x and a prompt +
solution concatenation tokenizes as prompt tokens followed by solution tokens. `<|endoftext|>` = 0 is EOS and
PAD; no BOS is added; there is no unknown token (characters outside the alphabet are dropped).
{len(tokenizer)} tokens. Example, one token per space:

    {" ".join(tokenizer.convert_ids_to_tokens(tokenizer.encode(ex["problem"] + ex["solution"])))}

## Model (`model/`)
- Qwen2ForCausalLM, float32, {sum(p.numel() for p in model.parameters()):,} parameters.
- {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, {cfg.num_attention_heads} heads, \
{cfg.num_key_value_heads} KV heads, intermediate {cfg.intermediate_size}, QKV bias, tied embeddings.
- rope theta {cfg.rope_parameters["rope_theta"]:g}, max positions {cfg.max_position_embeddings}.
- vocab {cfg.vocab_size}: the tokenizer's {len(tokenizer)} rounded up to a multiple of {VOCAB_MULTIPLE} for \
tensor parallelism; ids >= {len(tokenizer)} are never produced by the tokenizer and decode to nothing.
- bos = eos = pad = {tokenizer.eos_token_id}.

Warm-up: plain SFT (teacher forcing on prompt + solution + EOS, loss on solution + EOS tokens) on the
first {args.num_warmup} {which} of `train.jsonl`: {args.warmup_epochs} epochs, batch {args.warmup_batch}, \
AdamW lr {args.warmup_lr:g}, grad clip 1.0. Epoch losses: {", ".join(f"{x:.3f}" for x in stats["losses"])}.

Greedy held-out accuracy (math-verify, {args.max_new_tokens} new tokens, all {args.num_heldout} held-out rows):
- random init: {stats["acc_init"]:.3f}
- shipped base model: **{stats["acc_base"]:.3f}**

The policy starts weak but not hopeless: guided micro-groups have something to teach and unguided
rollouts some reward.
"""
    (out / "README.md").write_text(text)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    out: Path = args.out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)

    print(f"[1/5] data: {args.num_train} train + {args.num_heldout} held-out rows", flush=True)
    if args.task == "two_styles":
        train, heldout = toy_task.make_splits_two_styles(args.num_train, args.num_heldout, seed=args.seed)
        warmup_rows = [r for r in train if toy_task.is_style_a(r)][: args.num_warmup]  # style A only
    else:
        train, heldout = toy_task.make_splits(args.num_train, args.num_heldout, seed=args.seed)
        warmup_rows = train[: args.num_warmup]
    toy_task.write_jsonl(train, out / "train.jsonl")
    toy_task.write_jsonl(heldout, out / "heldout.jsonl")

    print("[2/5] tokenizer", flush=True)
    tokenizer = toy_task.train_tokenizer(train)
    tokenizer.save_pretrained(out / "tokenizer")
    print(f"  {len(tokenizer)} tokens", flush=True)

    print("[3/5] model", flush=True)
    model = build_model(tokenizer, args.seed)
    acc_init = greedy_accuracy(model, tokenizer, heldout, args.max_new_tokens)
    print(f"  random init: greedy held-out accuracy {acc_init:.3f}", flush=True)

    print(f"[4/5] SFT warm-up on {len(warmup_rows)} rows", flush=True)
    losses = sft_warmup(
        model,
        tokenizer,
        warmup_rows,
        args.warmup_epochs,
        args.warmup_lr,
        args.warmup_batch,
        args.seed,
    )
    acc_base = greedy_accuracy(model, tokenizer, heldout, args.max_new_tokens)
    print(f"  base model: greedy held-out accuracy {acc_base:.3f}", flush=True)

    print("[5/5] save", flush=True)
    model.generation_config.update(
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        max_new_tokens=args.max_new_tokens,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    stats = {"losses": losses, "acc_init": acc_init, "acc_base": acc_base}
    style_b = [r for r in train if not toy_task.is_style_a(r)]
    if args.task == "two_styles":
        stats.update(num_style_b=len(style_b), example_b=style_b[0])
    write_readme(out, args, tokenizer, model, stats)
    print(f"done in {time.perf_counter() - t0:.1f} s: {out} ({num_bytes(out) / 1e6:.2f} MB)", flush=True)


if __name__ == "__main__":
    main()
