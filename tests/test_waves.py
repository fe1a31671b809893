"""Micro-group waves: one engine call per micro-group, prefixes + continuations, full-expert samples."""

import pytest
import torch
from rollout_tiny import tiny_qwen2_config, tiny_tokenizer

from trapo_megatron.algo.micro_groups import MicroGroupConfig
from trapo_megatron.data.dataset import Example
from trapo_megatron.data.prefix import cut_prefix
from trapo_megatron.reward.math_reward import last_boxed
from trapo_megatron.rollout import Generation
from trapo_megatron.rollout.waves import RolloutConfig, run_waves

SOLUTION = (
    "Subtract 3 from both sides.\n\nDivide both sides by 2.\n\nCheck: 2 * 4 + 3 = 11.\n\nSo \\boxed{{{a}}}."
)
SECOND = "Try x = 4: 2 * 4 + 3 = 11.\n\n\\boxed{{{a}}}"


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _example(tok, index, answer, second=False):
    sols = [SOLUTION.format(a=answer)] + ([SECOND.format(a=answer)] if second else [])
    return Example(
        index=index,
        problem=f"p{index}",
        answer=answer,
        prompt_ids=tok(f"Problem {index}: solve 2x+3=11.", add_special_tokens=False)["input_ids"],
        solution_ids=[tok(s, add_special_tokens=False)["input_ids"] for s in sols],
    )


class BoxScorer:
    """1.0 iff the last \\boxed{} is the gold string (math-verify itself is tested in test_reward_math)."""

    def __init__(self):
        self.calls = 0

    def score(self, responses, golds):
        self.calls += 1
        return [float(last_boxed(r) == g) for r, g in zip(responses, golds)]


class ScriptedEngine:
    """Answers each request by a per-example policy: 'always', 'never', or 'guided' (right iff prefixed)."""

    def __init__(self, tok, examples, policy):
        self.tok, self.examples, self.policy, self.calls = tok, examples, policy, []

    def generate(self, prompts, params):
        self.calls.append((list(map(list, prompts)), list(params)))
        out = []
        for q, p in zip(prompts, params):
            ex = max(
                (e for e in self.examples if list(q[: len(e.prompt_ids)]) == e.prompt_ids),
                key=lambda e: len(e.prompt_ids),
            )
            guided = len(q) > len(ex.prompt_ids)
            right = {"always": True, "never": False, "guided": guided}[self.policy[ex.index]]
            text = f" so \\boxed{{{ex.answer if right else 'wrong'}}}"
            ids = self.tok(text, add_special_tokens=False)["input_ids"][: p.max_tokens - 1] + [
                self.tok.eos_token_id
            ]
            out.append(Generation(token_ids=ids, logprobs=[-0.1] * len(ids), finish_reason="stop"))
        return out

    def sleep(self): ...
    def wake_up(self): ...
    def load_weights(self, weights): ...
    def close(self): ...


def _run(tok, policy, mode="paper", second=False, **cfg):
    examples = [_example(tok, i, str(10 + i), second=second) for i in policy]
    engine, scorer = ScriptedEngine(tok, examples, policy), BoxScorer()
    groups, stats = run_waves(
        examples,
        schedule=MicroGroupConfig(mode=mode),
        engine=engine,
        scorer=scorer,
        tokenizer=tok,
        cfg=RolloutConfig(**cfg),
        step=3,
    )
    return examples, engine, scorer, groups, stats


def test_one_engine_call_per_micro_group(tok):
    policy = {0: "always", 1: "never", 2: "guided", 5: "never", 7: "always"}
    _, engine, scorer, groups, stats = _run(tok, policy)
    assert len(engine.calls) == stats.num_engine_calls == 4 and scorer.calls == 4
    # every wave's call carries all of that wave's generated samples, for all prompts at once
    assert [len(c[0]) for c in engine.calls] == [20, 10, 5, 2]  # MG4: the two 'always' prompts only
    assert stats.num_generated == 37 and stats.num_expert_only == 3  # 8 x 5 = 37 generated + 3 expert
    assert stats.guided_prompts == [0, 3, 3, 3]
    for g in groups:
        assert [r.sample_index for r in g] == list(range(8))
        assert [r.micro_group for r in g] == [0, 0, 0, 0, 1, 1, 2, 3]


def test_full_expert_is_not_generated(tok):
    _, engine, _, groups, stats = _run(tok, {0: "never", 1: "guided"})
    assert len(engine.calls) == stats.num_engine_calls == 3  # MG4 is expert-only for both prompts
    for g in groups:
        last = g[-1]
        assert last.guided and last.ratio == 1.0 and last.finish_reason == "expert"
        assert last.continuation_ids == [] and last.continuation_logprobs == [] and last.sft_on_prefix
        assert last.prefix_ids[-1] == tok.eos_token_id and last.reward == 1.0


