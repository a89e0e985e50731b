"""``ckpt-callbacks plan``: which steps a policy would save and keep, before a run starts.

The policy is pure, so the plan is a simulation: step ``s`` happens at ``s * step_time``.
"""

from __future__ import annotations

import argparse
import datetime
import math
from collections.abc import Sequence
from typing import Any

from ckpt_callbacks import directory as discovery
from ckpt_callbacks import directory as layout
from ckpt_callbacks.cli import _render as show
from ckpt_callbacks.manager import CheckpointInterval, KeepPolicy, SavePolicy

_MAX_PLAN_STEPS = 10_000_000  # about 20 s of simulated decisions
_MAX_PLAN_SAVES = 100_000  # rows of the plan
_MAX_INTERVALS = 16  # each decision looks through them
_MAX_SECONDS = 1e13  # a save interval, and the simulated run: 300,000 years, within a timedelta


def _intervals(every: Sequence[int], until: Sequence[int]) -> tuple[CheckpointInterval, ...]:
    if len(until) not in (len(every), len(every) - 1):
        raise ValueError(
            f"{len(every)} --every and {len(until)} --until: give one --until per --every "
            "(the last --every may have none: for ever)"
        )
    pairs = [CheckpointInterval(e, u) for e, u in zip(every, [*until, None], strict=False)]
    return tuple(sorted(pairs, key=lambda p: (p.until is None, p.until or 0)))


def simulate(
    policy: SavePolicy, steps: int, step_time: float, *, final: bool = True, max_saves: int | None = None
) -> list[dict[str, Any]]:
    """The saves a Checkpointer with ``policy`` makes when called at steps 1..``steps`` (time =
    step x ``step_time``), then ``on_train_end(steps)`` (``final``): the policy is pure, so no run.
    More than ``max_saves`` saves raise ``ValueError``.

    >>> policy = SavePolicy(step_policies=(CheckpointInterval(4),), save_interval=datetime.timedelta(seconds=5))
    >>> [(s["step"], s["temporary"]) for s in simulate(policy, 10, 1.0)]
    [(4, False), (8, False), (10, False)]
    """
    saves: list[dict[str, Any]] = []
    last_step: int | None = None
    last_time = step_time  # the Checkpointer's clock starts at its first call
    for step in range(1, steps + 1):
        now = step * step_time
        previous = step - 1 if step > 1 else None
        decision = policy.decide(
            step, now=now, last_save_step=last_step, last_save_time=last_time, previous_step=previous
        )
        if decision.save:
            if max_saves is not None and len(saves) >= max_saves:
                raise ValueError(
                    f"the policy saves more than {max_saves:,} times by step {step} of {steps}: "
                    "plan lists at most that many (save less often, or plan fewer --steps)"
                )
            saves.append({"step": step, "time_s": now, "temporary": decision.temporary, "reason": decision.reason})
            last_step, last_time = step, now
    if final and last_step != steps:
        saves.append({"step": steps, "time_s": steps * step_time, "temporary": False, "reason": "on_train_end"})
    return saves


def why_no_saves(policy: SavePolicy, steps: int, step_time: float, *, final: bool) -> str:
    """Why ``simulate`` planned no save (each rule that could have saved, and why it did not).

    >>> print(why_no_saves(SavePolicy(step_policies=(CheckpointInterval(100),)), 50, 1.0, final=False))
    ... # doctest: +NORMALIZE_WHITESPACE
    no save: every 100 steps first saves step 100, after the last step (50); no --save-interval;
    --no-final: no on_train_end save
    """
    reasons = []
    if policy.step_policies:
        first = policy.step_policies[0].every  # an interval's until is never below its every
        reasons.append(f"every {first} steps first saves step {first}, after the last step ({steps})")
    else:
        reasons.append("no --every schedule")
    if policy.save_interval is None:
        reasons.append("no --save-interval")
    else:  # the clock starts at step 1
        reasons.append(
            f"--save-interval {policy.save_interval.total_seconds():g} s is longer than the run after its first step "
            f"({(steps - 1) * step_time:g} s)"
        )
    if not final:
        reasons.append("--no-final: no on_train_end save")
    return "no save: " + "; ".join(reasons)


def _check_run(args: argparse.Namespace) -> datetime.timedelta | None:
    """Refuses a run plan cannot simulate; the save interval as a timedelta."""
    if args.steps > _MAX_PLAN_STEPS:
        raise ValueError(f"--steps {args.steps}: plan simulates every step, at most {_MAX_PLAN_STEPS:,}")
    if args.steps < 1 or not 0 < args.step_time < math.inf or args.steps * args.step_time > _MAX_SECONDS:
        raise ValueError(
            f"--steps {args.steps} --step-time {args.step_time}: expected positive steps and a positive time, "
            f"the run at most {_MAX_SECONDS:g} s (steps x step time)"
        )
    if len(args.every) > _MAX_INTERVALS:
        raise ValueError(f"{len(args.every)} --every: plan simulates at most {_MAX_INTERVALS} intervals")
    if args.save_interval is None:
        return None
    if not 1e-6 <= args.save_interval <= _MAX_SECONDS:  # NaN too; timedelta counts microseconds
        raise ValueError(f"--save-interval {args.save_interval}: expected seconds in [1e-06, {_MAX_SECONDS:g}]")
    return datetime.timedelta(seconds=args.save_interval)


def plan_command(args: argparse.Namespace) -> int:
    interval = _check_run(args)
    policy = SavePolicy(step_policies=_intervals(args.every, args.until), save_interval=interval)
    keep = KeepPolicy(keep_last=args.keep_last, keep_every=args.keep_every)
    saves = simulate(policy, args.steps, args.step_time, final=not args.no_final, max_saves=_MAX_PLAN_SAVES)
    infos = [
        discovery.CheckpointInfo(
            path=layout.run_name(s["step"]), step=s["step"], timestamp=s["time_s"], is_temporary=s["temporary"]
        )
        for s in saves
    ]
    doomed = {c.step for c in keep.to_delete(infos)}
    for s in saves:
        s["kept"] = s["step"] not in doomed
    every = ", then ".join(
        f"every {p.every} steps" + (f" until step {p.until}" if p.until is not None else "")
        for p in policy.step_policies
    )
    temporary = f"a temporary {args.save_interval:g} s after the last save" if interval else "no temporaries"
    run = f"steps 1..{args.steps} at {args.step_time:g} s/step" + (
        "" if args.no_final else f", then on_train_end({args.steps})"
    )
    data = {
        "policy": f"save {every or 'on no step schedule'}; {temporary}",
        "run": run,
        "keep": keep_text(keep),
        "saves": saves,
    }
    if not saves:
        data["why_no_saves"] = why_no_saves(policy, args.steps, args.step_time, final=not args.no_final)
    if args.json:
        show.print_json(data)
    else:
        out = show.console()
        show.show_plan(out, data)
        if not saves:
            out.print(data["why_no_saves"], soft_wrap=True)
    return 0


def keep_text(keep: KeepPolicy) -> str:
    rules = [
        f"--keep-{n} {getattr(keep, f'keep_{n}')}" for n in ("last", "every", "best") if getattr(keep, f"keep_{n}")
    ]
    if keep.keep_best:
        rules.append(f"--metric {keep.metric} --mode {keep.mode}")
    return " ".join(rules) or "every permanent checkpoint and the newest temporary (no --keep-* rule)"
