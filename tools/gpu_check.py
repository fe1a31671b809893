"""First-GPU check: the parts of the GPU path a CPU cannot prove, one JSON line per check into --out.

    python tools/gpu_check.py --device cuda --out gpu_check_out     # one GPU, < 8 min, no network
    python tools/gpu_check.py --device cpu --out /tmp/smoke          # small sizes (the suite runs this)

Needs only torch, transformers and megatron-core (no vLLM, no Transformer Engine: the local spec, mask
path). Checks (``name`` in each line; ``ok`` true or false; ``seconds``; numbers to read):
- ``nccl_world1``: a world of one on NCCL; a host tensor on that device group must raise (NCCL on a GPU,
  strict collectives on CPU), a device tensor reduces, host tensors go through platform.host_group().
- ``logits_demo_{fp32,bf16}``, ``logits_150m_{fp32,bf16}``: the demo model and a random ~150M Qwen2 built
  by our builder, loaded from HF, against transformers' logits on the device.
- ``train_step_bf16``: one step with Megatron DDP + the distributed optimizer: finite loss, every fp32 master
  shard moved (bf16 parameters need not: a step of 1e-3 on a weight of 1.0 rounds away), peak memory next to the planner's training estimate.
- ``weight_stream``: the live stream on the device equals the HF state dict it was loaded from.
- ``vocab_kernels``: the vocab-parallel log-prob/entropy kernel at T=4096, V=151,936 in bf16, forward +
  backward, against an fp32 reference, with time and peak memory.
- ``checkpoint_round_trip``: dist_checkpointing save then load into a fresh model: identical parameters.
Exit status 1 when any check failed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing the package

from trapo_megatron.megatron import platform

DEMO = ROOT / "trapo_megatron" / "assets" / "demo" / "model"
# (cuda, cpu) sizes: the cpu smoke only proves the code runs.
_SHAPE = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
          "vocab_size", "max_position_embeddings")
BIG = {"cuda": dict(zip(_SHAPE, (768, 2048, 8, 12, 2, 151_936, 4096))),  # ~150M parameters (tied)
       "cpu": dict(zip(_SHAPE, (64, 128, 2, 4, 2, 512, 256)))}
KERNEL = {"cuda": (4096, 151_936), "cpu": (64, 1000)}  # (T, V)
TOKENS = {"cuda": 2048, "cpu": 32}
# Max |megatron - transformers| over max |transformers| logits.
LOGIT_TOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2}


class Check:
    """Collects one JSON line per check; a failing check records its traceback and the run goes on."""

    def __init__(self, out: Path, device: str):
        self.out, self.device, self.failed = out, device, 0
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / "gpu_check.jsonl"
        self.path.write_text("")

    def run(self, name: str, fn: Callable[[], dict[str, Any]]) -> None:
        t0 = time.perf_counter()
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        try:
            row = {"name": name, **fn()}
        except Exception:  # noqa: BLE001 - every check runs; the cause is recorded
            row = {"name": name, "ok": False, "error": traceback.format_exc(limit=8)}
        row["seconds"] = round(time.perf_counter() - t0, 3)
        self.failed += not row["ok"]
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


def _dev() -> torch.device:
    return platform.device()


def _peak_mb() -> float:
    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0


def check_nccl() -> dict[str, Any]:
    import torch.distributed as dist

    backend = dist.get_backend()
    try:
        dist.all_reduce(torch.ones(1))
        host_on_device_group = "accepted"
    except (RuntimeError, ValueError) as err:
        host_on_device_group = f"raised: {type(err).__name__}"
    dev = platform.to_device(torch.ones(1))
    dist.all_reduce(dev)
    host = torch.ones(1)
    dist.all_reduce(host, group=platform.host_group())
    must_raise = backend == "nccl" or platform.strict_collectives()  # NCCL itself, or our strict mode on CPU
    ok = dev.item() == 1.0 and host.item() == 1.0 and (host_on_device_group.startswith("raised") or not must_raise)
    return {"ok": ok, "backend": backend, "strict": platform.strict_collectives(),
            "host_tensor_on_device_group": host_on_device_group}


def _hf_dir(config: dict[str, Any], tmp: Path) -> Path:
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Qwen2Config(**config, tie_word_embeddings=True))
    model.save_pretrained(tmp)
    return tmp


def _megatron(hf_dir: Path, dtype: str):
    from megatron.core import parallel_state as ps
    from transformers import AutoConfig

    from trapo_megatron.convert.model_io import load_hf_into_model
    from trapo_megatron.megatron import model_builder

    cfg = AutoConfig.from_pretrained(hf_dir)
    chunks = model_builder.build_model(cfg, platform.ParallelConfig(), dtype=dtype, transformer_impl="local")
    load_hf_into_model(chunks, hf_dir, tp_group=ps.get_tensor_model_parallel_group())
    return cfg, chunks


def _row(ids: torch.Tensor) -> dict[str, torch.Tensor]:
    from trapo_megatron.data.packing import block_causal_mask, pack_row

    mb = pack_row([ids])
    mb["mask"] = block_causal_mask(mb["cu_seqlens"], _dev())
    return {k: v.to(_dev()) for k, v in mb.items()}


def check_logits(hf_dir: Path, dtype: torch.dtype, num_tokens: int) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    name = {torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype]
    cfg, chunks = _megatron(hf_dir, name)
    ids = torch.randint(0, cfg.vocab_size, (num_tokens,), generator=torch.Generator().manual_seed(1))
    mb = _row(ids)
    with torch.no_grad():
        ours = chunks[0](mb["tokens"], mb["position_ids"], mb["mask"]).float()
        ref_model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype, attn_implementation="sdpa").to(_dev())
        ref = ref_model(mb["tokens"]).logits.float()
    rel = ((ours - ref).abs().max() / ref.abs().max()).item()
    return {"ok": rel < LOGIT_TOL[dtype], "max_rel_diff": rel, "tol": LOGIT_TOL[dtype], "tokens": num_tokens,
            "params_m": sum(p.numel() for p in chunks[0].parameters()) / 1e6, "peak_mb": _peak_mb()}


def check_train_step(hf_dir: Path, num_tokens: int, device: str) -> dict[str, Any]:
    from megatron.core import parallel_state as ps

    from trapo_megatron.megatron import step
    from trapo_megatron.megatron.vocab_parallel import vocab_parallel_logprobs
    from trapo_megatron.plan.memory import Layout, PlanConfig, stage_memory
    from trapo_megatron.plan.model import spec_from_hf_config

    dtype = "bfloat16" if device == "cuda" else "float32"  # megatron's bf16 modules need CUDA
    cfg, chunks = _megatron(hf_dir, dtype)
    ddp = step.wrap_ddp(chunks, use_distributed_optimizer=True)
    optimizer, scheduler = step.build_optimizer(ddp, step.OptimizerConfig(lr=1e-3), total_steps=1)
    before = {n: p.detach().float().clone() for n, p in ddp[0].module.named_parameters()}
    masters = _master_shards(optimizer)
    masters_before = [m.detach().clone() for m in masters]
    ids = torch.randint(0, cfg.vocab_size, (num_tokens,), generator=torch.Generator().manual_seed(2))
    from trapo_megatron.data.packing import pack_row

    mb = pack_row([ids])
    mb["labels"] = torch.cat([ids[1:], ids[:1]])

    def loss_fn(logits, batch):
        logp = vocab_parallel_logprobs(logits, batch["labels"], ps.get_tensor_model_parallel_group())
        loss = -logp.sum() / logp.numel()
        return loss, {"nll": loss.detach()}

    step.zero_grad(ddp, optimizer)
    out = step.forward_backward(ddp, [mb], loss_fn)
    loss = float(out[0]["loss"])
    applied, grad_norm, _ = step.optimizer_step(optimizer, scheduler, loss_finite=math.isfinite(loss))
    moved = sum(not torch.equal(before[n], p.detach().float()) for n, p in ddp[0].module.named_parameters())
    masters_moved = sum(not torch.equal(a, m.detach()) for a, m in zip(masters_before, masters, strict=True))
    plan = PlanConfig(num_gpus=1, gpus_per_node=1, precision="bf16" if device == "cuda" else "fp32",
                      seq_length=num_tokens, colocate_vllm=False, transformer_impl="local")
    planned = stage_memory(spec_from_hf_config(cfg.to_dict()), plan, Layout(tp=1, pp=1, dp=1), 0).train(False)
    peak = _peak_mb()
    # What an optimizer step changes is the fp32 master shards: a bf16 norm weight at 1.0 does not move by an
    # update of 1e-3 (bf16 has 8 bits of mantissa: 1.0 +- 1e-3 rounds back to 1.0), so the bf16 parameters are
    # reported (params_moved) but not required to move.
    return {"ok": bool(applied) and math.isfinite(loss) and masters_moved == len(masters) > 0,
            "dtype": dtype, "loss": loss, "grad_norm": grad_norm, "master_shards_moved": masters_moved,
            "master_shards": len(masters), "params_moved": moved, "params": len(before),
            "peak_mb": peak, "planned_mb": planned / 2**20, "peak_over_plan": peak / (planned / 2**20)}


def _master_shards(optimizer: Any) -> list[torch.Tensor]:
    """The fp32 tensors the optimizer updates: with megatron's distributed optimizer, its inner torch
    optimizer's params are this rank's fp32 master shards (views of the fp32 parameters when training in
    fp32), megatron/core/optimizer/distrib_optimizer.py in 0.19.2."""
    chained = getattr(optimizer, "chained_optimizers", [optimizer])
    return [p for opt in chained for group in opt.optimizer.param_groups for p in group["params"]]


def check_weight_stream(hf_dir: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    from trapo_megatron.convert.stream import iter_hf_weights

    cfg, chunks = _megatron(hf_dir, "float32")
    ref = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        ref.update(load_file(f))
    t0 = time.perf_counter()
    got = {n: t.cpu() for n, t in iter_hf_weights(chunks, cfg)}
    seconds = time.perf_counter() - t0
    want = {k: v for k, v in ref.items() if k != "lm_head.weight" or not cfg.tie_word_embeddings}
    bad = sorted(n for n in set(want) | set(got) if n not in got or n not in want or not torch.equal(got[n], want[n]))
    nbytes = sum(t.numel() * t.element_size() for t in got.values())
    return {"ok": not bad, "mismatched": bad[:10], "tensors": len(got), "gb_per_s": nbytes / 1e9 / seconds}


def check_vocab_kernels(num_tokens: int, vocab: int) -> dict[str, Any]:
    from trapo_megatron.megatron.vocab_parallel import vocab_parallel_logprobs_entropy

    g = torch.Generator(device=_dev()).manual_seed(3)
    base = torch.randn(num_tokens, vocab, device=_dev(), generator=g) * 4
    labels = torch.randint(0, vocab, (num_tokens,), device=_dev(), generator=g)
    logits = base.to(torch.bfloat16).requires_grad_()
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    start_mb = _peak_mb()
    t0 = time.perf_counter()
    logp, ent = vocab_parallel_logprobs_entropy(logits, labels)
    (logp.sum() + 0.01 * ent.sum()).backward()
    sync()
    seconds, peak = time.perf_counter() - t0, _peak_mb() - start_mb
    ref_in = logits.detach().float().requires_grad_()
    lsm = torch.log_softmax(ref_in, dim=-1)
    ref_logp = lsm.gather(1, labels[:, None]).squeeze(1)
    ref_ent = -(lsm.exp() * lsm).sum(-1)
    (ref_logp.sum() + 0.01 * ref_ent.sum()).backward()
    dlogp = (logp - ref_logp).abs().max().item()
    dent = (ent - ref_ent).abs().max().item()
    dgrad = (logits.grad.float() - ref_in.grad).abs().max().item()
    logits_mb = logits.numel() * logits.element_size() / 2**20
    return {"ok": dlogp < 1e-3 and dent < 1e-3 and dgrad < 1e-2, "tokens": num_tokens, "vocab": vocab,
            "max_logp_diff": dlogp, "max_entropy_diff": dent, "max_grad_diff": dgrad, "seconds_fwd_bwd": seconds,
            "peak_extra_mb": peak, "logits_mb": logits_mb}


def check_checkpoint(hf_dir: Path, tmp: Path) -> dict[str, Any]:
    from megatron.core import dist_checkpointing
    from transformers import AutoConfig

    from trapo_megatron.megatron import model_builder

    _, chunks = _megatron(hf_dir, "float32")
    tmp.mkdir(parents=True)
    with platform.cuda_literals_on_cpu():
        dist_checkpointing.save(chunks[0].sharded_state_dict(), str(tmp))
    fresh = model_builder.build_model(AutoConfig.from_pretrained(hf_dir), platform.ParallelConfig(),
                                      transformer_impl="local")
    with platform.cuda_literals_on_cpu():
        fresh[0].load_state_dict(dist_checkpointing.load(fresh[0].sharded_state_dict(), str(tmp)))
    bad = [n for (n, a), (_, b) in zip(chunks[0].named_parameters(), fresh[0].named_parameters())
           if not torch.equal(a, b)]
    return {"ok": not bad, "mismatched": bad[:10]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.jsonl")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here (use --device cpu for the smoke run)")
    if args.device == "cpu" and torch.cuda.is_available():
        parser.error("--device cpu on a CUDA machine: hide the GPUs (CUDA_VISIBLE_DEVICES=)")
    check = Check(args.out, args.device)
    platform.initialize(platform.ParallelConfig())
    tokens = TOKENS[args.device]
    with tempfile.TemporaryDirectory() as tmp:
        big = _hf_dir(BIG[args.device], Path(tmp) / "big")
        check.run("nccl_world1", check_nccl)
        for name, d in (("demo", DEMO), ("150m", big)):
            for dtype in (torch.float32, torch.bfloat16):
                tag = "fp32" if dtype is torch.float32 else "bf16"
                check.run(f"logits_{name}_{tag}", lambda d=d, dtype=dtype: check_logits(d, dtype, tokens))
        check.run("train_step_bf16", lambda: check_train_step(big, tokens, args.device))
        check.run("weight_stream", lambda: check_weight_stream(big))
        check.run("vocab_kernels", lambda: check_vocab_kernels(*KERNEL[args.device]))
        check.run("checkpoint_round_trip", lambda: check_checkpoint(big, Path(tmp) / "ckpt"))
    platform.destroy()
    print(f"gpu_check: {check.failed} failed; lines in {check.path}", flush=True)
    return 1 if check.failed else 0


if __name__ == "__main__":
    sys.exit(main())
