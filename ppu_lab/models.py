"""The two MNIST models of the course (notebooks 05 and 06), as pure functions of a flat parameter vector.

Both minimise the same objective, a sum over samples like the ridge objective J of ``ppu_lab.ridge``:

    J(theta) = sum_i CE(f(x_i; theta), y_i) + lam/2 * ||weights||^2        (biases not penalised)

so that a minibatch B of a training set of N samples gives the unbiased gradient estimate

    g_B = (N / |B|) * sum_{i in B} grad CE_i + lam * mask * theta,          E[g_B] = grad J

(``combine``). The data term ``sum_{i in B} grad CE_i`` is what each MPI rank computes on its shard
(``AnnModel.loss_grad`` / ``CnnModel.loss_grad``); the sums over ranks are added by one Allreduce
(``ppu_lab.train``). Nothing here communicates.

- **ANN** (NumPy, float64): 784 -> h (sigmoid by default) -> 10, softmax + cross-entropy,
  backpropagation derived by hand (``ann_loss_grad``), 795*h + 10 parameters.
- **CNN** (PyTorch, float32): Conv2d(1,16,5,p=2) -> ReLU -> MaxPool2 -> Conv2d(16,32,5,p=2) -> ReLU
  -> MaxPool2 -> Linear(1568,10), 28,938 parameters. Its parameters and gradients are *views* into two
  flat preallocated buffers (``flatten_module``), so one Allreduce moves every gradient and one vector
  operation updates every parameter, with no per-step allocation.
"""

from __future__ import annotations

import numpy as np

N_IN, N_OUT = 28 * 28, 10


# =========================================================================== ANN (NumPy)
def ann_num_params(hidden: int) -> int:
    """784*h + h (layer 1) + 10*h + 10 (layer 2) = 795*h + 10."""
    return (N_IN + 1) * hidden + (hidden + 1) * N_OUT


def ann_unpack(theta: np.ndarray, hidden: int):
    """Views ``(W1 (h,784), b1 (h,), W2 (10,h), b2 (10,))`` into the flat vector ``theta`` (no copy)."""
    h = hidden
    if theta.shape != (ann_num_params(h),):
        raise ValueError(f"theta must have shape ({ann_num_params(h)},) for hidden={h}; got {theta.shape}")
    o1 = N_IN * h
    o2 = o1 + h
    o3 = o2 + N_OUT * h
    return theta[:o1].reshape(h, N_IN), theta[o1:o2], theta[o2:o3].reshape(N_OUT, h), theta[o3:]


def ann_weight_mask(hidden: int) -> np.ndarray:
    """1.0 where theta holds a weight (penalised by L2), 0.0 for biases."""
    mask = np.zeros(ann_num_params(hidden))
    W1, b1, W2, b2 = ann_unpack(mask, hidden)
    W1[:] = 1.0
    W2[:] = 1.0
    return mask


def ann_init(hidden: int, seed: int = 0, dtype=np.float64) -> np.ndarray:
    """Glorot-uniform weights, zero biases, from ``seed`` (the same on every rank)."""
    rng = np.random.default_rng(seed)
    theta = np.zeros(ann_num_params(hidden), dtype=dtype)
    W1, _, W2, _ = ann_unpack(theta, hidden)
    for W in (W1, W2):
        a = np.sqrt(6.0 / sum(W.shape))
        W[:] = rng.uniform(-a, a, size=W.shape)
    return theta


# activation name -> (f(z), f'(z) written in terms of a = f(z) and z)
def _sigmoid(z):
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # overflow-free logistic


ACTIVATIONS = {
    "sigmoid": (_sigmoid, lambda a, z: a * (1.0 - a)),
    "tanh": (np.tanh, lambda a, z: 1.0 - a * a),
    "relu": (lambda z: np.maximum(z, 0.0), lambda a, z: (z > 0).astype(z.dtype)),
}


def _activation(name):
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}; got {name!r}")
    return ACTIVATIONS[name]


