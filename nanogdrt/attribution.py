"""Feature-ablation attribution over prompt spans: the evidence for context bias.

The paper's diagnosis (§2.2, Fig. 2) and its check that GDRT cures it (§4.3, Fig. 7) measure how
much the predicted title leans on *auxiliary tokens* (the task description and the already
generated prefix of the title) rather than on *interaction tokens* (the user's history). They
use feature ablation: a feature's attribution is how much the target's log-probability drops when
the feature is removed.

Features (half-open token ranges of `PromptIds`, so the spans come from prompt.py):

    head        the task text before the history (BOS, if any, is kept)   kind "task"
    tail        "\\n \\n\\n### Response:\\n"                                  kind "task"
    item{i}     history item i: ' "Title"' (+ the ',' merged into '",')   kind "history"
    prefix{j}   target token j, as context for target tokens after it      kind "prefix"

For one target token y_t and feature f (Captum's FeatureAblation convention, "original minus
ablated"):

    a[t, f] = log P(y_t | y_<t, prompt) - log P(y_t | y_<t, prompt, f ablated)

Prompt features condition every target token. A prefix feature j conditions only the tokens
after it: under teacher forcing tokens t <= j never see y_j, so a[t, prefix_j] = 0 for t <= j.

Ablation, two modes (as Captum's two text inputs):
- text (`baseline` a str, default ""): the span's text is replaced by the baseline inside the
  unchanged template, as `TextTemplateInput` does. The prompt is one joint tokenization cut
  into spans at pre-token boundaries (prompt.py), so this is exact id surgery: the span's ids
  become `encode(baseline)` and everything after shifts. Removing item i removes its quoted
  title whole: the user never interacted with it. Rows then differ in length.
- token (`baseline` an int): each token of the span becomes that id, as `TextTokenInput` does;
  lengths stay equal.
All ablations of one example (plus the unablated prompt) run as one forward pass: a row shares the
unablated tokens before its span, so only its suffix is computed, packed beside the others
(`PackedAttention`); the LM head is applied only at the target positions.

Ratios (Fig. 2 / Fig. 7), two definitions, both reported by nanogdrt.analysis.analyze.

"segment (paper)": what Captum's `LLMAttribution(FeatureAblation)` over a `TextTemplateInput`
computes, the tool the paper cites (its refs [34, 47]). Two features, each ablated whole (text
baseline ""), and the target is the *predicted* item: the top-1 title of constrained beam search,
its ids as the model generates them ('"', title, '"', EOS). A feature's attribution is Captum's
seq_attr, the drop of log P(title | prompt) summed over the target tokens (`segment_features`):
- task description vs interactions: A(task) / A(interactions). "The task description" is all the
  auxiliary prompt text, i.e. everything outside the quoted history list (head without BOS, and
  the tail; one feature of two template values). Why: the paper splits the input into auxiliary
  (task-description) and interaction tokens and nothing else, and its Eq. 2/3 measure relevance
  to the auxiliary tokens with the prompt minus the history (history -> "N/A"); the sentence
  "The user has played the following toys before:" is thus auxiliary too. The alternative, the
  instruction sentence alone ("Given a list of toys ... to the user."), is ablated in the same
  pass: `instruction_ratio`. The interactions feature is the whole list, from the space after
  "before:" (it belongs to the token ' "') to the last title's closing quote.
- prefix vs interactions ("prefix tokens of the predicted item, take the first token"): Captum
  cannot ablate the target, so the first generated token y_0 is appended to the prompt as a third
  feature and y_1.. is the target: A(y_0) / A(interactions), both summed over y_1.. (teacher
  forcing: the same as our prefix0 column and the interaction column at t >= 1). With MSL's
  prompt y_0 is the opening quote '"' of every title (the paper's lineage quotes titles too).
Aggregation: Fig. 2 shows one number per model and the paper does not say how it pooled
examples, so we report both the ratio of means (sum of A(aux) over sum of A(interactions)) and the
mean of per-example ratios (over the examples whose ratio is defined).

"per-token (ours)": target = the ground-truth title; spans differ a lot in length (a 10-item
history is ~100 tokens, the task text ~60, a prefix token 1), and a longer span removes more
context at once, so we divide each kind's summed span attributions by its number of tokens (span
ablation is not additive over tokens; this is the per-token share of the span's effect):
- task ratio: (A_head + A_tail) / (n_head + n_tail)  over  sum_i A_item_i / sum_i n_item_i,
  with A summed over all target tokens (the title and EOS); head/tail include the history
  intro sentence and the response header.
- prefix ratio: the first title token's attribution (one token) over the interaction tokens'
  per-token attribution, both summed over the same target tokens, those after it. The first
  title token is the first target token with title text (the quote '"' before it is the same
  for all items and so carries no item information).
Over examples: the ratio of means, since an example whose interaction attribution is near zero
(or negative) makes its own ratio explode or flip sign. Per-example terms are returned too.
"""

