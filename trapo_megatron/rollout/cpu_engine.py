"""The CPU twin: the rollout protocol on a Hugging Face transformers model, for tests and the demo.

It is the reference the vLLM engine is held to: same inputs (token ids, per-request seeds), same outputs
(sampled tokens with the log-probs of the distribution they were drawn from). Generation is batched with
left padding and a KV cache; each request draws from its own ``torch.Generator`` seeded by its
``SamplingParams.seed``, so a request's result does not depend on what else is in the batch (up to float
rounding of the padded forward).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from trapo_megatron import model_spec
from trapo_megatron.rollout.engine import (
    Generation,
    SamplingParams,
    WeightStream,
    check_generate_args,
    check_wake_up,
)


def processed_logprobs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Log-probs (..., V) of the distribution sampled from: logits / T, then top-k, then top-p (renormalized).

    Greedy (T = 0) returns the raw log-probs. Masked tokens get -inf.
    """
    logits = logits.float()
    if p.temperature == 0:
        return torch.log_softmax(logits, dim=-1)
    logits = logits / p.temperature
    if 0 < p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = (
            torch.cumsum(probs, dim=-1) - probs >= p.top_p
        )  # keep the smallest set whose mass reaches top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    return torch.log_softmax(logits, dim=-1)


def _batched_logprobs(
    logits: torch.Tensor, params: Sequence[SamplingParams], rows: list[int]
) -> dict[int, torch.Tensor]:
    """processed_logprobs for the given rows of (B, V) logits, one tensor op per distinct sampling setting."""
    by_setting: dict[tuple, list[int]] = {}
    for i in rows:
        by_setting.setdefault((params[i].temperature, params[i].top_k, params[i].top_p), []).append(i)
    out = {}
    for idx in by_setting.values():
        lp = processed_logprobs(logits[idx], params[idx[0]])
        out.update(zip(idx, lp))
    return out


class _SleepState:
    """The lifecycle state both CPU engines track so it is checked like vLLM's: after a sleep only a refit
    (load_weights) wakes the engine."""

    _sleeping: bool

    def wake_up(self) -> None:
        check_wake_up(self._sleeping)

    @property
    def is_sleeping(self) -> bool:
        return self._sleeping


