"""The training loop: micro-batches, optimizer steps, logging, evaluation, checkpoints and the stop protocol.

Per step (``grad_accum`` micro-batches per rank):

    for each micro-batch: strategy.forward_backward(batch on the device; on GPUs the next one is already queued)
    strategy.step()                                   clip, optimizer, scheduler
    every train.log_every steps: one all-reduce of the loss, one host sync, one metrics line
    every train.eval_every steps (and at the end): train.eval_batches batches of the held-out split
    every step (every few when steps are shorter than AGREE_PERIOD_S): an asynchronous all-reduce (MAX) of
                [stop requested, time-based save due], read one step later, so that all ranks agree without a host
                synchronisation per step
    every train.save_every steps, on time (train.save_every_minutes), at the end, or when stopping: a checkpoint

Between log steps there is no host synchronisation: losses accumulate on the device.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist

from launcher.config.schema import TrainConfig
from launcher.rundir import ENV_SIGNAL_LEAD_S
from launcher.train import distributed as D
from launcher.train import watchdog as W
from launcher.train.batches import DeviceBatches
from launcher.train.metrics import MetricsFile, PeakMemory, Progress, StepWindow, device_peak_tflops

FINISHED = "finished"
STOPPED = "stopped"
# The ranks agree on "stop" / "save now" about this often (every step when steps are slower, at least every log
# step): a stop must be seen within seconds of Slurm's signal (its lead is a minute or more), and one small collective
# per fast step costs about 1% of a CPU step, nothing that matters on GPUs.
AGREE_PERIOD_S = 1.0


@dataclass
class LoopState:
    step: int = 0
    tokens: int = 0  # tokens trained so far (all ranks, padding included)
    elapsed_s: float = 0.0  # wall time of earlier attempts (from the checkpoint)


class Trainer:
    """Runs ``strategy`` from ``state.step`` to ``train.max_steps``; ``train()`` returns FINISHED or STOPPED."""

    def __init__(
        self,
        *,
        train: TrainConfig,
        device_name: Optional[str],
        env: D.DistEnv,
        strategy: Any,
        splits: Any,
        sampler: Any,
        checkpoints: Any,
        metrics: MetricsFile,
        flops_per_token: float,
        state: LoopState,
        trainer_state_extra: Dict[str, Any],
    ) -> None:
        self.train_cfg = train
        self.env = env
        self.strategy = strategy
        self.splits = splits
        self.sampler = sampler
        self.batches = DeviceBatches(splits.train, sampler, env.device)
        self.checkpoints = checkpoints
        self.metrics = metrics
        self.flops_per_token = flops_per_token
        self.state = state
        self.extra = trainer_state_extra
        self.max_steps = int(train.max_steps)
        self.accum = int(train.grad_accum)
        self.log_every = max(1, int(train.log_every))
        self.eval_every = int(train.eval_every)  # 0: off
        self.save_every = int(train.save_every)  # 0: off
        self.save_every_s = float(train.save_every_minutes) * 60 if train.save_every_minutes else None
        self.sleep_s = float(train.debug_step_sleep_s or 0.0)
        self.tokens_per_step = int(train.micro_batch_size) * self.accum * env.world_size * splits.train.seq_len
        peak = device_peak_tflops(device_name)  # None (no cluster section): no MFU
        self.peak_flops = peak * 1e12 if peak else None
        self.progress = Progress(
            total=self.max_steps, initial=state.step, enabled=env.is_main,
            every=max(self.log_every, self.max_steps // 50 if self.max_steps > 200 else 1),
        )
        self.last_saved_step: Optional[int] = state.step if state.step > 0 else None
        self.state_first_step_of_attempt = state.step + 1
        self.peak_memory = PeakMemory(env.device)

    # -------------------------------------------------------------------------------------------------------------
    def train(self) -> str:
        """Train to ``max_steps``, or until a stop request (then save and return STOPPED)."""
        device = self.env.device
        self._attempt_start = time.perf_counter()
        self._last_save_time = time.monotonic()
        self._started, self._first_step = time.monotonic(), self.state.step
        self._window = StepWindow()
        self._loss_sum = torch.zeros((), dtype=torch.float32, device=device)
        self._agree_every, self._local_step_s = 1, 0.0  # agree every step until the first log step measured one
        agreement = D.LaggedAgreement(device)
        self.strategy.model.train()
        outcome = FINISHED
        if self.state.step >= self.max_steps:
            self.progress.message(f"already at step {self.state.step} of {self.max_steps}: nothing to train")
        for step in range(self.state.step + 1, self.max_steps + 1):
            W.step_start(step)  # test hooks (train.debug_hang_*)
            lr = float(self.strategy.scheduler.get_last_lr()[0])  # the rate this step uses (no device sync)
            grad_norm = self._train_step(step)
            self._window.steps += 1
            self.state.step = step
            self.state.tokens += self.tokens_per_step
            W.step_done(step)  # the watchdog's progress beat (docs/hangs.md)
            if step == self.state_first_step_of_attempt:
                self.peak_memory.reset()  # from here on: the training peak, not the load's
            if step % self.log_every == 0 or step == self.max_steps:
                with W.phase("collective"):
                    self._log_window(step, lr, grad_norm)
                    W.log_step(step)  # every train.straggler_every log steps: the straggler gather
            if self.eval_every and (step % self.eval_every == 0 or step == self.max_steps):
                with W.phase("eval"):
                    self._paused(lambda: self.evaluate(step))
            flags = agreement.collect()  # what every rank posted at the end of the previous step
            stop = bool(flags and flags[0] > 0) and step < self.max_steps
            self._maybe_save(step, stop=stop, time_due=bool(flags and flags[1] > 0))
            if stop:
                outcome = STOPPED
                break
            if step < self.max_steps and step % self._agree_every == 0:
                due = self.save_every_s is not None and time.monotonic() - self._last_save_time >= self.save_every_s
                agreement.post([1.0 if D.stop_requested() else 0.0, 1.0 if due else 0.0])
        agreement.collect()  # nothing may stay in flight before the export's collectives
        self.progress.close()
        return outcome

    def _train_step(self, step: int) -> torch.Tensor:
        """``accum`` micro-batches and the optimizer step; returns the grad norm (on the device)."""
        for micro in range(self.accum):
            last = micro == self.accum - 1
            batch = self.batches.next(more=not (last and step == self.max_steps))
            self._loss_sum += self.strategy.forward_backward(batch, last=last)
        grad_norm = self.strategy.step()
        if self.sleep_s:
            time.sleep(self.sleep_s)
        return grad_norm

    def _log_window(self, step: int, lr: float, grad_norm: torch.Tensor) -> None:
        window = self._window
        values, steps, window_s = window.close(lambda: self._reduce_for_log(self._loss_sum, window.steps, grad_norm))
        self._log_train(step, values, steps, lr, window_s,
                        self.state.elapsed_s + time.perf_counter() - self._attempt_start)
        self._loss_sum.zero_()
        # Every rank got the same mean step time (the previous window's) from the all-reduce: the same cadence.
        if values[2] > 0:
            self._agree_every = max(1, min(self.log_every, int(AGREE_PERIOD_S / values[2])))
        self._local_step_s = window_s / max(steps, 1)

    def _paused(self, work: Any) -> None:
        """Run ``work`` with its time left out of the throughput window."""
        paused = time.perf_counter()
        work()
        self._window.excluded_s += time.perf_counter() - paused

    def _maybe_save(self, step: int, *, stop: bool, time_due: bool) -> None:
        for result in self.checkpoints.finished():  # background saves that completed meanwhile (never blocks)
            self._report_save(result)
        if stop:
            self.progress.message(f"stop requested ({D.stop_reason() or 'another rank'}): saving at step {step}")
        every = self.save_every and step % self.save_every == 0
        if not (every or time_due or step == self.max_steps or stop):
            return
        now = time.perf_counter()
        self.state.elapsed_s += now - self._attempt_start
        self._attempt_start = now
        with W.phase("save"):  # the last save of the attempt is synchronous and waits for one in flight
            self._paused(lambda: self.save(step, final=stop or step == self.max_steps))

    # -------------------------------------------------------------------------------------------------------------
    def _reduce_for_log(self, loss_sum: torch.Tensor, steps: int, grad_norm: torch.Tensor) -> list:
        """[mean loss over ranks and the window's micro-batches, grad norm, the ranks' mean step time of the previous
        window] on the host: the one host sync."""
        summed = torch.stack([loss_sum.float() / (steps * self.accum),
                              torch.full_like(loss_sum, self._local_step_s, dtype=torch.float32)])
        if dist.is_initialized() and self.env.world_size > 1:
            dist.all_reduce(summed, op=dist.ReduceOp.SUM)
            summed = summed / self.env.world_size
        return torch.stack([summed[0], grad_norm.to(summed.device).float(), summed[1]]).tolist()

    def _log_train(self, step: int, values: list, steps: int, lr: float, window_s: float, elapsed_s: float) -> None:
        if not self.env.is_main:
            return
        tokens_per_s = self.tokens_per_step * steps / max(window_s, 1e-9)
        record = {
            "step": step,
            "loss": values[0],
            "lr": lr,
            "grad_norm": values[1],
            "tokens_per_s": tokens_per_s,
            "tokens_per_s_per_device": tokens_per_s / self.env.world_size,
            "mfu": (self.flops_per_token * tokens_per_s / (self.env.world_size * self.peak_flops))
            if self.peak_flops else None,
            **self.peak_memory.read(),
            "tokens": self.state.tokens,
            "elapsed_s": elapsed_s,
            "world_size": self.env.world_size,
            "step_time_s": window_s / max(steps, 1),
        }
        self.metrics.write(record)
        self.progress.update(step, record)

    def evaluate(self, step: int) -> Optional[float]:
        from launcher.train.sampler import eval_indices

        split = self.splits.eval
        batches = eval_indices(
            len(split), batch_size=int(self.train_cfg.micro_batch_size), rank=self.env.rank,
            world_size=self.env.world_size, num_batches=int(self.train_cfg.eval_batches),
        )
        if not batches:
            return None
        from launcher.train.evaluation import evaluate_split  # THE eval (token-weighted; shared with launcher.evaluate)

        model = self.strategy.model
        model.eval()
        values = evaluate_split(model, split, batches, self.env.device, self.env.world_size)
        model.train()
        value = values["eval_loss"]
        if self.env.is_main:
            self.metrics.write({"step": step, **values, "eval_batches": len(batches)})
            scores = " ".join(f"{k} {v:.4f}" for k, v in values.items() if isinstance(v, float))
            self.progress.message(f"step {step} {scores}")
        return value

    def save(self, step: int, *, final: bool = False) -> None:
        """A checkpoint of ``step``; ``final``: synchronous, after any background save (nothing stays in flight)."""
        if self.last_saved_step == step:
            if final:
                self.checkpoints.wait()
                for result in self.checkpoints.finished():
                    self._report_save(result)
            return
        state = dict(self.extra)
        state.update(
            sampler=self.batches.sampler_state(),
            tokens=self.state.tokens,
            elapsed_s=self.state.elapsed_s,
            metrics_step=step,
        )
        result = self.checkpoints.save(step, state, final=final)
        self.last_saved_step = step
        self._last_save_time = time.monotonic()
        for done in self.checkpoints.finished():  # the one in flight before, which this save waited for
            self._report_save(done)
        if result is not None:
            self._report_save(result)

    def _report_save(self, result: Dict[str, Any]) -> None:
        """The checkpoint event (rank 0): ``blocked_s`` the loop waited, ``save_s`` the whole write."""
        if not self.env.is_main:
            return
        step, mode = result["step"], "in the background" if result["async"] else "synchronously"
        self.metrics.write({"step": step, "event": "checkpoint", "save_s": result["save_s"],
                            "blocked_s": result["blocked_s"], "size_gb": result["size_gb"], "async": result["async"]})
        self.progress.message(
            f"checkpoint step-{step} saved {mode} in {result['save_s']:.2f}s, the loop waited "
            f"{result['blocked_s']:.2f}s ({result['size_gb']:.3f} GB)"
        )
        if not result["async"]:  # the save that must fit in Slurm's warning lead is the synchronous final one
            warning = save_budget_warning(result["save_s"], self.step_time_s_estimate())
            if warning:
                self.progress.message(warning)

    def step_time_s_estimate(self) -> float:
        """Seconds per optimizer step so far in this attempt (a step may be in flight when the signal comes)."""
        steps = max(self.state.step - self._first_step, 1)
        return (time.monotonic() - self._started) / steps


def save_budget_warning(save_s: float, step_s: float) -> Optional[str]:
    """Slurm's warning signal must leave time to finish the step in flight (up to two) and save: say when it does not."""
    from launcher.plan.save_budget import needed_lead_s

    lead = os.environ.get(ENV_SIGNAL_LEAD_S)
    if not lead:
        return None
    needed = needed_lead_s(save_s, step_s)
    if needed <= float(lead):
        return None
    return (f"WARNING: a save takes {save_s:.1f}s and a step {step_s:.1f}s, but Slurm's warning comes only {lead}s "
            f"before the time limit: raise cluster.signal_lead_s to at least {int(needed) + 1} or the job may "
            "be killed mid-save (the previous checkpoint stays valid)")