def ann_forward(theta, X, hidden, activation="sigmoid"):
    """Logits (B, 10) of a batch X (B, 784) (or (B, 28, 28))."""
    W1, b1, W2, b2 = ann_unpack(theta, hidden)
    X = X.reshape(len(X), -1)
    A = _activation(activation)[0](X @ W1.T + b1)  # (B, h)
    return A @ W2.T + b2  # (B, 10)


def _log_softmax(Z):
    Z = Z - Z.max(axis=1, keepdims=True)
    return Z - np.log(np.exp(Z).sum(axis=1, keepdims=True))


def ann_loss_grad(theta, X, y, hidden, activation="sigmoid", out=None):
    """Summed cross-entropy of the batch and its gradient (data term only, no L2, no scaling).

    Backpropagation by hand, for logits Z2 = act(X W1^T + b1) W2^T + b2:

        dZ2 = softmax(Z2) - onehot(y)        (B, 10)
        dW2 = dZ2^T A,  db2 = sum_i dZ2      A = act(Z1), (B, h)
        dZ1 = (dZ2 W2) * act'(Z1)            (B, h)
        dW1 = dZ1^T X,  db1 = sum_i dZ1

    Writes the gradient into ``out`` (a flat vector like theta; allocated if None) and returns
    ``(loss_sum, out)``. An empty batch gives loss 0 and zero gradient. The same function serves
    serial, threaded and MPI training.
    """
    f, fprime = _activation(activation)
    out = np.empty_like(theta) if out is None else out
    gW1, gb1, gW2, gb2 = ann_unpack(out, hidden)
    W1, b1, W2, b2 = ann_unpack(theta, hidden)
    X = X.reshape(len(X), -1)
    Z1 = X @ W1.T + b1  # (B, h)
    A = f(Z1)
    logp = _log_softmax(A @ W2.T + b2)  # (B, 10)
    rows = np.arange(len(y))
    loss = -float(logp[rows, y].sum())
    dZ2 = np.exp(logp)
    dZ2[rows, y] -= 1.0  # (B, 10)
    np.matmul(dZ2.T, A, out=gW2)
    gb2[:] = dZ2.sum(axis=0)
    dZ1 = (dZ2 @ W2) * fprime(A, Z1)  # (B, h)
    np.matmul(dZ1.T, X, out=gW1)
    gb1[:] = dZ1.sum(axis=0)
    return loss, out


def ann_objective(theta, X, y, hidden, lam=5.0, activation="sigmoid"):
    """J(theta) = summed cross-entropy over (X, y) + lam/2 ||W1||^2 + lam/2 ||W2||^2."""
    W1, _, W2, _ = ann_unpack(theta, hidden)
    loss, _ = ann_loss_grad(theta, X, y, hidden, activation)
    return loss + 0.5 * lam * (float((W1 * W1).sum()) + float((W2 * W2).sum()))


def ann_gradient(theta, X, y, hidden, lam=5.0, activation="sigmoid"):
    """grad J(theta) on the full (X, y): data gradient + lam * mask * theta (no scaling)."""
    _, g = ann_loss_grad(theta, X, y, hidden, activation)
    return g + lam * ann_weight_mask(hidden) * theta


def combine(theta, data_grad_sum, lam, mask, n_total, n_batch, out=None):
    """Unbiased minibatch gradient (N/|B|) * data_grad_sum + lam * mask * theta (into ``out``)."""
    out = np.empty_like(theta) if out is None else out
    np.multiply(data_grad_sum, n_total / n_batch, out=out)
    out += lam * mask * theta
    return out


def ann_autograd(theta, X, y, hidden, lam=5.0, activation="sigmoid"):
    """grad J(theta) by ``torch.autograd`` (float64): the independent reference for ``ann_gradient``.

    Returns the flat gradient (same layout as ``theta``). Used by ``gradient_check`` and by the checks
    of notebook 05's backpropagation exercises (``ppu_lab.exercises.nb05``).
    """
    import torch

    leaves = [torch.tensor(a.copy(), requires_grad=True) for a in ann_unpack(theta, hidden)]
    W1, b1, W2, b2 = leaves
    act = {"sigmoid": torch.sigmoid, "tanh": torch.tanh, "relu": torch.relu}[activation]
    X = torch.from_numpy(np.asarray(X, dtype=np.float64).reshape(len(X), -1))
    logits = act(X @ W1.T + b1) @ W2.T + b2  # (B, 10)
    J = torch.nn.functional.cross_entropy(logits, torch.from_numpy(np.asarray(y)), reduction="sum") \
        + lam / 2 * ((W1 ** 2).sum() + (W2 ** 2).sum())
    J.backward()
    return np.concatenate([t.grad.numpy().ravel() for t in leaves])


