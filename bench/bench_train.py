"""Time one LoRA training step (forward, backward, AdamW) on the embedded model:
nanogdrt (eager, and with --compile its blocks compiled) vs transformers + PEFT, side by side in
one run, on CPU or CUDA, fp32 and bf16, at one or more batch sizes.

Workload (the shape of a GDRT step): batch B x 160 tokens, loss on the last 16 tokens of each
row (the target title), LoRA r=8 / alpha=16 / dropout 0.05 on q_proj and v_proj.
The reference computes the loss the way a transformers user does: `labels` with -100 outside
the target, so it builds logits for all 160 positions. nanogdrt builds them only at the 16.

--curve-steps N also trains the three side by side for N steps from the same LoRA init on the
same batches, dropout 0 (so only arithmetic differs), and prints how far their losses drift.

    python -m bench.bench_train [--steps 5] [--dtypes fp32 bf16]
    python -m bench.bench_train --device cuda --dtypes bf16 --batch-sizes 16 32 --compile --curve-steps 50
On CPU run it alone: the machine has 2 cores and any other load skews the numbers.
"""

import argparse
import platform
import time

import torch

from nanogdrt.checkpoint import ensure_embedded_checkpoint
from nanogdrt.llama import Llama, compile_blocks
from nanogdrt.lora import LoRAConfig, adapter_state_dict, copy_adapter_weights, inject_lora, lora_parameters
from nanogdrt.loss import sft_loss, token_nll

T, TARGET = 160, 16
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def nanogdrt_model(path, dtype, device, dropout=0.05, compile=False):
    model = Llama.from_pretrained(path, dtype=dtype, device=device)
    inject_lora(model, LoRAConfig(dropout=dropout))
    if compile:
        compile_blocks(model)
    return model.train()


def nanogdrt_step_fn(model):
    opt = torch.optim.AdamW(lora_parameters(model), lr=1e-4)

    def step(ids):
        B = ids.shape[0]
        target_mask = torch.zeros(B, T, dtype=torch.bool, device=ids.device)
        target_mask[:, T - TARGET:] = True
        hidden = model.hidden_states(ids)                                  # (B, T, C)
        loss = sft_loss(token_nll(model.logits, hidden, ids, target_mask).nll)  # as train.py: (B*16, V) logits
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()
    return step


def reference_model(path, dtype, device, dropout=0.05):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(path).to(device=device, dtype=dtype)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout,
                                             target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    return model.train()


def reference_step_fn(model):
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


def random_batches(n, batch_size, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(100, 40000, (batch_size, T), generator=g).to(device) for _ in range(n)]


def tokens_per_second(step, steps, batch_size, device, warmup=3):
    """Warm-up steps first (a compiled model compiles there), then `steps` timed ones.
    Every step ends in loss.item(), which waits for the GPU, so wall time is device time."""
    batches = random_batches(warmup + steps, batch_size, device)
    for ids in batches[:warmup]:
        step(ids)
    start = time.perf_counter()
    for ids in batches[warmup:]:
        step(ids)
    return batch_size * T * steps / (time.perf_counter() - start)


def loss_curves(path, dtype, device, steps, batch_size, compile):
    """Losses of `steps` steps from one LoRA init, dropout 0: nanogdrt eager (and compiled), PEFT."""
    from peft import set_peft_model_state_dict

    batches = random_batches(steps, batch_size, device, seed=1)
    torch.manual_seed(0)
    init = adapter_state_dict(nanogdrt_model(path, dtype, "cpu", dropout=0.0))  # PEFT's key names
    variants = [("nanogdrt", False)] + ([("nanogdrt+compile", True)] if compile else [])
    curves = {}
    for name, compiled in variants:
        model = nanogdrt_model(path, dtype, device, dropout=0.0, compile=compiled)
        copy_adapter_weights(model, init)
        step = nanogdrt_step_fn(model)
        curves[name] = [step(ids) for ids in batches]
    ref = reference_model(path, dtype, device, dropout=0.0)
    set_peft_model_state_dict(ref, {k: v.to(device) for k, v in init.items()})
    step = reference_step_fn(ref)
    curves["transformers+peft"] = [step(ids) for ids in batches]
    return curves


