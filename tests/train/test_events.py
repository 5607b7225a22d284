"""The TensorBoard log of the trainers: which fields of a metrics record become scalars, how a resumed run
hides the steps it trains again, and a missing tensorboard package as a one-line error. (The trainers' own
runs are read back in test_trainer.py and test_ssg.py.)"""

import sys
import time

import pytest
from tbevents import read_scalars

from sysu30k.errors import UserError
from sysu30k.train.events import EventLog, scalars


def test_every_number_but_the_step_is_a_scalar_tagged_with_its_event():
    record = {"event": "epoch", "epoch": 2, "step": 40, "lr": 0.01, "val_rank1": None, "train_total": float("nan"),
              "note": "text", "flag": True, "damaged": 0}
    assert scalars(record) == {"epoch/epoch": 2.0, "epoch/lr": 0.01, "epoch/damaged": 0.0}


def test_a_resumed_log_hides_the_steps_trained_again(tmp_path):
    first = EventLog(tmp_path)
    for step in range(1, 7):                             # a run killed at step 6, its checkpoint at step 3
        first.write({"event": "step", "step": step, "lr": float(step)})
    first.close()
    time.sleep(1.05)                                      # event file names order by the second they were opened
    resumed = EventLog(tmp_path, purge_step=4)
    for step in range(4, 8):
        resumed.write({"event": "step", "step": step, "lr": 10.0 * step})
    resumed.close()
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 2          # appended, the first file kept
    assert read_scalars(tmp_path) == {"step/lr": [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0), (6, 60.0),
                                                  (7, 70.0)]}


def test_a_log_with_no_record_leaves_no_file(tmp_path):
    log = EventLog(tmp_path / "tb")
    log.flush()
    log.close()
    assert not (tmp_path / "tb").exists()


def test_without_tensorboard_installed_the_error_names_the_way_out(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(UserError, match="--no-tensorboard"):
        EventLog(tmp_path)
