"""Pack variable-length examples into fixed-length rows with segment ids and positions, and unpack them again."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

# A feature belongs to the encoder side ("encoder_inputs"), the decoder side ("decoder_targets") or, for
# decoder-only and encoder-only examples, the single stream ("inputs"), whose side is "".
ENCODER, DECODER, SINGLE = "encoder", "decoder", ""
STRATEGIES = ("first_fit", "sequential")
OVERFLOWS = ("truncate", "split")


def feature_side(key: str) -> str:
    for side in (ENCODER, DECODER):
        if key.startswith(side + "_"):
            return side
    return SINGLE


def _prefixed(side: str, name: str) -> str:
    return f"{side}_{name}" if side else name


def _row_lengths(length: int | Mapping[str, int], sides: set[str]) -> dict[str, int]:
    if isinstance(length, Mapping):
        lengths = dict(length)
        if set(lengths) != {ENCODER, DECODER} or sides != {ENCODER, DECODER}:
            raise ValueError(
                f"pack: a length mapping must have exactly the keys 'encoder' and 'decoder' and the examples "
                f"encoder_*/decoder_* features; got length keys {sorted(lengths)} for example sides {sorted(sides)}"
            )
    else:
        if sides != {SINGLE}:
            raise ValueError(
                "pack: encoder-decoder examples need length={'encoder': Te, 'decoder': Td}, got a single length "
                f"{length}"
            )
        lengths = {SINGLE: length}
    for side, n in lengths.items():
        if not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"pack: row length for side {side or 'inputs'!r} must be a positive int, got {n!r}")
    return {s: int(n) for s, n in lengths.items()}


def pack(
    examples: Sequence[Mapping[str, np.ndarray]],
    length: int | Mapping[str, int],
    *,
    strategy: str = "first_fit",
    overflow: str = "truncate",
) -> dict[str, np.ndarray]:
    """Pack unpacked examples into rows; returns a dict of [R, T] arrays (and [R] for per-example scalars).

    Every example must have the same features: 1-D per-token arrays (all of one side the same length) and
    optionally 0-d per-example values such as nsp_labels. `length` is the row length T for single-stream
    examples or {"encoder": Te, "decoder": Td} for encoder-decoder ones. Added per side: `segment_ids` (1, 2, ...
    per example in the row, 0 = padding) and `positions` (restarting at 0 in each segment), prefixed with
    `encoder_`/`decoder_` for encoder-decoder. Padding is 0 in every feature (pad id, weight 0, False).

    strategy: "first_fit" puts each example in the first row with room on every side (denser);
      "sequential" only ever fills the newest row (keeps example order, like a streaming packer).
    overflow: an example longer than its row is "truncate"d (each side cut to its row length, the tail
      dropped) or "split" into consecutive row-length pieces, each its own segment with positions from 0
      (single-stream examples without per-example values only: a split encoder-decoder pair would lose its
      alignment).
    Examples with a per-example value each get their own row, since that value is stored once per row.
    Examples with no tokens on any side are dropped. Rows are in order of creation; no rows -> {}.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"pack: unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if overflow not in OVERFLOWS:
        raise ValueError(f"pack: unknown overflow {overflow!r}; choose one of {', '.join(OVERFLOWS)}")
    if not examples:
        return {}
    keys = sorted(examples[0])
    token_keys = [k for k in keys if np.ndim(examples[0][k]) == 1]
    scalar_keys = [k for k in keys if np.ndim(examples[0][k]) == 0]
    if len(token_keys) + len(scalar_keys) != len(keys):
        raise ValueError(f"pack: features must be 1-D per token or 0-d per example; got {keys}")
    sides = {feature_side(k) for k in token_keys}
    rows_len = _row_lengths(length, sides)
    for side in sides:
        for name in ("segment_ids", "positions"):
            if _prefixed(side, name) in keys:
                raise ValueError(f"pack: examples already have {_prefixed(side, name)!r}; pack adds it")
    if overflow == "split" and (sides != {SINGLE} or scalar_keys):
        raise ValueError(
            "pack: overflow='split' only works for single-stream examples without per-example values; "
            "use overflow='truncate'"
        )

    # items: (example index, {side: (start, stop)}) -- the pieces to place.
    items: list[tuple[int, dict[str, tuple[int, int]]]] = []
    for i, ex in enumerate(examples):
        if sorted(ex) != keys:
            raise ValueError(f"pack: example {i} has features {sorted(ex)}, example 0 has {keys}")
        side_len = {}
        for k in token_keys:
            n = len(ex[k])
            if side_len.setdefault(feature_side(k), n) != n:
                raise ValueError(
                    f"pack: example {i}: {k!r} has length {n} but other features of its side have "
                    f"{side_len[feature_side(k)]}"
                )
        if not any(side_len.values()):
            continue
        if overflow == "split":
            n, t = side_len[SINGLE], rows_len[SINGLE]
            items += [(i, {SINGLE: (a, min(a + t, n))}) for a in range(0, n, t)]
        else:
            items.append((i, {s: (0, min(n, rows_len[s])) for s, n in side_len.items()}))

    order = sorted(sides)
    capacity = np.array([rows_len[s] for s in order])  # [S]
    used = np.zeros((len(items), len(order)), np.int64)  # [R_max, S] tokens used; never more rows than items
    rows: list[list[int]] = []  # item indices per row
    for j, (_, span) in enumerate(items):
        need = np.array([span[s][1] - span[s][0] for s in order])
        fits = np.all(used[: len(rows)] + need <= capacity, axis=1)
        if scalar_keys:  # one example per row
            fits[:] = False
        elif strategy == "sequential":
            fits[: max(0, len(rows) - 1)] = False
        hit = np.flatnonzero(fits)
        r = int(hit[0]) if len(hit) else len(rows)
        if r == len(rows):
            rows.append([])
        rows[r].append(j)
        used[r] += need

    out: dict[str, np.ndarray] = {}
    for k in token_keys:
        out[k] = np.zeros((len(rows), rows_len[feature_side(k)]), np.asarray(examples[0][k]).dtype)
    for k in scalar_keys:
        out[k] = np.zeros((len(rows),), np.asarray(examples[0][k]).dtype)
    for side in sides:
        out[_prefixed(side, "segment_ids")] = np.zeros((len(rows), rows_len[side]), np.int32)
        out[_prefixed(side, "positions")] = np.zeros((len(rows), rows_len[side]), np.int32)
    side_keys = {side: [k for k in token_keys if feature_side(k) == side] for side in sides}
    for r, row in enumerate(rows):
        offset = dict.fromkeys(sides, 0)
        for seg, j in enumerate(row, start=1):
            i, span = items[j]
            for k in scalar_keys:
                out[k][r] = examples[i][k]
            for side, (a, b) in span.items():
                o, n = offset[side], b - a
                out[_prefixed(side, "segment_ids")][r, o : o + n] = seg
                out[_prefixed(side, "positions")][r, o : o + n] = np.arange(n)
                for k in side_keys[side]:
                    out[k][r, o : o + n] = examples[i][k][a:b]
                offset[side] += n
    return out


