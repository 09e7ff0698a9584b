"""A seeded evaluation set whose head accuracies are known by construction (`medusa example
--eval-set`), for `medusa eval` and `medusa tree-search` without a base model.

The heads are built so that any logits can be reached: head i's vocab projection is rows
i*V .. (i+1)*V - 1 of one random orthogonal matrix M [hidden, hidden] (which needs
hidden >= heads x vocab), and its ResBlocks are small (x + SiLU(W x + b), |W| well below 1). For
each position and head we choose the rank the right token tokens[t + i + 1] must have (drawn
from designed per-rank probabilities, or a rank beyond the top K), lay out logits d_i with that
token at that rank and clear gaps between the first ranks, and solve for the hidden state x with
M_i ResBlocks_i(x) = d_i for every head at once: x <- x + M^T (d - f(x)) converges because
f(x) = M x + (something with a small Lipschitz constant) and M is orthogonal.

The ranks the float64 oracle finds on the stored (float32) hidden states are then exactly the
chosen ones (`designed_ranks` in the file), and the per-rank frequencies are draws from
`designed_accuracy`. A quantized library ranks near-ties a little differently: that is what its
quantization costs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np

from ..dtypes import NUMPY_DTYPES, to_float64
from ..errors import InputError
from ..spec import MedusaConfig, head_specs
from ..tree_search import RANK_NO_LABEL, RANK_OUTSIDE
from .accuracy import label_ranks
from .oracle import HeadWeights, head_logits

TOP_K = 10
# ResBlock weights: std so that |W| (about 2 std sqrt(hidden)) is 0.1
_LAYER_NORM = 0.1
_BIAS_STD = 0.02
# logits of the first K + 1 ranks fall by this much from rank to rank (the margin a rank has);
# the other ranks spread over _TAIL below them
_GAP = 0.3
_TAIL = 3.0
# how close the reached logits must come to the designed ones (the gaps are 0.3)
_CONVERGED = 1e-8
_MAX_ITERATIONS = 200


def designed_accuracy(num_heads: int, top_k: int = TOP_K) -> np.ndarray:
    """[heads, top_k]: how often head i's right token is drawn at rank r. Top-1 falls with depth
    (0.55, 0.41, ...), later ranks geometrically; head 1's ranks 1 and 2 are swapped, so its
    rank 2 is likelier than its rank 1, which FasterDecoding's greedy tree search cannot take
    first."""
    table = np.zeros((num_heads, top_k))
    for head in range(num_heads):
        top1 = 0.55 * 0.75 ** head
        ratio = 0.3 + 0.05 * head
        table[head] = top1 * ratio ** np.arange(top_k)
    if num_heads > 1 and top_k > 2:
        table[1, [1, 2]] = table[1, [2, 1]]
    return table


@dataclasses.dataclass
class EvalSet:
    # float32 [T, hidden]
    hidden: np.ndarray
    # int32 [T]
    tokens: np.ndarray
    # int32 [T]
    sequence: np.ndarray
    # int32 [T, heads]: the rank of the right token the oracle finds (-1 outside the top K,
    # -2 no right token)
    designed_ranks: np.ndarray
    # [heads, K]: the probabilities those ranks were drawn with
    designed_accuracy: np.ndarray

    def arrays(self) -> dict[str, np.ndarray]:
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}


def check_eval_shape(config: MedusaConfig) -> None:
    needed = config.medusa_num_heads * config.vocab_size
    if config.hidden_size < needed:
        raise InputError(
            f"--eval-set: an evaluation set needs hidden_size >= heads x vocab ({needed}); this "
            f"preset has hidden {config.hidden_size}; use --preset eval-tiny")
    if config.hidden_size > 4096:
        raise InputError(f"--eval-set: hidden {config.hidden_size} is larger than an evaluation "
                         "set is built for (4096); use --preset eval-tiny")


def _rng(seed: int, what: int) -> np.random.Generator:
    return np.random.default_rng([seed, 0xE7A1, what])


def eval_weights(config: MedusaConfig, dtype: str, seed: int, bias: bool) -> dict[str, np.ndarray]:
    """Every head tensor of the designed checkpoint by its spec name, in `dtype`."""
    check_eval_shape(config)
    hidden, vocab = config.hidden_size, config.vocab_size
    rng = _rng(seed, 0)
    orthogonal, _ = np.linalg.qr(rng.standard_normal((hidden, hidden)))  # [hidden, hidden]
    layer_std = _LAYER_NORM / (2 * np.sqrt(hidden))
    out = {}
    for head in head_specs(config):
        for linear in head.resblocks:
            out[linear.weight] = rng.standard_normal((hidden, hidden)) * layer_std
            out[linear.bias] = rng.standard_normal(hidden) * _BIAS_STD if bias else np.zeros(hidden)
        out[head.lm_head.weight] = orthogonal[head.index * vocab:(head.index + 1) * vocab]
    return {name: array.astype(NUMPY_DTYPES[dtype]) for name, array in out.items()}


def _heads(config: MedusaConfig, weights: dict[str, np.ndarray]) -> Iterator[HeadWeights]:
    for head in head_specs(config):
        yield HeadWeights(
            layers=[(to_float64(weights[linear.weight]), to_float64(weights[linear.bias]))
                    for linear in head.resblocks],
            lm_head=to_float64(weights[head.lm_head.weight]))


def _target_logits(rng: np.random.Generator, vocab: int, target: int, rank: int) -> np.ndarray:
    """Logits [vocab] with token `target` at `rank` (any token anywhere when target < 0): the
    first K + 1 ranks _GAP apart, the rest spread below with the same margin, all centred on 0
    (small logits keep the hidden states, and so a quantized head's error, realistic)."""
    firsts = min(TOP_K + 1, vocab)
    values = np.empty(vocab)
    values[:firsts] = -_GAP * np.arange(firsts)
    low = values[firsts - 1] - _GAP
    values[firsts:] = np.sort(rng.uniform(low - _TAIL, low, vocab - firsts))[::-1]
    values -= values.mean()
    order = rng.permutation(vocab)  # order[k]: the token at rank k
    if target >= 0:
        others = order[order != target]
        order = np.concatenate([others[:rank], [target], others[rank:]])
    logits = np.empty(vocab)
    logits[order] = values
    return logits


def make_eval_set(config: MedusaConfig, weights: dict[str, np.ndarray], positions: int,
                  sequence_length: int, seed: int) -> EvalSet:
    """`positions` positions in sequences of `sequence_length`, for the heads in `weights`."""
    if positions < 2 or sequence_length < 2:
        raise InputError(f"--eval-positions {positions}, sequences of {sequence_length}: need at "
                         "least 2 of each")
    heads = list(_heads(config, weights))
    num_heads, vocab = config.medusa_num_heads, config.vocab_size
    accuracy = designed_accuracy(num_heads)
    rng = _rng(seed, 1)
    tokens = rng.integers(0, vocab, positions)
    sequence = np.arange(positions) // sequence_length
    # draws over ranks 0..K-1 and "outside" (rank K .. vocab - 1)
    outside = 1.0 - accuracy.sum(axis=1, keepdims=True)
    choices = np.concatenate([accuracy, outside], axis=1)  # [heads, K + 1]
    targets = np.empty((positions, num_heads, vocab))  # [T, heads, vocab]
    intended = np.full((positions, num_heads), RANK_NO_LABEL, dtype=np.int32)
    for t in range(positions):
        for i in range(num_heads):
            ahead = t + i + 1
            if ahead < positions and sequence[ahead] == sequence[t]:
                rank = int(rng.choice(TOP_K + 1, p=choices[i]))
                if rank == TOP_K:
                    rank = int(rng.integers(TOP_K, vocab))
                targets[t, i] = _target_logits(rng, vocab, int(tokens[ahead]), rank)
                intended[t, i] = rank if rank < TOP_K else RANK_OUTSIDE
            else:
                targets[t, i] = _target_logits(rng, vocab, -1, 0)

    # M [hidden, hidden]: the heads' projections stacked, then the rows no head uses
    projection = np.concatenate([h.lm_head for h in heads])  # [heads * vocab, hidden]
    wanted = targets.reshape(positions, num_heads * vocab)  # [T, heads * vocab]
    x = wanted @ projection  # the solution without ResBlocks, [T, hidden]
    for _ in range(_MAX_ITERATIONS):
        reached = np.concatenate([head_logits(h, x) for h in heads], axis=1)  # [T, heads*vocab]
        residual = wanted - reached
        if np.abs(residual).max() < _CONVERGED:
            break
        x = x + residual @ projection
    else:
        raise RuntimeError("the evaluation set's hidden states did not converge")
    hidden_states = x.astype(np.float32)

    # the ranks the oracle will find on the stored states
    ranks = np.full((positions, num_heads), RANK_NO_LABEL, dtype=np.int32)
    for i, head in enumerate(heads):
        labels = np.full(positions, RANK_NO_LABEL)
        ahead = i + 1
        same = sequence[ahead:] == sequence[:-ahead]
        labels[np.flatnonzero(same)] = tokens[np.flatnonzero(same) + ahead]
        rows = np.flatnonzero(labels != RANK_NO_LABEL)
        logits = head_logits(head, to_float64(hidden_states[rows]))
        ranks[rows, i] = label_ranks(logits, labels[rows], TOP_K)
    if not np.array_equal(ranks, intended):
        raise RuntimeError("the evaluation set's hidden states miss their designed ranks")
    return EvalSet(hidden=hidden_states, tokens=tokens.astype(np.int32),
                   sequence=sequence.astype(np.int32), designed_ranks=ranks,
                   designed_accuracy=accuracy)

