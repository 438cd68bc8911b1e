"""A controlled world: the paper's context bias planted with one knob, and the truth to measure it by.

Why. On the embedded synthetic data and on real Toy at this scale, SFT does not show the bias
GDRT exists to fix, and the item groups of MGU/DGU come from the same base-model signal (Eq. 2/3)
that GDRT trains on. This world plants the mechanism the paper describes, at a strength we set,
and knows each user's true next-item distribution, so a model's accuracy can be read against the
best achievable and its "bias" against a ground-truth split of the catalogue.

The mechanism (the paper's diagnosis, §2.3: the co-occurrence statistics of its Fig. 5). A
target token that co-occurs reliably with auxiliary tokens (the task text, the same in every
prompt, and the title's own prefix y_<t) can be predicted without reading the history; an
NLL-minimising model then learns that shortcut. So:

* Titles have two kinds of tokens. "<Brand> <Theme> <Product> <n>": a brand sells a few product
  lines (the brand fixes the line words after it only up to which of its lines: Fig. 5's prefix
  co-occurrence), and each line is a numbered series 1..V. Which brand, which line and which number
  only the history can tell. One extra line, GENERIC_LINE "New Toy Favorites <n>", echoes the task
  text ("recommend a new toy that the user likes"), so a pretrained LM already scores it high
  without any history (Eq. 3), as the paper's group-1 items.
* The history process (`history_distribution`): with probability p_continue the next item is the
  next number of the user's latest line (cyclically, skipping items already bought: the item-level
  tokens only the history reveals); otherwise it is uniform over the items not yet bought.
* The knob, `shortcut` = s (`next_item_distribution`): with probability s the next item is one of
  the generic line's unbought items, uniformly, whatever the history; else the history process.
  The generic titles' first token is then predictable from the task text alone (at least s of all
  targets start with it), and the rest of the title from its prefix. A generic item once bought
  is continued like any line (the history process does not know why it was bought), so generic
  targets outnumber s: 0.03 / 0.17 / 0.40 / 0.58 of training targets at s = 0 / 0.05 / 0.15 / 0.3
  (seed 0; 0.04 expected at s = 0, the line's catalogue share).
* s = 0 plants nothing: the generic line is then one line like any other (same size, reached only
  through the history process). The process is invariant under permuting lines and rotating each
  line's numbering, and the first item is uniform, so every item, generic or not, is equally
  likely at every position: the targets' token sequences have the catalogue's own distribution
  and no aux-only predictor beats chance (tests/test_controlled.py checks both within binomial
  bounds).

Alternatives we did not take: a knob on how often the brand fixes the line words (titles would
differ between settings, so the Eq. 2/3 scores and the trie would too, confounding the sweep);
a Zipf popularity skew (no ground-truth split of "shortcut items"; popularity is history-free
but not auxiliary-token-readable); latent user tastes as in nanogdrt.synthetic (the true
next-item distribution would be a posterior over tastes, not exact).

Exactness. Sequences hold at most MAX_LEN = 11 items, so each window's history (up to
nanogdrt.data.MAX_HISTORY = 10 items) is the user's whole past and `next_item_distribution`
of it is the exact distribution the target was drawn from: the generator samples from that very
function. The catalogue is drawn first and does not depend on s; each step then draws the same
number of random numbers whatever s is, so two settings of one seed share titles, users'
lengths, times and windows (common random numbers; only the items differ). Seeded, offline, in
memory; `nanogdrt.data.load_dataset("controlled", controlled=ControlledConfig(...))` windows and
splits it like every dataset. Like nanogdrt.synthetic it does not import the loader.
"""

import math
import random
from dataclasses import dataclass
from typing import NamedTuple, Sequence

from nanogdrt.synthetic import BRAND_HEADS, BRAND_TAILS, THEMES

# Product words that do not echo the task text ("toys", "played", "games"): only the generic line does.
PRODUCTS = ["Cruiser", "Station", "Explorer", "Park", "Stable", "Puzzle", "Train", "Garage", "Lab",
            "Builder Kit", "Figures"]
