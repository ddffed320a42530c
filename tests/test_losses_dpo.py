"""DPO with the teacher as reference: hand-derived values and sign conventions for every kind."""
import math

import pytest
import torch

from student.losses import DPO_KINDS, dpo_loss, sequence_logps

D = torch.float64
# two pairs; h = (pi_c - ref_c) - (pi_r - ref_r)
PC, PR = [-1.0, -6.0], [-3.0, -2.0]
RC, RR = [-2.0, -5.0], [-2.0, -4.0]
# pair 0: (-1+2) - (-3+2) = 1 - (-1) = 2          pair 1: (-6+5) - (-2+4) = -1 - 2 = -3
BETA = 0.5
EXPECTED = {
    # -log sigmoid(beta*h) = log(1 + exp(-beta*h))
    "sigmoid": (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(1.5))) / 2,
    # (h - 1/(2 beta))^2 = (h - 1)^2
    "ipo": ((2 - 1) ** 2 + (-3 - 1) ** 2) / 2,
    # max(0, 1 - beta*h)
    "hinge": (max(0.0, 1 - 1.0) + max(0.0, 1 + 1.5)) / 2,
}


def _args(requires_grad=False):
    return [torch.tensor(v, dtype=D, requires_grad=requires_grad and i < 2) for i, v in enumerate((PC, PR, RC, RR))]


@pytest.mark.parametrize("kind", DPO_KINDS)
def test_hand_derived_values_and_stats(kind):
    loss, stats = dpo_loss(*_args(), beta=BETA, kind=kind)
    assert loss.item() == pytest.approx(EXPECTED[kind], rel=1e-12)
    # chosen rewards beta*(pi_c - ref_c) = [0.5, -0.5]; rejected beta*(pi_r - ref_r) = [-0.5, 1.0]
    assert stats["chosen_rewards"].item() == pytest.approx(0.0)
    assert stats["rejected_rewards"].item() == pytest.approx(0.25)
    assert stats["reward_margin"].item() == pytest.approx(-0.25)  # mean of [1.0, -1.5]
    assert stats["reward_accuracy"].item() == pytest.approx(0.5)
    assert all(not v.requires_grad for v in stats.values())


@pytest.mark.parametrize("kind", DPO_KINDS)
def test_sign_convention(kind):
    """Raising the chosen log-prob or lowering the rejected one (vs the teacher) lowers the loss."""
    pc, pr, rc, rr = _args(requires_grad=True)
    loss, _ = dpo_loss(pc, pr, rc, rr, beta=BETA, kind=kind)
    gc, gr = torch.autograd.grad(loss, (pc, pr))
    # pair 1 is mis-ordered (h = -3) and active for every kind
    assert gc[1] < 0 and gr[1] > 0
    # a better student than the teacher on the chosen answer has a lower loss than one equal to it
    better, _ = dpo_loss(torch.tensor([0.0]), torch.tensor([-1.0]), torch.tensor([-1.0]), torch.tensor([-1.0]), kind=kind)
    equal, _ = dpo_loss(torch.tensor([-1.0]), torch.tensor([-1.0]), torch.tensor([-1.0]), torch.tensor([-1.0]), kind=kind)
    assert better < equal


def test_sigmoid_gradient_by_hand():
    pc, pr, rc, rr = _args(requires_grad=True)
    loss, _ = dpo_loss(pc, pr, rc, rr, beta=BETA)
    gc, gr = torch.autograd.grad(loss, (pc, pr))
    # d/dpi_c of mean(-log sig(beta h)) = -beta * sig(-beta h) / B
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expect = [-BETA * sig(-BETA * h) / 2 for h in (2.0, -3.0)]
    assert gc.tolist() == pytest.approx(expect, rel=1e-12)
    assert gr.tolist() == pytest.approx([-e for e in expect], rel=1e-12)


@pytest.mark.parametrize("kind", DPO_KINDS)
def test_gradcheck_end_to_end_through_sequence_logps(kind):
    g = torch.Generator().manual_seed(0)
    logits_c = torch.randn(2, 4, 6, generator=g, dtype=D, requires_grad=True)
    logits_r = torch.randn(2, 4, 6, generator=g, dtype=D, requires_grad=True)
    labels = torch.tensor([[-100, 1, 2, 3], [-100, -100, 4, 5]])
    ref_c, ref_r = torch.tensor([-5.0, -4.0], dtype=D), torch.tensor([-6.0, -3.0], dtype=D)

    def fn(lc, lr):
        return dpo_loss(sequence_logps(lc, labels, chunk_size=3), sequence_logps(lr, labels, chunk_size=3), ref_c, ref_r, beta=0.3, kind=kind)[0]

    assert torch.autograd.gradcheck(fn, (logits_c, logits_r), fast_mode=True)


def test_validation():
    a = torch.zeros(3)
    with pytest.raises(ValueError, match="ref_rejected_logps"):
        dpo_loss(a, a, a, torch.zeros(2))
    with pytest.raises(ValueError, match="policy_chosen_logps"):
        dpo_loss(torch.zeros(3, 1), a, a, a)
    with pytest.raises(ValueError, match="kind"):
        dpo_loss(a, a, a, a, kind="kto_pair")
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(a, a, a, a, beta=0.0)
