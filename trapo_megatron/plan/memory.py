"""Per-GPU memory of a TRAPO run under a TP x PP x DP layout: training state, activations, colocated vLLM.

Bytes per parameter (Megatron mixed precision with the distributed optimizer, ZeRO-1 style):
  weights   2 (bf16) or 4 (fp32) on every DP rank;
  grads     the DDP grad buffer: 4 (fp32 main grads, ``grad_reduce_in_fp32``) unless ``grad_bytes`` says 2;
  optimizer Adam exp_avg + exp_avg_sq (8) plus an fp32 master copy under bf16 (4), divided by DP when the
            optimizer is distributed.
Activations per layer and micro-batch (Korthikanti et al. 2022, "Reducing Activation Recomputation",
re-derived for RMSNorm + GQA + SwiGLU + flash attention, no dropout): per token the layer keeps the two norm
inputs and the QKV/fc1 inputs (4h), Q, K, V and the attention output (2q + 2kv), the fc1 output and the
SwiGLU output (3f), each divided by TP under sequence parallelism. Megatron's local spec has no flash
attention: it also keeps the softmax output, heads x s x s per sequence. Full recompute keeps only each
layer's input (h) plus one layer's working set. 1F1B keeps ``min(PP - stage, micro-batches)`` micro-batches in
flight on a stage. The last stage also holds the output layer's work (:func:`output_layer_bytes`): unfused,
fp32 logits and their gradient (2 x 4 x s x b x V / TP); fused, chunk buffers and, with gradients in forward,
the weight gradient summed in fp32.
The colocated vLLM engine holds bf16 weights at the rollout TP and a KV cache of
``2 x layers x kv_heads_per_rank x head_dim x 2 bytes`` per token, or, given vLLM's memory fraction, that
fraction of the GPU whatever it holds. The trainer puts the engine to sleep (weights and KV cache freed)
while training runs, so the peak is the larger of the two phases. While
vLLM runs (weight sync and generation) the training state stays on the GPU except what
``offload_during_rollout`` moves to host memory, exactly as the trainer's ``engine.offload_during_rollout``
does (megatron/offload.py): "none", "grads" (the DDP grad buffer) or "grads+optimizer" (also the optimizer
states). The bf16 weights always stay: they are the source of the weight sync.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from trapo_megatron import model_spec
from trapo_megatron.megatron import chunking, features
from trapo_megatron.offload_modes import OFFLOAD_MODES, OffloadMode
from trapo_megatron.plan.model import ModelSpec, padded_vocab, stage_params, total_params

GIB = 1024**3


# Usable memory per GPU in GiB (what nvidia-smi reports as total).
GPUS: dict[str, float] = {
    "h100-80gb": 79.6,
    "h200-141gb": 139.8,
    "a100-80gb": 79.2,
    "a100-40gb": 39.4,
    "l40s-48gb": 44.4,
    "b200-180gb": 178.4,
}

PRECISIONS: dict[str, dict[str, int]] = {
    # bytes per parameter / activation element
    "bf16": {"weight": 2, "grad": 4, "optimizer": 12, "activation": 2},
    "fp16": {"weight": 2, "grad": 4, "optimizer": 12, "activation": 2},
    "fp32": {"weight": 4, "grad": 4, "optimizer": 8, "activation": 4},
}
OUTPUT_LAYERS = ("unfused", "auto", "forward", "recompute")

DTYPE_PRECISION = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
"""model.dtype -> the precision row above."""
PRECISION_DTYPE = {v: k for k, v in DTYPE_PRECISION.items()}


@dataclass(kw_only=True, frozen=True)
class PlanConfig:
    """The cluster and the run shape the planner sizes against."""

    gpu: str = "h100-80gb"
    """GPU type, a key of GPUS."""
    gpu_memory_gib: float | None = None
    """Memory per GPU in GiB (what nvidia-smi reports as total); None: the ``gpu`` type's."""
    num_gpus: int = 8
    """GPUs in the job (nodes x GPUs per node)."""
    gpus_per_node: int = 8
    """TP stays inside a node (NVLink); it may not exceed this."""
    precision: str = "bf16"
    """bf16 (mixed precision, fp32 master weights) or fp32 (the CPU runs)."""
    grad_bytes: int | None = None
    """Bytes per element of the grad buffer; None: the precision's default (4, fp32 main grads)."""
    distributed_optimizer: bool = True
    """Shard optimizer states over data parallel ranks (Megatron's distributed optimizer)."""
    micro_batch_size: int = 1
    """Sequences per micro-batch."""
    seq_length: int = 4096
    """Tokens per packed training sequence (prompt + response)."""
    num_microbatches: int | None = None
    """Micro-batches per step and pipeline; None: at least PP (the 1F1B steady state)."""
    transformer_impl: str = "te"
    """The training's model.transformer_impl on the GPUs planned for (auto there means te); whether sequence
    parallelism splits the norm activations over TP is megatron/features.py's decision."""
    recompute: bool | None = None
    """Full activation recompute (model.recompute_activations); None: the least the layout needs to fit."""
    num_layers_in_first_pipeline_stage: int | None = None
    """Uneven pipeline stages, as parallel.num_layers_in_first_pipeline_stage (None: even)."""
    num_layers_in_last_pipeline_stage: int | None = None
    """As parallel.num_layers_in_last_pipeline_stage (None: even)."""
    colocate_vllm: bool = True
    """A vLLM engine shares the GPUs with training."""
    rollout_tp: int | None = None
    """vLLM tensor parallel size; None: the training TP."""
    rollout_seqs: int = 32
    """Concurrent rollout sequences whose KV cache each engine must hold at least; vLLM fills the rest of
    the memory with more (the plan reports how many fit). Ignored with ``vllm_memory_fraction``."""
    vllm_memory_fraction: float | None = None
    """engine.vllm_gpu_memory_utilization: vLLM takes this fraction of the GPU's memory for its weights and
    KV cache, whatever they need; None: it holds its weights and ``rollout_seqs`` sequences of KV cache."""
    rollout_len: int | None = None
    """Tokens per rollout sequence in the KV cache; None: seq_length."""
    offload_during_rollout: OffloadMode = "none"
    """What moves to host memory while vLLM runs: "none", "grads" or "grads+optimizer" (the trainer's
    engine.offload_during_rollout); the weights stay, they are the source of the weight sync."""
    reserve_gib: float = 4.0
    """Held back per GPU for the CUDA context, NCCL buffers and allocator fragmentation."""
    vocab_divisor: int = 1
    """Vocabulary padding multiple per TP rank (1: our builder; 128: Megatron-LM checkpoints)."""
    output_layer: str = "auto"
    """The output layer and loss (:data:`OUTPUT_LAYERS`): "unfused" (loss.fused_output_layer false), "auto",
    "forward" or "recompute" (loss.fused_output_grads; "auto" as megatron/chunking.py resolves it for the
    precision and the main grads' bytes)."""
    min_headroom: float = 0.1
    """Layouts that leave less than this fraction of usable memory free rank after the others (tight)."""

    def __post_init__(self) -> None:
        if self.gpu not in GPUS:
            raise ValueError(f"PlanConfig.gpu {self.gpu!r} is unknown; choose one of {sorted(GPUS)}")
        if self.transformer_impl not in features.IMPLS:
            raise ValueError(f"PlanConfig.transformer_impl must be one of {features.IMPLS}, got "
                             f"{self.transformer_impl!r}")
        if self.vllm_memory_fraction is not None and not 0 < self.vllm_memory_fraction < 1:
            raise ValueError(f"PlanConfig.vllm_memory_fraction must lie in (0, 1), got {self.vllm_memory_fraction}")
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"PlanConfig.precision must be one of {sorted(PRECISIONS)}, got {self.precision!r}"
            )
        if self.output_layer not in OUTPUT_LAYERS:
            raise ValueError(f"PlanConfig.output_layer must be one of {OUTPUT_LAYERS}, got {self.output_layer!r}")
        if self.offload_during_rollout not in OFFLOAD_MODES:
            raise ValueError(f"PlanConfig.offload_during_rollout must be one of {list(OFFLOAD_MODES)}, got "
                             f"{self.offload_during_rollout!r}")
        for f in ("num_gpus", "gpus_per_node", "micro_batch_size", "seq_length", "rollout_seqs"):
            if getattr(self, f) <= 0:
                raise ValueError(f"PlanConfig.{f} must be positive, got {getattr(self, f)}")
        if self.num_gpus > self.gpus_per_node and self.num_gpus % self.gpus_per_node:
            raise ValueError(
                f"PlanConfig.num_gpus ({self.num_gpus}) must be a multiple of "
                f"gpus_per_node ({self.gpus_per_node})"
            )

    @property
    def gpu_bytes(self) -> float:
        return (self.gpu_memory_gib or GPUS[self.gpu]) * GIB

    @property
    def capacity_bytes(self) -> float:
        return self.gpu_bytes - self.reserve_gib * GIB

    @property
    def pipeline_split(self) -> tuple[int | None, int | None]:
        return self.num_layers_in_first_pipeline_stage, self.num_layers_in_last_pipeline_stage