class CpuEngine(_SleepState):
    """Rollout engine on transformers (fp32 by default). Implements ``RolloutEngine``.

    CpuEngine(hf_config) builds a randomly initialised model (like vLLM's load_format="dummy");
    CpuEngine.from_pretrained(path) loads a local model directory.
    """

    def __init__(
        self, hf_config=None, *, model=None, dtype: torch.dtype = torch.float32, max_batch_size: int = 256
    ):
        from transformers import AutoModelForCausalLM

        if model is None:
            if hf_config is None:
                raise ValueError("CpuEngine needs an hf_config or a model")
            model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype, attn_implementation="sdpa")
        self.model = model.eval()
        self.tied = model_spec.ties_embeddings(self.model.config)
        self.max_batch_size = max_batch_size
        self._sleeping = False
        self.num_generate_calls = 0

    @classmethod
    def from_pretrained(cls, path: str, *, dtype: torch.dtype = torch.float32, **kwargs) -> CpuEngine:
        from transformers import AutoModelForCausalLM

        return cls(
            model=AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa"),
            **kwargs,
        )

    # ------------------------------------------------------------------------------------ weights
    @torch.no_grad()
    def load_weights(self, weights: WeightStream) -> None:
        """Copy a full set of HF-named weights in place; every key and shape is checked before any copy."""
        targets = self.model.state_dict(keep_vars=True)
        incoming = dict(weights)
        unknown = sorted(set(incoming) - set(targets))
        optional = {n for n in targets if model_spec.is_tied_head(n, self.tied)}
        missing = sorted(set(targets) - set(incoming) - optional)
        if unknown or missing:
            raise KeyError(
                f"load_weights: unknown names {unknown[:5]} ({len(unknown)}), missing {missing[:5]} "
                f"({len(missing)})"
            )
        bad = [
            (k, tuple(v.shape), tuple(targets[k].shape))
            for k, v in incoming.items()
            if v.shape != targets[k].shape
        ]
        if bad:
            raise ValueError(f"load_weights: shape mismatch (name, got, want): {bad[:5]}")
        for name, tensor in incoming.items():
            targets[name].copy_(tensor.to(device=targets[name].device, dtype=targets[name].dtype))
        self._sleeping = False

    # -------------------------------------------------------------------------------- generation
    def generate(
        self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams]
    ) -> list[Generation]:
        check_generate_args(self._sleeping, prompts, params)
        self.num_generate_calls += 1
        out: list[Generation] = []
        for s in range(0, len(prompts), self.max_batch_size):
            out += self._generate_batch(
                prompts[s : s + self.max_batch_size], params[s : s + self.max_batch_size]
            )
        return out

    @torch.no_grad()
    def _generate_batch(
        self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams]
    ) -> list[Generation]:
        from transformers import DynamicCache

        device = next(self.model.parameters()).device
        B, L = len(prompts), max(len(p) for p in prompts)
        ids = torch.zeros(B, L, dtype=torch.long, device=device)  # left padded (B, L)
        mask = torch.zeros(B, L, dtype=torch.long, device=device)
        for i, p in enumerate(prompts):
            ids[i, L - len(p) :] = torch.tensor(list(p), dtype=torch.long)
            mask[i, L - len(p) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        gens = [torch.Generator().manual_seed(int(p.seed)) for p in params]
        tokens: list[list[int]] = [[] for _ in range(B)]
        logps: list[list[float]] = [[] for _ in range(B)]
        reasons: list[str | None] = [None] * B
        cache = DynamicCache()
        step_ids, step_pos = ids, positions
        for _ in range(max(p.max_tokens for p in params)):
            logits = self.model(
                input_ids=step_ids,
                attention_mask=mask,
                position_ids=step_pos,
                past_key_values=cache,
                use_cache=True,
            ).logits[:, -1]  # (B, V)
            nxt = torch.zeros(B, 1, dtype=torch.long, device=device)
            active = [i for i in range(B) if reasons[i] is None]
            for i, lp in _batched_logprobs(logits, params, active).items():
                p = params[i]
                if p.temperature == 0:
                    tok = int(torch.argmax(lp))
                else:
                    tok = int(torch.multinomial(lp.exp().cpu(), 1, generator=gens[i]))
                tokens[i].append(tok)
                logps[i].append(float(lp[tok]))
                nxt[i, 0] = tok
                if tok in p.stop_token_ids:
                    reasons[i] = "stop"
                elif len(tokens[i]) >= p.max_tokens:
                    reasons[i] = "length"
            if all(r is not None for r in reasons):
                break
            mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype, device=device)], dim=1)
            step_ids, step_pos = nxt, step_pos[:, -1:] + 1
        return [
            Generation(token_ids=t, logprobs=lp, finish_reason=r) for t, lp, r in zip(tokens, logps, reasons)
        ]

    # ------------------------------------------------------------------------------------- lifecycle
    def sleep(self) -> None:
        """Nothing to free on CPU; only the state is tracked so the lifecycle is checked like on GPU."""
        self._sleeping = True

    def close(self) -> None:
        self._sleeping = True


class ReplicaCpuEngine(_SleepState):
    """The CPU twin of one engine replica of several ranks. Implements ``RolloutEngine`` on every rank.

    vLLM runs one model sharded over the replica's ranks and every rank gets the outputs; the twin runs the
    whole model on the replica's leader and hands the outputs to the other ranks. Above this class (waves,
    the rollout service) the code path is the one the vLLM replica takes: every rank calls every method.
    ``engine`` is the leader's CpuEngine (None on the other ranks).
    """

    def __init__(self, engine: CpuEngine | None, layout: Any, group: Any) -> None:
        from trapo_megatron.rollout.replicas import broadcast_from_leader

        if (engine is None) == layout.is_leader:
            raise ValueError("ReplicaCpuEngine: the replica leader, and only it, holds the CpuEngine")
        self.engine, self.layout, self.group = engine, layout, group
        self._broadcast = broadcast_from_leader
        self._sleeping = False

    @property
    def num_generate_calls(self) -> int:
        return self.engine.num_generate_calls if self.engine is not None else 0

    def load_weights(self, weights: WeightStream) -> None:
        if self.engine is not None:
            self.engine.load_weights(weights)
        else:
            for _ in weights:  # the stream is collective: every rank drains it
                pass
        self._sleeping = False

    def generate(self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams]) -> list[Generation]:
        check_generate_args(self._sleeping, prompts, params)
        outs = self.engine.generate(prompts, params) if self.engine is not None else None
        return self._broadcast(outs, self.layout, self.group)

    def sleep(self) -> None:
        self._sleeping = True
        if self.engine is not None:
            self.engine.sleep()

    def close(self) -> None:
        self._sleeping = True
        if self.engine is not None:
            self.engine.close()
