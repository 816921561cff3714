"""vldlib.analysis on cases with known answers, and on tiny runs of fake data."""

from __future__ import annotations

import copy
import math

import pandas as pd
import pytest
import torch
from conftest import make_fake_benchmark
from torch import nn

from vldlib.analysis import dropout_l2 as dl2
from vldlib.analysis import dropout_l2_study as st
from vldlib.analysis import feature_usage as fu
from vldlib.analysis import linearity as lin
from vldlib.analysis import teaching
from vldlib.analysis.runs import initial_net, load_run_data, untrained_run_data
from vldlib.config import TrainConfig
from vldlib.loop.train import train

torch.set_num_threads(1)


# --------------------------------------------------------------------------- feature usage
def test_participation_ratio_one_hot_is_1_uniform_is_n():
    assert fu.participation_ratio(torch.tensor([0.0, 0.0, 5.0, 0.0])) == pytest.approx(1.0)
    assert fu.participation_ratio(torch.full((37,), 0.3)) == pytest.approx(37.0)
    assert 1 < fu.participation_ratio([3.0, 1.0, 1.0]) < 3
    with pytest.raises(ValueError, match="zero"):
        fu.participation_ratio([0.0, 0.0])


def test_importance_is_column_norm_times_std():
    w = torch.tensor([[3.0, 0.0, 1.0], [4.0, 1.0, 0.0]])
    assert torch.allclose(fu.feature_importance(w, torch.tensor([1.0, 2.0, 0.5])), torch.tensor([5.0, 2.0, 0.5]))
    with pytest.raises(ValueError, match="features"):
        fu.feature_importance(w, torch.ones(2))
    assert fu.mass_fraction_count([4.0, 0.0, 0.0, 0.0]) == 1


def test_topk_with_all_features_is_the_full_accuracy():
    g = torch.Generator().manual_seed(0)
    phi, w, b = torch.randn(200, 16, generator=g), torch.randn(4, 16, generator=g), torch.randn(4, generator=g)
    y = torch.randint(0, 4, (200,), generator=g)
    full = float(((phi @ w.T + b).argmax(1) == y).float().mean())
    s = fu.feature_importance(w, phi.std(0))
    t = fu.ablation_curve(w, b, phi, y, s, phi.mean(0), ks=[1, 4, 16], n_random=3)
    at16 = t[t.k == 16]
    assert at16[at16.order != "without_top"].acc.tolist() == pytest.approx([full] * 4)  # top and every random draw
    assert set(t.order) == {"top", "random", "without_top"} and len(t) == 3 * 5
    # every feature removed: each image is the training mean, so every prediction is the same class
    constant = int((phi.mean(0) @ w.T + b).argmax())
    assert at16[at16.order == "without_top"].acc.item() == pytest.approx(float((y == constant).float().mean()))
    # the top 1 removed: exactly the features ranked 2.. kept
    rest = torch.argsort(s, descending=True)[1:]
    assert t[(t.k == 1) & (t.order == "without_top")].acc.item() == pytest.approx(
        fu.masked_accuracy(w, b, phi, y, rest, phi.mean(0)))


def test_top_share_and_tenth_by_hand():
    # squared importances 9, 1, 1, 1 (total 12): the top one holds 9/12
    assert fu.top_share([3.0, 1.0, 1.0, 1.0], k=1) == pytest.approx(0.75)
    # 20 equal features: a tenth of them (2) hold a tenth of the total
    assert fu.top_share(torch.ones(20)) == pytest.approx(0.1)
    assert fu.top_share([0.0, 5.0] + [0.0] * 8) == pytest.approx(1.0)
    assert (fu.tenth_of(1280), fu.tenth_of(16), fu.tenth_of(3)) == (128, 2, 1)
    assert 128 in fu.default_ks(1280) and fu.default_ks(16)[-1] == 16


# --------------------------------------------------------------------------- linearity
def test_taylor_model_of_a_network_linear_in_its_parameters_is_exact():
    torch.manual_seed(0)
    m0 = nn.Linear(10, 3)
    m1 = copy.deepcopy(m0)
    with torch.no_grad():
        for p in m1.parameters():
            p.add_(torch.randn_like(p))  # a large move: still exact
    x = torch.randn(50, 10)
    f1, flin, f0 = lin.taylor_logits(m0, m1, x, batch=16)
    assert torch.allclose(flin, f1, atol=1e-5) and not torch.allclose(f0, f1)
    rep = lin.taylor_report(m0, m1, x, torch.zeros(50, dtype=torch.long))
    assert rep["agreement"] == 1.0 and rep["rel_logit_error"] < 1e-5


