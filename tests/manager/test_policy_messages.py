"""A schedule that can never save is refused, and ``plan`` says why it plans no save (issue 21, item 7)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ckpt_callbacks import CheckpointInterval, SavePolicy, cli


@given(every=st.integers(1, 10_000), short=st.integers(1, 10_000))
def test_an_interval_ending_before_its_first_due_step_is_refused(every, short):
    until = every - short  # below every: the first due step (every) is after until
    with pytest.raises(ValueError, match=rf"every={every}, until={until}\) would never save.*until >= every"):
        CheckpointInterval(every=every, until=until)


@given(every=st.integers(1, 10_000), extra=st.integers(0, 10_000))
def test_an_interval_reaching_its_first_due_step_saves_there(every, extra):
    policy = SavePolicy(step_policies=(CheckpointInterval(every=every, until=every + extra),))
    assert policy.decide(every, now=None, last_save_step=None, last_save_time=0.0).save


def test_a_later_interval_holding_no_multiple_of_its_every_is_refused():
    with pytest.raises(ValueError, match=r"step_policies\[1\] \(every=100, until=150\) governs steps 121\.\.150"):
        SavePolicy(step_policies=(CheckpointInterval(every=10, until=120), CheckpointInterval(every=100, until=150)))
    SavePolicy(step_policies=(CheckpointInterval(every=10, until=120), CheckpointInterval(every=100, until=200)))


def _plan(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli.main(["plan", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_plan_says_why_it_plans_no_save(capsys):
    code, out, _ = _plan(capsys, "--every", "100", "--steps", "50", "--no-final")
    assert code == 0 and out.splitlines()[-1] == (
        "no save: every 100 steps first saves step 100, after the last step (50); no --save-interval; "
        "--no-final: no on_train_end save"
    )
    code, out, _ = _plan(capsys, "--save-interval", "100", "--step-time", "1", "--steps", "50", "--no-final", "--json")
    data = json.loads(out)
    assert (
        data["saves"] == []
        and "--save-interval 100 s is longer than the run after its first step (49 s)" in (data["why_no_saves"])
    )
    code, out, _ = _plan(capsys, "--every", "10", "--steps", "50", "--json")
    assert "why_no_saves" not in json.loads(out)  # only a plan of no save explains itself
    code, _, err = _plan(capsys, "--every", "100", "--until", "50", "--steps", "500")
    assert code == 2 and "every=100, until=50) would never save" in err
