"""The beam search's scoring hook: what a candidate's score holds besides the LM's log-probabilities.

`nanogdrt.beam` reads a `Scoring` at every step. The default, `Scoring()`, is plain constrained beam
search (CBS). D3 (nanogdrt/baselines/d3.py) fills it with its ghost-token threshold and its text-free
assistant; `normaliser="allowed"` is a diagnostic of the softmax a step's log-probabilities come
from. The core owns the hook, so the search never imports a baseline.
"""

from dataclasses import dataclass
from typing import Callable

import torch

ASSISTANT_EPS = 1e-20    # added to each child's assistant mass before renormalising (D3's code)
NORMALISERS = ("vocab", "allowed")   # the softmax a step's log-probabilities come from (Scoring.normaliser)


@dataclass(frozen=True)
class Scoring:
    """What a candidate's score holds besides the LM's log-probabilities; the default is CBS.

    `assistant(users)`: (U, I) probabilities over the catalogue indexed by item id (I > every id)
    for the given prompt indices; called once per user, when the user enters the search.
    """
    ghost_threshold: float | None = None  # count tokens with p_LM > this; left out of the length
    alpha: float = 0.0                     # (1 - alpha) log p_LM + alpha log p_assistant
    assistant: Callable[[list[int]], torch.Tensor] | None = None
    # "vocab": log p_LM under the softmax over the whole vocabulary (transformers', the lineage's,
    # MSL's own inference). "allowed": under the softmax over the trie's allowed tokens only, the
    # distribution MSL's loss trains at tau 1; a token that is the only continuation then scores
    # log 1 = 0. Not a decoding of any paper: a diagnostic of what the normaliser does.
    normaliser: str = "vocab"

    def __post_init__(self):
        if not 0.0 <= self.alpha < 1.0:
            raise ValueError(f"alpha must be in [0, 1), got {self.alpha}")
        if self.alpha > 0 and self.assistant is None:
            raise ValueError("alpha > 0 needs an assistant (e.g. a SASRec folder)")
        if self.ghost_threshold is not None and self.ghost_threshold <= 0:
            raise ValueError(f"ghost_threshold must be positive, got {self.ghost_threshold}")
        if self.normaliser not in NORMALISERS:
            raise ValueError(f"normaliser must be one of {NORMALISERS}, got {self.normaliser!r}")

    @property
    def uses_assistant(self) -> bool:
        return self.alpha > 0


def assistant_log_probs(mass: torch.Tensor, allowed) -> torch.Tensor:
    """D3's log p_TF of every allowed token (step 2 of nanogdrt/baselines/d3.py's docstring).

    mass (S, N): each slot's assistant probability below every trie node (`Trie.subtree_sums`);
    allowed: `Trie.allowed` of the S*B beams (tokens, nodes, mask of shape (S*B, K)).
    Returns (S*B, K): log of (mass(child) + eps) / sum over the beam's allowed children; -inf on padding.
    """
    S = mass.shape[0]
    child = mass.gather(1, allowed.nodes.view(S, -1)).view(allowed.nodes.shape) + ASSISTANT_EPS  # (S*B, K)
    child = child.masked_fill(~allowed.mask, 0.0)
    logp = (child / child.sum(-1, keepdim=True)).log()
    return torch.where(allowed.mask, logp, float("-inf"))   # rows with no allowed token: 0/0 left out
