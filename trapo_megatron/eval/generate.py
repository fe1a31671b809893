"""k responses per benchmark problem through any rollout engine (CPU twin or vLLM), as text.

Each request gets its own seed (``seed + item_index * k + j``), so a response does not depend on batching
or on which other problems are in the run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from trapo_megatron.data.prompts import PromptConfig, encode_prompt
from trapo_megatron.eval.benchmarks import Item
from trapo_megatron.rollout.engine import RolloutEngine, SamplingParams

Key = tuple[str, str]
"""(benchmark name, item id)."""


def generate_responses(
    engine: RolloutEngine,
    tokenizer,
    items: Sequence[Item],
    *,
    k: int,
    sampling: SamplingParams,
    prompt: PromptConfig,
    batch_size: int = 256,
) -> dict[Key, list[str]]:
    """``k`` decoded responses per item, in sample order."""
    if k < 1:
        raise ValueError(f"--k must be >= 1, got {k}")
    stops = tuple(sampling.stop_token_ids)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in stops:
        stops += (tokenizer.eos_token_id,)
    requests = []  # (key, prompt ids, params)
    for i, item in enumerate(items):
        ids = encode_prompt(item.problem, prompt, tokenizer)
        for j in range(k):
            params = dataclasses.replace(sampling, seed=sampling.seed + i * k + j, stop_token_ids=stops)
            requests.append(((item.benchmark, item.id), ids, params))
    out: dict[Key, list[str]] = {(it.benchmark, it.id): [] for it in items}
    for s in range(0, len(requests), batch_size):
        chunk = requests[s : s + batch_size]
        gens = engine.generate([r[1] for r in chunk], [r[2] for r in chunk])
        for (key, _, _), gen in zip(chunk, gens):
            out[key].append(tokenizer.decode(gen.token_ids, skip_special_tokens=True))
    return out
