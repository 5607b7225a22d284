"""``benchmarks/gpu_check.py`` in its CPU smoke mode: every stage runs at tiny sizes, each in its own process,
and the JSON report is written after every stage, so the GPU check cannot rot between GPU sessions."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGES = "env,train_step,loader_step,decode,score,knn,torchrun,eval"


def test_smoke_mode_runs_every_stage(packed_split, tmp_path):
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--smoke",
                        "--data", str(packed_split), "--out", str(out), "--workers", "0", "--stages", STAGES,
                        "--box", "2", "--budget", "1500"], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    report = json.loads((out / "gpu_check.json").read_text())
    st = report["stages"]
    assert list(st) == STAGES.split(",") and report["device"] == "cpu" and report["smoke"]
    failed = {k: v for k, v in st.items() if not v["ok"]}
    assert not failed, json.dumps(failed)[:3000]
    assert any(r["name"] == "decoder" for r in st["env"]["doctor"])
    for method in ("folder", "dgl"):
        assert st["train_step"][method]["ms_per_step"] > 0 and st["train_step"][method]["img_per_s"] > 0
    assert st["loader_step"]["pil"]["steps_timed"] >= 1 and st["loader_step"]["pil"]["decoder_ran"] == "pil"
    assert st["loader_step"]["dali"]["decoder_ran"] == "dali"             # the CPU graph: DALI is installed here
    assert st["decode"]["dali"]["backend"] == "cpu" and st["decode"]["dali"]["img_per_s"] > 0
    tv = st["decode"]["torchvision"]                    # this CPU build of torchvision has no image extension
    assert tv["img_per_s"] > 0 if isinstance(tv, dict) else tv.startswith("unavailable: ")
    assert 0 <= st["score"]["rank1"] <= 1 and st["knn"]["ssg_knn_s"] > 0
    stopped = st["torchrun"]["interrupted"]
    assert stopped["returncode"] != 0 and "saved_loader" in stopped, stopped                # SIGTERM saved last.pt
    assert stopped["saved_loader"]["epoch"] == 0                                            # stopped mid-epoch 1
    assert 0 < stopped["saved_loader"]["consumed"] and st["torchrun"]["resumed"]["returncode"] == 0
    assert st["torchrun"]["epoch_records"] == 1
    assert st["eval"]["equal"]
    assert "FAILED" not in p.stdout and p.stdout.count(" ok ") == len(st)


def test_unknown_stages_are_refused(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--stages", "env,warp",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "unknown stage(s): warp" in p.stderr


def test_the_budget_bounds_the_whole_call(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--smoke",
                        "--stages", "env,score", "--budget", "5", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr[-2000:]
    st = json.loads((tmp_path / "gpu_check.json").read_text())["stages"]
    assert [v["error"] for v in st.values()] == ["skipped: the --budget is spent"] * 2
