"""LLaRA (Liao et al., SIGIR 2024) [41]: a SASRec's item embeddings as soft tokens in the prompt.

Read from the official code, `ljy0ustc/LLaRA` at commit f61bdb6 (model/) and a7cec54
(data/data_interface.py); facts carry over, code does not.

1. The item slot. After each history title the prompt holds one placeholder token, and its input
   embedding is replaced by the projection of the item's SASRec embedding (`wrap_emb`,
   model_interface.py L291-305: every [HistoryEmb] position, in order, takes the next history item):

       x_slot(i) = W2 GELU(W1 e_i + b1) + b2,   e_i = the SASRec item-table row of item i

   e_i is the raw row of the frozen SASRec's input embedding table (`encode_items` L279-285 calls
   SASRec's `cacu_x`, which is `item_embeddings(x)`, recommender/A_SASRec_final_bce_llm.py;
   `load_rec_model` L271-277 freezes it). The projector is model/mlp_projector.py (L3-14):
   Linear(rec_size, llm_size), GELU, Linear(llm_size, llm_size), rec_size = the SASRec's width,
   llm_size = the LLM's hidden size (`load_projector` L250-259), PyTorch's default init.
2. The curriculum (data_interface.py `TrainCollater.__call__`, L38-62): with probability
   p = step / total a batch gets the hybrid prompt, "title [HistoryEmb]" (L44, projector trained),
   otherwise the text-only prompt "title [PH]" (L55), the same text with a placeholder whose own
   embedding stays (the projector is frozen for that batch, model_interface.py L65-70):

       hybrid at step s  <=>  u_s < s / S,   u_s ~ U(0, 1),  S = the run's total steps

   Validation and test always use the hybrid prompt (L40: `or not self.train`).
3. Training: LoRA on the LLM and the projector, one Adam over both at the same learning rate
   (`configure_optimizers` L148-156), the usual next-token NLL on the response (`forward` L28-41).

Our prompt is MSL's template (nanogdrt/prompt.py), with the slot after each quoted title:
' "Title 1"<slot>, "Title 2"<slot>'. LLaRA adds new special tokens to the tokenizer, so the text
is tokenized in segments between them; `HybridPromptBuilder` does the same, cutting the text at
each slot and writing the placeholder id there.

Where we depart, and why:
- Candidates. LLaRA's prompt lists candidate titles (main.py's --cans_num: 10; train_movielens.sh:
  20) with their own slots and asks the model to choose (the [CansHere] / [CansEmb] branch). Table 3 is evaluated by constrained beam search over
  the full catalogue, as every LLM row here, so the candidate list is dropped: one slot per
  history item, none for candidates or the target.
- The placeholder. LLaRA adds [PH], [HistoryEmb] and resizes the embedding table. Resizing would
  add rows to the LM head (tied in SmolLM2) and change every row's softmax normaliser, so we reuse
  a special token the model already has but never sees in our prompts (`PLACEHOLDERS`): its
  embedding is the text-only prompt's [PH], and in the hybrid prompt it is replaced (so [PH] and
  [HistoryEmb] share one id; only where it is replaced differs). No space before the slot (LLaRA
  writes "title [HistoryEmb]"): with the slot its own segment, a space would be a token of its own.
- The curriculum's clock. We draw once per optimizer step, u_s from (seed, step) so a run is
  reproducible; LLaRA draws once per micro-batch in each data-loader worker. Our reading of its
  code (not run): each epoch's workers copy the collater with cur_step = 1, so there p rises
  from 0 to about 1 / epochs within every epoch rather than to 1 over the run; we follow the
  stated intent, p = step / total over the whole run.
- Optimizer. train.py's AdamW over LoRA and the projector, both at --lr and --weight-decay
  (LLaRA: Adam, weight decay 1e-5 on the projector only, cosine schedule with warm-up); LoRA's
  gradient is clipped at --clip, the projector's is not (LLaRA clips neither).
- The SASRec is ours (nanogdrt/baselines/sasrec.py: pmixer's network, BCE), not the repo's.
- GDRT on top (`--method llara+gdrt`): Eq. 5's groups and Q over these per-token losses. Eq. 2/3
  replace the whole history, titles and slots, by "N/A", so the masked prompt is the text
  prompt's and the base model's cached token groups carry over unchanged.

In training, a slot is written into the example's ids as -(item id + 1) (`training_examples`):
the existing batching then carries the item to `LLaRALoss`, which puts the placeholder's or the
projection's vector there. A-LLMRec would plug in the same way (`nanogdrt.soft_tokens`): its user
token and item vectors are other soft tokens, placed by another builder.
"""

import random
from bisect import bisect_left
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn as nn

from nanogdrt import files, loss
from nanogdrt.baselines import sasrec
from nanogdrt.prompt import PromptBuilder, PromptIds
from nanogdrt.soft_tokens import SoftTokens

