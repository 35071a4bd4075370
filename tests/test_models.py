"""The models of notebooks 05-06: parameter counts, hand-derived backprop against torch.autograd."""

import numpy as np
import pytest
import torch

from ppu_lab import models
from ppu_lab.models import (CNN_NUM_PARAMS, AnnModel, CnnModel, ann_forward, ann_gradient, ann_init,
                            ann_loss_grad, ann_num_params, ann_objective, ann_unpack, make_cnn)


@pytest.mark.parametrize("h", [10, 25, 50])
def test_ann_has_795h_plus_10_parameters(h):
    assert ann_num_params(h) == 795 * h + 10
    assert ann_init(h).shape == (795 * h + 10,)
    assert AnnModel(h).theta.size == 795 * h + 10


def test_cnn_has_28938_parameters():
    assert sum(p.numel() for p in make_cnn().parameters()) == 28_938 == CNN_NUM_PARAMS
    assert CnnModel().theta.size == 28_938
    assert make_cnn()(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


def test_cnn_seed_gives_the_same_weights_without_touching_torchs_generator():
    """Every rank builds CnnModel(seed) with the same weights, and the caller's torch stream goes on unchanged."""
    torch.manual_seed(11)
    expected_next = torch.rand(3)
    torch.manual_seed(11)
    a, b = CnnModel(seed=3), CnnModel(seed=3)
    np.testing.assert_array_equal(a.theta, b.theta)
    assert torch.equal(torch.rand(3), expected_next)  # the global generator did not move
    assert not np.array_equal(a.theta, CnnModel(seed=4).theta)
    torch.manual_seed(3)  # the weights PyTorch draws after manual_seed(seed): what benchmarks rely on
    np.testing.assert_array_equal(a.theta, torch.cat([p.detach().reshape(-1) for p in make_cnn().parameters()]))


def _torch_ann(theta, h, activation):
    """The same network written with torch ops on float64 leaf tensors (for autograd)."""
    W1, b1, W2, b2 = (torch.tensor(a.copy(), requires_grad=True) for a in ann_unpack(theta, h))
    act = {"sigmoid": torch.sigmoid, "tanh": torch.tanh, "relu": torch.relu}[activation]
    return (W1, b1, W2, b2), lambda X: act(X @ W1.T + b1) @ W2.T + b2


@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "relu"])
def test_ann_backprop_equals_torch_autograd(activation):
    h, B = 13, 37
    rng = np.random.default_rng(1)
    theta = rng.standard_normal(ann_num_params(h)) * 0.3
    X = rng.standard_normal((B, 784))
    y = rng.integers(0, 10, B)
    loss, grad = ann_loss_grad(theta, X, y, h, activation)

    leaves, net = _torch_ann(theta, h, activation)
    ref = torch.nn.functional.cross_entropy(net(torch.tensor(X)), torch.tensor(y), reduction="sum")
    ref.backward()
    assert loss == pytest.approx(ref.item(), rel=1e-12)
    ref_grad = np.concatenate([t.grad.numpy().ravel() for t in leaves])
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-10, atol=1e-12)


def test_ann_objective_and_gradient_with_l2_on_weights_only_equal_autograd():
    h, lam = 10, 5.0
    rng = np.random.default_rng(2)
    theta = rng.standard_normal(ann_num_params(h)) * 0.3
    X, y = rng.random((20, 784)), rng.integers(0, 10, 20)
    (W1, b1, W2, b2), net = _torch_ann(theta, h, "sigmoid")
    J = torch.nn.functional.cross_entropy(net(torch.tensor(X)), torch.tensor(y), reduction="sum") \
        + lam / 2 * ((W1 ** 2).sum() + (W2 ** 2).sum())  # biases not penalised
    J.backward()
    assert ann_objective(theta, X, y, h, lam) == pytest.approx(J.item(), rel=1e-12)
    ref = np.concatenate([t.grad.numpy().ravel() for t in (W1, b1, W2, b2)])
    np.testing.assert_allclose(ann_gradient(theta, X, y, h, lam), ref, rtol=1e-10, atol=1e-12)


def test_minibatch_gradient_is_unbiased():
    """The mean of (N/|B|) g_B over all batches of a partition is the full gradient of J."""
    h, lam = 10, 5.0
    rng = np.random.default_rng(3)
    theta = ann_init(h, seed=3)
    X, y = rng.random((60, 784)), rng.integers(0, 10, 60)
    mask = models.ann_weight_mask(h)
    batches = np.split(rng.permutation(60), 4)
    est = [models.combine(theta, ann_loss_grad(theta, X[b], y[b], h)[1], lam, mask, 60, len(b)) for b in batches]
    np.testing.assert_allclose(np.mean(est, axis=0), ann_gradient(theta, X, y, h, lam), rtol=1e-10, atol=1e-12)


def test_ann_matches_torch_linear_layout():
    """theta holds W (out, in) then b per layer, like torch.nn.Linear: same logits."""
    h = 7
    theta = ann_init(h, seed=4)
    W1, b1, W2, b2 = ann_unpack(theta, h)
    lin1, lin2 = torch.nn.Linear(784, h).double(), torch.nn.Linear(h, 10).double()
    with torch.no_grad():
        for lin, W, b in ((lin1, W1, b1), (lin2, W2, b2)):
            lin.weight.copy_(torch.from_numpy(W))
            lin.bias.copy_(torch.from_numpy(b))
    X = np.random.default_rng(4).random((5, 28, 28))
    ref = lin2(torch.sigmoid(lin1(torch.from_numpy(X.reshape(5, -1))))).detach().numpy()
    np.testing.assert_allclose(ann_forward(theta, X, h), ref, rtol=1e-12)


def test_cnn_flat_buffers_are_views_and_give_autograd_gradient():
    m = CnnModel(seed=5)
    ref = make_cnn()
    ref.load_state_dict(m.net.state_dict())
    X, y = torch.rand(8, 1, 28, 28), np.arange(8) % 10
    loss = m.loss_grad(X, y)
    ref_loss = torch.nn.functional.cross_entropy(ref(X), torch.from_numpy(y), reduction="sum")
    ref_loss.backward()
    assert loss == pytest.approx(ref_loss.item(), rel=1e-5)
    ref_grad = np.concatenate([p.grad.numpy().ravel() for p in ref.parameters()])
    np.testing.assert_allclose(m.grad_view, ref_grad, rtol=1e-4, atol=1e-6)
    # parameters and gradients live in the flat buffers: editing theta changes the module
    m.theta[:] = 0.0
    assert all(not p.detach().any() for p in m.net.parameters())
    m.loss_grad(X, y)  # backward accumulated into the views, not into fresh tensors
    assert np.shares_memory(m.net[0].weight.grad.numpy(), m.grad)
    # the L2 mask covers weights, not biases
    assert m.mask.sum() == 16 * 25 + 32 * 16 * 25 + 1568 * 10


def test_bad_model_arguments_raise_valueerror():
    with pytest.raises(ValueError, match="activation"):
        AnnModel(10, activation="softplus")
    with pytest.raises(ValueError, match="hidden"):
        AnnModel(0)
    with pytest.raises(ValueError, match="model"):
        models.build_model("rnn")
    with pytest.raises(ValueError, match="theta"):
        ann_unpack(np.zeros(10), 5)
