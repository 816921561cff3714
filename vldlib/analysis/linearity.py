"""Is fine-tuning near-linear? Taylor models, weight distances and interpolation paths.

The paper argues that fine-tuning a pretrained network on a small dataset barely leaves the
linear regime around the pretrained weights theta0: the fine-tuned network f(theta1) is close to
its first-order Taylor model f(theta0) + J (theta1 - theta0), so it re-weights existing features
instead of building new ones. From scratch, the same training moves far and the Taylor model is
useless. This module measures it:

- `taylor_logits`: the Taylor model's logits by one forward-mode product (`torch.func.jvp` of
  `functional_call` over the trained parameters), buffers (frozen BatchNorm statistics) fixed, in
  eval mode, so the expansion is exact for a network linear in its parameters;
- `taylor_report`: accuracy of f(theta0), f(theta1), the Taylor model, and their agreement;
- `weight_distance`: how far training moved, absolute and relative to ||theta0||;
- `interpolation_path`: the paper's Fig 1 contrast, accuracy along (1-a) theta_A + a theta_B
  (weights) versus (1-a) f_A + a f_B (representations read by a linear classifier: a linear
  readout of the concatenation [(1-a) phi_A, a phi_B] is exactly the interpolation of logits).
  Near-linear fine-tuning makes the two curves coincide.

>>> f1, flin, f0 = taylor_logits(net0.tail, net1.tail, x)           # doctest: +SKIP
>>> (flin.argmax(1) == f1.argmax(1)).float().mean()                  # doctest: +SKIP
"""

from __future__ import annotations

import copy
from typing import Callable, Iterable, Mapping

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.func import functional_call, jvp
from vldlib.analysis.runs import initial_net, load_run_data, majority_rate
from vldlib.evaluate.plots import rate_palette
from vldlib.paths import shown


class _Method(nn.Module):
    """A module whose forward is a bound method of another (e.g. `FineTuneNet.tail`), so that
    `functional_call` can swap the parameters it reads."""

    def __init__(self, owner: nn.Module, method: str):
        super().__init__()
        self.owner = owner
        self.method = method

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self.owner, self.method)(x)


def _as_module(f: nn.Module | Callable) -> nn.Module:
    if isinstance(f, nn.Module):
        return f
    owner = getattr(f, "__self__", None)
    if isinstance(owner, nn.Module):
        return _Method(owner, f.__name__)
    raise TypeError(f"expected an nn.Module or a bound method of one (e.g. net.tail), got {type(f).__name__}")


