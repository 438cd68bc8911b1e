"""methods.py and step.py: each method's loss against loss.py / baselines/msl.py, reweight.py, and
--loss-scope step: gradient accumulation gives the Q(g), loss and update of one big batch."""


import pytest
import torch

from nanogdrt import synthetic
from nanogdrt.baselines import methods
from nanogdrt.baselines.reweight import reweight_loss
from nanogdrt.batches import make_examples
from nanogdrt.data import load_dataset
from nanogdrt.llama import Llama
from nanogdrt.lora import LoRAConfig, inject_lora, lora_parameters
from nanogdrt.loss import TokenNLL, gdrt_loss, group_sums_and_counts, sft_loss
from nanogdrt.prompt import PromptBuilder
from nanogdrt.trie import Trie
from nanogdrt.infra.step import StepConfig, StepData, train_step
from nanogdrt.tokenizer import Tokenizer


G = 4


def nll_groups_rows(n=37, B=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    nll = (torch.rand(n, generator=g) * 4).requires_grad_()
    groups = torch.randint(1, G + 1, (n,), generator=g)
    groups[groups == 3] = 2                                  # one group absent: Q(3) = 0
    rows = torch.sort(torch.randint(0, B, (n,), generator=g)).values
    return TokenNLL(nll, rows, rows), groups


def scope_of(tokens, groups):
    return group_sums_and_counts(tokens.nll.detach(), groups, G)


@pytest.mark.parametrize("tau", [0.2, 1.0])
def test_group_weighting_is_gdrt_loss_and_has_the_gradient_of_the_smooth_max(tau):
    """The trained loss is loss.gdrt_loss itself (the same bits), and (envelope theorem) its
    gradient is that of tau * logsumexp(L / tau) over the present groups."""
    tokens, groups = nll_groups_rows()
    ours = methods.method_loss("groups", tokens, groups, None, scope_of(tokens, groups), tau)
    ref = gdrt_loss(tokens.nll, groups, G, tau)
    assert torch.equal(ours.loss, ref.loss) and torch.equal(ours.q, ref.q)
    (g_ours,) = torch.autograd.grad(ours.loss, tokens.nll)
    L = torch.stack([tokens.nll[groups == g].mean() for g in (1, 2, 4)])
    (g_max,) = torch.autograd.grad(tau * torch.logsumexp(L / tau, 0), tokens.nll)
    torch.testing.assert_close(g_ours, g_max, atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(ours.loss, (torch.softmax(L / tau, 0) * L).sum())        # sum_g Q(g) L(g)
    assert ours.q[2] == 0


def test_uniform_group_weighting_is_the_mean_of_the_present_group_losses_and_gdrt_at_large_tau():
    """group-mean (our control): Q = 1/G' over the G' present groups, so the loss is the plain
    mean of the L(g), and it is the tau -> inf limit of Eq. 5 (checked at tau = 1e7)."""
    tokens, groups = nll_groups_rows(seed=4)
    ours = methods.method_loss("uniform-groups", tokens, groups, None, scope_of(tokens, groups), 0.5)
    L = torch.stack([tokens.nll[groups == g].mean() for g in (1, 2, 4)])          # group 3 is absent
    torch.testing.assert_close(ours.loss, L.mean())
    (g_ours,) = torch.autograd.grad(ours.loss, tokens.nll)
    (g_ref,) = torch.autograd.grad(L.mean(), tokens.nll)
    torch.testing.assert_close(g_ours, g_ref)
    assert torch.equal(ours.q, torch.tensor([1 / 3, 1 / 3, 0, 1 / 3]))
    torch.testing.assert_close(ours.loss, gdrt_loss(tokens.nll, groups, G, 1e7).loss, atol=1e-6, rtol=1e-6)
    assert methods.METHODS["group-mean"] == methods.Method("nll", "uniform-groups")


def test_mean_and_example_weightings_equal_sft_and_reweight_losses():
    tokens, groups = nll_groups_rows(seed=1)
    scope = scope_of(tokens, groups)
    mean = methods.method_loss("mean", tokens, groups, None, scope, 1.0)
    assert torch.equal(mean.loss, sft_loss(tokens.nll)) and mean.q is None
    w = torch.rand(6, generator=torch.Generator().manual_seed(2)) * 2
    torch.testing.assert_close(methods.method_loss("examples", tokens, groups, w, scope, 1.0).loss,
                               reweight_loss(tokens.nll, tokens.rows, w))


@pytest.mark.parametrize("weighting", ["mean", "groups", "examples", "uniform-groups"])
def test_parts_with_the_whole_scope_sum_to_the_whole_loss(weighting):
    tokens, groups = nll_groups_rows(seed=3)
    w = torch.linspace(0.5, 1.5, 6)
    scope = scope_of(tokens, groups)
    whole = methods.method_loss(weighting, tokens, groups, w, scope, 0.5).loss
    cuts = [slice(0, 5), slice(5, 20), slice(20, 37)]
    parts = sum(methods.method_loss(weighting, TokenNLL(*(x[c] for x in tokens)), groups[c], w, scope, 0.5).loss
                for c in cuts)
    torch.testing.assert_close(parts, whole)


# ----------------------------------------------------------------------------- one optimizer step (step.py)

@pytest.fixture(scope="module")
def step_setup(tiny_model_dir):
    tokenizer = Tokenizer(tiny_model_dir)
    builder = PromptBuilder(tokenizer, "synthetic")
    ds = load_dataset("synthetic", train_samples=8, synthetic=synthetic.SMALL)
    examples = make_examples(builder, ds.train, ds.titles)
    trie = Trie.from_titles(ds.titles, builder)
    g = torch.Generator().manual_seed(0)
    token_groups = [torch.randint(1, G + 1, (e.target[1] - e.target[0],), generator=g) for e in examples]
    nodes = methods.target_nodes_of(trie, examples)
    return tokenizer, examples, trie, token_groups, nodes


def step_gradients(step_setup, tiny_model_dir, method, scope, micro_batches):
    tokenizer, examples, trie, token_groups, nodes = step_setup
    torch.manual_seed(0)
    model = Llama.from_pretrained(tiny_model_dir)
    inject_lora(model, LoRAConfig(r=4, dropout=0.0))
    params = lora_parameters(model)
    with torch.no_grad():                                    # B != 0, so A gets a gradient too
        for p in params:
            p.normal_(0, 0.05)
    per_token = methods.METHODS[method].per_token
    data = StepData(examples, nodes if per_token == "msl" else None, None, tokenizer.pad_id)
    net = methods.TargetLoss(model, per_token, trie, 4.5)
    log = train_step(net, micro_batches, data, token_groups, StepConfig(method, G, 0.5, scope))
    return log, [p.grad.clone() for p in params]


@pytest.mark.parametrize("method", ["gdrt", "msl+gdrt", "sft", "group-mean"])
def test_step_scope_accumulation_equals_one_big_batch(step_setup, tiny_model_dir, method):
    """4 micro-batches of 2 (step scope) == one batch of 8: Q, loss, L(g), gradient (1e-5)."""
    order = [3, 0, 6, 1, 7, 2, 5, 4]
    one, g_one = step_gradients(step_setup, tiny_model_dir, method, "step", [order])
    acc, g_acc = step_gradients(step_setup, tiny_model_dir, method, "step",
                                [order[i:i + 2] for i in range(0, 8, 2)])
    torch.testing.assert_close(acc["q"], one["q"], atol=1e-5, rtol=1e-5)
    assert acc["loss"] == pytest.approx(one["loss"], rel=1e-5, abs=1e-6)
    torch.testing.assert_close(acc["group_loss"], one["group_loss"], atol=1e-5, rtol=1e-5)
    for a, b in zip(g_acc, g_one):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    if method.endswith("gdrt"):
        assert one["q"].sum().item() == pytest.approx(1.0) and one["q"].max() > 0.26
        # Per-micro-batch Q (the behaviour of --loss-scope micro) is not the big batch's.
        micro, g_micro = step_gradients(step_setup, tiny_model_dir, method, "micro",
                                        [order[i:i + 2] for i in range(0, 8, 2)])
        assert not torch.allclose(micro["q"], one["q"], atol=1e-3)
        assert not all(torch.allclose(a, b, atol=1e-5, rtol=1e-4) for a, b in zip(g_micro, g_one))
    if method == "group-mean":                               # logged Q: uniform over the present groups
        present = (one["group_loss"] > 0).float()
        torch.testing.assert_close(one["q"], present / present.sum())


def test_msl_forward_on_a_rank_without_rows(step_setup, tiny_model_dir):
    """Under DDP a rank may get no rows of a last micro-batch: an empty loss that still backprops."""
    tokenizer, examples, trie, token_groups, nodes = step_setup
    model = Llama.from_pretrained(tiny_model_dir)
    inject_lora(model, LoRAConfig(r=4, dropout=0.0))
    ids = torch.tensor([examples[0].ids])
    mask = torch.zeros_like(ids, dtype=torch.bool)
    out = methods.TargetLoss(model, "msl", trie, 4.5)(ids, mask, torch.zeros_like(ids))
    assert out.nll.shape == (0,)
    out.nll.sum().backward()
