"""SPRec (nanogdrt/baselines/sprec.py) and its DPO loss (nanogdrt/baselines/dpo.py): the loss and
its gradient by hand, the summed title log-probabilities against a plain full-vocabulary
log-softmax, the frozen reference, the negatives, a tiny end-to-end run, and bad flags."""

import argparse
import json
import math
from dataclasses import replace

import pytest
import torch

from nanogdrt import synthetic
from nanogdrt.analysis.compare import read_run
from nanogdrt.baselines import dpo, sprec
from nanogdrt.baselines.methods import TargetLoss
from nanogdrt.batches import make_examples
from nanogdrt.data import load_dataset
from nanogdrt.llama import Llama
from nanogdrt.lora import LoRAConfig, adapter_state_dict, copy_adapter_weights, inject_lora, lora_modules, save_adapter
from nanogdrt.prompt import PromptBuilder
from nanogdrt.tokenizer import Tokenizer
from nanogdrt.trie import Trie


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


# ----------------------------------------------------------------------------- the DPO loss

def test_dpo_loss_and_gradient_by_hand():
    """Two pairs with known log-probs: Eq. 7 and its gradient (Eq. 8) written out with math."""
    pc = torch.tensor([-2.0, -5.0], requires_grad=True)
    pr = torch.tensor([-3.0, -1.0], requires_grad=True)
    rc = torch.tensor([-2.5, -4.0], requires_grad=True)      # a reference that would take gradient...
    rr = torch.tensor([-2.0, -2.0], requires_grad=True)
    beta = 0.1
    out = dpo.dpo_loss(pc, pr, rc, rr, beta)
    margins = [(-2.0 + 2.5) - (-3.0 + 2.0), (-5.0 + 4.0) - (-1.0 + 2.0)]      # 1.5, -2.0
    expected = sum(math.log1p(math.exp(-beta * m)) for m in margins) / 2   # -log sigmoid(beta m), mean
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    assert out.margin.tolist() == pytest.approx(margins)
    assert out.chosen_reward.tolist() == pytest.approx([beta * 0.5, beta * -1.0])
    out.loss.backward()
    g = [beta * sigmoid(-beta * m) / 2 for m in margins]                     # dL/d margin_i = -g_i
    assert pc.grad.tolist() == pytest.approx([-x for x in g], rel=1e-5)
    assert pr.grad.tolist() == pytest.approx(g, rel=1e-5)
    assert rc.grad is None and rr.grad is None                               # ...gets none


def test_dpo_loss_refuses_bad_input():
    t = torch.zeros(2)
    with pytest.raises(ValueError, match="beta"):
        dpo.dpo_loss(t, t, t, t, 0.0)
    with pytest.raises(ValueError, match="shape"):
        dpo.dpo_loss(t, t, t, torch.zeros(3), 0.1)


# ----------------------------------------------------------------------------- title log-probs, reference

@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    """The tiny model with a LoRA adapter (B random, so it is not a no-op), its prompts and trie."""
    torch.manual_seed(1)
    model = Llama.from_pretrained(tiny_model_dir, dtype=torch.float32)
    lora = LoRAConfig(dropout=0.0)
    inject_lora(model, lora)
    for m in lora_modules(model).values():
        torch.nn.init.normal_(m.lora_B.weight, std=0.05)
    builder = PromptBuilder(Tokenizer(tiny_model_dir), "synthetic")
    ds = load_dataset("synthetic", synthetic=synthetic.SMALL)
    return model, lora, builder, ds, Trie.from_titles(ds.titles, builder)


def pairs_of(builder, ds, n):
    """n training windows as (chosen, rejected) PromptIds: the true title, and another one."""
    windows = ds.train[:n]
    others = [next(i for i in ds.titles if ds.titles[i] != ds.titles[x.target]) for x in windows]
    return (make_examples(builder, windows, ds.titles),
            make_examples(builder, [replace(x, target=o) for x, o in zip(windows, others)], ds.titles))


def test_pair_log_probs_sum_the_title_tokens(tiny):
    """One padded forward of chosen + rejected rows = each sequence alone, full-vocabulary
    log-softmax at every position, summed over its title + EOS."""
    model, _, builder, ds, _ = tiny
    chosen, rejected = pairs_of(builder, ds, 3)
    model.eval()
    pc, pr = dpo.pair_log_probs(TargetLoss(model), chosen, rejected, [2, 0], 0, "cpu")
    for got, ex in zip(pc.tolist() + pr.tolist(), [chosen[2], chosen[0], rejected[2], rejected[0]]):
        ids = torch.tensor([ex.ids])
        logp = torch.log_softmax(model.logits(model.hidden_states(ids))[0].double(), -1)   # (T, V)
        s, e = ex.target
        want = sum(logp[t - 1, ex.ids[t]].item() for t in range(s, e))
        assert got == pytest.approx(want, rel=1e-5)