def trained_params(module: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters that training updates (requires_grad), by name, detached."""
    return {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}


def _check_buffers(m0: nn.Module, m1: nn.Module) -> None:
    b1 = dict(m1.named_buffers())
    for n, b in m0.named_buffers():
        if n in b1 and b.is_floating_point() and not torch.equal(b, b1[n]):
            raise ValueError(f"buffer {n!r} differs between the two networks: BatchNorm statistics changed "
                             f"during training (freeze_bn=False?), so the Taylor model in the parameters alone "
                             f"is not the fine-tuned network's expansion. Use runs trained with freeze_bn=True.")


def taylor_logits(f0: nn.Module | Callable, f1: nn.Module | Callable, x: torch.Tensor, batch: int = 256
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(f(theta1)(x), Taylor model f(theta0)(x) + J (theta1 - theta0), f(theta0)(x)).

    `f0`, `f1`: the same architecture at the expansion point and after training (modules or bound
    methods such as `net.tail`); they are put in eval mode (no dropout, frozen BatchNorm). The
    parameters differing between them must be the trainable ones of `f0`.
    """
    m0, m1 = _as_module(f0), _as_module(f1)
    m0.eval(), m1.eval()
    _check_buffers(m0, m1)
    p0 = trained_params(m0)
    p1 = dict(m1.named_parameters())
    missing = [n for n in p0 if n not in p1]
    if missing:
        raise ValueError(f"the two networks differ in architecture: {missing[:3]} missing in the second")
    delta = {n: (p1[n].detach() - p0[n]) for n in p0}
    outs = [], [], []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            xb = x[i:i + batch]
            y0, dy = jvp(lambda p: functional_call(m0, p, (xb,), strict=False), (p0,), (delta,))
            outs[0].append(m1(xb))
            outs[1].append(y0 + dy)
            outs[2].append(y0)
    return tuple(torch.cat(o) for o in outs)


def weight_distance(m0: nn.Module, m1: nn.Module, exclude: Iterable[str] = ()) -> dict[str, float]:
    """||theta1 - theta0|| over the trainable parameters of m0 (names containing any of `exclude`
    skipped), and relative to ||theta0||.

    >>> a = nn.Linear(2, 1); b = copy.deepcopy(a)
    >>> weight_distance(a, b)["distance"]
    0.0
    """
    p0, p1 = trained_params(m0), dict(m1.named_parameters())
    names = [n for n in p0 if not any(e in n for e in exclude)]
    if not names:
        return {"distance": 0.0, "norm0": 0.0, "relative": float("nan"), "n_params": 0}
    d = torch.sqrt(sum(((p1[n].detach() - p0[n]) ** 2).sum() for n in names))
    n0 = torch.sqrt(sum((p0[n] ** 2).sum() for n in names))
    return {"distance": float(d), "norm0": float(n0), "relative": float(d / n0) if n0 > 0 else float("nan"),
            "n_params": int(sum(p0[n].numel() for n in names))}


def _acc(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(1) == y).float().mean())


def taylor_report(f0: nn.Module | Callable, f1: nn.Module | Callable, x: torch.Tensor, y: torch.Tensor) -> dict:
    """Accuracies of the start, the trained network and its Taylor model on (x, y), and how well
    the Taylor model matches: prediction agreement and relative logit error
    ||f1 - f_lin|| / ||f1 - f0|| (0 = exactly linear; 1 = the linear term explains nothing)."""
    ft, flin, fs = taylor_logits(f0, f1, x)
    moved = (ft - fs).norm()
    return {"acc_start": _acc(fs, y), "acc_trained": _acc(ft, y), "acc_taylor": _acc(flin, y),
            "agreement": float((flin.argmax(1) == ft.argmax(1)).float().mean()),
            "rel_logit_error": float((ft - flin).norm() / moved) if moved > 0 else 0.0}


def interpolate_state(sa: Mapping[str, torch.Tensor], sb: Mapping[str, torch.Tensor], a: float) -> dict:
    """(1 - a) sa + a sb for floating tensors; others (counters) from sa."""
    if sa.keys() != sb.keys():
        raise ValueError(f"the two state dicts have different keys: {sorted(set(sa) ^ set(sb))[:5]}")
    return {k: (1 - a) * v + a * sb[k] if v.is_floating_point() else v for k, v in sa.items()}


@torch.no_grad()
def interpolation_path(net_a: nn.Module, net_b: nn.Module, forward: str, x: torch.Tensor, y: torch.Tensor,
                       alphas: Iterable[float] = tuple(np.linspace(0, 1, 11)), batch: int = 256) -> pd.DataFrame:
    """Accuracy along the weight path and the representation (logit) path between two networks.

    `forward` names the method to call on the networks with `x` (e.g. "tail" when `x` are trunk
    outputs). Rows: alpha, path ("weights" or "representations"), acc.
    """
    def run(net: nn.Module) -> torch.Tensor:
        net.eval()
        f = getattr(net, forward)
        return torch.cat([f(x[i:i + batch]) for i in range(0, len(x), batch)])

    fa, fb = run(net_a), run(net_b)
    sa, sb = net_a.state_dict(), net_b.state_dict()
    probe = copy.deepcopy(net_a)
    rows = []
    for a in alphas:
        a = float(a)
        probe.load_state_dict(interpolate_state(sa, sb, a))
        rows.append({"alpha": a, "path": "weights", "acc": _acc(run(probe), y)})
        rows.append({"alpha": a, "path": "representations", "acc": _acc((1 - a) * fa + a * fb, y)})
    return pd.DataFrame(rows)


