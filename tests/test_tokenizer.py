"""Tokenizer: special tokens exactly as transformers' AutoTokenizer adds them, for Llama-3-style
folders (BOS from tokenizer.json's TemplateProcessing) and with add_bos_token flags (ignored),
and prompts equal to MSL's tokenized whole (tests/msl_reference.py) with the BOS span visible.

The Llama-3-style tokenizer is a small byte-level BPE trained here with the `tokenizers`
library: Llama 3's split regex, ByteLevel, and the post-processor of the Llama 3 files
(ByteLevel without offset trimming, then TemplateProcessing adding <|begin_of_text|>).
"""

import json

import pytest

from msl_reference import msl_ids, msl_text
from nanogdrt.prompt import PromptBuilder
from nanogdrt.tokenizer import Tokenizer

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
ROWS = [(["Lego Classic Bricks", 'Uno "Flip" Card Game!', "Crayola &amp; Friends Set"], "Jenga Classic Game"),
        (["Cien años de soledad", "三体", "Carhartt Beanie 🧢"], "Catch-22"),
        (["Melissa & Doug {Deluxe} Puzzle, 24 pcs"], '"Ray-Ban" Aviator?')]
TEXTS = ["Hello world", "", " leading space", 'A "quoted", list\n \n\n### Response:\n"x"']


def write_folder(folder, trim_offsets=False, template=f"{BOS} $A", tok_config=None):
    """A Llama-3-style HF folder: tokenizer.json (+ tokenizer_config.json, config.json)."""
    from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    corpus = [msl_text(d, h, t) for d in ("toy", "book", "clothing") for h, t in ROWS] * 3
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=700, special_tokens=[BOS, EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    if template:
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(add_prefix_space=True, trim_offsets=trim_offsets, use_regex=True),
            processors.TemplateProcessing(single=template, pair=f"{template} {template.replace('$A', '$B:1')}",
                                          special_tokens=[(t, tok.token_to_id(t)) for t in (BOS, EOS)])])
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    config = {"bos_token": BOS, "eos_token": EOS, "model_max_length": 131072,
              "tokenizer_class": "PreTrainedTokenizerFast", **(tok_config or {})}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "bos_token_id": 0, "eos_token_id": 1}))
    return folder


# name -> (write_folder arguments, whether transformers adds BOS)
FOLDERS = {
    "llama3": ({}, True),                                                   # Llama 3.x as published
    "llama3-trimmed-offsets": ({"trim_offsets": True}, True),
    # transformers ignores tokenizer_config's add_bos_token when there is a tokenizer.json
    "no-post-processor-add-bos": ({"template": None, "tok_config": {"add_bos_token": True}}, False),
    "template-add-bos-false": ({"tok_config": {"add_bos_token": False}}, True),
}


@pytest.fixture(scope="module", params=list(FOLDERS))
def folder(request, tmp_path_factory):
    kwargs, _ = FOLDERS[request.param]
    return request.param, write_folder(tmp_path_factory.mktemp("tok") / request.param, **kwargs)


def test_special_tokens_as_transformers(folder):
    transformers = pytest.importorskip("transformers")
    name, path = folder
    ours, hf = Tokenizer(path), transformers.AutoTokenizer.from_pretrained(path)
    for text in TEXTS:
        assert ours.encode(text, add_special_tokens=True) == hf(text)["input_ids"], (name, text)
        assert ours.encode(text) == hf(text, add_special_tokens=False)["input_ids"]
    assert ours.add_bos == FOLDERS[name][1] and ours.bos_id == hf.bos_token_id == 0
    assert ours.eos_id == hf.eos_token_id == 1


@pytest.mark.parametrize("dataset", ["toy", "book", "clothing"])
def test_prompts_equal_msl_with_bos(folder, dataset):
    transformers = pytest.importorskip("transformers")
    name, path = folder
    tok, hf = Tokenizer(path), transformers.AutoTokenizer.from_pretrained(path)
    b = PromptBuilder(tok, dataset)
    n_bos = 1 if FOLDERS[name][1] else 0
    for history, target in ROWS:
        p = b.build(history, target)
        assert p.ids == msl_ids(hf, msl_text(dataset, history, target), add_eos=True)
        assert b.build(history).ids == msl_ids(hf, msl_text(dataset, history), add_eos=False)
        m = b.build(history, target, mask_history=True)
        assert m.ids == msl_ids(hf, msl_text(dataset, history, target, na=True), add_eos=True)
        assert p.bos == m.bos == (0, n_bos) and p.ids[:n_bos] == [tok.bos_id] * n_bos
        # Spans still partition the ids and the target is the trie's ids for the title.
        assert p.task[0][0] == 0 and p.task[0][1] == p.history[0] == p.items[0][0]
        assert p.items[-1][1] == p.history[1] == p.task[1][0] and p.task[1][1] == p.target[0]
        assert p.ids[slice(*p.target)] == b.target_ids(target)
        assert all(f'"{t}' in tok.decode(p.ids[s:e]) for t, (s, e) in zip(history, p.items))
        assert tok.decode(p.ids[slice(*p.task[1])]).endswith("### Response:\n")


def test_llama3_closing_quote_and_newline_go_to_the_last_item(tmp_path):
    """Llama 3's split regex attaches newlines to punctuation: the token '"\\n' straddles the
    last item and the tail, and belongs to the item (the span of its first character)."""
    tok = Tokenizer(write_folder(tmp_path / "llama3"))
    p = PromptBuilder(tok, "toy").build(["Lego Classic Bricks", "Uno"], "Jenga")
    pieces = [tok.decode(p.ids[s:e]) for s, e in [*p.items, p.task[1], p.target]]
    assert pieces == [' "Lego Classic Bricks",', ' "Uno"\n', ' \n\n### Response:\n', '"Jenga"']
    assert p.bos == (0, 1) and p.ids[0] == tok.bos_id


def test_smollm_special_tokens_as_transformers(tokenizer, smollm_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(smollm_dir)
    for text in TEXTS:
        assert tokenizer.encode(text, add_special_tokens=True) == hf(text)["input_ids"]
    assert tokenizer.special_prefix == [] and not tokenizer.add_bos    # SmolLM2 adds no BOS


def test_tokenizer_adding_eos_is_refused_for_prompts(tmp_path):
    transformers = pytest.importorskip("transformers")
    path = write_folder(tmp_path / "eos", template=f"{BOS} $A {EOS}")
    tok, hf = Tokenizer(path), transformers.AutoTokenizer.from_pretrained(path)
    assert tok.encode("Hi", add_special_tokens=True) == hf("Hi")["input_ids"] == [0, *tok.encode("Hi"), 1]
    with pytest.raises(ValueError, match="appends"):
        PromptBuilder(tok, "toy")
