"""Early-bird building blocks (You et al. 2020): detector, channel masks, L1 on BN scales."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ticketlab.errors import UsageError
from ticketlab.methods.early_bird import (
    BNL1Penalty,
    EarlyBirdDetector,
    EarlyBirdWatch,
    channel_mask,
    expand_channel_mask,
    mask_distance,
)


def net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 4 * 4, 3),
    )


def m(bits):
    return {"bn": torch.tensor(bits, dtype=torch.bool)}


def test_detector_waits_for_five_masks_and_draws():
    det = EarlyBirdDetector(keep=5, threshold=0.1)
    same = m([1] * 20)
    for _ in range(4):
        assert not det.push(same)  # never before 5 masks, even if identical
    assert det.push(same)


def test_detector_threshold_on_constructed_sequence():
    det = EarlyBirdDetector()
    base = [1] * 10 + [0] * 10
    seq = []
    for flips in (10, 6, 3, 2, 1, 0, 0):
        bits = list(base)
        for i in range(flips):
            bits[i] = 0
        seq.append(m(bits))
    drawn = [det.push(x) for x in seq]
    # queue after 6 masks (6,3,2,1,0 flips): 0 vs 6 flips is 0.3 > 0.1
    assert drawn[:6] == [False] * 6
    assert drawn[6] is False  # 3 flips still in the queue: distance 0.15
    assert det.push(seq[-1])  # queue (2,1,0,0,0): max distance 0.1 exactly, drawn
    assert det.distances == [0.1, 0.05, 0.0, 0.0]


def test_mask_distance():
    assert mask_distance(m([1, 1, 0, 0]), m([1, 0, 0, 1])) == 0.5


def test_channel_mask_global_threshold_and_expansion():
    model = net()
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([0.1, -2.0, 0.3, 0.05]))
        model[4].weight.copy_(torch.tensor([1.0, 0.2, -0.01, 3.0, 0.4, 0.5]))
    ch = channel_mask(model, 0.5)  # 10 channels: prune the 5 smallest |gamma|
    assert ch["1"].tolist() == [False, True, False, False]
    assert ch["4"].tolist() == [True, False, False, True, True, True]
    mask = expand_channel_mask(model, ch)
    assert mask["0.weight"][:, 0, 0, 0].tolist() == [False, True, False, False]
    assert mask["3.weight"][:, 0, 0, 0].tolist() == ch["4"].tolist()
    assert bool(mask["7.weight"].all())
    with pytest.raises(UsageError):
        channel_mask(nn.Sequential(nn.Linear(2, 2)), 0.5)


def test_l1_penalty_adds_subgradient():
    model = net()
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([0.5, -0.5, 1.0, -1.0]))
    model[1].weight.grad = torch.zeros(4)
    BNL1Penalty(0.01).before_step(0, model, None)
    assert model[1].weight.grad.tolist() == pytest.approx([0.01, -0.01, 0.01, -0.01])


def test_watch_draws_when_masks_stop_changing():
    model = net()
    watch = EarlyBirdWatch(steps_per_epoch=2, ratio=0.3)
    for step in range(20):
        watch.after_step(step, model, None, None, None, None)
    assert watch.drawn == 5  # weights never change: first full queue draws
    unstructured = EarlyBirdWatch(steps_per_epoch=1, ratio=0.5, unstructured=True)
    for step in range(5):
        unstructured.after_step(step, model, None, None, None, None)
    assert unstructured.drawn == 5


def test_watch_state_round_trips_through_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    model = net()
    for drawn_by in (3, 7):  # 3 epochs: a part-filled queue; 7: drawn, with mask and state
        watch = EarlyBirdWatch(steps_per_epoch=1, ratio=0.3)
        for step in range(drawn_by):
            watch.after_step(step, model, None, None, None, None)
        state = watch.state_dict()
        tensors = {k: v for k, v in state.items() if torch.is_tensor(v)}
        save_file(tensors, tmp_path / "w.safetensors")  # as the checkpoint stores them
        back = {k: v for k, v in state.items() if not torch.is_tensor(v)}
        back.update(load_file(str(tmp_path / "w.safetensors")))
        fresh = EarlyBirdWatch(steps_per_epoch=1, ratio=0.3)
        fresh.load_state_dict(back)
        assert (fresh.drawn, fresh.history) == (watch.drawn, watch.history)
        assert fresh.detector.distances == watch.detector.distances
        assert len(fresh.detector.queue) == len(watch.detector.queue) == min(drawn_by, 5)
        for a, b in zip(fresh.detector.queue, watch.detector.queue):
            assert list(a) == list(b) and all(torch.equal(a[n], b[n]) for n in a)
        if watch.drawn is not None:
            assert all(torch.equal(fresh.mask[n], watch.mask[n]) for n in watch.mask)
            assert all(torch.equal(fresh.state[k], watch.state[k]) for k in watch.state)
        assert fresh.drawn == (5 if drawn_by == 7 else None)
