from oteacheck_lightning.bubbles import BubbleBus, Phase, PhaseTimer


def test_subscribers_get_their_phases_in_order():
    bus = BubbleBus()
    seen, only_steps = [], []
    bus.subscribe(lambda e: seen.append((e.phase, e.step, e.bucket)))
    handle = bus.subscribe(lambda e: only_steps.append(e.phase), {Phase.BEFORE_STEP, Phase.AFTER_STEP})
    for phase in (Phase.ITERATION_START, Phase.FORWARD_START, Phase.FORWARD_END):
        bus.emit(phase, 4)
    bus.emit(Phase.BUCKET_REDUCED, 4, bucket=0)
    bus.emit(Phase.BEFORE_STEP, 4)
    bus.unsubscribe(handle)
    bus.emit(Phase.AFTER_STEP, 4)
    assert seen[3] == (Phase.BUCKET_REDUCED, 4, 0)
    assert [p for p, _, _ in seen] == [Phase.ITERATION_START, Phase.FORWARD_START, Phase.FORWARD_END,
                                        Phase.BUCKET_REDUCED, Phase.BEFORE_STEP, Phase.AFTER_STEP]
    assert only_steps == [Phase.BEFORE_STEP]


def test_phase_timer_adds_up_to_the_iteration():
    bus, timer = BubbleBus(), PhaseTimer()
    bus.subscribe(timer)
    for _ in range(2):
        for phase in (Phase.ITERATION_START, Phase.FORWARD_START, Phase.BEFORE_STEP, Phase.AFTER_STEP):
            bus.emit(phase, 0)
    bus.emit(Phase.ITERATION_START, 1)
    assert set(timer.last_iteration_ms) == {Phase.ITERATION_START, Phase.FORWARD_START, Phase.BEFORE_STEP, Phase.AFTER_STEP}
    assert abs(sum(timer.last_iteration_ms.values()) - timer.iteration_ms) < 1e-6
