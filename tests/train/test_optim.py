"""The one optimiser builder: the variant each flag asks for, the groups' learning rates, and each trainer's
default variant (DGL as released: Nesterov SGD / AMSGrad Adam; SSG as released: plain)."""

from types import SimpleNamespace

import pytest
import torch

from sysu30k.errors import UserError
from sysu30k.train.config import TrainConfig
from sysu30k.train.optim import build_optimizer
from sysu30k.train.ssg.config import SSGConfig


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.classifier = torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)


def built(kind: str, **kw) -> torch.optim.Optimizer:
    args = dict(lr=0.1, head_lr_mult=10.0, weight_decay=1e-4, momentum=0.9, nesterov=False, amsgrad=False)
    return build_optimizer(Net(), SimpleNamespace(optimizer=kind, **{**args, **kw}))


@pytest.mark.parametrize("kind,flag,cls,key", [("sgd", "nesterov", torch.optim.SGD, "nesterov"),
                                                ("adam", "amsgrad", torch.optim.Adam, "amsgrad")])
def test_the_variant_is_the_one_asked_for(kind, flag, cls, key):
    for on in (False, True):
        opt = built(kind, **{flag: on})
        assert isinstance(opt, cls) and all(g[key] is on for g in opt.param_groups)


def test_new_layers_get_the_head_learning_rate():
    body, head = built("sgd").param_groups
    assert body["lr"] == pytest.approx(0.1) and head["lr"] == pytest.approx(1.0) and len(head["params"]) == 2


def test_nesterov_without_momentum_and_unknown_kinds_are_user_errors():
    with pytest.raises(UserError, match="--momentum"):
        built("sgd", nesterov=True, momentum=0.0)
    with pytest.raises(UserError, match="--optimizer"):
        built("lamb")


def test_each_trainer_states_its_released_default():
    weak, ssg = TrainConfig(), SSGConfig.for_stage("source")
    assert (weak.nesterov, weak.amsgrad) == (True, True)
    assert (ssg.nesterov, ssg.amsgrad) == (False, False)


def test_validation_reads_with_the_runs_decoder(monkeypatch):
    """The per-epoch validation extracts with the decoder and storage options the run was given."""
    import sysu30k.evaluation.run as evaluation
    from sysu30k.train.config import RunOptions
    from sysu30k.train.loop import _validate

    seen = {}
    monkeypatch.setattr(evaluation, "evaluate_split", lambda *a, **kw: seen.update(args=a, kw=kw) or {"rank1": 1.0})
    run = RunOptions(decoder="pil", storage_options={"anon": True})
    model = torch.nn.Linear(1, 1)
    s = SimpleNamespace(model=model, dst_url="dst", device=torch.device("cpu"), height=64, width=32, run=run)
    assert _validate(s) == {"rank1": 1.0} and model.training
    assert seen["kw"]["decoder"] == "pil" and {"anon": True} in seen["args"]


@pytest.mark.parametrize("error", ["NonFiniteFeatures", "IncompleteSplit"])
def test_a_validation_without_a_right_number_is_nan_and_training_goes_on(monkeypatch, error):
    import sysu30k.evaluation.run as evaluation
    import sysu30k.evaluation.scoring as scoring
    from sysu30k.train.config import RunOptions
    from sysu30k.train.loop import _validate

    cls = getattr(scoring, error, None) or getattr(evaluation, error)

    def fail(*a, **kw):
        raise cls("2 image(s) of the val split could not be read")

    monkeypatch.setattr(evaluation, "evaluate_split", fail)
    s = SimpleNamespace(model=torch.nn.Linear(1, 1), dst_url="dst", device=torch.device("cpu"), height=64,
                        width=32, run=RunOptions())
    got = _validate(s)
    assert set(got) == {"rank1"} and got["rank1"] != got["rank1"]          # NaN
