"""The DeepSpeed config dict of a run, built from the recipe's trainer and deepspeed sections."""

from ..errors import SwiftKVInputError


def build_deepspeed_config(trainer_cfg, ds_cfg, bf16: bool) -> dict:
    stage = ds_cfg.zero_stage
    if stage not in (0, 1, 2, 3):
        raise SwiftKVInputError(f"deepspeed.zero_stage={stage}: use 0, 1, 2 or 3.")
    zero = {"stage": stage}
    if stage > 0:
        zero.update(
            overlap_comm=ds_cfg.overlap_comm,
            contiguous_gradients=True,
            reduce_bucket_size=ds_cfg.reduce_bucket_size,
            allgather_bucket_size=ds_cfg.allgather_bucket_size,
        )
    if stage == 3:
        zero.update(
            stage3_prefetch_bucket_size=ds_cfg.stage3_prefetch_bucket_size,
            stage3_param_persistence_threshold=ds_cfg.stage3_param_persistence_threshold,
            stage3_max_live_parameters=ds_cfg.stage3_max_live_parameters,
            stage3_max_reuse_distance=ds_cfg.stage3_max_reuse_distance,
            stage3_gather_16bit_weights_on_model_save=False,  # exports gather parameter by parameter instead
        )
    if ds_cfg.offload_optimizer:
        if stage == 0:
            raise SwiftKVInputError("deepspeed.offload_optimizer needs deepspeed.zero_stage >= 1.")
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    config = {
        "train_micro_batch_size_per_gpu": trainer_cfg.micro_batch_size,
        "gradient_accumulation_steps": trainer_cfg.gradient_accumulation_steps,
        "gradient_clipping": trainer_cfg.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        # We pass a torch optimizer (AdamW over the trainable parameters only).
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    config.update(dict(ds_cfg.extra))
    return config
