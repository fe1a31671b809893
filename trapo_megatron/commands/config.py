"""`trapo config`: every field of a run's configuration with its type, default and meaning, or the resolved
configuration of a YAML file plus overrides."""

from __future__ import annotations

import argparse
import sys

import yaml

from trapo_megatron.config import ConfigError, describe, to_dict


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", action="append",
                        help="resolve and print these YAML files (layered, with the overrides) instead")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="dotted overrides")


def run_config(args: argparse.Namespace) -> int:
    from trapo_megatron.train.config import TrapoConfig, load_config

    if args.config is None:
        for key, type_name, default, doc in describe(TrapoConfig):
            print(f"{key}: {type_name} = {default!r}\n    {doc}")
        return 0
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"trapo config: {e}", file=sys.stderr)
        return 2
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    return 0