METHODS = ("llara", "llara+gdrt")            # train.py --method values that put item slots in the prompt
# Special tokens the prompt never holds, first found is the placeholder: Llama 3, SmolLM2, Llama 2.
PLACEHOLDERS = ("<|reserved_special_token_0|>", "<empty_output>", "<unk>")
PROJECTOR_FILE = "llara_projector.safetensors"   # beside the adapter's own files


def curriculum_probability(step: int, total: int) -> float:
    """P(step `step` of `total` gets the hybrid prompt) = step / total (TrainCollater L38)."""
    if total < 1 or not 1 <= step <= total:
        raise ValueError(f"step {step} is outside 1..{total}")
    return step / total


def hybrid_at(step: int, total: int, seed: int) -> bool:
    """The curriculum's draw for one step, u < step / total with u from (seed, step) alone."""
    return random.Random(f"llara:{seed}:{step}").random() < curriculum_probability(step, total)


def placeholder_id(tokenizer) -> int:
    """The id of the first of PLACEHOLDERS that the tokenizer holds as a special token."""
    added = tokenizer.backend.get_added_tokens_decoder()
    special = {t.content: i for i, t in added.items() if t.special}
    for token in PLACEHOLDERS:
        if token in special and special[token] not in (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id):
            return special[token]
    raise ValueError(f"the tokenizer has none of the special tokens {PLACEHOLDERS} to hold LLaRA's item slots")


class HybridPromptBuilder(PromptBuilder):
    """MSL's prompt with a placeholder token after each history title (LLaRA's item slots)."""

    def __init__(self, tokenizer, dataset: str):
        super().__init__(tokenizer, dataset)
        self.placeholder = placeholder_id(tokenizer)

    def _tokenize(self, pieces: list[str]) -> tuple[list[int], list[int]]:
        """Ids of the pieces' joint text, and the first token of each piece (as PromptBuilder.build)."""
        ids, starts = self.tokenizer.encode_with_offsets("".join(pieces))
        first, c = [], 0
        for piece in pieces:
            first.append(bisect_left(starts, c))
            c += len(piece)
        return ids, first

    def build(self, history: list[str], target: str | None = None, mask_history: bool = False) -> PromptIds:
        """The prompt with one slot after each title; without titles (or with Eq. 2/3's "N/A")
        it is the text prompt exactly. Each item's span holds its slot."""
        if mask_history or not history:
            return super().build(history, target, mask_history)
        pieces, n = self.pieces(history, target), len(history)
        # Segments end at the slots: [head, title 1], [title 2], ..., [title n], [tail, target].
        segments = [pieces[:2]] + [[p] for p in pieces[2:1 + n]] + [pieces[1 + n:]]
        ids, piece_start = list(self.tokenizer.special_prefix), []
        for k, segment in enumerate(segments):
            seg_ids, first = self._tokenize(segment)
            piece_start += [len(ids) + f for f in first]
            ids += seg_ids + ([self.placeholder] if k < n else [])
        items = [(piece_start[1 + i], piece_start[2 + i]) for i in range(n)]
        tail_end = piece_start[2 + n] if target is not None else len(ids)
        target_span = None
        if target is not None:
            ids.append(self.tokenizer.eos_id)
            target_span = (tail_end, len(ids))
            if tuple(ids[tail_end:]) != self._target_ids(target):
                raise ValueError(f"title {target!r}: its tokens after the response header differ from target_ids")
        bos = (0, len(self.tokenizer.special_prefix))
        return PromptIds(ids, [(0, piece_start[1]), (piece_start[1 + n], tail_end)], (items[0][0], items[-1][1]),
                         items, target_span, bos)


def slot_positions(ids, placeholder: int, history) -> list[int]:
    """Where the slots of a prompt lie: one placeholder per history item, else a clear error."""
    positions = [t for t, i in enumerate(ids) if i == placeholder]
    if len(positions) != len(history):
        raise ValueError(f"a prompt holds {len(positions)} item slots for {len(history)} history items")
    return positions


def training_examples(builder: HybridPromptBuilder, interactions, titles) -> list[PromptIds]:
    """Each window's hybrid prompt + target, its slot ids written as -(item id + 1) (see the docstring)."""
    out = []
    for x in interactions:
        p = builder.for_interaction(x, titles, with_target=True)
        ids = list(p.ids)
        for t, item in zip(slot_positions(ids, builder.placeholder, x.history), x.history):
            ids[t] = -(item + 1)
        out.append(replace(p, ids=ids))
    return out


