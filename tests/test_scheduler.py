"""The frame loop's scheduling (lsd_serve/scheduler.py), without a server, a network or a model."""

from __future__ import annotations

import pytest

from lsd_serve.scheduler import StepScheduler


def test_groups_by_requested_steps_in_chunks_of_the_largest_batch():
    scheduler = StepScheduler(batches=(4, 1, 2), step_choices=(1, 2, 3))
    sessions = [("a", 3), ("b", 1), ("c", 3), ("d", 3), ("e", 3), ("f", 3), ("g", 1)]
    groups = scheduler.groups(sessions, steps_of=lambda s: s[1])
    assert [(k, [name for name, _ in g]) for k, g in groups] == [
        (1, ["b", "g"]), (3, ["a", "c", "d", "e"]), (3, ["f"])]
    assert [scheduler.batch_for(len(g)) for _, g in groups] == [2, 4, 1]
    assert scheduler.batch_for(3) == 4
    with pytest.raises(ValueError, match="5 streams, expected 1..4"):
        scheduler.batch_for(5)


def test_precompile_plan_covers_every_padded_shape_once():
    plan = StepScheduler(batches=(1, 2, 4), step_choices=(1, 3)).precompile_plan()
    assert plan == [(1, 1, 1), (1, 1, 3), (2, 2, 1), (2, 2, 3), (4, 3, 1), (4, 3, 3), (4, 4, 1),
                    (4, 4, 3)]


def test_first_time_is_a_compile_then_an_average():
    scheduler = StepScheduler(batches=(1,), step_choices=(1, 2, 3))
    scheduler.record(1, 3, 9.0)  # includes the compile
    assert scheduler.estimate_s(1, 3) is None
    scheduler.record(1, 3, 0.040)
    scheduler.record(1, 3, 0.050)
    assert scheduler.estimate_s(1, 3) == pytest.approx(0.8 * 0.040 + 0.2 * 0.050)
    # Another step count of the batch is scaled by its passes (steps + 1): 2 steps ~ 3/4 of 3.
    assert scheduler.estimate_s(1, 2) == pytest.approx(0.042 * 3 / 4)
    assert scheduler.estimate_s(2, 3) is None


def test_deadline_picks_the_most_steps_that_fit():
    scheduler = StepScheduler(batches=(1,), step_choices=(1, 2, 3), deadline_ms=40)
    for seconds in (1.0, 0.036, 0.036):
        scheduler.record(1, 3, seconds)  # 3 steps: 36 ms; 2: 27 ms; 1: 18 ms (estimated)
    assert scheduler.choose_steps(1, 3, waited_s=0.0) == 3
    assert scheduler.choose_steps(1, 3, waited_s=0.010) == 2  # 30 ms left
    assert scheduler.choose_steps(1, 3, waited_s=0.020) == 1  # 20 ms left
    assert scheduler.choose_steps(1, 3, waited_s=0.100) == 1  # nothing fits: the fewest
    assert scheduler.choose_steps(1, 2, waited_s=0.0) == 2  # never more than requested
    assert StepScheduler((1,), (1, 2, 3)).choose_steps(1, 3, waited_s=1.0) == 3  # no deadline


def test_long_stream_bench_windows_and_interleaved_steps():
    """`lsd bench long-stream` on a small untrained model: the windows around frame 100 and at
    the end of the stream, and the interleaved steps of the two kept states, all timed."""
    from lsd_jax.config import load_config
    from lsd_jax.resolve import untrained_model
    from lsd_serve.bench import bench_long_stream
    from lsd_serve.model_engine import model_engine

    cfg = load_config("lsd_configs/tiny.py", ["model.hidden_size=32", "model.depth=1",
                                          "model.num_heads=2", "model.window=3"])
    engine = model_engine(cfg, untrained_model(cfg, seed=1), describe="small", untrained=True,
                          max_steps=1)
    result = bench_long_stream(engine, frames=112, steps=1, window=10, reps=2,
                               show_progress=False)
    assert result["frames"] == 112 and result["early"]["frames"] == "95..104"
    assert result["late"]["frames"] == "102..111"
    assert 0 < result["early"]["ms_p50"] < 10_000 and 0 < result["late"]["ms_p50"] < 10_000
    assert result["ratio"] > 0 and set(result["interleaved"]) == {
        "reps", "frame_100_ms_p50", "frame_112_ms_p50"}
