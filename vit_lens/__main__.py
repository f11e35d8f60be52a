"""``python -m vit_lens`` is the ``vit-lens`` command (so ``torchrun -m vit_lens run ...`` works)."""

import sys

from vit_lens.cli import console_main

if __name__ == "__main__":
    sys.exit(console_main())
