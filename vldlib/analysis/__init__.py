"""Mechanism analyses behind the paper's explanation, one small module each.

- `runs`: a finished run as tensors (its network, its starting point, trunk outputs of every split);
- `feature_usage`: how many penultimate features a head relies on (importances, participation
  ratio, top-k / random-k ablations): very large dropout should spread the weight;
- `usage_map`: feature usage across the effect map's cells (paired differences per cell and rate,
  and whether the change in usage predicts the o.o.d. gain: Spearman with a bootstrap over seeds);
- `linearity`: Taylor model of fine-tuning (`torch.func.jvp`), distance travelled, weight vs
  representation interpolation: fine-tuning should be near-linear, training from scratch not;
- `dropout_l2`: dropout on a linear head's inputs against its analytic L2-type penalty;
- `dropout_l2_study`: notebook 12's study of it per rate, held-out domain, seed and depth;
- `explorer`: the ipywidgets dropout explorer (testable without a front-end);
- `explorer_study`: its yardstick: the map's tuned recipe, and the committed study a run is set against;
- `teaching`: exercise checkers, a tiny CNN and a small training loop for the teaching notebook.

Modules are imported on use (`from vldlib.analysis import feature_usage`), so importing the
package costs nothing.

>>> from vldlib.analysis.feature_usage import participation_ratio
>>> participation_ratio([1.0, 1.0, 1.0])
3.0
"""

__all__ = ["dropout_l2", "dropout_l2_study", "explorer", "explorer_study", "feature_usage", "linearity", "runs", "teaching", "usage_map"]
