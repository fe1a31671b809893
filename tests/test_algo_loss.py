"""The full TRAPO loss: config checks, micro-batch invariance, property tests against analytic gradients."""

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from trapo_megatron.algo.advantages import drgrpo_advantages
from trapo_megatron.algo.aggregation import token_weights
from trapo_megatron.algo.loss import LossConfig, finalize_metrics, trapo_loss
from trapo_megatron.algo.masks import loss_masks, shift_labels, token_roles


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"prefix_objective": "kl"}, "prefix_objective"),
        ({"trsft_alpha": 0.0}, "trsft_alpha"),
        ({"trsft_alpha": 1.5}, "trsft_alpha"),
        ({"luffy_gamma": -1.0}, "luffy_gamma"),
        ({"clip_ratio_low": 1.0}, "clip_ratio_low"),
        ({"clip_ratio_high": -0.1}, "clip_ratio_high"),
        ({"tis_cap": 0.0}, "tis_cap"),
        ({"entropy_coef": float("nan")}, "entropy_coef"),
        ({"aggregation": "sum"}, "aggregation"),
        ({"advantage": "ppo"}, "advantage"),
        ({"temperature": 0.0}, "temperature"),
        ({"chunk_tokens": 0}, "chunk_tokens"),
        ({"reference_world_size": 0}, "reference_world_size"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        LossConfig(**kwargs)


def test_config_defaults_are_the_paper():
    cfg = LossConfig()
    assert (cfg.prefix_objective, cfg.trsft_alpha, cfg.aggregation, cfg.advantage, cfg.temperature) == (
        "trsft",
        0.1,
        "drgrpo",
        "drgrpo",
        1.0,
    )
    assert cfg.tis_cap is None and cfg.entropy_coef == 0.0


def test_tis_needs_rollout_logprobs():
    batch = {
        "labels": torch.zeros(2, dtype=torch.long),
        "sft_mask": torch.zeros(2, dtype=torch.bool),
        "rl_mask": torch.ones(2, dtype=torch.bool),
        "advantages": torch.ones(2),
        "token_weight": torch.ones(2),
    }
    with pytest.raises(ValueError, match="tis_cap"):
        trapo_loss(torch.zeros(2, 3, requires_grad=True), batch, LossConfig(tis_cap=2.0))


def _global_batch(mode, seed=0, num_seqs=8, seq_len=12, hidden=6, vocab=13):
    """A global batch of sequences (rows), global weights, and a linear 'model' h @ W producing logits."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(1, 4, (num_seqs,), generator=g)
    prefix = torch.randint(0, 4, (num_seqs,), generator=g) * (torch.arange(num_seqs) % 2)
    cont = torch.minimum(torch.randint(0, 6, (num_seqs,), generator=g), seq_len - prompt - prefix)
    cont[3] = 0  # an empty continuation
    roles = token_roles(prompt, prefix, cont, seq_len)
    sft, rl = loss_masks(roles, torch.arange(num_seqs) != 5)  # sample 5 shares its prefix with another
    tokens = torch.randint(0, vocab, (num_seqs, seq_len), generator=g)
    rewards = torch.randint(0, 2, (num_seqs,), generator=g).double()
    adv = drgrpo_advantages(rewards, torch.arange(num_seqs) // 4)
    h = torch.randn(num_seqs, seq_len, hidden, generator=g, dtype=torch.float64)
    w0 = torch.randn(hidden, vocab, generator=g, dtype=torch.float64)
    labels = shift_labels(tokens)

    def lp(weights):
        logsm = torch.log_softmax(h @ weights, dim=-1)
        return logsm.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)

    rows = {
        "labels": labels,
        "sft_mask": sft,
        "rl_mask": rl,
        "advantages": adv[:, None].expand(-1, seq_len).clone(),
        "token_weight": token_weights(sft | rl, mode, max_response_len=seq_len),
        "old_logprobs": lp(w0 + 0.3 * torch.randn(hidden, vocab, generator=g, dtype=torch.float64)),
        "rollout_logprobs": lp(w0 + 0.3 * torch.randn(hidden, vocab, generator=g, dtype=torch.float64)),
    }
    return h, w0, rows


@pytest.mark.parametrize("mode", ["drgrpo", "token_mean", "seq_mean"])
def test_micro_batch_split_gives_the_same_gradient(mode):
    h, w0, rows = _global_batch(mode)
    cfg = LossConfig(clip_ratio_low=0.1, clip_ratio_high=0.1, tis_cap=1.5, entropy_coef=0.01, chunk_tokens=5)
    results = {}
    for num_micro in (1, 2, 4):
        w = w0.clone().requires_grad_()
        total, sums = 0.0, {}
        for idx in torch.arange(h.shape[0]).chunk(num_micro):
            packed = {k: v[idx].reshape(-1) for k, v in rows.items()}  # pack the rows of this micro-batch
            loss, metrics = trapo_loss((h[idx] @ w).reshape(-1, w.shape[1]), packed, cfg)
            loss.backward()  # gradients accumulate over micro-batches, as in the train step
            total = total + loss.detach()
            sums = {k: sums.get(k, 0.0) + v for k, v in metrics.items()}
        results[num_micro] = (total, w.grad.clone(), sums)
    total1, grad1, sums1 = results[1]
    assert grad1.abs().sum() > 0 and sums1["clipped_tokens"] > 0 and sums1["sft_tokens"] > 0
    for num_micro in (2, 4):
        total, grad, sums = results[num_micro]
        torch.testing.assert_close(total, total1, atol=1e-12, rtol=0)
        torch.testing.assert_close(grad, grad1, atol=1e-12, rtol=0)
        for key in sums1:
            torch.testing.assert_close(sums[key], sums1[key], atol=1e-6, rtol=1e-6)


def test_finalize_metrics_divides_by_counts():
    sums = {
        k: torch.tensor(v)
        for k, v in {
            "sft_tokens": 4.0,
            "rl_tokens": 10.0,
            "loss_tokens": 14.0,
            "clipped_tokens": 2.0,
            "prefix_p_sum": 2.0,
            "prefix_outside_trust_region_tokens": 1.0,
            "entropy_sum": 7.0,
            "logprob_gap_abs_sum": 0.5,
            "tis_truncated_tokens": 0.0,
        }.items()
    }
    out = finalize_metrics(sums)
    assert out["clip_fraction"] == 0.2 and out["prefix_p_mean"] == 0.5
    assert out["prefix_outside_trust_region"] == 0.25 and out["entropy_mean"] == 0.5
    assert out["logprob_gap_mean"] == 0.05 and out["tis_truncated_fraction"] == 0.0
    empty = finalize_metrics({k: torch.tensor(0.0) for k in sums})
    assert all(torch.isfinite(v) for v in empty.values())


# ---- property tests: random masks (empty continuations, all-prefix rows, all-padding rows) -----------------

ANALYTIC_DLDP = {
    "trsft": lambda p, cfg: -1.0 / torch.clamp(p, min=cfg.trsft_alpha),
    "sft": lambda p, cfg: -1.0 / p,
    "luffy": lambda p, cfg: -cfg.luffy_gamma / (p + cfg.luffy_gamma) ** 2,
    "none": lambda p, cfg: torch.zeros_like(p),
}


@st.composite
def packed_batches(draw):
    seq_len = draw(st.integers(2, 9))
    num_seqs = draw(st.integers(1, 4))
    lens = []
    for _ in range(num_seqs):
        prompt = draw(st.integers(0, seq_len))
        prefix = draw(st.integers(0, seq_len - prompt))
        cont = draw(st.integers(0, seq_len - prompt - prefix))
        lens.append((prompt, prefix, cont))
    carries = draw(st.lists(st.booleans(), min_size=num_seqs, max_size=num_seqs))
    cfg = LossConfig(
        prefix_objective=draw(st.sampled_from(["trsft", "sft", "luffy", "none"])),
        trsft_alpha=draw(st.sampled_from([0.1, 0.5, 1.0])),
        entropy_coef=draw(st.sampled_from([0.0, 0.01])),
        temperature=draw(st.sampled_from([1.0, 0.7])),
        aggregation=draw(st.sampled_from(["drgrpo", "token_mean", "seq_mean", "fsdp_sum"])),
        chunk_tokens=draw(st.sampled_from([None, 1, 3])),
    )
    return seq_len, lens, carries, cfg, draw(st.integers(0, 2**16))


@settings(max_examples=60, deadline=None, database=None)
@given(packed_batches())
@example((6, [(0, 0, 0), (0, 0, 0)], [True, True], LossConfig(), 1))  # all-padding rows only
@example((6, [(2, 4, 0), (1, 0, 5), (0, 0, 0)], [True, False, True], LossConfig(entropy_coef=0.01), 2))
@example(
    (5, [(0, 5, 0)], [True], LossConfig(prefix_objective="sft", aggregation="seq_mean"), 3)
)  # all-prefix
def test_property_loss_and_gradient_match_analytic(case):
    seq_len, lens, carries, cfg, seed = case
    g = torch.Generator().manual_seed(seed)
    prompt, prefix, cont = (torch.tensor(x) for x in zip(*lens))
    roles = token_roles(prompt, prefix, cont, seq_len)
    sft, rl = loss_masks(roles, torch.tensor(carries))
    num_seqs, vocab = len(lens), 7
    weight = token_weights(sft | rl, cfg.aggregation, max_response_len=seq_len).double().reshape(-1)
    labels = shift_labels(torch.randint(0, vocab, (num_seqs, seq_len), generator=g)).reshape(-1)
    adv = torch.randn(num_seqs, 1, generator=g, dtype=torch.float64).expand(-1, seq_len).reshape(-1)
    sft, rl = sft.reshape(-1), rl.reshape(-1)
    logits = (3 * torch.randn(num_seqs * seq_len, vocab, generator=g, dtype=torch.float64)).requires_grad_()
    batch = {"labels": labels, "sft_mask": sft, "rl_mask": rl, "advantages": adv, "token_weight": weight}

    loss, metrics = trapo_loss(logits, batch, cfg)  # on-policy: ratio 1, never clipped
    loss.backward()

    # Independent reference from the paper's formulas.
    tau = cfg.temperature
    q = torch.softmax(logits.detach() / tau, dim=-1)
    logq = torch.log_softmax(logits.detach() / tau, dim=-1)
    onehot = torch.nn.functional.one_hot(labels.clamp(min=0), vocab).double()
    p = (q * onehot).sum(-1)
    ent = -(q * logq).sum(-1)
    m_sft, m_rl, m_any = sft.double()[:, None], rl.double()[:, None], (sft | rl).double()[:, None]
    grad = (
        weight[:, None]
        * (
            m_sft * ANALYTIC_DLDP[cfg.prefix_objective](p, cfg)[:, None] * p[:, None] * (onehot - q)
            + m_rl * (-adv[:, None]) * (onehot - q)
            + m_any * cfg.entropy_coef * q * (logq + ent[:, None])
        )
        / tau
    )
    torch.testing.assert_close(logits.grad, grad, atol=1e-9, rtol=1e-7)

    pg_value = (weight * rl * -adv).sum()
    ent_value = -cfg.entropy_coef * (weight * (sft | rl) * ent).sum()
    sft_value = {
        "sft": -p.log(),
        "luffy": -p / (p + cfg.luffy_gamma),
        "none": torch.zeros_like(p),
        "trsft": torch.where(
            p >= cfg.trsft_alpha, -p.log(), 1 - math.log(cfg.trsft_alpha) - p / cfg.trsft_alpha
        ),
    }
    expected = pg_value + ent_value + (weight * sft * sft_value[cfg.prefix_objective]).sum()
    torch.testing.assert_close(loss.detach(), expected, atol=1e-9, rtol=1e-7)

    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in finalize_metrics(metrics).values())
    off = ~(sft | rl)
    assert (logits.grad[off] == 0).all()  # prompt, padding and non-carrying prefix positions get nothing
    assert metrics["sft_tokens"] == sft.sum() and metrics["rl_tokens"] == rl.sum()
    assert metrics["clipped_tokens"] == 0
    if not (sft | rl).any():  # e.g. all-padding rows only
        assert loss == 0 and (logits.grad == 0).all()
