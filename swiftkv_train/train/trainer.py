"""The one training loop, shared by every method.

Set-up order: validate config -> distributed init -> load model -> build student (method) -> data ->
DeepSpeed engine -> resume. Then: eval at start, train (log, eval every N, checkpoint every N), eval at end,
final checkpoint, exports with a model card, summary.json.
"""

import itertools
import json
import logging
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from ..data import build_datasets, make_dataloader
from ..errors import SwiftKVInputError
from ..export import save_hf
from ..launch import barrier, init_distributed
from ..metrics import FidelityAccumulator, next_token_targets
from ..models import load_pretrained
from ..models.loading import load_model_config, source_checkpoint_dir
from ..methods import build_method, mode_switch
from ..zero import gathered
from . import checkpointing
from .deepspeed_config import build_deepspeed_config
from .model_card import chosen_transform, render_model_card
from .run_logger import RunLogger, mfu
from .schedule import lr_lambda

log = logging.getLogger(__name__)

# bf16 dense peak of the GPUs we measure on (for MFU); unknown devices report no MFU.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
EXPORTS = ("lean", "full", "both", "none")


class TrainingDivergedError(RuntimeError):
    """The loss became NaN/inf; the last good checkpoint is kept."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def validate_run_config(cfg) -> None:
    """Cheap checks with messages that name the field, before anything heavy happens."""
    t = cfg.trainer
    for name in ("micro_batch_size", "gradient_accumulation_steps"):
        if getattr(t, name) < 1:
            raise SwiftKVInputError(f"trainer.{name}={getattr(t, name)} must be >= 1.")
    # NaN passes every `<=` check below: reject non-finite floats first, by name.
    floats = {name: getattr(t, name) for name in ("epochs", "lr", "weight_decay", "warmup_ratio", "grad_clip")}
    floats.update({f"betas[{i}]": beta for i, beta in enumerate(t.betas)})
    for name, value in floats.items():
        if not math.isfinite(value):
            raise SwiftKVInputError(f"trainer.{name}={value} is not a finite number: set trainer.{name} to a real "
                                    "value (nan and inf are never valid settings).")
    if t.max_steps <= 0 and t.epochs <= 0:
        raise SwiftKVInputError("set trainer.max_steps > 0 or trainer.epochs > 0: the run has no steps.")
    if t.lr <= 0:
        raise SwiftKVInputError(f"trainer.lr={t.lr} must be > 0.")
    if t.export not in EXPORTS:
        raise SwiftKVInputError(f"trainer.export={t.export!r}: use one of {', '.join(EXPORTS)}.")
    if t.precision not in ("auto", "bf16", "fp32"):
        raise SwiftKVInputError(f"trainer.precision={t.precision!r}: use auto, bf16 or fp32.")
    if len(t.betas) != 2:
        raise SwiftKVInputError(f"trainer.betas={list(t.betas)} must have two values.")
    lr_lambda(t.lr_schedule, 1, t.warmup_ratio)  # validates schedule and warm-up
    if cfg.logger.wandb_mode not in ("disabled", "offline", "online"):
        raise SwiftKVInputError(f"logger.wandb_mode={cfg.logger.wandb_mode!r}: use disabled, offline or online.")


def _all_finite(t: torch.Tensor) -> bool:
    # in slices: one bool copy of a multi-GB flat optimizer partition at once would be a memory spike
    return all(bool(torch.isfinite(part).all()) for part in t.detach().reshape(-1).split(1 << 26))


def _peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


class Trainer:
    def __init__(self, cfg):
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)

    # ---- set-up ----------------------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        validate_run_config(cfg)
        self.rank, self.world_size, local_rank = init_distributed(
            None if cfg.launcher.backend == "auto" else cfg.launcher.backend,
            timeout_s=cfg.launcher.init_timeout_minutes * 60,
        )
        self.device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
        precision = cfg.trainer.precision
        self.bf16 = precision == "bf16" or (precision == "auto" and self.device.type == "cuda")
        logging.basicConfig(level=logging.INFO if self.rank == 0 else logging.WARNING,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        seed_everything(cfg.trainer.seed)
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
        barrier()

        self.method = build_method(cfg.transform, cfg)
        # Settings that do not fit the architecture fail from the config alone, before the weights load (minutes).
        self.method.check_model_config(load_model_config(cfg.model.spec))
        dtype = {"auto": None, "bf16": torch.bfloat16, "fp32": torch.float32}[precision]
        dtype = dtype or (torch.bfloat16 if self.bf16 else torch.float32)
        model, self.tokenizer = load_pretrained(cfg.model.spec, dtype=dtype, device=self.device,
                                                attn_implementation=cfg.model.attn_implementation)
        if self.tokenizer is None:
            raise SwiftKVInputError(f"model {cfg.model.spec!r} has no tokenizer: training data needs its chat template.")
        self.base_model_name = cfg.model.spec
        student = self.method.build_student(model)
        del model  # the student shares its frozen tensors

        self.train_set, self.eval_set = build_datasets(cfg.data, self.tokenizer)
        t = cfg.trainer
        probe = make_dataloader(self.train_set, t.micro_batch_size, cfg.data.seed, self.rank, self.world_size)
        # Data-dependent initialisation (e.g. CSKV's activation-aware SVD), before the optimizer sees the weights.
        self.method.calibrate(student, ({k: v.to(self.device) for k, v in b.items()} for b in probe))
        self.micro_per_epoch = probe.batch_sampler.steps_per_epoch
        steps_per_epoch = self.micro_per_epoch // t.gradient_accumulation_steps
        if steps_per_epoch == 0 and t.max_steps <= 0:
            raise SwiftKVInputError("one epoch has fewer micro-batches than trainer.gradient_accumulation_steps.")
        self.total_steps = t.max_steps if t.max_steps > 0 else max(1, math.floor(t.epochs * steps_per_epoch))

        trainable = self.method.trainable_parameters(student)
        if not trainable:
            raise SwiftKVInputError("the method left no trainable parameter: nothing to train.")
        params = [p for _, p in trainable]
        self.num_trainable = sum(p.numel() for p in params)
        optimizer = torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay,
                                      fused=self.device.type == "cuda")
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(t.lr_schedule, self.total_steps,
                                                                           t.warmup_ratio))
        import deepspeed

        ds_config = build_deepspeed_config(t, cfg.deepspeed, self.bf16)
        self.engine, _, _, _ = deepspeed.initialize(model=student, optimizer=optimizer, lr_scheduler=scheduler,
                                                    config=ds_config)
        inner = self.engine.module.model
        # DeepSpeed casts buffers with the weights under bf16; RoPE frequencies must stay fp32.
        inner.rotary_emb = type(inner.rotary_emb)(config=self.engine.module.config).to(self.device)

        self.step, self.micro_step, self.evals = 0, 0, {}
        self._resume()
        peak = _peak_flops(self.device)
        self.flops_per_token = self.method.flops_per_token(self.engine.module.config, cfg.data.max_length)
        self.peak_flops = peak * self.world_size if peak else None
        log.info("run dir %s | %d rank(s) on %s | %s params trainable | %d optimizer steps",
                 self.run_dir, self.world_size, self.device, f"{self.num_trainable:,}", self.total_steps)

    def _resume(self) -> None:
        path = checkpointing.checkpoint_to_resume(self.run_dir, self.cfg.trainer.resume, self.device)
        if path is None:
            return
        state = checkpointing.load_checkpoint(self.engine, path)
        self.step, self.micro_step, self.evals = state["step"], state["micro_step"], state.get("evals", {})
        self._apply_configured_lr()
        log.info("resumed from %s at step %d", path, self.step)

    def _apply_configured_lr(self) -> None:
        """The checkpoint restores the old base lr; a changed trainer.lr (e.g. lowered after a divergence) wins."""
        scheduler, lr = self.engine.lr_scheduler, self.cfg.trainer.lr
        if all(base == lr for base in scheduler.base_lrs):
            return  # unchanged: keep the restored values bit for bit
        log.warning("trainer.lr=%g replaces the checkpoint's base lr %g from step %d on", lr, scheduler.base_lrs[0],
                    self.step)
        scheduler.base_lrs = [lr] * len(scheduler.base_lrs)
        for group, factor in zip(self.engine.optimizer.param_groups, scheduler.lr_lambdas):
            group["initial_lr"], group["lr"] = lr, lr * factor(scheduler.last_epoch)

    # ---- evaluation ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict | None:
        """Held-out numbers on up to ``eval_batches`` batches: the student against its teacher (KL, top-1,
        perplexities) when the method changes the model's outputs, else the mean of the method's own loss terms
        (e.g. Locret: how well the heads predict the attention labels), so that no method evaluates to nothing."""
        if self.eval_set is None or len(self.eval_set) == 0:
            return None
        module = self.engine.module
        was_training = module.training
        module.eval()
        loader = make_dataloader(self.eval_set, self.cfg.trainer.micro_batch_size, 0, self.rank, self.world_size,
                                 shuffle=False, drop_last=False)
        batches = ({k: v.to(self.device) for k, v in batch.items()}
                   for batch, _ in zip(loader, range(self.cfg.trainer.eval_batches)))
        try:
            first = next(batches, None)
            if first is None:
                return None
            pair = self.method.teacher_and_student_hidden(module, first)
            if pair is None:
                return self._held_out_loss(module, itertools.chain([first], batches))
            return self._held_out_fidelity(module, pair, first, batches)
        finally:
            module.train(was_training)

    def _held_out_fidelity(self, module, first_pair, first, batches) -> dict:
        acc = FidelityAccumulator(chunk_size=self.cfg.trainer.loss_chunk_size)
        weight = module.lm_head.weight
        for batch in itertools.chain([first], batches):
            pair = first_pair if batch is first else self.method.teacher_and_student_hidden(module, batch)
            with gathered(weight):
                acc.update_from_hidden(pair[0], pair[1], weight, next_token_targets(batch["input_ids"],
                                                                                     batch["labels"]))
        if self.world_size > 1:
            sums = acc.to_tensor().to(self.device)
            torch.distributed.all_reduce(sums)
            acc = FidelityAccumulator.from_tensor(sums.cpu())
        return acc.compute()

    def _held_out_loss(self, module, batches) -> dict:
        names, totals, count = None, None, 0
        for batch in batches:
            out = self.method.loss(module, batch)
            names = names or sorted(out)
            values = torch.stack([out[name].detach().float().reshape(()) for name in names]).cpu()
            totals = values if totals is None else totals + values
            count += 1
        sums = torch.cat([totals, torch.tensor([float(count)])]).to(self.device)
        if self.world_size > 1:
            torch.distributed.all_reduce(sums)
        sums = sums.cpu()
        return {**{name: float(sums[i] / sums[-1]) for i, name in enumerate(names)}, "batches": int(sums[-1])}

    # ---- training --------------------------------------------------------------------------------------------
    def _batches(self):
        """Micro-batches from the current data position on, epoch after epoch."""
        t = self.cfg.trainer
        while True:
            epoch, start = divmod(self.micro_step, self.micro_per_epoch)
            loader = make_dataloader(self.train_set, t.micro_batch_size, self.cfg.data.seed, self.rank,
                                     self.world_size, start_step=start, epoch=epoch)
            for batch in loader:
                yield batch

    def _client_state(self) -> dict:
        return {"step": self.step, "micro_step": self.micro_step, "evals": self.evals}

    def _sum_over_ranks(self, count: float) -> float:
        value = torch.tensor([count], dtype=torch.float32, device=self.device)
        if self.world_size > 1:
            torch.distributed.all_reduce(value)
        return value.item()

    def _diverged(self, what: str) -> TrainingDivergedError:
        """The error for a divergence: names the last good checkpoint and a way on that works from it."""
        good = checkpointing.latest_checkpoint(self.run_dir)
        lower = f"trainer.lr={self.cfg.trainer.lr / 10:g}"
        if good is None:
            return TrainingDivergedError(f"{what} No good checkpoint yet: lower trainer.lr (e.g. {lower}) or check "
                                         "the data, and start again with trainer.resume=none.")
        return TrainingDivergedError(f"{what} The last good checkpoint is {good}: lower trainer.lr (e.g. {lower}) "
                                     "or check the data, then resume from it with trainer.resume=auto.")

    def _check_finite(self, loss: torch.Tensor) -> None:
        if self._sum_over_ranks(float(not torch.isfinite(loss.detach()).item())) == 0:
            return
        what = f"loss is {loss.item()} at step {self.step + 1}: training stopped."
        saved = checkpointing.latest_checkpoint(self.run_dir)
        if saved is not None and saved.name == f"step_{self.step:07d}":
            # this loss came from exactly the weights of that checkpoint: resuming from it would diverge again
            checkpointing.mark_diverged(saved, f"its weights gave a non-finite loss ({loss.item()}) at step "
                                               f"{self.step + 1}")
            barrier()
            what += f" {saved.name} holds the weights that gave it: marked {checkpointing.DIVERGED}, not resumed from."
        raise self._diverged(what)

    def _non_finite_state(self) -> tuple[list[str], int]:
        """This rank's trainable weights and optimizer-state tensors holding NaN/inf (names), and how many it has."""
        params = [(name, p) for name, p in self.engine.module.named_parameters() if p.requires_grad]
        seen = {id(p) for _, p in params}
        tensors = [(name, getattr(p, "ds_tensor", p)) for name, p in params]  # ZeRO-3: this rank's shard
        base = getattr(self.engine.optimizer, "optimizer", self.engine.optimizer)  # DeepSpeed wraps the torch one
        for i, group in enumerate(base.param_groups):
            tensors += [(f"optimizer master weights {i}.{j}", p) for j, p in enumerate(group["params"])
                        if id(p) not in seen]
        for i, state in enumerate(base.state.values()):
            tensors += [(f"optimizer {key} #{i}", v) for key, v in state.items()
                        if torch.is_tensor(v) and v.is_floating_point()]
        return [name for name, t in tensors if not _all_finite(t)], len(tensors)

    def _save_checkpoint(self) -> None:
        """Save the current step, unless the weights or optimizer state went non-finite: never a bad checkpoint."""
        bad, total = self._non_finite_state()
        n_bad = int(self._sum_over_ranks(len(bad)))
        if n_bad > 0:
            shown = f" (e.g. {', '.join(bad[:3])})" if bad else ""
            raise self._diverged(f"{n_bad} of {int(self._sum_over_ranks(total))} trainable-weight/optimizer-state "
                                 f"tensors hold NaN/inf after step {self.step}{shown}: training stopped and "
                                 f"step_{self.step:07d} was not saved.")
        checkpointing.save_checkpoint(self.engine, self.run_dir, self.step, self._client_state(),
                                      self.cfg.trainer.keep_checkpoints)

    def train(self) -> dict:
        cfg, t = self.cfg, self.cfg.trainer
        logger = RunLogger(self.run_dir, self.rank, self.total_steps, start_step=self.step,
                           wandb_cfg=self._wandb_cfg(), use_tqdm=None if cfg.logger.progress == "auto"
                           else cfg.logger.progress == "bar")
        try:
            if self.step == 0 and t.eval_at_start and "start" not in self.evals:
                self._record_eval("start", logger)
            self.engine.train()
            batches = self._batches()
            steps_this_process, tokens, last = 0, 0, time.perf_counter()
            sums: dict[str, float] = {}
            while self.step < self.total_steps:
                batch = {k: v.to(self.device) for k, v in next(batches).items()}
                out = self.method.loss(self.engine.module, batch)
                self._check_finite(out["loss"])
                self.engine.backward(out["loss"])
                boundary = self.engine.is_gradient_accumulation_boundary()
                self.engine.step()
                self.micro_step += 1
                tokens += int((batch["input_ids"] != self.train_set.pad_token_id).sum()) * self.world_size
                for key, value in out.items():
                    sums[key] = sums.get(key, 0.0) + float(value.detach())
                if not boundary:
                    continue
                self.step += 1
                steps_this_process += 1
                if self.step % cfg.logger.log_every == 0 or self.step == self.total_steps:
                    now = time.perf_counter()
                    metrics = {f"train/{k}": v / (t.gradient_accumulation_steps * cfg.logger.log_every)
                               for k, v in sums.items()}
                    metrics["loss"] = metrics.get("train/loss")
                    metrics["lr"] = self.engine.get_lr()[0]
                    grad_norm = self.engine.get_global_grad_norm()
                    if grad_norm is not None:
                        metrics["grad_norm"] = float(grad_norm)
                    rate = tokens / max(now - last, 1e-9)
                    metrics["tokens"] = tokens
                    metrics["tokens_per_s_per_gpu"] = rate / self.world_size
                    if self.flops_per_token and self.peak_flops:
                        metrics["mfu"] = mfu(rate, self.flops_per_token, self.peak_flops)
                    logger.log(self.step, metrics)
                    sums, tokens, last = {}, 0, now
                if t.eval_every and self.step % t.eval_every == 0 and self.step < self.total_steps:
                    self._record_eval(f"step_{self.step}", logger)
                if t.save_every and self.step % t.save_every == 0 and self.step < self.total_steps:
                    self._save_checkpoint()
                if t.stop_after_steps and steps_this_process >= t.stop_after_steps and self.step < self.total_steps:
                    log.warning("stopping after %d steps of this process (trainer.stop_after_steps)",
                                steps_this_process)
                    return {"interrupted": True, "step": self.step}
            self._record_eval("end", logger)
            self._save_checkpoint()
            exports = self.export()
            summary = {"step": self.step, "evals": self.evals, "trainable_parameters": self.num_trainable,
                       "exports": [str(path) for path in exports]}
            if t.harness_suites and self.rank == 0:
                summary["harness"] = self.run_harness()
            if self.rank == 0:
                (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            return summary
        finally:
            logger.close()

    def run_harness(self) -> str:
        """The evaluation harness on the trained model (its teacher mode as teacher when it has one)."""
        from ..eval.api import evaluate

        model = self.engine.module.eval()
        teacher = "self" if mode_switch(model) is not None else None
        out = self.run_dir / "eval"
        # The weights under this run's name change with every (resumed) training run: results already in out_dir
        # are stale, so the harness runs everything again unless trainer.harness.resume=true says otherwise.
        settings = {"resume": False, **OmegaConf.to_container(self.cfg.trainer.harness, resolve=True)}
        evaluate(model, self.tokenizer, list(self.cfg.trainer.harness_suites), teacher=teacher, out_dir=out,
                 model_name=self.cfg.run_name, **settings)
        log.info("evaluation harness results in %s", out)
        return str(out / "results.json")

    def _record_eval(self, when: str, logger: RunLogger) -> None:
        log.info("eval (%s) on up to %d held-out batches...", when, self.cfg.trainer.eval_batches)  # minutes on CPU
        stats = self.evaluate()
        if stats is None:
            return
        self.evals[when] = stats
        logger.log(self.step, {f"eval/{k}": v for k, v in stats.items()})
        if "kl" in stats:
            log.info("eval (%s): KL %.4f | top-1 %.3f | ppl teacher %.2f student %.2f | %d tokens", when,
                     stats["kl"], stats["top1"], stats["ppl_teacher"], stats["ppl_student"], stats["tokens"])
        else:
            log.info("eval (%s): %s", when, " | ".join(f"{k} {v:.4g}" for k, v in stats.items()))

    def _wandb_cfg(self) -> dict:
        lg = self.cfg.logger
        return {"mode": lg.wandb_mode, "project": lg.wandb_project, "entity": lg.wandb_entity,
                "name": self.cfg.run_name, "config": OmegaConf.to_container(self.cfg, resolve=True)}

    # ---- export ----------------------------------------------------------------------------------------------
    def export(self) -> list[Path]:
        which = self.cfg.trainer.export
        kinds = {"lean": [True], "full": [False], "both": [True, False], "none": []}[which]
        model = self.method.prepare_export(self.engine.module)
        hyper = OmegaConf.to_container(self.cfg.trainer, resolve=True)
        hyper["transform"] = chosen_transform(OmegaConf.to_container(self.cfg.transform, resolve=True))
        # the frozen (teacher) weights as stored, not the copies rounded to the training dtype
        source = source_checkpoint_dir(self.cfg.model.spec) if False in kinds and self.rank == 0 else None
        written = []
        for lean in kinds:
            card = render_model_card(self.base_model_name, self.cfg.recipe, self.cfg.transform.name, hyper,
                                     self.evals, lean)
            out = self.run_dir / "export" / ("lean" if lean else "full")
            log.info("exporting the %s model to %s", out.name, out)
            save_hf(model, self.tokenizer, out, lean=lean, model_card=card, is_writer=self.rank == 0,
                    frozen_source=None if lean else source)
            written.append(out)
            barrier()
        return written


def run_training(cfg) -> dict:
    """Set up and train; the Hydra entry point and the tests call this."""
    trainer = Trainer(cfg)
    trainer.setup()
    return trainer.train()


__all__ = ["Trainer", "TrainingDivergedError", "run_training", "seed_everything", "validate_run_config"]
