"""Eval generation through the rollout protocol on the CPU twin: k responses per problem, independent of
batching."""

from __future__ import annotations

import pytest

from trapo_megatron.eval.benchmarks import SAMPLE_DIR, load_benchmark

CHARS = list("0123456789+-*/=?.,:;()[]{}$\\^_ abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def _tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<unk>", *CHARS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")


@pytest.mark.timeout(120)
def test_cpu_twin_generates_k_batch_independent_responses() -> None:
    import torch
    from transformers import Qwen2Config

    from trapo_megatron.data.prompts import PromptConfig
    from trapo_megatron.eval.generate import generate_responses
    from trapo_megatron.rollout.cpu_engine import CpuEngine
    from trapo_megatron.rollout.engine import SamplingParams

    tokenizer = _tokenizer()
    torch.manual_seed(0)
    cfg = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=len(tokenizer), max_position_embeddings=256)
    engine = CpuEngine(cfg)
    items = load_benchmark(SAMPLE_DIR / "aime.jsonl", "aime")
    kwargs = {"n": 3, "sampling": SamplingParams(temperature=1.0, max_tokens=6, seed=7),
                  "prompt": PromptConfig(template="plain")}
    one = generate_responses(engine, tokenizer, items, batch_size=1, **kwargs)
    many = generate_responses(engine, tokenizer, items, **kwargs)  # one engine call
    assert set(one) == {("aime", it.id) for it in items}
    assert all(len(v) == 3 for v in one.values())
    assert one == many
    assert len({r for v in one.values() for r in v}) > 1  # different seeds, different samples


@pytest.mark.timeout(180)
def test_eval_cli_generates_with_a_saved_model(tmp_path) -> None:
    """`trapo eval --model DIR` end to end on the CPU twin: load, generate, grade, report, save."""
    import json

    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from trapo_megatron.commands import eval as eval_command
    from trapo_megatron.eval.report import read_responses

    tokenizer = _tokenizer()
    torch.manual_seed(0)
    cfg = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=len(tokenizer), max_position_embeddings=256,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model_dir = tmp_path / "model"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    report, saved = tmp_path / "report.json", tmp_path / "responses.jsonl"
    code = eval_command.main(["--model", str(model_dir), "--data", f"aime:{SAMPLE_DIR / 'aime.jsonl'}",
                              "--limit", "2", "--k", "2", "--max-tokens", "4", "--prompt-template", "plain",
                              "--grader-workers", "1", "--report", str(report),
                              "--save-responses", str(saved)])
    assert code == 0
    bench = json.loads(report.read_text())["benchmarks"][0]
    assert (bench["benchmark"], bench["num_problems"], bench["k"]) == ("aime", 2, 2)
    assert bench["avg_at_k"] == 0.0  # four random tokens do not box the right integer
    responses = read_responses(saved)
    assert len(responses) == 2 and all(len(v) == 2 for v in responses.values())
