"""Token heat maps (nanogdrt/analysis/heatmap.py) against a direct computation: one plain forward pass per
ablated token (token i -> the padding id, the whole sequence re-run), on a tiny random Llama, to 1e-4."""

import json

import pytest
import torch

from nanogdrt.analysis import heatmap
from nanogdrt.data import load_dataset
from nanogdrt.llama import Llama
from nanogdrt.prompt import PromptBuilder
from nanogdrt.synthetic import SMALL
from nanogdrt.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def setup(tiny_model_dir):
    tok = Tokenizer(tiny_model_dir)
    ds = load_dataset("synthetic", synthetic=SMALL)
    return Llama.from_pretrained(tiny_model_dir).eval(), PromptBuilder(tok, "synthetic"), tok, ds


def log_p_title(model, ids, target):
    """log P(target tokens | everything before them), one plain causal forward."""
    x = torch.tensor(ids)[None]
    logp = model.logits(model.hidden_states(x))[0].float().log_softmax(-1)        # (T, V)
    t0, t1 = target
    return sum(logp[t - 1, ids[t]].item() for t in range(t0, t1))


@torch.no_grad()
def test_token_attributions_equal_one_forward_per_ablated_token(setup):
    model, builder, tok, ds = setup
    p = builder.for_interaction(ds.test[0], ds.titles, with_target=True)
    got = heatmap.token_attributions(model, p, tok, chunk=7)          # several chunks
    assert got.shape == (p.prompt_len,) and got[:p.bos[1]].abs().sum() == 0   # BOS not ablated
    full = log_p_title(model, p.ids, p.target)
    for i in list(range(p.bos[1], p.prompt_len, 5)) + [p.prompt_len - 1]:
        ids = list(p.ids)
        ids[i] = tok.pad_id
        assert got[i].item() == pytest.approx(full - log_p_title(model, ids, p.target), abs=1e-4)


def test_draw_writes_png_html_and_json(setup, tmp_path):
    model, builder, tok, ds = setup
    users = heatmap.heatmaps({"base": model, "other": model}, builder, ds.test[:2], ds.titles)
    heatmap.draw(users, tmp_path)
    saved = json.loads((tmp_path / "heatmap.json").read_text())
    assert len(saved["users"]) == 2 and saved["users"][0]["attribution"]["base"] == users[0]["attribution"]["other"]
    assert len(saved["users"][0]["tokens"]) == len(saved["users"][0]["attribution"]["base"])
    page = (tmp_path / "heatmap.html").read_text()
    assert page.count("<span title=") == 2 * sum(len(u["tokens"]) for u in users) and "<script" not in page
    assert (tmp_path / "heatmap.png").stat().st_size > 1000
