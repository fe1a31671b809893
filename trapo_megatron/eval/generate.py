"""Responses to benchmark problems through any rollout engine (CPU twin or vLLM), as text.

A problem gets ``n`` samples per row of its file (``Item.repeats`` rows: official AIME files repeat each
problem 32 times, so n=1 gives 32 samples, as the official eval does). Request r (in item order, then
sample order) has seed ``sampling.seed + r``, so a response does not depend on batching, on which other
problems are in the run or on which replica generates it.

All of a replica's requests go to the engine in ONE call: vLLM schedules them continuously (a finished
sample frees its slot for the next request at once) instead of waiting for the slowest of a fixed block.
Data parallel: every replica (ReplicaLayout: a block of engine-TP ranks) takes the strided positions
``layout.positions(num_requests)``; the caller gathers the texts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from trapo_megatron.data.prompts import PromptConfig, encode_prompt
from trapo_megatron.eval.benchmarks import Item
from trapo_megatron.rollout.engine import RolloutEngine, SamplingParams

Key = tuple[str, str]
"""(benchmark name, item id)."""


class Request(NamedTuple):
    key: Key
    prompt_ids: list[int]
    params: SamplingParams


def build_requests(tokenizer, items: Sequence[Item], *, n: int, sampling: SamplingParams, prompt: PromptConfig,
                   ) -> list[Request]:
    """``n * item.repeats`` requests per item, in item then sample order, each with its own seed."""
    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    stops = tuple(sampling.stop_token_ids)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in stops:
        stops += (tokenizer.eos_token_id,)
    requests: list[Request] = []
    for item in items:
        ids = encode_prompt(item.problem, prompt, tokenizer)
        for _ in range(n * item.repeats):
            params = dataclasses.replace(sampling, seed=sampling.seed + len(requests), stop_token_ids=stops)
            requests.append(Request((item.benchmark, item.id), ids, params))
    return requests


def generate_texts(engine: RolloutEngine, tokenizer, requests: Sequence[Request], positions: Iterable[int],
                   batch_size: int | None = None) -> dict[int, str]:
    """Decoded responses of the requests at ``positions`` (one engine call unless ``batch_size`` is set)."""
    mine = list(positions)
    step = batch_size or max(len(mine), 1)
    out: dict[int, str] = {}
    for s in range(0, len(mine), step):
        chunk = mine[s : s + step]
        gens = engine.generate([requests[p].prompt_ids for p in chunk], [requests[p].params for p in chunk])
        for p, gen in zip(chunk, gens, strict=True):
            out[p] = tokenizer.decode(gen.token_ids, skip_special_tokens=True)
    return out


def assemble(items: Sequence[Item], requests: Sequence[Request], texts: dict[int, str]) -> dict[Key, list[str]]:
    """Texts by item, in sample order; every request must have its text."""
    missing = [p for p in range(len(requests)) if p not in texts]
    if missing:
        raise ValueError(f"no response for {len(missing)} of {len(requests)} requests (first: {missing[0]})")
    out: dict[Key, list[str]] = {(it.benchmark, it.id): [] for it in items}
    for p, req in enumerate(requests):
        out[req.key].append(texts[p])
    return out


def generate_responses(engine: RolloutEngine, tokenizer, items: Sequence[Item], *, n: int,
                       sampling: SamplingParams, prompt: PromptConfig, batch_size: int | None = None,
                       ) -> dict[Key, list[str]]:
    """One process, one replica: every item's responses, in sample order."""
    requests = build_requests(tokenizer, items, n=n, sampling=sampling, prompt=prompt)
    return assemble(items, requests, generate_texts(engine, tokenizer, requests, range(len(requests)), batch_size))