@dataclass(kw_only=True, frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int

    def __str__(self) -> str:
        return f"TP{self.tp} x PP{self.pp} x DP{self.dp}"


@dataclass(kw_only=True, frozen=True)
class Memory:
    """Bytes on the busiest GPU of a layout (the pipeline stage with the largest total)."""

    layout: Layout
    stage: int
    """Pipeline stage the numbers are for."""
    params: int
    """Parameters held by this rank (elements)."""
    weights: int
    grads: int
    optimizer: int
    activations: int
    """No recompute, micro-batches in flight included."""
    activations_recompute: int
    """Full recompute of every layer."""
    logits: int
    vllm_weights: int
    kv_cache: int
    """KV cache for rollout_seqs x rollout_len tokens."""
    kv_bytes_per_token: int
    offload_during_rollout: OffloadMode

    @property
    def static(self) -> int:
        return self.weights + self.grads + self.optimizer

    def train(self, recompute: bool) -> int:
        return self.static + (self.activations_recompute if recompute else self.activations) + self.logits

    @property
    def rollout(self) -> int:
        resident = self.weights
        resident += 0 if self.offload_during_rollout in ("grads", "grads+optimizer") else self.grads
        resident += 0 if self.offload_during_rollout == "grads+optimizer" else self.optimizer
        return resident + self.vllm_weights + self.kv_cache

    def peak(self, recompute: bool) -> int:
        return max(self.train(recompute), self.rollout)


def _activation_elems_per_token(spec: ModelSpec, tp: int, sp: bool, local: bool) -> tuple[float, float]:
    """(one layer's saved activations, one layer's input) in elements per token on one TP rank.

    ``local``: megatron's local spec (megatron-core 0.19.2, counted on the CPU): each unfused torch RMSNorm
    keeps its input, its normalised output and 1/rms, and the next linear its own input (3h + 1, twice);
    the unfused attention keeps Q and K, V expanded to every query head (3q) and the projection's input (q);
    RoPE keeps cos and sin for Q and K (4 head_dim, on every TP rank); the SwiGLU keeps fc1's output (2f),
    silu's output, the up half and fc2's input (3f); Qwen3's Q / K norms keep their inputs (K's a view that
    holds the whole fused QKV output), outputs and 1/rms per head."""
    h, q, kv, f, d = spec.hidden_size, spec.q_size, spec.kv_size, spec.ffn_hidden_size, spec.head_dim
    if local:
        norm_side, split, shared = 6 * h + 2, 4 * q + 5 * f, 4 * d
        if spec.qk_layernorm:
            split += 3 * (q + kv) + spec.num_attention_heads + spec.num_query_groups
    else:
        norm_side, split, shared = 4 * h, 2 * q + 2 * kv + 3 * f, 0
    norm_tp = tp if sp or tp == 1 else 1
    return norm_side / norm_tp + split / tp + shared, h / norm_tp


def _attention_score_bytes(spec: ModelSpec, cfg: PlanConfig, tp: int, act: int) -> int:
    """Megatron's local spec has no flash attention: one layer keeps each micro-batch's softmax output, heads
    x s x s per sequence (a packed micro-batch is one sequence under a dense mask), in fp32
    (attention_softmax_in_fp32) plus its 16-bit copy under bf16 / fp16 (transformer/dot_product_attention.py,
    fusions/fused_softmax.py, megatron-core 0.19.2)."""
    per_element = 4 + (act if act < 4 else 0)
    return spec.num_attention_heads // tp * cfg.micro_batch_size * cfg.seq_length**2 * per_element


def output_layer_bytes(mode: str, tokens: int, vocab_rank: int, hidden: int, act: int, kind: str = "other",
                       main_grad: bool = True) -> int:
    """Peak extra bytes of the last stage's output layer + loss, forward and backward, for ``tokens`` tokens
    on a rank of ``vocab_rank`` vocabulary rows of ``hidden`` columns in ``act``-byte elements; ``kind`` the
    device kind of megatron/chunking.py. The buffers of megatron/fused_output.py and vocab_parallel.py:
    - unfused: fp32 logits and their gradient, 2 x 4 x tokens x V/TP (a bound: the logits are 16-bit
      under bf16);
    - recompute: chunks of the kernels' size, [C, V/TP] logits plus two fp32 work buffers, then vocabulary
      blocks as large, the fp32 hidden-state gradient accumulator and the weight gradient;
    - forward: GEMM chunks of chunking.forward_chunk_tokens [C, V/TP] in the model dtype, fp32 work buffers
      over sub-chunks of the kernels' size (one when the logits are fp32: they are overwritten), the block
      buffers of the weight-gradient sum under 16-bit, and the hidden-state gradient; the weight gradient
      itself goes into DDP's fp32 main_grad (counted with the grads); without one (``main_grad`` False) an
      fp32 sum, returned as the weight's .grad (rounded to the model dtype under 16-bit)."""
    if mode == "unfused":
        return 2 * 4 * tokens * vocab_rank
    low = act < 4
    weight_grad = act * vocab_rank * hidden
    if mode == "recompute":
        chunk = chunking.kernel_chunk_tokens(tokens, vocab_rank, kind)
        return chunk * vocab_rank * (act + 8) + 4 * tokens * hidden + weight_grad
    chunk = min(tokens, chunking.forward_chunk_tokens(tokens, vocab_rank, kind))
    sub = chunking.forward_sub_chunk_tokens(chunk, tokens, vocab_rank, kind)
    block_rows = chunking.weight_grad_block_rows(vocab_rank, hidden)
    block = block_rows * hidden * (act + 4) if low else 0  # the product and its fp32 copy
    weight_sum = 0 if main_grad else 4 * vocab_rank * hidden + (weight_grad if low else 0)
    buffers = chunk * vocab_rank * act + sub * vocab_rank * (8 if low else 4) + block
    return buffers + weight_sum + act * tokens * hidden


def stage_memory(spec: ModelSpec, cfg: PlanConfig, layout: Layout, stage: int) -> Memory:
    """Memory of one rank of pipeline ``stage`` under ``layout``."""
    tp, pp, dp = layout.tp, layout.pp, layout.dp
    bytes_ = PRECISIONS[cfg.precision]
    grad_bytes = cfg.grad_bytes or bytes_["grad"]
    params = stage_params(spec, tp, pp, stage, cfg.vocab_divisor, *cfg.pipeline_split).total
    opt_shard = dp if cfg.distributed_optimizer else 1

    tokens = cfg.micro_batch_size * cfg.seq_length
    in_flight = min(pp - stage, cfg.num_microbatches or pp)
    feats = features.decide(cfg.transformer_impl, tp, cuda=True, te_error=None, grad_accum_kernel=True)
    per_tok, input_tok = _activation_elems_per_token(spec, tp, feats.sequence_parallel, not feats.transformer_engine)
    layers = model_spec.pipeline_stages(spec.num_layers, pp, *cfg.pipeline_split)[stage]
    act = bytes_["activation"]
    scores = 0 if feats.transformer_engine else _attention_score_bytes(spec, cfg, tp, act)
    activations = int(in_flight * layers * (tokens * per_tok * act + scores))
    recompute = int(in_flight * layers * tokens * input_tok * act + tokens * per_tok * act + scores)
    vocab_rank = padded_vocab(spec, tp, cfg.vocab_divisor) // tp
    mode = chunking.grads_mode(cfg.output_layer, PRECISION_DTYPE[cfg.precision], main_grad=grad_bytes == 4)
    logits = output_layer_bytes(mode, tokens, vocab_rank, spec.hidden_size, act, main_grad=grad_bytes == 4) \
        if stage == pp - 1 else 0

    vllm_weights = kv_cache = kv_per_token = 0
    if cfg.colocate_vllm:
        rtp = cfg.rollout_tp or tp
        vllm_weights = 2 * total_params(spec) // rtp
        kv_heads = max(1, spec.num_query_groups // rtp)
        kv_per_token = 2 * spec.num_layers * kv_heads * spec.head_dim * 2
        kv_cache = kv_per_token * cfg.rollout_seqs * (cfg.rollout_len or cfg.seq_length)
        if cfg.vllm_memory_fraction is not None:  # vLLM reserves its fraction; the KV cache is what is left
            kv_cache = max(0, int(cfg.vllm_memory_fraction * cfg.gpu_bytes) - vllm_weights)
    return Memory(
        layout=layout, stage=stage, params=params,
        weights=params * bytes_["weight"], grads=params * grad_bytes,
        optimizer=-(-params * bytes_["optimizer"] // opt_shard),
        activations=activations, activations_recompute=recompute, logits=logits,
        vllm_weights=vllm_weights, kv_cache=kv_cache, kv_bytes_per_token=kv_per_token,
        offload_during_rollout=cfg.offload_during_rollout,
    )


def layout_memory(spec: ModelSpec, cfg: PlanConfig, layout: Layout) -> Memory:
    """The busiest stage of ``layout`` (largest no-recompute peak)."""
    stages = [stage_memory(spec, cfg, layout, s) for s in range(layout.pp)]
    return max(stages, key=lambda m: (m.peak(False), m.peak(True)))


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_layouts(spec: ModelSpec, cfg: PlanConfig) -> list[Layout]:
    """Every TP x PP x DP = num_gpus that the model's shape allows (TP inside a node; the builder's own
    check, :func:`model_spec.check_parallel`, on the vocabulary as padded for TP)."""
    out = []
    for tp in _divisors(cfg.num_gpus):
        if tp > cfg.gpus_per_node:
            continue
        padded = dataclasses.replace(spec, vocab_size=padded_vocab(spec, tp, cfg.vocab_divisor))
        for pp in _divisors(cfg.num_gpus // tp):
            try:  # uneven stages are asked for explicitly, never searched
                model_spec.check_parallel(padded, tp, pp)
            except ValueError:
                continue
            out.append(Layout(tp=tp, pp=pp, dp=cfg.num_gpus // (tp * pp)))
    return out


@dataclass(kw_only=True, frozen=True)
class Fit:
    """A layout, its memory, and what it allows."""

    memory: Memory
    recompute: bool
    """Whether the layout needs full activation recompute to fit."""
    max_micro_batch: int
    """Largest micro-batch at seq_length that fits (with the recompute setting above)."""
    max_seq_length: int
    """Longest sequence at micro-batch 1 that fits."""
    max_rollout_seqs: int
    """Concurrent rollout sequences of rollout_len whose KV cache fits in the generation phase."""
    capacity: float
    """Usable bytes per GPU (GPU memory minus the reserve)."""

    min_headroom: float
    """PlanConfig.min_headroom, for :attr:`tight`."""

    @property
    def headroom(self) -> float:
        """Fraction of the usable memory left at the peak."""
        return 1.0 - self.memory.peak(self.recompute) / self.capacity

    @property
    def tight(self) -> bool:
        """Fits with less headroom than asked: allocator fragmentation may still break it."""
        return self.headroom < self.min_headroom


def _largest(fits, limit: int) -> int:
    """The largest n in [1, limit] with fits(n) true (fits is monotone); 0 if none."""
    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def evaluate(spec: ModelSpec, cfg: PlanConfig, layout: Layout) -> Fit | None:
    """The layout's fit, or None when it does not fit even with full recompute."""
    mem = layout_memory(spec, cfg, layout)
    cap = cfg.capacity_bytes
    recompute = mem.peak(False) > cap if cfg.recompute is None else cfg.recompute
    if mem.peak(recompute) > cap:
        return None

    def fits(**changes: int) -> bool:
        return layout_memory(spec, dataclasses.replace(cfg, **changes), layout).peak(recompute) <= cap

    rollout_len = cfg.rollout_len or cfg.seq_length
    free_for_kv = mem.kv_cache if cfg.vllm_memory_fraction is not None else cap - (mem.rollout - mem.kv_cache)
    kv_seq = mem.kv_bytes_per_token * rollout_len
    return Fit(
        memory=mem, recompute=recompute, capacity=cap, min_headroom=cfg.min_headroom,
        max_micro_batch=_largest(lambda b: fits(micro_batch_size=b), 4096),
        max_seq_length=_largest(lambda s: fits(micro_batch_size=1, seq_length=s, rollout_len=rollout_len),
                                1 << 22),
        max_rollout_seqs=int(free_for_kv // kv_seq) if kv_seq else 0,
    )


def plan(spec: ModelSpec, cfg: PlanConfig) -> list[Fit]:
    """Layouts that fit, best first: no recompute before recompute, comfortable before tight, then the fewest
    model-parallel ranks (more data parallelism scales best), then less pipeline (fewer bubbles), then the
    most headroom."""
    fits = [f for f in (evaluate(spec, cfg, lay) for lay in candidate_layouts(spec, cfg)) if f is not None]
    def key(f: Fit) -> tuple:
        lay = f.memory.layout
        return (f.recompute, f.tight, lay.tp * lay.pp, lay.pp, -f.headroom)

    return sorted(fits, key=key)


def all_layouts(spec: ModelSpec, cfg: PlanConfig) -> list[Memory]:
    """Every candidate layout's busiest-stage memory, fitting or not (for the full table)."""
    return [layout_memory(spec, cfg, lay) for lay in candidate_layouts(spec, cfg)]


def param_bytes_per_rank(spec: ModelSpec, tp: int, pp: int, stage: int, precision: str = "fp32") -> int:
    """Parameter bytes on one rank of ``stage`` (what ``sum(p.numel() * p.element_size())`` gives)."""
    return stage_params(spec, tp, pp, stage).total * PRECISIONS[precision]["weight"]


def optimizer_state_bytes(spec: ModelSpec, tp: int, pp: int, stage: int, precision: str = "fp32") -> int:
    """Adam state bytes for the parameters of one rank before DP sharding (fp32 exp_avg + exp_avg_sq, plus
    the fp32 master copy under bf16)."""
    return stage_params(spec, tp, pp, stage).total * PRECISIONS[precision]["optimizer"]
