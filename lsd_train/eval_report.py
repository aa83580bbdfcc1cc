"""Tables (markdown), pictures (PNG), JSON and report files of `lsd eval` results; see
`lsd_train/evaluate.py`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lsd_jax.atomic import WriteError, atomic_path, atomic_write_text
from lsd_train.baselines import COLOR_MAPS
from lsd_train.evaluate import TEMPORAL_TASKS


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ----------------------------------------------------------------------------- quality


def quality_markdown(results: list[dict], *, pictures: dict[str, str]) -> str:
    """Markdown: per model a task x steps PSNR table, then SSIM and flicker at the sample step
    count, and (several models) one side-by-side summary table."""
    lines = []
    first = results[0]
    where = ("Held-out split: {} clips x {} frames per task (procedural, photographs and camera "
             "seeds never trained on)" if first.get("split", "heldout") == "heldout" else
             "Validation split: {} clips x {} frames per task (training photographs under camera "
             "seeds never trained on)").format(first["clips"], first["frames"])
    lines.append(f"{where}, seed "
                 f"{first['seed']}. PSNR/SSIM per output frame against the target frame, 8-bit "
                 "range; flicker = mean |(out_i - out_i-1) - (target_i - target_i-1)| in 8-bit "
                 "levels; flicker ratio = mean |out_i - out_i-1| / mean |target_i - target_i-1| "
                 "(the output's frame-to-frame change over the target's; 1 is as steady as the "
                 "target). Temporal task: " + ", ".join(TEMPORAL_TASKS) + ".")
    lines.append("")
    for res in results:
        ks = res["steps_list"]
        kk = res["sample_steps"]
        lines.append(f"**{res['model']}** (`{res['spec']}`, config {res['config']}): PSNR (dB) "
                     f"by denoising steps; SSIM, flicker and flicker ratio at {kk} steps")
        lines.append("")
        base = res.get("baseline_summary") is not None
        extra = (f" | copy input | colour map | floor | vs floor@{kk} |" if base else " |")
        lines.append("| task | prompt | " + " | ".join(f"{k} steps" for k in ks)
                     + f" | SSIM@{kk} | flicker@{kk} | ratio@{kk}" + extra)
        lines.append("|---|---|" + "---:|" * (len(ks) + 3 + 4 * base))
        for name, task in res["tasks"].items():
            cells = " | ".join(f"{task['steps'][k]['psnr']:.2f}" for k in ks)
            row = (f"| {name} | {task['prompt']} | {cells} | "
                   f"{task['steps'][kk]['ssim']:.3f} | {task['steps'][kk]['flicker']:.2f} | "
                   f"{task['steps'][kk].get('flicker_ratio', float('nan')):.2f} |")
            if base:
                b = task["baselines"]
                color = max(b[kind] for kind in COLOR_MAPS)
                row += (f" {b['copy_input']:.2f} | {color:.2f} | {task['floor']:.2f} | "
                        f"{task['steps'][kk]['margin']:+.2f} |")
            lines.append(row)
        s = res["summary"]
        blank = " | | | |" + " | | | |" * base
        lines.append("| **mean, per-frame tasks** | | " + " | ".join(
            f"**{s[k]['per_frame_psnr']:.2f}**" for k in ks) + blank)
        lines.append("| **temporal task** | | " + " | ".join(
            f"**{s[k]['temporal_psnr']:.2f}**" for k in ks) + blank)
        lines.append("")
        if "max_flicker_ratio" in s[kk]:
            worst = max(res["tasks"], key=lambda n: res["tasks"][n]["steps"][kk]["flicker_ratio"])
            lines.append(f"Largest flicker ratio at {kk} steps: {s[kk]['max_flicker_ratio']:.2f} "
                         f"({worst}).")
            lines.append("")
        if base:
            bs = res["baseline_summary"]["per_frame_psnr"]
            lines.append(
                f"Floors: copy input, and the best per-pixel colour map (affine or quadratic in "
                f"RGB, least squares on validation clips; 100 dB means exact); a task's floor is "
                f"1 dB above the best of them, at most 40 dB, and `vs floor` is the model's PSNR "
                f"minus it (>= 0: met). Tasks at or above their floor at {kk} steps: "
                f"{s[kk]['tasks_meeting_floor']} of {len(res['tasks'])}. Per-frame means of the "
                f"baselines: copy input {bs['copy_input']:.2f} dB, affine {bs['affine']:.2f} dB, "
                f"quadratic {bs['quadratic']:.2f} dB.")
            lines.append("")
    if len(results) > 1:
        kk = results[0]["sample_steps"]
        lines.append(f"Side by side at {kk} steps:")
        lines.append("")
        lines.append("| model | per-frame tasks PSNR | temporal PSNR | mean SSIM | mean flicker |")
        lines.append("|---|---:|---:|---:|---:|")
        for res in results:
            s = res["summary"][kk]
            lines.append(f"| {res['model']} | {s['per_frame_psnr']:.2f} | "
                         f"{s['temporal_psnr']:.2f} | {s['mean_ssim']:.3f} | "
                         f"{s['mean_flicker']:.2f} |")
        lines.append("")
    for title, path in pictures.items():
        lines.append(f"![{title}]({path})")
        lines.append("")
    return "\n".join(lines)


def plot_quality(results: list[dict], path: Path) -> Path:
    """PSNR against denoising steps: per task for the first model; the per-frame mean and the
    temporal task of every model in a second panel."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    res = results[0]
    ks = res["steps_list"]
    for name, task in res["tasks"].items():
        axes[0].plot(ks, [task["steps"][k]["psnr"] for k in ks], marker="o", label=name,
                     linestyle="--" if name in TEMPORAL_TASKS else "-")
    axes[0].set_title(f"{res['model']}: PSNR per task")
    for r in results:
        kr = r["steps_list"]
        line = axes[1].plot(kr, [r["summary"][k]["per_frame_psnr"] for k in kr], marker="o",
                            label=f"{r['model']}: per-frame tasks")[0]
        axes[1].plot(kr, [r["summary"][k]["temporal_psnr"] for k in kr], marker="s",
                     linestyle="--", color=line.get_color(), label=f"{r['model']}: temporal")
    axes[1].set_title(f"mean PSNR ({res.get('split', 'heldout')} split)")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_xlabel("denoising steps per frame")
        ax.set_ylabel("PSNR (dB)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
    return path


def strips_picture(result: dict, path: Path, *, frames: int = 4, scale: int = 2) -> Path:
    """One row per prompt: `frames` input frames | the same frames of the output (at the sample
    step count) | the target, each frame upscaled `scale`x, the prompt written above the row."""

    samples = result["samples"]
    names = list(result["tasks"])
    t = samples["cond"].shape[1]
    idx = np.linspace(t // 4, t - 1, frames).round().astype(int)
    rows = []
    for r, name in enumerate(names):
        parts = []
        for key in ("cond", "out", "target"):
            seq = np.concatenate([samples[key][r, i] for i in idx], axis=1)
            parts.append(seq)
            parts.append(np.full((seq.shape[0], 4, 3), 255, np.uint8))
        row = np.concatenate(parts[:-1], axis=1)
        text = f"\"{result['tasks'][name]['prompt']}\"   input | output ({result['sample_steps']}" \
               " steps) | target"
        rows.append(labelled_row(row, text, scale=scale))
    # JPEG: the noisy strips of an early model compress poorly as PNG (megabytes).
    return save_jpeg(rows, path)


def labelled_row(row: np.ndarray, text: str, *, scale: int) -> np.ndarray:
    """A picture row (uint8 RGB) upscaled `scale`x (nearest) under a white band holding `text`."""
    import cv2

    row = cv2.resize(row, (row.shape[1] * scale, row.shape[0] * scale),
                     interpolation=cv2.INTER_NEAREST)
    band = np.full((22, row.shape[1], 3), 255, np.uint8)
    cv2.putText(band, text, (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([band, row], axis=0)


def save_jpeg(rows: list[np.ndarray], path: Path) -> Path:
    """Rows stacked top to bottom into one JPEG (quality 90) at `path`."""
    import cv2

    with atomic_path(path) as tmp:
        if not cv2.imwrite(str(tmp), cv2.cvtColor(np.concatenate(rows, axis=0),
                                                  cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_JPEG_QUALITY, 90]):
            raise WriteError(f"cannot write a JPEG to {str(path)!r}")
    return path


def save_figure(fig, path: Path) -> Path:
    """A matplotlib figure saved at `path` (whole or not at all) and closed."""
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110)
    finally:
        _plt().close(fig)
    return path


# ----------------------------------------------------------------------------- drift


def drift_markdown(results: list[dict], *, pictures: dict[str, str]) -> str:
    r0 = results[0]
    lines = [f"Endless held-out camera path, periodic with period {r0['period']} frames (the "
             f"first and last {r0['period']} frames show the model the same input), task "
             f"`{r0['task']}` (\"{r0['prompt']}\"), {r0['steps']} steps per frame, seed "
             f"{r0['seed']}. PSNR of every frame against the target.", "",
             f"| model | frames | PSNR first {r0['period']} | PSNR last {r0['period']} | "
             "last - first (dB) | min frame PSNR | ms/frame |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['model']} | {r['frames']:,} | {r['first_mean']:.2f} | "
                     f"{r['last_mean']:.2f} | {r['delta_db']:+.2f} | {r['min']:.2f} | "
                     f"{r['ms_per_frame']:.1f} |")
    lines.append("")
    for title, path in pictures.items():
        lines.append(f"![{title}]({path})")
        lines.append("")
    return "\n".join(lines)


def plot_drift(results: list[dict], path: Path) -> Path:
    """PSNR over the stream: a running mean over one period per model, with the per-frame values
    faint behind the first model's line."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(11, 4.2))
    for r in results:
        psnr = np.asarray(r["psnr"], np.float64)
        window = min(r["period"], len(psnr))
        kernel = np.ones(window) / window
        running = np.convolve(psnr, kernel, mode="valid")
        x = np.arange(window - 1, len(psnr))
        line = ax.plot(x, running, label=f"{r['model']} (last - first {r['delta_db']:+.2f} dB)")[0]
        if r is results[0]:
            stride = max(1, len(psnr) // 5000)
            ax.plot(np.arange(len(psnr))[::stride], psnr[::stride], color=line.get_color(),
                    alpha=0.15, linewidth=0.5)
    r0 = results[0]
    ax.set_title(f"drift: PSNR over the stream ({r0['task']}, {r0['steps']} steps; running mean "
                 f"over {r0['period']} frames)")
    ax.set_xlabel("frame")
    ax.set_ylabel("PSNR (dB)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    return path


# ----------------------------------------------------------------------------- reports


def json_ready(result: dict) -> dict:
    """`result` without its arrays and pictures (the top-level `samples`, `frames_kept` and the
    per-frame `psnr` array of a drift result), with string keys: plain JSON types."""

    def plain(value):
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        return value

    return {key: plain(value) for key, value in result.items()
            if key not in ("samples", "frames_kept") and not (key == "psnr" and
                                                               not np.isscalar(value))}


def save_json(path: Path, payload) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2) + "\n")


def replace_section(report: Path, name: str, body: str) -> None:
    """Put `body` between the markers of section `name` in the markdown file `report` (appended
    when the markers are not there yet); the rest of the file is kept."""
    begin, end = f"<!-- lsd eval {name}: begin -->", f"<!-- lsd eval {name}: end -->"
    text = report.read_text() if report.exists() else ""
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + ("\n\n" if text else "") + block + "\n"
    atomic_write_text(report, text)
