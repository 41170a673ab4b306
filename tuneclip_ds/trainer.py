"""The training loop: batches -> features -> loss -> engine.backward -> engine.step."""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from tuneclip_ds import checkpoint, preemption
from tuneclip_ds.config import Config, OSRConfig, corpus_size
from tuneclip_ds.data.device_images import to_model_input
from tuneclip_ds.losses import gamma_schedule
from tuneclip_ds.optim import StageClock, StatisticsRecovery, group_options, param_groups, tower_mean_rates
from tuneclip_ds.timing import phase_timer

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss was NaN or infinite and the config says to stop (or too many batches were skipped)."""


@dataclass
class StepResult:
    loss: float
    lr_factor: float  # the schedule's multiplier of every group's base rate at this update (0 in stage I)
    grad_norm: float | None
    logit_scale: float
    step_time: float
    samples: int
    skipped_batches: int = 0
    data_skipped: int = 0
    source_counts: list[int] | None = None  # this rank's samples from each of data.sources
    phase_seconds: dict[str, float] = field(default_factory=dict)  # data, forward, loss, backward, step


@dataclass
class History:
    """What the run reports at its end (rank 0 prints it; tests read it)."""

    losses: list[float] = field(default_factory=list)
    skipped_batches: int = 0


class Trainer:
    """Drives a DeepSpeed engine over a stream of batches: stage I (``osr``), then ``total_steps`` of stage II.

    ``engine(image, text)`` must return open_clip's ``(image_features,
    text_features, logit_scale[, logit_bias])``; ``loss_fn`` returns the
    global-batch loss (the same value on every rank). Without ``osr`` the run
    is stage II alone. ``evaluator`` runs when stage II starts, every
    ``eval.every`` steps of stage II and at the end, and picks the best checkpoint.
    ``ema`` (a ShardedEMA, or None) follows the weights over stage II.
    """

    def __init__(
        self,
        config: Config,
        engine,
        batches,
        loss_fn: Callable[..., torch.Tensor],
        total_steps: int,
        writer=None,
        osr: StatisticsRecovery | None = None,
        evaluator=None,
        export_record: dict | None = None,
        ema=None,
    ):
        self.config = config
        self.engine = engine
        self.batches = batches  # an endless BatchStream (with state_dict / load_state_dict)
        self.loss_fn = loss_fn
        self.total_steps = total_steps
        self.osr = osr or StatisticsRecovery(engine, StageClock(), OSRConfig(), max_steps=0)
        self.evaluator = evaluator  # a TrainingEvaluator, or None
        self.ema = ema
        self.export_record = export_record or {}  # saved with each checkpoint, for `export --folder`
        self.last_eval_step: int | None = None
        self.writer = writer
        self.is_main = engine.global_rank == 0
        self.timer = phase_timer(engine.device, enabled=self.is_main and config.log.timing)  # rank 0 logs it
        self.global_batch = config.train.batch_size * config.train.grad_accum * engine.dp_world_size
        self.history = History()
        self.input_dtype = _engine_dtype(engine)
        # For rank 0's logs: each group's and each tower's base rate, which the schedule's factor multiplies.
        self.param_groups = param_groups(engine.module, config.optim) if self.is_main else []
        self.tower_rates = tower_mean_rates(engine.module, config.optim) if self.is_main else {}
        self.checkpoint_root = config.run_dir / "checkpoints"
        # Save after the step in flight, and maybe stop there: set by callers, and agreed over the ranks with
        # the preemption signals noted by tuneclip_ds.preemption (see _agree_to_save).
        self.save_requested = False
        self.stop_requested = False
        self.last_saved_step: int | None = None

    @property
    def step(self) -> int:
        return self.engine.global_steps

    @property
    def end_step(self) -> int:
        """The run's last step: stage II's length after stage I's end (after its step limit while it runs)."""
        stage2_start = self.osr.max_steps if self.osr.active else self.osr.clock.stage2_start
        return stage2_start + self.total_steps

    def run(self) -> History:
        self.resume()
        if self._train_stages():
            self._evaluate()
            if self.config.checkpoint.save_at_end and self.last_saved_step != self.step:
                self.save()
        if self.writer is not None:
            self.writer.flush()
        return self.history

    def _train_stages(self) -> bool:
        """Stage I (unless over), then stage II to the end; False when stopped on request."""
        if self.osr.active:
            if self.osr.start_digest is None:
                self.osr.begin()
            if not self._train_while(lambda: not self.osr.done()):
                return False
            self._begin_stage2()
        elif self.step == 0:
            self._evaluate()  # the starting model, stage II's baseline
        logger.info("fine-tuning steps %d..%d, global batch %d", self.step + 1, self.end_step, self.global_batch)
        return self._train_while(lambda: self.step < self.end_step)

    def _train_while(self, condition: Callable[[], bool]) -> bool:
        """Train until ``condition`` fails (True) or a stop is requested (False), saving on the way."""
        start, first_step = time.perf_counter(), self.step
        every = self.config.checkpoint.every
        while condition():
            result = self.train_step()
            self.history.losses.append(result.loss)
            if self.ema is not None and not self.osr.active:
                self.ema.after_step(self.stage2_step)
            diagnostics = self.osr.observe(self.loss_fn) if self.osr.active else {}
            self._report(result, diagnostics, elapsed=time.perf_counter() - start, steps_done=self.step - first_step)
            if self.evaluator is not None and self._evaluation_due():
                self._evaluate()
            if self._agree_to_save() or (every and self.step % every == 0):
                self.save()
            if self.stop_requested:
                logger.info("stopping at step %d on request; resume with checkpoint.resume=latest", self.step)
                return False
        return True

    def _begin_stage2(self) -> None:
        digest = self.osr.begin_stage2(self.step, self.loss_fn)  # raises if a parameter changed
        if self.writer is not None:
            self.writer.add_scalar("osr/parameters_unchanged", 1.0, self.step)
            self.writer.add_text("osr/parameter_digest", digest, self.step)
        self._evaluate()
        if self.checkpoints_wanted and self.last_saved_step != self.step:
            self.save()  # what stage II starts from (after osr.recover): other stage-II runs can start here too

    @property
    def stage2_step(self) -> int | None:
        """Steps of stage II done so far; None during stage I."""
        return None if self.osr.active else self.osr.clock.stage2_position(self.step)

    def _evaluation_due(self) -> bool:
        """After every ``eval.every`` and the ``eval.at_steps`` steps of stage II; never during stage I, whose
        weights do not change (the start of stage II evaluates them)."""
        position, every = self.stage2_step, self.config.eval.every
        if position is None:
            return False
        return bool(every and position % every == 0) or position in self.config.eval.at_steps

    @property
    def checkpoints_wanted(self) -> bool:
        return bool(self.config.checkpoint.every or self.config.checkpoint.save_at_end)

    def _evaluate(self) -> None:
        """Evaluate (once per step), log to TensorBoard, and keep the checkpoint of the best result."""
        if self.evaluator is None or self.last_eval_step == self.step:
            return
        results, is_best = self._timed("eval", lambda: self.evaluator(self.engine, self.input_dtype, self.step, self.ema))
        self.last_eval_step = self.step
        if self.writer is not None:
            for name, value in results.items():
                self.writer.add_scalar(f"eval/{name}", value, self.step)
        if self.is_main:  # every result as a line of JSON, for scripts that compare runs
            record = {"step": self.step, "stage2_step": self.stage2_step, **results}
            self.config.run_dir.mkdir(parents=True, exist_ok=True)
            with open(self.config.run_dir / "eval.jsonl", "a") as log:
                log.write(json.dumps(record) + "\n")
        if is_best and self.checkpoints_wanted:
            if self.last_saved_step != self.step:
                self.save()
            if self.is_main:
                checkpoint.mark_best(self.checkpoint_root, self.step)

    def checkpoint_metadata(self) -> dict:
        """What a checkpoint must agree with to be resumed by this run."""
        return {"model": self.config.model.name, "zero_stage": self.config.train.zero_stage,
                "loss": self.config.loss.name}

    def save(self) -> None:
        rank_state = {
            "data": self.batches.state_dict(),
            "rng": checkpoint.rng_states(),
            "loss": self.loss_fn.state_dict() if hasattr(self.loss_fn, "state_dict") else {},
            "osr": self.osr.state_dict(),
            "eval": self.evaluator.state_dict() if self.evaluator is not None else {},
        }
        metadata = {**self.checkpoint_metadata(), **self.export_record,
                    "param_group_options": group_options(self.config.optim),
                    "ema": self.ema.record() if self.ema is not None else None}
        self._timed("checkpoint", lambda: checkpoint.save(
            self.engine, self.checkpoint_root, self.step, metadata, rank_state, keep_last=self.config.checkpoint.keep_last,
            ema_state=self.ema.state_to_save() if self.ema is not None else None))
        self.save_requested = False
        self.last_saved_step = self.step

    def resume(self) -> None:
        path = checkpoint.resolve(self.config.checkpoint.resume, self.checkpoint_root)
        if path is None:
            return
        metadata = checkpoint.read_metadata(path)
        checkpoint.check_compatible(metadata, self.checkpoint_metadata(), path)
        # Another world size is supported too (a resized cluster); the data position then restarts its epoch.
        checkpoint.load_engine(self.engine, path, metadata["world_size"])
        state = checkpoint.load_rank_state(path, self.engine.global_rank, metadata["world_size"],
                                           self.engine.dp_world_size)
        self.batches.load_state_dict(state["data"])
        checkpoint.set_rng_states(state["rng"])
        if hasattr(self.loss_fn, "load_state_dict"):
            self.loss_fn.load_state_dict(state["loss"])
        if "osr" in state:
            self.osr.load_state_dict(state["osr"])
        if self.evaluator is not None and "eval" in state:
            self.evaluator.load_state_dict(state["eval"])
        if self.ema is not None:
            self._resume_ema(path, metadata)
        self.last_saved_step = self.step
        logger.info("resumed from %s at step %d", path, self.step)

    def _resume_ema(self, path, metadata: dict) -> None:
        if metadata.get("ema") is not None:
            self.ema.load(path, metadata["world_size"])
            return
        self.ema.reset()  # stage I changes no weight: exact until stage II has begun
        if self.is_main and not self.osr.active:
            logger.warning("checkpoint %s holds no EMA of the weights (saved without ema.decay): the EMA starts "
                           "from the weights at step %d, not from the start of stage II", path, self.step)

    def train_step(self) -> StepResult:
        """One optimizer step: ``grad_accum`` micro-batches with finite losses, then ``engine.step()``."""
        began = time.perf_counter()
        device = self.engine.device
        losses, skipped, data_skipped, source_counts = [], 0, 0, None
        grad_norm = None
        self._schedule_loss()
        while len(losses) < self.config.train.grad_accum:
            with self.timer.phase("data"):
                batch = next(self.batches)
                image, text = to_model_input(batch, device, self.input_dtype), batch["text"].to(device)
                targets = _loss_targets(batch, device)
            data_skipped += batch.get("num_skipped", 0)
            source_counts = _add_counts(source_counts, batch.get("source_counts"))
            with self.timer.phase("forward"):
                outputs = self.engine(image, text)
            with self.timer.phase("loss"):
                loss = self._loss(outputs, targets)
            if not torch.isfinite(loss):
                skipped += 1
                self._on_nonfinite(loss, skipped)
                continue
            with self.timer.phase("backward"):
                self.engine.backward(loss)
            if self.engine.is_gradient_accumulation_boundary():
                lr_factor = 0.0 if self.osr.active else _schedule_factor(self.engine)  # of this update's rates
                if self.engine.zero_optimization_stage() == 0:
                    grad_norm = _local_grad_norm(self.engine.module)  # stage 0 does not report it; read after the step
            with self.timer.phase("step"):
                self.engine.step()
            losses.append(loss.item())  # waits for the step: the timer's events are done
        if hasattr(self.loss_fn, "estimators"):  # the host has waited anyway: room for ids beyond the table
            self.loss_fn.estimators.make_room()
        self.history.skipped_batches += skipped
        engine_norm = self.engine.get_global_grad_norm()
        return StepResult(
            loss=sum(losses) / len(losses),
            lr_factor=lr_factor,
            grad_norm=_as_float(engine_norm if engine_norm is not None else grad_norm),
            logit_scale=outputs[2].detach().float().mean().item(),
            step_time=time.perf_counter() - began,
            samples=self.global_batch,
            skipped_batches=skipped,
            data_skipped=data_skipped,
            source_counts=source_counts,
            phase_seconds=self.timer.totals(),
        )

    def _schedule_loss(self) -> None:
        """The estimators' moving-average rate for this step, by epochs since the run began."""
        if hasattr(self.loss_fn, "gamma"):
            epoch = self.engine.global_samples / corpus_size(self.config)  # restored on resume, any world size
            loss = self.config.loss
            self.loss_fn.gamma = gamma_schedule(epoch, loss.gamma_min, loss.gamma_decay_epochs)

    def _loss(self, outputs, targets: dict) -> torch.Tensor:
        image_features, text_features, logit_scale = outputs[:3]
        logit_bias = outputs[3] if len(outputs) > 3 else None
        return self.loss_fn(image_features, text_features, logit_scale, logit_bias=logit_bias, **targets)

    def _on_nonfinite(self, loss: torch.Tensor, skipped_in_a_row: int) -> None:
        where = f"step {self.step + 1}: loss is {loss.item()}"
        advice = "lower optim.lr, use train.precision=bf16 instead of fp16, or check the data"
        if self.config.train.on_nonfinite_loss == "stop":
            raise NonFiniteLossError(f"{where}; stopping (train.on_nonfinite_loss=stop). Try: {advice}.")
        if skipped_in_a_row > self.config.train.max_skipped_steps:
            raise NonFiniteLossError(
                f"{where}; {skipped_in_a_row} batches in a row had a non-finite loss "
                f"(train.max_skipped_steps={self.config.train.max_skipped_steps}). Try: {advice}."
            )
        logger.warning("%s; batch skipped without an update (train.on_nonfinite_loss=skip)", where)

    def _report(self, result: StepResult, diagnostics: dict[str, float], elapsed: float, steps_done: int) -> None:
        if not self.is_main:
            return
        step = self.step
        rates = self._rates(result.lr_factor)
        scalars = {
            "train/stage": 1 if self.osr.active else 2,
            "train/loss": result.loss,
            **rates,
            "train/logit_scale": result.logit_scale,
            "train/samples_per_second": result.samples / result.step_time,
            "train/step_time": result.step_time,
            "train/skipped_batches": result.skipped_batches,
            "data/skipped_samples": result.data_skipped,
            **{f"time/{phase}": seconds for phase, seconds in result.phase_seconds.items()},
        }
        if result.grad_norm is not None:
            scalars["train/grad_norm"] = result.grad_norm
        for index, count in enumerate(result.source_counts or []):
            scalars[f"data/source_{index}_samples"] = count
        scalars["train/skipped_updates"] = self.engine.skipped_steps
        if not self.engine.was_step_applied():
            logger.warning("step %d: DeepSpeed skipped the update (non-finite gradients); the learning-rate "
                           "schedule and stage I's length count updates only", step)
        for name, value in getattr(self.loss_fn, "metrics", dict)().items():
            scalars[f"loss/{name}"] = value
        for name, value in diagnostics.items():
            scalars[f"osr/{name}"] = value
        if self.writer is not None:
            for name, value in scalars.items():
                self.writer.add_scalar(name, value, step)
        if step == 1:
            logger.info("parameter groups at step 1:\n%s", _group_table(self.param_groups, result.lr_factor))
        if step % self.config.log.every == 0 or step == self.end_step or step == 1:
            stage = "stage I (lr frozen)" if self.osr.active else "stage II" if self.osr.max_steps else ""
            logger.info(_progress_line(step, self.end_step, result, rates["train/lr"], elapsed / steps_done, stage))

    def _timed(self, name: str, action: Callable[[], Any]) -> Any:
        """``action()``, its seconds logged as ``time/<name>`` (evaluations and saves end on the host, whose
        clock then holds their whole time)."""
        began = time.perf_counter()
        result = action()
        if self.writer is not None and self.config.log.timing:
            self.writer.add_scalar(f"time/{name}", time.perf_counter() - began, self.step)
        return result

    def _rates(self, lr_factor: float) -> dict[str, float]:
        """``train/lr``: the schedule's base rate, ``optim.lr`` times its factor (the logit scale's rate, and
        every parameter's without per-tower options); ``train/lr_<tower>``: the mean rate of a tower's weights."""
        return {"train/lr": lr_factor * self.config.optim.lr,
                **{f"train/lr_{tower}": lr_factor * rate for tower, rate in self.tower_rates.items()}}

    def _agree_to_save(self) -> bool:
        """Whether to save after this step (and stop, with ``stop_requested``): the same answer on every rank.

        Saving is collective, but a preemption signal may reach some ranks only, at any moment (even during a
        save); its handler just notes it (tuneclip_ds.preemption). Here, between steps, each rank adds what it
        noted to its flags and every rank takes the maximum of the flags over ranks.
        """
        flags = torch.tensor([self.save_requested, self.stop_requested or preemption.requested()],
                             dtype=torch.int32, device=self.engine.device)
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        self.save_requested, self.stop_requested = (bool(flag) for flag in flags.tolist())
        return self.save_requested or self.stop_requested


