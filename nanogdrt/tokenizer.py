"""A thin wrapper over `tokenizers.Tokenizer` that knows the checkpoint's BOS/EOS/PAD ids.

Everything that turns text into ids goes through here (mostly via nanogdrt.prompt), so the
training targets, the "N/A"-masked prompts, the trie of titles and the attribution all agree.
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
        # Whether to prepend BOS ourselves; Llama-3 style tokenizer.json files add it in
        # their own post-processor, SmolLM2 adds none.
        self.add_bos = bool(tok_config.get("add_bos_token", False))
        self.vocab_size = self.backend.get_vocab_size()

    def _special_id(self, token, fallback_id):
        if isinstance(token, dict):  # {"content": "<s>", ...} in older tokenizer_config files
            token = token.get("content")
        if token is not None and self.backend.token_to_id(token) is not None:
            return self.backend.token_to_id(token)
        if isinstance(fallback_id, list):  # Llama 3 lists several EOS ids; the first ends text
            fallback_id = fallback_id[0] if fallback_id else None
        return fallback_id

    def encode(self, text: str, bos: bool = False) -> list[int]:
        """Token ids of `text` with no special tokens added (BOS only if asked and configured)."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return [self.bos_id] + ids if bos and self.add_bos and self.bos_id is not None else ids

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