def finetune_distances(net0: nn.Module, net1: nn.Module) -> dict[str, float]:
    """Distance travelled by the body (trained stages) and by the head of a `FineTuneNet`, apart:
    the head starts from a random initialisation, so only the body's relative distance says how
    far fine-tuning moved the pretrained weights."""
    head_ids = {id(p) for p in net0.head().parameters()}
    head_names = [n for n, p in net0.named_parameters() if id(p) in head_ids]
    body_names = [n for n, p in net0.named_parameters() if p.requires_grad and id(p) not in head_ids]
    body = weight_distance(net0, net1, exclude=head_names) if body_names else \
        {"distance": 0.0, "norm0": 0.0, "relative": float("nan"), "n_params": 0}
    p0, p1 = dict(net0.named_parameters()), dict(net1.named_parameters())
    head = float(torch.sqrt(sum(((p1[n].detach() - p0[n].detach()) ** 2).sum() for n in head_names)))
    return {"body_distance": body["distance"], "body_relative": body["relative"], "body_params": body["n_params"],
            "head_distance": head}


# --------------------------------------------------------------------------- the notebook's table and conclusion
def taylor_table(configs, run_dirs, device: str = "auto") -> pd.DataFrame:
    """One row per (fine-tuned run, split): `taylor_report`, `finetune_distances`, and the
    majority-class rate (always predicting the training split's most frequent class), the floor a
    trained model must beat before its agreement with a Taylor model means anything."""

    rows = []
    for cfg, run in zip(configs, run_dirs):
        rd = load_run_data(run, device=device)
        net0 = initial_net(rd.cfg, len(rd.meta["classes"]))
        dist = finetune_distances(net0, rd.net)
        majority = int(torch.bincount(rd.inputs("train")[1]).argmax())
        for split in ("iid", "ood"):
            x, y = rd.inputs(split)
            rep = taylor_report(net0.tail, rd.net.tail, x, y)
            rows.append({"init": "pretrained" if cfg.pretrained else "scratch", "dropout": cfg.dropout,
                         "seed": cfg.seed, "split": split, **rep, **dist,
                         "majority_acc": float((y == majority).float().mean())})
    return pd.DataFrame(rows)


def _mean_se(values: pd.Series) -> str:
    """'m ± se (n=k)' in percent; with one value, 'm (n=1, no error bar)'."""
    m, n = 100 * values.mean(), len(values)
    return f"{m:.1f}% (n=1, no error bar)" if n < 2 else f"{m:.1f}% ± {100 * values.sem():.1f} (n={n})"