def _progress_line(step: int, total: int, result: StepResult, lr: float, seconds_per_step: float, stage: str) -> str:
    eta = seconds_per_step * (total - step)
    grad = f" | grad {result.grad_norm:.3f}" if result.grad_norm is not None else ""
    return (
        f"{stage + ' | ' if stage else ''}step {step}/{total} | loss {result.loss:.4f} | lr {lr:.3g}{grad} | "
        f"scale {result.logit_scale:.2f} | {result.samples / result.step_time:.0f} samples/s | "
        f"{result.step_time:.2f} s/step{_phase_shares(result)} | eta {_duration(eta)}"
    )


PHASE_LABELS = {"data": "data", "forward": "fwd", "loss": "loss", "backward": "bwd", "step": "opt"}


def _phase_shares(result: StepResult) -> str:
    """`` | data 3% fwd 30% loss 5% bwd 50% opt 10%``: each phase's share of the step time; empty untimed."""
    shares = [f"{PHASE_LABELS[phase]} {100 * seconds / result.step_time:.0f}%"
              for phase, seconds in result.phase_seconds.items()]
    return f" | {' '.join(shares)}" if shares else ""


def _group_table(groups: list[dict], lr_factor: float) -> str:
    """One line per AdamW group: its name, number of parameters, rate at this step, base rate, weight decay."""
    width = max(len(group["name"]) for group in groups)
    lines = [f"{'group':<{width}} {'params':>6} {'lr':>9} {'base lr':>9} {'wd':>6}"]
    lines += [f"{group['name']:<{width}} {len(group['params']):>6} {lr_factor * group['lr']:>9.3g} "
              f"{group['lr']:>9.3g} {group['weight_decay']:>6.3g}" for group in groups]
    return "\n".join(lines)


