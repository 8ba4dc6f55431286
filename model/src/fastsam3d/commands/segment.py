"""``fastsam3d segment``: clicks and/or a box in world coordinates -> a mask file (+ preview)."""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from fastsam3d.atomic import same_file
from fastsam3d.errors import CommandError, UsageError

EXIT_NO_WEIGHTS = 3

_PROMPTS_HELP = """\
prompts.json (strict: unknown keys, strings for numbers or booleans are errors):
  {"space": "RAS" | "LPS",                 (optional, default RAS; for "position", lists, box)
   "points": [{"ras": [R, A, S], "positive": true},    keyed "ras": RAS
              {"lps": [L, P, S], "positive": false},   keyed "lps": LPS
              {"position": [x, y, z]},                 keyed "position": in "space"
              [x, y, z, true|false|1|0], ...],         a list: in "space"
   "box": {"min": [x, y, z], "max": [x, y, z]}}        (optional, in "space")
A box is applied first, then the points in order. With the released weights a box has no
embedding of its own: it places a positive click at its centre and the mask is clipped to it.

Outputs: --out must be a format that keeps the 3D geometry (.nii, .nii.gz, .nrrd, .nhdr, .mha,
.mhd, .dcm; a sheared image: NIfTI only); files are written beside their destination and
renamed into place when complete, never over an input. Refusals: docs/inputs.md."""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "segment",
        help="segment one object in a 3D image from clicks / a box (world coordinates, mm)",
        description=(
            "Segment one object in IMAGE (NIfTI, NRRD, MHA, ... or a DICOM folder) from "
            "positive/negative clicks and/or a box given in world millimetres (RAS, as Slicer "
            "shows them; --lps for ITK/DICOM coordinates), and write the mask with the image's "
            "geometry."
        ),
        epilog=_PROMPTS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # RAS coordinates are often negative: let "-12.5,3,40" be a value, not an option
    # (argparse's private matcher; `--point=-12.5,3,40` works everywhere regardless)
    if hasattr(p, "_negative_number_matcher"):
        p._negative_number_matcher = re.compile(r"^-\.?\d")
    p.add_argument("image", help="input image file or DICOM folder")
    p.add_argument(
        "--series",
        metavar="UID",
        help="the DICOM series to read when the folder holds several (its UID, or "
        "its number in the list the command prints)",
    )
    p.add_argument(
        "--point",
        action="append",
        default=[],
        metavar="R,A,S[:+|-]",
        help="a click (repeatable); ':-' marks a negative click (default '+'); "
        "e.g. --point -12.5,30,4 --point=-10,28,4:-",
    )
    p.add_argument("--box", metavar="R0,A0,S0,R1,A1,S1", help="two opposite box corners")
    p.add_argument("--prompts", metavar="JSON", help="points and/or a box from a JSON file")
    p.add_argument(
        "--lps",
        action="store_true",
        help="coordinates on the command line are LPS (ITK/DICOM), not RAS",
    )
    p.add_argument("--out", required=True, help="output mask file (e.g. mask.nii.gz, .nrrd)")
    p.add_argument("--preview", metavar="PNG", help="also write a three-slice preview image")
    p.add_argument(
        "--model",
        default="fastsam3d",
        help="registered weights name (default fastsam3d; see `fastsam3d download --list`)",
    )
    p.add_argument("--checkpoint", metavar="PATH", help="a checkpoint file instead of --model")
    p.add_argument(
        "--fixture-weights",
        action="store_true",
        help="use deterministic untrained weights (offline pipeline check: the mask "
        "is NOT a segmentation)",
    )
    p.add_argument("--device", default="auto", help="auto (default), cuda, mps, cpu, cuda:1 ...")
    p.add_argument(
        "--backend",
        choices=("auto", "torch", "onnxruntime"),
        default="auto",
        help="torch, or onnxruntime (no PyTorch needed: fastsam3d[onnx]); auto (default): "
        "torch when installed, else onnxruntime",
    )
    p.add_argument(
        "--max-crops",
        type=int,
        default=8,
        metavar="N",
        help="most 128^3 crops one object may use (default 8)",
    )
    p.add_argument(
        "--point-policy", choices=("newest", "accumulate"), help="override the model's click policy"
    )
    p.add_argument(
        "--label", type=int, default=1, help="value written for the mask, 1..65535 (default 1)"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress messages")
    p.add_argument(
        "--server",
        metavar="URL",
        help="segment on a `fastsam3d serve` server instead of here (no torch "
        "needed); the key from --api-key-file or $FASTSAM3D_API_KEY",
    )
    p.add_argument("--api-key-file", metavar="PATH", help="file holding the server's API key")
    p.set_defaults(func=run)
    return p


def _triple(text: str, what: str) -> list[float]:
    try:
        vals = [float(v) for v in text.split(",")]
    except ValueError:
        raise UsageError(f"{what}: expected numbers like 10.5,-20,33 (got {text!r})") from None
    if len(vals) != 3 or not all(np.isfinite(vals)):
        raise UsageError(f"{what}: expected three finite numbers R,A,S (got {text!r})")
    return vals


def _flip(p: list[float], lps: bool) -> list[float]:
    return [-p[0] + 0.0, -p[1] + 0.0, p[2]] if lps else p  # + 0.0: no "-0.0" in the log


def parse_point(text: str, lps: bool = False) -> tuple[list[float], bool]:
    """``"R,A,S"``, ``"R,A,S:+"`` or ``"R,A,S:-"`` -> (RAS point, positive)."""
    coords, _, sign = text.partition(":")
    if sign not in ("", "+", "-"):
        raise UsageError(f"--point {text!r}: the suffix must be ':+' or ':-'")
    return _flip(_triple(coords, f"--point {text!r}"), lps), sign != "-"


def parse_box(text: str, lps: bool = False) -> tuple[list[float], list[float]]:
    parts = text.split(",")
    if len(parts) != 6:
        raise UsageError(f"--box {text!r}: expected six numbers R0,A0,S0,R1,A1,S1")
    a = _flip(_triple(",".join(parts[:3]), "--box"), lps)
    b = _flip(_triple(",".join(parts[3:]), "--box"), lps)
    return list(np.minimum(a, b)), list(np.maximum(a, b))


def read_prompts(path: str) -> tuple[list[tuple[list[float], bool]], tuple | None]:
    """Points and box (RAS) from a prompts JSON file (schema: :mod:`fastsam3d.prompts`)."""
    from fastsam3d.prompts import PromptError
    from fastsam3d.prompts import read_prompts as read

    try:
        prompts = read(path)
    except PromptError as e:
        raise UsageError(f"--prompts {e}") from None
    box = None if prompts.box is None else (list(prompts.box[0]), list(prompts.box[1]))
    return [(list(p), positive) for p, positive in prompts.points], box


def _no_weights_message(name: str, reason: str) -> str:
    from fastsam3d import hub

    try:
        where = hub.cache_dir(create=False)
    except Exception:  # the message must not fail
        where = "the fastsam3d cache"
    return (
        f"no weights for {name!r}: they are not in the cache ({where}) and "
        f"could not be downloaded ({reason}).\n"
        f"  Get them with:  fastsam3d download {name}   (on a machine with network access; "
        f"copy the file into the cache or use it by path)\n"
        f"  or pass a checkpoint file:  --checkpoint PATH\n"
        f"  (--fixture-weights runs the pipeline offline with untrained weights: not a "
        f"segmentation)"
    )


def load_network(args: argparse.Namespace, log: Any) -> Any:
    """The model (a torch-free runner for ``--backend onnxruntime``), or a CommandError (status
    ``EXIT_NO_WEIGHTS``) saying how to get it. ``fastsam3d serve`` loads through it too, so both
    commands share one set of weights rules."""
    from fastsam3d import hub

    if args.backend == "onnxruntime":
        from fastsam3d.onnx import torch_free_runner
        from fastsam3d.weights import get_weights

        def load_model(weights: Any) -> Any:  # a file, or a registry name now in the cache
            if isinstance(weights, Path):
                return torch_free_runner(weights)
            # the name's config: sam-med3d-turbo-fastsam3d-block shares sam-med3d-turbo's file
            return torch_free_runner(hub.cached_path(weights), config=get_weights(weights).config)
    else:
        from fastsam3d.checkpoint import load_model

    if args.fixture_weights:
        from fastsam3d.testing import fixture_model

        log(f"using FIXTURE weights for {args.model!r}: the output is NOT a segmentation")
        return fixture_model(args.model)
    if args.checkpoint:
        log(f"loading {args.checkpoint}")
        return load_model(Path(args.checkpoint))  # a file, even one named like a registry entry
    try:
        cached = hub.cached_path(args.model)
    except ValueError as e:  # unknown name (check_args has refused those already)
        raise UsageError(f"--model: {e}") from None
    if cached is None:
        log(f"weights {args.model!r} are not cached: downloading (once)")
        try:
            hub.download(args.model, progress=not args.quiet)
        except KeyboardInterrupt:
            raise
        except Exception as e:  # no network, proxy, disk: all mean "no weights here"
            raise CommandError(
                _no_weights_message(args.model, str(e).splitlines()[0]), EXIT_NO_WEIGHTS
            ) from None
    log(f"loading weights {args.model!r}")
    return load_model(args.model)


def _input_files(args: argparse.Namespace) -> list[Path]:
    image = Path(args.image)
    files = sorted(p for p in image.iterdir() if p.is_file()) if image.is_dir() else [image]
    return files + [Path(p) for p in (args.prompts, args.checkpoint) if p]


def _check_output(path: Path, option: str, inputs: list[Path]) -> None:
    for src in inputs:
        if same_file(path, src):
            raise UsageError(
                f"{option} {path} is the input {src} (the same file): refusing to "
                "write over an input"
            )
    if path.is_dir():
        raise UsageError(f"{option} {path} is a folder; give a file name")
    parent = path.parent
    if not parent.is_dir():
        raise UsageError(f"{option}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{option}: folder {parent} is not writable")


def check_args(args: argparse.Namespace) -> None:
    """Every argument that can be checked without reading the image or loading the model."""
    from fastsam3d.volume import VolumeError, check_output

    if not 1 <= args.label <= 65535:
        raise UsageError(f"--label {args.label}: must be 1..65535 (0 is the background)")
    if args.max_crops < 1:
        raise UsageError(f"--max-crops {args.max_crops}: must be at least 1")
    _check_backend(args)
    if args.device != "auto" and args.backend == "torch":
        import torch

        try:
            dev = torch.device(args.device)
        except (RuntimeError, ValueError):
            dev = None
        if dev is None or dev.type not in ("cpu", "cuda", "mps"):
            raise UsageError(f"--device {args.device!r}: expected auto, cpu, cuda, cuda:N or mps")
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"--device {args.device}: no CUDA device is available here")
        if dev.type == "mps" and not torch.backends.mps.is_available():
            raise UsageError(f"--device {args.device}: no MPS device is available here")
    if args.checkpoint and not Path(args.checkpoint).is_file():
        raise UsageError(f"--checkpoint: no such file {args.checkpoint}")
    if not args.checkpoint and not args.fixture_weights:
        from fastsam3d.weights import get_weights

        try:
            get_weights(args.model)
        except ValueError as e:
            hint = ""
            if Path(args.model).suffix or os.sep in args.model or Path(args.model).exists():
                hint = f"; for a checkpoint file use --checkpoint {args.model}"
            raise UsageError(f"--model: {e}{hint}") from None
    out = Path(args.out)
    try:
        check_output(out)
    except VolumeError as e:
        raise UsageError(f"--out: {e}") from None
    inputs = _input_files(args)
    _check_output(out, "--out", inputs)
    if args.preview:
        png = Path(args.preview)
        if same_file(png, out):
            raise UsageError("--preview and --out are the same file; give them different names")
        _check_output(png, "--preview", inputs)
        if png.suffix.lower() != ".png":
            raise UsageError(f"--preview {png}: the preview is a PNG image; name it *.png")


