"""CUDA checks for a machine with a GPU (not part of the test suite; the suite needs no GPU).

The embedded checkpoint is too large to ship to a remote GPU box here, so the checks use a
randomly initialised model of the same shape (SmolLM2-135M: 30 layers, GQA 9/3 heads, tied
embeddings) with the real tokenizer from `--tokenizer-dir`:

  1. logits on CUDA (fp32) equal CPU fp32 and transformers on CUDA; bf16 close
  2. KV-cached decoding on CUDA equals a full forward
  3. constrained beam search on CUDA returns the same lists as on CPU
  4. LoRA training step, bf16 on CUDA: nanogdrt vs transformers+PEFT tokens/s (as bench_train)
  5. `train.py --device cuda` end to end on the synthetic data, both methods
  6. beam search speed, fp32 vs bf16, with and without cuDNN attention in the beam tree

    python -m experiments.gpu.device_check --tokenizer-dir DIR [--out DIR]
"""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from nanogdrt.llama import Llama, LlamaConfig

ROOT = Path(__file__).resolve().parents[2]

RESULTS = {}


def check(name):
    def wrap(fn):
        def run(*args):
            start = time.perf_counter()
            try:
                RESULTS[name] = {"ok": True, **(fn(*args) or {})}
            except Exception as e:  # a failed check must not hide the others
                RESULTS[name] = {"ok": False, "error": f"{type(e).__name__}: {e}",
                                 "trace": traceback.format_exc()[-1500:]}
            RESULTS[name]["seconds"] = round(time.perf_counter() - start, 1)
            print(name, json.dumps(RESULTS[name])[:600], flush=True)
        return run
    return wrap


def make_model_dir(tokenizer_dir: Path, out: Path) -> Path:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, out / name)
    cfg = json.loads((out / "config.json").read_text())
    torch.manual_seed(0)
    model = Llama(LlamaConfig.from_hf(cfg))
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(out / "model.safetensors"))
    return out


@check("1_logits")
def logits(model_dir):
    from transformers import LlamaForCausalLM

    ids = torch.randint(100, 40000, (4, 96))
    cpu = Llama.from_pretrained(model_dir)
    gpu = Llama.from_pretrained(model_dir, device="cuda")
    gpu16 = Llama.from_pretrained(model_dir, dtype=torch.bfloat16, device="cuda")
    hf = LlamaForCausalLM.from_pretrained(model_dir).float().cuda().eval()
    with torch.no_grad():
        a, b = cpu(ids), gpu(ids.cuda()).cpu()
        c = hf(ids.cuda()).logits.cpu()
        d = gpu16(ids.cuda()).float().cpu()
    return {"cuda_vs_cpu": float((a - b).abs().max()), "cuda_vs_transformers": float((b - c).abs().max()),
            "bf16_vs_fp32": float((d - b).abs().max()), "logit_scale": float(a.abs().max())}


@check("2_kv_cache")
def kv_cache(model_dir):
    m = Llama.from_pretrained(model_dir, device="cuda")
    ids = torch.randint(100, 40000, (2, 40), device="cuda")
    with torch.no_grad():
        full = m(ids)
        cache = m.new_cache(2, 40)
        inc = torch.cat([m(ids[:, :30], context=cache)] + [m(ids[:, t:t + 1], context=cache) for t in range(30, 40)], 1)
    return {"max_diff": float((full - inc).abs().max())}


def synthetic_prompts_and_trie(model_dir, n_users):
    """Prompt ids of the first `n_users` synthetic test users and the catalogue's title trie."""
    from nanogdrt.data import load_dataset
    from nanogdrt.prompt import PromptBuilder
    from nanogdrt.tokenizer import Tokenizer
    from nanogdrt.trie import Trie

    ds = load_dataset("synthetic", test_samples=n_users)
    builder = PromptBuilder(Tokenizer(model_dir), "synthetic")
    prompts = [builder.build([ds.titles[i] for i in x.history]).ids for x in ds.test]
    return prompts, Trie.from_titles(ds.titles, builder)


