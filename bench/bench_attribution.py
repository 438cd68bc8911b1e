"""Feature-ablation attribution on real Toy prompts: nanogdrt vs Captum, same numbers, side by side.

Workload: the first N test examples of Toy (10-item histories, the shape of §2.2 / §4.3) on the
embedded SmolLM2-135M in fp32; the features of nanogdrt.attribution (task head and tail, each
history item, and as prefix features the first title token, all the Fig. 2 / 7 ratios need, or
with --prefixes all every target token), text mode with the empty baseline by default. Both sides run the same nanogdrt Llama; only the attribution machinery differs.

Captum (captum.attr.FeatureAblation through LLMAttribution, `forward_in_tokens=False`, the
bridge in tests/references.py) needs one forward per feature plus one unablated forward,
each over the whole prompt + target with logits at every position, and it cannot ablate the
target, so each prefix feature j is its own run (prompt + target tokens 0..j, target j+1..).
nanogdrt runs each example in one forward pass that computes only what differs from the
unablated prompt, with logits only at the target positions.

    python -m bench.bench_attribution [--examples 20] [--prefixes first|all] [--baseline ID]
Run it alone: the machine has 2 cores and any other load skews the numbers.
"""

import argparse
import ast
import csv
import json
import platform
import time
from pathlib import Path

import torch

from nanogdrt.attribution import attribute, context_ratios
from nanogdrt.checkpoint import ensure_embedded_checkpoint
from nanogdrt.llama import Llama
from nanogdrt.prompt import PromptBuilder
from nanogdrt.tokenizer import Tokenizer
from tests.references import SEP, SegmentTokenizer, captum_attr, segments_of  # the Captum bridge the test uses

ROOT = Path(__file__).resolve().parent.parent
TOY = ROOT.parent / "shared" / "data" / "toy"


def toy_examples(n: int):
    names = json.loads((TOY / "id2name.json").read_text())
    with open(TOY / "test.csv", newline="") as f:
        rows = [ast.literal_eval(r["item_ids"]) for r, _ in zip(csv.DictReader(f), range(n))]
    return [([names[str(i)] for i in ids[:-1]], names[str(ids[-1])]) for ids in rows]


def captum_features(model, seg_tok, builder, history, title, baseline, prefixes):
    """Captum's token_attr for the same features (prefix features j in `prefixes`), in our order."""
    p = builder.build(history, title)
    segments = segments_of(builder, history)
    target = p.ids[p.target[0]:p.target[1]]
    decoded = [seg_tok.hf.decode([i]) for i in target]
    assert seg_tok.encode(SEP.join(segments + decoded)) == p.ids, "the bridge must see our ids"
    _, prompt_attr = captum_attr(model, seg_tok, segments, list(range(len(segments))), target, baseline)
    columns = [prompt_attr.float()]
    for j in prefixes:
        _, tok = captum_attr(model, seg_tok, segments + decoded[:j + 1], [len(segments) + j],
                             target[j + 1:], baseline)
        columns.append(torch.cat([torch.zeros(j + 1, 1), tok.float()]))  # t <= j: zero by definition
    return torch.cat(columns, dim=1)                                       # (n_target, F)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--examples", type=int, default=20)
    ap.add_argument("--prefixes", choices=["first", "all"], default="first",
                    help="prefix features: the first title token only (all the ratios need) or all")
    ap.add_argument("--baseline", type=int, default=None,
                    help="token mode with this baseline id (default: text mode, empty string)")
    args = ap.parse_args()
    baseline = "" if args.baseline is None else args.baseline

    from transformers import AutoTokenizer
    path = ensure_embedded_checkpoint()
    model = Llama.from_pretrained(path, dtype=torch.float32)
    tokenizer = Tokenizer(path)
    builder = PromptBuilder(tokenizer, "toy")
    seg_tok = SegmentTokenizer(AutoTokenizer.from_pretrained(path))
    examples = toy_examples(args.examples)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    mode = "text mode, baseline ''" if baseline == "" else f"token mode, baseline id {baseline}"
    print(f"{len(examples)} Toy test examples, SmolLM2-135M fp32, {mode}, prefix features: {args.prefixes}")
    all_prefixes = args.prefixes == "all"

    # Warm-up both paths once (allocator, thread pool), then time.
    attribute(model, builder.build(*examples[0]), tokenizer, baseline, all_prefixes)
    captum_attr(model, seg_tok, segments_of(builder, examples[0][0]), [0],
                builder.target_ids(examples[0][1]), baseline)

    ours_s = captum_s = max_diff = 0.0
    attributions = []
    print(f"{'ex':>3} {'tokens':>6} {'features':>8} {'nanogdrt s':>10} {'captum s':>9} {'max |diff|':>10}")
    for k, (history, title) in enumerate(examples):
        p = builder.build(history, title)
        t = time.perf_counter()
        ours = attribute(model, p, tokenizer, baseline, all_prefixes)
        t_ours = time.perf_counter() - t
        prefixes = [int(f.name[len("prefix"):]) for f in ours.features if f.kind == "prefix"]
        t = time.perf_counter()
        ref = captum_features(model, seg_tok, builder, history, title, baseline, prefixes)
        t_captum = time.perf_counter() - t
        diff = float((ours.token_attr - ref).abs().max())
        ours_s, captum_s, max_diff = ours_s + t_ours, captum_s + t_captum, max(max_diff, diff)
        attributions.append(ours)
        print(f"{k:>3} {len(p.ids):>6} {len(ours.features):>8} {t_ours:>10.2f} {t_captum:>9.2f} {diff:>10.2e}")

    r = context_ratios(attributions)
    print(f"total: nanogdrt {ours_s:.1f} s, captum {captum_s:.1f} s, speed-up {captum_s / ours_s:.1f}x; "
          f"max |diff| {max_diff:.2e} (test tolerance 1e-4)")
    print(f"ratios (untuned model): task / interaction {r.task_ratio:.2f}, "
          f"first title token / interaction {r.prefix_ratio:.2f}")


if __name__ == "__main__":
    main()
