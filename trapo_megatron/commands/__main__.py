"""``python -m trapo_megatron.commands <command> ...``: the ``trapo`` command (what torchrun and the launch
recipes run on every rank)."""

import sys

from trapo_megatron.commands import main

if __name__ == "__main__":
    sys.exit(main())
