"""CFT [79] (Zhang et al., "Causality-Enhanced Behavior Sequence Modeling in LLMs for Personalized
Recommendation", 2024), a baseline of Table 2: counterfactual fine-tuning. Besides the usual
next-item loss, the model must also predict the target from the *causal effect* of the history,
the factual logits minus the logits it gives without the history, so that the history has to
matter. Training only: CFT decodes from the factual prompt like every method.

Reference: itsmeyjt/CFT, `train.py`, `CustomTrainer.compute_loss` (commit 3b682a8; commit 14a4547
has the same function; line numbers of that file), run with `run.sh`'s `--train_on_inputs False`:

    z_f  = logits after the factual prompt x_h (with the history)                  (L70, L77)
    z_cf = logits after the counterfactual prompt x_0 (no history), same target     (L71, L78)
    w_k  = 1 - (k - 1) (1 - beta) / (n - 1),  k = 1..n along a row's n target tokens  (L87-96)
    L    = sum_t w_t CE(z_f,t; y_t) / sum_t w_t
           + alpha sum_t w_t CE(z_f,t - z_cf,t; y_t) / sum_t w_t                   (L85, L98-108)

with alpha = 0.1 (L108) and beta = 0.25 (L88), both constants of the code (no options): the
weights fall linearly from 1 on the first target token to 0.25 on the last (EOS), and weight
both terms. The sums run over the labelled tokens of the micro-batch, all rows together.
CE(z_f - z_cf) is the cross-entropy of the logit difference over the whole vocabulary: it is
small when the history itself (not the task text) raises the target's logit.

The counterfactual prompt (L219-220: `data_point2 = {**data_point, "input": None}`, then
`generate_prompt`'s no-input branch) is Alpaca's no-input template: the whole "### Input:"
section goes (the history sentence and its titles), and the preamble changes with it:

    'Below is an instruction that describes a task. Write a response that appropriately '
    'completes the request.  \\n\\n### Instruction:\\n' + instruction + '\\n\\n### Response:\\n'
    + '"Target title"' + EOS

It is *not* Eq. 3's prompt with the history replaced by "N/A" (nanogdrt.relevance): nothing of
the input is left. The prompt is the same for every example, so a batch's counterfactual rows
are this prefix + each row's target ids (`counterfactual_batch`); `counterfactual_prompt` checks
once, per title, that this is the joint tokenization of the text above.

Weights. sum_t w_t over n >= 2 tokens is n (1 + beta) / 2 exactly (the mean of a linear ramp),
so over any set of rows sum_t w_t = w_bar N with w_bar = (1 + beta) / 2. The loss above is thus
the token mean (`loss.sft_loss`) of the per-token loss

    l_t = (w_t / w_bar) (CE(z_f,t) + alpha CE(z_f,t - z_cf,t)),

which is what `cft_token_loss` returns and methods.py feeds to `loss.sft_loss` ("mean"
weighting), so `--loss-scope` means what it means for SFT: `step` divides by the sum of the
weights of the whole optimizer step (every micro-batch and rank), `micro` by each micro-batch's
across ranks, `rank-micro` by each rank's micro-batch. The code computes its sum per micro-batch
and the HF Trainer averages the micro-batches of a step: that is `--loss-scope micro` (one GPU
in run.sh: batch 64 = 4 micro-batches of 16). The per-group losses that train.py logs are
those of l_t (as MSL logs its own per-token loss).

Where we depart from the code (docs/baselines.md has the full table):
* The code pads both prompts on the left to one length so that their response tokens line up
  from the end (L46-64) and subtracts the logits position by position (L85); we gather each
  prompt's logits at its own target positions (right padding), which pairs the same tokens.
  Its counterfactual rows are thus padded to the longest factual row (L61-62), and its second
  forward costs as much as the first; ours runs at the counterfactual rows' own length (54
  SmolLM2 tokens of prompt + the target, against ~164 for a synthetic factual example).
* The code's `generate_prompt` (train.py) indents every line after the first by 4 spaces (a
  triple-quoted f-string inside a function), in both prompts; its infer.py does not. Our
  factual prompt is MSL's training text without indentation, and the counterfactual follows it.
* A one-token target gives the code 0 * inf = NaN weights; here every target is '"title"' + EOS
  (>= 3 tokens), and `counterfactual_prompt` refuses one of fewer than 2.
* float32 logits (the code trains in bfloat16); each of the two forwards draws its own LoRA
  dropout masks, as the code's two model calls do.
* Inference: the code's infer.py decodes the factual prompt (with the history) by ordinary beam
  search, with no counterfactual pass, and grounds the generated text to items afterwards; we
  decode the factual prompt with constrained beam search, as for every method.
* Learning rate, batch, epochs and LoRA settings are train.py's, as for every method (run.sh:
  lr 1e-4, batch 64 = 16 x 4, 3 epochs, early stopping on the validation loss); the epoch is
  chosen on validation NDCG@5.
We could not read the paper's equations here; its abstract describes the weights as adjusting
the emphasis of the causal-effect task, while the code weights both terms. We follow the code.
"""

import torch
import torch.nn.functional as F

from nanogdrt import loss
from nanogdrt.prompt import TEMPLATES, Template

