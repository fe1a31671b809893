"""Benchmark the fused output layer + TRAPO loss against the unfused path and against verl's own functions.

Three ways to get the TRAPO loss (log-prob + entropy + TrSFT + Dr.GRPO with clip and TIS) of T tokens from
the final hidden states [T, h] and the output weight [V/TP, h], forward + backward:
- fused: megatron/fused_output.py (logits never materialised);
- unfused: the output layer's GEMM writes the [T, V/TP] logits (as megatron's ColumnParallelLinear does),
  then the vocab-parallel kernels (today's training path);
- verl: the same GEMM, then verl 0.9.1's logprobs_from_logits / entropy_from_logits on the full logits
  (installed with its four small dependencies into a scratch directory this script makes; ``--no-verl``
  skips it). The TRAPO objective on top is ours for all three (verl has no TrSFT), so only the
  logits -> log-prob / entropy path differs.

The weight carries an fp32 ``main_grad`` as under Megatron DDP (grad_reduce_in_fp32, step.py), with DDP's
hook: a ``.grad`` the backward returns is added into it and dropped. The fused path's gradients-in-forward
mode sums straight into it, as megatron's gradient-accumulation fusion does.

It prints peak extra memory of forward + backward as a multiple of the unfused logits tensor, NOT counting
the hidden-state gradient every path returns (a transient weight ``.grad`` counts), and times as ratios to the
unfused path (wall, and process CPU time, which load from other processes disturbs less), all measured
in the same run, plus the largest relative disagreement of each path's loss and sums of prefix p and of
entropy with the unfused ones. TP=2 is simulated in one process: a rank's shapes (V/2 rows of the weight,
labels in that shard), without the [T]-sized all-reduces, which cost the same on every path.
Targets: fused memory <= 0.25x the logits, fused time <= 1.1x unfused.

    python benchmarks/fused_output.py                                  # scaled: T=1024, h=512 (2 shared cores)
    python benchmarks/fused_output.py --tokens 8192 --hidden 3584      # Qwen2.5-7B shapes (~30 GB, slow on CPU)
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loss_kernel import CFG, DTYPES, QWEN25_VOCAB, bytes_in_subprocess, peak_extra_bytes, time_runs

from trapo_megatron.algo.loss import trapo_loss_from_logprobs
from trapo_megatron.megatron.chunking import weight_grad_block_rows
from trapo_megatron.megatron.fused_output import fused_logprobs_entropy, fused_trapo_loss
from trapo_megatron.megatron.vocab_parallel import vocab_parallel_logprobs_entropy

VERL_PACKAGES = ("verl==0.9.1", "tensordict==0.10.0", "pyvers", "orjson", "codetiming")
"""Installed with --no-deps: verl's torch_functional and core_algos import no more than these."""


def _ddp_hook(param: torch.Tensor) -> None:
    """Megatron DDP's backward hook (distributed/distributed_data_parallel.py, overlap off): the .grad into
    main_grad, then dropped; it runs with no .grad when the backward returned none. Added block by block: on
    the CPU a mixed-dtype add first makes an fp32 copy of its whole input, which a GPU's add does not."""
    if param.grad is not None:
        rows = weight_grad_block_rows(*param.shape)
        for r in range(0, param.shape[0], rows):
            param.main_grad[r : r + rows].add_(param.grad[r : r + rows])
    param.grad = None


def make_inputs(tokens: int, hidden: int, vocab_local: int, dtype: torch.dtype, seed: int = 0,
                main_grad: bool = True):
    """Hidden states and weight (leaves; the weight with DDP's fp32 main_grad and hook unless ``main_grad`` is
    False), and a TokenBatch: 10% prompt, 30% expert prefix, 60% own tokens."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, hidden, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(vocab_local, hidden, generator=g) * 2 / hidden**0.5).to(dtype).requires_grad_()
    if main_grad:
        w.main_grad = torch.zeros(w.shape, dtype=torch.promote_types(dtype, torch.float32))
        w.register_post_accumulate_grad_hook(_ddp_hook)
    pos = torch.arange(tokens)
    sft, rl = (pos >= tokens // 10) & (pos < 4 * tokens // 10), pos >= 4 * tokens // 10
    base = -torch.rand(tokens, generator=g) * 5 - 8
    batch = {
        "labels": torch.randint(0, vocab_local, (tokens,), generator=g),
        "sft_mask": sft, "rl_mask": rl, "advantages": torch.randn(tokens, generator=g),
        "token_weight": (sft | rl).float() / tokens,
        "old_logprobs": base + 0.1 * torch.randn(tokens, generator=g),
        "rollout_logprobs": base + 0.1 * torch.randn(tokens, generator=g),
    }
    return h, w, batch


def fused(h, w, batch):
    """Gradients in forward (loss.fused_output_grads="forward"), the weight's summed into its main_grad."""
    loss, metrics = fused_trapo_loss(h, w, batch, CFG)
    return loss, metrics["prefix_p_sum"], metrics["entropy_sum"]


def recompute(h, w, batch):
    """Statistics only in forward, logits recomputed in backward (loss.fused_output_grads="recompute")."""
    logp, entropy = fused_logprobs_entropy(h, w, batch["labels"], None, CFG.temperature, CFG.chunk_tokens)
    loss, metrics = trapo_loss_from_logprobs(logp, entropy, batch, CFG)
    return loss, metrics["prefix_p_sum"], metrics["entropy_sum"]


