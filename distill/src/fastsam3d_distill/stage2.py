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

from .clicks import (
    bbox,
    device_generators,
    first_click,
    next_click,
    random_error_click,
)
from .distributed import sample_generator
from .engine import Task
from .models import config_to_dict

CLICK_RULES = ("released", "ours")


def dice_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample MONAI ``DiceCELoss(sigmoid=True, squared_pred=True)`` (B,), in one batched
    pass: soft Dice with squared denominators (smoothing 1e-5) + mean BCE on the logits."""
    x, t = logits.float().flatten(1), target.float().flatten(1)
    p = torch.sigmoid(x)
    dice = 1.0 - (2.0 * (p * t).sum(1) + 1e-5) / ((p * p).sum(1) + (t * t).sum(1) + 1e-5)
    return dice + F.binary_cross_entropy_with_logits(x, t, reduction="none").mean(1)


def decode(
    model_parts: tuple[nn.Module, nn.Module],
    embedding: torch.Tensor,
    coords: torch.Tensor | None,
    labels: torch.Tensor | None,
    prev_logits: torch.Tensor,
    boxes: torch.Tensor | None = None,
) -> torch.Tensor:
    """Low-res logits (B,1,32,32,32) for one round of prompts (``coords=None``: the mask
    prompt alone, as the released training's mask-only rounds)."""
    prompt_encoder, mask_decoder = model_parts
    points = None if coords is None else (coords, labels)
    sparse, dense = prompt_encoder(points=points, boxes=boxes, masks=prev_logits)
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
        n_clicks: int = 11,
        policy: str | None = None,
        box_prob: float = 0.0,
        seed: int = 2023,
        clicks: str = "released",
        mask_only_rounds: bool = True,
        detach_prev: bool = False,
        reduction: str = "sum",
        lr_milestones: tuple[int, ...] = (60, 90),
        lr_gamma: float = 0.1,
        mask_only_draw: str = "batch",
    ) -> None:
        super().__init__()
        if clicks not in CLICK_RULES:
            raise ValueError(f"click rule must be one of {CLICK_RULES}, got {clicks!r}")
        if mask_only_draw not in ("batch", "sample"):
            raise ValueError(f"mask_only_draw must be batch or sample, got {mask_only_draw!r}")
        self.mask_only_draw = mask_only_draw
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be sum or mean, got {reduction!r}")
        self.clicks, self.mask_only_rounds = clicks, mask_only_rounds
        # The same parameters train in every step unless boxes are drawn per batch.
        self.static_graph = box_prob <= 0
        self.detach_prev, self.reduction = detach_prev, reduction
        self.lr_milestones, self.lr_gamma = tuple(lr_milestones), lr_gamma
        self.prompt_encoder = model.prompt_encoder
        self.mask_decoder = model.mask_decoder
        encoder = model.image_encoder.eval().requires_grad_(False)
        self.__dict__["encoder"] = encoder
        self.config = getattr(model, "config", None)
        self.policy = policy or getattr(self.config, "point_policy", "newest")
        if self.policy not in ("newest", "accumulate"):
            raise ValueError(f"point policy must be 'newest' or 'accumulate', got {self.policy!r}")
        if box_prob > 0 and not getattr(self.prompt_encoder, "supports_boxes", False):
            raise ValueError(
                "box training needs box embeddings: build the model with num_point_embeddings=4"
            )
        self.n_clicks, self.box_prob, self.seed = n_clicks, box_prob, seed
        self.epoch = 0
        self.step = 0

    def set_progress(self, epoch: int, step: int) -> None:
        self.epoch, self.step = epoch, step

    def lr_factor(self, step: int, epoch: int) -> float:
        """Released: MultiStepLR over epochs (x0.1 at epochs 60 and 90)."""
        return self.lr_gamma ** sum(epoch >= m for m in self.lr_milestones)

    def meta(self) -> dict[str, Any]:
        return {
            "model_config": config_to_dict(self.config) if self.config is not None else None,
            "policy": self.policy,
            "clicks": self.clicks,
            "n_clicks": self.n_clicks,
            "mask_only_rounds": self.mask_only_rounds,
            "mask_only_draw": self.mask_only_draw,
            "detach_prev": self.detach_prev,
            "reduction": self.reduction,
            "lr_milestones": list(self.lr_milestones),
            "box_prob": self.box_prob,
        }

    def prepare(self, batch: dict[str, Any]) -> dict[str, Any]:
        encoder = self.__dict__["encoder"]
        if next(encoder.parameters()).device != batch["image"].device:
            encoder.to(batch["image"].device)
        batch["embedding"] = encoder(batch["image"])
        return batch

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        if self.clicks == "released":
            return self._forward_released(batch)
        return self._forward_ours(batch)

    def _forward_released(self, batch: dict[str, Any]) -> torch.Tensor:
        """Released ``train.py`` interaction: ``n_clicks`` rounds of a uniform random click in
        FN ∪ FP (the first: in the object), the newest click only (or all, per policy); at one
        random round in [2, 8] and at the last the decoder gets the mask prompt alone; the
        previous low-res logits go back in *with* their gradient; DiceCE summed over rounds.
        All on the device; clicks are seeded per sample. The mask-only round is drawn once per
        optimiser step (``mask_only_draw="batch"``, as the released code drew it per batch: one
        decoder pass per round) or per sample (``"sample"``: the batch splits into two
        decoder passes on the rounds where samples differ, ~1.6x the decoder calls)."""
        emb = batch["embedding"]
        gt_t = (batch["label"] > 0.5).float()
        gt = gt_t[:, 0] > 0.5
        ids = [int(i) for i in batch["id"]]
        n = len(ids)
        dev = emb.device
        gens = device_generators(self.seed, self.epoch, ids, dev, salt=2)
        if self.mask_only_draw == "batch":  # one round per optimiser step, as released
            g = sample_generator(self.seed, self.epoch, self.step, salt=5)
            mask_only = [int(torch.randint(2, 9, (1,), generator=g))] * n
        else:
            mask_only = [
                int(
                    torch.randint(
                        2, 9, (1,), generator=sample_generator(self.seed, self.epoch, i, salt=4)
                    )
                )
                for i in ids
            ]
        splits = self._round_splits(mask_only, dev)
        boxes = self._boxes(ids, gt, dev)
        prev = torch.zeros(n, 1, 32, 32, 32, device=dev, dtype=emb.dtype)
        noise = torch.empty(gt.shape, device=dev)  # the click sampler's buffer, every round
        up: torch.Tensor | None = None
        click: tuple[torch.Tensor, torch.Tensor] | None = None
        hist_c: list[torch.Tensor] = []
        hist_l: list[torch.Tensor] = []
        total = torch.zeros(n, device=dev)
        parts = (self.prompt_encoder, self.mask_decoder)
        for r in range(self.n_clicks):
            click = random_error_click(
                gt, None if up is None else up.detach(), gens, click, noise=noise
            )
            hist_c.append(click[0].float())
            hist_l.append(click[1])
            if self.policy == "newest":
                coords, labels = hist_c[-1][:, None], hist_l[-1][:, None]
            else:
                coords, labels = torch.stack(hist_c, 1), torch.stack(hist_l, 1)
            split = splits[r]
            if not isinstance(split, tuple):  # every sample alike: one decoder pass
                low = decode(
                    parts,
                    emb,
                    None if split else coords,
                    None if split else labels,
                    prev,
                    boxes,
                )
            else:  # points for some, the mask prompt alone for the others
                pts, msk, inverse = split
                with_points = decode(
                    parts,
                    emb[pts],
                    coords[pts],
                    labels[pts],
                    prev[pts],
                    None if boxes is None else boxes[pts],
                )
                mask_alone = decode(
                    parts, emb[msk], None, None, prev[msk], None if boxes is None else boxes[msk]
                )
                both = torch.cat([with_points.to(prev.dtype), mask_alone.to(prev.dtype)])
                low = both[inverse]
            up = F.interpolate(
                low.float(), size=gt_t.shape[2:], mode="trilinear", align_corners=False
            )
            total = total + dice_ce(up, gt_t)
            prev = low.detach() if self.detach_prev else low
        return total if self.reduction == "sum" else total / self.n_clicks

    def _round_splits(
        self, mask_only: list[int], dev: torch.device
    ) -> list[bool | tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per round: False (every sample gets points), True (every sample the mask prompt
        alone) or (rows with points, rows without, the inverse order of their
        concatenation) as device index tensors. All rounds' indices travel in one
        non-blocking copy from pinned memory: an index built from a host list per round
        would make the host wait for the GPU twice a round (a pageable copy synchronises)."""
        n = len(mask_only)
        plan: list[Any] = []
        flat: list[int] = []
        for r in range(self.n_clicks):
            alone = [
                self.mask_only_rounds and (r == m or r == self.n_clicks - 1) for m in mask_only
            ]
            if all(alone) or not any(alone):
                plan.append(all(alone))
                continue
            pts = [b for b in range(n) if not alone[b]]
            msk = [b for b in range(n) if alone[b]]
            inverse = np.argsort(np.asarray(pts + msk)).tolist()
            plan.append((len(flat), len(pts), len(msk)))
            flat += pts + msk + inverse
        if not flat:
            return plan
        host = torch.as_tensor(flat, dtype=torch.long)
        if dev.type == "cuda":
            host = host.pin_memory()
        idx = host.to(dev, non_blocking=True)
        out: list[Any] = []
        for p in plan:
            if isinstance(p, tuple):
                o, a, b = p
                out.append(
                    (idx[o : o + a], idx[o + a : o + a + b], idx[o + a + b : o + 2 * (a + b)])
                )
            else:
                out.append(p)
        return out

    def _boxes(self, ids: list[int], gt: torch.Tensor, dev: torch.device) -> torch.Tensor | None:
        if self.box_prob <= 0:
            return None
        g = sample_generator(self.seed, self.epoch, ids[0], salt=3)
        if float(torch.rand((), generator=g)) >= self.box_prob:
            return None
        return torch.as_tensor(np.stack([bbox(m) for m in gt.cpu().numpy()]), device=dev)

    def _forward_ours(self, batch: dict[str, Any]) -> torch.Tensor:
        """Our variant: first click in the object, later clicks in the largest connected error
        region's inner half (CPU, scipy), detached previous logits, per-round DiceCE."""
        emb = batch["embedding"]
        gt_t = (batch["label"] > 0.5).float()
        gt = gt_t[:, 0].cpu().numpy().astype(bool)
        ids = [int(i) for i in batch["id"]]
        dev = emb.device
        gens = [sample_generator(self.seed, self.epoch, i, salt=2) for i in ids]
        # An empty target (a structure flipped or cropped away) gets a negative centre click.
        centre = np.asarray(gt.shape[1:]) // 2
        history = [
            [(first_click(gt[b], gens[b]), 1)] if gt[b].any() else [(centre, 0)]
            for b in range(len(ids))
        ]
        boxes = self._boxes(ids, gt_t[:, 0] > 0.5, dev)
        prev = torch.zeros(len(ids), 1, 32, 32, 32, device=dev, dtype=emb.dtype)
        total = torch.zeros(len(ids), device=dev)
        for it in range(self.n_clicks):
            coords, labels = prompts_for(history, self.policy, dev)
            low = decode((self.prompt_encoder, self.mask_decoder), emb, coords, labels, prev, boxes)
            up = F.interpolate(
                low.float(), size=gt_t.shape[2:], mode="trilinear", align_corners=False
            )
            total = total + dice_ce(up, gt_t)
            if it + 1 == self.n_clicks:
                break
            pred = (up.detach() > 0)[:, 0].cpu().numpy()
            for b in range(len(ids)):
                nxt = next_click(gt[b], pred[b], gens[b])
                # A perfect prediction gets a repeat of its last click (nothing left to fix).
                history[b].append(nxt if nxt is not None else history[b][-1])
            prev = low.detach() if self.detach_prev else low
        return total if self.reduction == "sum" else total / self.n_clicks
