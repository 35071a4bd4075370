"""Under mpiexec: the designs of notebook 08 are exact where they should be; rank 0 asserts.

Usage: mpiexec -n N python tests/mpi/designs_exact.py MNIST_ROOT      (N >= 2)

Ridge problem (float64), against serial ridge.sgd with the same global minibatches:
- the Allreduce baseline, local SGD with H = 1 (even and uneven shards), top-k with k = all and the
  synchronous parameter server give ridge.sgd's weights to 1e-12 (relative);
- the asynchronous parameter server (unbounded, and bound 0) converges to the closed form: relative
  distance below ASYNC_TOL after 200 global steps (serial SGD at the same step size: about 2e-3);
  with bound 0 no gradient is more than W - 1 updates stale, with one worker none is.
CNN (float32), 5 steps on 300 images, against the Allreduce baseline (itself against train()):
- overlapped Allreduce (bucketed Iallreduce from backward hooks), local SGD H = 1, top-k k = all and
  the synchronous parameter server agree to CNN_RTOL of the largest parameter; the overlapped
  gradient after one step equals the blocking one to float32 rounding;
- a design that fails where it runs raises on the ranks that wait as well (compare);
- what each design counted while it ran (messages, bytes, bytes reduced per step) is what
  designs.compare.design_cost, the cost model of the closing table, says it sends.
"""

import sys

import numpy as np

from ppu_lab import designs, ridge
from ppu_lab.config import limit_threads
from ppu_lab.data import load_mnist, make_ridge_data
from ppu_lab.designs.compare import compare, design_cost
from ppu_lab.models import CNN_NUM_PARAMS
from ppu_lab.mpi import RankError, mpi_main, world
from ppu_lab.train import train

EXACT = 1e-12        # float64: only the summation order differs
ASYNC_TOL = 1e-2     # relative distance to the closed form (start: 1.0)
CNN_RTOL = 1e-4      # float32 after 5 steps, as tests/test_train.py (measured <= 2e-5)


def ridge_checks(comm, W):
    X, y, _ = make_ridge_data(2000, 20, seed=0)
    lam, out = 1.0, {}
    for B in (60, 61):                                   # 61: uneven shards on 2 and 3 ranks
        lr = 0.2 / ridge.minibatch_lipschitz(X, lam, B)
        steps = 2 * -(-2000 // B)
        ref = ridge.sgd(X, y, lam, lr, B, 2, seed=0).w
        for name, opts in (("allreduce", {}), ("local_sgd", {"period": 1}), ("topk", {"ratio": 1.0}),
                           ("ps_sync", {})):
            obj = designs.make_objective("ridge", (X, y), lam=lam, lr=lr, max_rows=B)
            res = designs.run(name, obj, comm, batch_size=B, steps=steps, eval_every=10, **opts)
            out[name, B] = ridge.relative_error(res.params, ref)
    lr, w_star = 0.2 / ridge.minibatch_lipschitz(X, lam, 60), ridge.closed_form(X, y, lam)
    for bound in (None, 0):
        obj = designs.make_objective("ridge", (X, y), lam=lam, lr=lr, max_rows=60)
        res = designs.run("ps_async", obj, comm, batch_size=60, steps=200, eval_every=50, bound=bound)
        out["async", bound] = ridge.relative_error(res.params, w_star), max(res.extra["staleness"])
    return out


def cnn_checks(comm, data):
    kw = dict(batch_size=60, steps=5, eval_every=5)
    params, grads, costs = {}, {}, {}
    for name, opts in (("allreduce", {}), ("overlap", {}), ("local_sgd", {"period": 1}), ("topk", {"ratio": 1.0}),
                       ("ps_sync", {}), ("float16", {}), ("topk", {"ratio": 0.01}), ("local_sgd", {"period": 5})):
        obj = designs.make_objective("cnn", data, max_rows=60)
        res = designs.run(name, obj, comm, **kw, **opts)
        params.setdefault(name, res.params)
        model = design_cost(name, comm.Get_size(), CNN_NUM_PARAMS, 4, buckets=res.extra["buckets"], **opts)
        costs[res.design] = (res.cost_per_step, model)
    for name in ("allreduce", "overlap"):                # one step's summed gradient, same weights
        obj = designs.make_objective("cnn", data, max_rows=60)
        from ppu_lab.designs import overlap, sync

        step = (sync.AllreduceSGD if name == "allreduce" else overlap.Overlapped)(obj, comm)
        step(np.arange(60), 0)
        grads[name] = obj.grad.copy()
    ref = train("cnn", data, batch_size=60, max_steps=5, evaluate=False, comm=comm, progress=False).params
    return params, grads, ref, costs


def failure_reaches_every_rank(comm):
    """A design that fails on the ranks that run it raises on the ranks that wait too (no hang)."""
    def broken():
        raise NameError("name 'wide_mlp' is not defined")

    try:
        compare([("allreduce", {})], broken, comm, workers=1, batch_size=10, steps=1)
    except RankError as exc:
        assert "NameError" in str(exc) and "wide_mlp" in str(exc), str(exc)
    else:
        raise AssertionError("compare did not raise on every rank")


def main():
    comm = world()
    size = comm.Get_size()
    assert size >= 2, "run with 2 or more ranks: the parameter servers need a server and a worker"
    failure_reaches_every_rank(comm)
    r = ridge_checks(comm, size - 1)
    x, y, xt, yt = load_mnist(sys.argv[1], download=False)
    with limit_threads(1, import_torch=True):
        params, grads, ref, costs = cnn_checks(comm, (x[:300], y[:300], xt[:200], yt[:200]))
    if comm.Get_rank() != 0:
        return
    for (name, B), err in r.items():
        if name != "async":
            assert err < EXACT, (name, B, err)
    for bound in (None, 0):
        err, stale = r["async", bound]
        assert err < ASYNC_TOL, (bound, err)
    assert r["async", 0][1] <= size - 2, r["async", 0]   # bound 0: at most W - 1 updates stale
    if size == 2:
        assert r["async", None][1] == 0                  # one worker: never stale
    scale = np.abs(params["allreduce"]).max()
    assert np.abs(params["allreduce"] - ref).max() <= CNN_RTOL * scale, "baseline differs from train()"
    for name in ("overlap", "local_sgd", "topk", "ps_sync"):
        diff = np.abs(params[name] - params["allreduce"]).max() / scale
        assert diff <= CNN_RTOL, (name, diff)
    for name, (counted, model) in costs.items():          # the cost model counts what the code sends
        for field in ("messages", "nbytes", "reduced"):
            assert np.isclose(float(getattr(counted, field)), float(getattr(model, field))), (name, field, counted, model)
    g, g_ref = grads["overlap"], grads["allreduce"]
    assert np.abs(g - g_ref).max() <= 1e-5 * np.abs(g_ref).max(), np.abs(g - g_ref).max()
    worst = max(err for (name, _), err in r.items() if name != "async")
    print(f"designs exact on {size} ranks: ridge max relative error {worst:.1e}, async "
          f"{r['async', None][0]:.1e} / bound 0 {r['async', 0][0]:.1e} (max staleness {r['async', 0][1]})")


if __name__ == "__main__":
    mpi_main(main)