GENERIC_LINE = "New Toy Favorites"   # words of the task text; ids after every other line's
MAX_LEN = 11                         # = nanogdrt.data.MAX_HISTORY + 1: a window sees the whole past
MIN_LEN = 5                          # = nanogdrt.data.MIN_HISTORY + 1: every user gives a window
START_DAY, DAYS = 16_000, 1_000      # first purchase: a uniform day in this range (as synthetic)
WORLD_GROUPS = 2                     # world_groups: 1 = the shortcut's items, 2 = the rest


@dataclass(frozen=True)
class ControlledConfig:
    """Seed, size and the knob. Items = (n_brands * lines_per_brand + 1) * items_per_line."""
    seed: int = 0
    shortcut: float = 0.0       # THE KNOB: P(next item is generic, whatever the history); 0 = control
    n_users: int = 400          # ~4 windows per user: ~1,600 windows, split 8:1:1 (train.py subsamples)
    n_brands: int = 8
    lines_per_brand: int = 3
    items_per_line: int = 8     # the numbered series of a line (and the generic line's size)
    p_continue: float = 0.7     # history process: P(the next number of the latest line)

    def __post_init__(self):
        if not 0.0 <= self.shortcut < 1.0:
            raise ValueError(f"shortcut must be in [0, 1), got {self.shortcut}")
        if not 0.0 <= self.p_continue <= 1.0:
            raise ValueError(f"p_continue must be in [0, 1], got {self.p_continue}")
        if min(self.n_users, self.n_brands, self.lines_per_brand) < 1 or self.items_per_line < 2:
            raise ValueError(f"sizes must be positive (items_per_line >= 2): {self}")


class World(NamedTuple):
    config: ControlledConfig
    titles: dict[int, str]                          # item id (1..N) -> title
    lines: list[list[int]]                          # each line's items in series order; generic last
    line_of: dict[int, int]                         # item -> index into lines
    sequences: dict[int, list[tuple[int, int]]]     # user -> [(item, unix time), ...], oldest first

    @property
    def generic(self) -> list[int]:
        """The shortcut's items: the generic line."""
        return self.lines[-1]


def make_catalogue(rng, config: ControlledConfig) -> tuple[dict[int, str], list[list[int]]]:
    """Titles and lines. A brand's lines are distinct; line names may repeat across brands."""
    brands = rng.sample([h + t for h in BRAND_HEADS for t in BRAND_TAILS], config.n_brands)
    line_names = [f"{theme} {product}" for theme in THEMES for product in PRODUCTS]
    prefixes = [f"{b} {name}" for b in brands for name in rng.sample(line_names, config.lines_per_brand)]
    titles, lines = {}, []
    for prefix in prefixes + [GENERIC_LINE]:   # generic last: the largest ids win no tie (oracle_ranking)
        first = len(titles) + 1
        lines.append(list(range(first, first + config.items_per_line)))
        titles.update({first + k: f"{prefix} {k + 1}" for k in range(config.items_per_line)})
    return titles, lines


def continuation(world: World, history: Sequence[int]) -> int | None:
    """The next unbought number of the latest item's line (cyclic), None if none is left."""
    if not history:
        return None
    line = world.lines[world.line_of[history[-1]]]
    k, seen = line.index(history[-1]), set(history)
    for step in range(1, len(line)):
        if line[(k + step) % len(line)] not in seen:
            return line[(k + step) % len(line)]
    return None


def history_distribution(world: World, history: Sequence[int]) -> dict[int, float]:
    """The history process: p_continue on `continuation`, the rest uniform over unbought items."""
    seen = set(history)
    unseen = [i for i in world.titles if i not in seen]
    if not unseen:
        raise ValueError("the user has bought the whole catalogue")
    cont = continuation(world, history)
    p = world.config.p_continue if cont is not None else 0.0
    dist = {i: (1.0 - p) / len(unseen) for i in unseen}
    if cont is not None:
        dist[cont] += p
    return dist