def matmul_gflops(dtype, device, m=1280, k=576, n=1536, reps=20):
    """This machine's speed on a matmul of the model's MLP shape (the ceiling for a step)."""
    a, b = torch.randn(m, k, dtype=dtype, device=device), torch.randn(n, k, dtype=dtype, device=device)
    for _ in range(3):
        a @ b.T
    synchronize(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b.T
    synchronize(device)
    return 2 * m * k * n * reps / (time.perf_counter() - start) / 1e9


def is_cuda(device) -> bool:
    return str(device).startswith("cuda")


def synchronize(device):
    if is_cuda(device):
        torch.cuda.synchronize()


def profile_one_step(path, dtype, device, batch_size):
    """Where one nanogdrt step spends its time (torch.profiler, top operators)."""
    from torch.profiler import ProfilerActivity, profile

    step = nanogdrt_step_fn(nanogdrt_model(path, dtype, device))
    batches = random_batches(3, batch_size, device)
    step(batches[0])
    step(batches[1])
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if is_cuda(device) else [])
    with profile(activities=activities) as prof:
        step(batches[2])
    sort = "self_cuda_time_total" if is_cuda(device) else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=12))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per configuration")
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[8], metavar="B")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--model", help="a Llama folder (config.json + safetensors); default: the embedded model")
    parser.add_argument("--compile", action="store_true",
                        help="add a column: nanogdrt with its blocks compiled (llama.compile_blocks)")
    parser.add_argument("--curve-steps", type=int, default=0, metavar="N",
                        help="also train N steps from one init, dropout 0, and compare the loss curves")
    parser.add_argument("--profile", action="store_true", help="also profile one nanogdrt step per dtype")
    args = parser.parse_args()
    if is_cuda(args.device) and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False on this machine")
    path = args.model or ensure_embedded_checkpoint()
    where = (torch.cuda.get_device_name() if is_cuda(args.device)
             else f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(f"torch {torch.__version__}, {args.device}: {where}")
    print("matmul (1280x576 @ 576x1536): " + ", ".join(
        f"{name} {matmul_gflops(DTYPES[name], args.device):.0f} GFLOP/s" for name in args.dtypes))
    print(f"LoRA step, B x {T} tokens, loss on last {TARGET}; tokens/s over {args.steps} steps")
    columns = ["transformers+peft", "nanogdrt"] + (["nanogdrt+compile"] if args.compile else [])
    print(f"{'dtype':6} {'B':>3} " + " ".join(f"{c:>17}" for c in columns) + "  ratio(s) over transformers+peft")
    for name in args.dtypes:
        dtype = DTYPES[name]
        for batch_size in args.batch_sizes:
            speeds = []
            for column in columns:
                torch.manual_seed(0)
                model = (reference_model(path, dtype, args.device) if column == "transformers+peft"
                         else nanogdrt_model(path, dtype, args.device, compile=column == "nanogdrt+compile"))
                step = reference_step_fn(model) if column == "transformers+peft" else nanogdrt_step_fn(model)
                speeds.append(tokens_per_second(step, args.steps, batch_size, args.device))
                del model, step
                if is_cuda(args.device):
                    torch.cuda.empty_cache()
            ratios = " ".join(f"{v / speeds[0]:.2f}x" for v in speeds[1:])
            print(f"{name:6} {batch_size:3d} " + " ".join(f"{v:17.1f}" for v in speeds) + f"  {ratios}",
                  flush=True)
    for name in args.dtypes if args.curve_steps else []:
        batch_size = args.batch_sizes[-1]
        curves = loss_curves(path, DTYPES[name], args.device, args.curve_steps, batch_size, args.compile)
        ref = curves["transformers+peft"]
        print(f"loss curve, {name}, B {batch_size}, {args.curve_steps} steps, dropout 0, one LoRA init: "
              f"first {ref[0]:.4f}, last {ref[-1]:.4f} (transformers+peft)")
        for column, losses in curves.items():
            drift = max(abs(a - b) for a, b in zip(losses, ref))
            print(f"  {column:18} last {losses[-1]:.4f}  max |loss - transformers+peft| {drift:.4f}", flush=True)
    for name in args.dtypes if args.profile else []:
        profile_one_step(path, DTYPES[name], args.device, args.batch_sizes[0])


if __name__ == "__main__":
    main()
