"""`trapo eval`: avg@k / pass@k of a model (or of a responses file) on local math benchmark files.

Wired into the `trapo` command by :mod:`trapo_megatron.commands` through :func:`add_eval_arguments` and
:func:`run_eval`; ``python -m trapo_megatron.eval`` runs it alone.

Data parallel: under torchrun (WORLD_SIZE > 1) the world is cut into engine replicas of --tp ranks
(rollout/replicas.py); each replica generates its share of the requests, rank 0 gathers, grades and reports.
8 GPUs, a 7B model: ``torchrun --nproc-per-node 8 -m trapo_megatron.eval --engine vllm --tp 1 ...``
(8 replicas). The official eval's settings: ``--n 1`` on the official files (AIME/AMC rows repeat 32x),
``--temperature 0.6 --top-p 1.0 --max-tokens 8192 --memory-fraction 0.85 --prompt-template simplerl
--grading official_eval``, all set by ``--preset official``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trapo_megatron.data.prompts import PAPER_INSTRUCTION, PAPER_SYSTEM, SIMPLERL_TEMPLATE
from trapo_megatron.eval.benchmarks import FORMATS, Item, load_benchmark, parse_data_arg, sample_benchmarks
from trapo_megatron.eval.report import (
    format_table,
    grade_all,
    read_responses,
    summarize,
    write_report,
    write_responses,
)
from trapo_megatron.reward.math_reward import GRADERS

RAW_TEMPLATES = {"simplerl": SIMPLERL_TEMPLATE}
"""--prompt-template names that are whole prompt strings (prompt.template="raw")."""

PRESETS = {
    "official": {"temperature": 0.6, "top_p": 1.0, "max_tokens": 8192, "n": 1, "prompt_template": "simplerl",
                 "grading": "official_eval", "memory_fraction": 0.85},
}
"""--preset NAME -> flag values: "official" is eval_scripts/generate_vllm.py as eval.sh runs it (sampling :83
and :250, the simplerl prompt :76-81, math-verify then the boxed fallback on the whole text :162-208, vLLM
memory :252)."""


class _Preset(argparse.Action):
    """Sets the preset's values where it stands: flags after it override them."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        for key, value in PRESETS[values].items():
            setattr(namespace, key, value)


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `trapo eval`."""
    parser.add_argument("--preset", choices=sorted(PRESETS), action=_Preset,
                        help="the official eval's sampling, prompt and grading (flags after it override)")
    parser.add_argument("--data", action="append", default=[], metavar="[NAME=]FORMAT:PATH",
                        help=f"a benchmark file (.jsonl/.json/.parquet); FORMAT one of {', '.join(FORMATS)}; "
                             "repeatable. Without it: the shipped sample set")
    parser.add_argument("--responses", default=None,
                        help="score these responses instead of generating "
                             "(JSON lines: benchmark, id, responses)")
    parser.add_argument("--model", default=None, help="Hugging Face model folder to generate with")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: --model)")
    parser.add_argument("--engine", choices=("cpu", "vllm"), default="cpu",
                        help="cpu: the transformers twin; vllm: a vLLM engine (GPU, or vLLM's CPU build; default "
                             "%(default)s)")
    parser.add_argument("--columns", action="append", default=[], metavar="NAME:problem=PATH,answer=PATH",
                        help="field paths of benchmark NAME overriding its format's (e.g. "
                             "aime:problem=Problem,answer=Answer); repeatable")
    parser.add_argument("--tp", type=int, default=1,
                        help="engine tensor parallel size: ranks per replica (default %(default)s)")
    parser.add_argument("--n", "--k", dest="n", type=int, default=8,
                        help="samples per ROW of a file (a problem repeated r times gets r*n; default %(default)s)")
    parser.add_argument("--temperature", type=float, default=0.6, help="(default %(default)s)")
    parser.add_argument("--top-p", type=float, default=0.95, help="(default %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=8192, help="response budget (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="base seed of the per-request seeds")
    parser.add_argument("--prompt-template", choices=("chat", "plain", *RAW_TEMPLATES), default="chat",
                        help="chat: system + problem + instruction through the chat template; simplerl: the "
                             "official eval's raw prompt string (--system and --instruction unused)")
    parser.add_argument("--system", default=PAPER_SYSTEM, help="system turn ('' leaves it out; default: the paper's)")
    parser.add_argument("--instruction", default=PAPER_INSTRUCTION,
                        help="appended to each problem (default: the paper's); may be ''")
    parser.add_argument("--grading", choices=sorted(GRADERS), default="official_eval",
                        help="official_eval: the official eval script (math-verify vs $gold$ on the whole text, "
                             "then its boxed fallback); official_eval_think: its split mode (the text after "
                             "</think> only, 0 without one); full: the training reward; last_boxed: the last "
                             "\\boxed{} of the last 4,000 characters (default %(default)s)")
    parser.add_argument("--memory-fraction", type=float, default=0.85,
                        help="vLLM gpu_memory_utilization (default %(default)s, as the official eval)")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="vLLM max_model_len (prompt + response); default: the model's own")
    parser.add_argument("--vllm-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="a further vllm.LLM argument (an EngineArgs field; VALUE parsed as YAML), e.g. "
                             "enforce_eager=true, max_num_seqs=64, quantization=fp8; repeatable")
    parser.add_argument("--limit", type=int, default=None, help="first N problems of each benchmark")
    parser.add_argument("--grader-workers", type=int, default=2, help="math-verify worker processes")
    parser.add_argument("--save-responses", default=None, help="write the generated responses here")
    parser.add_argument("--report", default=None, help="write the JSON report here")


def _columns(specs: list[str]) -> dict[str, dict[str, str]]:
    """``NAME:problem=PATH,answer=PATH`` flags -> {NAME: {"problem": PATH, "answer": PATH}}."""
    out: dict[str, dict[str, str]] = {}
    for spec in specs:
        name, sep, rest = spec.partition(":")
        pairs = [p.partition("=") for p in rest.split(",")] if sep else []
        if not pairs or any(not k or not v for k, _, v in pairs):
            raise ValueError(f"--columns {spec!r} must look like NAME:problem=PATH,answer=PATH")
        out.setdefault(name, {}).update({k: v for k, _, v in pairs})
    return out


def load_items(data: list[str], limit: int | None, columns: list[str] | None = None) -> list[Item]:
    specs = [parse_data_arg(d) for d in data] or sample_benchmarks()
    names = [name for name, _, _ in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"--data: benchmark names repeat ({names}); name them NAME=FORMAT:PATH")
    overrides = _columns(columns or [])
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise ValueError(f"--columns names benchmarks {unknown} that no --data gives ({names})")
    items: list[Item] = []
    for name, fmt, path in specs:
        items += load_benchmark(path, fmt, name, overrides.get(name))[:limit]
    return items


def _engine(args: argparse.Namespace):
    if args.engine == "cpu":
        from trapo_megatron.rollout.cpu_engine import CpuEngine

        return CpuEngine.from_pretrained(args.model)
    from trapo_megatron.config import parse_override
    from trapo_megatron.rollout.vllm_engine import VllmEngine

    extra = {".".join(key): value for key, value in map(parse_override, args.vllm_arg)}
    # the training engine starts from dummy weights and is refit; for evaluation load the folder's own
    return VllmEngine(args.model, tensor_parallel_size=args.tp, seed=args.seed,
                      gpu_memory_utilization=args.memory_fraction, max_model_len=args.max_model_len,
                      engine_kwargs={"load_format": "auto", **extra})


def _world() -> tuple[int, int, Callable[[Any], list] | None]:
    """(world size, rank, gather): one process without torchrun; under torchrun the initialised world and
    gather = all_gather_object over a gloo group (host objects)."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 1, 0, None
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        on_gpu = torch.cuda.is_available()
        if on_gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if on_gpu else "gloo")
    group = dist.new_group(backend="gloo")

    def gather(obj):
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj, group=group)
        return out

    return world, dist.get_rank(), gather


