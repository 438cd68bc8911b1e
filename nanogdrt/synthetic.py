"""The embedded synthetic dataset: a seeded toy-store catalogue and users, made in memory, offline.

It stands in for the Amazon data (§4.1.1) when that is absent, and is small enough to fine-tune the
135M model on two CPU cores in minutes. Two properties of the real data matter for GDRT and are
built in on purpose:

* Titles share brand and product-line prefixes ("Brickton Space Cruiser 3000", "Brickton Space
  Cruiser Deluxe"), and line names reuse words of the prompt ("Toy", "Game", "Play"), so a model can
  score a title from auxiliary tokens alone: the context bias of §2.2 has something to feed on.
* The next item really depends on the history: every user has latent tastes (a few favourite
  product lines), and a sequence moves Markov-style -- mostly within the previous item's line, else
  to another favourite line, else to a globally popular item -- with Zipf popularity inside lines
  and overall. An item-to-item co-occurrence recommender therefore beats most-popular clearly
  (tests/test_synthetic.py checks HR@10 at least 2x).

This module only makes titles and time-ordered sequences; nanogdrt.data cuts them into windows and
splits them 8:1:1 by time with the same code as the real data (`load_dataset("synthetic")`, with a
SyntheticConfig for another seed or size). No 5-core filter is applied: every catalogue item is a
candidate, as every item of id2name.json is for the real data.
"""

import random
from dataclasses import dataclass
from typing import NamedTuple

BRAND_HEADS = ["Brick", "Zoom", "Tiny", "Happy", "Star", "Wonder", "Bright", "Kiddo", "Sunny", "Maple"]
BRAND_TAILS = ["ton", "ix", "ville", "works", "land", "ora", "kin"]
THEMES = ["Space", "Dino", "Pony", "Pirate", "Ocean", "Jungle", "Robot", "Castle", "Farm", "Race",
          "Magic", "Arctic", "Fire", "Safari", "City", "Dragon", "Rocket", "Unicorn"]
PRODUCTS = ["Cruiser", "Station", "Explorer", "Park", "Stable", "Puzzle", "Board Game", "Playset",
            "Train", "Garage", "Lab", "Toy Truck", "Card Game", "Play Tent", "Builder Kit", "Figures"]
VARIANTS = ["3000", "Deluxe", "Mini", "Junior", "Classic", "Pro", "Max", "Starter Set", "Deluxe Set",
            "Travel Pack", "Red", "Blue", "Green", "Gold Edition", "XL", "2-Pack", "Jumbo", "Pocket",
            "Glow", "Turbo", "Party Pack", "Mega Box", "Collector Edition", "Twin", "Retro"]


def _zipf_weights(n, exponent, rng):
    """Zipf-like popularity over n things, in a random order (popularity is not tied to position)."""
    weights = [1.0 / (rank + 1) ** exponent for rank in range(n)]
    rng.shuffle(weights)
    return weights


def make_catalogue(rng, n_brands=25, lines_per_brand=4, items_per_line=20):
    """Titles by item id (1..N) and the product line of each item (a line = brand + theme + product)."""
    brands = rng.sample([h + t for h in BRAND_HEADS for t in BRAND_TAILS], n_brands)
    line_names = [t + " " + p for t in THEMES for p in PRODUCTS]
    titles, line_of, lines = {}, {}, []
    for brand in brands:
        # different brands may sell the same kind of line: shared words across brands
        for line_name in rng.sample(line_names, lines_per_brand):
            items = []
            for variant in rng.sample(VARIANTS, items_per_line):
                item = len(titles) + 1
                titles[item] = f"{brand} {line_name} {variant}"
                line_of[item] = len(lines)
                items.append(item)
            lines.append(items)
    return titles, line_of, lines


def make_sequences(rng, line_of, lines, n_users=400, min_len=5, max_len=20, p_same_line=0.6,
                   p_taste=0.3, start_day=16_000, days=1_000):
    """user -> [(item, unix time), ...]: Markov-ish walks over product lines, no repeated items."""
    n_items = len(line_of)
    item_pop = _zipf_weights(n_items, 0.8, rng)                       # global popularity
    in_line = [_zipf_weights(len(items), 0.8, rng) for items in lines]        # popularity inside a line
    line_pop = [sum(item_pop[i - 1] for i in items) for items in lines]

    def pick_in_line(line, seen):
        for _ in range(50):  # rejection: users do not buy the same item twice
            item = rng.choices(lines[line], in_line[line])[0]
            if item not in seen:
                return item
        return None

    sequences = {}
    for user in range(n_users):
        tastes = rng.choices(range(len(lines)), line_pop, k=rng.randint(2, 3))  # favourite lines
        length = min(max_len, min_len + int(rng.expovariate(1 / 5)))
        time = (start_day + rng.randrange(days)) * 86_400
        seq, seen = [], set()
        while len(seq) < length:
            r = rng.random()
            if seq and r < p_same_line:
                item = pick_in_line(line_of[seq[-1][0]], seen)
            elif r < p_same_line + p_taste or not seq:
                item = pick_in_line(rng.choice(tastes), seen)
            else:
                item = rng.choices(range(1, n_items + 1), item_pop)[0]
            if item is None or item in seen:
                continue
            seen.add(item)
            seq.append((item, time))
            time += rng.randint(1, 30) * 86_400
        sequences[user] = seq
    return sequences


@dataclass(frozen=True)
class SyntheticConfig:
    """Seed and size of the generated catalogue and users; the defaults are the embedded dataset."""
    seed: int = 0
    n_users: int = 400
    n_brands: int = 25
    lines_per_brand: int = 4    # product lines per brand
    items_per_line: int = 20    # items = n_brands * lines_per_brand * items_per_line (2,000 by default)


# The tutorials' catalogue: the same generator at 120 items, so that scoring every title stays quick.
SMALL = SyntheticConfig(n_users=200, n_brands=6, lines_per_brand=2, items_per_line=10)


def config_for(dataset: str, size: str) -> "SyntheticConfig | None":
    """A command's --dataset and --synthetic-size -> load_dataset's `synthetic` (None: the default;
    the size applies to the synthetic dataset only)."""
    return SMALL if dataset == "synthetic" and size == "small" else None


class SyntheticData(NamedTuple):
    titles: dict[int, str]                          # item id (1..N) -> title
    sequences: dict[int, list[tuple[int, int]]]     # user -> [(item, unix time), ...], oldest first


def generate(config: SyntheticConfig = SyntheticConfig()) -> SyntheticData:
    """Titles and users' sequences (same config, same data); ~2,000 windows by default once cut."""
    rng = random.Random(config.seed)  # one stream: the catalogue first, then the users
    titles, line_of, lines = make_catalogue(rng, config.n_brands, config.lines_per_brand, config.items_per_line)
    return SyntheticData(titles, make_sequences(rng, line_of, lines, config.n_users))
