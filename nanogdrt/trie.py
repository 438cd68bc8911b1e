"""A token trie of every catalogue title, as flat tensors, for constrained beam search.

Each title is stored exactly as the model must generate it in the response:
`PromptBuilder.target_ids(title)`, i.e. the quoted title then EOS, so the training targets and
the trie agree token for token. A path from the root to a leaf spells one title; the leaf (the
node reached by EOS) lists the item ids of that title. Several items can share one title (57 in
Toy), so a leaf holds a tuple of ids, smallest first.

Beam search asks "which tokens may follow?" for hundreds of beams at every step, so the trie is
not a dict of dicts but a flattened CSR array, built once:

    node n's children are edges child_ptr[n] : child_ptr[n+1]
    edge e is token child_token[e], leading to node child_node[e]

Nodes are numbered breadth-first (root = 0). `allowed(nodes)` turns a batch of node ids into a
padded (M, K) matrix of allowed tokens and their child nodes with a handful of tensor ops and no
Python loop per beam. A node also determines its whole token path (`parent`, `token`), so beam
search carries node ids only and reads the generated tokens back at the end.
"""

from dataclasses import dataclass

import torch


@dataclass
class Allowed:
    """Allowed continuations of M nodes, padded to K = the largest number of children among them."""
    tokens: torch.Tensor  # (M, K) token ids (padding: 0)
    nodes: torch.Tensor   # (M, K) child node ids (padding: 0)
    mask: torch.Tensor    # (M, K) True where the entry is a real child


