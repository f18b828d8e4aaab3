"""examples/pretrain_gpt2.py with faults injected, for the tests; the example's own options carry none.

    python tests/fault_run.py [--nan_at_steps 3,4] [--kill_at_step N] [--signal_at_step STEP:SIGINT]
                              [--sleep_at_step STEP:SECONDS] [--step_time SECONDS] ARGS...

    --nan_at_steps   comma-separated steps whose loss is replaced by NaN on rank 0 (the other ranks must follow)
    --kill_at_step   SIGKILL this process right after that step (and its checkpoint, if one is due)
    --signal_at_step STEP:SIGINT or STEP:SIGTERM: this process signals itself during that step
    --sleep_at_step  STEP:SECONDS: that step takes SECONDS longer (a step longer than torchrun's shutdown grace)
    --step_time      SECONDS: every step takes SECONDS longer (time to signal a process within a step)

Each option installs a hook in pretrain_gpt2.FAULT_HOOKS; the other arguments go to the example's main unchanged.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from pathlib import Path

import pretrain_gpt2  # examples/ on sys.path: PYTHONPATH in the tests' subprocesses, conftest.py in theirs

OPTIONS = ("--nan_at_steps", "--kill_at_step", "--signal_at_step", "--sleep_at_step", "--step_time")


def nan_at(steps: set[int]):
    def hook(event, step, value):
        return value * float("nan") if event == "loss" and step in steps else value

    return hook


def signal_at(at: int, signum: int, event_name: str = "backward"):
    def hook(event, step, value):
        if event == event_name and step == at:
            os.kill(os.getpid(), signum)
        return value

    return hook


def make_hook(name: str, text: str):
    if name == "--nan_at_steps":
        pretrain_gpt2.require(re.fullmatch(r"\d+(,\d+)*", text), f"--nan_at_steps must be comma-separated integers, "
                              f"got {text!r}")
        return nan_at({int(s) for s in text.split(",")})
    if name == "--step_time":
        pretrain_gpt2.require(re.fullmatch(r"\d+(\.\d+)?", text), f"--step_time must be SECONDS, got {text!r}")
        return lambda event, step, value: time.sleep(float(text)) if event == "backward" else value
    if name == "--sleep_at_step":
        pretrain_gpt2.require(re.fullmatch(r"\d+:\d+(\.\d+)?", text), f"--sleep_at_step must be STEP:SECONDS, got "
                              f"{text!r}")
        at, seconds = int(text.partition(":")[0]), float(text.partition(":")[2])
        return lambda event, step, value: time.sleep(seconds) if event == "backward" and step == at else value
    if name == "--kill_at_step":
        pretrain_gpt2.require(text.isdigit(), f"--kill_at_step must be >= 0, got {text}")
        return signal_at(int(text), signal.SIGKILL, "step_end")
    pretrain_gpt2.require(re.fullmatch(r"\d+:SIG(INT|TERM)", text),
                          f"--signal_at_step must be STEP:SIGINT or STEP:SIGTERM, got {text!r}")
    step, _, name = text.partition(":")
    return signal_at(int(step), getattr(signal, name))


def parse_faults(argv: list[str]) -> tuple[list[str], list]:
    """(the example's arguments, the hooks of the fault options among argv)."""
    rest, hooks, args = [], [], list(argv)
    while args:
        arg = args.pop(0)
        name, eq, value = arg.partition("=")
        if name not in OPTIONS:
            rest.append(arg)
            continue
        pretrain_gpt2.require(eq or args, f"argument {name}: expected one argument")
        hooks.append(make_hook(name, value if eq else args.pop(0)))
    return rest, hooks


def main(argv=None) -> int:
    try:
        rest, hooks = parse_faults(sys.argv[1:] if argv is None else argv)
    except pretrain_gpt2.UsageError as e:
        print(f"{Path(sys.argv[0]).name}: error: {e}", file=sys.stderr)
        return 2
    pretrain_gpt2.FAULT_HOOKS[:] = hooks
    try:
        return pretrain_gpt2.main(rest)
    finally:
        pretrain_gpt2.FAULT_HOOKS.clear()


if __name__ == "__main__":
    sys.argv[0] = pretrain_gpt2.__file__  # the messages name the example
    pretrain_gpt2.exit_process(main())
