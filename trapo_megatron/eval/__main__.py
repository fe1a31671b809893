"""``python -m trapo_megatron.eval``: `trapo eval` without the rest of the CLI."""

import sys

from trapo_megatron.eval.cli import main

if __name__ == "__main__":
    sys.exit(main())