from bisect import bisect_left
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from nanogdrt.prompt import PromptBuilder, PromptIds
from nanogdrt.tokenizer import Tokenizer


@dataclass(frozen=True)
class Feature:
    name: str               # "head", "tail", "item3", "prefix0", "auxiliary", ...
    kind: str               # "task" | "instruction" | "history" | "prefix"
    span: tuple[int, int]   # [start, end) in PromptIds.ids
    more: tuple[tuple[int, int], ...] = ()  # later spans ablated together with `span` (one
                                            # feature of several template values, as Captum's mask)

    @property
    def spans(self) -> tuple[tuple[int, int], ...]:
        return (self.span, *self.more)

    @property
    def n_tokens(self) -> int:
        return sum(e - s for s, e in self.spans)


@dataclass
class Attribution:
    """Feature-ablation attribution of one example."""
    features: list[Feature]
    token_attr: torch.Tensor   # (n_target, n_features): a[t, f] above (Captum's token_attr)
    log_probs: torch.Tensor    # (n_target,): log P(y_t | y_<t, full prompt)
    first_title_token: int     # index in the target of the first token with title text

    @property
    def seq_attr(self) -> torch.Tensor:
        """(n_features,): attribution to the whole target, summed over its tokens (Captum's seq_attr)."""
        return self.token_attr.sum(0)


def features_of(p: PromptIds, tokenizer: Tokenizer) -> list[Feature]:
    """Head and tail of the task text, each history item, each target token but the last."""
    if p.target is None:
        raise ValueError("attribution needs a prompt built with a target title")
    (h0, h1), tail = p.task
    # BOS is not text: a text template keeps it whatever its values are, so it is never ablated.
    if h1 > h0 and tokenizer.add_bos and p.ids[h0] == tokenizer.bos_id:
        h0 += 1
    feats = [Feature("head", "task", (h0, h1))]
    feats += [Feature(f"item{i}", "history", span) for i, span in enumerate(p.items)]
    feats.append(Feature("tail", "task", tail))
    t0, t1 = p.target
    # The last target token (EOS) precedes nothing, so it conditions nothing.
    feats += [Feature(f"prefix{j}", "prefix", (t0 + j, t0 + j + 1)) for j in range(t1 - t0 - 1)]
    return feats


def first_title_token(p: PromptIds, tokenizer: Tokenizer) -> int:
    """Skip the target's leading quote token(s): '"Title"' starts with '"' for every item."""
    target = p.ids[p.target[0]:p.target[1]]
    j = 0
    while j < len(target) - 2 and tokenizer.decode([target[j]]).strip() in ('"', ""):
        j += 1
    return j


class Row(NamedTuple):
    """One forward-pass row: the prompt with one feature ablated (row 0: nothing ablated)."""
    start: int                      # tokens before `start` are the unablated prompt's, unchanged
    ids: list[int]                  # the row's tokens from `start` on
    scored: list[tuple[int, int]]   # (t, position of target token y_t in the row)


