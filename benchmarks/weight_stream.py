"""Weight-stream and offline-conversion benchmark (CPU).

1. Live stream from a Megatron model (Qwen2-shaped, bf16) at TP=1 and TP=2 (spawned gloo workers):
   throughput of stream + copy into preallocated engine-side tensors (what an engine's load_weights does)
   as a fraction of the memcpy bandwidth measured in the same process; at TP=2 also against a raw
   all_gather of the same bytes (the collective bounds it on CPU). Peak extra RSS of the stream alone
   versus the bucket size (MALLOC_MMAP_THRESHOLD_ pinned so freed buffers leave the RSS at once).
2. Offline conversion of a Qwen2.5-1.5B-shaped random bf16 checkpoint: hf-to-mcore and mcore-to-hf, each
   timed against copying the same files (each timing ends with os.sync), with peak extra anonymous memory
   against the largest tensor group.

    python benchmarks/weight_stream.py [--layers 12] [--skip-convert] [--json out.json]
Targets: stream >= 50% of memcpy, peak extra <= one bucket, conversion <= 3x the copy.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Self

os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")  # inherited by the spawned workers

import torch

MB = 2**20
STREAM_MODEL = {  # Qwen2.5-0.5B widths
    "model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_attention_heads": 14,
    "num_key_value_heads": 2, "vocab_size": 151936, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True, "rope_parameters": {"rope_theta": 1e6, "rope_type": "default"},
    "hidden_act": "silu", "initializer_range": 0.02,
}
QWEN25_15B = {
    "model_type": "qwen2", "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
    "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True,
    "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "hidden_act": "silu", "torch_dtype": "bfloat16",
    "rope_parameters": {"rope_theta": 1e6, "rope_type": "default"}, "architectures": ["Qwen2ForCausalLM"],
}


class PeakRSS:
    """Samples this process's anonymous resident memory (RssAnon: heap and tensors, not the page cache of
    memory-mapped safetensors files) every millisecond; ``extra`` is the peak above the start."""

    def __enter__(self) -> Self:
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _rss(self) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no RssAnon in /proc/self/status")

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def extra(self) -> int:
        return self.peak - self.base


def memcpy_bandwidth(nbytes: int = 512 * MB, repeats: int = 7) -> float:
    """Best-of bytes/s of a single large tensor copy."""
    src, dst = torch.ones(nbytes, dtype=torch.uint8), torch.empty(nbytes, dtype=torch.uint8)
    dst.copy_(src)
    best = min(_timed(lambda: dst.copy_(src)) for _ in range(repeats))
    return nbytes / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _stream_worker(rank, world_size, cfg, bucket_sizes, repeats):
    from megatron.core import parallel_state as ps

    from trapo_megatron.convert.stream import iter_hf_buckets
    from trapo_megatron.megatron import model_builder, platform

    par = platform.ParallelConfig(tensor_model_parallel_size=world_size)
    platform.initialize(par)
    model = model_builder.build_model(cfg, par, dtype="bfloat16")
    groups = {"tp_group": ps.get_tensor_model_parallel_group(), "pp_group": ps.get_pipeline_model_parallel_group()}
    engine = {n: torch.empty_like(t).copy_(t) for n, t in
              ((n, t) for b in iter_hf_buckets(model, cfg, **groups) for n, t in b)}  # engine-side weights
    total = sum(t.nbytes for t in engine.values())
    out = {"hf_bytes": total, "memcpy_Bps": memcpy_bandwidth(), "buckets": {}}

    def consume(bucket_bytes):
        for bucket in iter_hf_buckets(model, cfg, bucket_bytes=bucket_bytes, **groups):
            for name, tensor in bucket:
                engine[name].copy_(tensor)

    def stream_only(bucket_bytes):
        for _ in iter_hf_buckets(model, cfg, bucket_bytes=bucket_bytes, **groups):
            pass

    for bucket_bytes in bucket_sizes:  # memory first: before the raw all_gather below allocates anything
        torch.distributed.barrier()
        with PeakRSS() as mem:
            stream_only(bucket_bytes)
        out["buckets"][bucket_bytes] = {"peak_extra": mem.extra}
    if world_size > 1:
        local = sum(p.nbytes for p in model[0].parameters())
        send = torch.ones(local, dtype=torch.uint8)
        recv = torch.empty(local * world_size, dtype=torch.uint8)
        torch.distributed.all_gather_into_tensor(recv, send)
        out["all_gather_Bps"] = recv.nbytes / min(
            _timed(lambda: torch.distributed.all_gather_into_tensor(recv, send)) for _ in range(repeats))
        del send, recv

    for bucket_bytes in bucket_sizes:
        end_to_end = min(_timed(lambda b=bucket_bytes: consume(b)) for _ in range(repeats))
        out["buckets"][bucket_bytes]["stream_copy_Bps"] = total / end_to_end
    platform.destroy()
    return out


def bench_stream(layers: int, bucket_sizes: list[int], repeats: int) -> dict:
    from trapo_megatron.testing import run_distributed

    cfg = SimpleNamespace(**STREAM_MODEL, num_hidden_layers=layers)
    return {f"tp{tp}": run_distributed(_stream_worker, tp, cfg, bucket_sizes, repeats, timeout=900)[0]
            for tp in (1, 2)}


def _random_hf_checkpoint(directory: Path) -> int:
    """A Qwen2.5-1.5B-shaped bf16 checkpoint written tensor by tensor; returns its bytes."""
    from trapo_megatron import model_spec
    from trapo_megatron.convert import hf_io, mapping

    dims = model_spec.from_hf_config(QWEN25_15B)
    shapes = mapping.hf_shapes(dims)
    writer = hf_io.SafetensorsWriter(directory, [(n, s, torch.bfloat16) for n, s in shapes.items()])
    gen = torch.Generator().manual_seed(0)
    for name, shape in shapes.items():
        writer.write(name, (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16))
    writer.close()
    (directory / "config.json").write_text(json.dumps(QWEN25_15B))
    return sum(torch.Size(s).numel() * 2 for s in shapes.values())


def bench_convert(workdir: Path, repeats: int) -> dict:
    from trapo_megatron.convert import hf_io
    from trapo_megatron.convert.hf_to_mcore import convert_hf_to_mcore
    from trapo_megatron.convert.mcore_to_hf import convert_mcore_to_hf

    hf_dir, mcore_dir, out_dir, copy_dir = (workdir / n for n in ("hf", "mcore", "out", "copy"))
    hf_dir.mkdir()
    nbytes = _random_hf_checkpoint(hf_dir)
    shutil.copytree(hf_dir, copy_dir)  # warm the page cache for every reader alike
    shutil.rmtree(copy_dir)
    # Every timing starts with clean page cache writeback and ends when the bytes are on disk (os.sync);
    # disk speed on a shared machine swings several-fold, so each is the best of ``repeats``, interleaved.
    times: dict[str, list[float]] = {"copy": [], "hf_to_mcore": [], "mcore_to_hf": []}
    for _ in range(repeats):
        for path in (copy_dir, mcore_dir, out_dir):
            shutil.rmtree(path, ignore_errors=True)
        os.sync()
        times["copy"].append(_timed(lambda: (shutil.copytree(hf_dir, copy_dir), os.sync())))
        shutil.rmtree(copy_dir)  # keep at most three copies of the model on disk (or in tmpfs)
        with PeakRSS() as mem_in:
            times["hf_to_mcore"].append(_timed(lambda: (convert_hf_to_mcore(hf_dir, mcore_dir), os.sync())))
        with PeakRSS() as mem_out:
            times["mcore_to_hf"].append(_timed(lambda: (convert_mcore_to_hf(mcore_dir, out_dir), os.sync())))
    copy_s, to_mcore_s, to_hf_s = (min(times[k]) for k in ("copy", "hf_to_mcore", "mcore_to_hf"))
    a, b = hf_io.HFSource(hf_dir), hf_io.HFSource(out_dir)
    for name in ("model.embed_tokens.weight", "model.layers.27.self_attn.k_proj.bias", "model.layers.5.mlp.up_proj.weight"):
        assert torch.equal(a.get(name), b.get(name)), name
    largest_group = 151936 * 1536 * 2  # the embedding (the largest QKV/fc1 group is smaller)
    return {"bytes": nbytes, "copy_s": copy_s, "hf_to_mcore_s": to_mcore_s, "mcore_to_hf_s": to_hf_s,
            "hf_to_mcore_peak_extra": mem_in.extra, "mcore_to_hf_peak_extra": mem_out.extra,
            "largest_group_bytes": largest_group, "all_times_s": times}


def report(results: dict) -> None:
    for tp, r in results.get("stream", {}).items():
        gather = f", raw all_gather {r['all_gather_Bps'] / 1e9:.2f} GB/s" if "all_gather_Bps" in r else ""
        print(f"[stream {tp}] {r['hf_bytes'] / 1e9:.2f} GB of HF tensors; memcpy {r['memcpy_Bps'] / 1e9:.2f} GB/s{gather}")
        for bucket, b in r["buckets"].items():
            frac = b["stream_copy_Bps"] / r["memcpy_Bps"]
            extra = f" = {b['stream_copy_Bps'] / r['all_gather_Bps']:.0%} of all_gather" if "all_gather_Bps" in r else ""
            print(f"  bucket {int(bucket) / MB:5.0f} MiB: stream+copy {b['stream_copy_Bps'] / 1e9:.2f} GB/s "
                  f"= {frac:.0%} of memcpy{extra}; peak extra RSS {b['peak_extra'] / MB:.0f} MiB "
                  f"({b['peak_extra'] / int(bucket):.2f} bucket)")
    if "convert" in results:
        c = results["convert"]
        print(f"[convert] {c['bytes'] / 1e9:.2f} GB: copy {c['copy_s']:.1f} s; hf-to-mcore {c['hf_to_mcore_s']:.1f} s "
              f"({c['hf_to_mcore_s'] / c['copy_s']:.1f}x), mcore-to-hf {c['mcore_to_hf_s']:.1f} s "
              f"({c['mcore_to_hf_s'] / c['copy_s']:.1f}x); peak extra RSS {c['hf_to_mcore_peak_extra'] / MB:.0f} / "
              f"{c['mcore_to_hf_peak_extra'] / MB:.0f} MiB vs largest group {c['largest_group_bytes'] / MB:.0f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=12, help="layers of the streamed model (Qwen2.5-0.5B widths)")
    parser.add_argument("--buckets", default="64,512,1024", help="bucket sizes in MiB")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-stream", action="store_true")
    parser.add_argument("--skip-convert", action="store_true")
    parser.add_argument("--workdir", default=None,
                        help="scratch directory for the conversion, needs 3x the model (e.g. /dev/shm to time "
                             "without the disk; default: the temp dir)")
    parser.add_argument("--json", default=None, help="also write the raw figures here")
    args = parser.parse_args()
    results: dict = {}
    if not args.skip_stream:
        results["stream"] = bench_stream(args.layers, [int(b) * MB for b in args.buckets.split(",")], args.repeats)
    if not args.skip_convert:
        workdir = Path(tempfile.mkdtemp(prefix="trapo-convert-bench-", dir=args.workdir))
        try:
            results["convert"] = bench_convert(workdir, args.repeats)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    report(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
