"""The Grain input pipeline: documents -> objective -> packed fixed-length rows -> this process's share of a
global batch that is the same whatever the number of processes or workers.

Batches are dicts of numpy arrays [local_batch, T] (per-row values [local_batch]); padding is 0 everywhere
(token 0, weight 0, segment 0, False), so a padding row carries no loss. Keys, by model family:
  decoder (causal_lm; prefix_lm, span_corruption add prefix_mask bool):
      inputs, targets int32 | weights float32 | segment_ids, positions int32
  encoder_decoder (prefix_lm, span_corruption), encoder side [B, Te], decoder side [B, Td]:
      encoder_inputs, encoder_segment_ids, encoder_positions | decoder_inputs, decoder_targets int32,
      decoder_weights float32, decoder_segment_ids, decoder_positions
  encoder (mlm): inputs, targets, token_type_ids int32 | weights float32 | segment_ids, positions int32;
      with NSP (one example per row) also nsp_labels [B] int32 and nsp_weights [B] float32 (0 = padding row)
segment_ids number the examples of a row 1, 2, ... (0 = padding) and positions restart at 0 in each; the
encoder and decoder sides of example k both have segment k. `batch_spec` gives the shapes of a global batch.

Row streams: row r of every global batch comes from stream r, which reads the documents at global positions
q = r, r + B, r + 2B, ... (B = global batch size) of the endless sequence of epochs, each epoch a fresh
seeded permutation of the split; it applies the objective to them with an rng seeded by (seed, q) and packs
the examples into rows (first fit over a short window, see make_train_iterator's pack_window). Process p of
P builds only streams [p*B/P, (p+1)*B/P); worker w of W builds every W-th of those. The streams' positions
are the whole iterator state.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import grain
import jax
import numpy as np
from absl import flags

from llmjax.data.packing import feature_side, pack
from llmjax.data.shards import TOKENIZER_FILE, TokenShards, load_manifest
from llmjax.data.tokenizer import Tokenizer
from llmjax.data.vocab import SpecialIds
from llmjax.objectives import check_family, make_objective

# Domain tags so that the shuffle seeds and the example seeds never coincide for the same numbers.
_SHUFFLE_TAG, _EXAMPLE_TAG = 0x5348, 0x4558
# Each part of the pipeline sends the stream positions after its rows along with them, so that the state of
# what was *consumed* is known exactly however many batches the workers have prepared ahead.
_POSITION = "_stream_position"


# ----------------------------------------------------------------------------------------------- objective
def _nsp(objective) -> bool:
    return bool(getattr(objective.config, "nsp", False))


def _whole_word(objective) -> bool:
    return bool(getattr(objective.config, "whole_word", False))


def _apply(objective, documents, rng, word_starts):
    if _whole_word(objective):
        return objective(documents, rng, word_starts=word_starts)
    return objective(documents, rng)


def _padding_row(objective, length) -> dict[str, np.ndarray]:
    """One row of zeros with every feature (and dtype) that `objective`'s packed rows have."""
    ids = objective.ids
    regular = ids.first_sentinel - ids.num_regular  # a token every objective may corrupt or mask
    documents = [np.full(16, regular, np.int32), np.full(16, regular, np.int32)]  # NSP needs two documents
    examples = _apply(objective, documents, np.random.default_rng(0), lambda t: np.ones(len(t), bool))
    row = {k: np.zeros_like(v[0]) for k, v in pack(examples[:1], length).items()}
    if "nsp_labels" in row:
        row["nsp_weights"] = np.zeros((), np.float32)
    return row


def batch_spec(objective, global_batch_size: int, length: int | Mapping[str, int] | None = None) -> dict:
    """{key: jax.ShapeDtypeStruct} of one global batch: [global_batch_size, T] per token, [global_batch_size]
    per row. `length` defaults to `objective.pack_length`, as in the iterators."""
    row = _padding_row(objective, objective.pack_length if length is None else length)
    return {k: jax.ShapeDtypeStruct((global_batch_size, *v.shape), v.dtype) for k, v in sorted(row.items())}