def test_taylor_model_of_a_nonlinear_network_is_first_order():
    torch.manual_seed(0)
    m0 = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 3))
    x = torch.randn(64, 10)
    errs = []
    for eps in (1e-2, 1e-1):
        m1 = copy.deepcopy(m0)
        with torch.no_grad():
            for p in m1.parameters():
                p.add_(eps * torch.randn_like(p, generator=torch.Generator().manual_seed(1)))
        f1, flin, f0 = lin.taylor_logits(m0, m1, x)
        errs.append(float((f1 - flin).norm() / (f1 - f0).norm()))
    assert errs[0] < 0.2 * errs[1] and errs[0] < 0.1  # relative error shrinks with the step: first order


def test_taylor_model_with_frozen_layers_and_bound_method():
    """Only trainable parameters move; frozen ones are fixed points of the expansion."""
    torch.manual_seed(0)
    m0 = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))
    for p in m0[0].parameters():
        p.requires_grad_(False)
    m1 = copy.deepcopy(m0)
    with torch.no_grad():
        m1[2].weight.add_(1.0)
    x = torch.randn(20, 6)
    f1, flin, _ = lin.taylor_logits(m0, m1, x)  # the trained part is the last, linear layer: exact
    assert torch.allclose(f1, flin, atol=1e-5)
    assert lin.weight_distance(m0, m1)["distance"] == pytest.approx(float(torch.ones(2, 8).norm()))


def test_interpolation_of_a_linear_model_is_the_same_on_both_paths():
    torch.manual_seed(0)
    a, b = nn.Linear(5, 3), nn.Linear(5, 3)
    x, y = torch.randn(100, 5), torch.randint(0, 3, (100,))
    t = lin.interpolation_path(a, b, "forward", x, y, alphas=[0, 0.3, 1])
    w = t[t.path == "weights"].acc.to_numpy()
    r = t[t.path == "representations"].acc.to_numpy()
    assert (w == r).all()


# --------------------------------------------------------------------------- dropout vs L2
def test_squared_loss_penalty_matches_monte_carlo():
    g = torch.Generator().manual_seed(0)
    X, W, b = torch.randn(64, 8, generator=g), torch.randn(3, 8, generator=g), torch.randn(3, generator=g)
    y = torch.randint(0, 3, (64,), generator=g)
    for p in (0.2, 0.9):
        mc = dl2.expected_dropout_loss(W, b, X, y, p, "squared", n_samples=3000) - float(dl2.clean_loss(W, b, X, y, "squared"))
        exact = float(dl2.penalty(W, b, X, p, "squared"))
        assert mc == pytest.approx(exact, rel=0.05)


def test_quadratic_penalty_approximates_cross_entropy_at_small_p():
    g = torch.Generator().manual_seed(0)
    X, W = torch.randn(64, 8, generator=g), 0.3 * torch.randn(3, 8, generator=g)
    b, y = torch.zeros(3), torch.randint(0, 3, (64,), generator=g)
    mc = dl2.expected_dropout_loss(W, b, X, y, 0.05, "ce", n_samples=4000) - float(dl2.clean_loss(W, b, X, y))
    assert mc == pytest.approx(float(dl2.penalty(W, b, X, 0.05, "quadratic")), rel=0.15)
    with pytest.raises(ValueError, match="p must be"):
        dl2.penalty(W, b, X, 1.0)


def test_dropout_and_penalty_heads_agree_at_small_p():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(120, 10, generator=g)
    y = (X[:, :3].argmax(1))
    t = dl2.compare_dropout_penalty((X, y), {"ood": (X + 0.1, y)}, rates=[0.1], kinds=["quadratic"], steps=150,
                                    lr=0.05, n_mc=20)
    quad = t[t["mode"] == "quadratic"].iloc[0]
    assert quad.agree_train > 0.9 and quad.rel_weight_diff < 0.5


