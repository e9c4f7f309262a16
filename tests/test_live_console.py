"""The live console (sweeps/live.py) in both modes, driven through Tune's callback hooks.

Terminal mode is checked by what a terminal would show: the output goes through pyte, a VT100
emulator, and the assertions read its screen (a block redrawn in place must appear once, not once
per redraw). Plain mode (a pipe, a CI log) must hold no control codes at all. The console of a
real sweep, run as the README runs it, is checked in tests/test_toyworld_demo.py; that Tune can
save it with the experiment state and restore it is what the kill -9 e2e test's `sdsweep resume`
does (tests/test_sweep_e2e.py).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

import pyte

from sweeps.config import SweepConfig
from sweeps.live import LiveConsole

WIDTH, HEIGHT = 120, 30


@dataclass
class FakeTrial:
    """What the console reads of a Tune trial."""

    trial_id: str
    config: dict[str, Any]
    last_result: dict[str, Any] = field(default_factory=dict)
    error_file: str = "/runs/x/error.txt"


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _cfg() -> SweepConfig:
    return SweepConfig.model_validate({
        "name": "t", "base": {"model": "builtin:tiny-sd", "data": {"path": "builtin:demo"},
                              "train": {"max_train_steps": 100}},
        "search": {"num_samples": 3}, "evaluation": {"every": 10, "metric": "fixed_train_loss"}})


def _play(console: LiveConsole, clock: Clock) -> None:
    """Three trials: a completes, b is stopped early, c errors; a cache stage before them."""
    for done in (2, 5, 8):
        clock.t += 1
        console.progress("encode images", done, 8)
    a = FakeTrial("a1", {"method": "lora", "train.learning_rate": 3e-3, "lora.rank": 8})
    b = FakeTrial("b2", {"method": "lora", "train.learning_rate": 1e-4, "lora.rank": 4})
    c = FakeTrial("c3", {"method": "lora", "train.learning_rate": 5e-2, "lora.rank": 16})
    console.on_trial_start(0, [], a)
    console.on_trial_start(0, [], b)
    for step, (la, lb) in zip((10, 20, 30), ((0.5, 0.7), (0.4, 0.8), (0.45, 0.9))):
        clock.t += 40
        console.on_trial_result(0, [], a, {"step": step, "fixed_train_loss": la, "trial_status": "running"})
        console.on_trial_result(0, [], b, {"step": step, "fixed_train_loss": lb, "trial_status": "running"})
        console.on_step_end(0, [])
    b.last_result = {"step": 30, "trial_status": "running"}
    console.on_trial_complete(0, [], b)
    console.on_trial_start(0, [], c)
    c.last_result = {"step": 3, "trial_status": "error", "error_type": "NonFiniteLossError",
                     "error": "the loss became nan at step 3"}
    console.on_trial_result(0, [], c, c.last_result)
    console.on_trial_complete(0, [], c)
    clock.t += 40
    console.on_trial_result(0, [], a, {"step": 50, "fixed_train_loss": 0.3, "trial_status": "running"})
    console.on_step_end(0, [])


def test_on_a_terminal_the_block_is_redrawn_in_place() -> None:
    out, clock = io.StringIO(), Clock()
    console = LiveConsole(_cfg(), stream=out, tty=True, clock=clock, width=WIDTH)
    _play(console, clock)
    screen = pyte.Screen(WIDTH, HEIGHT)
    pyte.Stream(screen).feed(out.getvalue())  # as a terminal with its LF -> CRLF translation off shows it
    lines = [line.rstrip() for line in screen.display if line.strip()]
    assert "\x1b[" in out.getvalue()
    # the cache bar was updated in place: one line, at its final state
    assert [line for line in lines if line.startswith("encode images")] == [
        "encode images    [####################] 8/8"]
    # one header and one line per running trial, whatever the number of redraws
    headers = [line for line in lines if line.startswith("trials ")]
    assert len(headers) == 1, lines
    assert headers[0].startswith("trials 2 done (1 stopped, 1 errored), 1 running, 0 left | best fixed_train_loss 0.3 "
                                 "(a1 @50) | 2m43s, ~"), headers[0]
    running = [line for line in lines if line.startswith("  a1")]
    assert running == [line for line in lines if "[" in line and line.lstrip().startswith("a1")]
    assert len(running) == 1 and "[##########..........]    50/100" in running[0] and "r=8 lr=3e-3" in running[0]
    # the event lines stay above the block, in order
    events = [line for line in lines if line.startswith(("start ", "end "))]
    assert events == [
        "start a1  lora  r=8 lr=3e-3",
        "start b2  lora  r=4 lr=1e-4",
        "end   b2  lora  stopped by ASHA at step 30, best fixed_train_loss 0.7 @10",
        "start c3  lora  r=16 lr=0.05",
        "end   c3  lora  errored at step 3: NonFiniteLossError: the loss became nan at step 3",
    ]
    assert all(len(line) <= WIDTH for line in lines)


def test_without_a_terminal_plain_lines_only() -> None:
    out, clock = io.StringIO(), Clock()
    console = LiveConsole(_cfg(), stream=out, tty=False, clock=clock)
    _play(console, clock)
    console.on_experiment_end([])
    text = out.getvalue()
    assert "\x1b" not in text and "\r" not in text
    lines = text.splitlines()
    assert lines[:2] == ["encode images    [#####...............] 2/8", "encode images    [####################] 8/8"]
    assert sum(line.startswith("start ") for line in lines) == 3
    assert sum(line.startswith("end ") for line in lines) == 2
    # the header after the ends (b's, then c's under PLAIN_STATUS_S later: deferred to the next
    # result), and once at the end
    headers = [line for line in lines if line.startswith("trials ")]
    assert [h.split(" |")[0] for h in headers] == ["trials 1 done (1 stopped), 1 running, 1 left",
                                                    "trials 2 done (1 stopped, 1 errored), 1 running, 0 left",
                                                    "trials 2 done (1 stopped, 1 errored), 1 running, 0 left"], lines
    assert headers[-1].startswith("trials 2 done (1 stopped, 1 errored), 1 running, 0 left")
    assert not any(line.startswith("  a1") for line in lines)  # no per-trial bars in a log


def test_without_a_terminal_a_slow_machine_does_not_lengthen_the_log() -> None:
    """Results every 40 s for an hour and no trial ending: a header line each PLAIN_QUIET_S of
    silence (the log's length follows what happened, not the machine's speed)."""
    from sweeps.live import PLAIN_QUIET_S

    out, clock = io.StringIO(), Clock()
    console = LiveConsole(_cfg(), stream=out, tty=False, clock=clock)
    a = FakeTrial("a1", {"method": "lora", "train.learning_rate": 3e-3, "lora.rank": 8})
    console.on_trial_start(0, [], a)
    for step in range(90):  # 3600 s
        clock.t += 40
        console.on_trial_result(0, [], a, {"step": step, "fixed_train_loss": 0.5, "trial_status": "running"})
        console.on_step_end(0, [])
    headers = [line for line in out.getvalue().splitlines() if line.startswith("trials ")]
    # printed at the first result at least PLAIN_QUIET_S after the previous line: every 320 s
    assert len(headers) == 3600 // (PLAIN_QUIET_S + 20), headers
    assert headers[0].startswith("trials 0 done, 1 running, ") and "| 5m20s" in headers[0], headers


def test_a_mixed_sweeps_trial_shows_each_parameter_once() -> None:
    """The configs Ray's OptunaSearch hands the trials of a LoRA + textual-inversion sweep (built
    through the real search space and Optuna) carry `<method>:train.learning_rate` beside
    `train.learning_rate`; the start line names each of the trial's parameters once."""
    from ray.tune.search.optuna import OptunaSearch

    from search_spaces import SamplerSettings, build_search_space, load_space, make_sampler
    from sweeps.board import compact

    space = build_search_space([load_space("lora"), load_space("textual_inversion")])
    search = OptunaSearch(space=space.define_by_run, metric="fixed_train_loss", mode="min",
                          sampler=make_sampler(SamplerSettings(seed=0)), points_to_evaluate=space.warm_start_points())
    configs = [search.suggest(f"t{i}") for i in range(4)]
    assert {c["method"] for c in configs} == {"lora", "textual_inversion"}
    assert all(f"{c['method']}:train.learning_rate" in c for c in configs)  # the case under test
    out = io.StringIO()
    console = LiveConsole(_cfg(), stream=out, tty=False, clock=Clock())
    for i, config in enumerate(configs):
        console.on_trial_start(0, [], FakeTrial(f"t{i}", config))
    starts = [line for line in out.getvalue().splitlines() if line.startswith("start ")]
    assert len(starts) == len(configs)
    for line, config in zip(starts, configs):
        plain = space.flat_params(config)  # the trial's own parameters, as the space defines them
        _, method, shown = line.split("  ", 2)
        names = [item.partition("=")[0] for item in shown.split()]
        assert method == plain["method"] and ":" not in shown, line
        assert len(names) == len(set(names)) == len(plain) - 1, line  # each once, "method" aside
        assert f"lr={compact(plain['train.learning_rate'])}" in shown.split(), line
