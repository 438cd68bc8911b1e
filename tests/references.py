"""Reference implementations that the tests check nanogdrt against and the benchmarks time.

One copy, so that a benchmark times exactly the reference its test trusts:

- `hf_constrained_beam_search`: transformers' `generate` with the title trie as
  `prefix_allowed_tokens_fn`, the per-beam Python callback of the paper's code base
  (tests/test_beam.py, bench/bench_beam.py).
- The bridge to Captum's FeatureAblation through LLMAttribution (tests/test_attribution.py,
  bench/bench_attribution.py):
  * `HFLikeModel` gives a nanogdrt Llama the Hugging Face call Captum makes:
    `model.forward(input_ids=..., attention_mask=...).logits`.
  * `SegmentTokenizer` tokenizes text segment by segment, segments joined by a private-use
    character SEP. The segments (`segments_of`) are the texts of our spans (head, each item,
    tail), decoded from the prompt's ids: prompt.py cuts the joint tokenization of the whole
    text at token boundaries that are also pre-token boundaries (e.g. '",' | ' "' between
    items), so each segment tokenized on its own gives back exactly its span's ids (asserted in
    tests/test_attribution.py). A TextTemplateInput whose template joins its values by SEP
    therefore yields exactly PromptBuilder's ids, and replacing a value by "" removes exactly
    that span's ids, which is what our text-mode ablation does.
  * `captum_attr` runs Captum with `forward_in_tokens=False`: one teacher-forced forward over
    prompt + target, "original minus ablated" log-probability per target token (token_attr) and
    summed (seq_attr), the definition in nanogdrt.attribution. Text mode ablates template values;
    token mode groups a segment's tokens into one feature with a feature_mask.
  * `captum_segment_attr` runs the paper's definition (nanogdrt.attribution's "segment"
    ratios) as Captum states it: a TextTemplateInput whose values are the auxiliary text
    (head and tail, one feature through the template's `mask`) or the instruction sentence
    alone (the rest of the head fixed text), and the whole interaction list; optionally the
    first generated token appended as a third value, the rest of the title then the target.

transformers and captum are test dependencies only (pyproject's `test` extra); they are imported
inside the functions that need them, so importing this module needs neither.
"""

from types import SimpleNamespace

import torch

from nanogdrt.prompt import PromptBuilder

SEP = "\ue000"  # private-use character: never in a title, marks segment boundaries


# ----------------------------------------------------------------------------- constrained beam search

def hf_constrained_beam_search(hf_model, prompt, trie, beams, eos_id, top_k=None, length_penalty=1.0):
    """transformers' generate with the trie as prefix_allowed_tokens_fn (the per-beam Python
    callback of the paper's code base) -> (item ids, scores), best first."""
    P = len(prompt)

    def allowed(batch_id, sent):
        node = trie.walk(sent[P:].tolist())
        if node is None or node in trie.leaf_items:  # dead beams (transformers keeps some): anything
            return [eos_id]
        return trie.allowed(torch.tensor([node], device=trie.child_ptr.device)).tokens[0].tolist()

    device = hf_model.device
    out = hf_model.generate(torch.tensor([prompt], device=device),
                            attention_mask=torch.ones(1, P, dtype=torch.long, device=device),
                            num_beams=beams, num_return_sequences=top_k or beams, max_new_tokens=trie.depth,
                            length_penalty=length_penalty, do_sample=False, prefix_allowed_tokens_fn=allowed,
                            pad_token_id=eos_id, output_scores=True, return_dict_in_generate=True)
    items = [trie.leaf_items[trie.walk(s[:s.index(eos_id) + 1])][0] for s in out.sequences[:, P:].tolist()]
    return items, out.sequences_scores.float().tolist()


# ----------------------------------------------------------------------------- attribution: the bridge to Captum

class HFLikeModel(torch.nn.Module):
    def __init__(self, llama):
        super().__init__()
        self.llama = llama

    def forward(self, input_ids, attention_mask=None, **_):
        with torch.no_grad():
            return SimpleNamespace(logits=self.llama(input_ids, attention_mask))


