"""Fig. 1-style token heat maps: which prompt tokens does a model's recommendation rest on?

Definition (ours; the paper's Fig. 1 shows a picture, not a formula). For one test user, the prompt
p (task text + history titles, BOS excluded) and the target y (the ground-truth title in quotes
and EOS, teacher-forced), the attribution of prompt token i is

    A(i) = log P(y | p) - log P(y | p with token i replaced by the baseline id)

summed over the target tokens (Captum's FeatureAblation with one feature per token, token mode:
the positions of every other token are unchanged). A(i) > 0: the title is less likely without i.
The baseline id is the tokenizer's padding id (SmolLM2: <|endoftext|>), a token that never occurs
inside a prompt's text. All ablations of a prompt run in a few packed forward passes
(nanogdrt.attribution.PackedAttention: each ablated row reuses the keys of the tokens before it),
`chunk` ablations at a time so the LM-head logits stay small.

`token_attributions` gives A for every prompt token; `draw` writes one PNG (a strip per model and
user, the history items marked) and one self-contained HTML page (each token coloured: red when
it raises the title's probability, blue when it lowers it; one scale per user, shared by the models).
`figure` is nanogdrt.analysis.analyze's --heatmap: seeded users under the base model and every run.
"""

import html
import random
from pathlib import Path

import numpy as np
import torch

from nanogdrt import files
from nanogdrt.analysis.inputs import AnalyzeConfig, Inputs, load_model
from nanogdrt.attribution import Feature, attribute
from nanogdrt.prompt import PromptIds
from nanogdrt.tokenizer import Tokenizer


def prompt_features(p: PromptIds) -> list[Feature]:
    """One feature per prompt token, BOS excluded (a text template never changes it)."""
    h0, h1 = p.history
    return [Feature(f"tok{i}", "history" if h0 <= i < h1 else "task", (i, i + 1))
            for i in range(p.bos[1], p.prompt_len)]


@torch.no_grad()
def token_attributions(model, p: PromptIds, tokenizer: Tokenizer, chunk: int = 32) -> torch.Tensor:
    """(prompt_len,) A(i) of every prompt token (0 for BOS), summed over the target tokens."""
    feats = prompt_features(p)
    out = torch.zeros(p.prompt_len)
    for s in range(0, len(feats), chunk):
        part = feats[s:s + chunk]
        a = attribute(model, p, tokenizer, baseline=tokenizer.pad_id, features=part)
        out[[f.span[0] for f in part]] = a.seq_attr
    return out


def heatmaps(models: dict, builder, interactions, titles) -> list[dict]:
    """models: label -> model. Per user: its row, token strings, spans and A under each model."""
    tok = builder.tokenizer
    users = []
    for x in interactions:
        p = builder.for_interaction(x, titles, with_target=True)
        users.append({"row": x.row, "target": titles[x.target],
                      "tokens": [tok.decode([i], skip_special_tokens=False) for i in p.ids[:p.prompt_len]],
                      "history": list(p.history), "items": [list(s) for s in p.items],
                      "attribution": {label: token_attributions(m, p, tok).tolist() for label, m in models.items()}})
    return users


def _rgb(v, scale):
    """v / scale in [-1, 1] -> white..red (positive) or white..blue (negative)."""
    t = 0.0 if scale == 0 else max(-1.0, min(1.0, v / scale))
    fade = int(255 * (1 - abs(t)))
    return (255, fade, fade) if t >= 0 else (fade, fade, 255)


def html_page(users: list[dict], title: str) -> str:
    parts = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;margin:1em}td{vertical-align:top;padding:6px;width:33%}"
             "span{font-family:monospace;white-space:pre-wrap;font-size:12px}</style>",
             f"<h2>{html.escape(title)}</h2><p>Token colour: A(i) = drop in log P(target title) when the token "
             "is replaced by the padding token (red: the title needs it; blue: it hurts the title). One scale "
             "per user, shared by the models; BOS is not ablated.</p>"]
    for u in users:
        scale = max((abs(v) for a in u["attribution"].values() for v in a), default=0.0)
        parts.append(f"<h3>test row {u['row']}: target {html.escape(u['target'])} (scale: |A| = {scale:.3f})</h3>"
                     "<table><tr>" + "".join(f"<th>{html.escape(k)}</th>" for k in u["attribution"]) + "</tr><tr>")
        for label, attr in u["attribution"].items():
            spans = "".join(f"<span title='{v:+.4f}' style='background:rgb{_rgb(v, scale)}'>{html.escape(t)}</span>"
                            for t, v in zip(u["tokens"], attr))
            parts.append(f"<td>{spans}</td>")
        parts.append("</tr></table>")
    return "\n".join(parts) + "\n"


def draw(users: list[dict], out, title="Prompt-token attribution (Fig. 1 style)"):
    """heatmap.png, heatmap.html and heatmap.json into folder `out`."""
    from nanogdrt.analysis import plots
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files.write_json(out / "heatmap.json", {"definition": __doc__.split("\n\n")[1], "users": users})
    files.write_text(out / "heatmap.html", html_page(users, title))
    plots.token_heatmap([{"row": u["row"], "items": u["items"],
                          "attribution": {k: np.asarray(v) for k, v in u["attribution"].items()}} for u in users],
                        out / "heatmap.png", title)


def figure(inputs: Inputs, cfg: AnalyzeConfig, out):
    """analyze's --heatmap: cfg.heatmap_users seeded users of cfg.split under the base model and every
    run's adapter, all loaded at once, drawn into folder `out`."""
    pool = getattr(inputs.ds, cfg.split)
    picked = random.Random(f"{cfg.seed}:heatmap:{cfg.split}").sample(range(len(pool)),
                                                                     min(cfg.heatmap_users, len(pool)))
    models = {label: load_model(inputs.model_dir, adapter, cfg.device, cfg.dtype)
              for label, adapter in inputs.adapters().items()}
    draw(heatmaps(models, inputs.builder, [pool[i] for i in picked], inputs.ds.titles), out)
