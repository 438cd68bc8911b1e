"""DROS (baselines/dros.py): the robust term against a brute-force loop over users and items (values
and gradients), against the official code's own algebraic form, its weights by hand, its place in
SASRec's loss (alpha 0 = --loss bce bit for bit) and the CLI. Tolerances: the term runs in float32,
the references in float64 over a tiny catalogue: 1e-5 relative (1e-6 absolute) on values and
gradients; 1e-5 absolute where a model's forward pass is recomputed window by window."""

import json
import math

import pytest
import torch

from nanogdrt.baselines import dros, sasrec


def brute_force_term(scores, targets, weights, beta):
    """mean_u log sum_j exp(w_j (s_uj - y_uj)^2 / beta), one user and one item at a time, float64
    scalars (autograd follows the loop, so it gives the reference gradient too)."""
    M, N = scores.shape
    total = 0.0
    for u in range(M):
        errors = []
        for j in range(N):
            y = 1.0 if j == int(targets[u]) else 0.0
            errors.append(weights[j] * (scores[u, j] - y) ** 2 / beta)
        top = max(float(e.detach()) for e in errors)          # shift by the max: no overflow
        total = total + top + torch.log(sum(torch.exp(e - top) for e in errors))
    return total / M


def code_form(scores, targets, weights, beta):
    """DROS's SASRec_bce.py, L428-440, re-derived: sum over all items of exp(w s^2 / beta), minus the
    target's term with y = 0, plus its term with y = 1; log with 1e-24; then the mean over rows."""
    sq = weights * scores * scores
    t = targets[:, None]
    pos_scores = sq.gather(1, t)[:, 0]
    pos_loss = (weights * (scores - 1) ** 2).gather(1, t)[:, 0]
    inner = torch.exp(sq / beta).sum(1) - torch.exp(pos_scores / beta) + torch.exp(pos_loss / beta)
    return torch.log(inner + 1e-24).mean()


