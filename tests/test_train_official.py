"""The official TRAPO training file as shipped trains for 2 steps at TP=2 in the official mode (experts
extra_info.answer_list[0] and [1], held-out on the official MATH file) with the official update, data order,
prompt and reward knobs, with the load reports in the run
directory and a W&B offline run holding the same metric names as metrics.jsonl."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from official_layout import train_row, write_train, write_valid
from rollout_tiny import tiny_qwen2_config, tiny_tokenizer

from trapo_megatron.commands.demo import CONFIG
from trapo_megatron.testing import run_distributed

pytestmark = pytest.mark.timeout(900)


def _wandb_history(run_file: Path) -> list[dict]:
    """History rows of a .wandb file: its records are W&B's own protobuf Records in the LevelDB log framing
    (32 KiB blocks; 7-byte headers crc32/length/type; type 1 full, 2 first, 3 middle, 4 last) after a 7-byte
    ":W&B" header, which wandb 0.31 reads in its Go core only."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    rows, pos, chunk = [], 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7]) if left >= 7 else (0, 0)
        if left < 7 or (length == 0 and kind == 0):
            pos += left
            continue
        chunk += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(chunk)
            chunk = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def train_worker(rank: int, world: int, overrides: list[str]) -> dict:
    from trapo_megatron.train.config import load_config
    from trapo_megatron.trainer import train

    return train(load_config(str(CONFIG), overrides))


def test_official_training_file_trains_two_steps_at_tp2(tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    tok = tiny_tokenizer()
    tok.save_pretrained(model_dir)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_config(tiny_qwen2_config(len(tok))).save_pretrained(model_dir)
    train_file = write_train(tmp_path / "train.parquet", [train_row(i) for i in range(8)])
    valid = write_valid(tmp_path / "valid")
    out = tmp_path / "run"
    overrides = [
        f"run.output_dir={out}", "run.max_steps=2", "run.prompts_per_step=2", "run.progress=false",
        f"model.hf_path={model_dir}", f"data.path={train_file}", "data.format=verl", "data.expert_text=think",
        "data.max_prompt_tokens=128", "prompt.template=raw",
        # the official update, order and reward knobs of examples/trapo_official.yaml (16 sequences / 8 ranks)
        "loss.aggregation=fsdp_sum", "loss.reference_world_size=8", "loss.entropy_coef=0.001",
        "loss.entropy_mode=official", "optimizer.weight_decay=0.01", "optimizer.decay_all_parameters=true",
        "data.order=randperm", "data.order_seed=47", "data.max_solution_tokens=24", "data.long_solution=truncate",
        "rollout.reward_special_tokens=true",
        "micro_groups.mode=official", "micro_groups.sizes=[4,2,1,1]", "micro_groups.ratios=[0.0,0.25,0.5,1.0]",
        "micro_groups.thresholds=[-1,2,4,7]", "rollout.max_response_tokens=32",
        f"evaluation.path={valid['math']}", "evaluation.max_problems=2", "evaluation.max_new_tokens=8",
        "reward.num_workers=1", "checkpoint.save_every=0", "checkpoint.export_hf=false",
        "logging.loggers=[tensorboard,wandb]", "logging.wandb_mode=offline",
    ]
    run_distributed(train_worker, 2, overrides, timeout=700)

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        # an untrained model answers nothing right: MG2-MG4 are guided (MG4 by answer_list[1]: test_waves)
        assert r["guided_mg2"] == r["guided_mg3"] == r["guided_mg4"] == 1.0
        assert r["sft_tokens"] > 0 and r["grad_norm"] > 0
    report = json.loads((out / "data_report.json").read_text())
    assert (report["format"], report["num_rows"], report["num_kept"]) == ("verl", 8, 8)
    assert json.loads((out / "data_report_heldout.json").read_text())["num_kept"] == 2

    runs = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, runs
    history = _wandb_history(runs[0])
    assert [h["_step"] for h in history] == [0, 1, 2]
    for h, r in zip(history, rows, strict=True):
        assert {k for k in h if not k.startswith("_")} == set(r) - {"step"}
        assert all(h[k] == pytest.approx(r[k], rel=1e-5, abs=1e-6) for k in h if not k.startswith("_"))
