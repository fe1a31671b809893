"""Benchmark the full TRAPO loss (log-prob + entropy + TrSFT + GRPO) against a naive full log_softmax.

For Qwen2.5's vocabulary (151,936) and a few thousand tokens it prints, per logits dtype:
- peak EXTRA memory of forward + backward as a multiple of the logits tensor (the logits gradient, one
  logits-sized buffer that autograd must produce, is included). Target: <= 1.25x for the fused kernel.
- time of forward + backward, and the ratio fused / naive measured in the same run. Target: <= 1.0.

The naive version is what most RL codebases do: ``log_softmax(logits.float() / T)`` over the full
vocabulary, then gather and ``-(exp(l) * l).sum()``, with the same per-token TRAPO loss on top (the shared
:func:`trapo_loss_from_logprobs`), so only the log-prob/entropy computation differs.

Memory on CPU is the peak resident set (``VmHWM`` after resetting it through ``/proc/self/clear_refs``)
minus the resident set before the call (least of two calls after a warm-up), each variant in a fresh process
with a fixed 1 MiB mmap threshold so no allocator cache hides a peak; on CUDA it is
``torch.cuda.max_memory_allocated`` minus the memory allocated before the call.

    python benchmarks/loss_kernel.py                       # fp32 and bf16 logits, 2048 tokens
    python benchmarks/loss_kernel.py --tokens 4096 --dtypes bf16 --device cuda
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch

from trapo_megatron.algo.loss import LossConfig, trapo_loss, trapo_loss_from_logprobs

QWEN25_VOCAB = 151_936
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CFG = LossConfig(entropy_coef=0.001, tis_cap=2.0)  # TrSFT alpha 0.1, clip 0.2/0.2, entropy bonus, TIS


def make_inputs(num_tokens: int, vocab: int, dtype: torch.dtype, device: str, seed: int = 0):
    """Logits [T, V] (leaf, requires grad) and a TokenBatch: 10% prompt, 30% expert prefix, 60% own tokens."""
    g = torch.Generator(device=device).manual_seed(seed)
    logits = (2 * torch.randn(num_tokens, vocab, generator=g, device=device)).to(dtype).requires_grad_()
    pos = torch.arange(num_tokens, device=device)
    sft = (pos >= num_tokens // 10) & (pos < 4 * num_tokens // 10)
    rl = pos >= 4 * num_tokens // 10
    noise = lambda: 0.1 * torch.randn(num_tokens, generator=g, device=device)
    base = -torch.rand(num_tokens, generator=g, device=device) * 5 - 8
    batch = {
        "labels": torch.randint(0, vocab, (num_tokens,), generator=g, device=device),
        "sft_mask": sft,
        "rl_mask": rl,
        "advantages": torch.randn(num_tokens, generator=g, device=device),
        "token_weight": (sft | rl).float() / (8192 * 8),
        "old_logprobs": base + noise(),
        "rollout_logprobs": base + noise(),
    }
    return logits, batch


def fused_loss(logits, batch):
    return trapo_loss(logits, batch, CFG)[0]


def naive_loss(logits, batch):
    logsm = torch.log_softmax(logits.float() / CFG.temperature, dim=-1)  # [T, V] fp32
    logp = logsm.gather(1, batch["labels"].unsqueeze(-1)).squeeze(-1)
    entropy = -(logsm.exp() * logsm).sum(-1)
    return trapo_loss_from_logprobs(logp, entropy, batch, CFG)[0]


VARIANTS = {"fused": fused_loss, "naive": naive_loss}


def step(fn, logits, batch) -> None:
    logits.grad = None
    fn(logits, batch).backward()


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def peak_extra_bytes(run, reset, device: str) -> float:
    """Peak extra bytes of ``run()`` (one forward + backward), in THIS process (call it in a fresh one): the
    least of two measured calls after a warm-up call of the same size, so that library pages faulted in on
    first use and pages evicted by other processes do not count. ``reset()`` drops the previous call's
    gradients before each measurement, so the new ones count."""
    run()  # warm-up at full size
    peaks = []
    for _ in range(2):
        reset()
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            run()
            torch.cuda.synchronize()
            peaks.append(float(torch.cuda.max_memory_allocated() - before))
            continue
        before = _status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak resident set (VmHWM) to the current one
        run()
        peaks.append(float(_status_kib("VmHWM") - before) * 1024)
    return min(peaks)


def measure_memory(variant: str, num_tokens: int, vocab: int, dtype: str, device: str) -> float:
    fn = VARIANTS[variant]
    logits, batch = make_inputs(num_tokens, vocab, DTYPES[dtype], device)
    return peak_extra_bytes(lambda: step(fn, logits, batch), lambda: setattr(logits, "grad", None), device)


def bytes_in_subprocess(script: str, args: list[str]) -> float:
    """The last line ``script`` prints with ``args``, in a fresh interpreter. glibc's adaptive mmap threshold
    is pinned at 1 MiB there, so every freed buffer goes back to the system instead of hiding in the heap as
    resident memory."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(1 << 20))
    out = subprocess.run([sys.executable, script, *args], check=True, capture_output=True, text=True,
                         env=env).stdout
    return float(out.strip().splitlines()[-1])


