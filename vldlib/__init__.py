"""vldlib: fine-tuning with very large dropout (Zhang & Bottou 2024), reproduced and explained.

Layers, each importing only from those below it (checked by import-linter, see pyproject.toml):
`cli` > `tools` (sweep, bench) > `analysis` > `experiments` > `loop` > `evaluate` > `config` >
`model` > `data` > `utils`, `paths`. The README's "Architecture" section says where to add what.
"""

__version__ = "0.1.0"