def test_quadratic_penalty_by_hand():
    # X = [1, 2], W = I (2 classes), b = 0, p = 0.5 (p/(1-p) = 1): pi = softmax([1, 2]) and, per feature j,
    # W[:, j]^T (diag pi - pi pi^T) W[:, j] = pi_1 pi_2, so the penalty is 1/2 * (1 + 4) * pi_1 pi_2
    pi1pi2 = math.e / (1 + math.e) ** 2
    X, W = torch.tensor([[1.0, 2.0]], dtype=torch.float64), torch.eye(2, dtype=torch.float64)
    assert float(dl2.penalty(W, None, X, 0.5, "quadratic")) == pytest.approx(2.5 * pi1pi2, rel=1e-12)
    assert float(dl2.penalty(W, None, X, 0.5, "ridge")) == pytest.approx(0.5 * 5 / 2, rel=1e-12)  # 1/(2C) * sum


def test_quadratic_penalty_matches_its_definition_per_example_and_feature():
    g = torch.Generator().manual_seed(1)
    X, W, b = torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randn(3, 4, generator=g, dtype=torch.float64), \
        torch.randn(3, generator=g, dtype=torch.float64)
    pi = torch.softmax(X @ W.T + b, 1)
    total = sum(X[i, j] ** 2 * W[:, j] @ (torch.diag(pi[i]) - torch.outer(pi[i], pi[i])) @ W[:, j]
                for i in range(5) for j in range(4))
    assert float(dl2.penalty(W, b, X, 0.2, "quadratic")) == pytest.approx(float(0.5 * 0.25 * total / 5), rel=1e-10)


def test_logits_loss_grad_is_the_gradient():
    z = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    for loss in ("ce", "squared"):
        (g,) = torch.autograd.grad(dl2.logits_loss(z, y, loss), z)
        assert torch.allclose(dl2.logits_loss_grad(z.detach(), y, loss), g)


def _exact_dropout_excess(W, b, X, y, p, loss):
    """E over all 2^D masks (one example), by enumeration."""
    import itertools

    D = X.shape[1]
    total = 0.0
    for keep in itertools.product([0, 1], repeat=D):
        k = torch.tensor(keep, dtype=X.dtype)
        prob = float(torch.prod(torch.where(k == 1, 1 - p, p)))
        total += prob * float(dl2.clean_loss(W, b, X * k / (1 - p), y, loss))
    return total - float(dl2.clean_loss(W, b, X, y, loss))


@pytest.mark.parametrize("loss", ["ce", "squared"])
def test_monte_carlo_excess_matches_exact_enumeration_with_and_without_control_variate(loss):
    g = torch.Generator().manual_seed(0)
    X, W = torch.randn(1, 3, generator=g, dtype=torch.float64), torch.randn(2, 3, generator=g, dtype=torch.float64)
    b, y = torch.zeros(2, dtype=torch.float64), torch.tensor([1])
    exact = _exact_dropout_excess(W, b, X, y, 0.5, loss)
    clean = float(dl2.clean_loss(W, b, X, y, loss))
    cv = dl2.expected_dropout_loss(W, b, X, y, 0.5, loss, n_samples=20000) - clean
    plain = dl2.expected_dropout_loss(W, b, X, y, 0.5, loss, n_samples=20000, control_variate=False) - clean
    assert cv == pytest.approx(exact, rel=0.03) and plain == pytest.approx(exact, rel=0.05)
    if loss == "squared":
        assert exact == pytest.approx(float(dl2.penalty(W, b, X, 0.5, "squared")), rel=1e-10)  # the identity


def test_control_variate_makes_the_squared_identity_tight_with_few_masks():
    g = torch.Generator().manual_seed(0)
    X, W, b = torch.randn(200, 16, generator=g), torch.randn(3, 16, generator=g), torch.randn(3, generator=g)
    y = torch.randint(0, 3, (200,), generator=g)
    for p in (0.1, 0.9):
        mc = dl2.excess_vs_penalties(W, b, X, y, p, n_mc=30)
        assert mc["ratio_squared"] == pytest.approx(1.0, abs=0.02)
        assert set(mc) == {"mc_ce", "mc_squared", *(f"{k}_{kind}" for k in ("pen", "ratio") for kind in dl2.KINDS)}


@pytest.fixture(scope="module")
def stage_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("dl2")
    make_fake_benchmark(root / "fake", per_class=6)
    cfg = TrainConfig(benchmark=str(root / "fake"), backbone="test_resnet", pretrained=False, resolution=32,
                      train_stages=1, cache_trunk=True, augment=False, progress=False, num_workers=0)
    return st.study_data(untrained_run_data(cfg))


