"""Experiments: what notebooks run, built from their parameters.

- `grid.py`: THE grid runner (`grid`, `run_grid`, `steps_for`, `with_paths`).
- `notebook.py`: the notebooks' set-up from parameters, the summary writer, across-run soups.
- `starts.py`: starting points (pretrained, random, ImageNet weights plus noise).
- `quickstart.py`: the quickstart's defaults and `python -m vldlib quickstart`.
"""