def conclusion_lines(taylor: pd.DataFrame, paths: pd.DataFrame) -> list[str]:
    """The summary, computed: per init, whether the trained network beats the majority class (if
    not, its linearity says nothing), agreement with the Taylor model (mean ± s.e. over seeds,
    rates and splits), whether the relative logit error reaches 1 (then, by its definition, the
    linear term does not describe the change), and the interpolation gap."""
    lines, beats = [], {}
    for init, g in taylor.groupby("init"):
        per_seed = g.groupby(["dropout", "seed"])  # one value per run: mean over its splits
        er = g.rel_logit_error
        beats[init] = bool((g.acc_trained > g.majority_acc + 1e-9).mean() > 0.5)
        floor = (f"it beats the majority class ({_mean_se(per_seed.acc_trained.mean())} vs "
                 f"{100 * g.majority_acc.mean():.1f}%)" if beats[init] else
                 f"it does NOT beat the majority class ({_mean_se(per_seed.acc_trained.mean())} vs "
                 f"{100 * g.majority_acc.mean():.1f}%): a near-constant predictor, so its agreement with a "
                 f"Taylor model says nothing about linearity")
        if er.min() >= 1:
            linear = (f"its relative logit error is at least 1 in every run and split (min {er.min():.2f}, "
                      f"mean {er.mean():.2f}): the linear term does not describe the change of its outputs")
        elif er.max() < 1:
            linear = f"its relative logit error stays below 1 (max {er.max():.2f}): the linear term describes most of the change"
        else:
            linear = (f"its relative logit error is at least 1 in {int((er >= 1).sum())} of {len(er)} run-splits "
                      f"(range {er.min():.2f}-{er.max():.2f})")
        lines.append(f"- **{init}**: {floor}; the Taylor model agrees with it on {_mean_se(per_seed.agreement.mean())} "
                     f"of the predictions; {linear}; the trained stage moved "
                     f"{100 * g.drop_duplicates(['dropout', 'seed']).body_relative.mean():.1f}% of its initial norm.")
    if set(beats) == {"pretrained", "scratch"}:
        p, s = (taylor[taylor.init == k].agreement.mean() for k in ("pretrained", "scratch"))
        if not beats["scratch"]:
            lines.append("- No pretrained-vs-scratch comparison of linearity: the from-scratch baseline did not beat "
                         "the majority class (train it longer, or with another learning rate).")
        else:
            verdict = "closer to linear when pretrained" if p > s else "not closer to linear when pretrained"
            lines.append(f"- Fine-tuning from pretrained weights is {verdict} (agreement {100 * p:.1f}% vs "
                         f"{100 * s:.1f}% from scratch, by this measure).")
    wide = paths.pivot_table(index=["dropout", "seed", "split", "alpha"], columns="path", values="acc").reset_index()
    gap = (wide.weights - wide.representations).abs()
    lines.append(f"- Interpolation: weights and representations paths differ by at most {100 * gap.max():.1f} points "
                 f"(mean {100 * gap.mean():.1f}) along the path.")
    return lines


def interpolation_table(pairs, probe_dirs, alphas, device: str = "auto") -> pd.DataFrame:
    """Accuracy along the weights and representations paths (`interpolation_path`) from each
    linear probe (head-only run) to the matching fine-tuned run, on the i.i.d. and o.o.d. splits.
    `pairs`: (config, run dir) of the fine-tuned runs, in the probes' order."""

    paths = []
    for (cfg, run), probe in zip(pairs, probe_dirs):
        rd = load_run_data(run, device=device)
        start = load_run_data(probe, device=device).net
        a_net = initial_net(rd.cfg, len(rd.meta["classes"]))
        a_net.model.load_state_dict(start.model.state_dict())  # probe's weights, fine-tuned net's stage split
        for split in ("iid", "ood"):
            x, y = rd.inputs(split)
            t = interpolation_path(a_net, rd.net, "tail", x, y, alphas=alphas)
            paths.append(t.assign(dropout=cfg.dropout, seed=cfg.seed, split=split))
    return pd.concat(paths, ignore_index=True)