def ablated_rows(p: PromptIds, features: list[Feature], baseline: str | int, tokenizer: Tokenizer):
    """Row 0 is the unablated prompt; row 1 + i has feature i ablated.

    A prefix row scores only the target tokens after the ablated one; the others score them all.
    """
    t0, t1 = p.target
    text_ids = tokenizer.encode(baseline) if isinstance(baseline, str) else None
    rows = [Row(0, list(p.ids), [(t, t0 + t) for t in range(t1 - t0)])]
    for f in features:
        ids, pos = [], f.span[0]
        for s, e in f.spans:    # each span -> the baseline; the tokens between spans are kept
            ids += p.ids[pos:s] + (text_ids if text_ids is not None else [baseline] * (e - s))
            pos = e
        ids += p.ids[pos:]
        shift = len(ids) - (len(p.ids) - f.span[0])  # later tokens move by this much (0 in token mode)
        first = f.spans[-1][1] - t0 if f.kind == "prefix" else 0
        rows.append(Row(f.span[0], ids, [(t, t0 + t + shift) for t in range(first, t1 - t0)]))
    return rows


class PackedAttention:
    """All rows packed into one sequence, each row attending to its shared prefix and itself.

    Ablating the span [s, e) leaves the tokens before s, and so their keys and values, exactly
    those of the unablated prompt (causal attention, same positions). A row therefore needs only
    its tokens from s on, attending to row 0's first s tokens and causally to its own: one
    forward pass over row 0 plus every row's suffix, with no padding at all. This object is the
    attention context (`nanogdrt.llama.AttentionContext`) of `Llama.hidden_states(ids, context=...)`:
    it gives the RoPE positions and computes attention; it holds no keys between calls.

    Attention is computed row by row, over [row 0's first s keys ; the row's own keys], not as
    one (N, N) masked product: a packed example has ~1,700 tokens of which each row sees only a
    few hundred, so a dense mask would spend most of its work (and an (N, N) score matrix per
    head) on pairs that are masked out anyway.
    """

    def __init__(self, rows: list[Row], device):
        offsets, positions = [], []
        for r in rows:
            offsets.append(len(positions))
            positions += range(r.start, r.start + len(r.ids))   # a suffix continues its prefix
        self.offsets = offsets
        self._positions = torch.tensor(positions, device=device)[None]          # (1, N)
        self.blocks = []                                                         # (a, b, s, mask)
        for r, a in zip(rows, offsets):
            b, n = a + len(r.ids), len(r.ids)
            mask = None
            if r.start:     # keys: the shared prefix (all visible), then the row itself, causally
                mask = torch.ones(n, r.start + n, dtype=torch.bool, device=device).tril(r.start)
            self.blocks.append((a, b, r.start, mask))

    def positions(self, attention_mask, T):
        return self._positions                                                   # (1, N)

    def start_step(self, attention_mask, T):
        pass  # nothing to set up: the blocks were built from the rows

    def end_step(self, T):
        pass  # nothing held: one forward pass is the whole computation

    def attend(self, layer, q, k, v):
        """q (1, Hq, N, D); k, v (1, Hkv, N, D) of all packed tokens -> (1, Hq, N, D)."""
        out = torch.empty_like(q)
        for a, b, s, mask in self.blocks:
            if mask is None:    # row 0 (or a row ablated from its first token): plain causal
                out[:, :, a:b] = F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b],
                                                                is_causal=True, enable_gqa=True)
            else:
                keys = torch.cat([k[:, :, :s], k[:, :, a:b]], dim=2)
                values = torch.cat([v[:, :, :s], v[:, :, a:b]], dim=2)
                out[:, :, a:b] = F.scaled_dot_product_attention(q[:, :, a:b], keys, values, attn_mask=mask,
                                                                enable_gqa=True)
        return out


