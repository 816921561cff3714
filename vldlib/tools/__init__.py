"""Tools that drive vldlib from outside a notebook: batches of notebooks (sweep), benchmarks (bench)."""