def test_fit_deep_trains_the_stage_from_the_given_head(stage_data):
    x, y = stage_data.splits(0, 1)["train"]
    X0, y0 = stage_data.splits(0, 0)["train"]
    assert torch.allclose(stage_data.net.tail_features(x), X0, atol=1e-5)  # depth 0 = depth 1's start
    before = copy.deepcopy(stage_data.net.state_dict())
    head = dl2.fit_head(X0, y0, 3, 0.5, "quadratic", steps=5, lr=0.05)
    still = dl2.fit_deep(stage_data.net, x, y, 3, 0.5, "quadratic", steps=3, lr=0.0, init=head)
    assert still.body_moved == 0 and torch.equal(still.W, head.W) and torch.equal(still.b, head.b)
    for mode in ("dropout", "quadratic"):
        fit = dl2.fit_deep(stage_data.net, x, y, 3, 0.5, mode, steps=3, lr=0.01, init=head)
        assert fit.body_moved > 0 and fit.features(x).shape == X0.shape and not torch.equal(fit.W, head.W)
    for k, v in stage_data.net.state_dict().items():
        assert torch.equal(v, before[k]), f"fit_deep changed the given network ({k})"


def test_splits_hold_out_one_domain(stage_data):
    sp = stage_data.splits(1, 0)
    n = {k: len(v[1]) for k, v in stage_data.feats.items()}
    assert len(sp["train"][1]) == n["env0_in"] + n["env2_in"] and len(sp["iid"][1]) == n["env0_out"] + n["env2_out"]
    assert len(sp["ood"][1]) == n["env1_in"]


def _heads_by_hand():
    """3 seeds x 2 held-out domains, one rate: dropout o.o.d. accuracy 0.50 everywhere; the penalty
    head's per-seed domain means are 0.51, 0.52, 0.53 (differences 1, 2, 3 points); i.i.d. identical."""
    rows = []
    for seed, d in zip((0, 1, 2), (0.01, 0.02, 0.03)):
        for env, spread in ((0, -0.01), (1, +0.01)):
            base = {"depth": 0, "test_env": env, "domain": f"d{env}", "seed": seed, "p": 0.9}
            rows.append({**base, "mode": "dropout", "acc_ood": 0.5, "acc_iid": 0.7, "agree_ood": 1.0, "agree_iid": 1.0,
                         "rel_weight_diff": 0.0})
            rows.append({**base, "mode": "quadratic", "acc_ood": 0.5 + d + spread, "acc_iid": 0.7,
                         "agree_ood": 0.9 + d, "agree_iid": 0.95, "rel_weight_diff": 0.1})
    return pd.DataFrame(rows)


def test_by_rate_paired_t_interval_by_hand():
    t = st.by_rate(_heads_by_hand(), threshold=0.9).iloc[0]
    half = 4.302652729911275 / math.sqrt(3)  # t_{0.975, 2} * sd (1 point) / sqrt(n)
    assert t.n == 3 and t.ood_diff_points == pytest.approx(2.0)
    assert (t.ood_ci_low, t.ood_ci_high) == (pytest.approx(2 - half), pytest.approx(2 + half))
    assert t.iid_diff_points == 0 and t.agree_ood == pytest.approx(0.92)
    assert (t.agree_ci_low, t.agree_ci_high) == (pytest.approx(0.92 - half / 100), pytest.approx(0.92 + half / 100))
    assert t.verdict == "holds"  # agreement 92% >= 90%, both intervals contain 0
    assert st.by_rate(_heads_by_hand(), threshold=0.95).iloc[0].verdict == "breaks"
    assert st.by_rate(_heads_by_hand()[lambda d: d.seed == 0], threshold=0.5).iloc[0].verdict == "undecided"


