"""Stage 1: layer-wise progressive distillation of the image encoder.

Default (the FastSAM3D paper): student block i is taught by teacher block 2i, the loss is the
mean over i = 1..k of the feature MSE, k grows on a schedule, and the neck output is matched
throughout. Options reproduce what the released code did instead (prior-art notes §3.2):
``neck`` = MSE of the neck output only (the code at HEAD), ``released-tap`` = one tap at a
time, advancing every few epochs, pairing student block 2j with teacher block 2j.

The teacher is frozen and lives outside the DDP-wrapped module (it is not trained, so it
should not be broadcast or hooked). Its features come online under bf16 autocast, or from a
cache written once by :func:`cache_teacher_features`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from .engine import Task
from .models import DETECT, config_to_dict, detect_teacher_config

LOSS_MODES = ("paper", "paper-mse", "neck", "released-tap")


def tap_pairs(student_depth: int, teacher_depth: int) -> list[tuple[int, int]]:
    """0-based (student block, teacher block) pairs: student i <- teacher r*i (1-based).

    ``r = teacher_depth // student_depth`` (2 for FastSAM3D's 6-from-12).
    """
    if teacher_depth < student_depth or teacher_depth % student_depth:
        raise ValueError(
            f"teacher depth {teacher_depth} must be a multiple of student depth {student_depth}"
        )
    r = teacher_depth // student_depth
    return [(i - 1, r * i - 1) for i in range(1, student_depth + 1)]


def released_tap_pairs(student_depth: int) -> list[tuple[int, int]]:
    """The released code's pairing: student block 2j with teacher block 2j (1-based)."""
    return [(2 * j - 1, 2 * j - 1) for j in range(1, student_depth // 2 + 1)]


@torch.no_grad()
def init_student_from_teacher(student: nn.Module, teacher: nn.Module) -> list[str]:
    """Copy teacher encoder weights into the student wherever names and shapes agree.

    Patch embedding, position embedding and neck copy directly; student block i (1-based)
    takes teacher block r*i, the block it is taught to imitate. Tensors whose shapes differ
    (e.g. rel-pos tables of a different head size) keep their initialisation. Returns the
    student keys that were copied.
    """
    s_depth, t_depth = len(student.blocks), len(teacher.blocks)
    block_map = {s: t for s, t in tap_pairs(s_depth, t_depth)}
    t_sd = teacher.state_dict()
    copied = []
    for key, val in student.state_dict().items():
        src = key
        if key.startswith("blocks."):
            parts = key.split(".")
            parts[1] = str(block_map[int(parts[1])])
            src = ".".join(parts)
        if src in t_sd and t_sd[src].shape == val.shape:
            val.copy_(t_sd[src])
            copied.append(key)
    return copied


def needed_teacher_taps(student_depth: int, teacher_depth: int) -> list[int]:
    """Teacher blocks whose outputs any loss mode uses, in cache order."""
    pairs = tap_pairs(student_depth, teacher_depth) + released_tap_pairs(student_depth)
    return sorted({t for _, t in pairs})


def _mse_per_sample(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.float() - b.float()).pow(2).flatten(1).mean(1)


def _norm_per_sample(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The paper's ||f_t - f_s||: the L2 norm of the whole feature-map difference."""
    return (a.float() - b.float()).flatten(1).norm(dim=1)


class DistillTask(Task):
    """Student encoder + loss. ``prepare`` adds teacher targets unless the batch has them."""

    name = "distill"

    def __init__(
        self,
        student_encoder: nn.Module,
        teacher_encoder: nn.Module | None,
        loss: str = "paper-mse",
        k_start: int = 1,
        k_every_epochs: int = 3,
        k_every_steps: int = 0,
        neck_weight: float = 1.0,
        teacher_depth: int | None = None,
        student_config: Any = None,
    ) -> None:
        super().__init__()
        if loss not in LOSS_MODES:
            raise ValueError(f"unknown distillation loss {loss!r}; use one of {LOSS_MODES}")
        self.student = student_encoder
        # Not registered as a submodule: frozen, not saved in training checkpoints, not DDP'd.
        self.__dict__["teacher"] = teacher_encoder
        if teacher_encoder is not None:
            teacher_encoder.eval().requires_grad_(False)
            teacher_depth = len(teacher_encoder.blocks)
        if teacher_depth is None:
            raise ValueError("give a teacher encoder or teacher_depth (cached features)")
        s_depth = len(student_encoder.blocks)
        self.loss_mode = loss
        self.pairs = tap_pairs(s_depth, teacher_depth)
        self.released_pairs = released_tap_pairs(s_depth)
        # Teacher blocks whose outputs are targets, in a fixed order (also the cache layout).
        self.teacher_taps = needed_teacher_taps(s_depth, teacher_depth)
        self.k_start, self.k_every_epochs = k_start, k_every_epochs
        self.k_every_steps = k_every_steps
        self.neck_weight = neck_weight
        self.k = k_start
        # Every parameter gets a gradient in every step only when the neck is matched (it
        # depends on every block): then DDP can use a static graph and skip the unused search.
        every_param = loss == "neck" or (loss == "paper-mse" and neck_weight > 0)
        self.find_unused = not every_param
        self.static_graph = every_param
        self.student_config = student_config

    def meta(self) -> dict[str, Any]:
        cfg = self.student_config
        return {
            "student_config": config_to_dict(cfg) if cfg is not None else None,
            "loss": self.loss_mode,
            "teacher_taps": self.teacher_taps,
        }

    # schedule --------------------------------------------------------------------------------

    def set_progress(self, epoch: int, step: int) -> None:
        if self.k_every_steps:
            grown = step // self.k_every_steps
        else:
            grown = epoch // max(self.k_every_epochs, 1)
        limit = (
            len(self.pairs) if self.loss_mode.startswith("paper") else len(self.released_pairs) + 1
        )
        self.k = min(self.k_start + grown, limit)

    def scalars(self) -> dict[str, float]:
        return {} if self.loss_mode == "neck" else {"distill/k": float(self.k)}

    # targets ---------------------------------------------------------------------------------

    def teacher_targets(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(taps (B, T, 8, 8, 8, C), neck (B, 384, 8, 8, 8)) for ``self.teacher_taps``."""
        teacher = self.__dict__["teacher"]
        if teacher is None:
            raise RuntimeError("no teacher: the batch must carry cached teacher features")
        neck, taps = teacher(image, return_taps=True)
        return torch.stack([taps[t] for t in self.teacher_taps], 1), neck

    def prepare(self, batch: dict[str, Any]) -> dict[str, Any]:
        if "t_taps" not in batch:
            teacher = self.__dict__["teacher"]
            if teacher is not None and next(teacher.parameters()).device != batch["image"].device:
                teacher.to(batch["image"].device)
            batch["t_taps"], batch["t_neck"] = self.teacher_targets(batch["image"])
        return batch

    # loss --------------------------------------------------------------------------------------

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        mode = self.loss_mode
        x = batch["image"]
        t_taps, t_neck = batch["t_taps"], batch["t_neck"]
        col = {t: c for c, t in enumerate(self.teacher_taps)}
        if mode == "neck":
            return _mse_per_sample(self.student(x), t_neck)
        neck, taps = self.student(x, return_taps=True)
        if mode == "paper":  # (1/k) sum_i ||f_t^(2i) - f_s^(i)||, exactly as printed
            terms = [_norm_per_sample(taps[s], t_taps[:, col[t]]) for s, t in self.pairs[: self.k]]
            return torch.stack(terms, 0).mean(0)
        if mode == "paper-mse":  # ours: MSE per pair, plus the neck (all blocks learn at once)
            terms = [_mse_per_sample(taps[s], t_taps[:, col[t]]) for s, t in self.pairs[: self.k]]
            loss = torch.stack(terms, 0).mean(0)
            if self.neck_weight > 0:
                loss = loss + self.neck_weight * _mse_per_sample(neck, t_neck)
            return loss
        # released-tap: one tap at a time; once past the last block tap, the neck.
        if self.k <= len(self.released_pairs):
            s, t = self.released_pairs[self.k - 1]
            return _mse_per_sample(taps[s], t_taps[:, col[t]])
        return _mse_per_sample(neck, t_neck)


# ----------------------------------------------------------------------------- feature cache


CACHE_FORMAT = "fastsam3d-distill-cache/2"


def _sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def teacher_identity(args: Any) -> dict[str, Any]:
    """What identifies a teacher: the file's SHA-256 and the config it runs with, or the
    fixture/random spec with its overrides."""
    spec = args.teacher
    if spec is None:
        raise ValueError("give --teacher (a SAM-Med3D-turbo checkpoint) or --preset tiny")
    if spec.startswith(("fixture:", "random:")):
        return {"spec": spec, "overrides": sorted(args.teacher_override or [])}
    if not Path(spec).is_file():
        raise FileNotFoundError(f"teacher checkpoint {spec} not found")
    config = args.teacher_config
    if config == DETECT:  # the resolved name: a cache made with that name explicitly still fits
        config = detect_teacher_config(spec).name
    return {"sha256": _sha256(spec), "config": config}


def data_identity(dataset: Any, args: Any) -> str:
    """A hash of the data a cache was made from: the case list, each file's size and
    modification time, and the sample index (structures and their sizes)."""
    if getattr(args, "synthetic", 0):
        key: Any = {"synthetic": args.synthetic, "seed": args.seed}
    else:
        files = [(c.image, c.label) for c in dataset.cases]
        stats = [[os.stat(f).st_size, os.stat(f).st_mtime_ns] for pair in files for f in pair]
        key = {
            "files": files,
            "stats": stats,
            "samples": [[x.case, x.value, x.voxels] for x in dataset.samples],
        }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def cache_manifest(
    args: Any, dataset: Any, taps: list[int], teacher_depth: int, bf16: bool
) -> dict[str, Any]:
    """Everything that decides a cache's contents; a cache is reused only if all agree."""
    return {
        "format": CACHE_FORMAT,
        "teacher": teacher_identity(args),
        "data_sha256": data_identity(dataset, args),
        "n": len(dataset),
        "classes": args.classes,
        "min_voxels": args.min_voxels,
        "lattice_anchor": args.lattice_anchor,
        "precision": "bf16" if bf16 else "fp32",
        "teacher_taps": list(taps),
        "teacher_depth": teacher_depth,
    }


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    from fastsam3d.atomic import atomic_path

    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(obj, indent=1))


@torch.no_grad()
def cache_teacher_features(
    teacher_encoder: nn.Module,
    dataset: Dataset,
    out_dir: str | Path,
    teacher_taps: list[int],
    device: str | torch.device = "cpu",
    batch_size: int = 4,
    bf16: bool = True,
    rank: int = 0,
    world: int = 1,
    manifest: dict[str, Any] | None = None,
) -> Path:
    """Run the teacher once over ``dataset`` (un-augmented crops) and store its targets.

    One file per sample holding only that sample: the crop and the targets, all in bf16 (the
    crop is rounded to bf16 *before* the teacher sees it, so student and teacher inputs stay
    identical). With ``world > 1`` each rank writes every world-th sample. With a
    ``manifest`` (what made the cache: teacher, data, classes, lattice, precision) a restart
    keeps the files of the same settings and anything else is refused: a cache never mixes
    two teachers or two data sets.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    index = out / "index.json"
    if manifest is not None:
        if index.exists():
            old = {k: v for k, v in json.loads(index.read_text()).items() if k != "complete"}
            if old != manifest:
                diff = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
                raise ValueError(
                    f"{out} holds a feature cache made with other settings "
                    f"({', '.join(diff)} differ); use a new --out"
                )
        elif any(out.glob("*.pt")):
            raise ValueError(
                f"{out} holds feature files without a manifest (another cache or "
                "an older version); use a new --out"
            )
        elif rank == 0:
            _write_json(index, {**manifest, "complete": False})
    teacher_encoder = teacher_encoder.to(device).eval()
    dev = torch.device(device)
    todo = [i for i in range(rank, len(dataset), world) if not (out / f"{i:07d}.pt").exists()]
    for b in range(0, len(todo), batch_size):
        idx = todo[b : b + batch_size]
        items = [dataset[i] for i in idx]
        image = torch.stack([it["image"] for it in items]).to(dev).to(torch.bfloat16)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            neck, taps = teacher_encoder(image.float(), return_taps=True)
        sel = torch.stack([taps[t] for t in teacher_taps], 1).to(torch.bfloat16).cpu()
        neck = neck.to(torch.bfloat16).cpu()
        image = image.cpu()
        for j, i in enumerate(idx):
            # clone: a view would save the whole batch's storage into every file
            rec = {"image": image[j].clone(), "t_taps": sel[j].clone(), "t_neck": neck[j].clone()}
            tmp = out / f".{i:07d}.pt.tmp"
            torch.save(rec, tmp)
            tmp.replace(out / f"{i:07d}.pt")
    if world > 1 and torch.distributed.is_initialized():
        torch.distributed.barrier()  # every rank's files are on disk before "complete"
    if rank == 0:
        meta = manifest or {
            "n": len(dataset),
            "teacher_taps": list(teacher_taps),
            "teacher_depth": len(teacher_encoder.blocks),
        }
        _write_json(index, {**meta, "complete": True})
    return out


class CachedFeatureDataset(Dataset):
    """Samples written by :func:`cache_teacher_features`; ``preload`` keeps them in memory
    (optionally on a device, for benchmarks of pure GPU work)."""

    def __init__(
        self, cache_dir: str | Path, preload: bool = False, device: str | None = None
    ) -> None:
        self.dir = Path(cache_dir)
        meta_path = self.dir / "index.json"
        if not meta_path.exists():
            raise FileNotFoundError(f"{meta_path} missing: run the cache step first")
        self.meta = json.loads(meta_path.read_text())
        if not self.meta.get("complete", True):
            raise ValueError(
                f"feature cache {self.dir} is incomplete (its `cache` run did not "
                "finish); re-run the same `cache` command to complete it"
            )
        self.n = int(self.meta["n"])
        self.teacher_taps = list(self.meta["teacher_taps"])
        missing = [i for i in range(self.n) if not (self.dir / f"{i:07d}.pt").exists()]
        if missing:
            raise FileNotFoundError(
                f"feature cache {self.dir} lacks {len(missing)} samples "
                f"(first: {missing[0]}); re-run the cache step"
            )
        self.items: list[dict[str, torch.Tensor]] | None = None
        self.direct_batches = preload
        if preload:
            self.items = [self._read(i) for i in range(self.n)]
            if device is not None:
                self.items = [{k: v.to(device) for k, v in it.items()} for it in self.items]

    def check_teacher(self, identity: dict[str, Any]) -> None:
        """Refuse a cache made by another teacher (or one that does not record its teacher)."""
        made_by = self.meta.get("teacher")
        if made_by is None:
            raise ValueError(
                f"feature cache {self.dir} does not record its teacher (an older "
                "version made it); re-run `cache` into a new folder"
            )
        if made_by != identity:
            raise ValueError(
                f"feature cache {self.dir} was made by teacher {made_by}, not by "
                f"this --teacher {identity}; use the same teacher or re-run `cache`"
            )

    def _read(self, i: int) -> dict[str, torch.Tensor]:
        return torch.load(self.dir / f"{i:07d}.pt", map_location="cpu", weights_only=True)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        rec = self.items[i] if self.items is not None else self._read(i)
        return {
            "image": rec["image"].float(),
            "t_taps": rec["t_taps"],
            "t_neck": rec["t_neck"],
            "id": i,
        }

    def get_batch(self, idx: list[int], epoch: int) -> dict[str, Any]:
        """Batching straight from the preloaded tensors (no DataLoader round trip)."""
        assert self.items is not None
        its = [self.items[i] for i in idx]
        return {
            "image": torch.stack([it["image"] for it in its]).float(),
            "t_taps": torch.stack([it["t_taps"] for it in its]),
            "t_neck": torch.stack([it["t_neck"] for it in its]),
            "id": torch.as_tensor(idx),
        }
