"""The sweep's live console: what ``sdsweep run`` prints while a sweep runs.

By default (Ray Tune's own tables only with ``--verbose``):

* progress bars for the cache task's stages (encoding images into the latent cache, drawing
  DreamBooth's class images, generating the baseline's images);
* on a terminal, a block redrawn in place: a header (trials done / running / left, the best score
  so far, elapsed time and an estimate of what is left) and one line per running trial (method,
  short hyperparameters, a bar of its steps, its last score); a line above it when a trial starts
  or ends (completed, stopped early by the scheduler at step N, errored with its one-line reason);
* anywhere else (a CI log, a pipe, ``nohup``): the same start and end lines and the header as
  plain lines; the header after a trial ends (at most every ``PLAIN_STATUS_S`` seconds) and
  whenever nothing was printed for ``PLAIN_QUIET_S`` seconds, so a log's length follows what
  happened, not how slow the machine was; no control codes.

The trial lines come from Tune's callback hooks on the driver (this module never reads files);
the cache progress comes from the cache task (``sweeps.cache_task.build_cache``, ``on_progress``).
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from typing import Any, Callable, TextIO

from ray.tune import Callback

from search_spaces.space import QUALIFIER
from sweeps.board import compact, short_names
from sweeps.searched import trial_value

PLAIN_STATUS_S = 30.0  # without a terminal, the header line after a trial ends at most this often
PLAIN_QUIET_S = 300.0  # without a terminal, the header line when nothing was printed for this long
REDRAW_S = 0.5  # on a terminal, the block is redrawn at most this often
BAR = 20  # characters of a trial's step bar


def bar(done: float, total: float, width: int = BAR) -> str:
    """``[#########.........]`` for ``done`` of ``total``."""
    frac = 0.0 if total <= 0 else min(1.0, max(0.0, done / total))
    full = int(round(frac * width))
    return "[" + "#" * full + "." * (width - full) + "]"


def duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``1h02m``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


class LiveConsole(Callback):
    """Tune callback printing the live view (module docstring)."""

    def __init__(self, cfg: Any, stream: TextIO | None = None, tty: bool | None = None,
                 clock: Callable[[], float] = time.monotonic, width: int | None = None) -> None:
        self.stream = stream or sys.stdout
        self.width = width  # None: the terminal's own width, read at each redraw
        self.tty = self.stream.isatty() if tty is None else tty
        self.clock = clock
        self.started = clock()
        self.total_trials = cfg.search.num_samples
        self.metric, self.mode = cfg.evaluation.metric, cfg.mode
        self.max_steps = cfg.base.train.max_train_steps
        self.scheduler = cfg.scheduler.type
        self.running: dict[str, dict[str, Any]] = {}
        self.done: dict[str, str] = {}  # trial id -> how it ended
        self.best: tuple[float, str, int] | None = None
        self.drawn = 0  # lines of the live block on screen (terminal mode)
        self.last_draw = 0.0
        self.last_status = self.last_line = clock()
        self.ended_since_status = False  # a trial ended since the last plain header
        self.stages: dict[str, tuple[int, int]] = {}
        self.names: dict[str, str] = {}
        self.steps_of: dict[str, int] = {}

    def __getstate__(self) -> dict[str, Any]:
        # Tune saves its callbacks with the experiment state (a resume restores them): the stream
        # and the clock are this process's; the restored console writes to the new one's stdout.
        state = dict(self.__dict__)
        state.update(stream=None, clock=None, drawn=0)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.stream, self.clock = sys.stdout, time.monotonic
        self.tty, self.width = self.stream.isatty(), None  # the new process's terminal
        self.started = self.last_draw = self.last_status = self.last_line = self.clock()

    # ----- the cache task's stages ---------------------------------------------------------------

    def progress(self, stage: str, done: int, total: int) -> None:
        """A progress report of the cache task (``sweeps.cache_task.build_cache``'s ``on_progress``)."""
        new = stage not in self.stages
        self.stages[stage] = (done, total)
        line = f"{stage:<16} {bar(done, total)} {done}/{total}"
        if self.tty:
            self._write(("\r" if not new else "") + "\x1b[2K" + line + ("\n" if done >= total else ""))
        elif done >= total or new:
            self._write(line + "\n")

    # ----- Tune's hooks --------------------------------------------------------------------------

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        # OptunaSearch's config of a mixed sweep also carries `<method>:<key>` beside each shared
        # key (search_spaces/space.py): show the plain one only.
        params = {k: v for k, v in (trial.config or {}).items() if "/" not in k and QUALIFIER not in k}
        method = params.get("method", "")
        self.running[trial.trial_id] = {"method": method, "params": self._short(params), "step": 0,
                                        "score": None, "steps": self._steps(params)}
        self._event(f"start {trial.trial_id}  {method}  {self.running[trial.trial_id]['params']}")

    def on_trial_result(self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any],
                        **info: Any) -> None:
        row = self.running.setdefault(trial.trial_id, {"method": result.get("method", ""), "params": "",
                                                       "step": 0, "score": None, "steps": self.max_steps})
        if isinstance(result.get("step"), (int, float)):
            row["step"] = int(result["step"])
        value = result.get(self.metric)
        if isinstance(value, (int, float)):
            row["score"] = float(value)
            if row.get("best") is None or (value > row["best"][0] if self.mode == "max" else value < row["best"][0]):
                row["best"] = (float(value), row["step"])
            if self.best is None or (value > self.best[0] if self.mode == "max" else value < self.best[0]):
                self.best = (float(value), trial.trial_id, row["step"])
        if result.get("trial_status") == "error":
            row["error"] = f"{result.get('error_type', 'error')}: {result.get('error', '')}"
        self._maybe_draw()

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        row = self.running.pop(trial.trial_id, {"step": 0, "method": "", "score": None})
        last = trial.last_result or {}
        status = last.get("trial_status")
        if status == "error" or "error" in row:
            why = f"errored at step {last.get('step', row['step'])}: " + \
                row.get("error", f"{last.get('error_type')}: {last.get('error')}")
            ended = "errored"
        elif status == "completed":
            why, ended = f"completed {row['step']} steps", "completed"
        else:
            why, ended = f"stopped by {self.scheduler.upper()} at step {row['step']}", "stopped"
        self.done[trial.trial_id] = ended
        self.ended_since_status = True
        best = row.get("best")
        score = f", best {self.metric} {compact(best[0])} @{best[1]}" if best else ""
        self._event(f"end   {trial.trial_id}  {row.get('method', '')}  {why}{score}")

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        row = self.running.pop(trial.trial_id, {"method": ""})
        self.done[trial.trial_id] = "errored"
        self.ended_since_status = True
        self._event(f"end   {trial.trial_id}  {row.get('method', '')}  lost its worker, no retries left "
                    f"(traceback: {trial.error_file})")

    def on_step_end(self, iteration: int, trials: list[Any], **info: Any) -> None:
        self._maybe_draw()

    def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
        self._clear()
        self._write(self.header() + "\n")

    # ----- what is printed -----------------------------------------------------------------------

    def header(self) -> str:
        """``trials 3 done, 2 running, 3 left | best composite 0.31 (ab12 @300) | 2m10s, ~3m left``."""
        done, running = len(self.done), len(self.running)
        left = max(0, self.total_trials - done - running)
        kinds = {k: list(self.done.values()).count(k) for k in ("completed", "stopped", "errored")}
        ended = ", ".join(f"{n} {k}" for k, n in kinds.items() if n)
        best = (f"best {self.metric} {compact(self.best[0])} ({self.best[1]} @{self.best[2]})" if self.best
                else f"best {self.metric} -")
        elapsed = self.clock() - self.started
        return (f"trials {done} done{f' ({ended})' if ended else ''}, {running} running, {left} left | {best} | "
                f"{duration(elapsed)}{self._eta(elapsed)}")

    def trial_line(self, trial_id: str, row: dict[str, Any]) -> str:
        score = f"{self.metric} {compact(row['score'])}" if row.get("score") is not None else ""
        return (f"  {trial_id:<10} {row['method'][:10]:<10} {bar(row['step'], row['steps'])} "
                f"{row['step']:>5}/{row['steps']:<5} {score:<18} {row['params']}")

    def _eta(self, elapsed: float) -> str:
        progress = len(self.done) + sum(min(1.0, r["step"] / max(1, r["steps"])) for r in self.running.values())
        if progress <= 0.05 or elapsed < 1 or progress >= self.total_trials:
            return ""
        return f", ~{duration(elapsed * (self.total_trials - progress) / progress)} left"

    def _short(self, params: dict[str, Any]) -> str:
        keys = [k for k in params if k != "method"]
        for k, v in short_names(keys).items():
            self.names.setdefault(k, v)
        return " ".join(f"{self.names[k]}={compact(params[k])}" for k in sorted(keys))

    def _steps(self, params: dict[str, Any]) -> int:
        steps = trial_value(params, "train.max_train_steps", self.max_steps)
        return int(steps) if isinstance(steps, (int, float)) else self.max_steps

    # ----- drawing -------------------------------------------------------------------------------

    def _event(self, line: str) -> None:
        self._clear()
        self._write(line + "\n")
        if self.tty:
            self._draw()  # the block goes back below the new line at once
        else:
            self._maybe_draw()

    def _maybe_draw(self) -> None:
        now = self.clock()
        if self.tty:
            if now - self.last_draw >= REDRAW_S:
                self._clear()
                self._draw()
        elif ((self.ended_since_status and now - self.last_status >= PLAIN_STATUS_S)
              or now - self.last_line >= PLAIN_QUIET_S):
            self.last_status, self.ended_since_status = now, False
            self._write(self.header() + "\n")

    def _columns(self) -> int:
        """The width of the terminal this console writes to (not of whatever stdout is)."""
        try:
            return os.get_terminal_size(self.stream.fileno()).columns
        except (AttributeError, OSError, ValueError):  # no file behind the stream, or not a terminal
            return shutil.get_terminal_size((120, 24)).columns

    def _draw(self) -> None:
        width = self.width or self._columns()
        lines = [self.header()] + [self.trial_line(t, r) for t, r in sorted(self.running.items())]
        self._write("".join(line[:width - 1] + "\n" for line in lines))
        self.drawn = len(lines)
        self.last_draw = self.clock()

    def _clear(self) -> None:
        if self.tty and self.drawn:
            self._write(f"\x1b[{self.drawn}F\x1b[J")
            self.drawn = 0

    def _write(self, text: str) -> None:
        if self.tty:
            # A carriage return with every line feed, so the redrawn block does not depend on the
            # terminal translating LF into CRLF (ONLCR, on in a cooked terminal: then CR CR LF).
            text = text.replace("\r\n", "\n").replace("\n", "\r\n")
        self.stream.write(text)
        self.stream.flush()
        self.last_line = self.clock()
