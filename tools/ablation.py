"""The paper's ablation at toy scale: every config of examples/ablations/ on two toy tasks, N seeds each, plus an
alpha sweep of TrSFT, through the real trainer (`trapo train` at world size 1: TP 1, one process, one engine
replica), under a fixed budget per run; then the tables and curves in docs/ablation.md and docs/ablation.png.

    python tools/ablation.py                 # the full sweep (`make ablation`; docs/ablation.md says how long)
    python tools/ablation.py --quick         # one seed, 4 steps, two configs, into a temp dir (make test)

Resumable: each finished run leaves <out>/<task>/<config>/seed<k>/result.json and is skipped next time; a run
killed midway resumes from its last checkpoint (`trapo train --resume`), its metrics rows past that checkpoint
dropped by the trainer. One progress line per run. Tasks: `addition` (the demo's, examples/tiny_cpu.yaml) and
`two_styles` (examples/two_styles_cpu.yaml: expert solutions in two styles, the base model warmed up on one).
The hand-written reading in docs/ablation.md (everything below READING_MARKER) survives a re-run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TASKS = {"addition": "examples/tiny_cpu.yaml", "two_styles": "examples/two_styles_cpu.yaml"}
TASK_ASSETS = {"addition": "trapo_megatron/assets/demo", "two_styles": "trapo_megatron/assets/two_styles"}
CONFIGS = ("grpo", "grpo_microgroup", "mg_sft", "mg_luffy", "trapo", "sft_only")
LABELS = {"grpo": "GRPO", "grpo_microgroup": "GRPO + micro-groups", "mg_sft": "+ MG + standard SFT",
          "mg_luffy": "+ MG + LUFFY", "trapo": "TRAPO (+ MG + TrSFT)", "sft_only": "SFT only"}
PAPER = {"grpo": "50.4", "grpo_microgroup": "52.7", "mg_sft": "32.3", "mg_luffy": "53.6", "trapo": "56.6",
         "sft_only": "-"}
ALPHAS = (0.01, 0.05, 0.1, 0.2, 0.5, 1.0)
TRAPO_ALPHA = 0.1  # examples/ablations/trapo.yaml's: the alpha sweep reuses those runs at this alpha
LAST = 5  # training-side metrics (entropy, length, guidance) are the mean of the last LAST logged steps
READING_MARKER = "<!-- reading: hand-written below this line, kept when tools/ablation.py rewrites the file -->"
FULL_COMMAND = "python tools/ablation.py"


@dataclass(frozen=True)
class Run:
    task: str
    config: str  # an examples/ablations/ name, or trsft_a<alpha> for the alpha sweep
    seed: int
    alpha: float | None = None

    @property
    def name(self) -> str:
        return f"{self.task}/{self.config}/seed{self.seed}"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "runs" / "ablation", help="run directories")
    p.add_argument("--docs", type=Path, default=REPO / "docs", help="where ablation.md and ablation.png go")
    p.add_argument("--seeds", type=int, default=3, help="seeds per config (run.seed = 1..N)")
    p.add_argument("--alpha-seeds", type=int, default=None, help="seeds per alpha of the sweep (default --seeds)")
    p.add_argument("--steps", type=int, default=40, help="training steps per run (run.max_steps)")
    p.add_argument("--prompts", type=int, default=8, help="prompts per step (run.prompts_per_step)")
    p.add_argument("--eval-every", type=int, default=10, help="held-out evaluation interval (steps)")
    p.add_argument("--eval-problems", type=int, default=128, help="held-out problems per evaluation")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (one core each)")
    p.add_argument("--tasks", nargs="+", choices=tuple(TASKS), default=list(TASKS))
    p.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    p.add_argument("--alphas", nargs="*", type=float, default=list(ALPHAS), help="TrSFT alphas (addition task)")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: write docs/ablation.md and the PNG from the runs already finished")
    p.add_argument("--quick", action="store_true",
                   help="smoke mode: 1 seed, 4 steps of 2 prompts, grpo + trapo on addition, no alpha sweep, "
                        "into a temp dir unless --out / --docs are given")
    args = p.parse_args(argv)
    if args.quick:
        tmp = Path(tempfile.mkdtemp(prefix="trapo-ablation-quick-"))
        if "--out" not in (argv if argv is not None else sys.argv[1:]):
            args.out = tmp / "runs"
        if "--docs" not in (argv if argv is not None else sys.argv[1:]):
            args.docs = tmp / "docs"
        args.seeds, args.alpha_seeds, args.steps, args.prompts = 1, 0, 4, 2
        args.eval_every, args.eval_problems = 2, 16
        args.tasks, args.configs, args.alphas = ["addition"], ["grpo", "trapo"], []
    if args.alpha_seeds is None:
        args.alpha_seeds = args.seeds
    return args


def plan(args: argparse.Namespace) -> list[Run]:
    """Seed-major, so a sweep cut short has whole seeds of every config."""
    runs = []
    for seed in range(1, max(args.seeds, args.alpha_seeds) + 1):
        if seed <= args.seeds:
            runs += [Run(task, config, seed) for task in args.tasks for config in args.configs]
        if seed <= args.alpha_seeds and "addition" in args.tasks:
            runs += [Run("addition", f"trsft_a{a:g}", seed, a) for a in args.alphas if a != TRAPO_ALPHA]
    return runs


def run_dir(args: argparse.Namespace, run: Run) -> Path:
    return args.out / run.task / run.config / f"seed{run.seed}"


def command(args: argparse.Namespace, run: Run) -> list[str]:
    ablation = "trapo" if run.alpha is not None else run.config
    overrides = [
        f"run.output_dir={run_dir(args, run)}", f"run.seed={run.seed}", f"run.max_steps={args.steps}",
        f"run.prompts_per_step={args.prompts}", "run.progress=false",
        "parallel.tensor_model_parallel_size=1", "reward.num_workers=1",
        f"checkpoint.save_every={max(args.steps // 2, 1)}", "checkpoint.export_hf=true",
        f"evaluation.every={args.eval_every}", f"evaluation.max_problems={args.eval_problems}",
    ]
    if run.alpha is not None:
        overrides.append(f"loss.trsft_alpha={run.alpha:g}")
    return [sys.executable, "-m", "trapo_megatron.commands", "train", "--config", TASKS[run.task],
            "--config", f"examples/ablations/{ablation}.yaml", "--resume", *overrides]


# ------------------------------------------------------------------------------------ one run
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def summarize(rows: list[dict]) -> dict:
    """The end of a run: final held-out accuracy, and the mean over the last LAST steps of entropy, unguided
    response length, guided fraction (of samples) and guided_mg2 (of prompts, at micro-group 2)."""
    evals = [(r["step"], r["heldout_accuracy"]) for r in rows if r.get("heldout_accuracy") is not None]
    train = [r for r in rows if r["step"] > 0][-LAST:]

    def tail(key: str) -> float | None:
        vals = [r[key] for r in train if r.get(key) is not None]
        return sum(vals) / len(vals) if vals else None

    return {"heldout_start": evals[0][1] if evals else None, "heldout_end": evals[-1][1] if evals else None,
            "curve": evals, "entropy": tail("entropy_mean"), "response_len": tail("response_len_unguided"),
            "guided_fraction": tail("guided_fraction"), "guided_mg2": tail("guided_mg2") or 0.0,
            "reward_unguided": tail("reward_unguided"),
            "prefix_p_mean": tail("prefix_p_mean") if tail("sft_tokens") else None}  # None: no prefix tokens


def greedy_styles(hf_dir: Path, heldout: Path, limit: int) -> dict:
    """Greedy outputs of the exported model on ``limit`` held-out problems, sorted by how they are written:
    exactly the style-A solution, exactly the style-B one, or anything else (a blend, an error); plus the
    fraction whose last boxed integer is the answer (math-verify is not used here: its timeouts need signals,
    which only the main thread has); and the column steps of all outputs checked one by one (``step_kind``),
    with the fraction of outputs that mix a style-A and a style-B step."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trapo_megatron.data import toy_task

    torch.set_num_threads(1)
    rows = list(toy_task.read_jsonl(heldout))[:limit]
    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = torch.tensor([tok.encode(r["problem"]) for r in rows])  # (N, 8): every prompt is 8 tokens
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=48,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    texts = tok.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
    counts = {"style_a": 0, "style_b": 0, "other": 0, "correct": 0, "mixed": 0}
    steps = {"step_a": 0, "step_b": 0, "step_bad": 0}
    for r, text in zip(rows, texts):
        kinds = [step_kind(*map(int, m)) for m in STEP.findall(text)]
        for kind in kinds:
            steps[kind] += 1
        counts["mixed"] += "step_a" in kinds and "step_b" in kinds
        a, b = toy_task.operands(r["problem"])
        text = text.strip()
        key = ("style_a" if text == toy_task.expert_solution(a, b)
               else "style_b" if text == toy_task.expert_solution_swapped(a, b) else "other")
        counts[key] += 1
        boxed = re.findall(r"\\boxed\{(\d+)\}", text)
        counts["correct"] += bool(boxed) and boxed[-1] == r["answer"]
    num_steps = sum(steps.values())  # 0 when no output has a column step (a collapsed policy): None below
    return {**{k: v / len(rows) for k, v in counts.items()}, "num_steps": num_steps,
            **{k: v / num_steps if num_steps else None for k, v in steps.items()}}


