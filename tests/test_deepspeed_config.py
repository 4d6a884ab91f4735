"""The DeepSpeed config dict a recipe's trainer and deepspeed sections turn into."""

import pytest

from swiftkv_train.config import DeepSpeedConfig, TrainerConfig
from swiftkv_train.errors import SwiftKVInputError
from swiftkv_train.train.deepspeed_config import build_deepspeed_config


def test_zero3_settings_reach_deepspeed():
    ds = DeepSpeedConfig(zero_stage=3, stage3_prefetch_bucket_size=10**9, stage3_max_live_parameters=6 * 10**9,
                         stage3_max_reuse_distance=5 * 10**9, extra={"wall_clock_breakdown": True})
    config = build_deepspeed_config(TrainerConfig(micro_batch_size=2, gradient_accumulation_steps=3), ds, bf16=True)
    zero = config["zero_optimization"]
    assert zero["stage"] == 3 and zero["stage3_prefetch_bucket_size"] == 10**9
    assert zero["stage3_max_live_parameters"] == 6 * 10**9 and zero["stage3_max_reuse_distance"] == 5 * 10**9
    assert config["train_micro_batch_size_per_gpu"] == 2 and config["gradient_accumulation_steps"] == 3
    assert config["bf16"] == {"enabled": True} and config["wall_clock_breakdown"] is True  # extra is merged last


def test_zero2_has_no_stage3_keys_and_bad_stage_is_refused():
    zero = build_deepspeed_config(TrainerConfig(), DeepSpeedConfig(zero_stage=2), bf16=False)["zero_optimization"]
    assert zero["stage"] == 2 and not any(key.startswith("stage3") for key in zero)
    with pytest.raises(SwiftKVInputError, match="zero_stage=4"):
        build_deepspeed_config(TrainerConfig(), DeepSpeedConfig(zero_stage=4), bf16=False)
