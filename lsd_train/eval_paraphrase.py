"""`lsd eval paraphrase`: does the model understand prompts it was never trained on?

For every task, each held-out paraphrase of its prompt (`lsd_train.tasks.PARAPHRASES`, never trained
on) and, for reference, the task's own prompt condition the model on the same clips; each output
is scored (PSNR) against the targets of every task on those clips. The margin is the PSNR against
the prompt's own task minus the best PSNR against any other task: > 0 means the output is closer
to what the paraphrase asks for than to anything else the model can make.
"""

from __future__ import annotations

import time

import numpy as np

from lsd_jax.errors import ConfigError
from lsd_jax.progress import progress_bar
from lsd_jax.prompt import make_prompt_encoder
from lsd_train.eval_data import heldout_pairs
from lsd_train.evaluate import clip_psnr, stream_batch
from lsd_train.tasks import PARAPHRASES, TASKS


def evaluate_paraphrases(model, *, steps: int = 3, clips: int = 2, frames: int = 12,
                         seed: int = 0, split: str = "heldout", progress: bool = True) -> dict:
    """Per task: `{"prompt": row, "paraphrases": [row, ...]}` with each row `{"prompt", "psnr"
    (vs its own task), "best_other", "other_task", "margin"}` (means over `clips` clips of
    `frames` frames at `steps` steps); `"min_margin"` over all paraphrases and `"all_closer"`
    (every paraphrase margin > 0)."""
    encoder = make_prompt_encoder(model.cfg)
    if encoder is None:
        raise ConfigError(f"model {model.label!r} takes no prompt: nothing to paraphrase")
    names, _, cond, target, _ = heldout_pairs(model.pixel_cfg, clips=clips, frames=frames,
                                              seed=seed, split=split)
    sources = cond[:clips]  # every task's rows hold the same clips, task-major
    targets = {name: target[i * clips:(i + 1) * clips] for i, name in enumerate(names)}
    rows = [(t.name, t.prompt, False) for t in TASKS if t.name in targets]
    rows += [(name, p, True) for name in targets for p in PARAPHRASES[name]]
    cond_rows = np.concatenate([sources] * len(rows))
    prompt_rows = np.repeat(encoder.encode_batch([p for _, p, _ in rows]), clips, axis=0)
    t0 = time.perf_counter()
    with progress_bar(f"paraphrases {model.label}", frames, enabled=progress) as tracker:
        out = stream_batch(model, cond_rows, prompt_rows, steps=steps, seed=seed,
                           on_frame=tracker.advance)
    results = {name: {"prompt": None, "paraphrases": []} for name in targets}
    for r, (task, prompt, is_paraphrase) in enumerate(rows):
        outs = out[r * clips:(r + 1) * clips]
        psnr = {name: float(np.mean([clip_psnr(o, t) for o, t in zip(outs, tgt, strict=True)]))
                for name, tgt in targets.items()}
        other = max((n for n in psnr if n != task), key=psnr.get)
        row = {"prompt": prompt, "psnr": psnr[task], "best_other": psnr[other],
               "other_task": other, "margin": psnr[task] - psnr[other]}
        if is_paraphrase:
            results[task]["paraphrases"].append(row)
        else:
            results[task]["prompt"] = row
    margins = [p["margin"] for r in results.values() for p in r["paraphrases"]]
    return {"model": model.label, "spec": model.spec, "encoder": encoder.name, "steps": steps,
            "clips": clips, "frames": frames, "seed": seed, "split": split, "tasks": results,
            "min_margin": float(min(margins)), "all_closer": bool(min(margins) > 0),
            "seconds": time.perf_counter() - t0}


def paraphrase_markdown(results: list[dict]) -> str:
    """One table per model: task, prompt, PSNR vs its task, best other task, margin."""
    parts = []
    for r in results:
        closer = sum(p["margin"] > 0 for t in r["tasks"].values() for p in t["paraphrases"])
        total = sum(len(t["paraphrases"]) for t in r["tasks"].values())
        parts.append(
            f"**{r['model']}** ({r['encoder']} encoder, {r['split']} split, {r['clips']} clips x "
            f"{r['frames']} frames, {r['steps']} steps): {closer} of {total} held-out paraphrases "
            f"give outputs closer to their own task's target than to any other task's (smallest "
            f"margin {r['min_margin']:+.2f} dB).\n\n"
            "| task | prompt | PSNR vs its task | nearest other task | margin |\n"
            "|---|---|---|---|---|")
        for task, t in r["tasks"].items():
            for kind, row in [("trained", t["prompt"])] + [("paraphrase", p)
                                                          for p in t["paraphrases"]]:
                parts.append(f"| {task} | {row['prompt']!r} ({kind}) | {row['psnr']:.2f} | "
                             f"{row['other_task']} {row['best_other']:.2f} | "
                             f"{row['margin']:+.2f} |")
        parts.append("")
    return "\n".join(parts)
