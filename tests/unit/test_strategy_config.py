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
