"""Speed and precision measurements: data paths against the compute limit (`bench`), whole runs
(`runs`), bf16 against fp32 accuracy (`precision`), the self-contained GPU check (`gpu_check`), a
run's cost at 96 px against a backbone's native resolution (`resolution`), the explorer's stop
latency and first point (`explorer`), and `python -m vldlib bench` (`cli`)."""