class Trie:
    def __init__(self, child_ptr, child_token, child_node, parent, token, leaf_items: dict, eos_id: int):
        self.child_ptr = child_ptr      # (n_nodes + 1,) int64: CSR row pointers
        self.child_token = child_token  # (n_edges,) int64
        self.child_node = child_node    # (n_edges,) int64
        self.parent = parent            # (n_nodes,) int64: parent node (-1 for the root)
        self.token = token              # (n_nodes,) int64: token on the edge into the node (-1 for the root)
        self.leaf_items = leaf_items    # leaf node id -> tuple of item ids (sorted)
        self.eos_id = eos_id
        # Python copies for the few per-hypothesis lookups (reading paths back, walking a prefix).
        self._parent, self._token = parent.tolist(), token.tolist()
        self._children = [dict() for _ in self._parent]
        for n, (p, t) in enumerate(zip(self._parent, self._token)):
            if p >= 0:
                self._children[p][t] = n
        self.depth = self._depth()      # longest path = most tokens any title needs (EOS included)
        self._item_paths = None         # built on first use by item_paths()

    @classmethod
    def from_token_ids(cls, item_tokens: dict[int, list[int]], eos_id: int) -> "Trie":
        """item id -> the exact token ids to generate (ending in EOS; EOS nowhere else)."""
        if not item_tokens:
            raise ValueError("cannot build a trie of an empty catalogue")
        root: dict = {}
        leaves: dict[int, list[int]] = {}  # id() of a leaf dict -> item ids, filled below
        for item, ids in item_tokens.items():
            if not ids or ids[-1] != eos_id or eos_id in ids[:-1]:
                raise ValueError(f"item {item}: token ids must end with EOS ({eos_id}) and hold it only "
                                 f"there, got {ids}")
            node = root
            for t in ids:
                node = node.setdefault(t, {})
            leaves.setdefault(id(node), []).append(item)

        # Breadth-first numbering: node n's children get consecutive ids, so one CSR suffices.
        order, child_token, child_node, ptr = [root], [], [], [0]
        parent, token, leaf_items = [-1], [-1], {}
        for n, node in enumerate(order):  # `order` grows while we walk it
            for t in sorted(node):
                child_token.append(t)
                child_node.append(len(order))
                parent.append(n)
                token.append(t)
                order.append(node[t])
            ptr.append(len(child_token))
            if id(node) in leaves:
                leaf_items[n] = tuple(sorted(leaves[id(node)]))

        def tensor(x):
            return torch.tensor(x, dtype=torch.long)

        return cls(tensor(ptr), tensor(child_token), tensor(child_node), tensor(parent), tensor(token),
                   leaf_items, eos_id)

    @classmethod
    def from_titles(cls, titles: dict[int, str], prompt_builder) -> "Trie":
        """item id -> title, tokenized by `PromptBuilder.target_ids` (the one source of title ids)."""
        return cls.from_token_ids({i: prompt_builder.target_ids(t) for i, t in titles.items()},
                                  prompt_builder.tokenizer.eos_id)

    def __len__(self) -> int:
        """Number of distinct titles (leaves)."""
        return len(self.leaf_items)

    def item_ids(self) -> list[int]:
        """Every item id the trie decodes to (several per leaf where titles repeat)."""
        return [i for items in self.leaf_items.values() for i in items]

    @property
    def n_nodes(self) -> int:
        return self.parent.shape[0]

    def to(self, device) -> "Trie":
        self.child_ptr, self.child_token, self.child_node, self.parent, self.token = (
            t.to(device) for t in (self.child_ptr, self.child_token, self.child_node, self.parent, self.token))
        return self

    def allowed(self, nodes: torch.Tensor, active: torch.Tensor | None = None) -> Allowed:
        """nodes (M,) -> the tokens each may continue with, padded to the widest of them.

        `active` (M,) bool: rows marked False get no allowed token (dead beams).
        """
        start = self.child_ptr[nodes]                                   # (M,)
        count = self.child_ptr[nodes + 1] - start                       # (M,)
        if active is not None:
            count = count * active
        K = max(int(count.max()), 1)                                    # one sync per call
        slot = torch.arange(K, device=nodes.device)                     # (K,)
        mask = slot[None] < count[:, None]                              # (M, K)
        edge = torch.where(mask, start[:, None] + slot[None], 0)        # (M, K); pad -> edge 0
        return Allowed(self.child_token[edge].masked_fill(~mask, 0),
                       self.child_node[edge].masked_fill(~mask, 0), mask)

    def item_paths(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(node, item) pairs, one for every node on every item's path below the root: the items
        below each node (a title's leaf lists its items; an inner node holds no item of its own).

        Two (P,) int64 tensors on the trie's device, P = sum of the items' token counts; built once.
        """
        if self._item_paths is None or self._item_paths[0].device != self.parent.device:
            nodes, items = [], []
            for leaf, its in self.leaf_items.items():
                path, n = [], leaf
                while n > 0:
                    path.append(n)
                    n = self._parent[n]
                for item in its:
                    nodes += path
                    items += [item] * len(path)
            device = self.parent.device
            self._item_paths = (torch.tensor(nodes, dtype=torch.long, device=device),
                                torch.tensor(items, dtype=torch.long, device=device))
        return self._item_paths

    def subtree_sums(self, item_values: torch.Tensor) -> torch.Tensor:
        """(U, I) values indexed by item id (I > every item id) -> (U, n_nodes): at each node the
        sum of the values of the items below it (root included: the sum over the whole catalogue)."""
        nodes, items = self.item_paths()
        out = item_values.new_zeros(item_values.shape[0], self.n_nodes)
        out.index_add_(1, nodes, item_values[:, items])            # (U, P) -> summed into (U, n_nodes)
        out[:, 0] = item_values[:, torch.unique(items)].sum(-1)
        return out

    def tokens_of(self, node: int) -> list[int]:
        """The token path from the root to `node` (for a leaf: a title's target ids)."""
        path = []
        while node > 0:
            path.append(self._token[node])
            node = self._parent[node]
        return path[::-1]

    def walk(self, ids) -> int | None:
        """Node reached by following token `ids` from the root, or None if they leave the trie."""
        node = 0
        for t in ids:
            node = self._children[node].get(int(t))
            if node is None:
                return None
        return node

    def prefix_nodes(self, ids) -> list[int]:
        """The node *before* each token of a target: node j is reached by ids[:j] (node 0 = root).

        `allowed([node j])` is then the set of tokens that continue some catalogue title after the
        target's first j tokens: the allowed set at target position j (MSL's masked softmax).
        Raises ValueError unless `ids` spell a whole catalogue title (quoted title + EOS).
        """
        nodes, node = [], 0
        for j, t in enumerate(ids):
            nodes.append(node)
            node = self._children[node].get(int(t))
            if node is None:
                raise ValueError(f"target token {j} ({int(t)}) leaves the title trie: {list(map(int, ids))} "
                                 f"is not a catalogue title")
        if node not in self.leaf_items:
            raise ValueError(f"target {list(map(int, ids))} stops inside the title trie: it is only the "
                             f"prefix of a catalogue title (missing EOS?)")
        return nodes

    def target_nodes(self, input_ids: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) ids and target mask -> (N,) node before each target token, on `input_ids`' device.

        Same row-major order as `target_mask.nonzero()` (the order of `loss.token_nll`), so
        `allowed(target_nodes(ids, mask))` gives the allowed set of every target position. One
        device -> host copy of the ids per call; a data pipeline can store `prefix_nodes` per
        example instead and scatter them into a (B, T) tensor like the token groups.
        """
        mask = target_mask.bool().cpu()
        nodes = []
        for b, (row, m) in enumerate(zip(input_ids.cpu(), mask)):
            try:
                nodes += self.prefix_nodes(row[m].tolist())
            except ValueError as e:
                raise ValueError(f"example {b} of the batch: {e}") from None
        return torch.tensor(nodes, dtype=torch.long, device=input_ids.device)

    def _depth(self) -> int:
        depth = [0] * self.n_nodes
        for n, p in enumerate(self._parent):
            if p >= 0:
                depth[n] = depth[p] + 1  # breadth-first ids: a parent comes before its children
        return max(depth)
