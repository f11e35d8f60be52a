"""Dataset-scale runs: ``vit-lens run ANALYSIS --model M --data SRC --out DIR`` as a library.

* :func:`run` -- data source -> fixed chunks -> DataLoader batches -> analysis rows -> one Parquet
  shard per chunk + ``manifest.json``; resumable exactly once; shared between ``torchrun`` processes.
* :data:`ANALYSES` / :func:`register` -- the analyses (``identifiability``, ``logit-lens``, ``dla``,
  ``knockout``, ``context-ablation``, ``patching``); a new one is one function
  ``fn(model, batch, **options) -> DataFrame``.
* :func:`open_source` -- ``--data``: a folder, a labels CSV or ``hf:PATH[:split]``.

Read the results with :func:`vit_lens.results.load`.
"""

from vit_lens.runs.analyses import ANALYSES, ROW_COLUMNS, Analysis, RunBatch, corrupt_images, get_analysis, register
from vit_lens.runs.engine import STOP_AFTER_ENV, ConfigMismatchError, RunLockedError, RunReport, read_manifest, run
from vit_lens.runs.sources import DataSource, open_source

__all__ = [
    "ANALYSES",
    "Analysis",
    "ConfigMismatchError",
    "RunLockedError",
    "DataSource",
    "ROW_COLUMNS",
    "RunBatch",
    "RunReport",
    "STOP_AFTER_ENV",
    "corrupt_images",
    "get_analysis",
    "open_source",
    "read_manifest",
    "register",
    "run",
]
