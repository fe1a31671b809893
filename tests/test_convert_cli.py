"""`trapo convert` as the CLI runs it: argument parsing, both directions, a clear one-line error."""

import argparse

import pytest
import torch
from _convert_helpers import hf_model, save_hf

from trapo_megatron.commands.convert import add_convert_arguments, parse_size, run_convert
from trapo_megatron.convert import hf_io


def _run(*argv):
    parser = argparse.ArgumentParser(prog="trapo convert")
    add_convert_arguments(parser)
    return run_convert(parser.parse_args([str(a) for a in argv]))


def test_both_directions_and_cast(tmp_path, capsys):
    src = save_hf(hf_model("llama", tied=False), tmp_path / "hf")
    assert _run("hf-to-mcore", src, tmp_path / "mcore") == 0
    assert _run("mcore-to-hf", tmp_path / "mcore", tmp_path / "out", "--dtype", "bfloat16",
                "--max-shard-size", "50KB", "--no-progress") == 0
    out = hf_io.HFSource(tmp_path / "out")
    ref = hf_io.HFSource(src)
    assert all(torch.equal(out.get(k), ref.get(k).bfloat16()) for k in ref.shapes())
    assert (tmp_path / "out" / hf_io.INDEX_NAME).is_file()
    assert "hf-to-mcore" in capsys.readouterr().err  # the progress bar


def test_user_errors_are_one_line_and_write_nothing(tmp_path, capsys):
    src = save_hf(hf_model("qwen2", tied=True), tmp_path / "hf")
    (src / "model.safetensors").rename(tmp_path / "elsewhere.safetensors")
    assert _run("hf-to-mcore", src, tmp_path / "mcore") == 2
    assert "error: no *.safetensors files" in capsys.readouterr().err
    assert not (tmp_path / "mcore").exists()


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2MiB") == 2 * 2**20 and parse_size("100") == 100
    with pytest.raises(argparse.ArgumentTypeError):
        parse_size("five")
