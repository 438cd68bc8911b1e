"""tools/token_groups.py: the token groups train.py would build, with the base model's group
losses and Eq. 5's weights before any training, checked against a plain per-example forward."""

import json

import numpy as np
import pytest
import torch

import train
from nanogdrt.batches import make_examples
from nanogdrt.infra.config import parse_args
from tools import token_groups


def test_group_losses_and_weights_match_a_plain_forward(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NANOGDRT_CACHE", str(tmp_path / "cache"))
    argv = ["--dataset", "synthetic", "--model", str(tiny_model_dir), "--groups", "3", "--train-samples", "12",
            "--batch-size", "5"]
    out = token_groups.main(argv + ["--taus", "0.5,4", "--json", str(tmp_path / "groups.json")])
    printed = capsys.readouterr().out
    assert "| group | tokens | mean Eq. 3 relevance |" in printed and "Q(g) tau=4" in printed

    # The reference: train.py's own groups, and each example's target NLL from one unbatched forward.
    cfg = parse_args(argv)
    run = train.load_data_and_model(cfg, lambda *a: None)
    dataset, model, builder = run.dataset, run.model, run.builder
    groups = train.relevance_groups(run, cfg).token_groups
    sums, counts = np.zeros(3), np.zeros(3)
    with torch.no_grad():
        for ex, g in zip(make_examples(builder, dataset.train, dataset.titles), groups):
            ids = torch.tensor([ex.ids])
            logp = torch.log_softmax(model.logits(model.hidden_states(ids))[0].double(), -1)
            s, e = ex.target
            nll = -logp[s - 1:e - 1].gather(1, ids[0, s:e, None])[:, 0]      # token t predicted at t - 1
            np.add.at(sums, g.numpy() - 1, nll.numpy())
            np.add.at(counts, g.numpy() - 1, 1)
    L = sums / np.maximum(counts, 1)
    assert [c["tokens"] for c in out["composition"]] == counts.astype(int).tolist()
    assert out["base_loss"].numpy() == pytest.approx(L, rel=1e-4, abs=1e-4)
    for tau in (0.5, 4.0):
        present = counts > 0
        q = np.where(present, np.exp((L - L[present].max()) / tau), 0)
        assert out["q"][tau].numpy() == pytest.approx(q / q.sum(), abs=1e-5)            # Eq. 5
    saved = json.loads((tmp_path / "groups.json").read_text())
    assert saved["exp_H_Q"]["4"] > saved["exp_H_Q"]["0.5"]              # a higher tau mixes the groups more
    assert [p["base_loss"] for p in saved["per_group"]] == pytest.approx(L, rel=1e-4, abs=1e-4)
    assert all("top_tokens" in p for p in saved["per_group"])


def test_bad_taus_and_json_path_are_refused_before_any_work(capsys, tmp_path):
    with pytest.raises(SystemExit):
        token_groups.main(["--dataset", "synthetic", "--taus", "0.5,0"])
    assert "--taus" in capsys.readouterr().err
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit):
        token_groups.main(["--dataset", "synthetic", "--json", str(tmp_path / "a_file" / "groups.json")])
    assert "a_file" in capsys.readouterr().err
