"""vldlib: fine-tuning with very large dropout (Zhang & Bottou 2024), reproduced and explained.

The package is deliberately thin: datasets (`vldlib.data`), models (`vldlib.models`), the one
training loop (`vldlib.train`), result collection and model selection (`vldlib.results`), analyses
(`vldlib.analysis`), notebook batches (`vldlib.sweep`) and benchmarks (`vldlib.bench`).
"""

__version__ = "0.1.0"
