"""What communication costs, derived once: the alpha-beta-gamma model of every collective the lab uses.

Notebooks 03, 04 and 06, ``ppu_lab.collectives`` (measurement) and ``ppu_lab.perfmodel`` (the
step-time model) all use these formulas; nothing else writes them.

A message of ``m`` bytes costs ``alpha + beta * m`` (latency, seconds per byte); reducing ``m`` bytes
(adding two operands into one) costs ``gamma * m``. A collective is counted along its critical path
as a :class:`Cost`: ``messages`` (each pays alpha), ``nbytes`` (each pays beta) and ``reduced``
(each pays gamma). Counting is pure combinatorics; :class:`AlphaBeta` turns a count into seconds.

The algorithms are the ones MPICH 4-5 selects by default (its built-in selection tables
``coll_selection.json``, and the CVARs printed by ``mpivars``), for ``p`` ranks,
``L = ceil(log2 p)``, ``q = 2**floor(log2 p)``:

===========  ================================================  =========================================
collective   MPICH default (size: bytes)                        cost (messages, bytes, reduced)
===========  ================================================  =========================================
Send         eager <= 8 KiB, single copy (CMA) above            1, m
Bcast        binomial if p < 8 or m <= 12 KiB; else             L, L m
             scatter + allgather                               2L (ring: L+p-1), 2 (p-1)/p m
Scatter      binomial (m: bytes each rank receives)             L, (p-1) m
Scatterv     linear: the root sends to each rank in turn        p-1, (p-1) m
Allgather    recursive doubling (p a power of 2, p m < 512 KiB) L, (p-1) m
             Bruck (other p, p m < 80 KiB), else ring           L or p-1, (p-1) m
Allreduce    recursive doubling if m <= 8 B (or fewer numbers   L, L m, L m
             than q); else reduce-scatter + allgather           2 log2 q, 2 (q-1)/q m, (q-1)/q m
             (Rabenseifner); p not a power of 2 adds a step     (+2, +2 m, +m)
             before and after
===========  ================================================  =========================================

MPICH documents ``MPIR_CVAR_ALLREDUCE_SHORT_MSG_SIZE = 2048`` B as the Allreduce switch; that is the
rule of MPICH 3 and of its non-blocking ``Iallreduce``; the blocking Allreduce of MPICH 4-5 switches
at 8 B. Every gradient in the lab is far above both. At p = 2 every algorithm is one exchange, so
what shows on one machine is the point-to-point switch (``fit_regimes`` finds it).

The two designs of data-parallel SGD (``ppu_lab.parallel``, ``ppu_lab.train``), per step:

- ``allreduce``: one Allreduce of the gradient (``grad_bytes``).
- ``scatter_allgather`` (the course's): the root ``Scatterv``s the minibatch's rows
  (``batch_bytes`` in all), every rank ``Allgather``s its shard gradient and adds the ``p`` rows:
  ``scatterv(batch_bytes / p) + allgather(grad_bytes) + (p-1) grad_bytes`` reduced. The gradient part
  moves ``(p-1) m`` bytes per rank, an Allreduce ``2 (p-1)/p m``: equal at p = 2, up to p/2 times
  more beyond; the sum is done ``p`` times over (every rank adds all rows).

The model is an estimate, not a bound: it leaves out contention (both directions of an exchange, or
several ranks, sharing one memory bus or link), the copies in and out of MPI's buffers, pickling, and
any other load on the machine; and a fitted alpha and beta carry the error of their fit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: MPICH's default switch points (bytes) used below; see the module docstring.
BCAST_SHORT, BCAST_LONG = 12_288, 524_288
ALLGATHER_SHORT, ALLGATHER_LONG = 81_920, 524_288
ALLREDUCE_SHORT = 8
DESIGNS = ("allreduce", "scatter_allgather")


def _arr(x):
    return np.asarray(x, dtype=float)


@dataclass(frozen=True)
class Cost:
    """Critical-path counts of a communication: ``messages`` (alpha each), ``nbytes`` (beta each),
    ``reduced`` bytes (gamma each) and the ``largest`` single message (which picks a regime of
    :class:`Regimes`). Fields may be NumPy arrays (one entry per message size). Costs add up."""

    messages: object = 0.0
    nbytes: object = 0.0
    reduced: object = 0.0
    largest: object = 0.0

    def __add__(self, other: Cost) -> Cost:
        return Cost(_arr(self.messages) + other.messages, _arr(self.nbytes) + other.nbytes,
                    _arr(self.reduced) + other.reduced, np.maximum(self.largest, other.largest))


def _steps(p: int) -> tuple[int, int, bool]:
    """(L = ceil(log2 p), q = largest power of 2 <= p, p is a power of 2)."""
    if int(p) != p or p < 1:
        raise ValueError(f"the number of ranks must be an integer >= 1; got {p!r}")
    p = int(p)
    return math.ceil(math.log2(p)), 1 << (p.bit_length() - 1), p & (p - 1) == 0


def _bcast_binomial(m, p):
    return (p < 8) | (_arr(m) <= BCAST_SHORT)


def _allgather_logarithmic(m, p):
    pow2 = _steps(p)[2]
    return p * _arr(m) < (ALLGATHER_LONG if pow2 else ALLGATHER_SHORT)  # doubling (or Bruck), else ring


def _allreduce_doubling(m, p, itemsize=4):
    return (_arr(m) <= ALLREDUCE_SHORT) | (_arr(m) < itemsize * _steps(p)[1])


def send(m) -> Cost:
    """One message of ``m`` bytes (``Send``/``Recv``)."""
    m = _arr(m)
    return Cost(np.ones_like(m), m, 0.0 * m, m)


def bcast(m, p: int) -> Cost:
    """``Bcast`` of ``m`` bytes from one root to ``p`` ranks."""
    m, (L, _, pow2) = _arr(m), _steps(p)
    if p == 1:
        return Cost(0 * m, 0 * m, 0 * m, 0 * m)
    binomial = Cost(L + 0 * m, L * m, 0 * m, m)
    ring = (m > BCAST_LONG) if pow2 else (m == m)                      # allgather by ring, else by doubling
    halves = Cost(np.where(ring, L + p - 1, 2 * L), 2 * (p - 1) / p * m, 0 * m, m / 2)  # scatter + allgather
    return _choose(_bcast_binomial(m, p), binomial, halves)


def scatter(m, p: int) -> Cost:
    """``Scatter`` (binomial tree) giving each of ``p`` ranks ``m`` bytes; the root sends ``(p-1) m``."""
    m, (L, _, _) = _arr(m), _steps(p)
    return Cost(L + 0 * m, (p - 1) * m, 0 * m, (p // 2 if p > 1 else 0) * m)


def scatterv(m, p: int) -> Cost:
    """``Scatterv`` (linear): the root sends ``m`` bytes to each of the ``p - 1`` other ranks in turn."""
    m = _arr(m)
    return Cost((p - 1) + 0 * m, (p - 1) * m, 0 * m, (p > 1) * m)


def allgather(m, p: int) -> Cost:
    """``Allgather`` of ``m`` bytes from each of ``p`` ranks: every rank receives ``(p-1) m``."""
    m, (L, _, _) = _arr(m), _steps(p)
    if p == 1:
        return Cost(0 * m, 0 * m, 0 * m, 0 * m)
    logarithmic = _allgather_logarithmic(m, p)
    return Cost(np.where(logarithmic, L, p - 1), (p - 1) * m, 0 * m, np.where(logarithmic, (p // 2) * m, m))


def allreduce(m, p: int, itemsize: int = 4) -> Cost:
    """``Allreduce`` of ``m`` bytes (numbers of ``itemsize`` bytes) on ``p`` ranks, a built-in operation."""
    m, (_, q, pow2) = _arr(m), _steps(p)
    if p == 1:
        return Cost(0 * m, 0 * m, 0 * m, 0 * m)
    k = int(math.log2(q))
    extra = Cost(0 * m, 0 * m, 0 * m, 0 * m) if pow2 else Cost(2 + 0 * m, 2 * m, m, m)  # fold in, send back
    doubling = Cost(k + 0 * m, k * m, k * m, m) + extra
    rabenseifner = Cost(2 * k + 0 * m, 2 * (q - 1) / q * m, (q - 1) / q * m, m / 2) + extra
    return _choose(_allreduce_doubling(m, p, itemsize), doubling, rabenseifner)


def _choose(cond, a: Cost, b: Cost) -> Cost:
    return Cost(*(np.where(cond, x, y) for x, y in zip((a.messages, a.nbytes, a.reduced, a.largest),
                                                         (b.messages, b.nbytes, b.reduced, b.largest))))


def reduce_local(m, count: int) -> Cost:
    """Adding ``count`` vectors of ``m`` bytes on one rank: ``(count - 1) m`` bytes reduced, no message."""
    m = _arr(m)
    return Cost(0 * m, 0 * m, max(count - 1, 0) * m, 0 * m)


def design(name: str, p: int, grad_bytes, batch_bytes=0.0) -> Cost:
    """Communication of one SGD step of a design on ``p`` ranks (see the module docstring).

    ``grad_bytes``: the exchanged gradient buffer; ``batch_bytes``: the global minibatch's data that
    the course's design scatters from the root (ignored by ``allreduce``).
    """
    if name == "allreduce":
        return allreduce(grad_bytes, p)
    if name == "scatter_allgather":
        if p == 1:
            return reduce_local(grad_bytes, 1)
        return scatterv(_arr(batch_bytes) / p, p) + allgather(grad_bytes, p) + reduce_local(grad_bytes, p)
    raise ValueError(f"design must be one of {DESIGNS}; got {name!r}")


def algorithm(name: str, m: float, p: int) -> str:
    """The algorithm MPICH selects by default for collective ``name`` (a key of ``COLLECTIVES``) of ``m`` bytes."""
    if name == "Send":
        return "point-to-point"
    if p == 1:
        return "local copy"
    if name == "Bcast":
        return "binomial" if _bcast_binomial(m, p) else "scatter + allgather"
    if name in ("Allgather", "Allgather + sum"):
        kind = ("recursive doubling" if _steps(p)[2] else "Bruck") if _allgather_logarithmic(m, p) else "ring"
        return kind + (" + sum" if name.endswith("sum") else "")
    if name in ("Allreduce", "pickled allreduce"):
        return "recursive doubling" if _allreduce_doubling(m, p) else "reduce-scatter + allgather"
    return {"Scatter": "binomial", "Scatterv": "linear"}[name]


#: ``name -> cost(m, p)`` for every collective the lab calls (m as in each function's docstring).
COLLECTIVES = {"Send": lambda m, p: send(m), "Bcast": bcast, "Scatter": scatter, "Scatterv": scatterv,
               "Allgather": allgather, "Allgather + sum": lambda m, p: allgather(m, p) + reduce_local(m, p),
               "Allreduce": allreduce, "pickled allreduce": allreduce}  # the model has no term for pickling


# =========================================================================== seconds
@dataclass(frozen=True)
class AlphaBeta:
    """Seconds of a :class:`Cost`: ``alpha`` per message, ``beta`` per byte sent, ``gamma`` per byte reduced.

    ``AlphaBeta(2e-6, 1e-10, 7e-11).allreduce(4 * 28_938, 2)`` is the model's time of the CNN's
    gradient Allreduce on 2 ranks. Every method takes a message size (or an array of them).
    """

    alpha: float
    beta: float
    gamma: float = 0.0

    @property
    def bandwidth(self) -> float:
        """Bytes per second, ``1 / beta``."""
        return 1.0 / self.beta

    def time(self, cost: Cost):
        return self.alpha * _arr(cost.messages) + self.beta * _arr(cost.nbytes) + self.gamma * _arr(cost.reduced)

    def send(self, nbytes):
        return self.time(send(nbytes))

    def bcast(self, nbytes, p: int):
        return self.time(bcast(nbytes, p))

    def scatter(self, nbytes, p: int):
        return self.time(scatter(nbytes, p))

    def allgather(self, nbytes, p: int):
        return self.time(allgather(nbytes, p))

    def allreduce(self, nbytes, p: int):
        return self.time(allreduce(nbytes, p))

    def design(self, name: str, p: int, grad_bytes, batch_bytes=0.0):
        return self.time(design(name, p, grad_bytes, batch_bytes))

    def __str__(self) -> str:
        g = f", gamma = {self.gamma * 1e9:.4f} ns/B reduced" if self.gamma else ""
        return (f"alpha = {self.alpha * 1e6:.2f} us, beta = {self.beta * 1e9:.4f} ns/B "
                f"({self.bandwidth / 1e9:.2f} GB/s){g}")


@dataclass(frozen=True)
class Regimes:
    """Two alpha-beta lines split at ``switch`` bytes: a protocol switch of the MPI library.

    A cost is priced by ``small`` when its largest message is below ``switch``, else by ``large``
    (``fit_regimes`` finds the switch in a ping-pong). Same methods as :class:`AlphaBeta`.
    """

    switch: float
    small: AlphaBeta
    large: AlphaBeta

    @property
    def gamma(self) -> float:
        return self.large.gamma

    def time(self, cost: Cost):
        return np.where(_arr(cost.largest) < self.switch, self.small.time(cost), self.large.time(cost))

    send, bcast, scatter = AlphaBeta.send, AlphaBeta.bcast, AlphaBeta.scatter
    allgather, allreduce, design = AlphaBeta.allgather, AlphaBeta.allreduce, AlphaBeta.design

    def __str__(self) -> str:
        return f"below {self.switch:,.0f} B: {self.small}; from there: {self.large}"


def fit_alpha_beta(nbytes, seconds, gamma: float = 0.0) -> AlphaBeta:
    """Least-squares fit of ``seconds = alpha + beta * nbytes`` in relative error; alpha, beta > 0.

    Relative error (each point weighted by ``1/seconds``) lets the small messages fix alpha and
    the large ones fix beta. If the unconstrained fit gives a non-positive parameter, it is
    refitted with that parameter at a small positive floor. ``gamma`` is carried along (measured
    separately: ``collectives.measure_gamma``).
    """
    m, t = _arr(nbytes), _arr(seconds)
    if m.shape != t.shape or m.ndim != 1 or m.size < 2:
        raise ValueError("nbytes and seconds must be 1-D arrays of the same length >= 2")
    if not (np.isfinite(t).all() and (t > 0).all() and (m > 0).all()):
        raise ValueError("nbytes and seconds must be positive and finite")
    if np.ptp(m) == 0:
        raise ValueError("nbytes must contain at least two different message sizes")
    w = 1.0 / t
    A = np.column_stack([np.ones_like(m), m]) * w[:, None]
    alpha, beta = np.linalg.lstsq(A, t * w, rcond=None)[0]
    if alpha <= 0:  # latency below resolution: keep a floor, refit beta
        alpha = 1e-3 * t.min()
        beta = float(np.sum(w * w * m * (t - alpha)) / np.sum(w * w * m * m))
    if beta <= 0:  # bandwidth beyond resolution: floor beta, refit alpha
        beta = 1e-3 * t.min() / m.max()
        alpha = float(np.sum(w * w * (t - beta * m)) / np.sum(w * w))
    return AlphaBeta(float(alpha), float(beta), float(gamma))


def fit_regimes(nbytes, seconds, gamma: float = 0.0, min_points: int = 4, lowest: float = 1024,
                switch: float | None = None) -> Regimes:
    """Two alpha-beta lines fitted to a ping-pong, split at the library's protocol switch.

    ``switch`` (bytes) given: split there (``collectives.protocol_switch()`` is MPICH's documented one). Otherwise
    every split at a size of at least ``lowest`` bytes that leaves at least ``min_points`` sizes on
    each side is tried (below a kilobyte every message costs about alpha, and noise would choose the
    split) and the one with the smallest total squared relative error wins: where the ping-pong bends.
    The returned ``switch`` is the first size of the upper line.
    """
    m, t = np.asarray(nbytes, dtype=float), np.asarray(seconds, dtype=float)
    order = np.argsort(m)
    m, t = m[order], t[order]
    if m.size < 2 * min_points:
        raise ValueError(f"fit_regimes needs at least {2 * min_points} message sizes ({min_points} on each side "
                         "of a switch)")
    best = None
    splits = range(min_points, m.size - min_points + 1) if switch is None else [int(np.searchsorted(m, switch))]
    for k in splits:
        searched_too_low = switch is None and m[k] < lowest
        if not 1 < k < m.size - 1 or searched_too_low or m[k - 1] == m[k] or np.ptp(m[:k]) == 0 or np.ptp(m[k:]) == 0:
            continue
        lo, hi = fit_alpha_beta(m[:k], t[:k], gamma), fit_alpha_beta(m[k:], t[k:], gamma)
        err = np.sum((lo.send(m[:k]) / t[:k] - 1) ** 2) + np.sum((hi.send(m[k:]) / t[k:] - 1) ** 2)
        if best is None or err < best[0]:
            best = (err, Regimes(float(m[k]), lo, hi))
    if best is None:
        raise ValueError("fit_regimes needs at least two different sizes on each side of a switch")
    return best[1]