def test_depth_change_and_ratio_by_rate_by_hand():
    h0 = _heads_by_hand()
    h1 = h0.assign(depth=1)
    h1.loc[h1["mode"] == "quadratic", "agree_ood"] -= [0.01, 0.01, 0.02, 0.02, 0.03, 0.03]  # 1, 2, 3 points
    ch = st.depth_change(pd.concat([h0, h1])).set_index("value")
    assert ch.loc["agree_ood", "mean"] == pytest.approx(-2.0) and ch.loc["agree_ood", "n"] == 3
    assert ch.loc["agree_ood", "p"] == 0.9 and 0 < ch.loc["agree_ood", "p_value"] < 1  # the rate, the test
    assert ch.loc["gap_ood", "mean"] == pytest.approx(0.0)
    fixed = pd.DataFrame({"depth": 0, "p": 0.5, "test_env": [0, 1, 0, 1], "seed": [0, 0, 1, 1],
                          "ratio_quadratic": [0.8, 1.0, 1.1, 1.3]})
    r = st.ratio_by_rate(fixed, ["quadratic"]).iloc[0]  # per seed: 0.9, 1.2 -> mean 1.05, sd 0.212
    assert r.n == 2 and r["mean"] == pytest.approx(1.05)
    assert r.ci_high - r["mean"] == pytest.approx(12.706204736 * 0.3 / math.sqrt(2) / math.sqrt(2), rel=1e-6)


def test_run_study_does_not_depend_on_workers():
    g = torch.Generator().manual_seed(0)
    feats = {f"env{e}_{s}": (torch.randn(n, 8, generator=g) + e, torch.arange(n) % 3)
             for e in range(3) for s, n in (("in", 12), ("out", 6))}
    data = st.StudyData(trunk={}, feats=feats, net=None, num_classes=3, domains=["a", "b", "c"])
    prm = st.StudyParams(rates=[0.5], kinds=["quadratic"], steps=5, n_mc=3, depths=[0])
    one = st.run_study(data, [0, 2], [0, 1], prm, workers=1)
    two = st.run_study(data, [0, 2], [0, 1], prm, workers=2)
    for a, b in zip(one, two):
        pd.testing.assert_frame_equal(a, b)
    assert sorted(one[1].domain.unique()) == ["a", "c"] and len(one[0]) == 4


def test_tuned_l2_control_reads_the_effect_maps_table(tmp_path):
    missing = st.tuned_l2_control(tmp_path / "none.csv", "lite", [0])
    assert missing[0] is None and "not there yet" in missing[1]
    pd.DataFrame({"backbone": ["lite", "lite", "other"], "depth": [0, 1, 0], "depth_label": ["head", "conv_head", "head"],
                  "ood_0": 50.0, "ood_0.9": 51.0, "gain_points": [0.21, 0.99, 5.0], "ci_low_points": [-1.35, -0.25, 1.0],
                  "ci_high_points": [1.77, 2.23, 9.0], "n": 6}).to_csv(tmp_path / "t.csv", index=False)
    rows, text = st.tuned_l2_control(tmp_path / "t.csv", "lite", [0])
    assert len(rows) == 1 and "dropout 0.9 against weight decay" in text and "head: +0.2 [-1.4, +1.8]" in text


# --------------------------------------------------------------------------- teaching checkers
def _good(x, p, training=True):
    if not training or p == 0:
        return x
    return x * torch.empty_like(x).bernoulli_(1 - p) / (1 - p)


def test_checkers_accept_right_answers_and_explain_wrong_ones(capsys):
    # checkers print their verdict and return None (a returned bool is echoed under the cell)
    assert teaching.check_inverted_dropout(_good) is None and "correct" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="1/\\(1-p\\)"):
        teaching.check_inverted_dropout(lambda x, p, training=True: x * (torch.rand_like(x) >= p) if training else x)
    teaching.check_kept_features(128)
    teaching.check_dropout_variance(9.0)
    # the Monte Carlo estimate the notebook prints (a million draws, 2 decimals) is accepted
    torch.manual_seed(1)
    printed = float(f"{float(_good(torch.ones(1_000_000), 0.9).var()):.2f}")
    teaching.check_dropout_variance(printed)
    with pytest.raises(AssertionError):
        teaching.check_dropout_variance(0.9)
    # leave-one-domain-out, written out by hand
    assert teaching.lodo_splits(["a", "b", "c"]) == [(["b", "c"], "a"), (["a", "c"], "b"), (["a", "b"], "c")]
    by_hand = [(["cartoon", "photo", "sketch"], "art"), (["art", "photo", "sketch"], "cartoon"),
               (["art", "cartoon", "sketch"], "photo"), (["art", "cartoon", "photo"], "sketch")]
    teaching.check_lodo_splits(lambda domains: by_hand)
    with pytest.raises(AssertionError, match="3 experiments"):
        teaching.check_lodo_splits(lambda domains: by_hand[:3])
    with pytest.raises(AssertionError, match="every domain but one"):
        teaching.check_lodo_splits(lambda domains: [(list(domains), t) for _, t in by_hand])
    # training-domain validation: the highest i.i.d. accuracy, earliest on ties (scanned by hand here)
    t = teaching.selection_exercise()
    rows = list(zip(t.step.tolist(), t.iid_val_acc.tolist(), t.ood_test_acc.tolist()))
    best = rows[0]
    for row in rows[1:]:
        if row[1] > best[1]:
            best = row
    oracle = max(rows, key=lambda r: (r[2], -r[0]))[0]
    teaching.check_selected_step(best[0])  # the tie rule the exercise states: earliest
    if oracle != best[0]:
        with pytest.raises(AssertionError, match="oracle"):
            teaching.check_selected_step(oracle)
    wrong = next(r[0] for r in rows if r[0] not in (best[0], oracle))
    with pytest.raises(AssertionError, match="highest i.i.d."):
        teaching.check_selected_step(wrong)
    assert capsys.readouterr().out.count("correct") >= 4
    teaching.check_kept_features(None)
    assert "not answered" in capsys.readouterr().out