def _check_backend(args: argparse.Namespace) -> None:
    """Resolve ``--backend auto`` (torch when installed) and refuse what ONNX Runtime cannot do."""
    import importlib.util

    def have(name: str) -> bool:
        try:
            return importlib.util.find_spec(name) is not None
        except ImportError:  # a finder that refuses it
            return False

    if args.server:
        return
    if args.backend == "auto":
        args.backend = "torch" if have("torch") else "onnxruntime"
    if args.backend == "onnxruntime":
        if not have("onnxruntime"):
            raise UsageError(
                "--backend onnxruntime: onnxruntime is not installed (pip install "
                "'fastsam3d[onnx]'); or install PyTorch: pip install 'fastsam3d[torch]'"
            )
        if args.fixture_weights:
            raise UsageError(
                "--fixture-weights builds its network with PyTorch: use --backend torch"
                + ("" if have("torch") else " (pip install 'fastsam3d[torch]')")
            )
        if args.device not in ("auto", "cpu"):
            raise UsageError(
                f"--device {args.device}: with --backend onnxruntime the device follows the "
                "installed onnxruntime's providers (FASTSAM3D_ORT_PROVIDERS); use auto"
            )
    elif not have("torch"):
        raise UsageError(
            "--backend torch: PyTorch is not installed (pip install 'fastsam3d[torch]'); "
            "without it use --backend onnxruntime (pip install 'fastsam3d[onnx]')"
        )