def memory_in_subprocess(variant: str, args, dtype: str) -> float:
    """:func:`measure_memory` in a fresh interpreter (:func:`bytes_in_subprocess`)."""
    return bytes_in_subprocess(__file__, [
        "--measure-memory", variant, "--tokens", str(args.tokens), "--vocab", str(args.vocab), "--dtypes", dtype,
        "--device", args.device, "--threads", str(args.threads),
    ])


def time_runs(runs: dict, repeats: int, device: str) -> dict[str, tuple[float, float]]:
    """Median (wall seconds, process CPU seconds) of each ``run()`` (forward + backward), after one warm-up
    call; the runs alternate so that load from other processes hits all alike."""
    samples: dict[str, list[tuple[float, float]]] = {v: [] for v in runs}
    for i in range(repeats + 1):
        for name, run in runs.items():
            if device == "cuda":
                torch.cuda.synchronize()
            wall, cpu = time.perf_counter(), time.process_time()
            run()
            if device == "cuda":
                torch.cuda.synchronize()
            if i:
                samples[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    return {
        v: (statistics.median(w for w, _ in s), statistics.median(c for _, c in s))
        for v, s in samples.items()
    }


def time_variants(logits, batch, repeats: int, device: str) -> dict[str, tuple[float, float]]:
    return time_runs({name: (lambda fn=fn: step(fn, logits, batch)) for name, fn in VARIANTS.items()}, repeats,
                     device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=QWEN25_VOCAB)
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--measure-memory", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.measure_memory:
        print(measure_memory(args.measure_memory, args.tokens, args.vocab, args.dtypes[0], args.device))
        return

    print(
        f"TRAPO loss (log-prob + entropy + TrSFT + GRPO, clip, TIS), T={args.tokens}, V={args.vocab}, "
        f"device={args.device}, threads={args.threads}, median of {args.repeats}; memory = peak extra "
        "bytes / logits bytes; time = fused / naive (wall, and process CPU time, which load from other "
        "processes disturbs less)"
    )
    print(
        f"{'dtype':>5} {'GiB':>5} {'mem fused':>9} {'mem naive':>9} {'wall fused':>10} {'wall naive':>10}"
        f" {'wall ratio':>10} {'cpu ratio':>9}"
    )
    for dtype in args.dtypes:
        mem = {v: memory_in_subprocess(v, args, dtype) for v in VARIANTS}
        logits, batch = make_inputs(args.tokens, args.vocab, DTYPES[dtype], args.device)
        nbytes = logits.numel() * logits.element_size()
        t = time_variants(logits, batch, args.repeats, args.device)
        print(
            f"{dtype:>5} {nbytes / 2**30:>5.2f} {mem['fused'] / nbytes:>8.3f}x {mem['naive'] / nbytes:>8.3f}x"
            f" {t['fused'][0]:>9.2f}s {t['naive'][0]:>9.2f}s {t['fused'][0] / t['naive'][0]:>9.3f}x"
            f" {t['fused'][1] / t['naive'][1]:>8.3f}x",
            flush=True,
        )
        del logits, batch
    print("targets: fused memory <= 1.25x logits; fused / naive time <= 1.0")


if __name__ == "__main__":
    main()