# --------------------------------------------------------------------------- on tiny runs
@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("analysis")
    make_fake_benchmark(root / "fake", per_class=8)
    base = dict(benchmark=str(root / "fake"), backbone="test_resnet", pretrained=False, resolution=32, steps=6,
                eval_every=3, average_from=3, batch_size=4, num_workers=0, out=str(root / "runs"),
                progress=False, augment=False, cache_trunk=True, lr=0.05, num_threads=1)
    head = train(TrainConfig(**base, train_stages=0, dropout=0.5))
    stage = train(TrainConfig(**base, train_stages=1, dropout=0.5))
    tiny = train(TrainConfig(**{**base, "steps": 1, "eval_every": 1, "lr": 1e-12}, train_stages=1, dropout=0.0))
    return {"root": root, "head": head, "stage": stage, "tiny": tiny, "base": base}


def test_initial_net_is_the_runs_start(tiny_runs):
    rd = load_run_data(tiny_runs["tiny"])
    net0 = initial_net(rd.cfg, len(rd.meta["classes"]))
    s0, s1 = net0.state_dict(), rd.net.state_dict()
    for k in s0:
        assert torch.allclose(s0[k].float(), s1[k].float(), atol=1e-6), k


def test_head_usage_and_taylor_on_runs(tiny_runs):
    rd = load_run_data(tiny_runs["head"], which="last")  # best may be step 0, the start
    summary, table, s = fu.head_usage(rd, ks=[1, 2, 8], n_random=2)
    assert 1 <= summary["participation_ratio"] <= summary["n_features"]
    full = table[(table.k == 8) & (table.order == "top")]
    assert set(full.split) == {"iid", "ood"}
    # head-only fine-tuning is linear in the parameters: its Taylor model is exact
    net0 = initial_net(rd.cfg, len(rd.meta["classes"]))
    x, y = rd.inputs("ood")
    rep = lin.taylor_report(net0.tail, rd.net.tail, x, y)
    assert rep["agreement"] == 1.0 and rep["rel_logit_error"] < 1e-4
    assert rep["acc_trained"] == pytest.approx(summary["ood_acc"])

    for split in ("iid", "ood"):  # the shares: only the top tenth, a random tenth, all but the top tenth
        k10 = fu.tenth_of(summary["n_features"])
        at = table[(table.split == split) & (table.k == k10)].groupby("order").acc.mean()
        full = summary[f"{split}_acc"]
        for order, name in (("top", "top10"), ("random", "random10"), ("without_top", "without_top10")):
            assert summary[f"{split}_retained_{name}"] == pytest.approx(at[order] / full)

    st = load_run_data(tiny_runs["stage"], which="last")
    net0 = initial_net(st.cfg, len(st.meta["classes"]))
    rep = lin.taylor_report(net0.tail, st.net.tail, *st.inputs("iid"))
    # the Taylor model by central finite differences in float64, independent of taylor_logits' jvp
    x, _ = st.inputs("iid")
    f0, f1, flin = _finite_difference_taylor(net0, st.net, x)
    assert rep["agreement"] == pytest.approx(float((flin.argmax(1) == f1.argmax(1)).double().mean()), abs=1.01 / len(x))
    assert rep["rel_logit_error"] == pytest.approx(float((f1 - flin).norm() / (f1 - f0).norm()), rel=1e-3, abs=1e-5)
    delta = [(p1.detach() - p0.detach()).double() for p0, p1 in zip(net0.parameters(), st.net.parameters())
             if p0.requires_grad]
    assert lin.weight_distance(net0, st.net)["distance"] == pytest.approx(float(torch.cat([d.flatten() for d in delta]).norm()))


