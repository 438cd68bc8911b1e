r"""Prompts as token ids with labelled spans: the one place where text becomes model input.

The text is MSL's training-time prompt (`generate_prompt` in MSL's train_trie_token.py, with
the instruction and history sentence of its `get_prompt`), character for character:

    'Below is an instruction that describes a task, paired with an input that provides '
    'further context. Write a response that appropriately completes the request. \n\n'
    '### Instruction:\n'
    'Given a list of toys the user has played before, please recommend a new toy that the '
    'user likes to the user.\n\n'
    '### Input:\n'
    'The user has played the following toys before: "Title 1", "Title 2"\n \n\n'
    '### Response:\n'
    '"Target title"' + EOS

(MSL's input is the history sentence and titles + "\n ", hence the space between newlines.)
The ids are the joint tokenization of that whole text, as MSL computes them: transformers'
`tokenizer(text)` (so BOS exactly where the tokenizer adds one: Llama 3's <|begin_of_text|>,
none for SmolLM2), then EOS appended after the target. Spans come from character offsets:

    bos      the special tokens transformers puts first         (0, 0) when there are none
    head     BOS + text up to "...before:"                      task description (auxiliary)
    items    ' "Title 1"', ', "Title 2"', ...                   interaction tokens, one per item
    tail     "\n \n\n### Response:\n"                         task description (auxiliary)
    target   '"Target title"' + EOS                             what the model generates

A token belongs to the span that holds its first character. Tokens do straddle: '",' (a
title's closing quote and the comma after it, one token in SmolLM2 and Llama 3) or '!",'
after a title ending in "!"; in Llama 3 also the last title's closing quote and the newline
after it (its pre-tokenizer attaches newlines to punctuation). Each belongs to the earlier
item. The space after "before:" starts item 0, where it is part of the token ' "'. Nothing
straddles head/history or tail/target in the pre-tokenizers of GPT-2 and Llama 3 (a colon
stands alone before a space; a newline ends a pre-token before a quote); `build` checks the
target against `target_ids(title)`, the ids the trie stores, and fails loudly otherwise.

What the paper leaves open, and what we chose:
- The exact prompt string: MSL's training template (the Alpaca-style one of the lineage).
  MSL's inference.py has its own copy with two spaces after "request." (one at training);
  we use the training text for training, Eq. 2/3, decoding and attribution alike.
- Where "N/A" goes (Eq. 2/3, `mask_history=True`): it replaces the quoted, comma-separated
  list and nothing else: '...toys before: N/A\n \n\n### Response:\n'. The history span is
  then ' N/A' (the space after the colon included, as for item 0).
- Special tokens: whatever transformers adds (BOS or nothing), never EOS inside the prompt;
  a tokenizer that appends special tokens after every text is refused. The target's EOS is
  the tokenizer's EOS (MSL appends `tokenizer.eos_token_id`; its trie hard-codes 128001,
  Llama 3's <|end_of_text|>, the same id for the base Llama 3.2 models).
- MSL truncates at 512 tokens (cutoff_len, which can cut off the response); we never
  truncate. With SmolLM2's tokenizer Toy examples average ~215 tokens; 2 of train_5000's
  and 9 of the test split's 4,794 exceed 512.
"""

from bisect import bisect_left
from dataclasses import dataclass
from functools import lru_cache

from nanogdrt.tokenizer import Tokenizer

# One space after "request.": MSL's training text. Its inference.py writes two ("request.  \n\n");
# we use the training text everywhere, so the model is decoded on the prompt it was trained on.
PREAMBLE = ("Below is an instruction that describes a task, paired with an input that provides further "
            "context. Write a response that appropriately completes the request. \n\n")


@dataclass(frozen=True)
class Template:
    """One dataset's wording; any other dataset folder states its own in prompt.json, as
    {"instruction": ..., "history": "... {history}"} (nanogdrt.data.load_template)."""
    instruction: str  # the task sentence
    history: str      # MSL's history_prompt: the sentence before the titles, ending in ": "


# MSL's get_prompt for its "Toy", "Amazon_Books" and "Clothing" datasets.
TEMPLATES = {
    "toy": Template("Given a list of toys the user has played before, please recommend a new toy that "
                    "the user likes to the user.", "The user has played the following toys before: "),
    "book": Template("Given a list of books the user has read before, please recommend a new book that "
                     "the user likes to the user.", "The user has read the following books before: "),
    "clothing": Template("Given a list of clothing the user has worn before, please recommend a new "
                         "clothing that the user likes to the user.",
                         "The user has worn the following clothing before: "),
}
TEMPLATES["synthetic"] = TEMPLATES["toy"]
TEMPLATES["controlled"] = TEMPLATES["toy"]
MASKED_HISTORY = "N/A"                    # stands for the whole list of quoted titles (Eq. 2/3)
TAIL = "\n " + "\n\n### Response:\n"      # the end of MSL's input, then the response header


