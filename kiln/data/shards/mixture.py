"""`Mixture`: training examples drawn from several token shard sets by weight (`data.sources`).

Each source is its own shard set (prepared from the config with `data.train` set to the
source's path, `source_config`), split into train and held-out documents on its own, and made
into examples (a `ShardDataset`) as a single-source run makes them. The mixture is a dataset of
the same kind (`len`, `ds[i]`, `blocks`, `doc_starts`, `block_position_ids`, `lengths`,
`num_tokens`), so the loop, its seeded order, its cursor and exact resume are unchanged:

- One epoch of the mixture has M = sum of the sources' example counts n_k. Source k gets m_k of
  them, so that its share of the epoch's input tokens is its normalized weight w_k: m_k is
  proportional to w_k / (mean tokens of an example of k) (packed blocks all hold L tokens, so
  there m_k is proportional to w_k), rounded by largest remainder to sum to M.
- Source k's j-th example of epoch e (j < m_k) is its example `perm_k[(e * m_k + j) % n_k]`,
  `perm_k` a permutation of its examples seeded by (seed, k): the epochs walk on along that
  cycle, so a down-weighted source (m_k < n_k) gives the next m_k of its examples each epoch
  (all of them over ceil(n_k / m_k) epochs, none twice before every one was drawn once), and an
  up-weighted one (m_k > n_k) repeats its examples, each floor(m_k / n_k) or one more times an
  epoch.
- These M examples are laid on the positions of the epoch's order (the seeded permutation the
  cursor walks in epoch e), the sources spread evenly along it (source k's j-th at rank
  (j + 1/2) / m_k), and mixture index p is the example at p's position: so every prefix of
  every epoch holds each source's share to within about one example (`for_epoch(e)` is epoch
  e's mapping, made when the epoch starts: O(M)). Each index is two array lookups (`source`,
  `local`: 10 bytes an example; the spread sequence and the sources' permutations keep 16 bytes
  an example and 8 a source example more), fixed by the seed, so the order, the ranks' slices
  and resume stay exact and O(1). With `data.group_by_length` on unpacked examples the order
  depends on the lengths, so the sources lie one after another in index order instead (exact
  over each whole epoch, a random draw within).

Validation concatenates the sources' held-out examples (`Mixture.concat`): each once, the
sources spread evenly, so the first batches (`eval.max_batches`) hold every source; `evaluate`
reads `source` and `names` to record each source's loss (`val_loss/<name>`).
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from kiln.config import RunConfig
    from kiln.config.data import MixtureSource
    from kiln.data import BatchCursor
    from kiln.data.shards.prepare import Prepared

__all__ = ["Mixture", "largest_remainder", "prepare_sources", "source_config", "source_error"]

log = logging.getLogger("kiln")


def source_config(cfg: RunConfig, k: int) -> RunConfig:
    """The run's config for source `k` of `data.sources` alone: `data.train` is its path, so
    its shard set is the one a single-source config of that path prepares."""
    assert cfg.data.sources is not None
    source = cfg.data.sources[k]
    return cfg.replace(**{"data.sources": None, "data.train": source.path})


def source_error(exc: Exception, k: int) -> Exception:
    """`exc` raised for source k's config, naming the source as the user wrote it: a message
    about `data.train` is about `data.sources.<k>.path`; another one gets `data.sources.<k>: `
    before it (the same exception, so its kind and exit code stay)."""
    from kiln.errors import KilnError

    if not isinstance(exc, KilnError) or exc.source is not None:
        return exc
    key = f"data.sources.{k}"

    def named(line: str) -> str:
        if line.startswith("data.train"):
            return line.replace("data.train", f"{key}.path", 1)
        return line if line.startswith(key) else f"{key}: {line}"

    exc.problems = [named(line) for line in exc.problems]
    exc.args = ("\n".join(exc.problems),)
    return exc


def prepare_sources(cfg: RunConfig) -> Iterator[Prepared]:
    """Prepare (or find) every source's shard set, in order, each as it is done (`kiln data
    prepare`).

    Raises:
        KilnError / DataError: one line, naming `data.sources.<k>.path` for a source's files.
    """
    from kiln.data.shards.prepare import prepare_shards

    assert cfg.data.sources is not None
    for k in range(len(cfg.data.sources)):
        sub = source_config(cfg, k)
        try:
            prepared = prepare_shards(sub, shard_tokens=cfg.data.shard_tokens)
        except Exception as exc:
            raise source_error(exc, k) from None
        yield prepared


def largest_remainder(shares: np.ndarray, total: int) -> np.ndarray:
    """Integer counts proportional to `shares` (>= 0, sum > 0) that sum to `total`: the
    floors, plus one each for the largest remainders (ties to the first)."""
    exact = shares / shares.sum() * total
    counts = np.floor(exact).astype(np.int64)
    rest = total - int(counts.sum())
    if rest > 0:
        order = np.argsort(-(exact - counts), kind="stable")
        counts[order[:rest]] += 1
    return counts


def _sequence(counts: np.ndarray, *, spread: bool) -> tuple[np.ndarray, np.ndarray]:
    """(source, j) at each of sum(counts) positions, the j-th of source k's counts[k]: source
    after source, or spread evenly (the j-th of source k at rank (j + 1/2) / counts[k]: merged
    over the sources, each prefix of t positions holds about t * counts[k] / total of k)."""
    source = np.repeat(np.arange(len(counts)), counts)
    j = np.concatenate([np.arange(m, dtype=np.int64) for m in counts])
    if spread:
        keys = np.concatenate([(np.arange(m) + 0.5) / m for m in counts if m])
        order = np.argsort(keys, kind="stable")
        source, j = source[order], j[order]
    return source, j


def _permutation(n: int, seed: int, k: int) -> np.ndarray:
    """Source k's seeded order of its n examples: torch's CPU generator, as the data order
    and the validation split use (not numpy's, whose streams may change between versions),
    seeded apart from the data order."""
    digest = hashlib.blake2b(f"kiln-mixture:{seed}:{k}".encode(), digest_size=8).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
    return torch.randperm(n, generator=gen).numpy()


@dataclass(frozen=True)
class _Epochs:
    """What lays out each epoch of a weighted mixture: the spread sequence of (source, j), the
    sources' seeded permutations (one after another), m_k, n_k, and the epochs' orders."""

    seq_source: np.ndarray
    seq_j: np.ndarray
    perms: np.ndarray
    counts: np.ndarray
    sizes: np.ndarray
    order: Callable[[int], Tensor] | None

    def layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(source, local) of each mixture index in `epoch`."""
        k = self.seq_source
        offsets = np.concatenate([[0], np.cumsum(self.sizes)[:-1]])
        j = (epoch * self.counts[k] + self.seq_j) % np.maximum(self.sizes[k], 1)
        seq_local = self.perms[offsets[k] + j]
        if self.order is None:
            return k, seq_local
        at = self.order(epoch).numpy()  # position t of the epoch draws index at[t]
        source, local = np.empty_like(k), np.empty_like(seq_local)
        source[at], local[at] = k, seq_local
        return source, local


class MixtureBlocks:
    """The (M, L) blocks of a packed `Mixture`, indexed like a tensor by a batch of indices:
    each index read from its source's blocks, the batch in the order asked."""

    def __init__(self, mixture: Mixture, length: int) -> None:
        self._mix = mixture
        self.shape = torch.Size((len(mixture), length))

    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def dim(self) -> int:
        return 2

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, indices: Tensor | int) -> Tensor:
        rows = torch.as_tensor(indices, dtype=torch.int64)
        flat = rows.reshape(-1)
        out = torch.empty((len(flat), self.shape[1]), dtype=torch.int64)
        for k, where, local in self._mix.route(flat):
            out[where] = self._mix.sources[k].blocks[local]
        return out.reshape(*rows.shape, self.shape[1])


class Mixture:
    """The examples of K source datasets, each mixture index mapped to one source example
    (see the module docstring).

    Use `Mixture.weighted(...)` (training) or `Mixture.concat(...)` (validation).

    Args:
        sources: the sources' datasets (`ShardDataset`s of one config: same task and length).
        names: their names (metrics, data_stats.json).
        source: (M,) the source of each mixture index.
        local: (M,) the example of that source at each mixture index.
        weights: the normalized weights, if drawn by weight.
        epochs: how to lay out later epochs (`weighted` makes it), if they differ from this one.
    """

    def __init__(
        self,
        sources: Sequence[Any],
        names: Sequence[str],
        source: np.ndarray,
        local: np.ndarray,
        weights: np.ndarray | None = None,
        epochs: _Epochs | None = None,
    ) -> None:
        self.sources = list(sources)
        self.names = list(names)
        self.source = np.asarray(source, dtype=np.int16 if len(sources) < 1 << 15 else np.int64)
        self.local = np.asarray(local, dtype=np.int64)
        self.weights = weights
        self.sizes = np.array([len(s) for s in self.sources], dtype=np.int64)
        self.counts = np.bincount(self.source, minlength=len(self.sources)).astype(np.int64)
        """(K,) examples of each source in one epoch, m_k."""
        first = self.sources[0]
        self._blocks = None if first.blocks is None else MixtureBlocks(self, first.blocks.shape[1])
        self._seen: tuple[int, int, np.ndarray] | None = None  # tokens_seen's running count
        self._epoch_tokens: dict[int, np.ndarray] = {}
        self._order: tuple[int, Tensor] | None = None  # (epoch, its training order)
        self._epochs = epochs
        self._view: tuple[int, Mixture] | None = None  # the last epoch's mixture

    @classmethod
    def weighted(
        cls,
        sources: Sequence[Any],
        names: Sequence[str],
        weights: Sequence[float],
        seed: int,
        order: Callable[[int], Tensor] | None = None,
    ) -> Mixture:
        """Source k gives the share w_k / sum(w) of each epoch's input tokens: m_k examples
        (largest remainder), its j-th in epoch e being its example perm_k[(e * m_k + j) % n_k]
        (perm_k seeded by (seed, k)). This is epoch 0's mixture; `for_epoch` gives the others.

        `order`: epoch -> the training order of that epoch (a permutation of the M indices):
        the sources are then spread evenly along it, so every prefix of every epoch holds each
        source's share to within about one example. None: source after source (index order).
        """
        w = np.asarray(weights, dtype=np.float64)
        w = w / w.sum()
        sizes = np.array([len(s) for s in sources], dtype=np.int64)
        mean_tokens = np.array([float(s.lengths.double().mean()) for s in sources])
        counts = largest_remainder(w / mean_tokens, int(sizes.sum()))
        for k in np.flatnonzero(counts == 0).tolist():
            log.warning(
                "data.sources.%d (%s): its weight %.3g draws none of the %d examples of an "
                "epoch of the mixture; raise it to train on the source",
                k,
                names[k],
                w[k],
                int(sizes.sum()),
            )
        seq_source, seq_j = _sequence(counts, spread=order is not None)
        perms = [_permutation(int(n), seed, k) for k, n in enumerate(sizes)]
        epochs = _Epochs(seq_source, seq_j, np.concatenate(perms), counts, sizes, order)
        return cls(sources, names, *epochs.layout(0), w, epochs)

    def for_epoch(self, epoch: int) -> Mixture:
        """The mixture of `epoch` (the same sources, counts and names; each source's next
        examples of its cycle, spread along that epoch's order). Epoch 0 is this one; the last
        one asked for is kept."""
        if epoch == 0 or self._epochs is None:
            return self
        if self._view is None or self._view[0] != epoch:
            source, local = self._epochs.layout(epoch)
            view = Mixture(self.sources, self.names, source, local, self.weights)
            self._view = (epoch, view)
        return self._view[1]

    @classmethod
    def concat(cls, sources: Sequence[Any], names: Sequence[str]) -> Mixture:
        """Every example of every source once, each source's in its order, the sources spread
        evenly (validation: the first samples `eval.max_batches` reads hold every source in
        proportion to its size)."""
        sizes = np.array([len(s) for s in sources], dtype=np.int64)
        return cls(sources, names, *_sequence(sizes, spread=True))

    # ---- where a mixture index comes from ------------------------------------------------

    def locate(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source, example of that source) of each mixture index: two (B,) arrays."""
        p = np.asarray(indices, dtype=np.int64)
        if p.size and (p.min() < 0 or p.max() >= len(self)):
            raise IndexError(f"index out of range for {len(self)} examples")
        return self.source[p], self.local[p]

    def route(self, indices: Tensor) -> list[tuple[int, Tensor, Tensor]]:
        """(source k, positions in `indices`, k's example indices) for each source drawn."""
        k, local = self.locate(indices.numpy())
        out = []
        for source in np.unique(k).tolist():
            where = np.flatnonzero(k == source)
            out.append((source, torch.from_numpy(where), torch.from_numpy(local[where])))
        return out

    # ---- the TokenDataset interface ----------------------------------------------------------

    def __len__(self) -> int:
        return int(self.source.size)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} examples")
        k, local = self.locate(np.array([index % n]))
        return self.sources[int(k[0])][int(local[0])]

    @property
    def blocks(self) -> MixtureBlocks | None:
        """The (M, L) blocks, indexable by a batch of indices (packed), else None."""
        return self._blocks

    @property
    def isolates_documents(self) -> bool:
        return self._blocks is not None and self.sources[0].doc_starts is not None

    @cached_property
    def doc_starts(self) -> Tensor | None:  # type: ignore[override]
        """Offsets (D,) into the flattened blocks where packed documents begin, or None.
        Made on first use (O(M + documents)); batches ask `block_position_ids` instead."""
        if not self.isolates_documents:
            return None
        assert self._blocks is not None
        length = self._blocks.shape[1]
        # the sources' blocks numbered one after another, and each block's document starts
        counts, within = [], []
        for source in self.sources:
            starts = source.doc_starts.numpy()
            counts.append(np.bincount(starts // length, minlength=len(source)))
            within.append(starts % length)
        per_block, inside = np.concatenate(counts), np.concatenate(within)
        ptr = np.concatenate([[0], np.cumsum(per_block)])
        block = np.concatenate([[0], np.cumsum(self.sizes)[:-1]])[self.source] + self.local
        count = per_block[block]  # document starts in the block at each mixture index
        p = np.repeat(np.arange(len(self), dtype=np.int64), count)
        # the i-th start of block b is inside[ptr[b] + i]; i counts up within each repeat
        i = np.arange(count.sum(), dtype=np.int64) - np.repeat(np.cumsum(count) - count, count)
        return torch.from_numpy(p * length + inside[np.repeat(ptr[block], count) + i])

    def block_position_ids(self, indices: Tensor) -> Tensor:
        """Position ids (B, L) of the blocks at `indices`, from their sources."""
        if self._blocks is None:
            raise ValueError("block_position_ids needs a blocks dataset (packed causal_lm)")
        out = torch.empty((len(indices), self._blocks.shape[1]), dtype=torch.int64)
        for k, where, local in self.route(indices.to(torch.int64)):
            out[where] = self.sources[k].block_position_ids(local)
        return out

    @property
    def source_rows(self) -> Tensor | None:
        return None

    @property
    def has_labels(self) -> bool:
        return bool(self.sources[0].has_labels)

    @property
    def aligned(self) -> bool:
        return bool(self.sources[0].aligned)

    def without_documents(self) -> Mixture:
        """The same mixture of the sources' blocks without document boundaries."""
        if not self.isolates_documents:
            return self
        sources = [s.without_documents() for s in self.sources]
        return Mixture(sources, self.names, self.source, self.local, self.weights, self._epochs)

    @cached_property
    def lengths(self) -> Tensor:  # type: ignore[override]
        """Length of each example's input_ids, (M,) int64."""
        if self._blocks is not None:  # every block holds L tokens
            return torch.full((len(self),), self._blocks.shape[1], dtype=torch.int64)
        out = torch.empty(len(self), dtype=torch.int64)
        for k, where, local in self.route(torch.arange(len(self))):
            out[where] = self.sources[k].lengths[local]
        return out

    def _per_source(self, values: np.ndarray) -> np.ndarray:
        """(K,) sums of `values` (M,) over each source's indices."""
        out = np.bincount(self.source, weights=values, minlength=len(self.sources))
        return np.rint(out).astype(np.int64)

    @cached_property
    def source_tokens(self) -> np.ndarray:
        """(K,) target tokens of each source in one epoch (as `num_tokens` counts them)."""
        targets = np.zeros(len(self), dtype=np.float64)
        for k, source in enumerate(self.sources):
            where = self.source == k
            targets[where] = _targets(source)[self.local[where]]
        return self._per_source(targets)

    @cached_property
    def source_input_tokens(self) -> np.ndarray:
        """(K,) input tokens of each source in one epoch."""
        return self._per_source(self.lengths.numpy().astype(np.float64))

    @cached_property
    def num_tokens(self) -> int:  # type: ignore[override]
        """Target tokens of one epoch: the sum over sources of their examples' targets."""
        return int(self.source_tokens.sum())

    # ---- tokens seen per source --------------------------------------------------------------

    def tokens_seen(self, cursor: BatchCursor, epoch: int, position: int) -> dict[str, int]:
        """Input tokens drawn from each source (all ranks) up to (epoch, position) of the
        training order `cursor` walks, as `{"tokens_seen/<name>": n}`: the full epochs before
        `epoch` (each computed once), then the first `position` samples of `epoch`.

        Counted from the order alone (no step pays for it); samples a rollback left out
        (train.anomaly) are counted as drawn.
        """
        total = np.zeros(len(self.sources), dtype=np.int64)
        for e in range(epoch):
            if e not in self._epoch_tokens:
                full = cursor.batches_per_epoch * cursor.global_batch
                self._epoch_tokens[e] = self._prefix_tokens(cursor, e, 0, full, None)
            total += self._epoch_tokens[e]
        seen = self._seen
        if seen is None or seen[0] != epoch or seen[1] > position:  # new epoch, or rolled back
            seen = (epoch, 0, np.zeros_like(total))
        now = self._prefix_tokens(cursor, epoch, seen[1], position, seen[2])
        self._seen = (epoch, position, now)
        total += now
        return {f"tokens_seen/{name}": int(n) for name, n in zip(self.names, total, strict=True)}

    def _prefix_tokens(
        self, cursor: BatchCursor, epoch: int, lo: int, hi: int, base: np.ndarray | None
    ) -> np.ndarray:
        """`base` plus the input tokens per source of positions [lo, hi) of epoch's order."""
        from kiln.data.sampler import epoch_permutation, grouped_permutation

        out = np.zeros(len(self.sources), np.int64) if base is None else base.copy()
        if hi <= lo:
            return out
        if self._order is None or self._order[0] != epoch:  # one permutation per epoch
            if cursor.lengths is None:
                perm = epoch_permutation(cursor.n, cursor.seed, epoch)
            else:
                perm = grouped_permutation(cursor.lengths, cursor.global_batch, cursor.seed, epoch)
            self._order = (epoch, perm)
        drawn = self._order[1][lo:hi]
        mixture = self.for_epoch(epoch)
        k = mixture.source[drawn.numpy()]
        weights = mixture.lengths[drawn].numpy().astype(np.float64)
        out += np.rint(np.bincount(k, weights=weights, minlength=len(self.sources))).astype(
            np.int64
        )
        return out

    def stats(self) -> dict[str, dict[str, Any]]:
        """data_stats.json's `sources`: per source its examples and tokens in one epoch, its
        weight and its actual share of the epoch's input tokens."""
        inputs = self.source_input_tokens
        share = inputs / max(int(inputs.sum()), 1)
        out = {}
        for k, name in enumerate(self.names):
            out[name] = {
                "examples": int(self.sizes[k]),
                "train_examples": int(self.counts[k]),
                "train_tokens": int(self.source_tokens[k]),
                "weight": None if self.weights is None else float(self.weights[k]),
                "share": round(float(share[k]), 6),
            }
        return out

    def __repr__(self) -> str:
        parts = ", ".join(f"{n}: {int(m)}" for n, m in zip(self.names, self.counts, strict=True))
        return f"Mixture({len(self)} examples: {parts})"


def _targets(ds: Any) -> np.ndarray:
    """Target tokens of each example of a `ShardDataset`, (n,), as its `num_tokens` counts."""
    if ds.blocks is not None:
        n, length = ds.blocks.shape
        targets = np.full(n, max(length - 1, 0), dtype=np.int64)
        if ds.doc_starts is not None:
            starts = ds.doc_starts.numpy()
            inner = starts[starts % length != 0]  # an isolated document's first token
            targets -= np.bincount(inner // length, minlength=n)
        return targets
    if not ds.has_labels:
        return (ds.lengths - 1).clamp(min=0).numpy().astype(np.int64)
    return ds.example_targets()  # instruction: the masks' response tokens; seq2seq: targets


def weights_of(sources: Sequence[MixtureSource]) -> list[float]:
    """The sources' weights, normalized to sum 1."""
    total = math.fsum(s.weight for s in sources)
    return [s.weight / total for s in sources]
