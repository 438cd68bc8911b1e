"""Time one LoRA training step (forward, backward, AdamW) on the embedded model: nanogdrt vs
transformers + PEFT, side by side in one run, fp32 and bf16.

Workload (the shape of a GDRT step): batch 8 x 160 tokens, loss on the last 16 tokens of each
row (the target title), LoRA r=8 / alpha=16 / dropout 0.05 on q_proj and v_proj.
The reference computes the loss the way a transformers user does: `labels` with -100 outside
the target, so it builds logits for all 160 positions. nanogdrt builds them only at the 16.

    python bench/bench_train.py [--steps 5] [--dtypes fp32 bf16]
Run it alone: the machine has 2 cores and any other load skews the numbers.
"""

import argparse
import platform
import time

import torch

from nanogdrt.checkpoint import ensure_embedded_checkpoint
from nanogdrt.llama import Llama
from nanogdrt.lora import LoRAConfig, inject_lora, lora_parameters
from nanogdrt.loss import sft_loss, token_nll

B, T, TARGET = 8, 160, 16
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def nanogdrt_step_fn(path, dtype, device="cpu"):
    model = Llama.from_pretrained(path, dtype=dtype, device=device)
    inject_lora(model, LoRAConfig())
    model.train()
    opt = torch.optim.AdamW(lora_parameters(model), lr=1e-4)

    target_mask = torch.zeros(B, T, dtype=torch.bool, device=device)
    target_mask[:, T - TARGET:] = True

    def step(ids):
        hidden = model.hidden_states(ids)                                  # (B, T, C)
        loss = sft_loss(token_nll(model.logits, hidden, ids, target_mask).nll)  # as train.py: (128, V) logits
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()
    return step


def reference_step_fn(path, dtype, device="cpu"):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(path).to(device=device, dtype=dtype)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                             target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(ids):
        labels = torch.full_like(ids, -100)
        labels[:, T - TARGET:] = ids[:, T - TARGET:]
        loss = model(input_ids=ids, labels=labels, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()
    return step


def tokens_per_second(step, steps, warmup=2, device="cpu"):
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(100, 40000, (B, T), generator=g).to(device) for _ in range(warmup + steps)]
    for ids in batches[:warmup]:
        step(ids)
    start = time.perf_counter()
    for ids in batches[warmup:]:
        step(ids)
    return B * T * steps / (time.perf_counter() - start)


def matmul_gflops(dtype, m=1280, k=576, n=1536, reps=20):
    """This machine's speed on a matmul of the model's MLP shape (the ceiling for a step)."""
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
    for _ in range(3):
        a @ b.T
    start = time.perf_counter()
    for _ in range(reps):
        a @ b.T
    return 2 * m * k * n * reps / (time.perf_counter() - start) / 1e9


def profile_one_step(path, dtype):
    """Where one nanogdrt step spends its time (torch.profiler, top operators)."""
    from torch.profiler import ProfilerActivity, profile

    step = nanogdrt_step_fn(path, dtype)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(100, 40000, (B, T), generator=g) for _ in range(3)]
    step(batches[0])
    step(batches[1])
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(batches[2])
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per configuration")
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    parser.add_argument("--profile", action="store_true", help="also profile one nanogdrt step per dtype")
    args = parser.parse_args()
    path = ensure_embedded_checkpoint()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print("matmul (1280x576 @ 576x1536): " + ", ".join(
        f"{name} {matmul_gflops(DTYPES[name]):.0f} GFLOP/s" for name in args.dtypes))
    print(f"LoRA step, batch {B} x {T} tokens, loss on last {TARGET}; tokens/s over {args.steps} steps")
    print(f"{'dtype':6} {'transformers+peft':>18} {'nanogdrt':>10} {'ratio':>7}")
    for name in args.dtypes:
        torch.manual_seed(0)
        ref = tokens_per_second(reference_step_fn(path, DTYPES[name]), args.steps)
        torch.manual_seed(0)
        ours = tokens_per_second(nanogdrt_step_fn(path, DTYPES[name]), args.steps)
        print(f"{name:6} {ref:18.1f} {ours:10.1f} {ours / ref:6.2f}x", flush=True)
    for name in args.dtypes if args.profile else []:
        profile_one_step(path, DTYPES[name])


if __name__ == "__main__":
    main()
