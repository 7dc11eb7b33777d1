"""The losses (ntk_fast.dynamics.losses) against autograd, and the label/target checks per loss."""
import pytest
import torch

from ntk_fast.dynamics.losses import LOSSES, check_targets, is_margin, loss_grad, loss_value


@pytest.mark.parametrize("loss", LOSSES)
def test_grad_is_the_derivative(loss, gen):
    F = torch.randn(301, generator=gen, dtype=torch.float64) * 3
    y = torch.randn(301, generator=gen, dtype=torch.float64) if loss == "mse" else \
        torch.randint(0, 2, (301,), generator=gen).double() * 2 - 1
    F = F + 1e-3   # away from the hinge's kink at y F = 1 on this grid
    Fg = F.clone().requires_grad_(True)
    loss_value(loss, Fg, y, 7.0).sum().backward()
    torch.testing.assert_close(loss_grad(loss, F, y, 7.0), Fg.grad, rtol=1e-12, atol=1e-14)


def test_values_at_known_points():
    F = torch.tensor([0.0, 2.0, -1.0], dtype=torch.float64)
    y = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
    assert loss_value("hinge", F, y).tolist() == [1.0, 0.0, 2.0]
    assert loss_value("qhinge", F, y).tolist() == [0.5, 0.0, 2.0]
    assert loss_value("mse", F, torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64)).tolist() == [0.125, 0.0, 2.0]
    torch.testing.assert_close(loss_value("softhinge", F[:1], y[:1], 20.0),
                               torch.log1p(torch.exp(torch.tensor([20.0], dtype=torch.float64))) / 20)


def test_margin_losses_need_pm1_labels_and_mse_takes_real_targets():
    real = torch.tensor([0.3, -1.2, 2.0])
    for loss in ("softhinge", "qhinge", "hinge"):
        assert is_margin(loss)
        with pytest.raises(ValueError, match=r"y must hold labels -1 or \+1 .*'mse'"):
            check_targets(real, loss, "y", "train")
    assert not is_margin("mse")
    check_targets(real, "mse", "y", "train")
    with pytest.raises(ValueError, match="y contains NaN"):
        check_targets(torch.tensor([float("nan")]), "mse", "y", "train")
    with pytest.raises(ValueError, match="loss must be one of"):
        check_targets(real, "huber", "y", "train")
