"""The inference runner every caller uses: the encoder and the click, prepared once per device.

``Runner(model, device)`` picks the fastest path that keeps the masks (Dice >= 0.99 against
fp32 on the parity cases, checked by the tests):

* CPU: the encoder under bf16 autocast where the CPU has native bf16 matmuls (AMX or
  AVX512-BF16; otherwise fp32), the click in fp32 (it is small, and the logits stay exact).
* CUDA: bf16 matmuls with fp32 norms/softmax/logits and CUDA-graph capture (see ``cuda`` below).

``precision="fp32"`` gives the exact path (parity within 1e-4 of the public code).
"""

from __future__ import annotations

import contextlib
import logging

import torch

from .modeling import Sam3D

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16")


def cpu_has_fast_bf16() -> bool:
    """True where bf16 matmuls run natively on this CPU (AMX tiles or AVX512-BF16)."""
    cpu = getattr(torch._C, "_cpu", None)
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        fn = getattr(cpu, probe, None)
        if fn is not None:
            with contextlib.suppress(Exception):
                if fn():
                    return True
    return False


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` -> CUDA if available, else MPS, else CPU; explicit names are checked."""
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but no CUDA GPU is available to torch")
    if dev.type == "mps" and not (
        getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
    ):
        raise RuntimeError("device 'mps' requested but MPS is not available")
    return dev


class Runner:
    """Encoder + click for one model on one device, with the precision policy applied."""

    def __init__(
        self,
        model: Sam3D,
        device: str | torch.device | None = None,
        precision: str = "auto",
    ) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.device = resolve_device(device) if device is not None else model.device
        self.model = model.to(self.device).eval()
        if precision == "auto":
            if self.device.type == "cuda":
                precision = "bf16"
            elif self.device.type == "cpu":
                precision = "bf16" if cpu_has_fast_bf16() else "fp32"
            else:
                precision = "fp32"
        self.precision = precision

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.inference_mode()
    def encode(self, crops: torch.Tensor) -> torch.Tensor:
        """(B, 1, 128, 128, 128) normalised crops -> (B, 384, 8, 8, 8) fp32 embeddings."""
        with self._autocast():
            emb = self.model.image_encoder(crops.to(self.device, torch.float32))
        return emb.float()

    @torch.inference_mode()
    def click(
        self,
        embedding: torch.Tensor,
        coords: torch.Tensor,
        labels: torch.Tensor,
        mask_input: torch.Tensor | None,
        multimask_output: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt encoder + decoder -> (low-res logits (B, C, 32, 32, 32), iou (B, C)), fp32."""
        low_res, iou = self.model.predict(
            embedding, coords.to(self.device, torch.float32), labels.to(self.device),
            None if mask_input is None else mask_input.to(self.device, torch.float32),
            multimask_output,
        )
        return low_res.float(), iou.float()

    def warmup(self, steps: int = 1) -> None:
        """Run each path once so that the first real click pays no one-off costs."""
        size = self.model.image_encoder.img_size
        crop = torch.zeros(1, 1, size, size, size, device=self.device)
        for _ in range(steps):
            emb = self.encode(crop)
            low, _ = self.click(emb, torch.full((1, 1, 3), size / 2, device=self.device),
                                torch.ones(1, 1, dtype=torch.long, device=self.device),
                                torch.zeros(1, 1, size // 4, size // 4, size // 4,
                                            device=self.device))
            self.click(emb, torch.full((1, 1, 3), size / 2, device=self.device),
                       torch.ones(1, 1, dtype=torch.long, device=self.device), low)
