"""LoRA by hand: low-rank adapters on named linear layers, saved and loaded in PEFT's format.

LoRA (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models", Eq. 3) freezes a
pretrained weight W (out, in) and learns a low-rank update, scaled by alpha / r:

    h = W x + (alpha / r) * B A x,        A: (r, in),  B: (out, r)

A starts as PEFT's default (`init_lora_weights=True`): kaiming-uniform with a = sqrt(5), the
same as nn.Linear's own init; B starts at zero, so a freshly injected model computes exactly
what the base model computes (the minLoRA "starts as a no-op" property). Dropout is applied to
the input of the LoRA path only, as in PEFT.

Design: `LoRALinear` *is* an nn.Linear (a subclass) that adopts the base layer's own `weight`
and `bias` Parameters (no copy), and adds two bias-free nn.Linear children `lora_A`, `lora_B`.
So after `inject_lora` the model's state dict keeps every base key unchanged
(`model.layers.0.self_attn.q_proj.weight`) and only gains `...q_proj.lora_A.weight` /
`...q_proj.lora_B.weight`, which are PEFT's names minus the `base_model.model.` prefix that
PEFT's wrapper (PeftModelForCausalLM -> LoraModel -> the HF model) adds on disk. To load base
weights into an injected model, use `load_state_dict(..., strict=False)` or load before injecting.

`set_lora_enabled` / `lora_disabled` switch every update off (the base model, exactly) and back
on, as PEFT's `disable_adapter`; `load_adapter` into an injected model swaps one adapter for
another with the same targets (PEFT keeps several by name and picks one with `set_adapter`).

This module knows only modules and names; nothing about recommendation.
"""

import json
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanogdrt.files import atomic_path

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."  # PeftModelForCausalLM.base_model (LoraModel).model (the HF model)

# adapter_config.json fields that do not change the forward pass of a loaded adapter (init
# recipes, bookkeeping). Every other field must be read below or hold a neutral value
# (None / false / {} / []); anything else is a LoRA variant nanogdrt does not implement.
IGNORED_CONFIG_FIELDS = {
    "base_model_name_or_path", "revision", "inference_mode", "init_lora_weights", "peft_version",
    "auto_mapping", "megatron_core", "qalora_group_size", "layers_pattern", "loftq_config",
    "eva_config", "corda_config", "lora_ga_config", "runtime_config", "ensure_weight_tying",
}


