"""``python -m trapo_megatron.eval``: `trapo eval` without the rest of the CLI."""

import sys

from trapo_megatron.commands.eval import main

if __name__ == "__main__":
    sys.exit(main())