def plot_taylor(taylor: pd.DataFrame):
    """o.o.d. accuracy of the fine-tuned network, its Taylor model and its start (with the
    majority-class line), the Taylor model's agreement, and the distance travelled; ± s.e. over runs."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    long = taylor.melt(id_vars=["init", "dropout", "split", "seed"], value_vars=["acc_trained", "acc_taylor", "acc_start"],
                       var_name="model", value_name="accuracy").assign(accuracy=lambda t: 100 * t.accuracy)
    long["model"] = long.model.map({"acc_trained": "fine-tuned f(θ1)", "acc_taylor": "Taylor model",
                                    "acc_start": "start f(θ0)"})
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    sns.barplot(long[long.split == "ood"], x="init", y="accuracy", hue="model", errorbar="se", ax=axes[0])
    axes[0].axhline(100 * taylor[taylor.split == "ood"].majority_acc.mean(), color="k", ls="--", lw=1,
                    label="majority class")
    axes[0].set(title="o.o.d. accuracy (all rates; ± s.e.)", ylim=(0, 100), ylabel="accuracy (%)")
    axes[0].legend(fontsize=7)
    rate = taylor.assign(rate=taylor.dropout.map("{:g}".format))
    sns.barplot(rate, x="init", y="agreement", hue="rate", errorbar="se", palette=rate_palette(taylor.dropout), ax=axes[1])
    axes[1].set(title="Taylor model agrees with fine-tuned (± s.e.)", ylim=(0, 1), ylabel="agreement (fraction)")
    sns.barplot(rate, x="init", y="body_relative", hue="rate", errorbar="se", palette=rate_palette(taylor.dropout), ax=axes[2])
    axes[2].set(title="relative distance of the trained stage", ylabel="||θ1-θ0|| / ||θ0||")
    for ax in axes[1:]:
        ax.legend(title="dropout rate", fontsize=7)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- the study: depth x init x rate, every domain
INITS = ("pretrained", "scratch")
METRICS = {"agreement": "Taylor-model agreement (o.o.d.)", "rel_logit_error": "relative logit error (o.o.d.)",
           "body_relative": "relative distance travelled by the trained stages", "acc_trained": "o.o.d. accuracy"}


def stage_keys(model: nn.Module, depth: int) -> list[str]:
    """State-dict keys (parameters and buffers) of the last `depth` units of `named_stages`: what a
    run with `train_stages=depth` trains, besides the head (EfficientNet-Lite0, depth 1: conv_head
    and its BatchNorm bn2)."""
    from vldlib.model.backbones import named_stages

    if depth <= 0:
        return []
    ids = {id(t) for _, stage in named_stages(model)[-depth:] for t in [*stage.parameters(), *stage.buffers()]}
    return [k for k, t in model.state_dict(keep_vars=True).items() if id(t) in ids]


def scratch_state(backbone: str, depth: int, seed: int, pretrained: bool = True) -> dict[str, torch.Tensor]:
    """"From scratch at the same depth": the pretrained network's state, with the `depth` trained
    stages replaced by a fresh random initialisation (the backbone's own, seeded by `seed`). The
    frozen part keeps its pretrained weights, so both arms train the same stages on the same frozen
    features and differ only in where those stages start."""
    from vldlib.model import create_model

    state = create_model(backbone, 1, pretrained=pretrained).state_dict()
    torch.manual_seed(1_000_003 + int(seed))
    fresh = create_model(backbone, 1, pretrained=False)
    for k in stage_keys(fresh, depth):
        state[k] = fresh.state_dict()[k].clone()
    return state


def scratch_weights_file(backbone: str, depth: int, seed: int, folder, pretrained: bool = True):
    """`scratch_state` saved once under `folder` (a run's `weights_file`); its path."""
    from pathlib import Path

    path = Path(folder) / f"{backbone}-scratch-d{int(depth)}-s{int(seed)}{'' if pretrained else '-rand'}.pt"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".part")
        torch.save(scratch_state(backbone, depth, seed, pretrained), tmp)
        tmp.replace(path)
    return path


def init_of(cfg) -> str:
    return "scratch" if getattr(cfg, "weights_file", None) and "-scratch-" in str(cfg.weights_file) else "pretrained"


def study_configs(base, depths, rates, test_envs, seeds, steps, tuned_by=None, scratch_depths=None,
                  scratch_dir="outputs/11_linearity/scratch_weights") -> list:
    """The pretrained arm: the effect map's runs (`usage_map.study_configs`: every depth x held-out
    domain x rate x seed, each with its cell's tuned lr and weight decay). The scratch arm, at each
    depth of `scratch_depths` (default: every depth >= 1; at depth 0 both arms would be the same run,
    the head always starting random): the same runs, same lr, weight decay and steps, starting from
    `scratch_state` (its trained stages random, seeded by the run's seed)."""
    import dataclasses

    from vldlib.analysis.usage_map import study_configs as map_configs

    pre = map_configs(base, [base.backbone], list(depths), rates, test_envs, seeds, steps, tuned_by=tuned_by)
    todo = [d for d in depths if d and d > 0] if scratch_depths is None else list(scratch_depths)
    scratch = [dataclasses.replace(c, pretrained=True, weights_file=str(scratch_weights_file(
        c.backbone, c.train_stages, c.seed, scratch_dir, pretrained=base.pretrained)))
        for c in pre if c.train_stages in todo]
    return pre + scratch


def linearity_table(configs, run_dirs, device: str = "cpu") -> pd.DataFrame:
    """One row per (run, split: iid, ood): test_env, depth, init, dropout, seed, `taylor_report`,
    `finetune_distances`, the majority-class rate (the scored split's own most frequent class: the
    best any constant prediction can do there, the floor `vldlib.evaluate.power.floors` shows for a
    held-out domain) and the margin acc_trained - majority_acc. Runs of one depth and held-out domain share the frozen
    stages, so their trunk outputs are loaded once."""
    import dataclasses

    from vldlib import config as config_io
    from vldlib.config import TrainConfig
    from vldlib.loop import load_run_model

    rows, shared = [], {}
    for cfg, run in zip(configs, run_dirs):
        key = (cfg.train_stages, tuple(cfg.test_envs))
        if key not in shared:
            shared[key] = rd = load_run_data(run, device=device)
        else:
            net, cd = load_run_model(run, "best")
            rd = dataclasses.replace(shared[key], run_dir=run, net=net.cpu().eval(),
                                     cfg=config_io.from_dict(TrainConfig, cd))
        net0 = initial_net(rd.cfg, len(rd.meta["classes"]))
        dist = finetune_distances(net0, rd.net)
        for split in ("iid", "ood"):
            x, y = rd.inputs(split)
            rep = taylor_report(net0.tail, rd.net.tail, x, y)
            maj = majority_rate(y)
            rows.append({"test_env": int(cfg.test_envs[0]), "depth": int(cfg.train_stages), "init": init_of(cfg),
                         "dropout": float(cfg.dropout), "seed": int(cfg.seed), "split": split, "lr": cfg.lr,
                         "weight_decay": cfg.weight_decay, **rep, **dist, "majority_acc": maj,
                         "margin": rep["acc_trained"] - maj, "run": shown(run)})
    return pd.DataFrame(rows)


def arm_table(table: pd.DataFrame, split: str = "ood",
              metrics=("acc_trained", "majority_acc", "margin", "agreement", "rel_logit_error", "body_relative")
              ) -> pd.DataFrame:
    """Per (depth, init, dropout, metric): the mean over seeds of each seed's mean over the held-out
    domains, with its 95% Student's t interval and n (seeds)."""
    from vldlib.analysis.dropout_l2_study import mean_interval

    t = table[table.split == split]
    rows = []
    for (depth, init, p), g in t.groupby(["depth", "init", "dropout"], sort=True):
        per_seed = g.groupby("seed")[list(metrics)].mean()
        rows += [{"depth": depth, "init": init, "dropout": p, "metric": m, **mean_interval(per_seed[m])}
                 for m in metrics]
    return pd.DataFrame(rows)


def learns(arms: pd.DataFrame, margin: float) -> pd.DataFrame:
    """Per (depth, init, dropout): does the arm beat the majority class by at least `margin`
    (a fraction) with 95% confidence, i.e. is the lower end of its margin's t interval >= `margin`?"""
    m = arms[arms.metric == "margin"].copy()
    m["learns"] = m.ci_low >= margin
    return m[["depth", "init", "dropout", "n", "mean", "ci_low", "ci_high", "learns"]].reset_index(drop=True)


def init_effects(table: pd.DataFrame, split: str = "ood", metrics=tuple(METRICS)) -> pd.DataFrame:
    """Per (depth, dropout, metric) with both arms: pretrained - scratch, paired by seed, each seed
    the mean over the held-out domains (`power.domain_averaged_effect`, by="init")."""
    from vldlib.evaluate.power import domain_averaged_effect

    t = table[table.split == split]
    rows = []
    for (depth, p), g in t.groupby(["depth", "dropout"], sort=True):
        if set(g.init) < set(INITS):
            continue
        for m in metrics:
            e = domain_averaged_effect(g, a="scratch", b="pretrained", metric=m, by="init")
            rows.append({"depth": depth, "dropout": p, "metric": m, "pretrained": e["b_mean"], "scratch": e["a_mean"],
                         "difference": e["mean"], "ci_low": e["ci_low"], "ci_high": e["ci_high"], "p": e["p"],
                         "n": e["n"], "domains": e["domains"]})
    return pd.DataFrame(rows)


def map_gains(path, backbone: str, shown_as: str | None = None) -> tuple[pd.DataFrame | None, str]:
    """The effect map's o.o.d. gain of dropout per depth (its gains.csv) for `backbone`, and a
    sentence naming where the 95% interval of the gain excludes 0; (None, why) when absent. The
    sentence names the table as `shown_as` (the parameter the user gave, not this machine's
    absolute path) when given."""
    from pathlib import Path

    path = Path(path)
    name = shown_as or path
    if not path.exists():
        return None, f"The effect map's gains ({name}) are not here: run notebook 07 to compare with its cells."
    g = pd.read_csv(path)
    g = g[g.backbone == backbone] if "backbone" in g.columns else g
    if not len(g):
        return None, f"The effect map's gains ({name}) have no row for {backbone}."
    helps = g[g.ci_low_points > 0]
    cells = ", ".join(f"{r.depth_label} ({r.gain_points:+.1f} points [{r.ci_low_points:+.1f}, {r.ci_high_points:+.1f}])"
                      for r in g.itertuples())
    where = (", ".join(map(str, helps.depth_label)) if len(helps) else "no depth")
    return g, f"In the effect map ({name}), dropout's o.o.d. gain per depth: {cells}; its interval excludes 0 at {where}."


def _iv(row, percent: bool = False) -> str:
    k = 100 if percent else 1
    unit = "%" if percent else ""
    if row["n"] < 2:
        return f"{k * row['mean']:.{1 if percent else 3}f}{unit} (n={int(row['n'])}, no interval)"
    return (f"{k * row['mean']:.{1 if percent else 3}f}{unit} [95% CI {k * row['ci_low']:.{1 if percent else 3}f}, "
            f"{k * row['ci_high']:.{1 if percent else 3}f}] (n={int(row['n'])})")


def study_lines(arms: pd.DataFrame, floor: pd.DataFrame, effects: pd.DataFrame, margin: float,
                labels: Mapping[int, str] | None = None) -> list[str]:
    """The answers, computed: per depth and rate, whether each arm learns (beats the majority class
    by `margin`), its Taylor agreement, relative logit error and distance travelled (means over
    seeds, t intervals); then pretrained - scratch, paired by seed, stated only where scratch learns."""
    labels = labels or {}
    lines = []
    learned = floor.set_index(["depth", "init", "dropout"]).learns
    a = arms.set_index(["depth", "init", "dropout", "metric"])
    for (depth, init, p), ok in learned.items():
        name = f"{labels.get(depth, f'depth {depth}')}, {init}, dropout {p:g}"
        fl = floor[(floor.depth == depth) & (floor.init == init) & (floor.dropout == p)].iloc[0]
        verdict = (f"beats the majority class by {_iv(fl, True)} points, at least {100 * margin:g} with 95% confidence"
                   if ok else f"does NOT beat the majority class by {100 * margin:g} points with 95% confidence "
                   f"(margin {_iv(fl, True)}): its linearity says nothing")
        lines.append(f"- **{name}**: o.o.d. accuracy {_iv(a.loc[(depth, init, p, 'acc_trained')], True)}, {verdict}; "
                     f"Taylor agreement {_iv(a.loc[(depth, init, p, 'agreement')], True)}, relative logit error "
                     f"{_iv(a.loc[(depth, init, p, 'rel_logit_error')])}, distance travelled "
                     f"{_iv(a.loc[(depth, init, p, 'body_relative')])} of the trained stages' initial norm.")
    for (depth, p), g in (effects.groupby(["depth", "dropout"]) if len(effects) else []):
        name = f"{labels.get(depth, f'depth {depth}')}, dropout {p:g}"
        if not learned.get((depth, "scratch", p), False):
            lines.append(f"- {name}: no pretrained-vs-scratch comparison, the scratch arm does not learn (above).")
            continue
        e = g.set_index("metric")
        parts = []
        for m, what in (("agreement", "Taylor agreement"), ("rel_logit_error", "relative logit error"),
                        ("body_relative", "relative distance")):
            r = e.loc[m]
            k, dec = (100, 1) if m == "agreement" else (1, 3)
            sign = "excludes 0" if r.ci_low > 0 or r.ci_high < 0 else "contains 0"
            parts.append(f"{what} {k * r.difference:+.{dec}f} [95% CI {k * r.ci_low:+.{dec}f}, {k * r.ci_high:+.{dec}f}] "
                         f"({sign})")
        lines.append(f"- {name}, pretrained - scratch (n={int(e.n.iloc[0])} seeds, each the mean over "
                     f"{int(e.domains.iloc[0])} held-out domains): " + "; ".join(parts) + ".")
    return lines


def regime_line(effects: pd.DataFrame, floor: pd.DataFrame, map_text: str, map_table: pd.DataFrame | None,
                labels: Mapping[int, str] | None = None) -> str:
    """Is the regime where dropout helps the near-linear one? Where pretrained is detectably more
    linear than scratch (agreement higher, interval above 0), against the map's depths with a gain."""
    labels = labels or {}
    closer = set()
    for r in effects[effects.metric == "agreement"].itertuples():
        if r.ci_low > 0 and floor.set_index(["depth", "init", "dropout"]).learns.get((r.depth, "scratch", r.dropout), False):
            closer.add(int(r.depth))
    near = ", ".join(labels.get(d, f"depth {d}") for d in sorted(closer)) or "no depth"
    text = f"Pretrained fine-tuning is detectably closer to linear than scratch (agreement) at: {near}. {map_text}"
    if map_table is not None:
        helps = {int(d) for d in map_table[map_table.ci_low_points > 0].depth}
        both = sorted(helps & closer)
        text += (f" Depths where both hold: {', '.join(labels.get(d, f'depth {d}') for d in both)}." if both else
                 " No depth has both a detectable gain in the map and a detectably more linear pretrained arm here.")
    return text


def plot_study(arms: pd.DataFrame, labels: Mapping[int, str] | None = None):
    """Per depth: Taylor agreement, relative logit error and distance travelled, pretrained and
    scratch at each rate (means over seeds, 95% t intervals)."""
    import matplotlib.pyplot as plt

    labels = labels or {}
    metrics = [("agreement", "Taylor agreement (o.o.d.)"), ("rel_logit_error", "relative logit error"),
               ("body_relative", "||θ1-θ0|| / ||θ0|| (trained stages)"), ("margin", "accuracy - majority (o.o.d.)")]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.6))
    groups = list(arms.groupby(["init", "dropout"], sort=True))
    colors = dict(zip(INITS, ["C0", "C3"]))
    for ax, (m, title) in zip(axes, metrics):
        for i, ((init, p), g) in enumerate(groups):
            g = g[g.metric == m].sort_values("depth")
            x = g.depth + (i - (len(groups) - 1) / 2) * 0.08
            ax.errorbar(x, g["mean"], yerr=[g["mean"] - g.ci_low, g.ci_high - g["mean"]], fmt="o-" if p == 0 else "s--",
                        color=colors.get(init, "k"), capsize=3, label=f"{init}, p={p:g}")
        depths = sorted(arms.depth.unique())
        ax.set_xticks(depths, [labels.get(d, str(d)) for d in depths])
        ax.set(title=title)
    axes[-1].axhline(0, color="k", lw=0.8)
    axes[-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    return fig
