"""tools/gpu_check.py in its CPU smoke mode (small sizes), so the first-GPU check does not rot: every check
runs, writes its JSON line, and passes."""

import json
import os
import subprocess
import sys
from pathlib import Path

from trapo_megatron.testing import free_port

ROOT = Path(__file__).resolve().parents[1]
CHECKS = ["nccl_world1", "logits_demo_fp32", "logits_demo_bf16", "logits_150m_fp32", "logits_150m_bf16",
          "train_step_bf16", "weight_stream", "vocab_kernels", "checkpoint_round_trip"]


def test_gpu_check_cpu_smoke(tmp_path):
    env = {**os.environ, "MASTER_PORT": str(free_port()), "CUDA_VISIBLE_DEVICES": ""}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--device", "cpu",
                           "--out", str(tmp_path)], check=False, env=env, capture_output=True, text=True, timeout=280)
    rows = [json.loads(line) for line in (tmp_path / "gpu_check.jsonl").read_text().splitlines()]
    assert [r["name"] for r in rows] == CHECKS, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert [r["name"] for r in rows if not r["ok"]] == [], [r.get("error") for r in rows if not r["ok"]]
    assert proc.returncode == 0
    nccl = rows[0]
    # gloo on CPU; the suite's strict collectives make a host tensor on the world (a device group) raise
    assert nccl["backend"] == "gloo" and nccl["strict"] and nccl["host_tensor_on_device_group"].startswith("raised")
    stream, train = rows[6], rows[5]
    assert stream["tensors"] > 10 and train["master_shards_moved"] == train["master_shards"] > 0