ALPHA = 0.1      # weight of the causal-effect term (L108: `loss += 0.1 * loss_diff`)
BETA = 0.25      # weight of a target's last token; the first has 1 (L88)
# Alpaca's no-input preamble as CFT writes it (two spaces after "request.").
NO_INPUT_PREAMBLE = ("Below is an instruction that describes a task. Write a response that "
                     "appropriately completes the request.  \n\n")


def counterfactual_text(instruction: str, title: str | None = None) -> str:
    """The counterfactual prompt (no "### Input:" section), with the quoted target if given."""
    text = f"{NO_INPUT_PREAMBLE}### Instruction:\n{instruction}\n\n### Response:\n"
    return text + (f'"{title}"' if title is not None else "")


def counterfactual_prompt(builder, dataset: "str | Template", titles) -> list[int]:
    """The ids of the counterfactual prompt of `dataset`'s template (a built-in name, or a loaded
    dataset's `RecDataset.template`, e.g. a folder's prompt.json) (BOS as the tokenizer adds
    it), checked once against every training target in `titles`: the prompt text + the quoted
    title, tokenized whole, must be these ids + `builder.target_ids(title)` (which ends in EOS),
    so that `counterfactual_batch` rebuilds exactly that joint tokenization."""
    tokenizer = builder.tokenizer
    instruction = (dataset if isinstance(dataset, Template) else TEMPLATES[dataset]).instruction
    prompt = tokenizer.special_prefix + tokenizer.encode(counterfactual_text(instruction))
    distinct = sorted(set(titles))
    joint = tokenizer.encode_batch([counterfactual_text(instruction, t) for t in distinct])
    for title, ids in zip(distinct, joint):
        target = builder.target_ids(title)
        if len(target) < 2:
            raise ValueError(f"title {title!r}: CFT's weights need a target of >= 2 tokens, got {len(target)}")
        if tokenizer.special_prefix + ids + [tokenizer.eos_id] != prompt + target:
            raise ValueError(f"title {title!r}: its tokens after CFT's counterfactual prompt differ "
                             "from target_ids (a token straddles the response header)")
    return prompt


def counterfactual_batch(prompt: torch.Tensor, ids: torch.Tensor, target_mask: torch.Tensor,
                         pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, P + n_max) right-padded ids: row b = `prompt` + the target ids of row b of `ids`, and
    the mask of those targets. Target tokens come out in the same (row-major) order as
    `target_mask.nonzero()`, so `loss.target_logits` pairs the two batches token by token.
    A row without targets (a data-parallel rank without rows) is the prompt alone."""
    B, P = ids.shape[0], prompt.numel()
    width = P + int(target_mask.sum(1).max()) if B else P
    rows, cols = target_mask.nonzero(as_tuple=True)
    k = target_mask.cumsum(1)[rows, cols] - 1                     # (N,) index within its row's target
    cf_ids = torch.full((B, width), pad_id, dtype=ids.dtype, device=ids.device)
    cf_ids[:, :P] = prompt.to(ids.device)
    cf_ids[rows, P + k] = ids[rows, cols]
    cf_mask = torch.zeros(B, width, dtype=torch.bool, device=ids.device)
    cf_mask[rows, P + k] = True
    return cf_ids, cf_mask


def position_weights(target_mask: torch.Tensor, beta: float = BETA) -> torch.Tensor:
    """(N,) w_k = 1 - (k - 1)(1 - beta)/(n - 1) of each target token, k = 1..n its place in its
    row's n targets (L87-96), in `target_mask.nonzero()` order. A one-token target gets 1 (the
    code's 0 * inf = NaN; `counterfactual_prompt` refuses such targets for training)."""
    rows, cols = target_mask.nonzero(as_tuple=True)
    n = target_mask.sum(1)[rows].float()                          # (N,) targets in the token's row
    k = (target_mask.cumsum(1)[rows, cols] - 1).float()           # (N,) 0-based place
    return 1 - k * (1 - beta) / (n - 1).clamp(min=1)


def cft_token_loss(model, ids: torch.Tensor, target_mask: torch.Tensor, prompt: torch.Tensor,
                   alpha: float = ALPHA, beta: float = BETA) -> loss.TokenNLL:
    """l_t = (w_t / w_bar)(CE(z_f,t) + alpha CE(z_f,t - z_cf,t)) of every target token (see the
    module docstring): its token mean over any scope is CFT's weighted loss. Two forwards: the
    factual batch `ids` and its counterfactual rows (`counterfactual_batch` with `prompt`)."""
    cf_ids, cf_mask = counterfactual_batch(prompt, ids, target_mask)
    factual = loss.target_logits(model.logits, model.hidden_states(ids), ids, target_mask)       # z_f (N, V)
    counter = loss.target_logits(model.logits, model.hidden_states(cf_ids), cf_ids, cf_mask)     # z_cf (N, V)
    ce = F.cross_entropy(factual.logits, factual.targets, reduction="none")                       # (N,)
    ce_effect = F.cross_entropy(factual.logits - counter.logits, factual.targets, reduction="none")
    w = position_weights(target_mask, beta) / ((1 + beta) / 2)                                   # w_t / w_bar
    return loss.TokenNLL(w * (ce + alpha * ce_effect), factual.rows, factual.cols)