def _finite_difference_taylor(net0, net1, x, eps: float = 1e-4):
    """(f0, f1, f0 + J delta) on trunk outputs x, J delta = (f(theta0 + eps delta) - f(theta0 - eps delta)) / 2 eps."""
    base = copy.deepcopy(net0).double().eval()
    plus, minus = copy.deepcopy(base), copy.deepcopy(base)
    trained = dict(net1.named_parameters())
    with torch.no_grad():
        for (name, p0), pp, pm in zip(base.named_parameters(), plus.parameters(), minus.parameters()):
            if p0.requires_grad:
                d = trained[name].detach().double() - p0
                pp.add_(eps * d)
                pm.sub_(eps * d)
        xd = x.double()
        f0 = base.tail(xd)
        f1 = copy.deepcopy(net1).double().eval().tail(xd)
        flin = f0 + (plus.tail(xd) - minus.tail(xd)) / (2 * eps)
    return f0, f1, flin


def test_feature_usage_of_a_conv_head_run_reads_its_trained_conv_head(tiny_runs):
    """With train_stages=1 the features are the trained last stage's output (the run's own
    penultimate features), not the pretrained stage's: importances use their std."""
    st = load_run_data(tiny_runs["stage"], which="last")
    net0 = initial_net(st.cfg, len(st.meta["classes"]))
    x, _ = st.inputs("train")
    phi, _ = st.features("train")
    with torch.no_grad():
        assert torch.allclose(phi, st.net.tail_features(x), atol=1e-6)
        assert not torch.allclose(phi, net0.tail_features(x), atol=1e-4)  # the stage was trained
    summary, _, s = fu.head_usage(st, ks=[1, 2], n_random=1)
    expect = fu.feature_importance(st.net.head().weight, phi.std(0))
    assert summary["participation_ratio"] == pytest.approx(fu.participation_ratio(expect), rel=1e-5)
    assert s == pytest.approx(sorted(expect.tolist(), reverse=True), rel=1e-5)


def test_untrained_run_data_gives_frozen_features(tiny_runs):
    cfg = TrainConfig(**{**tiny_runs["base"], "train_stages": 0})
    rd = untrained_run_data(cfg)
    phi, y = rd.features("train")
    assert phi.shape[0] == len(y) and phi.dim() == 2


def test_explorer_runs_without_a_front_end(tiny_runs, capsys):
    from vldlib.analysis.explorer import Explorer, earlier_curves

    root = tiny_runs["root"]
    ex = Explorer(data_dir=str(root), runs_dir=str(root / "explorer"), compare=[str(root / "runs")],
                  defaults=dict(benchmark=str(root / "fake"), backbone="test_resnet", pretrained=False, resolution=32,
                                steps=4, train_stages=0, batch_size=4, lr=0.05))
    assert [label for label, _ in ex.test_env.options] == ["0: d0", "1: d1", "2: d2"]
    ex.dropout.value, ex.test_env.value = 0.5, 0
    run = ex.run()
    assert (run / "done").exists() and ex.progress.value == 4
    assert list(ex.last_curve.step) == [0, 1, 2, 3, 4] and "done" in ex.status.value  # step 0: the start
    assert len(earlier_curves([root / "runs"], str(root / "fake"), 0).run.unique()) == 3
    assert len(earlier_curves([root / "runs"], str(root / "fake"), 0, match={"train_stages": 0}).run.unique()) == 1


def test_finetune_distances_split_body_and_head(tiny_runs):
    st = load_run_data(tiny_runs["stage"], which="last")
    net0 = initial_net(st.cfg, len(st.meta["classes"]))
    d = lin.finetune_distances(net0, st.net)
    assert d["body_distance"] > 0 and d["head_distance"] > 0 and d["body_params"] > 0
    hd = lin.finetune_distances(net0, net0)
    assert hd["body_distance"] == 0 and hd["head_distance"] == 0
