"""baselines/msl.py and baselines/reweight.py: MSL against a hand computation, plain cross-entropy and MSL's own dense
-inf masking; Reweight against hand-computed IFairLRS weights and SFT."""

import math

import pytest
import torch

from nanogdrt.baselines.msl import msl_token_loss
from nanogdrt.baselines.reweight import (reweight_example_weights, reweight_group_weights,
                                         reweight_loss)
from nanogdrt.llama import Llama, LlamaConfig
from nanogdrt.loss import gdrt_loss, sft_loss, token_nll
from nanogdrt.trie import Trie

EOS, V = 2, 10
TITLES = {10: [5, 6, 7, EOS], 11: [5, 6, 8, EOS], 13: [5, 9, EOS], 14: [5, 9, 4, EOS], 15: [3, EOS]}


def identity(h):
    """An LM head whose logits are the hidden states themselves (C = V): logits we choose."""
    return h


def batch(targets, prompt_len=2, seed=0):
    """Ids = a random prompt then each target, right-padded with 0; hidden = random logits."""
    g = torch.Generator().manual_seed(seed)
    T = prompt_len + max(map(len, targets)) + 1
    ids = torch.zeros(len(targets), T, dtype=torch.long)
    mask = torch.zeros(len(targets), T, dtype=torch.bool)
    for b, t in enumerate(targets):
        ids[b, :prompt_len] = torch.randint(0, V, (prompt_len,), generator=g)
        ids[b, prompt_len:prompt_len + len(t)] = torch.tensor(t)
        mask[b, prompt_len:prompt_len + len(t)] = True
    hidden = (3 * torch.randn(len(targets), T, V, generator=g)).requires_grad_()
    return ids, mask, hidden


def msl(trie, ids, mask, hidden, tau):
    allowed = trie.allowed(trie.target_nodes(ids, mask))
    return msl_token_loss(identity, hidden, ids, mask, allowed.tokens, allowed.mask, tau)


def test_msl_equals_hand_computation():
    trie = Trie.from_token_ids(TITLES, EOS)
    targets = [TITLES[14], TITLES[11]]
    ids, mask, hidden = batch(targets)
    tau = 4.5
    out = msl(trie, ids, mask, hidden, tau)
    # Allowed sets by hand, at each position of each target (prefix walked from the response start).
    sets = [[{3, 5}, {6, 9}, {4, EOS}, {EOS}],          # 5 9 4 EOS: after "5 9" title 13 may end
            [{3, 5}, {6, 9}, {7, 8}, {EOS}]]            # 5 6 8 EOS
    expected = []
    for b, (t, allowed) in enumerate(zip(targets, sets)):
        for j, (y, A) in enumerate(zip(t, allowed)):
            z = hidden[b, 2 + j - 1].tolist()            # logits predicting position 2 + j
            expected.append(-z[y] / tau + math.log(sum(math.exp(z[v] / tau) for v in A)))
    torch.testing.assert_close(out.nll, torch.tensor(expected), atol=1e-5, rtol=1e-5)
    assert out.nll[3].item() == 0.0 and out.nll[7].item() == 0.0    # EOS alone: exactly 0
    assert torch.equal(ids[out.rows, out.cols], ids[mask])


def test_msl_with_every_token_allowed_and_tau_1_is_cross_entropy():
    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2)).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (3, 12), generator=g)
    mask = torch.zeros(3, 12, dtype=torch.bool)
    mask[0, 5:9] = mask[1, 8:12] = mask[2, 2:3] = True
    N = int(mask.sum())
    with torch.no_grad():
        hidden = model.hidden_states(ids)
        ref = token_nll(model.logits, hidden, ids, mask)
        out = msl_token_loss(model.logits, hidden, ids, mask, torch.arange(97).repeat(N, 1),
                             torch.ones(N, 97, dtype=torch.bool), tau=1.0)
    torch.testing.assert_close(out.nll, ref.nll, atol=1e-5, rtol=1e-6)
    assert torch.equal(out.rows, ref.rows) and torch.equal(out.cols, ref.cols)


