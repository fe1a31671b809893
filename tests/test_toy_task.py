"""The shipped toy task and demo assets: deterministic data, disjoint splits, gradable solutions, an exact
tokenizer and a loadable, TP-friendly base model."""

import re

import pytest

from trapo_megatron.data import toy_task

ASSETS = toy_task.DEMO_ASSETS
STEP = re.compile(r"(\d)\+(\d)\+([01])=(\d)(\d);")


@pytest.fixture(scope="module")
def splits():
    return list(toy_task.read_jsonl(ASSETS / "train.jsonl")), list(
        toy_task.read_jsonl(ASSETS / "heldout.jsonl")
    )


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ASSETS / "model", local_files_only=True)


def _operands(problem: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d{3})\+(\d{3})=", problem)
    assert m, problem
    return int(m.group(1)), int(m.group(2))


def test_expert_solution_format():
    assert toy_task.make_row(347, 285) == {
        "problem": "347+285=",
        "answer": "632",
        "solution": "7+5+0=12;4+8+1=13;3+2+1=06;\\boxed{632}",
    }
    assert toy_task.expert_solution(999, 999) == "9+9+0=18;9+9+1=19;9+9+1=19;\\boxed{1998}"
    with pytest.raises(ValueError, match="operands"):
        toy_task.expert_solution(99, 100)


def test_generator_is_deterministic_and_disjoint():
    a = toy_task.make_splits(300, 64, seed=3)
    assert a == toy_task.make_splits(300, 64, seed=3)
    assert a != toy_task.make_splits(300, 64, seed=4)
    # Held-out is drawn first: it does not depend on how many train rows are asked for.
    assert toy_task.make_splits(10, 64, seed=3)[1] == a[1]


def test_shipped_splits_match_the_generator_and_are_disjoint(splits):
    train, heldout = splits
    assert len(heldout) == toy_task.NUM_HELDOUT
    regenerated = toy_task.make_splits(len(train), len(heldout), seed=0)
    assert (train, heldout) == (regenerated[0], regenerated[1])
    train_pairs = {_operands(r["problem"]) for r in train}
    held_pairs = {_operands(r["problem"]) for r in heldout}
    assert len(train_pairs) == len(train) and len(held_pairs) == len(heldout)
    assert not train_pairs & (held_pairs | {(b, a) for a, b in held_pairs})


def test_every_solution_computes_a_plus_b(splits):
    for row in splits[0] + splits[1]:
        a, b = _operands(row["problem"])
        assert row["answer"] == str(a + b)
        steps, boxed = row["solution"].split("\\boxed{")
        assert boxed == f"{a + b}}}"
        cols = STEP.findall(steps)
        assert "".join(map("".join, cols)) and len(cols) == 3 and STEP.sub("", steps) == ""
        carry = 0
        for (da, db, cin, cout, digit), (xa, xb) in zip(cols, zip(str(a)[::-1], str(b)[::-1])):
            assert (da, db, int(cin)) == (xa, xb, carry)
            total = int(da) + int(db) + carry
            assert (int(cout), int(digit)) == divmod(total, 10)
            carry = total // 10


def test_math_verify_grades_solutions(splits):
    from math_verify import parse, verify

    for row in splits[1][:16]:
        gold = parse(row["answer"])
        assert verify(gold, parse(row["solution"]))
        wrong = row["solution"].replace(f"{{{row['answer']}}}", f"{{{int(row['answer']) + 1}}}")
        assert not verify(gold, parse(wrong))