def _schedule_factor(engine) -> float:
    """The schedule's multiplier of every group's base rate at the coming update: the factor that DeepSpeed's
    scheduler (a LambdaLR, see ``build_engine``) applied last."""
    scheduler = engine.lr_scheduler
    return scheduler.lr_lambdas[0](scheduler.last_epoch)


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes}m{seconds:02d}s"


def _add_counts(total: list[int] | None, counts: list[int] | None) -> list[int] | None:
    """Samples per source summed over a step's micro-batches (None: one source)."""
    if total is None or counts is None:
        return total if counts is None else counts
    return [a + b for a, b in zip(total, counts)]


def _local_grad_norm(module: torch.nn.Module) -> torch.Tensor | float:
    """The gradients' norm, a 0-dim tensor (no host sync) or 0.0 without gradients."""
    grads = [p.grad.detach() for p in module.parameters() if p.grad is not None]
    if not grads:
        return 0.0
    # one op for all the norms, in fp32 whatever the gradients' dtype
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)))


def _engine_dtype(engine) -> torch.dtype:
    if engine.bfloat16_enabled():
        return torch.bfloat16
    return torch.float16 if engine.fp16_enabled() else torch.float32


def _loss_targets(batch: dict, device) -> dict:
    """The batch's sample ids and labels (labelled data) for the loss, on ``device``: copied before the model's
    forward, asynchronously from pinned memory, since a copy after it would wait for the forward to end."""
    return {"sample_ids": batch["sample_id"].to(device, non_blocking=True),
            "labels": batch["label"].to(device, non_blocking=True) if "label" in batch else None}


def _as_float(value) -> float | None:
    if value is None:
        return None
    return value.item() if isinstance(value, torch.Tensor) else float(value)


def stage_lengths(config: Config, world_size: int) -> tuple[int, int]:
    """Optimizer steps of stage I (at most: it may end early) and of stage II (fine-tuning)."""
    global_batch = config.train.batch_size * config.train.grad_accum * world_size

    def steps(steps: int | None, samples: int | None, epochs: float | None) -> int:
        if epochs is not None:
            samples = epochs * corpus_size(config)
        return steps if samples is None else math.ceil(samples / global_batch)

    return steps(config.osr.steps or 0, None, config.osr.epochs), steps(config.train.steps, config.train.samples,
                                                                         config.train.epochs)