def unfused(h, w, batch):
    """What trapo_loss does with the logits of megatron's output layer (tensor_parallel/layers.py: one GEMM
    in the model dtype, TP=1 or one rank)."""
    logits = torch.matmul(h, w.t())
    logp, entropy = vocab_parallel_logprobs_entropy(logits, batch["labels"], None, CFG.temperature,
                                                    CFG.chunk_tokens)
    loss, metrics = trapo_loss_from_logprobs(logp, entropy, batch, CFG)
    return loss, metrics["prefix_p_sum"], metrics["entropy_sum"]


def verl(h, w, batch):
    from verl.utils.torch_functional import entropy_from_logits, logprobs_from_logits

    logits = torch.matmul(h, w.t()).div_(CFG.temperature)  # in place, as verl's actors do
    logp = logprobs_from_logits(logits, batch["labels"]).float()
    entropy = entropy_from_logits(logits).float()
    loss, metrics = trapo_loss_from_logprobs(logp, entropy, batch, CFG)
    return loss, metrics["prefix_p_sum"], metrics["entropy_sum"]


VARIANTS = {"fused": fused, "recompute": recompute, "unfused": unfused, "verl": verl}


def runner(fn, h, w, batch):
    def run():  # main_grad keeps summing, as over a step's micro-batches (megatron zeroes it once a step)
        h.grad = w.grad = None
        fn(h, w, batch)[0].backward()

    return run


def clear_grads(h, w) -> None:
    h.grad = w.grad = None
    if hasattr(w, "main_grad"):
        w.main_grad.zero_()


def grads_bytes(h) -> int:
    """The hidden-state gradient every path returns."""
    return h.numel() * h.element_size()


def ensure_verl(scratch: Path) -> None:
    """verl and its few needed packages in ``scratch`` (installed once), importable from this process."""
    if not (scratch / "verl").is_dir():
        uv = os.environ.get("UV") or shutil.which("uv")
        if uv is None:
            raise SystemExit("benchmarks/fused_output.py: no uv to install verl with: put uv on PATH or set UV= "
                             "to it (the Makefile's UV), or pass --no-verl")
        subprocess.run([uv, "pip", "install", "--python", sys.executable, "--target", str(scratch), "--no-deps",
                        "--quiet", *VERL_PACKAGES], check=True)
    sys.path.insert(0, str(scratch))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(scratch), os.environ.get("PYTHONPATH", "")])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=QWEN25_VOCAB)
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2], help="simulated TP sizes (V/TP per rank)")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--no-verl", action="store_true")
    parser.add_argument("--verl-dir", type=Path, default=Path(tempfile.gettempdir()) / "trapo-bench-verl")
    parser.add_argument("--measure-memory", nargs=2, metavar=("VARIANT", "VOCAB_LOCAL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    variants = {k: v for k, v in VARIANTS.items() if not (args.no_verl and k == "verl")}
    if not args.no_verl:
        ensure_verl(args.verl_dir)
    dtype = DTYPES[args.dtype]
    if args.measure_memory:
        name, vocab_local = args.measure_memory[0], int(args.measure_memory[1])
        h, w, batch = make_inputs(args.tokens, args.hidden, vocab_local, dtype)
        run = runner(VARIANTS[name], h, w, batch)
        print(peak_extra_bytes(run, functools.partial(clear_grads, h, w), "cpu") - grads_bytes(h))
        return

    print(f"TRAPO loss from hidden states, T={args.tokens}, h={args.hidden}, V={args.vocab}, {args.dtype}, cpu, "
          f"threads={args.threads}, median of {args.repeats}; memory = peak extra bytes (less the returned "
          "hidden-state grad; the weight's goes to an fp32 main_grad) / unfused logits bytes; time / unfused; max relative diff to unfused of the loss, the sums of prefix p and of entropy")
    print(f"{'TP':>2} {'V/TP':>6} {'logits GiB':>10} " + " ".join(f"{'mem ' + v:>12}" for v in variants)
          + " " + " ".join(f"{'time ' + v:>12}" for v in variants) + " " + " ".join(f"{'cpu ' + v:>11}" for v in variants)
          + f" {'unfused s':>9}  diffs")
    for tp in args.tp:
        vocab_local = args.vocab // tp
        common = ["--tokens", str(args.tokens), "--hidden", str(args.hidden), "--dtype", args.dtype,
                  "--threads", str(args.threads), "--verl-dir", str(args.verl_dir)] + (["--no-verl"] if args.no_verl else [])
        mem = {v: bytes_in_subprocess(__file__, [*common, "--measure-memory", v, str(vocab_local)]) for v in variants}
        h, w, batch = make_inputs(args.tokens, args.hidden, vocab_local, dtype)
        logits_bytes = args.tokens * vocab_local * h.element_size()
        t = time_runs({v: runner(fn, h, w, batch) for v, fn in variants.items()}, args.repeats, "cpu")
        with torch.no_grad():
            values = {v: fn(h, w, batch) for v, fn in variants.items()}
        diffs = {v: max(float((a.float() - b.float()).abs().max() / b.float().abs().max())
                        for a, b in zip(values[v], values["unfused"], strict=True))
                 for v in variants if v != "unfused"}
        print(f"{tp:>2} {vocab_local:>6} {logits_bytes / 2**30:>10.2f} "
              + " ".join(f"{mem[v] / logits_bytes:>11.3f}x" for v in variants) + " "
              + " ".join(f"{t[v][0] / t['unfused'][0]:>11.3f}x" for v in variants) + " "
              + " ".join(f"{t[v][1] / t['unfused'][1]:>10.3f}x" for v in variants)
              + f" {t['unfused'][0]:>8.2f}s  " + ", ".join(f"{v} {d:.1e}" for v, d in diffs.items()), flush=True)
        del h, w, batch, values
    print("targets: fused memory <= 0.25x logits; fused / unfused time <= 1.1x")


if __name__ == "__main__":
    main()
