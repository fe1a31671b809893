"""``trapo convert hf-to-mcore | mcore-to-hf``: argument definitions and the runner the ``trapo`` CLI wires in.
Importing this module is cheap (no torch): the ``trapo`` parser imports every subcommand module.

    trapo convert hf-to-mcore HF_DIR OUT_DIR [--overwrite]
    trapo convert mcore-to-hf MCORE_DIR OUT_DIR [--hf-config DIR] [--max-shard-size 5GB] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable

DTYPES = ("bfloat16", "float16", "float32")  # torch attribute names; torch is imported only to run
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'5GB' / '500MiB' / '1000000' -> bytes (argparse type)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).upper() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 5GB, 500MiB, 1000000)")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``hf-to-mcore`` and ``mcore-to-hf`` sub-commands to ``parser`` (the ``convert`` parser)."""
    sub = parser.add_subparsers(dest="convert_direction", required=True, metavar="{hf-to-mcore,mcore-to-hf}")
    to_mcore = sub.add_parser(
        "hf-to-mcore", help="Hugging Face checkpoint -> Megatron distributed checkpoint (loads at any TP/PP)")
    to_mcore.add_argument("hf_dir", help="Hugging Face checkpoint directory (config.json + *.safetensors)")
    to_mcore.add_argument("out_dir", help="output directory (written to a temporary sibling, moved at the end)")
    to_hf = sub.add_parser(
        "mcore-to-hf", help="Megatron distributed checkpoint -> Hugging Face checkpoint (safetensors + index)")
    to_hf.add_argument("mcore_dir", help="torch_dist checkpoint directory (from hf-to-mcore or training)")
    to_hf.add_argument("out_dir", help="output directory (written to a temporary sibling, moved at the end)")
    to_hf.add_argument("--hf-config", default=None, metavar="DIR",
                       help="directory with config.json, generation config and tokenizer files "
                            "(default: the hf/ folder hf-to-mcore stores in the checkpoint)")
    to_hf.add_argument("--max-shard-size", type=parse_size, default=5 * 10**9, metavar="SIZE",
                       help="largest safetensors file (default 5GB)")
    to_hf.add_argument("--dtype", choices=DTYPES, default=None,
                       help="cast the weights (default: keep the checkpoint's dtype, bit for bit)")
    for p in (to_mcore, to_hf):
        p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _progress_bar(label: str, enabled: bool) -> Callable[[int], Callable[[], None]] | None:
    if not enabled:
        return None

    def start(total: int) -> Callable[[], None]:
        from tqdm import tqdm

        bar = tqdm(total=total, desc=label, unit="tensor", file=sys.stderr)
        return lambda: bar.update(1)

    return start


def run_convert(args: argparse.Namespace) -> int:
    """Run the conversion ``args`` describes; 0 on success, 2 with a one-line message on a user error."""
    import torch

    from trapo_megatron.convert.hf_to_mcore import convert_hf_to_mcore
    from trapo_megatron.convert.mcore_to_hf import convert_mcore_to_hf

    progress = _progress_bar(args.convert_direction, not args.no_progress)
    try:
        if args.convert_direction == "hf-to-mcore":
            out = convert_hf_to_mcore(args.hf_dir, args.out_dir, overwrite=args.overwrite, progress=progress)
        else:
            out = convert_mcore_to_hf(
                args.mcore_dir, args.out_dir, hf_config_dir=args.hf_config, max_shard_bytes=args.max_shard_size,
                dtype=getattr(torch, args.dtype) if args.dtype else None, overwrite=args.overwrite, progress=progress,
            )
    except (ValueError, FileExistsError, FileNotFoundError) as err:
        print(f"trapo convert {args.convert_direction}: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0
