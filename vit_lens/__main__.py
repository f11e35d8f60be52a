"""``python -m vit_lens`` is the ``vit-lens`` command (so ``torchrun -m vit_lens run ...`` works)."""

import sys

from vit_lens.cli import main

if __name__ == "__main__":
    sys.exit(main())
