"""The user's own video pairs (`train/pairs.py`, `data.source=pairs`, `lsd data pairs`,
`lsd eval --pairs`): manifest checks as one-line errors, clips cut from aligned pairs, the
teachers, mixing into the built-in tasks, exact resume and multi-process rows, and the pairs
evaluation's floors."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from lsd_jax.config import load_config
from lsd_jax.errors import ConfigError, DataError
from lsd_train import data, pairs

SMALL = ["model.frame_height=32", "model.frame_width=32", "data.clip_frames=4",
         "train.batch_size=4"]


def _frames(np_rng, n, h=40, w=48):
    base = np_rng.integers(0, 256, (h, w, 3), np.uint8)
    return np.stack([np.roll(base, 2 * i, axis=1) for i in range(n)])


def _write_video(path, frames_thwc, fps):
    h, w = frames_thwc.shape[1:3]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
    for frame in frames_thwc:
        writer.write(frame)
    writer.release()


def _manifest(tmp_path, lines):
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line)
                              for line in lines) + "\n")
    return path


@pytest.fixture
def folder_pair(tmp_path, np_rng):
    clip = _frames(np_rng, 12)
    pairs.write_frames(tmp_path / "in", clip)
    pairs.write_frames(tmp_path / "out", 255 - clip)
    return clip


def test_frame_folder_pairs_read_back(tmp_path, folder_pair):
    manifest = _manifest(tmp_path, [{"input": "in", "target": "out", "prompt": " inverted ",
                                     "split": "train"}])
    (pair,) = pairs.read_manifest(manifest)
    assert pair.prompt == "inverted" and pair.split == "train" and pair.line == 1
    np.testing.assert_array_equal(pairs.read_frames(pair.input), folder_pair)
    assert pairs.check_pair(pair) == 12


@pytest.mark.parametrize("line, message", [
    ('{"input": "in", "target": "out", "prompt": "x"', r"pairs.jsonl:2: not JSON"),
    ({"input": "in", "target": "nowhere", "prompt": "x"}, r"pairs.jsonl:2: target .*nowhere.* "
                                                          "does not exist"),
    ({"input": "in", "target": "out"}, r"pairs.jsonl:2: prompt=None, expected a non-empty"),
    ({"input": "in", "target": "out", "prompt": "x", "split": "test"},
     r"pairs.jsonl:2: split='test', expected one of \('train', 'validation'\)"),
    ("[1, 2]", r"pairs.jsonl:2: expected an object"),
])
def test_manifest_errors_name_the_line(tmp_path, folder_pair, line, message):
    good = {"input": "in", "target": "out", "prompt": "x"}
    manifest = _manifest(tmp_path, [good, line])
    with pytest.raises(DataError, match=message) as err:
        pairs.read_manifest(manifest)
    assert "\n" not in str(err.value)


def test_mismatched_frame_counts_and_rates(tmp_path, np_rng, folder_pair):
    pairs.write_frames(tmp_path / "short", 255 - folder_pair[:9])
    manifest = _manifest(tmp_path, [{"input": "in", "target": "short", "prompt": "x"}])
    with pytest.raises(DataError, match=r"line 1 \(in -> short\): the input has 12 frames, the "
                                        r"target 9"):
        pairs.check_pair(pairs.read_manifest(manifest)[0])
    clip = _frames(np_rng, 10)
    _write_video(tmp_path / "a.avi", clip, 16)
    _write_video(tmp_path / "b.avi", clip, 8)
    manifest = _manifest(tmp_path, [{"input": "a.avi", "target": "b.avi", "prompt": "x"}])
    with pytest.raises(DataError, match=r"the input runs at 16 fps, the target at 8"):
        pairs.check_pair(pairs.read_manifest(manifest)[0])


def test_pairs_source_cuts_aligned_clips(tmp_path, np_rng, folder_pair, repo_root):
    manifest = _manifest(tmp_path, [{"input": "in", "target": "out", "prompt": "x",
                                     "split": "train"}])
    source = pairs.PairsClips(manifest, clip_frames=4, height=32, width=32, fps=8.0, seed=0)
    offsets = set()
    for i in range(8):
        item = source[i]
        assert item["cond"].shape == (4, 32, 32, 3) and item["task"] == pairs.PAIR_TASK
        # the target is the negative of the input, frame for frame (one resize for both)
        np.testing.assert_array_equal(item["target"].astype(int), 255 - item["cond"].astype(int))
        full = pairs.read_frames(tmp_path / "in", 32, 32)
        start = next(s for s in range(9) if np.array_equal(full[s:s + 4], item["cond"]))
        offsets.add(start)
        np.testing.assert_array_equal(source[i]["cond"], item["cond"])  # a pure function of i
    assert len(offsets) > 1  # random offsets


def test_pairs_dataset_resumes_and_splits_rows_over_processes(tmp_path, folder_pair, repo_root):
    manifest = _manifest(tmp_path, [{"input": "in", "target": "out", "prompt": "x",
                                     "split": "train"}])
    cfg = load_config(repo_root / "lsd_configs" / "tiny.py",
                      [*SMALL, "data.source=pairs", f"data.pairs={manifest}"])
    dataset = data.make_dataset(cfg)
    it = iter(dataset)
    first = next(it)
    assert first["cond"].shape == (4, 4, 32, 32, 3) and set(first["task"]) == {pairs.PAIR_TASK}
    state = it.get_state()
    later = next(it)
    resumed = iter(dataset)
    resumed.set_state(state)
    np.testing.assert_array_equal(next(resumed)["cond"], later["cond"])
    halves = [next(iter(data.make_dataset(cfg, process_index=p, process_count=2)))
              for p in range(2)]
    for key in first:
        np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), first[key])


def test_pairs_mixed_into_the_builtin_tasks(tmp_path, folder_pair, repo_root):
    manifest = _manifest(tmp_path, [{"input": "in", "target": "out", "prompt": "inverted",
                                     "split": "train"}])
    cfg = load_config(repo_root / "lsd_configs" / "tiny.py",
                      [*SMALL, f"data.pairs={manifest}", "data.pairs_fraction=0.5",
                       "train.batch_size=32"])
    batch = next(iter(data.make_dataset(cfg)))
    from_pairs = int(np.sum(batch["task"] == pairs.PAIR_TASK))
    assert 8 <= from_pairs <= 24  # about half of 32
    assert pairs.config_prompts(cfg)[-1] == "inverted" and len(pairs.config_prompts(cfg)) == 10
    with pytest.raises(ConfigError, match="data.pairs_fraction=0.5 mixes"):
        load_config(repo_root / "lsd_configs" / "tiny.py", ["data.pairs_fraction=0.5"])


def test_make_pairs_with_builtin_and_own_teachers(tmp_path, np_rng):
    videos = tmp_path / "videos"
    videos.mkdir()
    _write_video(videos / "a.avi", _frames(np_rng, 6, 64, 80), 8)
    pairs.write_frames(videos / "b", _frames(np_rng, 5, 300, 200))  # scaled down to 256
    teachers = [pairs.get_teacher("negative"), pairs.get_teacher("test_pairs:_flip",
                                                                 prompt="upside down")]
    manifest = pairs.make_pairs(videos, tmp_path / "out", teachers)
    made = pairs.read_manifest(manifest)
    assert [p.prompt for p in made] == ["a photographic negative", "upside down"] * 2
    for pair in made:
        assert pairs.check_pair(pair) in (5, 6)
    inputs = pairs.read_frames(made[2].input)
    assert inputs.shape[1:3] == (256, 171)  # the large folder, scaled to 256 on its long side
    np.testing.assert_array_equal(pairs.read_frames(made[2].target), 255 - inputs)
    np.testing.assert_array_equal(pairs.read_frames(made[3].target), inputs[:, ::-1])
    with pytest.raises(DataError, match="exists: give a new --out folder"):
        pairs.make_pairs(videos, tmp_path / "out", teachers)
    with pytest.raises(ConfigError, match="give its prompt with --prompt"):
        pairs.get_teacher("test_pairs:_flip")
    with pytest.raises(ConfigError, match="not a built-in teacher"):
        pairs.get_teacher("nonsense")


def _flip(clip_thwc):
    return np.ascontiguousarray(clip_thwc[:, ::-1])


def test_opencv_teachers_make_frames_of_the_same_shape(np_rng):
    clip = _frames(np_rng, 2, 64, 64)
    for name in ("color_pencil", "detail_enhance", "edge_preserving"):
        teacher = pairs.get_teacher(name)
        out = teacher.fn(clip)
        assert out.shape == clip.shape and out.dtype == np.uint8 and len(teacher.prompts) >= 2
        assert not np.array_equal(out, clip)
