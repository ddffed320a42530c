"""Per-stage objectives: the right terms with the right weights, strictly."""
import pytest
import torch

from student.losses import STAGE_TERMS, LossWeights, stage_loss

T = {name: torch.tensor(v, requires_grad=True) for name, v in
     {"ce": 2.0, "kl": 3.0, "dpo": 0.7, "res": 1.5, "vis": 0.5, "rel": 0.2, "aux": 4.0}.items()}


def _terms(*names):
    return {n: T[n] for n in names}


def test_paper_defaults():
    w = LossWeights()
    assert (w.res, w.vis, w.rel, w.aux, w.ce, w.kd) == (1.0, 1.0, 0.5, 0.01, 1.0, 1.0)


@pytest.mark.parametrize(
    "stage,names,expect",
    [
        ("teacher", ("ce",), 2.0),
        ("init", ("ce",), 2.0),
        ("sft", ("ce",), 2.0),
        ("d2d", ("kl",), 3.0),
        ("d2s", ("ce", "kl"), 5.0),
        ("preference", ("dpo",), 0.7),
        ("dpt", ("ce", "res", "vis", "rel"), 2.0 + 1.5 + 0.5 + 0.5 * 0.2),
        ("dft", ("ce", "res", "vis", "rel"), 2.0 + 1.5 + 0.5 + 0.5 * 0.2),
    ],
)
def test_each_stage_dense_and_sparse(stage, names, expect):
    total, logged = stage_loss(stage, _terms(*names))
    assert total.item() == pytest.approx(expect)
    assert logged["total"].item() == pytest.approx(expect) and set(logged) == set(names) | {"total"}
    total_s, logged_s = stage_loss(stage, _terms(*names, "aux"), sparse=True)
    assert total_s.item() == pytest.approx(expect + 0.01 * 4.0)
    assert "aux" in logged_s


def test_custom_weights_and_gradients():
    w = LossWeights(ce=0.5, res=2.0, vis=3.0, rel=4.0)
    total, _ = stage_loss("dft", _terms("ce", "res", "vis", "rel"), w)
    assert total.item() == pytest.approx(0.5 * 2.0 + 2.0 * 1.5 + 3.0 * 0.5 + 4.0 * 0.2)
    grads = torch.autograd.grad(total, [T["ce"], T["rel"]])
    assert [g.item() for g in grads] == [0.5, 4.0]


def test_errors():
    with pytest.raises(ValueError, match="valid stages: " + ", ".join(STAGE_TERMS)):
        stage_loss("distill", _terms("ce"))
    with pytest.raises(ValueError, match="missing"):
        stage_loss("d2s", _terms("ce"))
    with pytest.raises(ValueError, match=r"missing \['aux'\]"):
        stage_loss("d2s", _terms("ce", "kl"), sparse=True)
    with pytest.raises(ValueError, match="does not use"):
        stage_loss("sft", _terms("ce", "kl"))
    with pytest.raises(ValueError, match="scalar"):
        stage_loss("sft", {"ce": torch.zeros(2)})
    with pytest.raises(ValueError, match="LossWeights.rel"):
        LossWeights(rel=-1.0)


def test_a_term_weighted_zero_is_switched_off():
    from student.losses import active_terms

    assert active_terms("d2s", LossWeights(kd=0.0)) == ("ce",)
    assert active_terms("dpt", LossWeights(res=0.0, vis=0.0, rel=0.0)) == ("ce",)
    total, logged = stage_loss("d2s", _terms("ce"), LossWeights(kd=0.0))
    assert total.item() == pytest.approx(2.0) and set(logged) == {"ce", "total"}
    with pytest.raises(ValueError, match="does not use"):  # computed for nothing: still an error
        stage_loss("d2s", _terms("ce", "kl"), LossWeights(kd=0.0))
    with pytest.raises(ValueError, match="weighted 0"):
        active_terms("d2d", LossWeights(kd=0.0))
