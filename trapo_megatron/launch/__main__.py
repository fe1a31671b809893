"""``python -m trapo_megatron.launch``: `trapo launch` without the rest of the CLI."""

import sys

from trapo_megatron.commands.launch import main

if __name__ == "__main__":
    sys.exit(main())