def next_item_distribution(world: World, history: Sequence[int]) -> dict[int, float]:
    """The exact P(next item | history): s on the unbought generic items, 1 - s on the history
    process (all of it when every generic item is bought). Keys: the unbought items, in id order."""
    dist = history_distribution(world, history)
    s = world.config.shortcut
    generic = [i for i in world.generic if i in dist]
    if s == 0.0 or not generic:
        return dist
    dist = {i: (1.0 - s) * p for i, p in dist.items()}
    for i in generic:
        dist[i] += s / len(generic)
    return dist


def sample(dist: dict[int, float], u: float) -> int:
    """Inverse-CDF draw with one uniform u in [0, 1): one random number per step, whatever s is."""
    total = 0.0
    for item, p in dist.items():
        total += p
        if u < total:
            return item
    return item   # u within float rounding of 1


def make_sequences(rng, world: World) -> dict[int, list[tuple[int, int]]]:
    """user -> [(item, time)]: MIN_LEN..MAX_LEN items, each drawn from next_item_distribution."""
    sequences = {}
    for user in range(world.config.n_users):
        length = rng.randint(MIN_LEN, MAX_LEN)
        time = (START_DAY + rng.randrange(DAYS)) * 86_400
        items = []
        for _ in range(length):
            items.append(sample(next_item_distribution(world, items), rng.random()))
        sequences[user] = []
        for item in items:
            sequences[user].append((item, time))
            time += rng.randint(1, 30) * 86_400
    return sequences


def generate(config: ControlledConfig = ControlledConfig()) -> World:
    """The world of a config: same config, same world; the catalogue does not depend on s."""
    rng = random.Random(config.seed)   # one stream: the catalogue first, then the users
    titles, lines = make_catalogue(rng, config)
    line_of = {i: n for n, items in enumerate(lines) for i in items}
    world = World(config, titles, lines, line_of, {})
    return world._replace(sequences=make_sequences(rng, world))


# ----------------------------------------------------------------------------- ground truth

def oracle_ranking(world: World, history: Sequence[int], k: int | None = None) -> list[int]:
    """Items by true probability, highest first; equal probabilities by item id (the expected
    accuracy of the list does not depend on how ties are broken)."""
    dist = next_item_distribution(world, history)
    return sorted(dist, key=lambda i: (-dist[i], i))[:k]


def oracle_topk(world: World, interactions, k: int = 10) -> list[list[int]]:
    """The oracle's top-k for each interaction (anything with a `.history`)."""
    return [oracle_ranking(world, x.history, k) for x in interactions]


def expected_accuracy(world: World, interactions, ranked, ks=(5, 10)) -> dict[str, float]:
    """E[HR@k] and E[NDCG@k] of ranked lists over the true next-item distributions (§4.1.4's
    metrics, averaged over the target instead of read at the one drawn): HR@k = the true mass of
    the top k, NDCG@k = sum_r P(item_r) / log2(r + 2). The oracle's lists maximise both."""
    out = {f"{m}@{k}": 0.0 for k in ks for m in ("NDCG", "HR")}
    for x, items in zip(interactions, ranked, strict=True):
        dist = next_item_distribution(world, x.history)
        for k in ks:
            p = [dist.get(i, 0.0) for i in items[:k]]
            out[f"HR@{k}"] += sum(p)
            out[f"NDCG@{k}"] += sum(q / math.log2(r + 2) for r, q in enumerate(p))
    return {m: v / max(len(interactions), 1) for m, v in out.items()}


def world_groups(world: World) -> dict[int, int]:
    """The world's own item split for MGU/DGU (pass n_groups=WORLD_GROUPS to nanogdrt.metrics):
    1 = the items the shortcut favours (the generic line), 2 = the rest."""
    generic = set(world.generic)
    return {i: 1 if i in generic else 2 for i in world.titles}
