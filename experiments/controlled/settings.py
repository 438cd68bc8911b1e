"""The pre-registered plan's constants (docs/controlled/plan.md), in one place, and the names of
what they make: stage rows, run folders, committed folders. The bottom layer of
experiments/controlled: it imports nothing of the harness and no torch.

Every number here is the plan's; a change is an amendment committed to the plan first. The
command line (runner.py) can shrink them for a test (a tiny model, fewer seeds), never silently:
the manifest records each stage's exact command.
"""

from dataclasses import dataclass, field

SHORTCUTS = (0.0, 0.05, 0.15, 0.3)   # the knob s; 0 = the control setting
WORLD_SEED = 0                       # ControlledConfig.seed: the same catalogue and users at every s
SEEDS = (0, 1, 2, 3, 4)              # training seeds of SFT, GDRT and the control (also pick the windows)
SELECTION_SEED = 100                 # the (G, tau) selection runs' seed: not an evaluation seed
GRID = ((2, 0.2), (2, 0.5), (2, 1.0), (5, 0.2), (5, 0.5), (5, 1.0))   # G x tau, a subset of the paper's
TRAIN_SAMPLES, EPOCHS, BATCH_SIZE, VALID_USERS = 192, 2, 8, 64       # 48 optimizer steps, every row
BEAMS = 10                           # CBS decoding, beam 10 (train.py's default)
SNAPSHOT_EVERY = 8                   # checkpoints every 8 steps for the top-1 curve (Fig. 4/9)
CURVE_SEEDS = (0, 1)                 # snapshots decoded for these seeds only (amendment proposed: cost)
CURVE_USERS = 64                     # ... on the first 64 test users
ATTRIBUTION_USERS = 50               # attribution ratios on the first 50 test users
DERANGEMENT_SEED = 0                 # history reliance: nanogdrt.analysis.reliance.derangement(n, 0)
ADAPTER_SEEDS = (0,)                 # adapters committed for these seeds only (~1.8 MB each)
BOOTSTRAP = 10_000                   # S1: resamples of runs, seed 0
ALPHA = 0.05                         # the primary family's level after Holm
PRIMARY_SHORTCUT = 0.3               # P1-P4 are read at s = 0.3
MATERIAL_COST = -0.05                # P4: "no material cost" when the lower end is above this
GATE_SWAP = 0.3                      # the pilot's gate: SFT's swap top-1-changed above this at s = 0 and 0.3
TRAINED_ROWS = {"sft": "sft", "gdrt": "gdrt", "control": "group-mean"}   # row -> train.py --method


@dataclass
class Settings:
    """The sweep's settings: the plan's by default; a test shrinks them from the command line."""
    shortcuts: tuple = SHORTCUTS
    seeds: tuple = SEEDS
    grid: tuple = GRID
    selection_seed: int = SELECTION_SEED
    train_samples: int = TRAIN_SAMPLES
    epochs: int = EPOCHS
    batch_size: int = BATCH_SIZE
    valid_users: int = VALID_USERS
    test_users: int | None = None            # None: all 156 test windows (the plan)
    beams: int = BEAMS
    snapshot_every: int = SNAPSHOT_EVERY
    curve_seeds: tuple = CURVE_SEEDS
    curve_users: int = CURVE_USERS
    attribution_users: int = ATTRIBUTION_USERS
    adapter_seeds: tuple = ADAPTER_SEEDS
    bootstrap: int = BOOTSTRAP
    model: str | None = None                 # None: the embedded SmolLM2-135M
    train_extra: list = field(default_factory=list)


def s_name(s: float) -> str:
    """0.3 -> "s0.3": a setting's folder and its part of a stage name."""
    return f"s{s:g}"


def run_name(row: str, s: float, seed: int) -> str:
    """("sft", 0.3, 1) -> "sft-s0.3-seed1": a trained run's stage name."""
    return f"{row}-{s_name(s)}-seed{seed}"


def folder(row: str, seed: int | None = None) -> str:
    """A row's folder inside its setting's: "sft-seed1", "base", "select-G2-tau0.5"."""
    return row if seed is None else f"{row}-seed{seed}"


def select_folder(g: int, tau: float) -> str:
    return f"select-G{g}-tau{tau:g}"


def parse_grid(spec: str) -> tuple:
    """"2:0.2,5:1" -> ((2, 0.2), (5, 1.0))."""
    try:
        return tuple((int(g), float(t)) for g, t in (x.split(":") for x in spec.split(",")))
    except ValueError:
        raise SystemExit(f"--grid {spec!r}: expected G:TAU[,G:TAU...], e.g. 2:0.2,5:1") from None
