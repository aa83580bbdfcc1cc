"""The grain input pipeline (`lsd_train/data.py`) and the paired tasks (`lsd_train/tasks.py`).

Procedural clips are a pure function of (seed, split, index) and move; the held-out split shares
no photograph with the training split; tasks are per frame, except `motion_trails`, which matches
its recursion computed independently; the iterator resumes from a saved state with the same
batches; rows split over two processes reassemble the single-process batch; a video folder is
decoded at the asked frame rate, a corrupt file is skipped with a warning naming it, and an empty
folder or a too-short video is a `DataError`; clips of a truncated video that fail to decode are
dropped from the batches with a warning naming the file.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from lsd_jax.codec import resize_and_crop
from lsd_jax.config import load_config
from lsd_jax.errors import ConfigError
from lsd_train import data, tasks

SMALL = ["model.frame_height=32", "model.frame_width=32", "data.clip_frames=4",
         "train.batch_size=4"]


@pytest.fixture
def small_cfg(repo_root):
    return load_config(repo_root / "lsd_configs" / "tiny.py", SMALL)


def test_procedural_clips_are_deterministic_and_move():
    source = data.ProceduralClips(6, 32, 48, seed=3)
    clip_thwc = source[17]
    assert clip_thwc.shape == (6, 32, 48, 3) and clip_thwc.dtype == np.uint8
    np.testing.assert_array_equal(clip_thwc, data.ProceduralClips(6, 32, 48, seed=3)[17])
    assert not np.array_equal(clip_thwc, source[18])
    assert not np.array_equal(clip_thwc, data.ProceduralClips(6, 32, 48, seed=4)[17])
    # Real motion: consecutive frames differ by more than quantisation, textures are not flat.
    step_diff = np.abs(np.diff(clip_thwc.astype(np.int16), axis=0)).mean()
    assert step_diff > 2.0, step_diff
    assert clip_thwc.std() > 20.0


def test_heldout_split_is_disjoint():
    train_names = data.split_photographs("train", 2)
    heldout_names = data.split_photographs("heldout", 2)
    assert set(train_names).isdisjoint(heldout_names) and len(heldout_names) == 2
    train_clip = data.ProceduralClips(4, 32, 32, split="train")[5]
    heldout_clip = data.ProceduralClips(4, 32, 32, split="heldout")[5]
    assert not np.array_equal(train_clip, heldout_clip)
    extended = data.split_photographs("train", 2, "extended")
    assert extended[:len(train_names)] == train_names and len(extended) == len(train_names) + 7
    assert set(extended).isdisjoint(heldout_names)
    assert data.split_photographs("heldout", 2, "extended") == heldout_names
    source = data.ProceduralClips(4, 32, 32, split="train", photographs="extended")
    clips = [source[i] for i in range(12)]
    assert all(c.shape == (4, 32, 32, 3) and c.std() > 5 for c in clips)
    with pytest.raises(ConfigError, match="'all'"):
        data.split_photographs("train", 2, "all")


def test_unseen_split_is_disjoint_and_in_colour():
    """The "unseen" pictures are in no training set and not held out; they load as colour
    pictures and make moving clips."""
    unseen = data.split_photographs("unseen", 2)
    assert unseen == ("grace_hopper", "logo")
    for photographs in data.PHOTOGRAPH_SETS:
        assert set(unseen).isdisjoint(data.split_photographs("train", 2, photographs))
    assert set(unseen).isdisjoint(data.PHOTOGRAPHS)
    for name in unseen:
        image = data.photograph(name, 96)
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
        assert min(image.shape[:2]) == 96
        # colour, not grey: the channels differ
        assert np.abs(image[..., 0].astype(int) - image[..., 2]).mean() > 10, name
    clips = data.ProceduralClips(4, 32, 32, split="unseen")
    clip = clips[3]
    assert clip.shape == (4, 32, 32, 3) and clip.std() > 5
    assert not np.array_equal(clip, data.ProceduralClips(4, 32, 32, split="heldout")[3])


@pytest.mark.parametrize("task", [t for t in tasks.TASKS if t.name != "motion_trails"],
                         ids=lambda t: t.name)
def test_per_frame_tasks_restyle_each_frame_alone(task, np_rng):
    clip_thwc = data.ProceduralClips(3, 32, 32, seed=1)[0]
    out_thwc = task.fn(clip_thwc)
    assert out_thwc.shape == clip_thwc.shape and out_thwc.dtype == np.uint8
    assert not np.array_equal(out_thwc, clip_thwc)
    np.testing.assert_array_equal(out_thwc[1], task.fn(clip_thwc[1:2])[0])


def test_motion_trails_follows_its_recursion(np_rng):
    clip_thwc = np_rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    a = tasks.TRAIL_DECAY
    f_thwc = np.clip(clip_thwc * np.array([1.1, 0.95, 0.8]), 0, 255)
    y = f_thwc[0]
    expected = [y]
    for i in range(1, 5):
        y = a * y + (1 - a) * f_thwc[i]
        expected.append(y)
    trails = tasks.task_named("motion_trails")
    out_thwc = trails.fn(clip_thwc)
    # float32 recursion vs float64: equal after rounding but for values on a .5 boundary.
    assert np.abs(out_thwc.astype(np.int16) - np.round(np.stack(expected))).max() <= 1
    # Temporal: a frame's target depends on the past input, not only on its own frame.
    changed = clip_thwc.copy()
    changed[0] = 255 - changed[0]
    assert not np.array_equal(trails.fn(changed)[3], out_thwc[3])


def test_iterator_resumes_and_processes_split_rows(small_cfg):
    dataset = data.make_dataset(small_cfg)
    it = iter(dataset)
    first = next(it)
    assert first["cond"].shape == (4, 4, 32, 32, 3) and first["prompt"].shape == (4, 64)
    state = it.get_state()
    later = [next(it) for _ in range(2)]
    resumed = iter(dataset)
    resumed.set_state(state)
    for expected in later:
        got = next(resumed)
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key])
    halves = [next(iter(data.make_dataset(small_cfg, process_index=p, process_count=2)))
              for p in range(2)]
    for key in first:
        np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), first[key])


def _write_video(path, frames_thwc, fps):
    h, w = frames_thwc.shape[1:3]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
    for frame in frames_thwc:
        writer.write(frame)
    writer.release()


def _decode(path):
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            return np.stack(frames)
        frames.append(frame)


def test_video_folder_decodes_at_fps_and_skips_corrupt_files(tmp_path, np_rng):
    _write_video(tmp_path / "a.avi", np_rng.integers(0, 256, (20, 40, 60, 3), np.uint8), 16)
    (tmp_path / "sub").mkdir()
    _write_video(tmp_path / "sub" / "b.avi", np_rng.integers(0, 256, (9, 40, 60, 3), np.uint8),
                 16)
    (tmp_path / "corrupt.mp4").write_bytes(np_rng.integers(0, 256, 5000, np.uint8).tobytes())
    with pytest.warns(data.DataWarning, match="corrupt.mp4"):
        source = data.VideoFolderClips(tmp_path, clip_frames=4, height=16, width=16, fps=8)
    # Stride 2 (16 -> 8 fps); a clip spans 7 source frames: a.avi has 2 clips (starts 0, 8),
    # b.avi has 1.
    assert len(source) == 3
    decoded = _decode(tmp_path / "a.avi")
    expected = np.stack([resize_and_crop(cv2.cvtColor(f, cv2.COLOR_BGR2RGB), 16, 16)
                         for f in decoded[8:15:2]])
    np.testing.assert_array_equal(source[1], expected)
    assert source[2].shape == (4, 16, 16, 3)


def test_video_folder_errors(tmp_path, np_rng):
    with pytest.raises(data.DataError, match="holds no video files"):
        data.VideoFolderClips(tmp_path, clip_frames=4, height=16, width=16, fps=8)
    _write_video(tmp_path / "short.avi", np_rng.integers(0, 256, (5, 16, 16, 3), np.uint8), 8)
    with pytest.raises(data.DataError, match=r"short.avi.*has 5 frames, shorter than one clip"):
        data.VideoFolderClips(tmp_path, clip_frames=8, height=16, width=16, fps=8)


def test_truncated_video_clips_are_dropped_with_a_warning(tmp_path, np_rng, small_cfg):
    _write_video(tmp_path / "cut.avi", np_rng.integers(0, 256, (40, 40, 60, 3), np.uint8), 16)
    whole = (tmp_path / "cut.avi").read_bytes()
    (tmp_path / "cut.avi").write_bytes(whole[: len(whole) // 2])
    # The header still promises 40 frames (5 clips); only the first 2 clips can be decoded.
    source = data.VideoFolderClips(tmp_path, clip_frames=4, height=32, width=32, fps=8)
    assert len(source) == 5
    good = [source[0], source[1]]
    with pytest.warns(data.DataWarning, match=r"cut.avi': frame \d+ cannot be decoded"):
        assert source[4] is None
    cfg = load_config("lsd_configs/tiny.py", [*SMALL, "data.source=video_folder",
                                          f"data.video_dir={tmp_path}", "data.read_threads=1"])
    it = iter(data.make_dataset(cfg, batch_size=2))
    with pytest.warns(data.DataWarning):
        batches = [next(it) for _ in range(3)]
    for batch in batches:
        for clip in batch["cond"]:
            assert any(np.array_equal(clip, g) for g in good)


def test_prompt_phrasings_vary_the_prompt_not_the_task():
    """With `data.prompt_phrasings` every item keeps its task (the same draw as without) and its
    prompt is one of the task's phrasings; the held-out paraphrases are never among them."""
    from lsd_jax.prompt import make_prompt_encoder

    plain = load_config("lsd_configs/tiny.py", ["data.tasks=all"])
    varied = load_config("lsd_configs/tiny.py", ["data.prompt_phrasings=true"])
    source = data.ProceduralClips(2, 16, 16, seed=0)
    a, b = data.PairedClips(source, plain, seed=5), data.PairedClips(source, varied, seed=5)
    encoder = make_prompt_encoder(varied)
    seen = set()
    for i in range(60):
        item_a, item_b = a[i], b[i]
        assert item_a["task"] == item_b["task"]
        task = tasks.TASKS[int(item_b["task"])]
        options = {p: encoder.encode(p) for p in (task.prompt, *task.phrasings)}
        match = [p for p, v in options.items() if np.array_equal(v, item_b["prompt"])]
        assert len(match) == 1
        seen.add(match[0])
        np.testing.assert_array_equal(item_a["prompt"], encoder.encode(task.prompt))
    assert len(seen) > 12
    trained = {p for t in tasks.TASKS for p in (t.prompt, *t.phrasings)}
    assert trained.isdisjoint(p for ps in tasks.PARAPHRASES.values() for p in ps)
    assert set(tasks.PARAPHRASES) == set(tasks.TASK_NAMES)


def test_trained_prompts_include_the_phrasings_a_model_trained_on():
    from lsd_train.tasks import trained_prompts

    plain = trained_prompts(64, "sepia,negative")
    assert plain == ("an old sepia photograph", "a photographic negative")
    varied = trained_prompts(384, "sepia,negative", phrasings=True)
    assert len(varied) == 8 and varied[0] == plain[0] and "a film negative" in varied
    assert trained_prompts(0, "all", phrasings=True) == ()
