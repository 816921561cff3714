"""From run folders to conclusions: pure functions of the runs' records.

- `scores.py`: run folders -> one tidy table; THE rule of which split is i.i.d./o.o.d. (the loop uses it too).
- `selection.py`: one checkpoint per run (training-domain validation, oracle, last); mean ± se over seeds.
- `tables.py`: DomainBed tables, the paper's numbers beside ours (`reference.py`), Markdown/LaTeX.
- `plots.py`: figures, shown inline and saved as PNG; `axes.py`: axis helpers without seaborn or pyplot.
- `effects.py`: paired differences, THE verdict rule (`is_detectable`: the 95% t interval excludes 0)
  and THE effect sentence; `student.py`: Student's t interval and p-value.
- `power.py`: effects averaged over held-out domains, the smallest detectable effect, seeds needed.
- `convergence.py`: did every run plateau and fit its training data?
- `premise.py`: the premise gauge: is a regime inside the paper's premise? (no o.o.d. number read)
- `combine.py`: across-run soups and logit ensembles (handed the loop's loaders).
- `report.py`: `python -m vldlib report`, and the report notebook's helpers.

This layer sits below the training loop: it never imports `vldlib.loop`.
"""