def gradient_check(hidden=10, batch=16, activation="sigmoid", lam=5.0, seed=0, n_fd=20, eps=1e-6):
    """Check ``ann_gradient`` on random inputs: against torch.autograd, and against central differences.

    Returns ``{"autograd": max relative error over all parameters, "finite_differences": max relative
    error over ``n_fd`` random coordinates}`` (float64; both should be ~1e-10 or smaller). Notebook 05.
    """
    rng = np.random.default_rng(seed)
    theta = ann_init(hidden, seed) + 0.1 * rng.standard_normal(ann_num_params(hidden))  # non-zero biases
    X, y = rng.random((batch, N_IN)), rng.integers(0, N_OUT, batch)
    g = ann_gradient(theta, X, y, hidden, lam, activation)
    ref = ann_autograd(theta, X, y, hidden, lam, activation)
    scale = np.abs(ref).max()
    fd_err = 0.0
    for i in rng.choice(theta.size, size=n_fd, replace=False):
        fd_err = max(fd_err, abs(central_difference(theta, i, X, y, hidden, lam, activation, eps) - g[i]) / scale)
    return {"autograd": float(np.abs(g - ref).max() / scale), "finite_differences": float(fd_err)}


def central_difference(theta, i, X, y, hidden, lam=5.0, activation="sigmoid", eps=1e-6):
    """(J(theta + eps e_i) - J(theta - eps e_i)) / 2 eps: coordinate ``i`` of grad J by finite differences."""
    e = np.zeros_like(theta)
    e[i] = eps
    return (ann_objective(theta + e, X, y, hidden, lam, activation)
            - ann_objective(theta - e, X, y, hidden, lam, activation)) / (2 * eps)


class AnnModel:
    """The ANN as the trainer sees it: a flat float64 ``theta`` and pure functions over it."""

    name = "ann"

    def __init__(self, hidden=50, activation="sigmoid", seed=0):
        if int(hidden) != hidden or hidden < 1:
            raise ValueError(f"hidden (number of hidden units) must be an integer >= 1; got {hidden}")
        _activation(activation)
        self.hidden, self.activation = int(hidden), activation
        self.theta = ann_init(self.hidden, seed)
        self.grad = np.zeros(self.theta.size + 1)  # gradient sum, then the loss sum: one Allreduce buffer
        self.grad_view = self.grad[:-1]
        self.mask = ann_weight_mask(self.hidden)
        self.dtype = np.float64

    def prepare(self, x):
        """Images (n, 28, 28) -> rows (n, 784) float64 (done once, not per step)."""
        return np.ascontiguousarray(np.asarray(x, dtype=np.float64).reshape(len(x), -1))

    def loss_grad(self, X, y):
        """Summed loss of a shard (also in the buffer's last slot); its gradient sum lands in ``self.grad_view``."""
        if len(y) == 0:
            self.grad[:] = 0.0
            return 0.0
        loss, _ = ann_loss_grad(self.theta, X, y, self.hidden, self.activation, out=self.grad_view)
        self.grad[-1] = loss
        return loss

    def predict(self, X):
        return ann_forward(self.theta, X, self.hidden, self.activation).argmax(axis=1)


# =========================================================================== CNN (PyTorch)
CNN_NUM_PARAMS = 416 + 12_832 + 15_690  # conv1 + conv2 + linear = 28,938


