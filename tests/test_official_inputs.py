"""The official run's inputs: the raw prompt string, the data order (seed 47, drop_last), the trace cut
before the prefix cut, and the reward's decoding with special tokens kept."""

from __future__ import annotations

import pytest
import torch
from rollout_tiny import tiny_tokenizer

from trapo_megatron.algo.micro_groups import MicroGroupConfig
from trapo_megatron.data.dataset import DataConfig, Example, build_examples
from trapo_megatron.data.prompts import PromptConfig, encode_prompt
from trapo_megatron.rollout import Generation
from trapo_megatron.rollout.waves import RolloutConfig, run_waves
from trapo_megatron.train.sampler import StepSampler

PROBLEM = "Solve 2x+3=11 for x."


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_raw_template_ids_equal_the_qwen_chat_rendering_of_the_paper_prompt(tok):
    """The official string is what Qwen's chat template renders for the paper's system and instruction, so
    its ids equal the chat path's; each <|im_start|> / <|im_end|> is one special id, none added around."""
    raw = encode_prompt(PROBLEM, PromptConfig(template="raw"), tok)
    assert raw == encode_prompt(PROBLEM, PromptConfig(template="chat"), tok)
    start, end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert raw[0] == start and raw.count(start) == 3 and raw.count(end) == 2
    assert tok.decode(raw) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n" + PROBLEM
        + "\nPlease reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n"
        "<|im_start|>assistant\n")
    other = encode_prompt(PROBLEM, PromptConfig(template="raw", raw_template="Q: {problem}\nA:"), tok)
    assert other == tok("Q: " + PROBLEM + "\nA:", add_special_tokens=False)["input_ids"]
    with pytest.raises(ValueError, match="raw_template"):
        PromptConfig(template="raw", raw_template="no slot")


class _OfficialSampler(torch.utils.data.Sampler):
    """The official resumable sampler's behaviour as its file describes it: one generator seeded 47, a new
    torch.randperm whenever the previous one is used up."""

    def __init__(self, n: int) -> None:
        self.n, self.generator, self.index = n, torch.Generator().manual_seed(47), n
        self.perm = torch.empty(0, dtype=torch.long)

    def __iter__(self):
        if self.index >= len(self.perm):
            self.perm, self.index = torch.randperm(self.n, generator=self.generator), 0
        while self.index < len(self.perm):
            self.index += 1
            yield int(self.perm[self.index - 1])

    def __len__(self) -> int:
        return self.n


def test_randperm_order_is_the_official_dataloader_with_drop_last():
    n, per_step = 10, 4  # 2 whole steps per epoch, 2 prompts dropped each epoch
    examples = [Example(index=i, problem="", answer="", prompt_ids=[], solution_ids=[]) for i in range(n)]
    sampler = StepSampler(examples, per_step, seed=47, order="randperm")
    loader = torch.utils.data.DataLoader(range(n), batch_size=per_step, sampler=_OfficialSampler(n), drop_last=True)
    official = [batch.tolist() for _ in range(3) for batch in loader]  # 3 epochs
    ours = [[e.index for e in sampler.batch(step)] for step in range(1, 7)]
    assert ours == official
    assert ours[0] == [5, 9, 1, 3]  # torch.randperm(10) from a generator seeded 47: 5 9 1 3 8 6 0 7 (2 4)
    thousand = [Example(index=i, problem="", answer="", prompt_ids=[], solution_ids=[]) for i in range(1000)]
    assert [e.index for e in StepSampler(thousand, 8, seed=47, order="randperm").batch(1)] == [
        255, 531, 521, 990, 248, 881, 666, 13]
    with pytest.raises(ValueError, match="prompts_per_step"):
        StepSampler(examples[:3], per_step, seed=47, order="randperm")


def test_long_trace_is_cut_before_the_prefix_cut_instead_of_dropped(tok):
    row = {"problem": "1+1=", "answer": "2", "solution": "one two three four five six seven eight nine ten"}
    ids = tok(row["solution"], add_special_tokens=False)["input_ids"]
    assert len(ids) > 4
    cut = DataConfig(path="unused", max_solution_tokens=4, long_solution="truncate")
    examples, stats = build_examples([row], cut, PromptConfig(template="plain"), tok)
    assert examples[0].solution_ids == [ids[:4]] and stats.num_skipped == 0
    dropped = DataConfig(path="unused", max_solution_tokens=4, on_bad_row="skip")
    assert build_examples([row], dropped, PromptConfig(template="plain"), tok)[1].num_skipped == 1
    with pytest.raises(ValueError, match="data.long_solution"):
        DataConfig(path="unused", long_solution="cut")


class _Answering:
    """Every request answers " so 2" + EOS."""

    def __init__(self, tok) -> None:
        self.ids = tok(" so 2", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]

    def generate(self, prompts, params):
        return [Generation(token_ids=self.ids, logprobs=[-0.1] * len(self.ids), finish_reason="stop")
                for _ in prompts]


class _Recording:
    def __init__(self) -> None:
        self.responses: list[str] = []

    def score(self, responses, golds):
        self.responses += responses
        return [0.0] * len(responses)


@pytest.mark.parametrize("keep", [True, False])
def test_reward_text_keeps_special_tokens_when_asked(tok, keep):
    ex = Example(index=0, problem="p", answer="2", prompt_ids=tok("Q", add_special_tokens=False)["input_ids"],
                 solution_ids=[tok("a b c d e f g h", add_special_tokens=False)["input_ids"]])
    scorer = _Recording()
    run_waves([ex], schedule=MicroGroupConfig(), engine=_Answering(tok), scorer=scorer, tokenizer=tok,
              cfg=RolloutConfig(max_response_tokens=32, reward_special_tokens=keep), step=1)
    assert len(scorer.responses) == 8  # the full-expert sample (trace + EOS) included
    eos = tok.eos_token
    assert all(r.endswith(eos) == keep and (eos in r) == keep for r in scorer.responses), scorer.responses
