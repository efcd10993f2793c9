"""DeepSpeed settings the strategy adjusts before DeepSpeed starts."""

import pytest

from oteacheck_lightning import OTeaCheckStrategy


def test_deepspeeds_throughput_timer_no_longer_synchronizes_the_device():
    # a device-wide synchronize waits for the snapshot copy stream too: every copy would become a stall
    strategy = OTeaCheckStrategy(stage=2)
    strategy._without_device_synchronize()
    assert strategy.config["timers"]["throughput"]["synchronized"] is False
    assert strategy.config["timers"]["throughput"].get("enabled", True)  # the timer itself stays


@pytest.mark.parametrize("config", [{"timers": {"throughput": {"synchronized": True}}}, {"wall_clock_breakdown": True}])
def test_an_explicit_synchronizing_timer_is_kept_with_a_warning(config):
    strategy = OTeaCheckStrategy(config={"zero_optimization": {"stage": 2}, **config})
    with pytest.warns(UserWarning, match="waits for the snapshot copies"):
        strategy._without_device_synchronize()
    assert strategy.config.get("timers", {}).get("throughput", {}).get("synchronized") in (True, None)


def _bn_model():
    import torch

    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_batch_norm_buffers_follow_the_parameters_under_mixed_precision(precision):
    from oteacheck_lightning.strategy import match_norm_buffers_to_parameters

    config = {precision: {"enabled": True}, "zero_optimization": {"stage": 2}}
    assert match_norm_buffers_to_parameters(config, _bn_model()) == precision
    assert config["data_types"] == {"buffer_dtype": precision}


def test_buffers_are_left_alone_without_batch_norm_fp32_or_an_explicit_choice():
    import torch

    from oteacheck_lightning.strategy import match_norm_buffers_to_parameters

    plain = {"bf16": {"enabled": True}}
    assert match_norm_buffers_to_parameters(plain, torch.nn.Linear(2, 2)) is None and "data_types" not in plain
    fp32 = {"bf16": {"enabled": False}}
    assert match_norm_buffers_to_parameters(fp32, _bn_model()) is None and "data_types" not in fp32
    chosen = {"bf16": {"enabled": True}, "data_types": {"buffer_dtype": "fp32", "grad_accum_dtype": "fp32"}}
    assert match_norm_buffers_to_parameters(chosen, _bn_model()) is None
    assert chosen["data_types"] == {"buffer_dtype": "fp32", "grad_accum_dtype": "fp32"}