def unpack(packed: Mapping[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """Inverse of `pack` (up to truncation/splitting): the examples of a packed row [T] or batch [R, T], in
    row order and segment order, without segment_ids/positions. Segment k of the encoder side and of the
    decoder side of a row form one example."""
    sides = [s for s in (SINGLE, ENCODER, DECODER) if _prefixed(s, "segment_ids") in packed]
    if not sides:
        raise ValueError(f"unpack: no segment_ids / encoder_segment_ids in features {sorted(packed)}")
    segments = {s: np.asarray(packed[_prefixed(s, "segment_ids")]) for s in sides}
    batched = segments[sides[0]].ndim == 2
    added = {_prefixed(s, n) for s in sides for n in ("segment_ids", "positions")}
    features = {k: np.asarray(v) for k, v in packed.items() if k not in added}
    if not batched:  # one row: add the batch axis
        segments = {s: v[None] for s, v in segments.items()}
        features = {k: v[None] for k, v in features.items()}
    examples = []
    for r in range(segments[sides[0]].shape[0]):
        for seg in range(1, 1 + max(int(segments[s][r].max(initial=0)) for s in sides)):
            ex = {}
            for k, v in features.items():
                if v.ndim == 1:  # per-example value
                    ex[k] = v[r]
                else:
                    ex[k] = v[r][segments[feature_side(k)][r] == seg]
            examples.append(ex)
    return examples
