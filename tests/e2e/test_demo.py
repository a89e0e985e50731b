"""`make demo` in reduced size: a real kill (SIGKILL) mid-run and a resume."""

from __future__ import annotations

from conftest import run_python


def test_demo_kills_resumes_and_reports(tmp_path):
    args = [
        "--path",
        str(tmp_path),
        "--steps",
        "100",
        "--kill-at",
        "70",
        "--save-interval",
        "0.25",
        "--eval-every",
        "20",
    ]
    out = run_python("examples/demo.py", *args)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    report = out.stdout
    assert "killed (SIGKILL) at step 70; resuming" in report
    assert "identical to the killed run" in report or "no replayed steps" in report
    assert "checkpoints kept:" in report and "save throughput" in report
    resumed = int(report.split("resumed from step ")[1].split()[0])
    assert 50 <= resumed <= 70  # the step-50 checkpoint at least had committed
    # restore_or_init put the state back on the jitted init's shardings, not on one device
    assert "params/Dense_1/kernel is P(None, 'data') over 8 devices" in report


def test_demo_refuses_memory_urls():
    out = run_python("examples/demo.py", "--path", "memory://x", timeout=120)
    assert out.returncode == 2 and "memory:// lives inside one process" in out.stderr
