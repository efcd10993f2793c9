import torch

from oteacheck_lightning.bubbles import BubbleBus, Phase, PhaseTimer, find_blocks, install_block_hooks


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


def test_a_phase_nobody_listens_to_makes_no_event_and_a_subscriber_added_later_gets_it():
    bus = BubbleBus()
    assert bus.emit(Phase.FORWARD_BLOCK, 1, block=0) is None
    got = []
    handle = bus.subscribe(got.append, {Phase.FORWARD_BLOCK})
    assert bus.emit(Phase.FORWARD_START, 1) is None  # not one of its phases
    event = bus.emit(Phase.FORWARD_BLOCK, 1, block=2, note="x")
    assert got == [event] and (event.phase, event.step, event.block, event.bucket, event.info) == (Phase.FORWARD_BLOCK, 1, 2, None, {"note": "x"})
    bus.unsubscribe(handle)
    assert bus.emit(Phase.FORWARD_BLOCK, 1, block=3) is None and len(got) == 1


def test_phase_timer_adds_up_to_the_iteration():
    bus, timer = BubbleBus(), PhaseTimer()
    bus.subscribe(timer)
    for _ in range(2):
        for phase in (Phase.ITERATION_START, Phase.FORWARD_START, Phase.BEFORE_STEP, Phase.AFTER_STEP):
            bus.emit(phase, 0)
    bus.emit(Phase.ITERATION_START, 1)
    assert set(timer.last_iteration_ms) == {Phase.ITERATION_START, Phase.FORWARD_START, Phase.BEFORE_STEP, Phase.AFTER_STEP}
    assert abs(sum(timer.last_iteration_ms.values()) - timer.iteration_ms) < 1e-6


def _tiny_transformer(layers=3):
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn, self.mlp = torch.nn.Linear(8, 8), torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU())

        def forward(self, x):
            x = x + self.attn(x)
            return (x + self.mlp(x), None)  # blocks often return tuples

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(100, 8)
            self.blocks = torch.nn.ModuleList(Block() for _ in range(layers))
            self.head = torch.nn.Linear(8, 1)

        def forward(self, ids):
            x = self.embed(ids)
            for block in self.blocks:
                x = block(x)[0]
            return self.head(x).sum()

    return Model()


def test_find_blocks_takes_the_repeated_composite_module_not_its_parts_or_containers():
    model = _tiny_transformer(4)
    blocks = find_blocks(model)
    assert blocks == list(model.blocks)  # not the ModuleList, not the repeated Linear or Sequential inside
    assert find_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())) == []


def test_block_hooks_announce_forward_in_order_and_backward_in_reverse_while_active():
    model = _tiny_transformer(3)
    seen, active = [], [True]
    handles = install_block_hooks(find_blocks(model), lambda i: seen.append(("forward", i)),
                                  lambda i: seen.append(("backward", i)), lambda phase, i: active[0])
    loss = model(torch.randint(0, 100, (2, 5)))
    active[0] = False  # the backward announcements were registered during the active forward
    loss.backward()
    assert seen == [("forward", 0), ("forward", 1), ("forward", 2), ("backward", 2), ("backward", 1), ("backward", 0)]
    grads = [p.grad.clone() for p in model.parameters()]
    seen.clear()
    model(torch.randint(0, 100, (2, 5))).backward()  # inactive: nothing announced
    with torch.no_grad():
        active[0] = True
        model(torch.randint(0, 100, (2, 5)))  # no gradient: the forward is announced, no backward hook is left
    assert seen == [("forward", 0), ("forward", 1), ("forward", 2)]
    for handle in handles:
        handle.remove()
    assert all(g is not None for g in grads)  # the hooks leave gradients alone


def test_block_hooks_announce_only_the_blocks_wanted():
    # an engine that issues at one block in forward and one in backward needs those two events, not six
    model = _tiny_transformer(3)
    seen = []
    wanted = {(Phase.FORWARD_BLOCK, 1), (Phase.BACKWARD_BLOCK, 0)}
    handles = install_block_hooks(find_blocks(model), lambda i: seen.append(("forward", i)),
                                  lambda i: seen.append(("backward", i)), lambda phase, i: (phase, i) in wanted)
    model(torch.randint(0, 100, (2, 5))).backward()
    assert seen == [("forward", 1), ("backward", 0)]
    for handle in handles:
        handle.remove()