@pytest.mark.parametrize("beta", [1.0, 0.3, 5.0])
def test_term_matches_brute_force_loop_values_and_gradients(beta):
    g = torch.Generator().manual_seed(0)
    M, N = 4, 7
    scores64 = (2 * torch.randn(M, N, generator=g, dtype=torch.float64)).requires_grad_()
    targets = torch.tensor([0, 3, 6, 3])
    weights64 = 0.5 + torch.rand(N, generator=g, dtype=torch.float64)
    scores = scores64.detach().float().requires_grad_()
    value = dros.robust_term(scores, targets, weights64.float(), beta)
    ref = brute_force_term(scores64, targets, weights64, beta)
    torch.testing.assert_close(value.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(value.double(), code_form(scores64, targets, weights64, beta), rtol=1e-5, atol=1e-6)

    grad = torch.autograd.grad(value, scores)[0]
    grad_ref = torch.autograd.grad(ref, scores64)[0]
    torch.testing.assert_close(grad.double(), grad_ref, rtol=1e-5, atol=1e-6)
    # by hand: d/ds_uj = softmax_j(e_u) * 2 w_j (s_uj - y_uj) / beta / M
    y = torch.zeros(M, N, dtype=torch.float64).scatter_(1, targets[:, None], 1.0)
    e = weights64 * (scores64.detach() - y) ** 2 / beta
    hand = torch.softmax(e, -1) * 2 * weights64 * (scores64.detach() - y) / beta / M
    torch.testing.assert_close(grad.double(), hand, rtol=1e-5, atol=1e-6)


def test_term_is_finite_where_the_code_overflows():
    scores = torch.tensor([[40.0, -3.0, 0.5], [0.0, 60.0, 1.0]])
    targets, weights, beta = torch.tensor([2, 1]), torch.tensor([0.7, 0.8, 0.9]), 0.5
    with torch.no_grad():
        code = code_form(scores.double(), targets, weights.double(), beta)   # exp(2240) overflows in float64
        assert not torch.isfinite(code)                                        # inf, or inf - inf = nan
        value = dros.robust_term(scores, targets, weights, beta)
        ref = brute_force_term(scores.double(), targets, weights.double(), beta)
    assert torch.isfinite(value)
    torch.testing.assert_close(value.double(), ref, rtol=1e-5, atol=1e-6)


def test_item_weights_by_hand():
    targets = [5, 5, 2, 9, 5]
    w = dros.item_weights(targets, [2, 5, 7, 9])            # counts 1, 3, 0, 1 -> +1: 2, 4, 1, 2 (sum 9)
    expected = torch.tensor([(2 / 9) ** 0.05, (4 / 9) ** 0.05, (1 / 9) ** 0.05, (2 / 9) ** 0.05])
    torch.testing.assert_close(w, expected, rtol=1e-6, atol=0)
    assert w.dtype == torch.float32
    # the columns follow item_ids; power 1 gives the smoothed shares themselves
    torch.testing.assert_close(dros.item_weights(targets, [9, 7, 5, 2], power=1.0),
                               torch.tensor([2 / 9, 1 / 9, 4 / 9, 2 / 9]), rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="outside the catalogue"):
        dros.item_weights([5, 11], [2, 5, 7, 9])
    with pytest.raises(ValueError, match="alpha >= 0 and beta > 0"):
        dros.robust(targets, [2, 5, 7, 9], alpha=0.1, beta=0.0)


# ----------------------------------------------------------------------------- inside SASRec's loss

WINDOWS = [([3, 7, 1, 9, 12], 4), ([5, 2], 30), ([8, 8, 6, 1, 2, 3, 4, 5, 6, 7], 11)]  # (history, target)


def tiny_model(dropout=0.0):
    torch.manual_seed(0)
    cfg = sasrec.SASRecConfig(n_items=30, hidden=16, n_blocks=2, n_heads=2, maxlen=10, dropout=dropout)
    return sasrec.SASRec(cfg, list(range(1, 31)))


def test_alpha_zero_is_the_bce_loss_bit_for_bit():
    """With dropout on, the same torch seed and the same negatives' generator: --loss dros with
    alpha 0 gives --loss bce's value and gradients exactly (the code skips the term at alpha 0)."""
    model = tiny_model(dropout=0.2)
    robust = dros.robust([t for _, t in WINDOWS], model.item_ids, alpha=0.0)
    out = []
    for loss, extra in (("bce", None), ("dros", robust)):
        torch.manual_seed(7)
        value = sasrec.sequence_loss(model, WINDOWS, loss, torch.Generator().manual_seed(1), extra)
        out.append((value, torch.autograd.grad(value, list(model.parameters()))))
    assert torch.equal(out[0][0], out[1][0])
    assert all(torch.equal(a, b) for a, b in zip(out[0][1], out[1][1]))


def test_dros_loss_is_bce_plus_alpha_times_the_term_window_by_window():
    """The batched term (padding, shift, mask) equals the term over each window's positions fed
    alone, unpadded: every prefix of every window is one row u, its next item the target."""
    model = tiny_model()
    robust = dros.robust([t for _, t in WINDOWS], model.item_ids, alpha=0.3, beta=0.8)
    bce = sasrec.sequence_loss(model, WINDOWS, "bce", torch.Generator().manual_seed(1))
    value = sasrec.sequence_loss(model, WINDOWS, "dros", torch.Generator().manual_seed(1), robust)
    rows, targets = [], []
    for history, target in WINDOWS:
        seq = (history + [target])[-(model.cfg.maxlen + 1):]
        h = model(model.index([seq[:-1]]))[0]                       # (n, C)
        rows += [model.logits(h[t]) for t in range(len(seq) - 1)]
        targets += [seq[t + 1] - 1 for t in range(len(seq) - 1)]   # item id i is column i - 1 here
    term = brute_force_term(torch.stack(rows).double(), torch.tensor(targets), robust.weights.double(), 0.8)
    torch.testing.assert_close((value - bce).double(), 0.3 * term, atol=1e-5, rtol=0)


def test_train_requires_the_term_for_dros():
    with pytest.raises(ValueError, match="needs robust"):
        sasrec.train(tiny_model(), [], [], {}, loss="dros", epochs=1)


# ----------------------------------------------------------------------------- the CLI

def test_cli_trains_dros_and_writes_metrics(tmp_path):
    sasrec.main(["--dataset", "synthetic", "--synthetic-size", "small", "--loss", "dros", "--dros-alpha", "0.5",
                 "--epochs", "1", "--hidden", "16", "--valid-samples", "20", "--test-samples", "20",
                 "--out", str(tmp_path / "run")])
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["model"] == "DROS" and results["dataset"]["test"] == 20
    assert results["dros"]["alpha"] == 0.5 and results["dros"]["beta"] == dros.BETA
    assert results["config"]["dros_alpha"] == 0.5 and results["config"]["dros_beta"] == dros.BETA
    assert {"NDCG@5", "NDCG@10", "HR@5", "HR@10"} <= set(results["metrics"])
    assert math.isfinite(results["history"][0]["loss"])


@pytest.mark.parametrize("argv, flag", [
    (["--loss", "dros", "--dros-alpha", "-1"], "--dros-alpha"),
    (["--loss", "dros", "--dros-beta", "0"], "--dros-beta"),
    (["--loss", "bce", "--dros-alpha", "0.1"], "--dros-alpha"),
])
def test_cli_rejects_bad_dros_flags_before_any_work(tmp_path, capsys, argv, flag):
    with pytest.raises(SystemExit):
        sasrec.main(argv + ["--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert flag in err
    assert not (tmp_path / "run").exists()
