"""Launch recipes as data: which config, how many nodes and GPUs, which TP x PP, for each example model.

A recipe's layout is the planner's (``trapo plan``) answer for that model and cluster, checked in the
tests; the 32B layout is the one NeMo-RL publishes for Qwen3-32B (TP4 x PP4 on 32 H100s).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(kw_only=True, frozen=True)
class Recipe:
    """One example run."""

    configs: tuple[str, ...]
    """YAML configs layered in order (``--config a --config b``), relative to the code directory (the repo,
    or its copy in the container); the big models layer their cluster settings on the paper preset."""
    nodes: int
    """Slurm nodes."""
    gpus_per_node: int
    """GPUs per node; 0 for the CPU demo."""
    nproc_per_node: int
    """Training processes per node (one per GPU; 2 gloo ranks for the CPU demo)."""
    tp: int
    """Tensor parallel size (parallel.tensor_model_parallel_size)."""
    pp: int
    """Pipeline parallel size (parallel.pipeline_model_parallel_size)."""
    time: str = "04:00:00"
    """Slurm wall-clock limit."""
    planner_model: str | None = None
    """Preset of ``trapo plan`` this recipe's layout is checked against."""
    seq_length: int = 9216
    """Prompt + response tokens the layout must hold (paper: 1024 + 8192)."""

    @property
    def world_size(self) -> int:
        return self.nodes * self.nproc_per_node

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp)

    def overrides(self) -> list[str]:
        """The config overrides that put the layout into the run."""
        return [f"parallel.tensor_model_parallel_size={self.tp}",
                f"parallel.pipeline_model_parallel_size={self.pp}"]


PAPER_PRESET = "examples/qwen2.5-math-7b_trapo.yaml"
"""The paper's algorithm settings (Qwen2.5-Math-7B); larger models layer their own file on top."""

RECIPES: dict[str, Recipe] = {
    "tiny-cpu": Recipe(configs=("examples/tiny_cpu.yaml",), nodes=1, gpus_per_node=0, nproc_per_node=2,
                       tp=2, pp=1, time="00:30:00", seq_length=64),
    "qwen2.5-math-7b": Recipe(configs=(PAPER_PRESET,), nodes=1, gpus_per_node=8,
                              nproc_per_node=8, tp=2, pp=1, time="48:00:00", planner_model="qwen2.5-math-7b"),
    "qwen2.5-32b": Recipe(configs=(PAPER_PRESET, "examples/qwen2.5-32b_trapo.yaml"), nodes=4, gpus_per_node=8,
                          nproc_per_node=8, tp=4, pp=4, time="48:00:00", planner_model="qwen2.5-32b"),
    "qwen2.5-72b": Recipe(configs=(PAPER_PRESET, "examples/qwen2.5-72b_trapo.yaml"), nodes=8, gpus_per_node=8,
                          nproc_per_node=8, tp=8, pp=4, time="48:00:00", planner_model="qwen2.5-72b"),
}


@dataclass(kw_only=True, frozen=True)
class Task:
    """A command the launcher can run, as ``python -m <module> <prefix...> <args...>``."""

    module: str
    prefix: tuple[str, ...] = ()
    distributed: bool = False
    """Run under torchrun on every node (else one process on one node)."""
    uses_config: bool = False
    """Takes ``--config`` for each recipe config and the recipe's layout overrides."""
    help: str = ""


TASKS: dict[str, Task] = {
    "train": Task(module="trapo_megatron.cli", prefix=("train",), distributed=True, uses_config=True,
                  help="trapo train --config <recipe configs> <layout overrides> <your overrides>"),
    "eval": Task(module="trapo_megatron.cli", prefix=("eval",), help="trapo eval <your args>"),
    "convert": Task(module="trapo_megatron.cli", prefix=("convert",), help="trapo convert <your args>"),
    "smoke": Task(module="trapo_megatron.launch.smoke", distributed=True,
                  help="all-reduce over every rank: checks nodes, GPUs and rendezvous before a long run"),
}

IMAGE_CODE_DIR = "/opt/trapo-megatron"
"""Where the Dockerfile puts the repository inside the image (configs are read from there on Slurm)."""
PACKAGED_CODE_DIR = "/nemo_run/code"
"""Where NeMo-Run unpacks a packaged checkout inside the container (--package-code)."""

# Environment of every launched process. Why each is set:
DEFAULT_ENV: dict[str, str] = {
    "PYTHONUNBUFFERED": "1",  # logs reach the Slurm output as they are written
    "TOKENIZERS_PARALLELISM": "false",  # tokenizers threads fight the reward and data workers
    "CUDA_DEVICE_MAX_CONNECTIONS": "1",  # Megatron needs it to overlap TP communication with compute
    "TORCH_NCCL_AVOID_RECORD_STREAMS": "1",  # frees NCCL buffers promptly (less fragmentation)
    "NCCL_DEBUG": "WARN",
    "HF_HUB_OFFLINE": "1",  # compute nodes usually have no internet: read models from the mounts
    "HF_DATASETS_OFFLINE": "1",
}


def task_args(recipe: Recipe, task: Task, code_dir: str, extra: list[str]) -> list[str]:
    """Arguments after ``python -m <task.module>``."""
    args = list(task.prefix)
    if task.uses_config:
        for config in recipe.configs:
            args += ["--config", config if config.startswith("/") else f"{code_dir.rstrip('/')}/{config}"]
        args += recipe.overrides()
    return args + list(extra)


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    return RECIPES[name]


@dataclass(kw_only=True)
class ClusterSettings:
    """Where and how a Slurm job runs (the flags of `trapo launch --executor slurm`)."""

    account: str = ""
    """Slurm account (required for Slurm)."""
    partition: str | None = None
    """Slurm partition."""
    time: str | None = None
    """Wall-clock limit; the recipe's when None."""
    nodes: int | None = None
    """Nodes; the recipe's when None."""
    gpus_per_node: int | None = None
    """GPUs per node; the recipe's when None."""
    container_image: str = ""
    """Container image (enroot/pyxis), built from this repo's Dockerfile (required for Slurm)."""
    mounts: list[str] = field(default_factory=list)
    """SRC:DST container mounts (data, models, checkpoints)."""
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment, over DEFAULT_ENV."""
    job_dir: str = ""
    """Where NeMo-Run keeps the job's scripts and logs on the cluster."""
    ssh: str | None = None
    """user@host of the login node when launching from elsewhere; None: sbatch runs here."""
    package_code: bool = False
    """Ship the checkout (git archive of HEAD) with the job instead of using the image's copy."""

    def __post_init__(self) -> None:
        for name in ("nodes", "gpus_per_node"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        for m in self.mounts:
            if ":" not in m:
                raise ValueError(f"--mount {m!r} must look like SRC:DST")