@torch.no_grad()
def attribute(model, p: PromptIds, tokenizer: Tokenizer, baseline: str | int = "",
              all_prefixes: bool = True, features: list[Feature] | None = None) -> Attribution:
    """Feature-ablation attribution of one example in one forward pass.

    model: a nanogdrt Llama (anything with `hidden_states(ids, context=)` and `logits(hidden)`).
    baseline: a str replaces each span's text (text mode); an int replaces each token (token mode).
    all_prefixes: False keeps only the first title token among the prefix features (all that
    the per-token ratios need).
    features: ablate these instead of `features_of(p)` (e.g. `segment_features`).
    """
    first = first_title_token(p, tokenizer)
    if features is None:
        features = [f for f in features_of(p, tokenizer)
                    if all_prefixes or f.kind != "prefix" or f.name == f"prefix{first}"]
    rows = ablated_rows(p, features, baseline, tokenizer)
    device = model.lm_head.weight.device
    packed = PackedAttention(rows, device)
    ids = torch.tensor([i for r in rows for i in r.ids], device=device)[None]      # (1, N)
    hidden = model.hidden_states(ids, context=packed)[0]                          # (N, C)

    # y_t at row position q is predicted by the hidden state at q - 1: row 0's if q - 1 lies in
    # the shared prefix, else the row's own. Only these go through the LM head.
    b_idx, t_idx, h_idx = [], [], []
    for b, (r, offset) in enumerate(zip(rows, packed.offsets)):
        for t, q in r.scored:
            b_idx.append(b)
            t_idx.append(t)
            h_idx.append(q - 1 if q - 1 < r.start else offset + q - 1 - r.start)
    target = torch.tensor(p.ids[p.target[0]:p.target[1]])
    logits = model.logits(hidden[torch.tensor(h_idx, device=device)]).float().cpu()  # (M, V)
    b_idx, t_idx = torch.tensor(b_idx), torch.tensor(t_idx)
    logp = logits.log_softmax(-1).gather(-1, target[t_idx, None])[:, 0]            # (M,)

    B, n_target = len(rows), len(target)
    table = torch.zeros(B, n_target)
    table[b_idx, t_idx] = logp
    was_scored = torch.zeros(B, n_target, dtype=torch.bool)
    was_scored[b_idx, t_idx] = True
    full = table[0]
    # Unscored (token before or at an ablated prefix token): unaffected, attribution 0.
    token_attr = torch.where(was_scored[1:], full[None] - table[1:], 0.0).T        # (n_target, F)
    return Attribution(features, token_attr, full, first)


# ----------------------------------------------------------------------------- per-token ratios (ours)

class RatioTerms(NamedTuple):
    """Per-token attributions of one example; each ratio is a quotient of two of them."""
    task: float                 # task text (head + tail), summed over all target tokens
    interaction: float          # history items, summed over all target tokens
    prefix: float               # first title token, summed over the target tokens after it
    interaction_after: float    # history items, summed over those same target tokens


def ratio_terms(a: Attribution) -> RatioTerms:
    def per_token(kind, t_from=0):
        cols = [i for i, f in enumerate(a.features) if f.kind == kind]
        n = sum(a.features[i].n_tokens for i in cols)
        return float(a.token_attr[t_from:, cols].sum()) / n if n else float("nan")

    j = a.first_title_token
    prefix_col = [f.name for f in a.features].index(f"prefix{j}")
    return RatioTerms(
        task=per_token("task"),
        interaction=per_token("history"),
        prefix=float(a.token_attr[j + 1:, prefix_col].sum()),  # one token: per-token = span value
        interaction_after=per_token("history", j + 1),
    )


class ContextRatios(NamedTuple):
    task_ratio: float           # (a) task description vs interaction tokens, ratio of means
    prefix_ratio: float         # (b) first title token vs interaction tokens, ratio of means
    per_example: list           # RatioTerms of each example


def context_ratios(attributions: list[Attribution]) -> ContextRatios:
    """Auxiliary / interaction per-token attribution over examples (ratio of means, see above)."""
    terms = [ratio_terms(a) for a in attributions]
    mean = {k: sum(getattr(t, k) for t in terms) / len(terms) for k in RatioTerms._fields}

    def ratio(num, den):  # no history (e.g. an "N/A" prompt) or exactly zero effect: undefined
        return num / den if den else float("nan")

    return ContextRatios(ratio(mean["task"], mean["interaction"]),
                         ratio(mean["prefix"], mean["interaction_after"]), terms)