def _extent(vol: Any) -> str:
    corners = (
        np.array(np.meshgrid(*[[-0.5, n - 0.5] for n in vol.shape[::-1]], indexing="ij"))
        .reshape(3, -1)
        .T
    )
    ras = vol.ijk_to_ras_points(corners)
    lo, hi = ras.min(axis=0), ras.max(axis=0)
    return ", ".join(f"{a} {x:.1f}..{y:.1f}" for a, x, y in zip("RAS", lo, hi))


def _check_prompts_inside(vol: Any, points: list, box: Any, lps: bool) -> None:
    """Clicks outside the image (and boxes missing it) refused before the model loads."""
    from fastsam3d.volume import VolumeError

    for n, (p, _) in enumerate(points):
        if not vol.contains(p):
            mirrored = [-p[0] + 0.0, -p[1] + 0.0, p[2]]
            hint = ""
            if vol.contains(mirrored):
                hint = (
                    " (with R and A negated it would be inside: were the coordinates "
                    f"{'RAS' if lps else 'LPS'}? then {'drop' if lps else 'add'} --lps)"
                )
            raise VolumeError(
                f"click {n + 1} at RAS {np.round(p, 2).tolist()} lies outside the "
                f"volume (extent RAS mm: {_extent(vol)}){hint}"
            )
    if box is not None:
        for n, (p, _) in enumerate(points):
            if np.any(np.asarray(p) < box[0]) or np.any(np.asarray(p) > box[1]):
                raise VolumeError(
                    f"click {n + 1} at RAS {np.round(p, 2).tolist()} lies outside "
                    f"the box {np.round(box[0], 1).tolist()} .. "
                    f"{np.round(box[1], 1).tolist()}: the mask is clipped to the "
                    "box, so clicks must be inside it"
                )
        corners = np.array(np.meshgrid(*zip(box[0], box[1]), indexing="ij")).reshape(3, -1).T
        ijk = vol.ras_to_ijk(corners)
        size = np.array(vol.shape[::-1]) - 0.5
        if np.any(ijk.max(axis=0) < -0.5) or np.any(ijk.min(axis=0) >= size):
            raise VolumeError(
                f"the box {np.round(box[0], 1).tolist()} .. "
                f"{np.round(box[1], 1).tolist()} does not overlap the volume "
                f"(extent RAS mm: {_extent(vol)})"
            )


