"""Constrained beam search, nanogdrt vs transformers `generate`, on real Toy test users.

For each dtype: seconds per user for nanogdrt.beam.beam_search (batched, shared prompt cache) and
for transformers' generate(num_beams, num_return_sequences, prefix_allowed_tokens_fn=<trie>) on
the same prompts, the share of users whose top-K lists agree (ties within 1e-4 aside), the mean
overlap of the two top-K sets (informative in bf16, where kernel rounding differs by ~1e-2 and
exact agreement is not expected), and the projected time for the whole test split. Run it alone on the machine: timings are wall-clock.

    python -m bench.bench_beam                 # 64 users, fp32 and bf16
    python -m bench.bench_beam --users 2 --dtypes fp32
    python -m bench.bench_beam --dtypes fp32 --projection-users 320   # + nanogdrt alone on 320 users
    python -m bench.bench_beam --dtypes fp32 --users 32 --batch-size 16 --profile   # where nanogdrt's time goes
    python -m bench.bench_beam --device cuda --projection-users 4794   # on a GPU, + the whole split

With more users than `--batch-size` slots, finished users' slots are refilled (continuous
batching), as on the whole split; the last slots drain alone, so a short run overstates the
per-user time a little. `--projection-users N` times nanogdrt alone on the first N users to project
the whole split from a longer run.
"""

import argparse
import ast
import csv
import json
import time
from pathlib import Path

import torch

from nanogdrt.beam import beam_search
from nanogdrt.checkpoint import ensure_embedded_checkpoint
from nanogdrt.llama import Llama
from nanogdrt.prompt import PromptBuilder
from nanogdrt.tokenizer import Tokenizer
from nanogdrt.trie import Trie
from tests.references import hf_constrained_beam_search   # the transformers reference the test checks against

ROOT = Path(__file__).resolve().parent.parent
TOY_DIR = ROOT.parent / "shared" / "data" / "toy"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TIE_TOL = 1e-4


def same_ranking(ids_a, scores_a, ids_b, scores_b) -> bool:
    """Equal lists, except that items whose scores tie within TIE_TOL may swap."""
    if len(ids_a) != len(ids_b):
        return False
    for i, (a, s) in enumerate(zip(ids_a, scores_a)):
        if a != ids_b[i]:
            j = ids_b.index(a) if a in ids_b else len(ids_b) - 1
            if abs(s - scores_b[j]) >= TIE_TOL:
                return False
    return True


