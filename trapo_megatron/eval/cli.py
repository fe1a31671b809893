"""`trapo eval`: avg@k / pass@k of a model (or of a responses file) on local math benchmark files.

Wired into the `trapo` command by :mod:`trapo_megatron.cli` through :func:`add_eval_arguments` and
:func:`run_eval`; ``python -m trapo_megatron.eval`` runs it alone.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from trapo_megatron.eval.benchmarks import FORMATS, Item, load_benchmark, parse_data_arg, sample_benchmarks
from trapo_megatron.eval.report import (
    format_table,
    grade_all,
    read_responses,
    summarize,
    write_report,
    write_responses,
)


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `trapo eval`."""
    parser.add_argument("--data", action="append", default=[], metavar="[NAME=]FORMAT:PATH",
                        help=f"a benchmark file (.jsonl/.json/.parquet); FORMAT one of {', '.join(FORMATS)}; "
                             "repeatable. Without it: the shipped sample set")
    parser.add_argument("--responses", default=None,
                        help="score these responses instead of generating "
                             "(JSON lines: benchmark, id, responses)")
    parser.add_argument("--model", default=None, help="Hugging Face model folder to generate with")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: --model)")
    parser.add_argument("--engine", choices=("cpu", "vllm"), default="cpu",
                        help="cpu: the transformers twin; vllm: a vLLM engine on GPU (default %(default)s)")
    parser.add_argument("--tp", type=int, default=1, help="vLLM tensor parallel size (default %(default)s)")
    parser.add_argument("--k", type=int, default=8, help="samples per problem (default %(default)s)")
    parser.add_argument("--temperature", type=float, default=0.6, help="(default %(default)s)")
    parser.add_argument("--top-p", type=float, default=0.95, help="(default %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=8192, help="response budget (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="base seed of the per-request seeds")
    parser.add_argument("--prompt-template", choices=("chat", "plain"), default="chat",
                        help="chat: the paper's system + instruction through the chat template")
    parser.add_argument("--limit", type=int, default=None, help="first N problems of each benchmark")
    parser.add_argument("--grader-workers", type=int, default=2, help="math-verify worker processes")
    parser.add_argument("--save-responses", default=None, help="write the generated responses here")
    parser.add_argument("--report", default=None, help="write the JSON report here")


def load_items(data: list[str], limit: int | None) -> list[Item]:
    specs = [parse_data_arg(d) for d in data] or sample_benchmarks()
    names = [name for name, _, _ in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"--data: benchmark names repeat ({names}); name them NAME=FORMAT:PATH")
    items: list[Item] = []
    for name, fmt, path in specs:
        items += load_benchmark(path, fmt, name)[:limit]
    return items


def _engine(args: argparse.Namespace):
    if args.engine == "cpu":
        from trapo_megatron.rollout.cpu_engine import CpuEngine

        return CpuEngine.from_pretrained(args.model)
    from trapo_megatron.rollout.vllm_engine import VllmEngine

    # the training engine starts from dummy weights and is refit; for evaluation load the folder's own
    return VllmEngine(args.model, tensor_parallel_size=args.tp, seed=args.seed, gpu_memory_utilization=0.85,
                      max_model_len=None, engine_kwargs={"load_format": "auto"})


def generate(args: argparse.Namespace, items: list[Item]) -> dict:
    from transformers import AutoTokenizer

    from trapo_megatron.data.prompts import PromptConfig
    from trapo_megatron.eval.generate import generate_responses
    from trapo_megatron.rollout.engine import SamplingParams

    if not args.model:
        raise ValueError("--model is required unless --responses is given")
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
                              seed=args.seed)
    engine = _engine(args)
    try:
        return generate_responses(engine, tokenizer, items, k=args.k, sampling=sampling,
                                  prompt=PromptConfig(template=args.prompt_template))
    finally:
        engine.close()


def run_eval(args: argparse.Namespace) -> int:
    """Generate (or read) responses, grade them with math-verify, print the table, write the report."""
    from trapo_megatron.reward.math_reward import MathRewardPool, RewardConfig

    try:
        items = load_items(args.data, args.limit)
        responses = read_responses(args.responses) if args.responses else generate(args, items)
    except (ValueError, FileNotFoundError) as e:
        print(f"trapo eval: {e}", file=sys.stderr)
        return 2
    if args.save_responses:
        write_responses(args.save_responses, {(it.benchmark, it.id): responses[(it.benchmark, it.id)]
                                              for it in items if (it.benchmark, it.id) in responses})
    with MathRewardPool(RewardConfig(num_workers=args.grader_workers)) as pool:
        try:
            scores = grade_all(items, responses, pool.score)
            results = summarize(items, scores)
        except ValueError as e:
            print(f"trapo eval: {e}", file=sys.stderr)
            return 2
    print(format_table(results))
    if args.report:
        plain = (str, int, float, bool, list, type(None))
        meta = {k: v for k, v in vars(args).items() if isinstance(v, plain)}
        write_report(Path(args.report), results, scores, meta)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="trapo eval", description=__doc__.splitlines()[0])
    add_eval_arguments(parser)
    return run_eval(parser.parse_args(argv))