@dataclass
class LoRAConfig:
    r: int = 8
    alpha: float = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")  # suffixes of module names, as in PEFT

    def __post_init__(self):
        self.target_modules = tuple(self.target_modules)
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoRAConfig.r must be a positive integer, got {self.r!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRAConfig.dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ValueError("LoRAConfig.target_modules is empty")


class LoRALinear(nn.Linear):
    """nn.Linear plus a low-rank update. Shares (does not copy) the base layer's weight and bias."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float):
        nn.Module.__init__(self)  # skip nn.Linear.__init__: it would allocate and init a new weight
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        kw = dict(bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Linear(self.in_features, r, **kw)   # weight (r, in)
        self.lora_B = nn.Linear(r, self.out_features, **kw)  # weight (out, r)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's init_lora_weights=True
        nn.init.zeros_(self.lora_B.weight)                            # B = 0: starts as a no-op
        self.r, self.scale, self.dropout_p = r, alpha / r, dropout
        self.merged = False
        self.enabled = True  # False: the base layer alone (set_lora_enabled, lora_disabled)

    def forward(self, x):
        out = F.linear(x, self.weight, self.bias)  # (..., out)
        if self.merged or not self.enabled:
            return out  # merged: W already holds W + scale * B A; disabled: the base model
        if self.dropout_p > 0 and self.training:
            x = F.dropout(x, self.dropout_p, training=True)
        # Two thin matmuls through rank r. The scale multiplies the small (..., r) tensor rather
        # than the (..., out) one, and addmm fuses "out +" into the second GEMM: no extra pass
        # over the output. Same value as PEFT's `out + lora_B(lora_A(dropout(x))) * scaling`.
        h = F.linear(x, self.lora_A.weight) * self.scale                 # (..., r)
        out2d = torch.addmm(out.reshape(-1, self.out_features),
                            h.reshape(-1, self.r), self.lora_B.weight.t())  # (N, out)
        return out2d.view(out.shape)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.weight @ self.lora_A.weight) * self.scale    # (out, in)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, r={self.r}, scale={self.scale:g}, "
                f"dropout={self.dropout_p:g}, merged={self.merged}, enabled={self.enabled}")


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """{module name: LoRALinear} in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def find_targets(model: nn.Module, target_modules) -> dict[str, nn.Linear]:
    """{name: nn.Linear} of the modules a list of targets selects; every target must match.

    A target matches a module named exactly `target` or ending in `.target` (PEFT's rule for a
    list of names). A target that matches nothing fails: a typo would otherwise train nothing.
    """
    found, matched = {}, set()
    for name, module in model.named_modules():
        hits = [t for t in target_modules if name == t or name.endswith("." + t)]
        if not hits:
            continue
        if not isinstance(module, nn.Linear):
            raise ValueError(f"target module {name!r} is a {type(module).__name__}, "
                             f"LoRA here wraps nn.Linear only")
        found[name] = module
        matched.update(hits)
    missing = [t for t in target_modules if t not in matched]
    if missing:
        linear = sorted({n.rpartition(".")[2] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"target_modules {missing} match no module of the model "
                         f"(its linear layers end in: {linear})")
    return found


def inject_lora(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Wrap the target nn.Linear layers in LoRALinear; freeze every non-LoRA parameter.

    Returns the wrapped module names. The model is left untouched if anything fails.
    """
    if lora_modules(model):
        raise ValueError("model already has LoRA layers; inject_lora once per model")
    targets = find_targets(model, config.target_modules)
    for name, module in targets.items():
        parent_name, _, child = name.rpartition(".")
        # The new layer takes the mode of the layer it wraps: an eval-mode model stays in eval
        # mode (no LoRA dropout when decoding), as PEFT's injection leaves it.
        setattr(model.get_submodule(parent_name), child,
                LoRALinear(module, config.r, config.alpha, config.dropout).train(module.training))
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_A." in name or ".lora_B." in name)
    return list(targets)


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable LoRA tensors (A and B of every wrapped layer), for the optimizer."""
    return [p for m in lora_modules(model).values() for p in (m.lora_A.weight, m.lora_B.weight)]


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A snapshot (cloned) of the LoRA weights under PEFT's on-disk key names."""
    state = {}
    for name, m in lora_modules(model).items():
        state[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A.weight.detach().clone()  # (r, in)
        state[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B.weight.detach().clone()  # (out, r)
    return state


@torch.no_grad()
def merge_lora(model: nn.Module) -> None:
    """W <- W + scale * B A in every LoRA layer; the forward is then the base matmul only.

    For inference: while merged, the LoRA path is skipped, so A and B get no gradient.
    """
    for m in lora_modules(model).values():
        if not m.enabled:
            raise ValueError("LoRA layers are disabled; set_lora_enabled(model, True) before merging")
    for m in lora_modules(model).values():
        if not m.merged:
            m.weight += m.delta_weight().to(m.weight.dtype)
            m.merged = True


@torch.no_grad()
def unmerge_lora(model: nn.Module) -> None:
    """Undo merge_lora: W <- W - scale * B A (equal to the original W up to rounding)."""
    for m in lora_modules(model).values():
        if m.merged:
            m.weight -= m.delta_weight().to(m.weight.dtype)
            m.merged = False


def set_lora_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch every LoRA update on or off, as PEFT's enable/disable_adapter_layers do.

    Off, the model computes the base model exactly (A and B are kept, and get no gradient). A
    merged update is unmerged first, as PEFT does, since a merged W would still carry it."""
    if not enabled:
        unmerge_lora(model)
    for m in lora_modules(model).values():
        m.enabled = enabled


@contextmanager
def lora_disabled(model: nn.Module):
    """`with lora_disabled(model):` the base model inside, the adapter back on exit; PEFT's
    `with peft_model.disable_adapter():`. To swap adapters, `load_adapter` another folder."""
    before = {name: m.enabled for name, m in lora_modules(model).items()}
    set_lora_enabled(model, False)
    try:
        yield model
    finally:
        for name, m in lora_modules(model).items():
            m.enabled = before.get(name, True)


# ----------------------------------------------------------------------------- PEFT format on disk

def peft_config_dict(config: LoRAConfig, base_model_name_or_path: str | None) -> dict:
    """The adapter_config.json that PEFT's LoraConfig reads back as the same plain LoRA."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": list(config.target_modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
        "base_model_name_or_path": base_model_name_or_path,
    }


def save_adapter(model: nn.Module, folder, config: LoRAConfig,
                 base_model_name_or_path: str | None = None) -> None:
    """Write adapter_model.safetensors + adapter_config.json, each atomically (temp file, rename)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = adapter_state_dict(model)
    if not state:
        raise ValueError("model has no LoRA layers to save (call inject_lora first)")
    with atomic_path(folder / ADAPTER_WEIGHTS) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, tmp, metadata={"format": "pt"})
    with atomic_path(folder / ADAPTER_CONFIG) as tmp:
        Path(tmp).write_text(json.dumps(peft_config_dict(config, base_model_name_or_path), indent=2))


def read_adapter_config(folder) -> LoRAConfig:
    """Parse adapter_config.json into a LoRAConfig; any LoRA variant we don't implement fails."""
    path = Path(folder) / ADAPTER_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (expected a PEFT adapter folder)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    expect = {"peft_type": ("LORA",), "task_type": ("CAUSAL_LM", None), "bias": ("none",)}
    for key, allowed in expect.items():
        if raw.get(key, allowed[-1]) not in allowed:
            raise ValueError(f"{path}: {key}={raw[key]!r} is not supported (expected {allowed[0]!r})")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in raw:
            raise ValueError(f"{path}: missing field {key!r}")
    targets = raw["target_modules"]
    if not (isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        raise ValueError(f"{path}: target_modules={targets!r} is not supported "
                         f"(only a list of module names; no regex, no 'all-linear')")
    used = set(expect) | {"r", "lora_alpha", "lora_dropout", "target_modules"}
    for key, value in raw.items():
        if key not in used and key not in IGNORED_CONFIG_FIELDS and value not in (None, False, {}, []):
            raise ValueError(f"{path}: {key}={value!r} is not supported by nanogdrt.lora "
                             f"(plain LoRA only)")
    try:
        return LoRAConfig(r=raw["r"], alpha=raw["lora_alpha"], dropout=raw.get("lora_dropout", 0.0),
                          target_modules=tuple(targets))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None


def _model_name(path_or_id) -> str:
    """'checkpoints/smollm2-135m-instruct' and 'HuggingFaceTB/SmolLM2-135M-Instruct' -> the last
    part, lower case: a moved folder or a Hub id still names the same model."""
    return str(path_or_id).replace("\\", "/").rstrip("/").rpartition("/")[2].lower()


def check_adapter(folder, model_dir) -> LoRAConfig:
    """An adapter folder checked before any model or data is loaded: a readable plain-LoRA
    adapter_config.json, its safetensors weights, and a base model that is `model_dir`. An
    adapter decoded on another base model than the one it was trained on gives numbers that mean
    nothing, even when the shapes agree; a base of None (not recorded) is taken on trust."""
    config = read_adapter_config(folder)
    if not (Path(folder) / ADAPTER_WEIGHTS).is_file():
        raise FileNotFoundError(f"{Path(folder) / ADAPTER_WEIGHTS}: not found (nanogdrt reads only "
                                f"safetensors adapters, never adapter_model.bin)")
    base = json.loads((Path(folder) / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if base and _model_name(base) != _model_name(model_dir):
        raise ValueError(f"{Path(folder) / ADAPTER_CONFIG}: adapter trained on base model {base!r}, but the model "
                         f"is {str(model_dir)!r}: pass --model {base} (or the folder of that model)")
    return config


@torch.no_grad()
def load_adapter(model: nn.Module, folder) -> LoRAConfig:
    """Load a PEFT LoRA adapter (safetensors + JSON only, never pickle) into `model`.

    Injects LoRA layers if the model has none; otherwise the wrapped modules must be exactly
    the adapter's, and their scale and dropout are set from the adapter's config.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config = read_adapter_config(folder)
    path = Path(folder) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (nanogdrt reads only safetensors adapters, "
                                f"never adapter_model.bin)")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: cannot read safetensors file ({e})") from None

    # Shapes the adapter must have: from the LoRA layers already there, or else from the base
    # layers its config targets. Everything is checked before the model is changed.
    modules = lora_modules(model)
    if any(m.merged for m in modules.values()):
        raise ValueError("model has merged LoRA layers; unmerge_lora before load_adapter")
    if modules:
        shapes = {name: (m.r, m.in_features, m.out_features) for name, m in modules.items()}
    else:
        try:
            targets = find_targets(model, config.target_modules)
        except ValueError as e:
            raise ValueError(f"{Path(folder) / ADAPTER_CONFIG}: {e}") from None
        shapes = {name: (config.r, m.in_features, m.out_features) for name, m in targets.items()}
    expected = {}
    for name, (r, n_in, n_out) in shapes.items():
        expected[f"{PEFT_PREFIX}{name}.lora_A.weight"] = (r, n_in)   # A: (r, in)
        expected[f"{PEFT_PREFIX}{name}.lora_B.weight"] = (n_out, r)  # B: (out, r)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path}: adapter keys do not match the model's LoRA layers: "
                         f"missing {missing[:4]}{'...' if len(missing) > 4 else ''}, "
                         f"unexpected {unexpected[:4]}{'...' if len(unexpected) > 4 else ''}")
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise ValueError(f"{path}: {key} has shape {tuple(state[key].shape)}, the model "
                             f"expects {shape}")

    if not modules:
        inject_lora(model, config)
    copy_adapter_weights(model, state)
    for m in lora_modules(model).values():
        m.r, m.scale, m.dropout_p = config.r, config.alpha / config.r, config.dropout
    return config


@torch.no_grad()
def copy_adapter_weights(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """A and B of every LoRA layer from `state` (PEFT's key names, as adapter_state_dict gives):
    the inverse of adapter_state_dict, e.g. to start two models from one LoRA init."""
    for name, m in lora_modules(model).items():
        m.lora_A.weight.copy_(state[f"{PEFT_PREFIX}{name}.lora_A.weight"])
        m.lora_B.weight.copy_(state[f"{PEFT_PREFIX}{name}.lora_B.weight"])