def make_cnn(seed: int | None = None):
    """The course's CNN as a ``torch.nn.Sequential`` (float32, PyTorch's default initialisation).

    ``seed``: draw the initial weights from ``torch.manual_seed(seed)`` inside ``fork_rng``, so every
    rank builds the same weights and the caller's global torch generator is left as it was. None:
    draw them from the global generator, as PyTorch does.
    """
    import torch
    from torch import nn

    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        return nn.Sequential(
            nn.Conv2d(1, 16, 5, padding=2),  # (B, 16, 28, 28)
            nn.ReLU(),
            nn.MaxPool2d(2),  # (B, 16, 14, 14)
            nn.Conv2d(16, 32, 5, padding=2),  # (B, 32, 14, 14)
            nn.ReLU(),
            nn.MaxPool2d(2),  # (B, 32, 7, 7)
            nn.Flatten(),  # (B, 1568)
            nn.Linear(32 * 7 * 7, 10),  # (B, 10)
        )


def flatten_module(module, extra: int = 0):
    """Move every parameter and its ``.grad`` into two flat contiguous tensors; return them.

    After this call ``p.data`` and ``p.grad`` of each parameter are views into ``flat`` and
    ``flat_grad`` (length ``n_params + extra``: the trainer keeps the loss in the extra slot so that
    one Allreduce carries it too). ``backward()`` accumulates into the views in place, so zeroing
    ``flat_grad`` once per step replaces ``optimizer.zero_grad()``.
    """
    import torch

    params = list(module.parameters())
    n = sum(p.numel() for p in params)
    dtype = params[0].dtype
    flat = torch.zeros(n, dtype=dtype)
    flat_grad = torch.zeros(n + extra, dtype=dtype)
    offset = 0
    for p in params:
        k = p.numel()
        flat[offset:offset + k].copy_(p.data.reshape(-1))
        p.data = flat[offset:offset + k].view_as(p)
        p.grad = flat_grad[offset:offset + k].view_as(p)
        offset += k
    return flat, flat_grad


class CnnModel:
    """The CNN as the trainer sees it: ``theta`` and ``grad`` are NumPy views of flat torch buffers.

    ``net``: another torch module on (B, 1, 28, 28) images to train instead of the course's CNN (e.g.
    a larger model for notebook 08); by default ``make_cnn(seed)``.
    """

    name = "cnn"

    def __init__(self, seed=0, net=None):
        import torch

        self.net = make_cnn(seed) if net is None else net  # the same initial weights on every rank
        self.flat, self.flat_grad = flatten_module(self.net, extra=1)
        self.theta = self.flat.numpy()  # shares memory with the module's parameters
        self.grad = self.flat_grad.numpy()
        self.grad_view = self.grad[:-1]
        mask = torch.cat([torch.full((p.numel(),), float(p.dim() > 1)) for p in self.net.parameters()])
        self.mask = mask.numpy()
        self.dtype = np.float32
        self._ce = torch.nn.CrossEntropyLoss(reduction="sum")

    def prepare(self, x):
        """Images (n, 28, 28) -> a float32 torch tensor (n, 1, 28, 28) sharing memory where possible."""
        import torch

        x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
        return torch.from_numpy(x.reshape(len(x), 1, 28, 28))

    def loss_grad(self, X, y):
        """Summed cross-entropy of a shard; backward() accumulates its gradient into ``self.grad_view``.

        The loss is also written to the buffer's last slot *before* backward, so that a hook that
        sends parts of the buffer while backward runs (``ppu_lab.designs.overlap``) sends it too.
        """
        import torch

        self.flat_grad.zero_()
        if len(y) == 0:
            return 0.0
        loss = self._ce(self.net(X), torch.as_tensor(y))  # (B, 10) logits -> summed loss
        self.grad[-1] = value = loss.item()
        loss.backward()
        return value

    def predict(self, X):
        import torch

        with torch.no_grad():
            return self.net(X).argmax(dim=1).numpy()


def build_model(model="ann", hidden=50, activation="sigmoid", seed=0):
    """``AnnModel`` or ``CnnModel`` by name."""
    if model == "ann":
        return AnnModel(hidden, activation, seed)
    if model == "cnn":
        return CnnModel(seed)
    raise ValueError(f"model must be 'ann' or 'cnn'; got {model!r}")