def profile_search(model, prompts, trie, args):
    """Where nanogdrt's search spends its time, by operator, and how many beam rows it decodes."""
    from torch.profiler import ProfilerActivity, profile

    from nanogdrt.tree_cache import BeamTreeCache
    live_rows, hidden_states = [0], model.hidden_states

    def counting_hidden_states(ids, *rest, context=None, **kw):
        if isinstance(context, BeamTreeCache):  # a decoding step: ids (1, M), one per beam fed (live)
            live_rows[0] += ids.shape[1]
        return hidden_states(ids, *rest, context=context, **kw)

    model.hidden_states = counting_hidden_states
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        beam_search(model, prompts, trie, beams=args.beams, top_k=args.top_k,
                    length_penalty=args.length_penalty, batch_size=args.batch_size)
        elapsed = time.perf_counter() - t0
    print(f"nanogdrt under the profiler: {elapsed / len(prompts):.3f} s/user; "
          f"{live_rows[0] / len(prompts):.0f} beam rows decoded per user (live beams; at most 10 per step with beam 10)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=64, help="first N users of test.csv")
    p.add_argument("--dtypes", default="fp32,bf16",
                   help="comma-separated: fp32, bf16 ('' with --projection-users: nanogdrt alone)")
    p.add_argument("--beams", type=int, default=10)
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--length-penalty", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=32, help="users per nanogdrt batch")
    p.add_argument("--data", type=Path, default=TOY_DIR)
    p.add_argument("--model", type=Path, default=None,
                   help="Hugging Face Llama folder (default: the embedded SmolLM2-135M checkpoint)")
    p.add_argument("--device", default="cpu", help="cpu or cuda: both implementations run there")
    p.add_argument("--projection-users", type=int, default=0,
                   help="also time nanogdrt alone on the first N users (fp32) for the whole-split projection")
    p.add_argument("--profile", action="store_true",
                   help="profile nanogdrt's search (torch.profiler, top ops by self CPU time) instead of comparing")
    args = p.parse_args()
    import transformers

    model_dir = args.model or ensure_embedded_checkpoint()
    device = torch.device(args.device)
    builder = PromptBuilder(Tokenizer(model_dir), "toy")
    titles = {int(k): v for k, v in json.loads((args.data / "id2name.json").read_text()).items()}
    trie = Trie.from_titles(titles, builder)
    with open(args.data / "test.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    n_total = len(rows)
    all_prompts = [builder.build([titles[i] for i in ast.literal_eval(r["item_ids"])[:-1]]).ids
                   for r in rows[:max(args.users, args.projection_users)]]
    prompts = all_prompts[:args.users]
    print(f"{len(prompts)} users (of {n_total}), beams={args.beams}, top_k={args.top_k}, "
          f"length_penalty={args.length_penalty}, device={args.device}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, "
          + (torch.cuda.get_device_name(device) if device.type == "cuda" else f"torch threads={torch.get_num_threads()}"))
    shared = next((i for i in range(min(map(len, prompts))) if len({p[i] for p in prompts}) > 1), 0)
    print(f"prompt tokens per user: mean {sum(map(len, prompts)) / len(prompts):.1f}, the first {shared} "
          "common to all (prefilled once per run)")
    if args.profile:
        model = Llama.from_pretrained(model_dir, dtype=DTYPES[args.dtypes.split(",")[0]], device=device)
        profile_search(model, prompts, trie, args)
        return
    print(f"{'dtype':6} {'nanogdrt s/user':>16} {'transformers s/user':>20} {'speed-up':>9} "
          f"{'same top-K':>11} {'overlap':>8} {'nanogdrt, all users':>20} {'transformers, all':>18}")
    for name in filter(None, args.dtypes.split(",")):
        dtype = DTYPES[name]
        ours = Llama.from_pretrained(model_dir, dtype=dtype, device=device)
        if device.type == "cuda":  # the first CUDA calls load kernels: warm up outside the timing
            beam_search(ours, prompts[:2], trie, beams=args.beams, top_k=args.top_k, batch_size=2)
        t0 = time.perf_counter()
        recs = beam_search(ours, prompts, trie, beams=args.beams, top_k=args.top_k,
                           length_penalty=args.length_penalty, batch_size=args.batch_size)
        t_ours = (time.perf_counter() - t0) / len(prompts)  # results are Python lists: synchronised
        del ours
        hf = transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
        with torch.no_grad():
            if device.type == "cuda":
                hf_constrained_beam_search(hf, prompts[0], trie, args.beams, builder.tokenizer.eos_id,
                                           args.top_k, args.length_penalty)
            t0, agree, overlap = time.perf_counter(), 0, 0.0
            for prompt, rec in zip(prompts, recs):
                ids, scores = hf_constrained_beam_search(hf, prompt, trie, args.beams, builder.tokenizer.eos_id,
                                                         args.top_k, args.length_penalty)
                agree += same_ranking(rec.item_ids, rec.scores, ids, scores)
                overlap += len(set(rec.item_ids) & set(ids)) / len(ids)
        t_hf = (time.perf_counter() - t0) / len(prompts)
        del hf
        print(f"{name:6} {t_ours:16.3f} {t_hf:20.3f} {t_hf / t_ours:8.1f}x {agree / len(prompts):11.0%} {overlap / len(prompts):8.0%} "
              f"{t_ours * n_total / 60:17.1f} min {t_hf * n_total / 3600:15.2f} h")

    if args.projection_users:
        ours = Llama.from_pretrained(model_dir, dtype=torch.float32, device=device)
        t0 = time.perf_counter()
        beam_search(ours, all_prompts, trie, beams=args.beams, top_k=args.top_k,
                    length_penalty=args.length_penalty, batch_size=args.batch_size, progress=True)
        per_user = (time.perf_counter() - t0) / len(all_prompts)
        print(f"nanogdrt alone, fp32, {len(all_prompts)} users: {per_user:.3f} s/user -> "
              f"whole split ({n_total} users) {per_user * n_total / 60:.1f} min")


if __name__ == "__main__":
    main()
