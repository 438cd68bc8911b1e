"""Prompts as token ids with labelled spans: the one place where text becomes model input.

The template is the Alpaca-style one of the paper's lineage (BIGRec, MSL, GDRT):

    Below is an instruction that describes a task, paired with an input that provides further
    context. Write a response that appropriately completes the request.

    ### Instruction:
    Given a list of toys the user has played before, please recommend a new toy that the user
    likes to the user.

    ### Input:
    The user has played the following toys before: "Title 1", "Title 2"

    ### Response:
    "Target title"<eos>

Each segment is tokenized on its own and the ids are concatenated, so a title's target ids are
the same in every prompt, in the trie of all titles, and under ablation. The segments are

    head     everything up to "...before:"              auxiliary (task description)
    history  ' "Title 1"', ', "Title 2"', ...           interaction tokens, one span per item
    tail     "\\n\\n### Response:\\n"                    auxiliary (task description)
    target   '"Target title"' + EOS                     what the model generates

Replacing the history by " N/A" (`mask_history=True`) gives the prompt of Eq. 2 / Eq. 3, which
scores how much a target token is predictable from auxiliary tokens alone.
"""

from dataclasses import dataclass
from functools import lru_cache

from nanogdrt.tokenizer import Tokenizer

PREAMBLE = ("Below is an instruction that describes a task, paired with an input that provides further "
            "context. Write a response that appropriately completes the request.\n\n")


@dataclass(frozen=True)
class Template:
    instruction: str  # the task sentence
    history: str      # the sentence that introduces the history titles (without the colon)


TEMPLATES = {
    "toy": Template("Given a list of toys the user has played before, please recommend a new toy that "
                    "the user likes to the user.", "The user has played the following toys before"),
    "book": Template("Given a list of books the user has read before, please recommend a new book that "
                     "the user likes to the user.", "The user has read the following books before"),
    "clothing": Template("Given a list of clothing items the user has worn before, please recommend a new "
                         "clothing item that the user likes to the user.",
                         "The user has worn the following clothing items before"),
}
TEMPLATES["synthetic"] = TEMPLATES["toy"]
MASKED_HISTORY = " N/A"


@dataclass
class PromptIds:
    """Token ids of one example and where each part lies (half-open [start, end) ranges)."""
    ids: list[int]
    task: list[tuple[int, int]]      # head and tail: the task description (auxiliary tokens)
    history: tuple[int, int]         # all history tokens (or the " N/A" that replaced them)
    items: list[tuple[int, int]]     # one range per history item, inside `history`
    target: tuple[int, int] | None   # the response title + EOS; None for a generation prompt

    @property
    def prompt_len(self) -> int:
        """Length of the part that is given to the model before it generates."""
        return self.target[0] if self.target is not None else len(self.ids)


class PromptBuilder:
    """Builds PromptIds for one dataset's template with one tokenizer (segment ids are cached)."""

    def __init__(self, tokenizer: Tokenizer, dataset: str):
        if dataset not in TEMPLATES:
            raise ValueError(f"no prompt template for dataset {dataset!r} (known: {sorted(TEMPLATES)})")
        self.tokenizer = tokenizer
        t = TEMPLATES[dataset]
        head = f"{PREAMBLE}### Instruction:\n{t.instruction}\n\n### Input:\n{t.history}:"
        self.head_ids = tokenizer.encode(head, bos=True)
        self.tail_ids = tokenizer.encode("\n\n### Response:\n")
        self.masked_ids = tokenizer.encode(MASKED_HISTORY)
        self._encode = lru_cache(maxsize=None)(tokenizer.encode)

    def item_ids(self, title: str, first: bool) -> list[int]:
        """Ids of one history item as it appears in the list: ' "T"' first, ', "T"' after."""
        return self._encode(f'{"" if first else ","} "{title}"')

    def target_ids(self, title: str) -> list[int]:
        """Ids the model must generate for `title`: the quoted title, then EOS (Eq. 1's y)."""
        return self._encode(f'"{title}"') + [self.tokenizer.eos_id]

    def for_interaction(self, x, titles, *, with_target: bool) -> PromptIds:
        """The prompt of one interaction (`x.history`, `x.target`: item ids; `titles`: id -> title),
        with its target title for training and attribution, without it for generation."""
        return self.build([titles[i] for i in x.history], titles[x.target] if with_target else None)

    def build(self, history: list[str], target: str | None = None, mask_history: bool = False) -> PromptIds:
        ids = list(self.head_ids)
        items = []
        h0 = len(ids)
        if mask_history:
            ids += self.masked_ids
        else:
            for i, title in enumerate(history):
                start = len(ids)
                ids += self.item_ids(title, first=(i == 0))
                items.append((start, len(ids)))
        history_span = (h0, len(ids))
        t0 = len(ids)
        ids += self.tail_ids
        task = [(0, h0), (t0, len(ids))]
        target_span = None
        if target is not None:
            s = len(ids)
            ids += self.target_ids(target)
            target_span = (s, len(ids))
        return PromptIds(ids, task, history_span, items, target_span)
