"""Loading an OpenCLIP model the normal open_clip way, and encoding with it.

Every form users have is supported: a built-in name with a pretrained tag or a weights
file, ``hf-hub:org/repo`` and ``local-dir:/path``. A model that cannot be loaded is an
immediate :class:`ModelLoadError` naming the setting to change; weights are never
silently random (``require_pretrained=True``).
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from PIL import Image

from worker.errors import ConfigurationError, ModelLoadError
from worker.log import get_logger

log = get_logger(__name__)

HF_HUB_PREFIX = "hf-hub:"
LOCAL_DIR_PREFIX = "local-dir:"
TEXT_BATCH = 256


@dataclass
class LoadedModel:
    """A loaded model with everything needed to encode images and prompts."""

    model: Any  # open_clip.CLIP (untyped library)
    preprocess: Callable[[Image.Image], torch.Tensor]
    tokenizer: Callable[[list[str]], torch.Tensor]
    name: str
    pretrained: str | None
    fingerprint: str
    device: torch.device
    autocast_dtype: torch.dtype | None
    logit_scale: float
    #: The PIL-only part of ``preprocess`` (resize, crop) and the normalisation after
    #: it, so threads produce uint8 arrays and the batch is normalised in one op on the
    #: device. None when ``preprocess`` has an unexpected shape: then it runs whole.
    pil_stage: Callable[[Image.Image], Image.Image] | None = None
    mean: torch.Tensor | None = None
    std: torch.Tensor | None = None
    texts_encoded: int = 0
    images_encoded: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def image_size(self) -> tuple[int, int]:
        size = self.model.visual.image_size
        return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))

    def image_input(self, image: Image.Image) -> np.ndarray | torch.Tensor:
        """One picture -> what :meth:`batch_pixels` stacks (thread-safe, no torch ops)."""
        if self.pil_stage is None:
            return self.preprocess(image)
        return np.asarray(self.pil_stage(image), dtype=np.uint8)

    def batch_pixels(self, inputs: Sequence[np.ndarray | torch.Tensor]) -> torch.Tensor:
        """Stack :meth:`image_input` results into a normalised float batch on the device.

        Same arithmetic as torchvision's ToTensor + Normalize, done once per batch.
        """
        if self.mean is None or self.std is None or isinstance(inputs[0], torch.Tensor):
            return torch.stack([torch.as_tensor(i) for i in inputs]).to(self.device)
        batch = torch.from_numpy(np.stack(inputs)).permute(0, 3, 1, 2)
        if self.device.type == "cuda":
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        pixels = batch.contiguous().to(torch.float32).div(255)
        return pixels.sub_(self.mean).div_(self.std)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Encode a preprocessed ``(N, 3, H, W)`` batch; L2-normalised float32 on the device."""
        pixels = pixels.to(self.device, non_blocking=True)
        with self._lock:
            self.images_encoded += int(pixels.shape[0])
        with self._autocast():
            emb = self.model.encode_image(pixels)
        return F.normalize(emb.float(), dim=-1)

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Encode prompts in full precision; L2-normalised float32 ``(N, D)`` on the CPU.

        Text runs without autocast so cached prompt embeddings do not depend on the
        precision setting.
        """
        out = []
        with self._lock:
            self.texts_encoded += len(texts)
        for start in range(0, len(texts), TEXT_BATCH):
            tokens = self.tokenizer(list(texts[start : start + TEXT_BATCH])).to(self.device)
            emb = self.model.encode_text(tokens, normalize=True)
            out.append(emb.float().cpu())
        if not out:
            return torch.empty(0, 0)
        return torch.cat(out)

    def describe(self) -> dict[str, str]:
        return {
            "name": self.name,
            "pretrained": self.pretrained or "",
            "fingerprint": self.fingerprint,
        }


def split_preprocess(
    preprocess: Any, device: torch.device
) -> tuple[Callable[[Image.Image], Image.Image] | None, torch.Tensor | None, torch.Tensor | None]:
    """Split open_clip's inference Compose into (PIL stage, mean, std) when it ends in
    ToTensor + Normalize, as open_clip's always does; (None, None, None) otherwise."""
    from torchvision.transforms import Compose, Normalize, ToTensor

    steps = list(getattr(preprocess, "transforms", []))
    if (
        len(steps) < 2
        or not isinstance(steps[-2], ToTensor)
        or not isinstance(steps[-1], Normalize)
    ):
        return None, None, None
    norm = steps[-1]
    mean = torch.tensor(norm.mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    std = torch.tensor(norm.std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    return Compose(steps[:-2]), mean, std


def resolve_device(requested: str) -> torch.device:
    """Turn ``auto|cpu|cuda|cuda:N|mps`` into a device that exists, or explain why not."""
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigurationError(
                f"WORKER_DEVICE={requested} but no CUDA device is visible "
                f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'}); "
                "set WORKER_DEVICE=cpu or auto"
            )
        index = int(requested.split(":", 1)[1]) if ":" in requested else 0
        if index >= torch.cuda.device_count():
            raise ConfigurationError(
                f"WORKER_DEVICE={requested} but only {torch.cuda.device_count()} CUDA device(s) "
                "are visible"
            )
    return torch.device(requested)


def resolve_autocast(precision: str, device: torch.device) -> torch.dtype | None:
    """``auto`` means fp16 autocast on CUDA and full precision elsewhere."""
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else None
    if precision == "fp32":
        return None
    if precision == "fp16" and device.type == "cpu":
        raise ConfigurationError(
            "WORKER_PRECISION=fp16 is not supported on the CPU; use fp32 or bf16"
        )
    return {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def _hub_endpoint_reachable(url: str, timeout: float) -> str | None:
    """None when a TCP connection to the hub opens within ``timeout``, else the reason."""
    parsed = urlparse(url)
    host = parsed.hostname or "huggingface.co"
    port = parsed.port or (443 if parsed.scheme != "http" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        return f"{host}:{port} is unreachable ({exc})"


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """Make huggingface_hub answer from its local cache only, at once, while loading."""
    import huggingface_hub.constants as hf_constants

    before = hf_constants.HF_HUB_OFFLINE
    hf_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hf_constants.HF_HUB_OFFLINE = before


def model_config(name: str) -> dict[str, Any]:
    """The architecture config behind ``name``, for the fingerprint."""
    import open_clip

    if name.startswith(LOCAL_DIR_PREFIX):
        cfg_path = Path(name[len(LOCAL_DIR_PREFIX) :]) / "open_clip_config.json"
        loaded: dict[str, Any] = json.loads(cfg_path.read_text(encoding="utf-8"))
        return loaded.get("model_cfg", {})  # type: ignore[no-any-return]
    if name.startswith(HF_HUB_PREFIX):
        from huggingface_hub import hf_hub_download

        cfg_file = hf_hub_download(name[len(HF_HUB_PREFIX) :], "open_clip_config.json")
        return json.loads(Path(cfg_file).read_text(encoding="utf-8")).get(  # type: ignore[no-any-return]
            "model_cfg", {}
        )
    cfg = open_clip.get_model_config(name.replace("/", "-"))
    return dict(cfg or {})


def fingerprint_model(model: Any, model_cfg: dict[str, Any]) -> str:
    """sha256 over the architecture config, preprocessing and every weight tensor's bytes."""
    digest = hashlib.sha256()
    header = {"model_cfg": model_cfg, "preprocess_cfg": getattr(model.visual, "preprocess_cfg", {})}
    digest.update(json.dumps(header, sort_keys=True, default=str).encode())
    for key, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _explain_load_failure(
    name: str, pretrained: str | None, exc: Exception, hub: str | None
) -> str:
    import open_clip

    text = str(exc)
    if name.startswith(LOCAL_DIR_PREFIX):
        return (
            f"cannot load WORKER_MODEL__NAME={name}: {text}. The directory must hold "
            "open_clip_config.json (with model_cfg and preprocess_cfg) and "
            "open_clip_model.safetensors, as `worker finetune` writes them."
        )
    if "not found in built-ins" in text:
        close = difflib.get_close_matches(name, open_clip.list_models(), n=5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        return (
            f"unknown model WORKER_MODEL__NAME={name}.{hint} Any name from "
            "open_clip.list_models(), 'hf-hub:org/repo' or 'local-dir:/path' works."
        )
    if "is not a known tag or valid file path" in text:
        tags = open_clip.list_pretrained_tags_by_model(name)
        return (
            f"WORKER_MODEL__PRETRAINED={pretrained} is neither a pretrained tag of {name} "
            f"(known tags: {', '.join(tags) or 'none'}) nor an existing weights file."
        )
    where = f" ({hub})" if hub else ""
    return (
        f"cannot load the weights of WORKER_MODEL__NAME={name} "
        f"WORKER_MODEL__PRETRAINED={pretrained or ''}: {text}{where}. They are not in the "
        "local cache and could not be downloaded. Allow access to the model hub, "
        "pre-download them (HF_HOME / WORKER_MODEL__DOWNLOAD_DIR), set "
        "WORKER_MODEL__PRETRAINED to a weights file, or serve a local checkpoint with "
        "WORKER_MODEL__NAME=local-dir:/path/to/checkpoint."
    )


def _hub_url_for(name: str, pretrained: str | None) -> str | None:
    """The URL weights would be downloaded from, or None for local weights."""
    import open_clip

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    if name.startswith(LOCAL_DIR_PREFIX):
        return None
    if name.startswith(HF_HUB_PREFIX):
        return endpoint
    if not pretrained or os.path.isfile(pretrained):
        return None
    cfg = open_clip.get_pretrained_cfg(name.replace("/", "-"), pretrained)
    if not cfg:
        return None
    if cfg.get("hf_hub"):
        return endpoint
    url = cfg.get("url")
    return str(url) if url else None


def load_model(
    name: str,
    pretrained: str | None,
    *,
    device: str = "auto",
    precision: str = "auto",
    download_dir: Path | None = None,
    hub_probe_timeout_s: float = 5.0,
) -> LoadedModel:
    """Load an OpenCLIP model with its preprocessing and tokenizer, or raise ModelLoadError."""
    import open_clip

    started = time.perf_counter()
    torch_device = resolve_device(device)
    autocast_dtype = resolve_autocast(precision, torch_device)
    schema_name = name.startswith((HF_HUB_PREFIX, LOCAL_DIR_PREFIX))
    if not schema_name and not pretrained:
        raise ModelLoadError(
            f"WORKER_MODEL__PRETRAINED is empty for WORKER_MODEL__NAME={name}: without "
            "pretrained weights the model would score at random. Set a tag "
            f"({', '.join(open_clip.list_pretrained_tags_by_model(name)) or 'see open_clip'}) "
            "or a weights file."
        )
    hub_url = _hub_url_for(name, pretrained)
    unreachable = (
        _hub_endpoint_reachable(hub_url, hub_probe_timeout_s) if hub_url is not None else None
    )
    offline = _hub_offline() if unreachable else contextlib.nullcontext()
    try:
        with offline:
            model, preprocess = open_clip.create_model_from_pretrained(
                name,
                pretrained=None if schema_name else pretrained,
                device="cpu",
                cache_dir=str(download_dir) if download_dir else None,
            )
            tokenizer = open_clip.get_tokenizer(name)
            model_cfg = model_config(name)
    except Exception as exc:
        raise ModelLoadError(_explain_load_failure(name, pretrained, exc, unreachable)) from exc
    model.eval()
    fingerprint = fingerprint_model(model, model_cfg)
    model.to(torch_device)
    logit_scale = float(model.logit_scale.detach().exp().clamp(max=100.0).item())
    pil_stage, mean, std = split_preprocess(preprocess, torch_device)
    loaded = LoadedModel(
        model=model,
        preprocess=preprocess,
        tokenizer=tokenizer,
        name=name,
        pretrained=None if schema_name else pretrained,
        fingerprint=fingerprint,
        device=torch_device,
        autocast_dtype=autocast_dtype,
        logit_scale=logit_scale,
        pil_stage=pil_stage,
        mean=mean,
        std=std,
    )
    log.info(
        "model.loaded",
        model=name,
        pretrained=loaded.pretrained,
        device=str(torch_device),
        autocast=str(autocast_dtype) if autocast_dtype else "fp32",
        fingerprint=fingerprint,
        ms=round((time.perf_counter() - started) * 1000),
    )
    return loaded
