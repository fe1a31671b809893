"""``python -m trapo_megatron.plan``: `trapo plan` without the rest of the CLI."""

import sys

from trapo_megatron.commands.plan import main

if __name__ == "__main__":
    sys.exit(main())
