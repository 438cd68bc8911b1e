"""CFT (nanogdrt/baselines/cft.py): the loss of one optimizer step against the factual and the
counterfactual prompts run alone, one example at a time, with the logits gathered and the
weights written by hand; its weights; its counterfactual prompt; a train.py run."""

import json

import pytest
import torch
import torch.nn.functional as F

from nanogdrt import synthetic
from nanogdrt.baselines import cft, methods
from nanogdrt.batches import make_examples
from nanogdrt.data import load_dataset
from nanogdrt.infra.step import StepConfig, StepData, train_step
from nanogdrt.llama import Llama
from nanogdrt.lora import LoRAConfig, inject_lora, lora_parameters
from nanogdrt.prompt import TEMPLATES, PromptBuilder
from nanogdrt.tokenizer import Tokenizer

G = 3


def official_no_input_prompt(instruction: str, output: str) -> str:
    """CFT's counterfactual text (train.py's `generate_prompt` with input None), as written there
    but without its 4-space indentation (see cft.py)."""
    return ("Below is an instruction that describes a task. Write a response that appropriately "
            "completes the request.  \n\n### Instruction:\n" + instruction + "\n\n### Response:\n" + output)


@pytest.fixture(scope="module")
def cft_setup(tiny_model_dir):
    tokenizer = Tokenizer(tiny_model_dir)
    builder = PromptBuilder(tokenizer, "synthetic")
    ds = load_dataset("synthetic", train_samples=8, synthetic=synthetic.SMALL)
    examples = make_examples(builder, ds.train, ds.titles)
    titles = [ds.titles[x.target] for x in ds.train]
    prompt = cft.counterfactual_prompt(builder, ds.name, titles)
    return tokenizer, builder, ds, examples, titles, prompt


# ----------------------------------------------------------------------------- weights and prompt

def test_weights_fall_linearly_from_1_to_a_quarter():
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 0],
                         [0, 1, 1, 1, 0, 0, 0],
                         [0, 0, 0, 0, 0, 0, 0],
                         [0, 0, 0, 0, 0, 1, 0]], dtype=torch.bool)
    w = cft.position_weights(mask)
    # 4 tokens: steps of 0.75 / 3; 3 tokens: steps of 0.75 / 2; one token: 1 (the code's NaN)
    assert w.tolist() == pytest.approx([1, 0.75, 0.5, 0.25, 1, 0.625, 0.25, 1])
    assert w[:7].sum().item() == pytest.approx((1 + 0.25) / 2 * 7)      # sum w = w_bar N (n >= 2)


def test_counterfactual_prompt_has_no_history(cft_setup):
    tokenizer, builder, ds, examples, titles, prompt = cft_setup
    text = tokenizer.decode(prompt)
    assert text == official_no_input_prompt(TEMPLATES["synthetic"].instruction, "")
    assert "### Input" not in text and "N/A" not in text and '"' not in text
    for x in ds.train:
        assert all(ds.titles[i] not in text for i in x.history)


def test_counterfactual_rows_are_the_joint_tokenization(cft_setup):
    tokenizer, builder, ds, examples, titles, prompt = cft_setup
    rows = [examples[i] for i in (2, 5, 0)]
    T = max(len(e.ids) for e in rows)
    ids = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.bool)
    for b, e in enumerate(rows):
        ids[b, :len(e.ids)] = torch.tensor(e.ids)
        mask[b, e.target[0]:e.target[1]] = True
    cf_ids, cf_mask = cft.counterfactual_batch(torch.tensor(prompt), ids, mask, pad_id=7)
    instruction = TEMPLATES["synthetic"].instruction
    for b, i in enumerate((2, 5, 0)):
        alone = tokenizer.encode(official_no_input_prompt(instruction, f'"{titles[i]}"'),
                                 add_special_tokens=True) + [tokenizer.eos_id]
        n = len(alone)
        assert cf_ids[b, :n].tolist() == alone and (cf_ids[b, n:] == 7).all()
        assert cf_mask[b].nonzero()[:, 0].tolist() == list(range(len(prompt), n))
    assert cf_ids[cf_mask].tolist() == ids[mask].tolist()              # same tokens, same order


def test_titles_that_cannot_follow_the_prompt_are_refused_in_one_line(cft_setup):
    tokenizer, builder, ds, examples, titles, prompt = cft_setup

    class Shifted:       # a builder whose target ids are not what follows the prompt
        def __init__(self, target_ids):
            self.tokenizer, self.target_ids = tokenizer, target_ids

    for target_ids, why in [(lambda t: [tokenizer.eos_id], ">= 2 tokens"),
                            (lambda t: builder.target_ids(t)[1:], "differ from target_ids")]:
        with pytest.raises(ValueError, match=why) as err:
            cft.counterfactual_prompt(Shifted(target_ids), "synthetic", titles[:2])
        assert "\n" not in str(err.value) and repr(sorted(titles[:2])[0]) in str(err.value)


# ----------------------------------------------------------------------------- the loss

def lora_model(tiny_model_dir):
    torch.manual_seed(0)
    model = Llama.from_pretrained(tiny_model_dir)
    inject_lora(model, LoRAConfig(r=4, dropout=0.0))
    with torch.no_grad():                                    # B != 0, so A gets a gradient too
        for p in lora_parameters(model):
            p.normal_(0, 0.05)
    return model


