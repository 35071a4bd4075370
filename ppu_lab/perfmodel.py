"""How long one data-parallel SGD step takes on p ranks, predicted before it is measured (notebooks 04, 06, 07).

    T(p) = T_compute(p) + T_serial + T_comm(p)

- ``T_compute(p) = per_row * shard(p)``: the work the ranks share, proportional to the rows a rank
  handles (``ceil(B / p)`` of a global batch ``B``; ``b`` of a per-rank batch ``b``). With a global
  batch this is the textbook ``T_compute / p``.
- ``T_serial``: what no number of ranks shortens: the update, Python's per-step overhead, the root
  packing the minibatch (course design). Measured on 1 rank.
- ``T_comm(p)``: the design's collectives in the alpha-beta-gamma model of ``ppu_lab.costmodel``
  (``AlphaBeta.design``), zero on 1 rank.

:class:`StepModel` holds the measured ``per_row`` and ``serial`` of one workload and predicts
``time(p, net)``, ``speedup(p, net)`` (samples per second relative to 1 rank) and ``peak(net)`` for
any network ``net`` (an ``AlphaBeta``): the one fitted on this machine, or :func:`cluster` ones.
Amdahl's law is the special case without communication: :func:`amdahl_speedup`.

Stable API (used by notebooks 04, 06, 07 and ``benchmarks/perfmodel.py``)::

    StepModel(per_row, serial, batch, design="allreduce", grad_bytes=0, row_bytes=0, batch_mode="global")
    StepModel.from_parts(compute, serial, batch, **kw)     # compute: seconds of the shared part at p = 1
    ridge_model(run_1, batch, d), train_model({batch: seconds}, grad_bytes, batch)  # from 1-rank runs
    fit_batch_line(batches, seconds) -> (serial, per_row)  # T(B) = serial + per_row * B at p = 1
    cluster(gbit_per_s, latency, gamma=0.0) -> AlphaBeta;  networks(here) -> {name: AlphaBeta}
    model.time(p, net), model.speedup(p, net), model.parts(p, net), model.peak(net, p_max)
    compare(model, net, measured) -> rows;  format_compare(rows), format_speedups(...)
    amdahl_speedup(p, f)
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ppu_lab.costmodel import DESIGNS, AlphaBeta

#: Assumed one-way MPI latencies (seconds) of the two clusters of the lab's predictions: MPI over
#: TCP on 10 Gb/s Ethernet pays the kernel's network stack on both sides (typically 10-50 us; 25 us
#: assumed); MPI over 100 Gb/s InfiniBand bypasses the kernel (typically 1-2 us; 1.5 us assumed).
#: Both are parameters of :func:`cluster`: change them to your cluster's ping-pong.
LATENCY_10G, LATENCY_100G = 25e-6, 1.5e-6


def cluster(gbit_per_s: float, latency: float, gamma: float = 0.0) -> AlphaBeta:
    """A network of ``gbit_per_s`` Gb/s line rate and ``latency`` seconds: ``AlphaBeta(latency, 8 / rate)``.

    The line rate is an upper bound on what MPI achieves (headers, protocol), so its beta is optimistic.
    ``gamma``: seconds per byte reduced, a property of the cores (take this machine's).
    """
    if gbit_per_s <= 0 or latency < 0:
        raise ValueError("gbit_per_s must be > 0 and latency >= 0")
    return AlphaBeta(float(latency), 8.0 / (gbit_per_s * 1e9), float(gamma))


def networks(here: AlphaBeta) -> dict[str, AlphaBeta]:
    """This machine's fitted model and two clusters with its gamma (one rank per node, as the course assumes)."""
    return {"this machine": here, "10 Gb/s Ethernet": cluster(10, LATENCY_10G, here.gamma),
            "100 Gb/s InfiniBand": cluster(100, LATENCY_100G, here.gamma)}


def amdahl_speedup(p, serial_fraction: float):
    """Amdahl's law, S(p) = 1 / (f + (1 - f) / p): a StepModel without communication, f = serial / T(1)."""
    p = np.asarray(p, dtype=float)
    return 1.0 / (serial_fraction + (1.0 - serial_fraction) / p)


def fit_batch_line(batches, seconds) -> tuple[float, float]:
    """Least-squares line ``seconds = serial + per_row * batch`` through 1-rank step times; both >= 0."""
    b, t = np.asarray(batches, dtype=float), np.asarray(seconds, dtype=float)
    if b.shape != t.shape or b.ndim != 1 or np.unique(b).size < 2:
        raise ValueError("fit_batch_line needs step times at two or more different batch sizes")
    per_row, serial = np.polyfit(b, t, 1)
    if serial < 0:  # no fixed cost seen: a line through the origin
        serial, per_row = 0.0, float(b @ t / (b @ b))
    return float(serial), float(max(per_row, 0.0))


@dataclass(frozen=True)
class StepModel:
    """The step-time model of one workload (see the module docstring).

    per_row: seconds of shared work per row of the batch (one rank); serial: seconds per step no rank
    count shortens; batch: the global batch (``batch_mode="global"``, rows split over the ranks) or
    each rank's batch (``"per_rank"``); design: ``"allreduce"`` or ``"scatter_allgather"``;
    grad_bytes: the exchanged gradient buffer; row_bytes: one row of data (what the course's design
    scatters per row).
    """

    per_row: float
    serial: float
    batch: int
    design: str = "allreduce"
    grad_bytes: float = 0.0
    row_bytes: float = 0.0
    batch_mode: str = "global"

    def __post_init__(self):
        if self.design not in DESIGNS:
            raise ValueError(f"design must be one of {DESIGNS}; got {self.design!r}")
        if self.batch_mode not in ("global", "per_rank"):
            raise ValueError(f"batch_mode must be 'global' or 'per_rank'; got {self.batch_mode!r}")
        if self.batch < 1 or self.per_row < 0 or self.serial < 0:
            raise ValueError("batch must be >= 1 and per_row, serial >= 0")

    @classmethod
    def from_parts(cls, compute: float, serial: float, batch: int, **kw) -> StepModel:
        """From a 1-rank step split by its timers: ``compute`` seconds of shared work for ``batch`` rows."""
        return cls(per_row=compute / batch, serial=serial, batch=int(batch), **kw)

    def with_batch(self, batch: int, batch_mode: str | None = None) -> StepModel:
        return replace(self, batch=int(batch), batch_mode=batch_mode or self.batch_mode)

    def _p(self, p):
        p = np.asarray(p, dtype=float)
        if np.any(p < 1) or np.any(p != np.round(p)):
            raise ValueError(f"ranks must be integers >= 1; got {p}")
        if self.batch_mode == "global" and np.any(p > self.batch):
            raise ValueError(f"a global batch of {self.batch} rows gives no row to some of {int(p.max())} "
                             "ranks: predict for p <= batch, or use batch_mode='per_rank'")
        return p

    def global_batch(self, p):
        p = self._p(p)
        return self.batch * (p if self.batch_mode == "per_rank" else 1.0 + 0 * p)

    def parts(self, p, net: AlphaBeta) -> dict:
        """Seconds per step on ``p`` ranks, by part: ``compute``, ``serial``, ``comm`` and ``total``."""
        p = self._p(p)
        shard = np.ceil(self.batch / p) if self.batch_mode == "global" else self.batch + 0 * p
        batch_bytes = self.row_bytes * self.global_batch(p)
        comm = np.array([net.design(self.design, int(q), self.grad_bytes, b)
                         for q, b in zip(np.ravel(p), np.ravel(batch_bytes))]).reshape(p.shape)
        compute = self.per_row * shard
        return {"compute": compute, "serial": self.serial + 0 * p, "comm": comm,
                "total": compute + self.serial + comm}

    def time(self, p, net: AlphaBeta):
        """Predicted seconds per step on ``p`` ranks."""
        return self.parts(p, net)["total"]

    def speedup(self, p, net: AlphaBeta):
        """Samples per second on ``p`` ranks over those on 1 rank (= T(1)/T(p) for a global batch)."""
        return (self.global_batch(p) / self.time(p, net)) / (self.global_batch(1) / self.time(1, net))

    def peak(self, net: AlphaBeta, p_max: int = 1024) -> tuple[int, float]:
        """``(p, S)``: the rank count up to ``p_max`` with the largest predicted speedup, and that speedup."""
        top = min(int(p_max), self.batch) if self.batch_mode == "global" else int(p_max)
        ranks = np.arange(1, top + 1)
        s = self.speedup(ranks, net)
        return int(ranks[np.argmax(s)]), float(s.max())

    def serial_fraction(self) -> float:
        """Amdahl's f on 1 rank: ``serial / T(1)``."""
        return self.serial / (self.serial + self.per_row * self.batch)


def ridge_model(run: dict, batch: int, d: int) -> StepModel:
    """The model of a ridge design (notebook 04) from its 1-rank ``parallel.time_steps`` run.

    Shared work: the shard gradient (``compute - update``); serial: the update and, for the course's
    design, rank 0 packing the minibatch (its 1-rank ``comm``). The gradient is ``d`` float64 numbers,
    a row of ``[X | y]`` is ``d + 1``.
    """
    if run["ranks"] != 1:
        raise ValueError(f"ridge_model needs the 1-rank run; got one on {run['ranks']} ranks")
    return StepModel.from_parts(run["compute"] - run["update"], run["update"] + run["comm"], batch,
                                design=run["design"], grad_bytes=8 * d, row_bytes=8 * (d + 1))


def train_model(steps: dict, grad_bytes: float, batch: int, **kw) -> StepModel:
    """The model of ``train`` (ANN, CNN) from 1-rank median step times at two or more batch sizes.

    ``steps``: ``{batch size: seconds per step}``. The line through them (``fit_batch_line``) splits a
    step into a part per row and a fixed part (Python, the update, the framework's per-call cost),
    which no number of ranks shortens.
    """
    serial, per_row = fit_batch_line(list(steps), list(steps.values()))
    return StepModel(per_row, serial, int(batch), grad_bytes=grad_bytes, **kw)


def compare(model: StepModel, net: AlphaBeta, measured: dict) -> list[dict]:
    """Rows ``{ranks, predicted, measured, ratio}`` (seconds per step; ratio = measured / predicted)."""
    rows = []
    for p, t in sorted(measured.items()):
        pred = float(model.time(p, net))
        rows.append({"ranks": int(p), "predicted": pred, "measured": float(t), "ratio": float(t) / pred})
    return rows


def format_compare(rows, title: str = "", cores: int | None = None) -> str:
    """:func:`compare`'s rows as text, in ms; ranks beyond ``cores`` are marked oversubscribed."""
    lines = [title] if title else []
    lines.append(f"{'ranks':>5} {'predicted ms':>13} {'measured ms':>12} {'measured/predicted':>19}")
    for r in rows:
        note = "  (oversubscribed)" if cores is not None and r["ranks"] > cores else ""
        lines.append(f"{r['ranks']:>5} {1e3 * r['predicted']:>13.3f} {1e3 * r['measured']:>12.3f} "
                     f"{r['ratio']:>19.2f}{note}")
    return "\n".join(lines)


def speedup_table(models: dict, nets: dict, ranks=(2, 8, 64, 256, 1024)) -> list[dict]:
    """Predicted speedups: one row per (workload, network) with ``{p: S}`` and the peak (p, S) up to max(ranks)."""
    rows = []
    for name, model in models.items():
        for net_name, net in nets.items():
            usable = [p for p in ranks if model.batch_mode == "per_rank" or p <= model.batch]
            s = model.speedup(usable, net) if usable else []
            rows.append({"workload": name, "network": net_name, "speedup": dict(zip(usable, map(float, s))),
                         "peak": model.peak(net, max(ranks))})
    return rows


def format_speedups(rows, ranks=(2, 8, 64, 256, 1024)) -> str:
    """:func:`speedup_table`'s rows as text ('-': more ranks than rows in the global batch)."""
    head = f"{'workload':<28} {'network':<20}" + "".join(f"{'p=' + str(p):>8}" for p in ranks) + "   peak (p, S)"
    lines = [head, "-" * len(head)]
    for r in rows:
        cells = "".join(f"{r['speedup'][p]:>8.1f}" if p in r["speedup"] else f"{'-':>8}" for p in ranks)
        lines.append(f"{r['workload']:<28} {r['network']:<20}{cells}   ({r['peak'][0]}, {r['peak'][1]:.1f})")
    return "\n".join(lines)
