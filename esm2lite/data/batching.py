"""Batches: records grouped by length under a token budget, padded or packed into tensors.

    make_batches   indices -> length-bucketed batches, max(len) * len(batch) <= batch_tokens
                   (packed: sum(len) <= batch_tokens)
    collate        records -> a Batch (model/batch.py): padded [B, T] or packed [1, N] tokens, encoded targets
    Batches        the training stream: every rank's next batch, epoch after epoch, resumable
"""

import numpy as np

from esm2lite.tasks.labels import LabelSpace
from esm2lite.data.records import Record
from esm2lite.model.batch import Batch


def _greedy(order: np.ndarray, lengths: np.ndarray, batch_tokens: int, packed: bool) -> list[list[int]]:
    """Indices sorted by decreasing length -> batches that fill the budget in that order. A batch's
    cost: its tokens with padding, max(len) * len(batch); packed, its real tokens, sum(len)."""
    batches, cur, cur_max, cur_sum = [], [], 0, 0
    for i in order.tolist():
        n = int(lengths[i])
        cost = cur_sum + n if packed else max(cur_max, n) * (len(cur) + 1)
        if cur and cost > batch_tokens:
            batches.append(cur)
            cur, cur_max, cur_sum = [], 0, 0
        cur.append(i)
        cur_max, cur_sum = max(cur_max, n), cur_sum + n
    if cur:
        batches.append(cur)
    return batches


def make_batches(lengths: list[int], batch_tokens: int, shuffle: bool, seed: int = 0,
                 epoch: int = 0, packed: bool = False) -> list[list[int]]:
    """Indices grouped into length-bucketed batches with max(len) * len(batch) <= batch_tokens, or
    for packed batches sum(len) <= batch_tokens: the real tokens, no padding (a sequence longer than
    the budget goes alone). `lengths` are token counts.

    shuffle=False: longest first, ties by index (so an out-of-memory shows at once).
    shuffle=True: the indices are permuted with a generator seeded by (seed, epoch), cut
    into chunks of about 50 batches, each chunk sorted by length (random tie-breaks) and
    batched, and then the order of all batches is permuted. Same (seed, epoch) -> same
    batches; every index appears exactly once.
    """
    if int(batch_tokens) < 1:
        raise ValueError(f"batch_tokens must be positive, got {batch_tokens}")
    lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
    n = len(lengths)
    if n == 0:
        return []
    if not shuffle:
        return _greedy(np.lexsort((np.arange(n), -lengths)), lengths, batch_tokens, packed)
    rng = np.random.default_rng([int(seed), int(epoch)])
    perm = rng.permutation(n)
    per_batch = max(1, int(batch_tokens) // max(1, int(np.mean(lengths))))
    chunk = max(1, 50 * per_batch)
    batches = []
    for start in range(0, n, chunk):
        part = perm[start: start + chunk]
        # stable sort by decreasing length keeps the random order among equal lengths
        batches += _greedy(part[np.argsort(-lengths[part], kind="stable")], lengths, batch_tokens, packed)
    return [batches[k] for k in rng.permutation(len(batches))]


def collate(records: list[Record], label_space: LabelSpace | None, packed: bool = False) -> Batch:
    """A Batch: tokens [B, T] right-padded with <pad> (packed: [1, N], end to end), and the encoded
    targets (LabelSpace.encode, the same in both layouts) when a label space is given."""
    target = label_space.encode(records) if label_space is not None else None
    return Batch.of_rows([r.tokens for r in records], packed, target)


class Batches:
    """One global, endless stream of training batches, epoch by epoch, each epoch reshuffled
    from (seed, epoch). Every call hands each of the `world` ranks its own next batch, so over
    all ranks every row is used once per epoch. The position (epoch, index) is global: it is
    the resumable state, valid for any number of ranks. `cfg` gives batch_tokens and seed."""

    def __init__(self, records, cfg, labels: LabelSpace, rank: int = 0, world: int = 1, packed: bool = False):
        self.records, self.labels, self.packed = records, labels, packed
        self.batch_tokens, self.seed = cfg.batch_tokens, cfg.seed
        self.rank, self.world = rank, world
        self.lengths = [len(r.tokens) for r in records]
        self.epoch, self.index = 0, 0
        self._order, self._order_epoch = None, None

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        return make_batches(self.lengths, self.batch_tokens, shuffle=True, seed=self.seed, epoch=epoch,
                            packed=self.packed)

    def __len__(self) -> int:
        return len(self.epoch_batches(0))

    def _take(self) -> list[int]:
        if self._order_epoch != self.epoch:
            self._order, self._order_epoch = self.epoch_batches(self.epoch), self.epoch
        if self.index >= len(self._order):
            self.epoch, self.index = self.epoch + 1, 0
            return self._take()
        self.index += 1
        return self._order[self.index - 1]

    def next_indices(self) -> list[int]:
        """This rank's record indices for the next micro-batch (every rank advances the stream)."""
        return [self._take() for _ in range(self.world)][self.rank]

    def next(self) -> Batch:
        return collate([self.records[i] for i in self.next_indices()], self.labels, self.packed)
