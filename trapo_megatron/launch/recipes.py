"""Launch recipes as data: which config, how many nodes and GPUs, which TP x PP, for each example model.

A recipe's layout is the planner's (``trapo plan``) answer for that model and cluster, checked in the
tests; the 32B layout is the one NeMo-RL publishes for Qwen3-32B (TP4 x PP4 on 32 H100s).
"""

from __future__ import annotations

import re
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
    stops_on_signal: bool = False
    """Catches Slurm's warning signal and SIGTERM, checkpoints and exits (the trainer); other tasks get no
    warning signal (its default action would kill them)."""
    help: str = ""


TASKS: dict[str, Task] = {
    "train": Task(module="trapo_megatron.commands", prefix=("train",), distributed=True, uses_config=True,
                  stops_on_signal=True, help="trapo train --config <recipe configs> <layout overrides> <your overrides>"),
    "eval": Task(module="trapo_megatron.commands", prefix=("eval",), help="trapo eval <your args>"),
    "convert": Task(module="trapo_megatron.commands", prefix=("convert",), help="trapo convert <your args>"),
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


NETWORK_ENV = re.compile(r"GLOO_SOCKET_IFNAME|NCCL_SOCKET_IFNAME|NCCL_IB_\w+")
"""Network knobs of a multi-node job (which interface gloo and NCCL bind, which InfiniBand HCAs, GID index...):
set where `trapo launch` runs, they are passed to the job by name, as ``--env-from-host`` names are."""

RENDEZVOUS_PORT = 29500
"""torchrun's port on the first node of a multi-node job (every node connects to it)."""

RESUME = "checkpoint.resume=true"
"""Launched runs resume from <run.output_dir>/checkpoints/latest when it exists (a requeued or chained job
continues; a fresh run starts at step 0); an explicit override after it wins."""


def task_args(recipe: Recipe | None, task: Task, code_dir: str, extra: list[str],
              configs: tuple[str, ...] = ()) -> list[str]:
    """Arguments after ``python -m <task.module>``: the recipe's configs (relative to ``code_dir``), then
    ``configs`` (paths as the job sees them), the recipe's layout, resume on, then ``extra``."""
    args = list(task.prefix)
    if task.uses_config:
        recipe_configs = recipe.configs if recipe else ()
        for config in (*recipe_configs, *configs):
            args += ["--config", config if config.startswith("/") else f"{code_dir.rstrip('/')}/{config}"]
        args += [*(recipe.overrides() if recipe else []), RESUME]
    return args + list(extra)


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    return RECIPES[name]


@dataclass(kw_only=True)
class ClusterSettings:
    """Where and how a Slurm job runs (the flags of `trapo launch --executor slurm`)."""

    account: str = ""
    """Slurm account; "": the cluster's default for you."""
    partition: str | None = None
    """Slurm partition."""
    time: str | None = None
    """Wall-clock limit (Slurm --time formats); the recipe's when None."""
    nodes: int | None = None
    """Nodes; the recipe's when None."""
    gpus_per_node: int | None = None
    """GPUs per node; the recipe's when None."""
    nproc_per_node: int | None = None
    """Ranks per node of a CPU recipe (0 GPUs); the recipe's when None. GPU jobs run one rank per GPU."""
    container_image: str = ""
    """Container image (enroot/pyxis), built from this repo's Dockerfile; "": run on the node's own
    filesystem with ``python`` (this checkout and this interpreter, on a shared filesystem)."""
    mounts: list[str] = field(default_factory=list)
    """SRC:DST container mounts (data, models, checkpoints)."""
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment, over DEFAULT_ENV, written into the sbatch script."""
    env_from_host: list[str] = field(default_factory=list)
    """Names of variables (tokens, keys) the job inherits from the submitting environment at submission
    (sbatch --export=ALL); their values are never written into the script."""
    job_dir: str = ""
    """Where NeMo-Run keeps the job's scripts and logs on the cluster; "": NEMORUN_HOME/experiments here
    (required with ``ssh``: an absolute path on the cluster)."""
    ssh: str | None = None
    """user@host[:port] of the login node when launching from elsewhere; None: sbatch runs here."""
    ssh_identity: str = ""
    """Private key for ``ssh``; "": the ssh agent and the default keys."""
    package_code: bool = False
    """Ship the checkout (git archive of HEAD) with the job instead of using the image's copy."""
    python: str = ""
    """The job's interpreter; "": ``python`` in a container, this interpreter without one."""
    qos: str | None = None
    """Slurm QOS."""
    gres: str | None = None
    """Slurm generic resources, e.g. gpu:8 (clusters that want --gres instead of --gpus-per-node)."""
    mem: str | None = None
    """Memory per node, e.g. 0 (all) or 1500G."""
    constraint: str | None = None
    """Node features, e.g. h100."""
    exclude: str | None = None
    """Nodes to avoid, e.g. node[01-03]."""
    srun_args: list[str] = field(default_factory=list)
    """Extra srun arguments for the training step, e.g. --mpi=pmix."""
    container_env: list[str] = field(default_factory=list)
    """Variable names passed into the container (pyxis --container-env)."""
    additional_parameters: dict[str, str] = field(default_factory=dict)
    """Any other #SBATCH flag, name -> value, e.g. mail-type=END."""
    retries: int = 0
    """Times the job requeues itself after a failed or stopped attempt (nemo-run's TORCHX_MAX_RETRIES)."""
    signal: str = "USR1@300"
    """Warning before the time limit (sbatch --signal): the trainer checkpoints and exits; "" for none."""
    chain: int = 1
    """Jobs in a dependency chain (afterany): each starts when the previous ends and resumes the run."""
    after: str = ""
    """A Slurm job id the (first) job starts after (afterany), e.g. a running job of the same run that it
    then resumes; "": none."""

    def __post_init__(self) -> None:
        for name in ("nodes", "gpus_per_node", "nproc_per_node"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        for m in self.mounts:
            if ":" not in m:
                raise ValueError(f"--mount {m!r} must look like SRC:DST")
        if self.retries < 0 or self.chain < 1:
            raise ValueError(f"--retries must be >= 0 and --chain >= 1, got {self.retries} and {self.chain}")
        for name in ("job_dir", "python"):
            value = getattr(self, name)
            if value and (value.startswith("~") or (not value.startswith("/") and (name == "job_dir" or "/" in value))):
                raise ValueError(f"--{name.replace('_', '-')} {value!r} must be an absolute path (Slurm does not "
                                 "expand ~ or resolve relative paths)")
        if not self.container_image and "/nemo_run" in self.job_dir:
            # without a container NeMo-Run 0.11.1 rewrites every "/nemo_run" of the sbatch script into the job
            # directory (core/execution/slurm.py, SlurmBatchRequest.materialize): such a path would break
            raise ValueError(f"--job-dir {self.job_dir!r} contains '/nemo_run', which NeMo-Run rewrites in "
                             "scripts without a container; choose another directory")
        if self.after and not re.fullmatch(r"\d+(_\d+)?", self.after):
            raise ValueError(f"--after {self.after!r} must be a Slurm job id, e.g. 12345")
        if self.after and "dependency" in self.additional_parameters:
            raise ValueError("--after and --additional-parameter dependency=... both set the job's dependency; "
                             "give one")
        if self.ssh and not re.fullmatch(r"([^@:\s]+@)?[^@:\s]+(:\d+)?", self.ssh):
            raise ValueError(f"--ssh {self.ssh!r} must look like USER@HOST or USER@HOST:PORT")
        if self.ssh_identity and not self.ssh:
            raise ValueError("--ssh-identity needs --ssh")
        if self.ssh and not self.job_dir:
            raise ValueError("--ssh needs --job-dir: an absolute directory on the cluster for the job's files")

    def layout(self, task: Task, recipe: Recipe) -> tuple[int, int, int]:
        """(nodes, GPUs per node, ranks per node) of the job: one node for single-process tasks; CPU recipes
        (0 GPUs) run their processes per node on CPUs."""
        gpus = self.gpus_per_node or recipe.gpus_per_node
        if not task.distributed:
            return 1, gpus, 1
        return self.nodes or recipe.nodes, gpus, gpus or self.nproc_per_node or recipe.nproc_per_node

    @property
    def ssh_target(self) -> tuple[str, str, int | None]:
        """(user, host, port) of ``ssh``; user "" when not given, port None for ssh's default."""
        user, _, rest = (self.ssh or "").rpartition("@")
        host, _, port = rest.partition(":")
        return user, host, int(port) if port else None

    @property
    def mount_targets(self) -> list[str]:
        """Container paths of the mounts."""
        return [m.split(":")[1] for m in self.mounts]