# ----------------------------------------------------------------------------- segment ratios (paper)

def instruction_span(p: PromptIds, builder: PromptBuilder) -> tuple[int, int]:
    """Tokens of the instruction sentence ("Given a list of ... to the user.") inside the head.

    The head tokenizes alone as inside the whole prompt (nothing straddles head/history, prompt.py);
    a token belongs to the instruction if its first character does, as prompt.py's spans."""
    head = builder.head
    c0 = head.index("### Instruction:\n") + len("### Instruction:\n")
    c1 = head.index("\n\n### Input:", c0)
    ids, starts = builder.tokenizer.encode_with_offsets(head)
    n = p.bos[1]
    if p.ids[n:n + len(ids)] != ids:
        raise ValueError("the head's tokens differ inside the prompt: cannot locate the instruction")
    return n + bisect_left(starts, c0), n + bisect_left(starts, c1)


def segment_features(p: PromptIds, builder: PromptBuilder) -> list[Feature]:
    """The paper's features (module docstring): all auxiliary text, the instruction sentence
    alone, all interactions, and the first generated token (conditioning the rest of the title)."""
    if p.target is None:
        raise ValueError("attribution needs a prompt built with the predicted title as target")
    head = (p.bos[1], p.task[0][1])           # BOS is not text: a template keeps it
    t0 = p.target[0]
    return [Feature("auxiliary", "task", head, more=(p.task[1],)),
            Feature("instruction", "instruction", instruction_span(p, builder)),
            Feature("interactions", "history", p.history),
            Feature("prefix0", "prefix", (t0, t0 + 1))]


def segment_attribution(model, builder: PromptBuilder, history: list[str], predicted: str,
                        baseline: str = "") -> Attribution:
    """`attribute` over `segment_features`, with the predicted title as the target."""
    p = builder.build(history, predicted)
    return attribute(model, p, builder.tokenizer, baseline, features=segment_features(p, builder))


class SegmentTerms(NamedTuple):
    """Captum seq_attr of each feature for one example (sums over target tokens, no division)."""
    task: float                 # all auxiliary text, over the whole predicted title
    instruction: float          # the instruction sentence alone, same target
    interaction: float          # all interactions, same target
    prefix: float               # the first generated token, over target tokens 1..
    interaction_after: float    # all interactions, over target tokens 1..


def segment_terms(a: Attribution) -> SegmentTerms:
    col = {f.name: i for i, f in enumerate(a.features)}
    seq = a.token_attr.sum(0)
    return SegmentTerms(float(seq[col["auxiliary"]]), float(seq[col["instruction"]]),
                        float(seq[col["interactions"]]), float(a.token_attr[1:, col["prefix0"]].sum()),
                        float(a.token_attr[1:, col["interactions"]].sum()))


class SegmentRatios(NamedTuple):
    task_ratio: float           # A(auxiliary) / A(interactions), ratio of means
    task_ratio_mean: float      # the same, mean of per-example ratios
    instruction_ratio: float    # A(instruction sentence) / A(interactions), ratio of means
    instruction_ratio_mean: float
    prefix_ratio: float         # A(first generated token) / A(interactions), over y_1.., ratio of means
    prefix_ratio_mean: float
    per_example: list           # SegmentTerms of each example


def segment_ratios(attributions: list[Attribution]) -> SegmentRatios:
    """Both aggregations of each segment ratio (module docstring)."""
    terms = [segment_terms(a) for a in attributions]

    def ratio(num, den):
        return num / den if den else float("nan")

    def both(num, den):
        of_means = ratio(sum(getattr(t, num) for t in terms), sum(getattr(t, den) for t in terms))
        each = [r for t in terms if (r := ratio(getattr(t, num), getattr(t, den))) == r]  # drop NaN
        return of_means, sum(each) / len(each) if each else float("nan")

    return SegmentRatios(*both("task", "interaction"), *both("instruction", "interaction"),
                         *both("prefix", "interaction_after"), terms)