def by_hand(model, tokenizer, example, title):
    """sum_t w_t (CE(z_f) + 0.1 CE(z_f - z_cf)) and sum_t w_t of one example, each prompt run
    alone (batch of 1, no padding), float64 from the float32 logits."""
    s, e = example.target
    n, y = e - s, torch.tensor(example.ids[s:e])
    factual = model.logits(model.hidden_states(torch.tensor([example.ids]))[0, s - 1:e - 1])
    cf = tokenizer.encode(official_no_input_prompt(TEMPLATES["synthetic"].instruction, f'"{title}"'),
                          add_special_tokens=True) + [tokenizer.eos_id]
    assert cf[-n:] == example.ids[s:e]
    L = len(cf)
    counter = model.logits(model.hidden_states(torch.tensor([cf]))[0, L - n - 1:L - 1])
    w = torch.tensor([1 - k * 0.75 / (n - 1) for k in range(n)], dtype=torch.float64)
    ce = F.cross_entropy(factual.float(), y, reduction="none").double()
    ce_effect = F.cross_entropy((factual - counter).float(), y, reduction="none").double()
    return (w * (ce + 0.1 * ce_effect)).sum(), w.sum()


@pytest.mark.parametrize("scope", ["step", "micro"])
def test_step_loss_and_gradient_equal_two_forwards_alone(cft_setup, tiny_model_dir, scope):
    """--loss-scope step: one weighted mean over the whole step's tokens; micro (the code's HF
    Trainer): the mean over micro-batches of each micro-batch's weighted mean. 1e-5."""
    tokenizer, builder, ds, examples, titles, prompt = cft_setup
    micro_batches = [[3, 0, 6], [1, 7, 2, 5]]
    model = lora_model(tiny_model_dir)
    params = lora_parameters(model)
    net = methods.TargetLoss(model, "cft", counterfactual_prompt=torch.tensor(prompt))
    groups = [torch.ones(e.target[1] - e.target[0], dtype=torch.long) for e in examples]
    log = train_step(net, micro_batches, StepData(examples, None, None, tokenizer.pad_id), groups,
                     StepConfig("cft", G, 0.5, scope))
    grads = [p.grad.clone() for p in params]
    model.zero_grad(set_to_none=True)

    parts = [[by_hand(model, tokenizer, examples[i], titles[i]) for i in b] for b in micro_batches]
    if scope == "step":
        ref = sum(num for b in parts for num, _ in b) / sum(den for b in parts for _, den in b)
    else:
        ref = sum(sum(num for num, _ in b) / sum(den for _, den in b) for b in parts) / len(parts)
    ref.backward()
    assert log["loss"] == pytest.approx(ref.item(), rel=1e-5)
    for got, p in zip(grads, params):
        torch.testing.assert_close(got, p.grad.float(), rtol=1e-5, atol=1e-5)
    assert log["q"].eq(0).all()


def test_cft_is_not_sft(cft_setup, tiny_model_dir):
    """The effect term and the weights change the step: not SFT's loss or gradient."""
    tokenizer, builder, ds, examples, titles, prompt = cft_setup
    data, groups = StepData(examples, None, None, tokenizer.pad_id), [
        torch.ones(e.target[1] - e.target[0], dtype=torch.long) for e in examples]
    logs = {}
    for method in ("sft", "cft"):
        model = lora_model(tiny_model_dir)
        net = methods.TargetLoss(model, methods.METHODS[method].per_token, counterfactual_prompt=torch.tensor(prompt))
        logs[method] = train_step(net, [[0, 1, 2]], data, groups, StepConfig(method, G, 0.5))["loss"]
    assert abs(logs["cft"] - logs["sft"]) > 1e-3


def test_a_rank_without_rows_still_backpropagates(cft_setup, tiny_model_dir):
    tokenizer, builder, ds, examples, titles, prompt = cft_setup
    model = lora_model(tiny_model_dir)
    ids = torch.tensor([examples[0].ids])
    out = methods.TargetLoss(model, "cft", counterfactual_prompt=torch.tensor(prompt))(
        ids, torch.zeros_like(ids, dtype=torch.bool))
    assert out.nll.shape == (0,)
    out.nll.sum().backward()


# ----------------------------------------------------------------------------- train.py

def test_train_py_runs_cft_and_writes_metrics(train_py, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOGDRT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    train_py("--model", tiny_model_dir, "--dataset", "synthetic", "--synthetic-size", "small",
             "--train-samples", "12", "--valid-users", "3", "--test-users", "3", "--epochs", "1",
             "--batch-size", "2", "--grad-accum", "2", "--beams", "3", "--eval-batch-size", "3",
             "--lr", "3e-3", "--method", "cft", "--out", out)
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["method"] == "cft" and len(res["steps"]) == 3
    assert res["method"]["alpha"] == 0.1 and res["method"]["beta"] == 0.25
    assert res["method"]["counterfactual_prompt"].endswith("### Response:\n")
    assert all(s["loss"] > 0 and not any(s["q"]) for s in res["steps"])
    assert {"NDCG@5", "HR@10", "MGU@5"} <= set(res["test"])