def _remote_session(args: argparse.Namespace, log: Any) -> Any:
    """A :class:`fastsam3d.RemoteSession` on ``--server`` (the same prompts, the server's model)."""
    from fastsam3d.remote import RemoteSession

    if args.fixture_weights or args.checkpoint or args.model != "fastsam3d":
        raise UsageError(
            "--server uses the server's model: drop --model/--checkpoint/--fixture-weights"
        )
    key = None
    if args.api_key_file:
        if not Path(args.api_key_file).is_file():
            raise UsageError(f"--api-key-file: no such file {args.api_key_file}")
        key = Path(args.api_key_file).read_text().strip()
    log(f"connecting to {args.server}")
    session = RemoteSession(
        args.server, api_key=key, point_policy=args.point_policy, max_crops=args.max_crops
    )
    log(f"server session on {session.info['model']} ({session.info['device']})")
    return session


def run(args: argparse.Namespace) -> int:
    """Validate everything cheap first (prompts, options, output paths), then read the image
    and check the prompts and output format against it, and only then load the model."""
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = _show_warning
        return _run(args)


def _show_warning(
    message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None
) -> None:
    print(f"fastsam3d segment: warning: {message}", file=sys.stderr, flush=True)


def _run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        if not args.quiet:
            print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    from fastsam3d.volume import Volume, VolumeError, check_output

    if not args.server:
        from fastsam3d.session import Session

    points = [parse_point(p, args.lps) for p in args.point]
    box = parse_box(args.box, args.lps) if args.box else None
    if args.prompts:
        more, fbox = read_prompts(args.prompts)
        points += more
        if fbox is not None:
            if box is not None:
                raise UsageError("give the box either with --box or in --prompts, not both")
            box = fbox
    if not points and box is None:
        raise UsageError("no prompt: give at least one --point, a --box or --prompts")
    if box is None and not any(positive for _, positive in points):
        raise UsageError(
            "only negative clicks: start with a positive click (or a box) on the "
            "object; negative clicks only remove parts of it"
        )
    check_args(args)
    out = Path(args.out)
    log(f"reading {args.image}")
    vol = Volume.read(args.image, series=args.series)
    log(f"{vol}; extent RAS mm: {_extent(vol)}")
    try:
        check_output(out, vol.ijk_to_ras)
    except VolumeError as e:
        raise UsageError(f"--out: {e}") from None
    _check_prompts_inside(vol, points, box, args.lps)
    if args.server:
        session = _remote_session(args, log)
    else:
        from fastsam3d.lattice import Lattice

        Lattice.for_volume(vol.ijk_to_ras, vol.shape)  # too small an image, absurd voxel sizes
        model = load_network(args, log)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            session = Session(
                model,
                device=args.device,
                point_policy=args.point_policy,
                max_crops=args.max_crops,
                warmup=False,
            )
    if not args.server and getattr(session.device, "type", session.device) == "cpu":
        log(
            "running on the CPU (no CUDA/MPS device): each new crop takes a few tenths of "
            "a second to seconds"
        )
    session.set_volume(vol)
    result = None
    if box is not None:
        log(f"box {np.round(box[0], 1).tolist()} .. {np.round(box[1], 1).tolist()}")
        result = session.add_box(*box)
    for n, (p, positive) in enumerate(points):
        log(f"click {n + 1}/{len(points)} {'+' if positive else '-'} RAS {np.round(p, 1).tolist()}")
        result = session.add_point(p, positive=positive)
    assert result is not None
    if args.server:
        session.close()  # frees the server's copy now rather than at its idle timeout
    mask = result.full_mask()
    label = np.zeros(vol.shape, dtype=np.uint8 if args.label < 256 else np.uint16)
    label[mask] = args.label
    vol.write(out, label)
    ml = result.voxels * float(np.prod(vol.spacing)) / 1000
    log(f"wrote {out}: {result.voxels} voxels ({ml:.1f} mL), {result.crops} crop(s)")
    if not result.voxels:
        log(
            "note: the mask is empty: try a click nearer the object's centre, or fewer "
            "negative clicks"
        )
    if result.at_crop_limit:
        log(
            f"note: the mask reaches the edge of its last crop; the object may continue "
            f"beyond the {args.max_crops}-crop limit (raise --max-crops to follow it)"
        )
    if args.preview:
        from fastsam3d.preview import save_preview

        title = f"{Path(args.image).name}: {result.voxels} voxels, {ml:.1f} mL"
        if args.fixture_weights:
            title += "  [FIXTURE WEIGHTS - NOT A SEGMENTATION]"
        from fastsam3d.atomic import atomic_path

        with atomic_path(args.preview) as tmp:
            save_preview(vol, mask, tmp, points=points, box=box, title=title)
        log(f"wrote {args.preview}")
    return 0