class Projector(nn.Module):
    """mlp_projector.py's MlpProjector: Linear(rec_size, llm_size), GELU, Linear(llm_size, llm_size)."""

    def __init__(self, rec_size: int, llm_size: int):
        super().__init__()
        self.mlp_proj = nn.Sequential(nn.Linear(rec_size, llm_size), nn.GELU(), nn.Linear(llm_size, llm_size))

    def forward(self, x):
        return self.mlp_proj(x)


class LLaRA(nn.Module):
    """The projector, the frozen SASRec item table it reads, and the curriculum's current choice."""

    def __init__(self, rec: sasrec.SASRec, llm_size: int, placeholder: int):
        super().__init__()
        self.projector = Projector(rec.cfg.hidden, llm_size)
        # Buffers, not parameters: the SASRec stays frozen (no optimizer, no gradient, not saved).
        self.register_buffer("item_table", rec.item_emb.weight.detach().clone(), persistent=False)
        self.register_buffer("item_row", rec.id_to_index.clone(), persistent=False)
        self.placeholder = placeholder
        self.hybrid = True        # this step's prompts: hybrid (slots projected) or text only

    def item_vectors(self, item_ids: torch.Tensor) -> torch.Tensor:
        """(n,) item ids -> (n, llm_size) the projections of their SASRec rows (step 1 above)."""
        return self.projector(self.item_table[self.item_row[item_ids.to(self.item_row.device)]])

    def start_step(self, step: int, total: int, seed: int) -> None:
        self.hybrid = hybrid_at(step, total, seed)

    @torch.no_grad()
    def soft_tokens(self, prompts, histories) -> list[SoftTokens]:
        """Decoding's hook (`recommend.Decoding.soft_tokens`): the hybrid prompt's slot vectors."""
        out = []
        for ids, history in zip(prompts, histories):
            positions = torch.tensor(slot_positions(ids, self.placeholder, history), dtype=torch.long)
            items = torch.tensor(list(history), dtype=torch.long)
            out.append(SoftTokens(positions, self.item_vectors(items)))
        return out

    def save(self, folder) -> None:
        from safetensors.torch import save_file

        state = {k: v.detach().cpu().contiguous() for k, v in self.projector.state_dict().items()}
        with files.atomic_path(Path(folder) / PROJECTOR_FILE) as tmp:
            save_file(state, tmp, metadata={"placeholder_id": str(self.placeholder)})

    def load(self, folder) -> None:
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = Path(folder) / PROJECTOR_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found (a LLaRA adapter folder holds its projector there)")
        with safe_open(str(path), framework="pt") as f:
            saved = (f.metadata() or {}).get("placeholder_id")
        if saved is not None and saved != str(self.placeholder):
            raise ValueError(f"{path}: trained with placeholder token {saved}, this tokenizer's is {self.placeholder}")
        state = load_file(str(path), device=str(self.item_table.device))
        try:
            self.projector.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ValueError(f"{path}: not this run's projector ({str(e).splitlines()[0]})") from None


def load_sasrec(folder, item_ids, device="cpu") -> sasrec.SASRec:
    """The SASRec of `folder`, checked to hold every catalogue item (before the LLM loads)."""
    rec = sasrec.load(folder, device=device)
    known = set(rec.item_ids.tolist())
    missing = [i for i in item_ids if i not in known]
    if missing:
        raise ValueError(f"--sasrec {folder}: its catalogue lacks {len(missing)} of the dataset's items "
                         f"(e.g. {missing[:3]}): train it on this dataset")
    return rec


class LLaRALoss(nn.Module):
    """`methods.TargetLoss` for LLaRA: the per-token NLL of the targets, the prompt's slots (ids
    -(item + 1)) holding the projection (hybrid step) or the placeholder's embedding (text only)."""

    def __init__(self, model, llara: LLaRA):
        super().__init__()
        self.model, self.llara = model, llara

    def forward(self, ids, target_mask, nodes=None) -> loss.TokenNLL:
        slots = ids < 0                                                          # (B, T)
        tokens = ids.masked_fill(slots, self.llara.placeholder)
        x = self.model.model.embed_tokens(tokens)                                # (B, T, C)
        if self.llara.hybrid and bool(slots.any()):
            vectors = self.llara.item_vectors(-ids[slots] - 1).to(x.dtype)       # (n, C), row-major order
            x = x.index_put(slots.nonzero(as_tuple=True), vectors)
        hidden = self.model.hidden_states(None, inputs_embeds=x)                 # right padding: no mask
        return loss.token_nll(self.model.logits, hidden, tokens, target_mask)


def describe(llara: LLaRA, folder) -> dict:
    """What results.json records of the method (train.py's "method")."""
    return {"sasrec": str(folder), "rec_size": llara.projector.mlp_proj[0].in_features,
            "llm_size": llara.projector.mlp_proj[2].out_features, "placeholder_id": llara.placeholder,
            "curriculum": "hybrid prompt with probability step / total, drawn once per optimizer step"}