def test_reference_is_the_model_at_the_start_of_the_dpo_epoch_and_stays_frozen(tiny):
    model, lora, builder, ds, trie = tiny
    chosen, rejected = pairs_of(builder, ds, 6)
    start = adapter_state_dict(model)
    net = TargetLoss(model)
    before = dpo.reference_log_probs(net, chosen, rejected, 4, 0, "cpu")
    assert not before.requires_grad and before.shape == (6, 2)
    run = sprec.Run(ds, model, builder, trie, {}, 0, lora, None)
    args = argparse.Namespace(device="cpu", lr=1e-3, seed=0, clip=1.0, dpo_batch_size=2, beta=0.1)
    log = []
    ref = sprec.dpo_epoch(run, chosen, rejected, args, 1, log)
    try:
        assert torch.equal(ref, before)                                        # computed before any step
        assert len(log) == 3 and all(s["phase"] == "dpo" for s in log)
        after = adapter_state_dict(model)
        assert any(not torch.equal(start[k], after[k]) for k in start)         # the policy moved
        now = dpo.reference_log_probs(net, chosen, rejected, 4, 0, "cpu")
        assert not torch.allclose(now, before)                                 # ...the reference did not
        copy_adapter_weights(model, start)                                     # the adapter it started from
        assert torch.allclose(dpo.reference_log_probs(net, chosen, rejected, 4, 0, "cpu"), before, atol=1e-5)
    finally:
        copy_adapter_weights(model, start)


def test_one_dpo_step_lowers_the_loss_of_its_batch(tiny):
    """No dropout, no sampling: a small enough step against the gradient lowers Eq. 7."""
    model, _, builder, ds, _ = tiny
    chosen, rejected = pairs_of(builder, ds, 4)
    start, net, batch = adapter_state_dict(model), TargetLoss(model), [0, 1, 2, 3]
    ref = dpo.reference_log_probs(net, chosen, rejected, 4, 0, "cpu")
    model.eval()
    params = [p for m in lora_modules(model).values() for p in (m.lora_A.weight, m.lora_B.weight)]
    opt = torch.optim.SGD(params, lr=1e-3)
    try:
        losses = []
        for _ in range(2):
            pc, pr = dpo.pair_log_probs(net, chosen, rejected, batch, 0, "cpu")
            out = dpo.dpo_loss(pc, pr, ref[:, 0], ref[:, 1], 0.1)
            losses.append(out.loss.item())
            out.loss.backward()
            opt.step()
            opt.zero_grad()
        assert losses[0] == pytest.approx(math.log(2), abs=1e-6)               # policy = reference: margin 0
        assert losses[1] < losses[0]
    finally:
        copy_adapter_weights(model, start)


# ----------------------------------------------------------------------------- negatives

def test_first_other_title_skips_every_id_of_the_target_title():
    titles = {5: "A", 7: "A", 9: "B", 11: "C"}
    assert sprec.first_other_title([5, 9, 11], 7, titles) == 9               # 5 is the target's title
    assert sprec.first_other_title([11, 9], 7, titles) == 11
    assert sprec.first_other_title([7, 5], 7, titles) is None


def test_negative_is_a_catalogue_title_other_than_the_target(tiny):
    """Decoded by the trie: a catalogue item; when the model's top-1 *is* the target, its second."""
    model, lora, builder, ds, trie = tiny
    run = sprec.Run(ds, model, builder, trie, {}, 0, lora, None)
    windows = ds.train[:6]
    negatives, _ = sprec.rejected_items(run, windows, 3, 6)
    assert all(n in ds.titles and ds.titles[n] != ds.titles[x.target] for n, x in zip(negatives, windows))
    # The same prompts with the model's own top-1 as the target: the negative is another title.
    as_target = [replace(x, target=n) for x, n in zip(windows, negatives)]
    again, hits = sprec.rejected_items(run, as_target, 3, 6)
    assert hits == len(windows)
    assert all(n is not None and ds.titles[n] != ds.titles[x.target] for n, x in zip(again, as_target))


# ----------------------------------------------------------------------------- the command line

