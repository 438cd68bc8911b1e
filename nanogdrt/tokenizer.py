"""A thin wrapper over `tokenizers.Tokenizer` that knows the checkpoint's BOS/EOS/PAD ids and
adds special tokens exactly as `transformers.AutoTokenizer.from_pretrained(folder)(text)` does.

Everything that turns text into ids goes through here (mostly via nanogdrt.prompt), so the
training targets, the "N/A"-masked prompts, the trie of titles and the attribution all agree.

Which special tokens surround a text: those of tokenizer.json's post-processor, and none when
it has none. That is what transformers (5.x) does for a `PreTrainedTokenizerFast` folder with
a tokenizer.json: it then drops tokenizer_config.json's `add_bos_token` / `add_eos_token`
(tests/test_tokenizer.py checks this against transformers; model-specific tokenizer classes
are not covered). Llama-3 folders add <|begin_of_text|> through their post-processor
(TemplateProcessing); the embedded SmolLM2 has none, so nothing is added.
We read the post-processor's additions once, into `special_prefix` / `special_suffix` (ids
before / after the text), then drop it from the backend: a ByteLevel post-processor with
`trim_offsets` would move token offsets off their leading spaces, and prompt.py derives spans
from the offsets.

One deliberate difference from transformers' default: special-token text inside a text (a title
holding "<|im_end|>") is encoded as its plain characters, not as the special token: titles are
data, and must not end a turn or a generation (tests/test_reliability.py).
"""

import json
from pathlib import Path


class Tokenizer:
    def __init__(self, path):
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        folder = file.parent
        if not file.is_file():
            raise FileNotFoundError(f"{file}: no tokenizer.json (is {folder} a Hugging Face model folder?)")
        try:
            self.backend = HFTokenizer.from_file(str(file))
        except Exception as e:  # the tokenizers library raises a bare Exception on parse errors
            raise ValueError(f"{file}: not a valid tokenizer.json ({e})") from None
        config = _read_json(folder / "config.json")
        tok_config = _read_json(folder / "tokenizer_config.json")
        self.bos_id = self._special_id(tok_config.get("bos_token"), config.get("bos_token_id"))
        self.eos_id = self._special_id(tok_config.get("eos_token"), config.get("eos_token_id"))
        pad = self._special_id(tok_config.get("pad_token"), config.get("pad_token_id"))
        self.pad_id = pad if pad is not None else self.eos_id  # padding positions are masked anyway
        self.vocab_size = self.backend.get_vocab_size()

        # What the post-processor puts around one plain token (special_tokens_mask marks it).
        probe = self.backend.encode("a", add_special_tokens=True)
        special = probe.special_tokens_mask
        n_pre = special.index(0)
        n_suf = special[::-1].index(0)
        self.special_prefix = probe.ids[:n_pre]
        self.special_suffix = probe.ids[len(probe.ids) - n_suf:]
        self.backend.post_processor = None  # raw offsets; the specials are added by hand (above)
        # Text is data: "<|im_end|>" inside a title is encoded as its characters, never as the
        # special token (tokenizers' default would end the turn mid-title). Our templates hold no
        # special-token text; BOS/EOS ids are added by hand.
        self.backend.encode_special_tokens = True
        # Whether a BOS starts every transformers-tokenized text (Llama 3: yes; SmolLM2: no).
        self.add_bos = self.bos_id is not None and self.special_prefix == [self.bos_id]

    def _special_id(self, token, fallback_id):
        if isinstance(token, dict):  # {"content": "<s>", ...} in older tokenizer_config files
            token = token.get("content")
        if token is not None and self.backend.token_to_id(token) is not None:
            return self.backend.token_to_id(token)
        if isinstance(fallback_id, list):  # Llama 3 lists several EOS ids; the first ends text
            fallback_id = fallback_id[0] if fallback_id else None
        return fallback_id

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; with add_special_tokens, exactly transformers' `tokenizer(text)`."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return self.special_prefix + ids + self.special_suffix if add_special_tokens else ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
        """(ids, start): ids with no special tokens, and the character where each token starts.

        Byte-level tokens that split one character share that character's start."""
        enc = self.backend.encode(text, add_special_tokens=False)
        return enc.ids, [s for s, _ in enc.offsets]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