# ------------------------------------------------------------------------------------------------ the plan
class _Plan:
    """What every row stream shares: documents, objective, order and row layout. Pickled into the workers."""

    def __init__(self, source, objective, *, global_batch_size: int, seed: int, length, pack_window: int,
                 shuffle: bool, tokenizer_path: Path | None):
        self.source, self.objective, self.pack_window = source, objective, pack_window
        self.global_batch_size, self.seed, self.shuffle = global_batch_size, seed, shuffle
        self.num_documents = len(source)
        self.length = objective.pack_length if length is None else length
        self.padding = _padding_row(objective, self.length)
        self.capacity = {feature_side(k): v.shape[0] for k, v in self.padding.items() if v.ndim == 1}
        self.one_per_row = any(v.ndim == 0 for v in self.padding.values())  # a per-example value (NSP label)
        # NSP draws a random next segment from another document of the same objective call.
        self.group_size = 2 if _nsp(objective) else 1
        self.tokenizer_path = tokenizer_path
        self._word_starts = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_word_starts"] = None  # the tokenizer is reloaded in the worker
        return state

    def document(self, q: int) -> int:
        """Index in the source of the document at global position q (epoch q // N, place q % N)."""
        if not self.shuffle:
            return q
        epoch, place = divmod(q, self.num_documents)
        epoch_seed = int(np.random.SeedSequence([_SHUFFLE_TAG, self.seed, epoch]).generate_state(1)[0])
        return int(grain.experimental.index_shuffle(place, self.num_documents - 1, epoch_seed, 4))

    def group(self, stream: int, g: int) -> list[int] | None:
        """Global positions of the documents of group g of `stream`; None once a one-pass stream is done."""
        k, B = self.group_size, self.global_batch_size
        if self.shuffle:
            return [stream + (g * k + i) * B for i in range(k)]
        n = len(range(stream, self.num_documents, B))
        groups = max(1, n // k) if n else 0
        if g >= groups:
            return None
        stop = n if g == groups - 1 else (g + 1) * k  # a short tail joins the last group
        return [stream + i * B for i in range(g * k, stop)]

    def examples(self, positions: list[int]) -> list[dict[str, np.ndarray]]:
        documents = [self.source[self.document(q)] for q in positions]
        rng = np.random.default_rng([_EXAMPLE_TAG, self.seed, positions[0]])
        examples = _apply(self.objective, documents, rng, self.word_starts() if _whole_word(self.objective) else None)
        return [ex for ex in examples if any(np.ndim(v) == 1 and len(v) for v in ex.values())]

    def word_starts(self):
        if self._word_starts is None:
            self._word_starts = Tokenizer.load(self.tokenizer_path).word_starts
        return self._word_starts


# ------------------------------------------------------------------------------------------ row streams
@dataclasses.dataclass(slots=True)
class _Entry:
    group: int
    index: int  # in its group's examples
    example: dict[str, np.ndarray]
    need: dict[str, int]  # tokens per side
    taken: bool = False  # packed into a row already


class _RowStream:
    """Stream r: its examples, in order, packed first-fit: a row starts with the oldest example not yet in a
    row and takes each later one that still fits, until `pack_window` of them did not (or the row is full).
    Position [g, c, ahead]: the oldest example not in a row is example c of group g, and bit j of `ahead` is
    set if the j-th example after it is in a row already."""

    def __init__(self, plan: _Plan, stream: int, group: int = 0, index: int = 0, ahead: int = 0):
        self.plan, self.stream = plan, stream
        self._restore: list[int] | None = [group, index, ahead]  # applied on first use: a new stream reads nothing
        self._buffer: collections.deque[_Entry] = collections.deque()  # from the oldest example not in a row
        self._next_group, self._skip = group, index

    @property
    def position(self) -> list[int]:
        if self._restore is not None:
            return list(self._restore)
        if not self._buffer:
            return [self._next_group, 0, 0]
        head = self._buffer[0]
        return [head.group, head.index, sum(1 << j for j, e in enumerate(self._buffer) if e.taken)]

    def _fill(self, n: int) -> bool:
        """Loads examples until the buffer holds n; False if a one-pass stream ends first."""
        empty_groups = 0
        while len(self._buffer) < n:
            positions = self.plan.group(self.stream, self._next_group)
            if positions is None:
                return False
            examples = self.plan.examples(positions)
            for i in range(self._skip, len(examples)):
                need = {feature_side(k): len(v) for k, v in examples[i].items() if np.ndim(v) == 1}
                self._buffer.append(_Entry(self._next_group, i, examples[i], need))
            empty_groups = 0 if len(examples) > self._skip else empty_groups + 1
            if empty_groups > self.plan.num_documents:  # an endless stream would loop forever
                raise ValueError(f"no document of the {self.plan.num_documents} gives a "
                                 f"{self.plan.objective.name} example (are they all too short?)")
            self._next_group, self._skip = self._next_group + 1, 0
        return True

    def next_row(self) -> dict[str, np.ndarray] | None:
        """The next packed row [T] (per-row values []), or None when a one-pass stream is exhausted."""
        if self._restore is not None:
            ahead, self._restore = self._restore[2], None
            self._fill(ahead.bit_length())
            for j, entry in enumerate(self._buffer):
                entry.taken = bool(ahead >> j & 1)
        capacity = self.plan.capacity
        taken, used, misses, j = [], dict.fromkeys(capacity, 0), 0, 0
        while misses < self.plan.pack_window and all(used[s] < capacity[s] for s in used) and self._fill(j + 1):
            entry = self._buffer[j]
            j += 1
            if entry.taken:
                continue
            if taken and any(used[s] + n > capacity[s] for s, n in entry.need.items()):
                misses += 1
                continue
            entry.taken = True
            taken.append(entry.example)
            used = {s: used[s] + entry.need.get(s, 0) for s in used}
            if self.plan.one_per_row:
                break
        while self._buffer and self._buffer[0].taken:
            self._buffer.popleft()
        if not taken:
            return None
        # Fits by construction; a lone example longer than the row is cut to it (overflow="truncate").
        row = {k: v[0] for k, v in pack(taken, self.plan.length, strategy="sequential").items()}
        if "nsp_weights" in self.plan.padding:
            row["nsp_weights"] = np.ones((), np.float32)
        return row


class _RowsDataset(grain.IterDataset):
    """Batches of the rows of some streams, one row each per step, without end (padding after a one-pass
    stream is exhausted). Each element also carries the streams' positions after its rows."""

    def __init__(self, plan: _Plan, streams: Sequence[int], positions: Sequence[Sequence[int]]):
        super().__init__()
        self._plan, self._streams, self._positions = plan, list(streams), [list(p) for p in positions]

    def __iter__(self) -> _RowsIterator:
        return _RowsIterator(self._plan, self._streams, self._positions)


class _RowsIterator(grain.DatasetIterator):
    def __init__(self, plan: _Plan, streams: list[int], positions: list[list[int]]):
        super().__init__()
        self._plan, self._stream_ids = plan, streams
        self.set_state({"positions": positions})

    def __next__(self) -> dict[str, np.ndarray]:
        rows = [row if (row := s.next_row()) is not None else self._plan.padding for s in self._streams]
        batch = {k: np.stack([row[k] for row in rows]) for k in self._plan.padding}
        batch[_POSITION] = [s.position for s in self._streams]  # python ints: `ahead` may need > 64 bits
        return batch

    def get_state(self) -> dict:
        return {"positions": [s.position for s in self._streams]}

    def set_state(self, state: dict) -> None:
        self._streams = [_RowStream(self._plan, r, *p) for r, p in zip(self._stream_ids, state["positions"])]


def _interleave_rows(parts: tuple[dict, ...]) -> dict:
    """Worker w built the rows w, w + W, ...: put them back in stream order."""
    n, workers = sum(len(p[_POSITION]) for p in parts), len(parts)
    out = {_POSITION: [None] * n}
    for k, v in parts[0].items():
        if k != _POSITION:
            out[k] = np.empty((n, *v.shape[1:]), v.dtype)
        for w, part in enumerate(parts):
            out[k][w::workers] = part[k]
    return out


# ------------------------------------------------------------------------------------------- the iterator
class BatchIterator(grain.DatasetIterator):
    """This process's batches. get_state() is a small JSON-able dict (the positions of this process's
    streams); set_state() continues with exactly the batch that followed it, whatever num_workers is. A
    state saved by another process count restores too, if it covers this process's streams (e.g. the
    process states merged). Works with grain.checkpoint.CheckpointHandler (Orbax)."""

    def __init__(self, plan: _Plan, streams: range, *, num_batches: int | None, num_workers: int, prefetch: int):
        super().__init__()
        self._plan, self._streams = plan, streams
        self.num_batches, self.num_workers, self.prefetch = num_batches, num_workers, prefetch
        self._positions = [[0, 0, 0] for _ in streams]
        self._step = 0
        self._it = None

    @property
    def local_batch_size(self) -> int:
        return len(self._streams)

    def _build(self):
        workers = min(self.num_workers, len(self._streams))
        if workers == 0:
            return iter(_RowsDataset(self._plan, self._streams, self._positions))
        if not flags.FLAGS.is_parsed():
            # Grain reads its absl flags when starting workers; a program that does not use absl never parsed
            # them, so they take their defaults.
            flags.FLAGS.mark_as_parsed()
        options = grain.MultiprocessingOptions(num_workers=1, per_worker_buffer_size=self.prefetch)
        parts = [
            _RowsDataset(self._plan, self._streams[w::workers], self._positions[w::workers]).mp_prefetch(options)
            for w in range(workers)
        ]
        return iter(grain.experimental.ZipIterDataset(parts).map(_interleave_rows))

    def __next__(self) -> dict[str, np.ndarray]:
        if self.num_batches is not None and self._step >= self.num_batches:
            self._close_pipeline()
            raise StopIteration
        if self._it is None:
            self._it = self._build()
        batch = next(self._it)
        self._positions = batch.pop(_POSITION)
        self._step += 1
        return batch

    def _config(self) -> dict:
        """What a state is valid for."""
        plan = self._plan
        return {"seed": plan.seed, "global_batch_size": plan.global_batch_size, "documents": plan.num_documents}

    def get_state(self) -> dict:
        return {**self._config(), "step": self._step, "first_stream": self._streams[0],
                "positions": [list(p) for p in self._positions]}

    def set_state(self, state: Mapping) -> None:
        for key, value in self._config().items():
            if state.get(key) != value:
                raise ValueError(f"cannot restore the data iterator: the state has {key}={state.get(key)!r}, this "
                                 f"pipeline {key}={value!r}; restore with the configuration that saved it")
        first = self._streams[0] - int(state["first_stream"])
        positions = list(state["positions"])[max(first, 0) : first + len(self._streams)]
        if first < 0 or len(positions) != len(self._streams):
            have = range(int(state["first_stream"]), int(state["first_stream"]) + len(state["positions"]))
            raise ValueError(f"cannot restore the data iterator: the state holds row streams [{have.start}, "
                             f"{have.stop}) but this process builds [{self._streams.start}, {self._streams.stop})")
        self._close_pipeline()
        self._positions = [[int(g), int(i), int(ahead)] for g, i, ahead in positions]
        self._step = int(state["step"])

    def start_prefetch(self) -> None:
        if self._it is None:
            self._it = self._build()
        self._it.start_prefetch()

    def _close_pipeline(self) -> None:
        if self._it is not None:
            self._it.close()
            self._it = None

    def close(self) -> None:
        self._close_pipeline()
        super().close()

    def __str__(self) -> str:
        return (f"BatchIterator({self._plan.objective.name}, streams [{self._streams.start}, {self._streams.stop}) "
                f"of {self._plan.global_batch_size}, step {self._step})")


# ------------------------------------------------------------------------------------------ construction
def _open(data, split: str):
    if isinstance(data, (str, os.PathLike)):
        return TokenShards(data, split)
    if not (hasattr(data, "__len__") and hasattr(data, "__getitem__")):
        raise TypeError(f"data must be a prepared-data directory, TokenShards or a sequence of token arrays, "
                        f"got {type(data).__name__}")
    return data


def _resolve_objective(objective, family, objective_config, source):
    manifest = load_manifest(source.directory) if isinstance(source, TokenShards) else None
    if isinstance(objective, str):
        if family is None:
            raise ValueError(f"objective {objective!r} is given by name: pass family= (the model family)")
        if manifest is None:
            raise ValueError(f"objective {objective!r} is given by name, but the special ids come from the "
                             "prepared data's manifest: pass a data directory or TokenShards, or an objective")
        tokenizer = manifest["tokenizer"]
        ids = SpecialIds(tokenizer["vocab_size"], tokenizer["num_sentinels"])
        return make_objective(objective, ids, family, **dict(objective_config or {}))
    if objective_config:
        raise ValueError("objective_config applies only when the objective is given by name")
    if family is not None:
        check_family(objective.name, family)
        if objective.family != family:
            raise ValueError(f"the {objective.name} objective was built for the {objective.family!r} family but "
                             f"family={family!r}; build it with make_objective(..., family={family!r})")
    if manifest is not None:
        tokenizer = manifest["tokenizer"]
        have = (objective.ids.vocab_size, objective.ids.num_sentinels)
        want = (tokenizer["vocab_size"], tokenizer["num_sentinels"])
        if have != want:
            raise ValueError(f"the objective's special ids are for vocab_size={have[0]}, num_sentinels={have[1]} "
                             f"but {source.directory} has vocab_size={want[0]}, num_sentinels={want[1]}")
    return objective


def _make(data, objective, *, split, shuffle, global_batch_size, seed, family, objective_config, length,
          pack_window, process_index, process_count, num_workers, prefetch, num_batches):
    for name, value, low in (("global_batch_size", global_batch_size, 1), ("seed", seed, 0),
                             ("pack_window", pack_window, 1), ("num_workers", num_workers, 0),
                             ("prefetch", prefetch, 1)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if process_index is None or process_count is None:
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
    if global_batch_size % process_count:
        raise ValueError(f"global_batch_size={global_batch_size} is not divisible by process_count="
                         f"{process_count}: each process builds global_batch_size / process_count rows; make "
                         f"global_batch_size a multiple of {process_count}")
    source = _open(data, split)
    objective = _resolve_objective(objective, family, objective_config, source)
    what = f"{source.directory} split {split!r}" if isinstance(source, TokenShards) else "the data"
    if len(source) == 0:
        raise ValueError(f"{what} has no documents")
    tokenizer_path = None
    if _whole_word(objective):
        if not isinstance(source, TokenShards):
            raise ValueError("mlm.whole_word needs the tokenizer of prepared data: pass a data directory")
        tokenizer_path = source.directory / TOKENIZER_FILE
    if not shuffle and _nsp(objective) and len(source) < 2 * global_batch_size:
        raise ValueError(f"mlm.nsp draws random next segments from another document of the same row stream, so "
                         f"each of the global_batch_size={global_batch_size} streams needs 2 documents but "
                         f"{what} has {len(source)}; evaluate with a smaller global_batch_size")
    plan = _Plan(source, objective, global_batch_size=global_batch_size, seed=seed, length=length,
                 pack_window=pack_window, shuffle=shuffle, tokenizer_path=tokenizer_path)
    if not shuffle and num_batches is None:
        num_batches = _count_batches(plan)
    local = global_batch_size // process_count
    streams = range(process_index * local, (process_index + 1) * local)
    return BatchIterator(plan, streams, num_batches=num_batches, num_workers=num_workers, prefetch=prefetch)


def _count_batches(plan: _Plan) -> int:
    """Batches in one pass: the longest stream's row count. Counted over *all* streams, so that every
    process runs the same number of evaluation steps."""
    longest = 0
    for r in range(plan.global_batch_size):
        stream, rows = _RowStream(plan, r), 0
        while stream.next_row() is not None:
            rows += 1
        longest = max(longest, rows)
    return longest


def make_train_iterator(
    data,
    objective,
    *,
    global_batch_size: int,
    seed: int = 0,
    family: str | None = None,
    objective_config: Mapping | None = None,
    length: int | Mapping[str, int] | None = None,
    pack_window: int = 8,
    process_index: int | None = None,
    process_count: int | None = None,
    num_workers: int = 0,
    prefetch: int = 2,
    split: str = "train",
) -> BatchIterator:
    """Endless training batches of this process: [global_batch_size / process_count, T] per token key.

    data: a prepared-data directory (see llmjax.data.prepare), a TokenShards, or any sequence of 1-D token
      arrays. objective: an objective (make_objective) or its name, then built for `family` with
      `objective_config` and the manifest's special ids; `family` also checks the objective can train it.
    length: row length (int, or {"encoder": Te, "decoder": Td}); default objective.pack_length.
    pack_window: a row is closed once this many later examples did not fit in it (1 = strictly in order;
      more packs denser, but reads that many examples ahead).
    process_index/process_count: default jax.process_index()/jax.process_count().
    num_workers: processes building rows (each a 1/num_workers share of the streams, `prefetch` batches
      ahead); 0 builds them inline. The batches do not depend on it.
    """
    return _make(data, objective, split=split, shuffle=True, global_batch_size=global_batch_size, seed=seed,
                 family=family, objective_config=objective_config, length=length, pack_window=pack_window,
                 process_index=process_index, process_count=process_count, num_workers=num_workers,
                 prefetch=prefetch, num_batches=None)


def make_eval_iterator(
    data,
    objective,
    *,
    global_batch_size: int,
    num_batches: int | None = None,
    seed: int = 0,
    family: str | None = None,
    objective_config: Mapping | None = None,
    length: int | Mapping[str, int] | None = None,
    pack_window: int = 8,
    process_index: int | None = None,
    process_count: int | None = None,
    num_workers: int = 0,
    prefetch: int = 2,
    split: str = "validation",
) -> BatchIterator:
    """One deterministic pass over `split` in document order (stream r reads documents r, r + B, ...), in
    the layout of make_train_iterator. Exhausted streams give padding rows (weights 0). num_batches: stop
    after exactly that many batches (padding ones included); None = until every stream of the global batch
    is exhausted, counted upfront with one extra pass over the split (`.num_batches` keeps the count, pass
    it back to skip that pass next time). Other arguments as make_train_iterator."""
    if num_batches is not None and (not isinstance(num_batches, (int, np.integer)) or num_batches < 0):
        raise ValueError(f"num_batches must be None or an int >= 0, got {num_batches!r}")
    return _make(data, objective, split=split, shuffle=False, global_batch_size=global_batch_size, seed=seed,
                 family=family, objective_config=objective_config, length=length, pack_window=pack_window,
                 process_index=process_index, process_count=process_count, num_workers=num_workers,
                 prefetch=prefetch, num_batches=num_batches)
