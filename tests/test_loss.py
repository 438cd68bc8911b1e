"""loss.py against references: full-vocabulary cross-entropy, autograd of the Lemma 1 dual, limits."""

import pytest
import torch
import torch.nn.functional as F

from nanogdrt.llama import Llama, LlamaConfig
from nanogdrt.loss import gdrt_loss, group_sums_and_counts, group_weights, sft_loss, token_nll


def tiny_model(seed=0, vocab=97):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    return Llama(cfg).eval()


def batch_with_targets(vocab=97, B=3, T=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[0, 5:9] = True       # target spans of different lengths and places
    mask[1, 8:12] = True
    mask[2, 2:3] = True
    return ids, mask


def test_token_nll_equals_full_cross_entropy():
    model = tiny_model()
    ids, mask = batch_with_targets()
    with torch.no_grad():
        out = token_nll(model.logits, model.hidden_states(ids), ids, mask)
        full = model(ids).float()                                       # (B, T, V)
    # Reference: cross-entropy over full logits, shifted by one position.
    ref = F.cross_entropy(full[:, :-1].reshape(-1, full.shape[-1]), ids[:, 1:].reshape(-1),
                          reduction="none").view(ids.shape[0], -1)[mask[:, 1:]]
    assert out.nll.shape == (int(mask.sum()),)
    torch.testing.assert_close(out.nll, ref, atol=1e-5, rtol=0)
    assert torch.equal(ids[out.rows, out.cols], ids[mask])


def test_token_nll_rejects_target_at_position_zero():
    model = tiny_model()
    ids, mask = batch_with_targets()
    mask[0, 0] = True
    with pytest.raises(ValueError, match="first token"):
        token_nll(model.logits, model.hidden_states(ids), ids, mask)


def test_sft_is_mean_nll():
    nll = torch.tensor([1.0, 2.0, 6.0])
    assert sft_loss(nll).item() == pytest.approx(3.0)
    assert torch.equal(sft_loss(nll), nll.mean())
    assert sft_loss(torch.zeros(0)).item() == 0.0                       # a rank without tokens


def random_nll_groups(n=40, G=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    nll = (torch.rand(n, generator=g) * 4).requires_grad_()
    groups = torch.randint(1, G + 1, (n,), generator=g)
    return nll, groups


@pytest.mark.parametrize("tau", [0.1, 1.0, 5.0])
def test_gradient_equals_logsumexp_dual(tau):
    """Lemma 1: grad of sum_g sg(Q) L(g) == grad of tau * log sum_g exp(L(g) / tau)."""
    G = 5
    nll, groups = random_nll_groups(G=G)
    ours = gdrt_loss(nll, groups, G, tau)
    (g_ours,) = torch.autograd.grad(ours.loss, nll)

    L = torch.stack([nll[groups == g].mean() for g in range(1, G + 1)])
    dual = tau * torch.logsumexp(L / tau, dim=0)
    (g_dual,) = torch.autograd.grad(dual, nll)
    torch.testing.assert_close(g_ours, g_dual, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ours.q, torch.softmax(L.detach() / tau, 0))
    torch.testing.assert_close(ours.group_loss, L.detach())


def test_gradient_equals_dual_through_model_parameters():
    """Same identity w.r.t. upstream parameters (the LM head of a tiny model)."""
    model = tiny_model()
    ids, mask = batch_with_targets()
    groups_bt = torch.randint(1, 4, ids.shape, generator=torch.Generator().manual_seed(3))
    tau = 0.5

    def grads(objective):
        model.zero_grad()
        out = token_nll(model.logits, model.hidden_states(ids), ids, mask)
        objective(out.nll, groups_bt[out.rows, out.cols]).backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    def dual(nll, groups):
        L = torch.stack([nll[groups == g].mean() for g in groups.unique()])
        return tau * torch.logsumexp(L / tau, 0)

    ours = grads(lambda nll, groups: gdrt_loss(nll, groups, 3, tau).loss)
    ref = grads(dual)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_tau_limits():
    G = 4
    nll, groups = random_nll_groups(G=G)
    L = torch.stack([nll[groups == g].mean() for g in range(1, G + 1)]).detach()
    big = gdrt_loss(nll, groups, G, tau=1e6)
    assert big.loss.item() == pytest.approx(L.mean().item(), rel=1e-5)     # uniform Q
    small = gdrt_loss(nll, groups, G, tau=1e-4)
    assert small.loss.item() == pytest.approx(L.max().item(), rel=1e-5)    # worst group
    assert int(small.q.argmax()) == int(L.argmax())


def test_one_group_is_sft():
    nll, _ = random_nll_groups()
    out = gdrt_loss(nll, torch.ones_like(nll, dtype=torch.long), 1, tau=0.3)
    torch.testing.assert_close(out.loss, sft_loss(nll))
    (g1,) = torch.autograd.grad(out.loss, nll)
    (g2,) = torch.autograd.grad(sft_loss(nll), nll)
    torch.testing.assert_close(g1, g2)


def test_empty_groups_are_finite_and_zero_weight():
    nll = torch.tensor([1.0, 3.0, 2.0], requires_grad=True)
    groups = torch.tensor([2, 2, 5])                    # groups 1, 3, 4 absent
    out = gdrt_loss(nll, groups, 5, tau=0.01)
    (grad,) = torch.autograd.grad(out.loss, nll)
    assert torch.isfinite(out.loss) and torch.isfinite(grad).all()
    assert torch.isfinite(out.q).all() and torch.isfinite(out.group_loss).all()
    assert out.q[[0, 2, 3]].eq(0).all() and out.q.sum().item() == pytest.approx(1.0)
    assert out.counts.tolist() == [0, 2, 0, 0, 1]
    assert out.loss.item() == pytest.approx(2.0, abs=1e-4)   # worst present group at small tau


def test_empty_batch_is_finite():
    nll = torch.zeros(0, requires_grad=True)
    out = gdrt_loss(nll, torch.zeros(0, dtype=torch.long), 3, tau=1.0)
    assert out.loss.item() == 0.0 and out.q.eq(0).all()
    out.loss.backward()


def test_bad_group_ids_and_tau_fail_loudly():
    nll, groups = random_nll_groups(G=3)
    with pytest.raises(ValueError, match="1..2"):
        gdrt_loss(nll, groups, 2, tau=1.0)
    with pytest.raises(ValueError, match="tau"):
        gdrt_loss(nll, groups, 3, tau=0.0)


def test_parts_with_the_scope_of_the_whole_sum_to_the_whole():
    """What gradient accumulation and DDP do: each part of a batch (a micro-batch, a rank's
    slice) given the totals of the whole gets its share; the shares add up to the whole batch's
    loss and gradient, and every part sees the whole batch's Q and L(g)."""
    G, tau = 5, 0.7
    nll, groups = random_nll_groups(n=50, G=G)
    full = gdrt_loss(nll, groups, G, tau)
    (g_full,) = torch.autograd.grad(full.loss, nll)

    cuts = (slice(0, 17), slice(17, 50))
    scope = sum((group_sums_and_counts(nll[s].detach(), groups[s], G) for s in cuts[1:]),
                group_sums_and_counts(nll[cuts[0]].detach(), groups[cuts[0]], G))   # the ranks' all-reduce
    parts = [gdrt_loss(nll[s], groups[s], G, tau, scope=scope) for s in cuts]
    (g_parts,) = torch.autograd.grad(sum(p.loss for p in parts), nll)
    for p in parts:
        torch.testing.assert_close(p.q, full.q)
        torch.testing.assert_close(p.group_loss, full.group_loss)
    torch.testing.assert_close(sum(p.loss for p in parts), full.loss)
    torch.testing.assert_close(g_parts, g_full)
    torch.testing.assert_close(group_weights(scope, tau), full.q)
    # A part on its own (no scope) weights its own groups instead: not the whole batch's Q.
    assert not torch.allclose(gdrt_loss(nll[cuts[0]], groups[cuts[0]], G, tau).q, full.q, atol=1e-3)

    # The token mean the same way: sum / N of the scope, so a part with fewer tokens is not over-weighted.
    n = scope.counts.sum()
    torch.testing.assert_close(sum(sft_loss(nll[s], scope_count=n) for s in cuts), sft_loss(nll))


def test_token_weights_reproduce_the_group_form():
    """loss = sum_t Q(g_t) / N(g_t) nll_t (how gdrt_loss sums) equals sum_g Q(g) L(g) (Eq. 5 as
    written) to float32 rounding, and the loss, Q and L(g) are those of the detached totals."""
    G, tau = 5, 0.3
    nll, groups = random_nll_groups(n=60, G=G, seed=7)
    out = gdrt_loss(nll, groups, G, tau)
    totals = group_sums_and_counts(nll.detach(), groups, G)
    torch.testing.assert_close(out.loss, (group_weights(totals, tau) * totals.mean()).sum())
    assert torch.equal(out.group_loss, totals.mean()) and torch.equal(out.counts, totals.counts)
    assert not out.q.requires_grad and not out.group_loss.requires_grad
