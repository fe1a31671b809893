"""Offline conversion: HF -> Megatron distributed checkpoint -> HF is byte-identical; the export loads with
``from_pretrained`` and generates; a config that does not match the weights fails and writes nothing."""

import json
import shutil

import pytest
import torch
from _convert_helpers import hf_model, input_ids, save_hf

from trapo_megatron.convert import hf_io
from trapo_megatron.convert.hf_to_mcore import convert_hf_to_mcore
from trapo_megatron.convert.mcore_to_hf import convert_mcore_to_hf


def _tensor_bytes(directory):
    source = hf_io.HFSource(directory)
    return {name: (source.get(name).dtype, source.get(name).contiguous().view(torch.uint8).flatten())
            for name in source.shapes()}


@pytest.mark.parametrize("family,tied,dtype", [("qwen2", False, torch.float32), ("llama", True, torch.bfloat16),
                                               ("qwen3", False, torch.float32)])
def test_round_trip_is_byte_identical_and_loads(tmp_path, family, tied, dtype):
    from transformers import AutoModelForCausalLM

    model = hf_model(family, tied).to(dtype)
    src = save_hf(model, tmp_path / "hf")
    ticks = []
    convert_hf_to_mcore(src, tmp_path / "mcore", progress=lambda n: lambda: ticks.append(n))
    assert ticks and len(ticks) == ticks[0]
    convert_mcore_to_hf(tmp_path / "mcore", tmp_path / "out", max_shard_bytes=100_000)  # several shards

    want, got = _tensor_bytes(src), _tensor_bytes(tmp_path / "out")
    assert want.keys() == got.keys()
    for name in want:
        assert want[name][0] == got[name][0], name
        assert torch.equal(want[name][1], got[name][1]), name
    index = json.loads((tmp_path / "out" / hf_io.INDEX_NAME).read_text())
    assert set(index["weight_map"]) == set(want) and len(set(index["weight_map"].values())) > 1
    for side in ("config.json", "generation_config.json", "tokenizer_config.json"):
        assert (tmp_path / "out" / side).read_bytes() == (src / side).read_bytes()

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=dtype).eval()
    reference = AutoModelForCausalLM.from_pretrained(src, dtype=dtype).eval()  # same load path, same buffers
    ids = input_ids(model.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, reference(ids).logits)
        out = loaded.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (ids.shape[0], ids.shape[1] + 4)


def _broken_config(src, dst, **change):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(change)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("change,match", [
    ({"num_hidden_layers": 3}, "12 unexpected"), ({"num_hidden_layers": 5}, "missing"),
    ({"vocab_size": 100}, "model.embed_tokens.weight: checkpoint"), ({"num_key_value_heads": 1}, "k_proj"),
    ({"tie_word_embeddings": True}, "lm_head.weight"),
])
def test_mismatched_config_fails_before_writing(tmp_path, change, match):
    src = save_hf(hf_model("qwen2", False), tmp_path / "hf")
    bad = _broken_config(src, tmp_path / "bad", **change)
    if "tie_word_embeddings" in change:  # a tied config tolerates lm_head; drop a tensor instead
        from safetensors.torch import load_file, save_file

        state = load_file(bad / "model.safetensors")
        state.pop("model.norm.weight")
        save_file(state, bad / "model.safetensors", metadata={"format": "pt"})
        match = "model.norm.weight"
    with pytest.raises(ValueError, match=match):
        convert_hf_to_mcore(bad, tmp_path / "mcore")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "hf"]  # nothing written, no temp dir


def test_mcore_to_hf_rejects_config_of_another_model(tmp_path):
    src = save_hf(hf_model("llama", False), tmp_path / "hf")
    convert_hf_to_mcore(src, tmp_path / "mcore")
    bad = _broken_config(src, tmp_path / "bad", intermediate_size=96)
    with pytest.raises(ValueError, match=r"decoder.layers.mlp.linear_fc1.weight: checkpoint \(4, 256, 64\)"):
        convert_mcore_to_hf(tmp_path / "mcore", tmp_path / "out", hf_config_dir=bad)
    assert not (tmp_path / "out").exists()
    with pytest.raises(FileExistsError, match="overwrite"):
        convert_hf_to_mcore(src, tmp_path / "mcore")
