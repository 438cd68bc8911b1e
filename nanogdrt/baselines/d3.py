"""D3 decoding (Bao et al. 2024, "Decoding Matters: Addressing Amplification Bias and Homogeneity
Issue for Recommendations using LLMs"): options of the constrained beam search in nanogdrt/beam.py.

The paper names two problems of beam search over item titles and one fix for each:
- amplification bias: some tokens of a title are all but certain once its first tokens are
  given ("ghost tokens", p_LM close to 1); they add ~0 to the summed log-probability but count in
  the length, so length normalisation favours titles with many of them. Fix: leave ghost tokens
  out of the length normalisation;
- homogeneity: the LLM's top titles look alike. Fix: a text-free assistant (a sequential model
  over item ids, e.g. SASRec) adds its own scores at every decoding step, with weight alpha.

What D3's code does (github.com/SAI990323/DecodingMatters, code/LogitProcesser.py
`CFEnhancedLogitsProcessor`, code/evaluate.py, evaluate2.sh), which we follow:
1. No ghost-token detection and no threshold anywhere: its D3 runs (evaluate2.sh) pass
   `--length_penalty 0.0` to transformers' beam search, i.e. drop length normalisation
   altogether: a title's score is its summed per-token score. `--decoding d3` does the same
   (length_penalty 0). The paper's variant, a length that counts only the tokens with p_LM above
   a threshold, is here too (`Scoring.ghost_threshold`, used with a length_penalty > 0); under
   D3's length_penalty 0 the threshold only counts the ghost tokens, for the share we log.
   The threshold (GHOST_THRESHOLD) is ours: neither the paper's code nor its scripts set one.
2. The assistant: the SASRec logits of each test user over the whole catalogue, softmax over the
   catalogue (`torch.tensor(logits).softmax(dim=-1)`). At every step, for each beam and each
   allowed token t, the items whose titles start with the beam's tokens + t (its `sasrec_dict`:
   the items below the child node) give `sum(p_items) + 1e-20` (the "sum" of its "max or sum"
   comment; an earlier commit took the max); these are divided by their sum over the beam's
   allowed tokens and logged: log p_TF(t | prefix).
3. The step's token score is `gs * (log p_LM - log p_TF) + log p_TF`, with log p_LM transformers'
   full-vocabulary log-softmax (temperature 1): with alpha = 1 - gs, (1 - alpha) log p_LM +
   alpha log p_TF. It is the processed score that transformers accumulates, so it drives which
   beams survive as well as the final ranking. It applies at every step, EOS included (a node
   with one allowed token gets log p_TF = 0). gs = 1 (alpha 0) skips the assistant; it is the
   default of evaluate.py, and evaluate2.sh sets none, so D3's code has no nonzero default alpha.
"""

import dataclasses
import json
from pathlib import Path
from typing import Callable

import torch

from nanogdrt.baselines.sasrec import CONFIG, WEIGHTS, SASRecConfig
from nanogdrt.scoring import ASSISTANT_EPS, NORMALISERS, Scoring, assistant_log_probs  # noqa: F401 (the hook D3 fills)
from nanogdrt.recommend import Decoding, ghost_share  # noqa: F401 (ghost_share: D3's records)

GHOST_THRESHOLD = 0.99   # p_LM above which a decoded token counts as a ghost token (our choice)
DECODINGS = ("cbs", "d3")
LENGTH_PENALTY = {"cbs": 1.0, "d3": 0.0}   # default of each: transformers' (the lineage's) / D3's code


def sasrec_assistant(model, histories: list[list[int]], item_ids) -> Callable[[list[int]], torch.Tensor]:
    """The text-free assistant of D3 from a SASRec (`nanogdrt.baselines.sasrec.load`): users -> (U, I)
    softmax of its scores over its whole catalogue, placed at the item ids (I = max id + 1).

    `item_ids`: the catalogue being decoded (the trie's items); SASRec must score every one.
    """
    missing = set(item_ids) - set(model.item_ids.tolist())
    if missing:
        raise ValueError(f"the assistant does not score {len(missing)} catalogue items, e.g. {sorted(missing)[:5]}")
    columns = model.item_ids                                           # (n,) item id of each column
    width = max(max(item_ids), int(columns.max())) + 1

    def probabilities(users: list[int]) -> torch.Tensor:
        p = model.score_items([histories[u] for u in users]).float().softmax(-1)   # (U, n)
        out = p.new_zeros(len(users), width)
        out[:, columns] = p
        return out
    return probabilities


def scoring(decoding: str, alpha: float = 0.0, assistant=None, histories=None, item_ids=None,
            ghost_threshold: float = GHOST_THRESHOLD, normaliser: str = "vocab") -> Scoring:
    """`--decoding cbs|d3` -> the search's Scoring. d3: ghost tokens counted, and with alpha > 0
    the SASRec `assistant` (it needs the users' `histories` and the catalogue's `item_ids`).
    `normaliser`: Scoring.normaliser, with either decoding."""
    if decoding not in DECODINGS:
        raise ValueError(f"decoding must be one of {DECODINGS}, got {decoding!r}")
    if decoding == "cbs":
        if alpha:
            raise ValueError("alpha (the assistant's weight) is an option of --decoding d3")
        return Scoring(normaliser=normaliser)
    if alpha > 0 and assistant is None:
        raise ValueError("--decoding d3 with alpha > 0 needs an assistant (a SASRec folder)")
    fn = sasrec_assistant(assistant, histories, item_ids) if alpha > 0 else None
    return Scoring(ghost_threshold, alpha, fn, normaliser)


def decoding(name: str = "cbs", alpha: float = 0.0, assistant=None, item_ids=(),
             ghost_threshold: float = GHOST_THRESHOLD, normaliser: str = "vocab",
             length_penalty: float | None = None, beams: int = 10, top_k: int = 10,
             batch_size: int = 32) -> Decoding:
    """`--decoding cbs|d3` and its options -> `recommend`'s Decoding. Checked here, at once, so a
    bad option fails before any work. `length_penalty` None takes the decoding's (cbs 1.0, d3 0.0).
    `item_ids`: the catalogue decoded over (the assistant must score every one of them)."""
    item_ids = list(item_ids)
    scoring(name, alpha, assistant, [], item_ids, ghost_threshold, normaliser)
    lp = LENGTH_PENALTY[name] if length_penalty is None else length_penalty
    return Decoding(beams, top_k, batch_size, lp,
                    lambda histories: scoring(name, alpha, assistant, histories, item_ids, ghost_threshold, normaliser))


def assistant_problem(folder) -> str | None:
    """Why `folder` is not a SASRec run folder (python -m nanogdrt.baselines.sasrec writes
    config.json with SASRecConfig's fields and model.safetensors), or None. A Llama folder has
    the same two file names, so the config's fields are what tell them apart."""
    if folder is None:
        return None
    folder, hint = Path(folder), "train one with python -m nanogdrt.baselines.sasrec"
    if not folder.is_dir():
        return f"no such folder ({hint})"
    try:
        raw = json.loads((folder / CONFIG).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return f"not a SASRec run folder: no readable {CONFIG} ({hint})"
    fields = {f.name for f in dataclasses.fields(SASRecConfig)}
    if not isinstance(raw, dict) or not set(raw) <= fields or "n_items" not in raw:
        return f"not a SASRec run folder: its {CONFIG} is not a SASRec config ({hint})"
    if not (folder / WEIGHTS).is_file():
        return f"not a SASRec run folder: no {WEIGHTS} ({hint})"
    return None
