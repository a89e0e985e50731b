"""Policies are pure: synthetic steps, an injected clock, no sleeping, no files."""

from __future__ import annotations

import dataclasses
import datetime

import pytest

from ckpt_callbacks import CheckpointInterval, KeepPolicy, SavePolicy

SEED_SCHEDULE = (CheckpointInterval(every=100, until=1000), CheckpointInterval(every=1000))


def _saves(policy, steps, *, previous=False):
    out, last, prev = [], None, None
    for step in steps:
        d = policy.decide(
            step, now=0.0, last_save_step=last, last_save_time=0.0, previous_step=prev if previous else None
        )
        prev = step
        if d.save:
            out.append(step)
            last = step
    return out


def test_seed_docstring_schedule():
    policy = SavePolicy(step_policies=SEED_SCHEDULE)
    assert _saves(policy, range(0, 5001)) == [*range(100, 1001, 100), 2000, 3000, 4000, 5000]


def test_every_500_until_5000_then_every_1000():
    policy = SavePolicy(step_policies=(CheckpointInterval(every=500, until=5000), CheckpointInterval(every=1000)))
    assert _saves(policy, range(1, 8001)) == [*range(500, 5001, 500), 6000, 7000, 8000]


def test_no_policy_after_last_until_means_no_step_saves():
    policy = SavePolicy(step_policies=(CheckpointInterval(every=10, until=30),))
    assert _saves(policy, range(1, 100)) == [10, 20, 30]


def test_step_zero_needs_force_and_force_is_permanent():
    policy = SavePolicy(step_policies=(CheckpointInterval(every=1),))
    assert not policy.decide(0, now=0, last_save_step=None, last_save_time=0).save
    forced = policy.decide(0, now=0, last_save_step=None, last_save_time=0, force=True)
    assert forced.save and not forced.temporary and forced.reason == "forced"


def test_a_saved_step_is_never_saved_twice():
    policy = SavePolicy(step_policies=(CheckpointInterval(every=10),), save_interval=datetime.timedelta(seconds=1))
    for force in (False, True):
        assert not policy.decide(10, now=99, last_save_step=10, last_save_time=0, force=force).save


def test_time_interval_gives_temporaries_and_step_hits_win():
    policy = SavePolicy(step_policies=(CheckpointInterval(every=100),), save_interval=datetime.timedelta(minutes=5))
    assert not policy.decide(7, now=299.9, last_save_step=None, last_save_time=0).save
    d = policy.decide(7, now=300, last_save_step=None, last_save_time=0)
    assert d.save and d.temporary
    d = policy.decide(100, now=300, last_save_step=None, last_save_time=0)
    assert d.save and not d.temporary


def test_skipped_steps_still_hit_the_schedule_when_previous_step_given():
    policy = SavePolicy(step_policies=(CheckpointInterval(every=10),))
    steps = [1, 4, 8, 12, 16, 19, 23, 31]  # grad accumulation: not every step is seen
    assert _saves(policy, steps) == []
    assert _saves(policy, steps, previous=True) == [12, 23, 31]


@pytest.mark.parametrize(
    ("intervals", "message"),
    [
        ((CheckpointInterval(every=10), CheckpointInterval(every=5, until=100)), r"step_policies\[0\] has until=None"),
        (
            (CheckpointInterval(every=10, until=100), CheckpointInterval(every=5, until=50)),
            r"step_policies\[1\] has until=50, not after step_policies\[0\]'s until=100",
        ),
        ((CheckpointInterval(every=10, until=100), "every 5"), r"step_policies\[1\] is 'every 5'"),
    ],
)
def test_bad_schedules_name_the_entry(intervals, message):
    with pytest.raises(ValueError, match=message):
        SavePolicy(step_policies=intervals)


@pytest.mark.parametrize("every", [0, -5, 1.5, True])
def test_interval_every_must_be_positive_int(every):
    with pytest.raises(ValueError, match="every must be a positive int"):
        CheckpointInterval(every=every)


@dataclasses.dataclass(frozen=True)
class Ckpt:
    step: int
    is_temporary: bool = False
    metric: float | None = None
    run: str = "this"

    @property
    def path(self):
        return f"{self.run}/run-{self.step}"

    @property
    def extras(self):
        return {} if self.metric is None else {"metrics": {"loss": self.metric}}


def _steps(doomed):
    return [c.step for c in doomed]


def test_superseded_temporaries_are_deleted_and_permanents_kept_by_default():
    cks = [Ckpt(100), Ckpt(130, True), Ckpt(160, True), Ckpt(200), Ckpt(230, True)]
    assert _steps(KeepPolicy().to_delete(cks)) == [130, 160]


def test_temporary_from_an_earlier_run_goes_after_this_runs_first_commit():
    earlier = Ckpt(1500, True, run="before")
    cks = [Ckpt(1000, run="before"), earlier]
    assert KeepPolicy().to_delete(cks, committed_this_run=[]) == []
    cks.append(Ckpt(1100))  # resumed from 1000, first commit at 1100 < 1500
    assert KeepPolicy().to_delete(cks, committed_this_run=["this/run-1100"]) == [earlier]


def test_keep_last_and_keep_every():
    cks = [Ckpt(s) for s in range(100, 1100, 100)]
    assert _steps(KeepPolicy(keep_last=2).to_delete(cks)) == list(range(100, 900, 100))
    assert _steps(KeepPolicy(keep_last=2, keep_every=500).to_delete(cks)) == [100, 200, 300, 400, 600, 700, 800]


def test_keep_best_never_deletes_the_latest():
    cks = [Ckpt(100, metric=0.9), Ckpt(200, metric=0.1), Ckpt(300, metric=0.5), Ckpt(400, metric=0.8)]
    assert _steps(KeepPolicy(keep_best=1, metric="loss").to_delete(cks)) == [100, 300]
    assert _steps(KeepPolicy(keep_best=2, metric="loss", mode="max").to_delete(cks)) == [200, 300]


def test_checkpoints_without_the_metric_follow_the_documented_rule():
    cks = [Ckpt(100), Ckpt(200, metric=0.3), Ckpt(300, metric=0.2), Ckpt(400), Ckpt(500, metric=0.9)]
    # keep_best alone: no-metric checkpoints are kept, never ranked
    assert _steps(KeepPolicy(keep_best=1, metric="loss").to_delete(cks)) == [200]
    # with keep_last, no-metric checkpoints are kept only by keep_last / keep_every
    assert _steps(KeepPolicy(keep_best=1, keep_last=1, metric="loss").to_delete(cks)) == [100, 200, 400]


def test_keep_policy_validation():
    with pytest.raises(ValueError, match="keep_best needs metric"):
        KeepPolicy(keep_best=2)
    with pytest.raises(ValueError, match="keep_last must be a positive int"):
        KeepPolicy(keep_last=0)
    with pytest.raises(ValueError, match="mode must be 'min' or 'max'"):
        KeepPolicy(keep_best=1, metric="acc", mode="best")