@pytest.mark.parametrize("tau", [0.5, 1.0, 4.5])
def test_msl_equals_dense_minus_inf_masking(tau):
    """Reference: MSL's own recipe, a dense (N, V) mask, logits outside it set to -inf, then /tau."""
    trie = Trie.from_token_ids(TITLES, EOS)
    ids, mask, hidden = batch([TITLES[10], TITLES[15], TITLES[13]], seed=3)
    out = msl(trie, ids, mask, hidden, tau)
    (g_ours,) = torch.autograd.grad(out.nll.mean(), hidden)

    rows, cols = mask.nonzero(as_tuple=True)
    logits = hidden[rows, cols - 1]                                      # (N, V)
    allowed = trie.allowed(trie.target_nodes(ids, mask))
    dense = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, allowed.tokens, allowed.mask)
    z = logits.masked_fill(~dense, float("-inf")) / tau
    ref = -z.gather(1, ids[rows, cols][:, None]).squeeze(1) + torch.log(torch.exp(z).sum(1))
    (g_ref,) = torch.autograd.grad(ref.mean(), hidden)
    torch.testing.assert_close(out.nll, ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(g_ours, g_ref, atol=1e-7, rtol=1e-5)


def test_msl_gradient_reaches_no_disallowed_logit():
    trie = Trie.from_token_ids(TITLES, EOS)
    ids, mask, hidden = batch([TITLES[14], TITLES[15], TITLES[10]], seed=1)
    out = msl(trie, ids, mask, hidden, tau=4.5)
    (grad,) = torch.autograd.grad(out.nll.sum(), hidden)
    allowed = trie.allowed(trie.target_nodes(ids, mask))
    dense = torch.zeros(len(out.nll), V, dtype=torch.bool).scatter_(1, allowed.tokens, allowed.mask)
    g = grad[out.rows, out.cols - 1]                                     # (N, V) grad of the logits
    assert g[~dense].eq(0).all()                                         # exactly 0, not just small
    several = dense.sum(1) > 1
    assert g[several].ne(0).any(dim=1).all()                            # real sets do get gradient
    others = torch.ones_like(grad, dtype=torch.bool)
    others[out.rows, out.cols - 1] = False
    assert grad[others].eq(0).all()                                      # nor do non-target states


def test_msl_target_outside_catalogue_is_a_clear_error():
    trie = Trie.from_token_ids(TITLES, EOS)
    ids, mask, hidden = batch([TITLES[10], [5, 4, EOS]])
    with pytest.raises(ValueError, match=r"example 1 of the batch.*not a catalogue title"):
        trie.target_nodes(ids, mask)
    # Allowed sets that do not hold the target (misaligned nodes) are caught by the loss itself.
    nodes = trie.target_nodes(*batch([TITLES[10], TITLES[13]])[:2])
    allowed = trie.allowed(nodes.flip(0))
    ids, mask, hidden = batch([TITLES[10], TITLES[13]])
    with pytest.raises(ValueError, match=r"example \d of the batch, position \d+: target token"):
        msl_token_loss(identity, hidden, ids, mask, allowed.tokens, allowed.mask, 1.0)
    with pytest.raises(ValueError, match="tau"):
        msl_token_loss(identity, hidden, ids, mask, allowed.tokens, allowed.mask, 0.0)


def test_msl_plus_gdrt_with_one_group_is_msl_mean():
    trie = Trie.from_token_ids(TITLES, EOS)
    ids, mask, hidden = batch([TITLES[14], TITLES[11], TITLES[15]], seed=2)
    per_token = msl(trie, ids, mask, hidden, tau=4.5).nll
    out = gdrt_loss(per_token, torch.ones_like(per_token, dtype=torch.long), 1, tau=0.3)
    torch.testing.assert_close(out.loss, per_token.mean())
    torch.testing.assert_close(out.loss, sft_loss(per_token))
    (g1,) = torch.autograd.grad(out.loss, hidden, retain_graph=True)
    (g2,) = torch.autograd.grad(per_token.mean(), hidden)
    torch.testing.assert_close(g1, g2)


# ----------------------------------------------------------------------------- Reweight

GROUP = {1: 1, 2: 1, 3: 2, 4: 3, 5: 3}   # item -> group


def test_reweight_group_weights_by_hand():
    histories = [[1, 2, 3], [3, 4], [1, 5, 4, 2]]     # groups 1 1 2 | 2 3 | 1 3 3 1 -> H = (4, 2, 3)
    targets = [4, 3, 1]                               # groups 3, 2, 1 -> T = (1, 1, 1)
    w = reweight_group_weights(histories, targets, GROUP, 3)
    torch.testing.assert_close(w, torch.tensor([(4 / 9) / (1 / 3), (2 / 9) / (1 / 3), (3 / 9) / (1 / 3)]))
    ex = reweight_example_weights(targets, GROUP, w)
    torch.testing.assert_close(ex, torch.tensor([w[2], w[1], w[0]]))
    assert ex.mean().item() == pytest.approx(1.0)     # every history group is a target group

    targets = [4, 4, 4, 1]                            # T = (1, 0, 3): group 2 has no target
    w = reweight_group_weights(histories, targets, GROUP, 3)
    torch.testing.assert_close(w, torch.tensor([(4 / 9) / (1 / 4), 0.0, (3 / 9) / (3 / 4)]))
    w_half = reweight_group_weights(histories, targets, GROUP, 3, power=0.5)
    torch.testing.assert_close(w_half, w.sqrt())
    w_off = reweight_group_weights(histories, targets, GROUP, 3, power=0.0)
    torch.testing.assert_close(w_off, torch.tensor([1.0, 0.0, 1.0]))  # uniform over used groups
    with pytest.raises(ValueError, match="outside 1..2"):
        reweight_group_weights(histories, targets, GROUP, 2)


def random_nll(n=17, B=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    nll = (torch.rand(n, generator=g) * 4).requires_grad_()
    rows = torch.sort(torch.randint(0, B, (n,), generator=g)).values
    return nll, rows


def test_uniform_weights_are_sft_exactly():
    nll, rows = random_nll()
    ones = torch.ones(4)
    assert torch.equal(reweight_loss(nll, rows, ones), sft_loss(nll))
    assert torch.equal(reweight_loss(nll, rows, ones, scope_count=2 * nll.numel()),
                       sft_loss(nll, scope_count=2 * nll.numel()))
    (g1,) = torch.autograd.grad(reweight_loss(nll, rows, ones), nll)
    (g2,) = torch.autograd.grad(sft_loss(nll), nll)
    assert torch.equal(g1, g2)


def test_reweight_loss_by_hand():
    nll = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    rows = torch.tensor([0, 0, 1, 1, 1])                  # example 0: 2 tokens, example 1: 3 tokens
    w = torch.tensor([0.5, 2.0])
    expected = (0.5 * (1 + 2) + 2.0 * (3 + 4 + 5)) / 5
    assert reweight_loss(nll, rows, w).item() == pytest.approx(expected)
    # Two parts of one scope (micro-batches or ranks): each divides by the scope's 5 tokens; they add up.
    parts = reweight_loss(nll[:2], rows[:2], w, scope_count=5) + reweight_loss(nll[2:], rows[2:], w, scope_count=5)
    assert parts.item() == pytest.approx(expected)