@check("3_beam_search")
def beam(model_dir):
    from nanogdrt.beam import beam_search

    prompts, trie = synthetic_prompts_and_trie(model_dir, 8)
    cpu = Llama.from_pretrained(model_dir)
    gpu = Llama.from_pretrained(model_dir, device="cuda")
    t = time.perf_counter()
    a = beam_search(cpu, prompts, trie.to("cpu"), beams=10, batch_size=8)
    t_cpu = time.perf_counter() - t
    t = time.perf_counter()
    b = beam_search(gpu, prompts, trie, beams=10, batch_size=8)
    torch.cuda.synchronize()
    t_gpu = time.perf_counter() - t
    same = sum(x.item_ids == y.item_ids for x, y in zip(a, b))
    diff = max(abs(s - u) for x, y in zip(a, b) for s, u in zip(x.scores, y.scores))
    return {"users": len(prompts), "same_lists": same, "max_score_diff": diff,
            "cpu_s_per_user": t_cpu / len(prompts), "cuda_s_per_user": t_gpu / len(prompts)}


@check("4_train_step")
def train_step(model_dir):
    from bench import bench_train   # the benchmark's own step functions (bench/ beside experiments/)

    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        speed = {}
        for impl, make_step in (("transformers_peft", bench_train.reference_step_fn),
                                ("nanogdrt", bench_train.nanogdrt_step_fn)):
            step = make_step(model_dir, dtype, "cuda")
            speed[impl] = bench_train.tokens_per_second(lambda ids: _synced(step, ids), 10, device="cuda")
        out[name] = {k: round(v) for k, v in speed.items()}
        out[name]["ratio"] = round(speed["nanogdrt"] / speed["transformers_peft"], 2)
    return out


def _synced(step, ids):
    loss = step(ids)  # .item() inside the step already waits for the GPU
    torch.cuda.synchronize()
    return loss


@check("5_train_py_cuda")
def train_py(model_dir, out):
    runs = {}
    for method in ("sft", "gdrt"):
        cmd = [sys.executable, str(ROOT / "train.py"), "--model", str(model_dir), "--device", "cuda",
               "--method", method, "--epochs", "1", "--train-samples", "64", "--valid-users", "16",
               "--test-users", "32", "--out", str(out / f"run-{method}")]
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if p.returncode:
            raise RuntimeError(p.stderr[-1500:])
        res = json.loads((out / f"run-{method}" / "results.json").read_text())
        runs[method] = {"test": {k: round(v, 4) for k, v in res["test"].items() if isinstance(v, float)},
                        "wall_times": {k: round(v, 1) for k, v in res["wall_times"].items()}}
    return runs


@check("6_beam_dtypes")
def beam_dtypes(model_dir):
    """s/user of beam search over 64 synthetic users in fp32 and bf16; bf16 also with cuDNN
    attention allowed in the tree cache (what tree_cache.NOT_CUDNN keeps out, see there)."""
    from torch.nn.attention import SDPBackend

    from nanogdrt import tree_cache
    from nanogdrt.beam import beam_search

    prompts, trie = synthetic_prompts_and_trie(model_dir, 64)
    out, default = {}, list(tree_cache.NOT_CUDNN)
    for name, dtype, backends in (("fp32", torch.float32, default), ("bf16", torch.bfloat16, default),
                                  ("bf16_cudnn_allowed", torch.bfloat16, default + [SDPBackend.CUDNN_ATTENTION])):
        tree_cache.NOT_CUDNN[:] = backends
        model = Llama.from_pretrained(model_dir, dtype=dtype, device="cuda")
        beam_search(model, prompts[:4], trie, batch_size=4)  # warm-up
        torch.cuda.synchronize()
        t = time.perf_counter()
        beam_search(model, prompts, trie, batch_size=32)
        torch.cuda.synchronize()
        out[name + "_s_per_user"] = round((time.perf_counter() - t) / len(prompts), 4)
    tree_cache.NOT_CUDNN[:] = default
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer-dir", type=Path, required=True)
    p.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp()))
    args = p.parse_args()
    print(torch.__version__, torch.cuda.get_device_name(0), flush=True)
    import transformers
    RESULTS["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__,
                           "gpu": torch.cuda.get_device_name(0)}
    model_dir = make_model_dir(args.tokenizer_dir, args.out / "random-smollm2-shape")
    logits(model_dir)
    kv_cache(model_dir)
    beam(model_dir)
    train_step(model_dir)
    train_py(model_dir, args.out)
    beam_dtypes(model_dir)
    (args.out / "device_check.json").write_text(json.dumps(RESULTS, indent=1))


if __name__ == "__main__":
    main()