def test_tokenizer_round_trips_and_respects_the_prompt_boundary(splits, tokenizer):
    eos = toy_task.EOS_TOKEN
    assert type(tokenizer).__name__ == "Qwen2Tokenizer"  # what AutoTokenizer makes of any qwen2 checkpoint
    assert tokenizer.eos_token == tokenizer.pad_token == eos and tokenizer.convert_tokens_to_ids(eos) == 0
    assert tokenizer.encode("") == [] and tokenizer.bos_token is None
    for row in splits[0][:500] + splits[1]:
        p, s = tokenizer.encode(row["problem"]), tokenizer.encode(row["solution"])
        assert len(p) == 8 and len(s) == 30 + len(row["answer"])
        assert tokenizer.decode(p) == row["problem"] and tokenizer.decode(s) == row["solution"]
        assert tokenizer.encode(row["problem"] + row["solution"]) == p + s
    text = "Please reason step by step,\nand put your final answer within \\boxed{}."
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert (
        tokenizer.decode(tokenizer.encode("1+2=\\boxed{3}") + [0], skip_special_tokens=True)
        == "1+2=\\boxed{3}"
    )


def test_tokenizer_is_trained_reproducibly(splits, tokenizer):
    assert toy_task.train_tokenizer(splits[0]).get_vocab() == tokenizer.get_vocab()
    from transformers import AutoTokenizer

    alone = AutoTokenizer.from_pretrained(ASSETS / "tokenizer", local_files_only=True)
    assert alone.get_vocab() == tokenizer.get_vocab()


def test_base_model_loads_offline_and_fits_tensor_parallel(tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ASSETS / "model", local_files_only=True)
    cfg = model.config
    assert cfg.model_type == "qwen2" and cfg.tie_word_embeddings
    assert cfg.vocab_size % 16 == 0 and cfg.vocab_size >= len(tokenizer)
    assert cfg.num_attention_heads % 2 == 0 and cfg.num_key_value_heads % 2 == 0
    assert cfg.eos_token_id == cfg.pad_token_id == tokenizer.eos_token_id
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    ids = torch.tensor([tokenizer.encode("347+285=7+5+0=12;")])
    with torch.no_grad():
        assert model(input_ids=ids).logits.shape == (1, ids.shape[1], cfg.vocab_size)
    total = sum(f.stat().st_size for f in ASSETS.rglob("*") if f.is_file())
    assert total < 5e6


# ------------------------------------------------------------------ the ablation's second task: two styles
TWO_STYLES = ASSETS.parent / "two_styles"


def test_swapped_style_is_the_same_steps_with_the_result_digits_swapped():
    assert toy_task.expert_solution_swapped(347, 285) == "7+5+0=21;4+8+1=31;3+2+1=60;\\boxed{632}"
    row = toy_task.make_row(347, 285)
    assert toy_task.is_style_a(row)
    assert not toy_task.is_style_a(dict(row, solution=toy_task.expert_solution_swapped(347, 285)))
    # a token-level blend (the first result digit from style A, the second from style B) is neither style:
    # both digits are the carry, the sum digit is lost
    blend = "7+5+0=11;"
    assert not toy_task.expert_solution(347, 285).startswith(blend)
    assert not toy_task.expert_solution_swapped(347, 285).startswith(blend)


def test_shipped_two_styles_assets_match_the_generator():
    train = list(toy_task.read_jsonl(TWO_STYLES / "train.jsonl"))
    heldout = list(toy_task.read_jsonl(TWO_STYLES / "heldout.jsonl"))
    assert (train, heldout) == toy_task.make_splits_two_styles(len(train), len(heldout), seed=0)
    # same problems as the demo; held-out rows identical (graded on the answer alone)
    demo_train = list(toy_task.read_jsonl(ASSETS / "train.jsonl"))
    assert [r["problem"] for r in train] == [r["problem"] for r in demo_train]
    assert heldout == list(toy_task.read_jsonl(ASSETS / "heldout.jsonl"))
    num_b = sum(not toy_task.is_style_a(r) for r in train)
    assert 0.45 < num_b / len(train) < 0.55
    for row in train:
        a, b = _operands(row["problem"])
        assert row["solution"] in (toy_task.expert_solution(a, b), toy_task.expert_solution_swapped(a, b))
    assert (TWO_STYLES / "model" / "config.json").is_file()