class SegmentTokenizer:
    """A transformers tokenizer that encodes SEP-separated segments one by one (as prompt.py)."""

    def __init__(self, hf_tokenizer):
        self.hf = hf_tokenizer
        self.special = hf_tokenizer.encode("", add_special_tokens=True)  # BOS where the model has one

    def encode(self, text, add_special_tokens=True, return_tensors=None, **_):
        ids = list(self.special) if add_special_tokens else []
        for segment in text.split(SEP):
            ids += self.hf.encode(segment, add_special_tokens=False)
        return torch.tensor([ids]) if return_tensors == "pt" else ids

    def __call__(self, *args, **kwargs):  # Captum's pretty-printing of output tokens
        return self.hf(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.hf.decode(*args, **kwargs)

    def convert_ids_to_tokens(self, *args, **kwargs):
        return self.hf.convert_ids_to_tokens(*args, **kwargs)


def segments_of(builder: PromptBuilder, history: list[str]) -> list[str]:
    """The texts of the prompt's spans (head without BOS, each item, tail), from its ids."""
    p = builder.build(history)
    spans = [(p.bos[1], p.task[0][1]), *p.items, p.task[1]]
    return [builder.tokenizer.decode(p.ids[s:e]) for s, e in spans]


def captum_attr(model, seg_tok, segments, features, target_ids, baseline):
    """Captum's (seq_attr, token_attr) for the segments whose indices are in `features`."""
    from captum.attr import FeatureAblation, LLMAttribution, TextTemplateInput, TextTokenInput

    llm_attr = LLMAttribution(FeatureAblation(HFLikeModel(model)), seg_tok)
    target = torch.tensor(target_ids)
    if isinstance(baseline, str):
        def literal(s):
            return s.replace("{", "{{").replace("}", "}}")
        template = SEP.join("{}" if k in features else literal(s) for k, s in enumerate(segments))
        inp = TextTemplateInput(template, values=[segments[k] for k in features],
                                baselines=[baseline] * len(features))
        res = llm_attr.attribute(inp, target=target, forward_in_tokens=False)
        return res.seq_attr, res.token_attr
    inp = TextTokenInput(SEP.join(segments), seg_tok, baselines=baseline)
    group = [len(features)] * len(seg_tok.special)  # special tokens: one extra, ignored group
    first_col = []
    for k, s in enumerate(segments):
        n = len(seg_tok.hf.encode(s, add_special_tokens=False))
        if k in features:
            first_col.append(len(group))
        group += [features.index(k) if k in features else len(features)] * n
    res = llm_attr.attribute(inp, target=target, forward_in_tokens=False,
                             feature_mask=torch.tensor([group]))
    return res.seq_attr[first_col], res.token_attr[:, first_col]


def captum_segment_attr(model, seg_tok, builder: PromptBuilder, history: list[str], target_ids: list[int],
                        task: str = "auxiliary", with_prefix: bool = False):
    """Captum's (seq_attr, token_attr) over the features (task, interactions[, first target token]).

    task: "auxiliary" (head + tail, one feature) | "instruction" (the instruction sentence)."""
    from captum.attr import FeatureAblation, LLMAttribution, TextTemplateInput

    from nanogdrt.attribution import instruction_span

    p = builder.build(history)
    head, tail = (p.bos[1], p.task[0][1]), p.task[1]
    if task == "auxiliary":
        spans, groups = [head, p.history, tail], [0, 1, 0]
    else:
        i0, i1 = instruction_span(p, builder)
        spans, groups = [(head[0], i0), (i0, i1), (i1, head[1]), p.history, tail], [None, 0, None, 1, None]
    texts = [builder.tokenizer.decode(p.ids[s:e]) for s, e in spans]
    prompt = list(p.ids)
    if with_prefix:   # Captum cannot ablate the target: y_0 joins the prompt, y_1.. is the target
        texts.append(builder.tokenizer.decode(target_ids[:1]))
        groups.append(2)
        prompt, target_ids = prompt + list(target_ids[:1]), target_ids[1:]
    assert seg_tok.encode(SEP.join(texts)) == prompt, "bridge must see our ids"

    def literal(s):
        return s.replace("{", "{{").replace("}", "}}")
    template = SEP.join("{}" if g is not None else literal(t) for t, g in zip(texts, groups))
    values = [t for t, g in zip(texts, groups) if g is not None]
    inp = TextTemplateInput(template, values=values, baselines=[""] * len(values),
                            mask=[g for g in groups if g is not None])
    llm_attr = LLMAttribution(FeatureAblation(HFLikeModel(model)), seg_tok)
    res = llm_attr.attribute(inp, target=torch.tensor(target_ids), forward_in_tokens=False)
    # Captum scatters a group's attribution back onto each of its values: one column per group.
    mask = [g for g in groups if g is not None]
    cols = [mask.index(g) for g in sorted(set(mask))]
    return res.seq_attr[cols], res.token_attr[:, cols]
