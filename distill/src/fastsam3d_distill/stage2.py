"""Stage 2: fine-tune the prompt encoder + mask decoder with simulated clicks.

The image encoder (the distilled student) is frozen and runs in ``prepare``, outside DDP. Each
sample gets ``n_clicks`` rounds: click, decode with the previous low-res logits fed back as the
mask prompt, MONAI DiceCE on the upsampled logits, next click in the largest error. How clicks
reach the decoder follows the model config's ``point_policy`` ("newest": only the newest click,
as FastSAM3D trained; "accumulate": all clicks so far, as SAM-Med3D does), so the fine-tuned
decoder matches what the interactive session will send it. ``box_prob > 0`` trains box-aware
prompt embeddings (the model needs ``num_point_embeddings=4``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .clicks import bbox, first_click, next_click
from .engine import Task, sample_generator
from .models import config_to_dict


def decode(
    model_parts: tuple[nn.Module, nn.Module],
    embedding: torch.Tensor,
    coords: torch.Tensor,
    labels: torch.Tensor,
    prev_logits: torch.Tensor,
    boxes: torch.Tensor | None = None,
) -> torch.Tensor:
    """Low-res logits (B,1,32,32,32) for one round of prompts."""
    prompt_encoder, mask_decoder = model_parts
    sparse, dense = prompt_encoder(points=(coords, labels), boxes=boxes, masks=prev_logits)
    low, _ = mask_decoder(
        image_embeddings=embedding,
        image_pe=prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=False,
    )
    return low


def prompts_for(
    history: list[list[tuple[np.ndarray, int]]], policy: str, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack each sample's clicks per policy; shorter lists are padded with label -1."""
    chosen = [h[-1:] if policy == "newest" else h for h in history]
    n = max(len(c) for c in chosen)
    coords = torch.zeros(len(chosen), n, 3)
    labels = torch.full((len(chosen), n), -1, dtype=torch.long)
    for b, clicks in enumerate(chosen):
        for j, (p, lab) in enumerate(clicks):
            coords[b, j] = torch.as_tensor(p, dtype=torch.float32)
            labels[b, j] = lab
    return coords.to(device), labels.to(device)


class FinetuneTask(Task):
    name = "finetune"

    def __init__(
        self,
        model: nn.Module,
        n_clicks: int = 5,
        policy: str | None = None,
        box_prob: float = 0.0,
        seed: int = 2023,
    ) -> None:
        super().__init__()
        from monai.losses import DiceCELoss

        self.prompt_encoder = model.prompt_encoder
        self.mask_decoder = model.mask_decoder
        encoder = model.image_encoder.eval().requires_grad_(False)
        self.__dict__["encoder"] = encoder
        self.config = getattr(model, "config", None)
        self.policy = policy or getattr(self.config, "point_policy", "newest")
        if self.policy not in ("newest", "accumulate"):
            raise ValueError(f"point policy must be 'newest' or 'accumulate', got {self.policy!r}")
        if box_prob > 0 and not getattr(self.prompt_encoder, "supports_boxes", False):
            raise ValueError("box training needs box embeddings: build the model with "
                             "num_point_embeddings=4")
        self.n_clicks, self.box_prob, self.seed = n_clicks, box_prob, seed
        self.epoch = 0
        self.loss_fn = DiceCELoss(sigmoid=True, squared_pred=True, reduction="mean")

    def set_progress(self, epoch: int, step: int) -> None:
        self.epoch = epoch

    def meta(self) -> dict[str, Any]:
        return {"model_config": config_to_dict(self.config) if self.config is not None else None,
                "policy": self.policy}

    def prepare(self, batch: dict[str, Any]) -> dict[str, Any]:
        encoder = self.__dict__["encoder"]
        if next(encoder.parameters()).device != batch["image"].device:
            encoder.to(batch["image"].device)
        batch["embedding"] = encoder(batch["image"])
        return batch

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        emb = batch["embedding"]
        gt_t = (batch["label"] > 0.5).float()
        gt = gt_t[:, 0].cpu().numpy().astype(bool)
        ids = batch["id"].tolist()
        dev = emb.device
        gens = [sample_generator(self.seed, self.epoch, i, salt=2) for i in ids]
        # An empty target (a structure flipped or cropped away) gets a negative centre click.
        centre = np.asarray(gt.shape[1:]) // 2
        history = [[(first_click(gt[b], gens[b]), 1)] if gt[b].any() else [(centre, 0)]
                   for b in range(len(ids))]
        boxes = None
        if self.box_prob > 0:
            g = sample_generator(self.seed, self.epoch, ids[0], salt=3)
            if float(torch.rand((), generator=g)) < self.box_prob:
                boxes = torch.as_tensor(np.stack([bbox(m) for m in gt]), device=dev)
        prev = torch.zeros(len(ids), 1, 32, 32, 32, device=dev, dtype=emb.dtype)
        total = torch.zeros(len(ids), device=dev)
        for it in range(self.n_clicks):
            coords, labels = prompts_for(history, self.policy, dev)
            low = decode((self.prompt_encoder, self.mask_decoder), emb, coords, labels, prev, boxes)
            up = F.interpolate(low.float(), size=gt_t.shape[2:], mode="trilinear",
                               align_corners=False)
            total = total + torch.stack(
                [self.loss_fn(up[b : b + 1], gt_t[b : b + 1]) for b in range(len(ids))]
            )
            if it + 1 == self.n_clicks:
                break
            pred = (up.detach() > 0)[:, 0].cpu().numpy()
            for b in range(len(ids)):
                nxt = next_click(gt[b], pred[b], gens[b])
                # A perfect prediction gets a repeat of its last click (nothing left to fix).
                history[b].append(nxt if nxt is not None else history[b][-1])
            prev = low.detach()
        return total / self.n_clicks
