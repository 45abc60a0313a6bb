"""What is installed: the package's version, the versions `worker --version` prints, and
which imports belong to the `serve` extra (the model stack the light client goes without)."""

from __future__ import annotations

from importlib import metadata

DISTRIBUTION = "moderation-worker"

# Top-level modules that only `pip install 'moderation-worker[serve]'` brings.
SERVE_MODULES = frozenset(
    {
        "torch",
        "torchvision",
        "open_clip",
        "huggingface_hub",
        "safetensors",
        "numpy",
        "PIL",
        "prometheus_client",
        "matplotlib",
        "pdqhash",
        "faiss",
        "lancedb",
        "pyarrow",
    }
)
SERVE_HINT = "pip install 'moderation-worker[serve]'"


def package_version() -> str:
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"


def _version_of(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    """Package and model-stack versions, read from the installed metadata (nothing heavy is
    imported, so this answers in milliseconds even where torch is installed). None: absent."""
    return {
        DISTRIBUTION: package_version(),
        "torch": _version_of("torch"),
        "open_clip_torch": _version_of("open_clip_torch"),
        "celery": _version_of("celery"),
    }


def missing_serve_module(exc: BaseException) -> str | None:
    """The serve-extra module whose absence raised ``exc``, or None for any other error."""
    if not isinstance(exc, ModuleNotFoundError) or not exc.name:
        return None
    root = exc.name.split(".")[0]
    return root if root in SERVE_MODULES else None