@dataclass
class PromptIds:
    """Token ids of one example and where each part lies (half-open [start, end) ranges)."""
    ids: list[int]
    task: list[tuple[int, int]]      # head (BOS included) and tail: the task description
    history: tuple[int, int]         # all history tokens (or the " N/A" that replaced them)
    items: list[tuple[int, int]]     # one range per history item, inside `history`
    target: tuple[int, int] | None   # the response title + EOS; None for a generation prompt
    bos: tuple[int, int] = (0, 0)    # the special tokens before the text, inside the head

    @property
    def prompt_len(self) -> int:
        """Length of the part that is given to the model before it generates."""
        return self.target[0] if self.target is not None else len(self.ids)


class PromptBuilder:
    """Builds PromptIds for one dataset's template with one tokenizer (title ids are cached)."""

    def __init__(self, tokenizer: Tokenizer, dataset: "str | Template"):
        """`dataset`: a name with a built-in template (TEMPLATES), or a Template, e.g. a loaded
        dataset's `RecDataset.template` (a folder's prompt.json: nanogdrt.data.load_template)."""
        if not isinstance(dataset, Template) and dataset not in TEMPLATES:
            raise ValueError(f"no prompt template for dataset {dataset!r} (known: {sorted(TEMPLATES)}; "
                             f"for a folder dataset pass its RecDataset.template)")
        if tokenizer.special_suffix:
            raise ValueError(f"the tokenizer appends {tokenizer.special_suffix} after every text "
                             "(add_eos_token?): prompts for generation cannot end in special tokens")
        self.tokenizer = tokenizer
        t = dataset if isinstance(dataset, Template) else TEMPLATES[dataset]
        # The head stops at the colon: the space after it opens the history (see the docstring).
        self.head = f"{PREAMBLE}### Instruction:\n{t.instruction}\n\n### Input:\n{t.history.rstrip(' ')}"
        self.gap = t.history[len(t.history.rstrip(" ")):]   # " "
        self._target_ids = lru_cache(maxsize=None)(self._encode_target)

    def _encode_target(self, title: str) -> tuple[int, ...]:
        return tuple(self.tokenizer.encode(f'"{title}"')) + (self.tokenizer.eos_id,)

    def target_ids(self, title: str) -> list[int]:
        """Ids the model must generate for `title`: the quoted title, then EOS (Eq. 1's y).

        The same ids as in every prompt's target span (checked by `build`) and in the trie."""
        return list(self._target_ids(title))

    def pieces(self, history: list[str], target: str | None = None, mask_history: bool = False) -> list[str]:
        """The prompt text cut at the span boundaries: head, one piece per item (or the "N/A"
        piece), tail, and the quoted target when there is one. Joined, MSL's prompt text."""
        if mask_history:
            items = [self.gap + MASKED_HISTORY]
        else:
            items = [(self.gap if i == 0 else ", ") + f'"{title}"' for i, title in enumerate(history)]
            items = items or [self.gap]  # no history: MSL still writes "before: "
        return [self.head, *items, TAIL] + ([f'"{target}"'] if target is not None else [])

    def text(self, history: list[str], target: str | None = None, mask_history: bool = False) -> str:
        """MSL's prompt text (target quoted, EOS not written: it is a token, not text)."""
        return "".join(self.pieces(history, target, mask_history))

    def for_interaction(self, x, titles, *, with_target: bool) -> PromptIds:
        """The prompt of one interaction (`x.history`, `x.target`: item ids; `titles`: id -> title),
        with its target title for training and attribution, without it for generation."""
        return self.build([titles[i] for i in x.history], titles[x.target] if with_target else None)

    def build(self, history: list[str], target: str | None = None, mask_history: bool = False) -> PromptIds:
        """The ids of `text(...)` tokenized whole (+ BOS as transformers adds it, + EOS after a
        target), with each span holding the tokens whose first character lies in its piece."""
        pieces = self.pieces(history, target, mask_history)
        text = "".join(pieces)
        ids, starts = self.tokenizer.encode_with_offsets(text)   # one joint tokenization
        prefix = self.tokenizer.special_prefix
        n = len(prefix)
        # Character where each piece starts -> first token starting there or later (+ BOS).
        bounds, c = [], 0
        for piece in pieces:
            bounds.append(n + bisect_left(starts, c))
            c += len(piece)
        bounds.append(n + len(ids))
        ids = prefix + ids
        n_hist = len(pieces) - 2 - (target is not None)                # pieces between head and tail
        head = (0, bounds[1])
        hist = [(bounds[1 + i], bounds[2 + i]) for i in range(n_hist)]
        tail = (bounds[1 + n_hist], bounds[2 + n_hist])
        history_span = (hist[0][0], hist[-1][1])
        has_items = not mask_history and len(history) > 0
        target_span = None
        if target is not None:
            ids.append(self.tokenizer.eos_id)
            target_span = (tail[1], len(ids))
            if tuple(ids[tail[1]:]) != self._target_ids(target):
                raise ValueError(f"title {target!r}: its tokens after the response header differ from "
                                 f"target_ids (a token straddles the header): the trie would not match")
        return PromptIds(ids, [head, tail], history_span, hist if has_items else [], target_span, (0, n))