def generate(args: argparse.Namespace, items: list[Item]) -> dict | None:
    """Every item's responses on rank 0 (None on the other ranks of a data-parallel run)."""
    from transformers import AutoTokenizer

    from trapo_megatron.data.prompts import PromptConfig
    from trapo_megatron.eval.generate import assemble, build_requests, generate_texts
    from trapo_megatron.rollout.engine import SamplingParams
    from trapo_megatron.rollout.replicas import ReplicaLayout

    if not args.model:
        raise ValueError("--model is required unless --responses is given")
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
                              seed=args.seed)
    prompt = (PromptConfig(template="raw", raw_template=RAW_TEMPLATES[args.prompt_template])
              if args.prompt_template in RAW_TEMPLATES else
              PromptConfig(template=args.prompt_template, system=args.system, instruction=args.instruction))
    requests = build_requests(tokenizer, items, n=args.n, sampling=sampling, prompt=prompt)
    world, rank, gather = _world()
    layout = ReplicaLayout(world, args.tp, rank) if gather else ReplicaLayout(args.tp, args.tp, 0)
    args.num_replicas = layout.num_replicas  # into the report
    engine = _engine(args)
    try:
        texts = generate_texts(engine, tokenizer, requests, layout.positions(len(requests)))
    finally:
        engine.close()
    if gather is not None:  # only replica leaders contribute (a replica's TP ranks hold the same texts)
        parts = gather(texts if layout.is_leader else {})
        texts = {p: t for part in parts for p, t in part.items()}
        if rank != 0:
            return None
    return assemble(items, requests, texts)


def run_eval(args: argparse.Namespace) -> int:
    """Generate (or read) responses, grade them with math-verify, print the table, write the report."""
    from trapo_megatron.reward.math_reward import MathRewardPool, RewardConfig

    try:
        items = load_items(args.data, args.limit, args.columns)
        responses = read_responses(args.responses) if args.responses else generate(args, items)
    except (ValueError, FileNotFoundError) as e:
        print(f"trapo eval: {e}", file=sys.stderr)
        return 2
    if responses is None:  # a data-parallel rank other than 0: rank 0 grades and reports
        return 0
    if args.save_responses:
        write_responses(args.save_responses, {(it.benchmark, it.id): responses[(it.benchmark, it.id)]
                                              for it in items if (it.benchmark, it.id) in responses})
    with MathRewardPool(RewardConfig(num_workers=args.grader_workers, mode=args.grading)) as pool:
        try:
            scores = grade_all(items, responses, pool.score)
            results = summarize(items, scores)
        except ValueError as e:
            print(f"trapo eval: {e}", file=sys.stderr)
            return 2
    print(f"grading: {args.grading}")
    print(format_table(results))
    if args.report:
        plain = (str, int, float, bool, list, type(None))
        meta = {k: v for k, v in vars(args).items() if isinstance(v, plain) and not k.startswith("_")}
        meta["rows_per_problem"] = {it.benchmark: it.repeats for it in items}
        write_report(Path(args.report), results, scores, meta)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="trapo eval", description=__doc__.splitlines()[0])
    add_eval_arguments(parser)
    return run_eval(parser.parse_args(argv))