STEP = re.compile(r"(\d)\+(\d)\+(\d)=(\d)(\d);")
"""One column step as either style writes it: digit + digit + carry in = two result digits."""


def step_kind(da: int, db: int, carry: int, first: int, second: int) -> str:
    """A step checked against its own operands: "step_a" if its result reads carry then sum digit (a step
    both styles write alike, e.g. 5+6+0=11, counts here), "step_b" if sum digit then carry, else "step_bad"."""
    total = da + db + carry
    if (first, second) == divmod(total, 10):
        return "step_a"
    return "step_b" if (second, first) == divmod(total, 10) else "step_bad"


def heldout_path(run: Run) -> Path:
    return REPO / TASK_ASSETS[run.task] / "heldout.jsonl"


def execute(args: argparse.Namespace, run: Run) -> dict:
    """Run (or resume) ``run`` to its end; returns its result record, also written to result.json."""
    out = run_dir(args, run)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}  # runs side by side: a port each
    attempts = read_rows(out / "attempts.jsonl")
    t0 = time.perf_counter()
    with open(out / "train.log", "a") as log:
        proc = subprocess.run(command(args, run), check=False, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - t0
    with open(out / "attempts.jsonl", "a") as f:
        f.write(json.dumps({"seconds": seconds, "rc": proc.returncode}) + "\n")
    if proc.returncode != 0:
        tail = (out / "train.log").read_text().splitlines()[-15:]
        raise RuntimeError(f"{run.name}: trapo train exited {proc.returncode}; last lines of {out / 'train.log'}:\n"
                           + "\n".join(tail))
    rows = read_rows(out / "metrics.jsonl")
    result = {"task": run.task, "config": run.config, "seed": run.seed, "alpha": run.alpha,
              "steps": max((r["step"] for r in rows), default=0), "prompts_per_step": args.prompts,
              "seconds": sum(a["seconds"] for a in attempts) + seconds, "attempts": len(attempts) + 1,
              **summarize(rows), "greedy": greedy_styles(out / "hf", heldout_path(run), args.eval_problems)}
    (out / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    for ckpt in sorted((out / "checkpoints").glob("step_*")):  # finished: the record is all that is read again
        shutil.rmtree(ckpt)
    return result


# ------------------------------------------------------------------------------------ the report
def mean_spread(vals: list[float | None], fmt: str = "{:.3f}") -> str:
    vals = [v for v in vals if v is not None]
    if not vals:
        return "-"
    if len(vals) == 1:
        return fmt.format(vals[0])
    return f"{fmt.format(statistics.mean(vals))} ± {fmt.format(statistics.stdev(vals))}"


def table(results: list[dict], configs: list[str], labels: dict[str, str], extra: dict[str, str] | None = None,
          styles: bool = False) -> str:
    head = ["config", "seeds", "held-out acc. (start -> end)", "entropy", "response len", "guided samples",
            "guided prompts mg2", "expert-prefix p"]
    if styles:
        head += ["greedy = style A", "greedy = style B", "greedy mixes A and B", "steps in style B",
                 "invalid steps"]
    if extra:
        head.append("paper (7B)")
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for config in configs:
        rs = [r for r in results if r["config"] == config]
        if not rs:
            continue
        row = [labels.get(config, config), str(len(rs)),
               f"{mean_spread([r['heldout_start'] for r in rs])} -> **{mean_spread([r['heldout_end'] for r in rs])}**",
               mean_spread([r["entropy"] for r in rs]), mean_spread([r["response_len"] for r in rs], "{:.1f}"),
               mean_spread([r["guided_fraction"] for r in rs], "{:.2f}"),
               mean_spread([r["guided_mg2"] for r in rs], "{:.2f}"), mean_spread([r["prefix_p_mean"] for r in rs])]
        if styles:
            row += [mean_spread([r["greedy"].get(k) for r in rs], "{:.2f}")
                    for k in ("style_a", "style_b", "mixed", "step_b", "step_bad")]
        if extra:
            row.append(extra.get(config, "-"))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot(results: list[dict], groups: list[tuple[str, str, list[str]]], path: Path) -> None:
    """Held-out accuracy over steps, mean over seeds with the min-max band, one panel per group (the GRPO
    configs dashed: without prefix loss they often lie on top of each other at 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4.5), constrained_layout=True, squeeze=False)
    for ax, (title, task, configs) in zip(axes.flat, groups):
        for k, config in enumerate(configs):
            curves = [dict(r["curve"]) for r in results if r["task"] == task and r["config"] == config]
            if not curves:
                continue
            steps = sorted(set.intersection(*(set(c) for c in curves)))
            ys = [[c[s] for c in curves] for s in steps]
            color = f"C{k}"  # a config keeps its colour from panel to panel
            ax.plot(steps, [statistics.mean(y) for y in ys], marker="o", markersize=3, color=color,
                    linestyle="--" if config.startswith("grpo") else "-", label=f"{LABELS.get(config, config)} "
                    f"(n={len(curves)})")
            ax.fill_between(steps, [min(y) for y in ys], [max(y) for y in ys], color=color, alpha=0.12)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("greedy held-out accuracy (unguided)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_report(args: argparse.Namespace, results: list[dict], argv: list[str]) -> Path:
    args.docs.mkdir(parents=True, exist_ok=True)
    md, png = args.docs / "ablation.md", args.docs / "ablation.png"
    alpha_configs = [f"trsft_a{a:g}" for a in args.alphas]
    alpha_results = [dict(r, config=f"trsft_a{TRAPO_ALPHA:g}") if r["task"] == "addition" and r["config"] == "trapo"
                     else r for r in results if r["task"] == "addition"]
    groups = [(f"{task}: ablation configs", task, list(args.configs)) for task in args.tasks]
    if args.alphas and "addition" in args.tasks:
        groups.append(("addition: TrSFT alpha sweep", "addition", alpha_configs))
    plot(results + [r for r in alpha_results if r["config"] == f"trsft_a{TRAPO_ALPHA:g}"], groups, png)
    seconds = [r["seconds"] for r in results]
    cmd = " ".join(["python tools/ablation.py", *(a for a in argv if a != "--report-only")])
    parts = [
        "# TRAPO's ablation at toy scale",
        "",
        (f"Generated by `{cmd}` (tools/ablation.py) at commit `{git_commit()}` on "
        f"{datetime.date.today().isoformat()}. From a clean clone, `make ablation` reproduces it (it sets up "
        ".venv from the lock file, then runs that command); a re-run skips finished runs (runs/ablation/) and "
        "rewrites the tables and `docs/ablation.png`, keeping the reading below."),
        "",
        "## Budget",
        (f"Every run: the real trainer (`trapo train`, Megatron-Core at TP 1 in one process, one CPU twin engine "
        f"replica, math-verify rewards in one worker, OMP_NUM_THREADS=1), **{args.steps} steps of {args.prompts} "
        f"prompts**, lr 1e-3 cosine to 1e-4 over those steps, the preset's micro-groups (4/2/1/1 samples, L = "
        f"0/0.2/0.5/1.0) unless the ablation config changes them; greedy held-out accuracy (unguided) on "
        f"{args.eval_problems} held-out problems every {args.eval_every} steps. {len(results)} runs, "
        f"{args.jobs} at a time: one run took {min(seconds, default=0):.0f}-{max(seconds, default=0):.0f} s "
        f"(median {statistics.median(seconds) if seconds else 0:.0f} s) wall; the runs' times add up to "
        f"{sum(seconds) / 60:.0f} min, about {sum(seconds) / args.jobs / 60:.0f} min of wall time at {args.jobs} "
        "at a time (2 cores shared with other work: times are rough)."),
        "",
        ("Columns: held-out accuracy at step 0 (the base model) and at the last step; the rest are means over the "
        f"last {LAST} steps: entropy of response tokens, unguided response length (tokens), the fraction of "
        "samples that carried an expert prefix, the fraction of prompts guided at micro-group 2 and the policy's "
        "mean probability of the expert-prefix tokens it trained on (`prefix_p_mean`). Cells are "
        "mean ± standard deviation over seeds."),
    ]
    for task in args.tasks:
        rs = [r for r in results if r["task"] == task]
        parts += ["", f"## Task `{task}` ({TASKS[task]})", "",
                  table(rs, list(args.configs), LABELS, PAPER if task == "addition" else None,
                        styles=task == "two_styles")]
        if task == "two_styles":
            base = greedy_styles(REPO / TASK_ASSETS[task] / "model", REPO / TASK_ASSETS[task] / "heldout.jsonl",
                                 args.eval_problems)
            parts += ["", (f"The base model (step 0), for reference: greedy = style A {base['style_a']:.2f}, = style B "
                      f"{base['style_b']:.2f}, mixes A and B {base['mixed']:.2f}, steps in style B "
                      f"{base['step_b'] or 0:.2f}, invalid steps {base['step_bad'] or 0:.2f}.")]
            parts += ["", ("Greedy columns, from the exported model's greedy outputs on the same held-out problems: "
                      "the fraction that is exactly the style-A solution, exactly the style-B one, or mixes a "
                      "style-A step with a style-B step (the token-level blend); then every column step of every "
                      "output checked against its own digits: the fraction written in style B (sum digit first) "
                      "and the fraction valid in neither style.")]
    if args.alphas and "addition" in args.tasks:
        parts += ["", "## TrSFT alpha sweep (task `addition`, TRAPO with `loss.trsft_alpha` = alpha)", "",
                  table(alpha_results, alpha_configs, {c: f"alpha {c[len('trsft_a'):]}" for c in alpha_configs}),
                  "", f"alpha {TRAPO_ALPHA:g} is the TRAPO row above (the same runs)."]
    parts += ["", "## Curves", "", "![ablation curves](ablation.png)", ""]
    old = md.read_text() if md.is_file() else ""
    reading = old[old.index(READING_MARKER):] if READING_MARKER in old else READING_MARKER + "\n"
    md.write_text("\n".join(parts) + "\n" + reading)
    return md


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    runs = plan(args)
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401 - here, once: transformers'
    # lazy imports are not thread-safe, and greedy_styles runs in the pool's threads

    lock, done, failed = threading.Lock(), [], []
    t0 = time.perf_counter()
    print(f"ablation: {len(runs)} runs of {args.steps} steps x {args.prompts} prompts, {args.jobs} at a time, "
          f"into {args.out}", flush=True)

    def one(i_run: tuple[int, Run]) -> None:
        i, run = i_run
        record = run_dir(args, run) / "result.json"
        if args.report_only and not record.is_file():
            return
        try:
            skipped = record.is_file()
            result = json.loads(record.read_text()) if skipped else execute(args, run)
            if skipped:  # the end-of-run summary as this version of the tool reads metrics.jsonl
                result.update(summarize(read_rows(record.parent / "metrics.jsonl")))
            if "num_steps" not in result["greedy"]:  # a record from before the step-level check: score it again
                result["greedy"] = greedy_styles(record.parent / "hf", heldout_path(run), args.eval_problems)
                record.write_text(json.dumps(result, indent=1) + "\n")
        except Exception as e:  # noqa: BLE001 - one failed run must not stop the sweep; reported at the end
            with lock:
                failed.append(run.name)
                print(f"[{i}/{len(runs)}] {run.name}: FAILED: {e}", flush=True)
            return
        with lock:
            done.append(result)
            print(f"[{i}/{len(runs)}] {run.name}: {result['steps']} steps, {result['seconds']:.0f} s, held-out "
                  f"{result['heldout_start']:.3f} -> {result['heldout_end']:.3f}{' (already done)' if skipped else ''}",
                  flush=True)

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(one, enumerate(runs, 1)))
    wall = time.perf_counter() - t0
    order = {r.name: k for k, r in enumerate(runs)}
    done.sort(key=lambda r: order[f"{r['task']}/{r['config']}/seed{r['seed']}"])
    md = write_report(args, done, argv)
    print(f"ablation: {len(done)} runs done, {len(failed)} failed, {wall / 60:.1f} min; wrote {md} and "
          f"{md.with_suffix('.png')}", flush=True)
    if failed:
        print("ablation: failed runs: " + ", ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
