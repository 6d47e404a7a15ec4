"""Streaming aggregation: every method folded update by update, in whatever order the updates
arrive, gives the bits of its one-shot aggregation over the round's order; a running-sum method
keeps nothing of an update once it is folded; an early update waits on disk, not in memory."""

import copy
import gc
import random
import weakref

import pytest
import torch

from fedlora_edge.coordinator.aggregate import Contribution, OrderedFold
from fedlora_edge.coordinator.methods import MethodContext, get_method, method_names
from fedlora_edge.core.lora import from_state_dict
from fedlora_edge.core.wire import decode_tensors, encode_tensors
from fedlora_edge.edge_client.partial import split_update, update_shapes

DIMS = {"layer.0.q": (6, 5), "layer.0.v": (6, 3), "layer.1.q": (6, 5)}
STREAMING = ("fedit", "hetlora", "fslora", "fed-plora", "hafl", "centralized")


def fleet(method, seed: int, n: int):
    """``n`` contributions with random capacities, random factors of the plans' shapes and weights,
    as the engine would decode them; plus their wire bytes (what a reload reads back)."""
    m = get_method(method)
    ctx = MethodContext(DIMS, 1.0, 2, 4, seed)
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    r = m.global_rank(ctx)
    glob = {mod: (torch.randn(r, n_in, generator=gen), torch.randn(n_out, r, generator=gen))
            for mod, (n_in, n_out) in DIMS.items()}
    out = []
    for i in range(n):
        client = f"c{i:02d}"
        plan = m.plan(client, rng.randint(2, 4), ctx, 1, {})
        tensors = {k: torch.randn(*s, generator=gen).abs() if k.startswith("importance.") else
                   torch.randn(*s, generator=gen) for k, s in update_shapes(DIMS, plan).items()}
        blob = encode_tensors(tensors)
        out.append((client, plan, blob, float(rng.randint(1, 9))))
    return m, ctx, glob, out


def decoded(client, plan, blob, weight) -> Contribution:
    factors, importance, extras = split_update(decode_tensors(blob))
    return Contribution(client, plan, from_state_dict(factors), weight, importance, extras)


def same(x, y) -> bool:
    """Bitwise equality of nested results (tensors compared with torch.equal)."""
    if isinstance(x, torch.Tensor):
        return isinstance(y, torch.Tensor) and x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)
    if isinstance(x, dict):
        return isinstance(y, dict) and x.keys() == y.keys() and all(same(x[k], y[k]) for k in x)
    if isinstance(x, (list, tuple)):
        return isinstance(y, (list, tuple)) and len(x) == len(y) and all(same(a, b) for a, b in zip(x, y))
    return x == y


@pytest.mark.parametrize("method", method_names())
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_any_arrival_order_gives_the_one_shot_bits(method, seed):
    m, ctx, glob, rows = fleet(method, seed, 7)
    order = [c for c, *_ in rows]
    state0: dict = {}
    want_f, want_rec = m.aggregate(glob, [decoded(*row) for row in rows], ctx, state0)
    for perm in range(3):
        arrival = list(rows)
        random.Random(f"{seed}|{perm}").shuffle(arrival)
        state: dict = {}
        fold = OrderedFold(m.accumulator(glob, ctx, state), order)
        for row in arrival:
            fold.offer(row[0], decoded(*row), reload=lambda row=row: decoded(*row))
            assert fold.held == 0  # an early update waits as its reload, not as tensors
        got_f, got_rec = fold.finish()
        assert same(got_f, want_f) and same(dict(got_rec or {}), want_rec) and same(state, state0), perm


@pytest.mark.parametrize("method", STREAMING)
def test_a_running_sum_method_keeps_nothing_of_a_folded_update(method):
    m, ctx, glob, rows = fleet(method, 5, 4)
    assert m.streams
    fold = OrderedFold(m.accumulator(glob, ctx, {}), [c for c, *_ in rows])
    refs = []
    for row in rows:
        c = decoded(*row)
        refs.append(weakref.ref(c.factors[next(iter(c.factors))][0]))
        fold.offer(row[0], c)
        del c
    gc.collect()
    assert all(r() is None for r in refs)
    fold.finish()


def test_methods_that_need_every_update_say_so():
    assert {n for n in method_names() if get_method(n).streams} == set(STREAMING)


def test_a_device_with_nothing_valid_is_skipped_and_a_lost_reload_is_left_out():
    m, ctx, glob, rows = fleet("fedit", 3, 4)
    order = [c for c, *_ in rows]
    fold = OrderedFold(m.accumulator(glob, ctx, {}), order)
    # c00 sends nothing valid; c03 arrives early and its copy on disk is lost before its turn
    fold.offer("c03", decoded(*rows[3]), reload=lambda: None)
    fold.offer("c02", decoded(*rows[2]), reload=lambda: decoded(*rows[2]))
    fold.offer("c01", decoded(*rows[1]))
    assert fold.count == 3
    got, _ = fold.finish()
    assert fold.folded == ["c01", "c02"] and fold.lost == ["c03"]
    want, _ = m.aggregate(glob, [decoded(*rows[1]), decoded(*rows[2])], ctx, {})
    assert same(got, want)


def test_offering_twice_or_an_unassigned_device_is_refused():
    m, ctx, glob, rows = fleet("fedit", 4, 2)
    fold = OrderedFold(m.accumulator(glob, ctx, {}), ["c00", "c01"])
    fold.offer("c01", decoded(*rows[1]))
    with pytest.raises(ValueError, match="c01"):
        fold.offer("c01", decoded(*rows[1]))
    with pytest.raises(ValueError, match="zz"):
        fold.offer("zz", decoded(*rows[0]))


def test_a_round_below_min_updates_leaves_the_method_state_alone():
    # HAFL records importance scores when the round finishes, never while it is fed
    m, ctx, glob, rows = fleet("hafl", 6, 3)
    state: dict = {}
    fold = OrderedFold(m.accumulator(glob, ctx, state), [c for c, *_ in rows])
    for row in rows:
        fold.offer(row[0], decoded(*row))
    fold.drain()
    assert state == {}
    before = copy.deepcopy(state)
    fold.finish()
    assert state != before and "importance" in state
