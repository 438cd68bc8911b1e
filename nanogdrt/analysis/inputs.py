"""What every figure of nanogdrt.analysis.analyze reads: the train.py run folders, the settings they agree
on (base model, dataset), the dataset and prompt builder, and the models (base + each run's adapter).

Resolved once in `resolve`, so each figure module takes one `Inputs` and one `AnalyzeConfig` rather
than a dozen loose arguments. Every problem with a run folder names the file it comes from, and a
missing adapter fails before any slow work.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from nanogdrt.data import RecDataset
from nanogdrt.prompt import PromptBuilder

BASE = "base (no fine-tuning)"   # the label of the model without an adapter


@dataclass(frozen=True)
class AnalyzeConfig:
    """What analyze() draws and how; one field per flag of `python -m nanogdrt.analysis.analyze`."""
    model: str | None = None         # base model folder (default: the runs' config.model, else embedded)
    dataset: str | None = None       # default: the runs'
    data_dir: str | None = None      # default: the runs'
    examples: int = 20               # Fig. 2/7 attribution examples (0: skip)
    split: str = "test"              # split those examples (and the heat map's users) are drawn from
    seed: int = 0                    # seed of the example sample
    min_count: int = 5               # Fig. 5: only tokens counted this often
    device: str = "cpu"
    dtype: str = "float32"
    attribution_defs: str = "both"   # "segment" | "per-token" | "both" (nanogdrt/attribution.py)
    beams: int = 10                  # beam width of the search whose top-1 title "segment" attributes
    heatmap_users: int = 0           # Fig. 1-style heat maps of this many seeded users


# ----------------------------------------------------------------------------- runs

class Run(NamedTuple):
    path: Path
    label: str         # "SFT", "GDRT" (+ the folder name when two runs share a method)
    config: dict       # the run's resolved RunConfig
    results: dict      # its results.json


def load_run(path) -> Run:
    """Read <path>/results.json; every problem names the file it comes from."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"run folder {path} not found (expected the --out folder of a train.py run)")
    file = path / "results.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: did the train.py run finish? (an interrupted run "
                                f"writes it only after `--resume` completes)")
    try:
        results = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: invalid JSON at line {e.lineno}: {e.msg}") from None
    for key in ("config", "epochs", "test", "test_target_group_distribution", "steps"):
        if key not in results:
            raise ValueError(f"{file}: missing key {key!r} (not a train.py results.json?)")
    if not isinstance(results["epochs"], list) or not results["epochs"]:   # Fig. 4 and the tables need one
        raise ValueError(f"{file}: no epochs (the run ended before its first validation; "
                         f"finish it with train.py --resume)")
    return Run(path, results["config"].get("method", "run").upper(), results["config"], results)


def label_runs(runs: list[Run]) -> list[Run]:
    """Method names as labels; runs that share a method are told apart by their folder names."""
    methods = [r.label for r in runs]
    return [r._replace(label=f"{r.label} ({r.path.name})") if methods.count(r.label) > 1 else r for r in runs]


def agreed(runs: list[Run], key: str, given, default):
    """A setting given on the command line, else the one all runs share, else the default."""
    if given is not None:
        return given
    values = {r.config.get(key) for r in runs}
    if len(values) > 1:
        raise ValueError(f"the runs disagree on {key}: "
                         + ", ".join(f"{r.path} has {r.config.get(key)!r}" for r in runs)
                         + (f"; pass --{key.replace('_', '-')} to choose" if key in ("model", "dataset", "data_dir")
                            else "; analyse runs of one training set together"))
    return values.pop() if values and None not in values else default


def check_adapters(runs: list[Run]):
    """Fail before any slow work if a run's best adapter is missing."""
    for r in runs:
        if not (r.path / "best_adapter" / "adapter_model.safetensors").is_file():
            raise FileNotFoundError(f"{r.path / 'best_adapter' / 'adapter_model.safetensors'} not found")


# ----------------------------------------------------------------------------- inputs

class Inputs(NamedTuple):
    """The runs and what they were trained on, resolved once for every figure."""
    runs: list[Run]
    model_dir: Path
    dataset: str       # its name: toy | clothing | book | synthetic
    ds: RecDataset     # the training set the runs saw (same file, sample and seed as train.py)
    builder: PromptBuilder   # on the base model's tokenizer

    def adapters(self) -> dict:
        """label -> adapter folder: the base model (None) first, then each run's best adapter."""
        return {BASE: None} | {r.label: r.path / "best_adapter" for r in self.runs}


def resolve(runs: list[Run], cfg: AnalyzeConfig) -> Inputs:
    """The base model, dataset and prompt builder: the command line's, else the ones the runs agree on."""
    from nanogdrt.checkpoint import ensure_embedded_checkpoint
    from nanogdrt.data import load_dataset
    from nanogdrt.tokenizer import Tokenizer

    model_dir = Path(agreed(runs, "model", cfg.model, None) or ensure_embedded_checkpoint())
    name = agreed(runs, "dataset", cfg.dataset, "synthetic")
    data_dir = agreed(runs, "data_dir", cfg.data_dir, None)
    # The training set the runs saw (same file, sample and seed as train.py), for Fig. 5.
    train_cfg = {k: agreed(runs, k, None, None) for k in ("train_file", "train_samples")}
    ds = load_dataset(name, data_dir=data_dir, train_file=train_cfg["train_file"],
                      train_samples=train_cfg["train_samples"], seed=agreed(runs, "seed", None, 0))
    return Inputs(runs, model_dir, name, ds, PromptBuilder(Tokenizer(model_dir), name))


def load_model(model_dir, adapter, device, dtype):
    """The base Llama in `dtype` (a torch dtype or its name), with the LoRA adapter folder loaded if any."""
    from nanogdrt.llama import Llama
    from nanogdrt.lora import load_adapter

    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    model = Llama.from_pretrained(model_dir, dtype=dtype, device=device)
    if adapter is not None:
        load_adapter(model, adapter)   # LoRA layers are created on the base weights' device
    return model.eval()               # eval: no LoRA dropout