@pytest.fixture()
def sft_adapter(tiny_model_dir, tmp_path):
    """An "SFT" adapter of the tiny model (random B), in a run folder like train.py's."""
    torch.manual_seed(2)
    model = Llama.from_pretrained(tiny_model_dir, dtype=torch.float32)
    inject_lora(model, LoRAConfig())
    for m in lora_modules(model).values():
        torch.nn.init.normal_(m.lora_B.weight, std=0.05)
    folder = tmp_path / "sft" / "best_adapter"
    save_adapter(model, folder, LoRAConfig(), str(tiny_model_dir))
    return folder


def cli(tiny_model_dir, adapter, out, *extra):
    return ["--from-adapter", str(adapter), "--model", str(tiny_model_dir), "--dataset", "synthetic",
            "--synthetic-size", "small", "--windows", "8", "--iterations", "2", "--valid-users", "3",
            "--test-users", "3", "--beams", "3", "--eval-batch-size", "3", "--batch-size", "4",
            "--dpo-batch-size", "4", "--lr", "1e-3", "--out", str(out), *extra]


def test_tiny_run_writes_metrics_in_train_py_shape(tiny_model_dir, sft_adapter, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOGDRT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "sprec"
    sprec.main(cli(tiny_model_dir, sft_adapter, out))
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["method"] == "sprec" and res["config"]["windows"] == 8
    assert {"NDCG@5", "NDCG@10", "HR@10", "MGU@5", "DGU@5", "top1_group_distribution"} <= set(res["test"])
    assert [e["epoch"] for e in res["epochs"]] == [1, 2] and res["best_epoch"] in (1, 2)
    its = res["method"]["iterations"]
    assert [it["windows"] for it in its] == [8, 8] and all(it["pairs"] + it["no_negative"] == 8 for it in its)
    for t, it in enumerate(its, 1):                       # 8 windows / 4 per SFT step; pairs / 4 per DPO step
        phases = [s["phase"] for s in res["steps"] if s["iteration"] == t]
        assert phases == ["sft"] * 2 + ["dpo"] * math.ceil(it["pairs"] / 4)
        assert set(it["seconds"]) == {"negatives_s", "sft_s", "dpo_s", "valid_s"}
        pairs = [json.loads(x) for x in (out / "pairs" / f"it-{t}.jsonl").read_text().splitlines()]
        assert all(p["rejected_item_id"] != p["target_item_id"] for p in pairs)
    assert (out / "best_adapter" / "adapter_model.safetensors").is_file()
    run = read_run(out)                                   # the comparison tool reads it
    assert len(run.records) == 3 and run.results["dataset"]["name"] == "synthetic"
    with pytest.raises(SystemExit, match="choose another --out"):  # never over a finished run
        sprec.main(cli(tiny_model_dir, sft_adapter, out))


@pytest.mark.parametrize("extra, message", [
    (["--windows", "0"], "--windows: 0: must be >= 1"),
    (["--negative-beams", "1"], "--negative-beams: 1: must be >= 2"),
    (["--beta", "0"], "--beta: 0: must be > 0"),
    (["--lr", "nan"], "--lr: nan: must be a finite number"),
    (["--iterations", "0"], "--iterations: 0: must be >= 1"),
])
def test_bad_flags_are_refused_in_one_line_before_any_work(extra, message, tiny_model_dir, sft_adapter, tmp_path,
                                                           monkeypatch, capsys):
    monkeypatch.setattr(sprec, "load", lambda args: pytest.fail("work started"))
    with pytest.raises(SystemExit) as e:
        sprec.main(cli(tiny_model_dir, sft_adapter, tmp_path / "o", *extra))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and err[-1].startswith("python -m nanogdrt.baselines.sprec: error:")
    assert not (tmp_path / "o").exists()


def test_an_adapter_that_is_missing_or_of_another_dataset_is_refused(tiny_model_dir, sft_adapter, tmp_path,
                                                                    monkeypatch, capsys):
    monkeypatch.setattr(sprec, "load", lambda args: pytest.fail("work started"))
    with pytest.raises(SystemExit):
        sprec.main(cli(tiny_model_dir, tmp_path / "nowhere", tmp_path / "o"))
    assert "--from-adapter" in capsys.readouterr().err.splitlines()[-1]
    (sft_adapter.parent / "results.json").write_text(json.dumps({"config": {"dataset": "toy"}}))
    with pytest.raises(SystemExit):
        sprec.main(cli(tiny_model_dir, sft_adapter, tmp_path / "o"))
    assert "trained on 'toy', --dataset is 'synthetic'" in capsys.readouterr().err.splitlines()[-1]