def test_decisions_prefixes_and_sft_flags(tok):
    examples, _, _, groups, _ = _run(tok, {0: "always", 1: "never", 2: "guided"})
    a, b, c = groups
    flat = [r for g in groups for r in g]
    unguided = [r for r in flat if not r.guided]  # all of a (8 right), first 4 of b and c (wrong)
    assert sum(r.reward for r in unguided) / len(unguided) == 8 / 16
    assert sum(r.finish_reason == "expert" for r in flat) == 2
    for mg in (1, 3):  # micro-groups 2 and 4 guide b and c, not a
        assert [next(r for r in g if r.micro_group == mg).guided for g in groups] == [False, True, True]
    assert (len(flat) - len(unguided)) / len(flat) == 8 / 24
    assert not any(r.guided for r in a) and all(r.reward == 1.0 and r.prefix_ids == [] for r in a)
    assert [r.guided for r in b] == [False] * 4 + [True] * 4 and [r.ratio for r in b][4:] == [
        0.2,
        0.2,
        0.5,
        1.0,
    ]
    assert [r.reward for r in c] == [0.0] * 4 + [1.0] * 4
    for g, ex in zip(groups, examples):
        for mg in (1, 2, 3):
            rs = [r for r in g if r.micro_group == mg]
            assert sum(r.sft_on_prefix for r in rs) == (1 if rs[0].guided else 0)  # one per shared prefix
            if rs[0].guided:
                want = cut_prefix(
                    ex.solution_ids[0], rs[0].ratio, MicroGroupConfig(), eos_id=tok.eos_token_id
                )
                assert all(r.prefix_ids == want for r in rs)


def test_continuation_starts_right_after_the_prefix(tok):
    _, engine, _, groups, _ = _run(tok, {0: "never", 1: "always"}, max_response_tokens=64)
    sent = [(q, p) for prompts, params in engine.calls for q, p in zip(prompts, params)]
    generated = [
        r
        for mg in range(4)
        for g in groups
        for r in g  # in wave order, as sent
        if r.micro_group == mg and r.finish_reason != "expert"
    ]
    assert len(sent) == len(generated)
    for (q, p), r in zip(sent, generated):
        assert q == r.prompt_ids + r.prefix_ids  # the request is prompt + prefix, nothing else
        assert p.max_tokens == 64 - len(r.prefix_ids) and tok.eos_token_id in p.stop_token_ids
        assert len(r.continuation_logprobs) == len(r.continuation_ids) > 0
    seeds = [p.seed for _, p in sent]
    assert len(set(seeds)) == len(seeds)  # every request its own seed
    rerun = _run(tok, {0: "never", 1: "always"}, max_response_tokens=64)[1]
    assert seeds == [p.seed for _, params in rerun.calls for p in params]  # and the same seeds on a rerun


def test_official_mode_uses_the_second_solution(tok):
    examples, _, _, groups, _ = _run(tok, {0: "never", 1: "never"}, mode="official", second=True)
    last = groups[0][-1]
    assert last.second_solution and last.prefix_ids == examples[0].solution_ids[1] + [tok.eos_token_id]
    mg2 = [r for r in groups[0] if r.micro_group == 1]
    assert [r.sft_on_prefix for r in mg2] == [False, True] and not mg2[0].second_solution  # official [0, 1]
    assert tok.decode(mg2[0].prefix_ids).endswith("\n\n")  # snapped to a paragraph break


def test_cpu_engine_end_to_end(tok):
    from trapo_megatron.rollout.cpu_engine import CpuEngine

    torch.manual_seed(0)
    engine = CpuEngine(tiny_qwen2_config(len(tok)))
    examples = [_example(tok, 0, "10"), _example(tok, 1, "11", second=True)]
    groups, stats = run_waves(
        examples,
        schedule=MicroGroupConfig(),
        engine=engine,
        scorer=BoxScorer(),
        tokenizer=tok,
        cfg=RolloutConfig(max_response_tokens=24),
        step=0,
    )
    assert engine.num_generate_calls == stats.num_engine_calls <= 4
    for g, ex in zip(groups, examples):
        assert len(g) == 8
        for r in g:
            assert len(r.prefix_ids) + len(r.continuation_ids) <= 24
            assert len(r.continuation_logprobs) == len(r.continuation_ids)
            assert r.finish_reason in ("stop", "length", "expert", "budget")


def test_a_row_drawn_twice_gets_independent_seeds(tok):
    ex = _example(tok, 0, "10")
    engine = ScriptedEngine(tok, [ex], {0: "always"})
    run_waves(
        [ex, ex],
        schedule=MicroGroupConfig(),
        engine=engine,
        scorer=BoxScorer(),
        tokenizer=tok,
        cfg=RolloutConfig(),
        step=1,
    )
    seeds = [p.seed for _, params in engine.calls for p in params]
    assert len(seeds) == 16 and len(set(seeds)) == 16
