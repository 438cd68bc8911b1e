"""The run configuration of train.py: every option declared once, as a RunConfig field.

A field's default, help text and allowed range (`min`, `max`, `above`, `below`, `pattern`) live in
its `option(...)`; `build_parser` turns the fields into the command line (`python train.py
--help`), and `nanogdrt.infra.validate.check_config` checks every range at start-up, before any work.
The resolved RunConfig is saved in results.json and in every checkpoint.

Where a default comes from is said in its help: the GDRT paper, MSL's recipe (the pipeline the
paper's prompts and data follow), or a CPU-scale choice of ours (DATASET_DEFAULTS).
"""

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field

from nanogdrt.baselines.d3 import DECODINGS, assistant_problem
from nanogdrt.baselines.llara import METHODS as LLARA_METHODS
from nanogdrt.baselines.methods import METHODS
from nanogdrt.data import DATASET_NAME, dataset_template, find_dataset_dir
from nanogdrt.infra.step_log import tensorboard_problem
from nanogdrt.infra.validate import (DEVICE, RANGE_KEYS, STANDARD_CUTOFFS, ArgumentError, check_config, check_cutoffs,
                                     describe)


def option(default, help, **argparse_kwargs):
    """A RunConfig field and its command-line option (--field-name), declared once; `min`, `max`,
    `above`, `below` declare its allowed range (checked by nanogdrt.infra.validate at start-up)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **argparse_kwargs})
    return field(default=default, metadata={"help": help, **argparse_kwargs})


@dataclass
class RunConfig:
    """Every setting of a run, saved in results.json. A None count is filled per dataset below."""
    dataset: str = option("synthetic", "toy | clothing | book | synthetic (embedded, offline) | controlled "
                                       "(the embedded world with a planted shortcut, nanogdrt/controlled.py) | "
                                       "any other name: your own folder (--data-dir) with a prompt.json "
                                       "(docs/data_format.md)", pattern=DATASET_NAME.pattern)
    data_dir: str | None = option(None, "dataset folder (default: $NANOGDRT_DATA/<name> or data/<name>)")
    train_file: str | None = option(None, "which train*.csv of the folder (toy: train_1000.csv)")
    shortcut: float = option(0.0, "controlled only: P(the next item is a generic one whatever the history), "
                                  "the world's knob; 0 plants no shortcut", min=0, below=1)
    world_seed: int = option(0, "controlled only: the seed of the world's catalogue and users (apart from "
                                "--seed, which picks windows and trains)", min=0)
    synthetic_size: str = option("full", "synthetic only: full (2,000 items) or small (120 items, for "
                                         "tutorials and smoke tests)", choices=["full", "small"])
    method: str = option("gdrt", "SFT (Eq. 1), GDRT (Eq. 5), MSL's masked softmax, MSL with GDRT's group "
                                 "weights, IFairLRS's reweighting, CFT's counterfactual fine-tuning, or "
                                 "group-mean (our control: GDRT's groups, Q fixed uniform) "
                                 "(nanogdrt/baselines/methods.py)", choices=list(METHODS))
    model: str | None = option(None, "Hugging Face Llama folder (default: embedded SmolLM2-135M-Instruct)")
    train_samples: int | None = option(None, "seeded sample of training windows (MSL's recipe: 10,000; the GDRT "
                                               "paper gives none)", min=1)
    valid_users: int | None = option(None, "seeded sample of validation users per epoch", min=1)
    test_users: int | None = option(None, "seeded sample of test users (default per dataset; MSL tests "
                                            "its whole test file, 4,794 Toy users)", min=1)
    epochs: int | None = option(None, "training epochs (paper: 5)", min=1)
    batch_size: int = option(8, "examples per micro-batch (MSL's recipe: 128 per optimizer step = "
                                  "batch-size x grad-accum x ranks; the GDRT paper gives none)", min=1)
    grad_accum: int = option(1, "micro-batches per optimizer step", min=1)
    lr: float = option(5e-4, "AdamW learning rate of the LoRA parameters (MSL's recipe: 1e-4, "
                                 "after a 20-step warm-up, which train.py omits; the GDRT paper gives none)", above=0)
    weight_decay: float = option(0.0, "AdamW weight decay", min=0)
    clip: float = option(1.0, "gradient-norm clip", above=0)
    groups: int = option(5, "G token groups (paper grid: 2, 5, 10)", min=1)
    tau: float = option(0.5, "Group-DRO temperature (paper grid: 0.1 .. 1.0)", above=0)
    loss_scope: str = option("step", "the batch a loss is computed over (its token mean; GDRT's L(g) and Q(g)). "
                                     "step: the optimizer step's whole batch, every micro-batch of every rank "
                                     "(exact: batch 4 x accum 32 and 4 x 4 x 8 ranks give the same Q and update; "
                                     "GDRT with --grad-accum > 1 runs one extra no-grad forward per step for Q). "
                                     "micro: each micro-batch across the ranks, averaged over the accumulation. "
                                     "rank-micro: each rank's own micro-batch, as HF-Trainer implementations "
                                     "compute it", choices=["step", "micro", "rank-micro"])
    tau_msl: float = option(4.5, "MSL's softmax temperature (MSL's recipe for Toy: 4.5)", above=0)
    reweight_power: float = option(1.0, "Reweight: IFairLRS's group weights raised to this power (our knob, "
                                        "not IFairLRS's): 1 = IFairLRS, 0 = uniform = SFT", min=0)
    reweight_groups: str = option("popularity", "Reweight's item groups: popularity = IFairLRS's (training-target "
                                                "frequency quintiles over the dataset's whole training file, "
                                                "grouping.popularity_groups); eq2 = Eq. 2 under the base model (the "
                                                "fairness metric's own groups: our v2 variant, a labelled extra)",
                                  choices=["eq2", "popularity"])
    grouping: str = option("kmeans", "how tokens are split by relevance", choices=["kmeans", "quantile"])
    regroup_every_epoch: bool = option(False, "re-score Eq. 3 with the current model at each later epoch "
                                             "(default: the base model scores Eq. 2/3 once)")
    lora_r: int = option(8, "LoRA rank (MSL's recipe; the GDRT paper gives no LoRA settings)", min=1)
    lora_alpha: float = option(16, "LoRA alpha (scale alpha/r; MSL's recipe)", above=0)
    lora_dropout: float = option(0.05, "dropout on the LoRA path (MSL's recipe)", min=0, below=1)
    lora_targets: list[str] = option(["q_proj", "v_proj"], "module names that get LoRA (MSL's recipe)", nargs="+")
    beams: int = option(10, "beam width of constrained beam search (paper and MSL: 10)", min=1)
    k: list[int] = option([5, 10], "cut-offs K of the metrics @K (validation and test); must include 5 and 10 "
                                   "(validation selects on NDCG@5, the table shows @5 and @10); others <= --beams",
                          nargs="+", min=1)
    beyond_accuracy: bool = option(False, "also Coverage@K, ARP@K, Tail@K and Gini@K (nanogdrt/metrics.py; "
                                          "popularity: the training windows' targets) in results.json and the table")
    eval_batch_size: int = option(32, "users decoded at once (slots refilled as users finish)", min=1)
    decoding: str = option("cbs", "decoding of the test (validation: cbs): constrained beam search or D3 "
                                  "(Bao et al. 2024, nanogdrt/baselines/d3.py)", choices=DECODINGS)
    assistant: str | None = option(None, "d3: SASRec folder (python -m nanogdrt.baselines.sasrec), weighted by --alpha")
    sasrec: str | None = option(None, "llara, llara+gdrt: SASRec folder (python -m nanogdrt.baselines.sasrec) whose "
                                      "frozen item embeddings, projected, fill the prompt's item slots")
    alpha: float = option(0.0, "d3: step score (1 - alpha) log p_LM + alpha log p_assistant (D3's code: 0)",
                          min=0, max=1)
    seed: int = option(0, "seed of sampling, batching, LoRA init and dropout", min=0)
    device: str = option("cpu", "cpu | cuda | mps", pattern=DEVICE)
    dtype: str = option("float32", "model dtype", choices=["float32", "bfloat16", "float16"])
    compile: bool = option(False, "torch.compile each decoder block for training (llama.compile_blocks): "
                                  "2.2-2.5x the eager step on an H200 in bf16 (BENCHMARKS.md); its first "
                                  "steps compile, so it pays off on long runs on a GPU")
    out: str | None = option(None, "run folder (default: runs/<dataset>-<method>)")
    resume: bool = option(False, "continue from <out>/state")
    save_every: int = option(50, "checkpoint every N optimizer steps", min=1)
    snapshot_every: int = option(0, "also save the LoRA adapter every N optimizer steps to "
                                    "<out>/snapshots/step-<k>/ (0: off), e.g. for the top-1 share over "
                                    "training steps (the paper's Fig. 4/9)", min=0)
    tensorboard: bool = option(False, "also write every step's log (<out>/steps.jsonl) as TensorBoard scalars in "
                                      "<out>: tensorboard --logdir <out> (the optional extra: pip install -e "
                                      "\".[tensorboard]\")")
    max_steps: int | None = option(None, "stop after N optimizer steps in all (then --resume)", min=1)
    skip_bad: bool = option(False, "skip malformed data rows (counted in results.json)")
    group_by_length: bool = option(True, "batch examples in plain random order (default: random pools of "
                                         "batches, each of similar-length examples, so less of a step is padding)")
    no_test: bool = option(False, "stop after training and validation (e.g. while choosing G and tau); the "
                                  "same command with --resume then runs the test")


# Paper-like defaults scaled to 2 CPU cores, per dataset (a flag on the command line wins).
DATASET_DEFAULTS = {
    "synthetic": dict(train_samples=128, valid_users=32, test_users=128, epochs=2),
    "controlled": dict(train_samples=192, valid_users=64, epochs=2),   # docs/controlled/plan.md
    "toy": dict(train_file="train_1000.csv", train_samples=1000, valid_users=100, test_users=500, epochs=2),
}


def build_parser(description: str = "") -> argparse.ArgumentParser:
    """One option per RunConfig field. A bool field is a switch: --name turns a False default
    on, --no-name turns a True default off."""
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(RunConfig):
        kwargs = {k: v for k, v in f.metadata.items() if k not in RANGE_KEYS}
        bounds = {k: f.metadata[k] for k in RANGE_KEYS if k in f.metadata and k != "pattern"}
        if bounds:
            kwargs["help"] += f" [{describe(**bounds)}]"
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        name = f.name.replace("_", "-")
        if f.type is bool:
            flag = f"--no-{name}" if default else f"--{name}"
            p.add_argument(flag, dest=f.name, action="store_false" if default else "store_true", **kwargs)
        else:   # the type of one value: `int | None` -> int, `list[str]` -> str
            value_type = next((t for t in typing.get_args(f.type) if t is not type(None)), f.type)
            p.add_argument(f"--{name}", type=value_type, default=default, **kwargs)
    return p


def parse_args(argv=None, description: str = "") -> RunConfig:
    """The command line -> a checked RunConfig, with the dataset's defaults filled in."""
    args = vars(build_parser(description).parse_args(argv))
    for key, value in DATASET_DEFAULTS.get(args["dataset"], {}).items():
        if args.get(key) is None:
            args[key] = value
    if args["epochs"] is None:                             # datasets without defaults (clothing, book)
        args["epochs"] = 2
    if args["out"] is None:                                # "" is refused by claim_run_folder, not defaulted
        args["out"] = f"runs/{args['dataset']}-{args['method']}"
    if args["dataset"] != "controlled" and (args["shortcut"] or args["world_seed"]):
        raise ArgumentError("--shortcut and --world-seed set the controlled world: use them with --dataset controlled")
    if (args["method"] in LLARA_METHODS) != (args["sasrec"] is not None):
        raise ArgumentError(f"--method {args['method']}: --sasrec DIR goes with --method llara or llara+gdrt, "
                            "and only with them")
    args["k"] = sorted(set(args["k"]))
    cfg = check_config(RunConfig(**args), checks={"assistant": assistant_problem, "sasrec": assistant_problem,
                                                  "tensorboard": tensorboard_problem})   # before any work
    check_cutoffs(cfg.k, cfg.beams, required=STANDARD_CUTOFFS)
    return check_dataset_folder(cfg)


def check_dataset_folder(cfg: RunConfig) -> RunConfig:
    """A folder dataset's folder and prompt template (nanogdrt.data), before the run folder, the
    model or any row is touched: a misspelt name or a missing prompt.json ends the run here."""
    if cfg.dataset not in ("synthetic", "controlled"):
        try:
            dataset_template(cfg.dataset, find_dataset_dir(cfg.dataset, cfg.data_dir))
        except (OSError, ValueError) as e:
            raise ArgumentError(f"--dataset {cfg.dataset}: {e}") from None
    return cfg
