"""``fastsam3d segment``: clicks and/or a box in world coordinates -> a mask file (+ preview)."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

EXIT_NO_WEIGHTS = 3

_PROMPTS_HELP = """\
prompts.json: {"space": "RAS" | "LPS" (default RAS),
               "points": [{"ras": [R, A, S], "positive": true}, ...]   (or [[R, A, S, 1|0], ...]),
               "box": {"min": [R, A, S], "max": [R, A, S]}}            (optional)
A box is applied first, then the points in order."""


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
    p.add_argument("--point", action="append", default=[], metavar="R,A,S[:+|-]",
                   help="a click (repeatable); ':-' marks a negative click (default '+'); "
                        "e.g. --point -12.5,30,4 --point=-10,28,4:-")
    p.add_argument("--box", metavar="R0,A0,S0,R1,A1,S1", help="two opposite box corners")
    p.add_argument("--prompts", metavar="JSON", help="points and/or a box from a JSON file")
    p.add_argument("--lps", action="store_true",
                   help="coordinates on the command line are LPS (ITK/DICOM), not RAS")
    p.add_argument("--out", required=True, help="output mask file (e.g. mask.nii.gz, .nrrd)")
    p.add_argument("--preview", metavar="PNG", help="also write a three-slice preview image")
    p.add_argument("--model", default="fastsam3d",
                   help="registered weights name (default fastsam3d; see `fastsam3d download "
                        "--list`)")
    p.add_argument("--checkpoint", metavar="PATH", help="a checkpoint file instead of --model")
    p.add_argument("--fixture-weights", action="store_true",
                   help="use deterministic untrained weights (offline pipeline check: the mask "
                        "is NOT a segmentation)")
    p.add_argument("--device", default="auto", help="auto (default), cuda, mps, cpu, cuda:1 ...")
    p.add_argument("--max-crops", type=int, default=8,
                   help="most 128^3 crops one object may use (default 8)")
    p.add_argument("--point-policy", choices=("newest", "accumulate"),
                   help="override the model's click policy")
    p.add_argument("--label", type=int, default=1, help="value written for the mask (default 1)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress messages")
    p.add_argument("--server", metavar="URL",
                   help="segment on a `fastsam3d serve` server instead of here (no torch "
                        "needed); the key from --api-key-file or $FASTSAM3D_API_KEY")
    p.add_argument("--api-key-file", metavar="PATH", help="file holding the server's API key")
    p.set_defaults(func=run)
    return p


class _Usage(ValueError):
    pass


def _triple(text: str, what: str) -> list[float]:
    try:
        vals = [float(v) for v in text.split(",")]
    except ValueError:
        raise _Usage(f"{what}: expected numbers like 10.5,-20,33 (got {text!r})") from None
    if len(vals) != 3 or not all(np.isfinite(vals)):
        raise _Usage(f"{what}: expected three finite numbers R,A,S (got {text!r})")
    return vals


def _flip(p: list[float], lps: bool) -> list[float]:
    return [-p[0], -p[1], p[2]] if lps else p


def parse_point(text: str, lps: bool = False) -> tuple[list[float], bool]:
    """``"R,A,S"``, ``"R,A,S:+"`` or ``"R,A,S:-"`` -> (RAS point, positive)."""
    coords, _, sign = text.partition(":")
    if sign not in ("", "+", "-"):
        raise _Usage(f"--point {text!r}: the suffix must be ':+' or ':-'")
    return _flip(_triple(coords, f"--point {text!r}"), lps), sign != "-"


def parse_box(text: str, lps: bool = False) -> tuple[list[float], list[float]]:
    parts = text.split(",")
    if len(parts) != 6:
        raise _Usage(f"--box {text!r}: expected six numbers R0,A0,S0,R1,A1,S1")
    a = _flip(_triple(",".join(parts[:3]), "--box"), lps)
    b = _flip(_triple(",".join(parts[3:]), "--box"), lps)
    return list(np.minimum(a, b)), list(np.maximum(a, b))


def read_prompts(path: str) -> tuple[list[tuple[list[float], bool]], tuple | None]:
    """Points and box from a prompts JSON file (see the command's help)."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise _Usage(f"--prompts: no such file {path}") from None
    except json.JSONDecodeError as e:
        raise _Usage(f"--prompts {path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise _Usage(f"--prompts {path}: expected a JSON object with 'points' and/or 'box'")
    space = str(data.get("space", "RAS")).upper()
    if space not in ("RAS", "LPS"):
        raise _Usage(f"--prompts {path}: space must be RAS or LPS, not {space!r}")
    lps = space == "LPS"
    points = []
    for n, item in enumerate(data.get("points", [])):
        if isinstance(item, dict):
            xyz = item.get("ras", item.get("lps", item.get("position")))
            positive = bool(item.get("positive", True))
        elif isinstance(item, (list, tuple)) and len(item) in (3, 4):
            xyz, positive = item[:3], bool(item[3]) if len(item) == 4 else True
        else:
            raise _Usage(f"--prompts {path}: point {n} must be {{'ras': [R,A,S], "
                         f"'positive': true}} or [R, A, S, 1|0]")
        points.append((_flip(_triple(",".join(map(str, xyz or [])), f"point {n}"), lps),
                       positive))
    box = None
    if data.get("box") is not None:
        b = data["box"]
        try:
            lo = _flip(_triple(",".join(map(str, b["min"])), "box min"), lps)
            hi = _flip(_triple(",".join(map(str, b["max"])), "box max"), lps)
        except (KeyError, TypeError):
            raise _Usage(f"--prompts {path}: box must be {{'min': [R,A,S], 'max': [R,A,S]}}")\
                from None
        box = (list(np.minimum(lo, hi)), list(np.maximum(lo, hi)))
    return points, box


def _no_weights_message(name: str, reason: str) -> str:
    from fastsam3d import hub

    try:
        where = hub.cache_dir(create=False)
    except Exception:  # the message must not fail
        where = "the fastsam3d cache"
    return (
        f"fastsam3d segment: no weights for {name!r}: they are not in the cache ({where}) and "
        f"could not be downloaded ({reason}).\n"
        f"  Get them with:  fastsam3d download {name}   (on a machine with network access; "
        f"copy the file into the cache or use it by path)\n"
        f"  or pass a checkpoint file:  --checkpoint PATH\n"
        f"  (--fixture-weights runs the pipeline offline with untrained weights: not a "
        f"segmentation)"
    )


def _load(args: argparse.Namespace, log: Any) -> Any:
    """The model, or raises _NoWeights with the message to print."""
    from fastsam3d import hub
    from fastsam3d.checkpoint import load_model

    if args.fixture_weights:
        from fastsam3d.testing import fixture_model

        log(f"using FIXTURE weights for {args.model!r}: the output is NOT a segmentation")
        return fixture_model(args.model)
    if args.checkpoint:
        if not Path(args.checkpoint).is_file():
            raise _Usage(f"--checkpoint: no such file {args.checkpoint}")
        log(f"loading {args.checkpoint}")
        return load_model(args.checkpoint)
    try:
        cached = hub.cached_path(args.model)
    except ValueError as e:  # unknown name
        raise _Usage(f"--model: {e}") from None
    if cached is None:
        log(f"weights {args.model!r} are not cached: downloading (once)")
        try:
            hub.download(args.model, progress=not args.quiet)
        except KeyboardInterrupt:
            raise
        except Exception as e:  # no network, proxy, disk: all mean "no weights here"
            raise _NoWeights(_no_weights_message(args.model, str(e).splitlines()[0])) from None
    log(f"loading weights {args.model!r}")
    return load_model(args.model)


class _NoWeights(RuntimeError):
    pass


def _remote_session(args: argparse.Namespace, log: Any) -> Any:
    """A :class:`fastsam3d.RemoteSession` on ``--server`` (the same prompts, the server's model)."""
    from fastsam3d.remote import RemoteSession

    if args.fixture_weights or args.checkpoint or args.model != "fastsam3d":
        raise _Usage("--server uses the server's model: drop --model/--checkpoint/"
                     "--fixture-weights")
    key = None
    if args.api_key_file:
        if not Path(args.api_key_file).is_file():
            raise _Usage(f"--api-key-file: no such file {args.api_key_file}")
        key = Path(args.api_key_file).read_text().strip()
    log(f"connecting to {args.server}")
    session = RemoteSession(args.server, api_key=key, point_policy=args.point_policy,
                            max_crops=args.max_crops)
    log(f"server session on {session.info['model']} ({session.info['device']})")
    return session


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        if not args.quiet:
            print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    from fastsam3d.result import SessionError
    from fastsam3d.volume import Volume, VolumeError

    if not args.server:
        from fastsam3d.session import Session

    try:
        points = [parse_point(p, args.lps) for p in args.point]
        box = parse_box(args.box, args.lps) if args.box else None
        if args.prompts:
            more, fbox = read_prompts(args.prompts)
            points += more
            if fbox is not None:
                if box is not None:
                    raise _Usage("give the box either with --box or in --prompts, not both")
                box = fbox
        if not points and box is None:
            raise _Usage("no prompt: give at least one --point, a --box or --prompts")
        out = Path(args.out)
        if out.exists() and out.resolve() == Path(args.image).resolve():
            raise _Usage("--out is the input image: refusing to overwrite it")
        if not out.parent.exists():
            raise _Usage(f"--out: folder {out.parent} does not exist")
        log(f"reading {args.image}")
        vol = Volume.read(args.image)
        log(f"{vol}")
        if args.server:
            session = _remote_session(args, log)
        else:
            model = _load(args, log)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                session = Session(model, device=args.device, point_policy=args.point_policy,
                                  max_crops=args.max_crops, warmup=False)
        if not args.server and session.device.type == "cpu":
            log("running on the CPU (no CUDA/MPS device): each new crop takes a few tenths of "
                "a second to seconds")
        session.set_volume(vol)
        result = None
        if box is not None:
            log(f"box {np.round(box[0], 1).tolist()} .. {np.round(box[1], 1).tolist()}")
            result = session.add_box(*box)
        for n, (p, positive) in enumerate(points):
            log(f"click {n + 1}/{len(points)} {'+' if positive else '-'} "
                f"RAS {np.round(p, 1).tolist()}")
            result = session.add_point(p, positive=positive)
        assert result is not None
        if args.server:
            session.close()  # frees the server's copy now rather than at its idle timeout
        mask = result.full_mask()
        label = np.zeros(vol.shape, dtype=np.uint8 if 0 <= args.label < 256 else np.int16)
        label[mask] = args.label
        vol.write(out, label)
        ml = result.voxels * float(np.prod(vol.spacing)) / 1000
        log(f"wrote {out}: {result.voxels} voxels ({ml:.1f} mL), {result.crops} crop(s)")
        if result.at_crop_limit:
            log(f"note: the mask reaches the edge of its last crop; the object may continue "
                f"beyond the {args.max_crops}-crop limit (raise --max-crops to follow it)")
        if args.preview:
            from fastsam3d.preview import save_preview

            title = f"{Path(args.image).name}: {result.voxels} voxels, {ml:.1f} mL"
            if args.fixture_weights:
                title += "  [FIXTURE WEIGHTS - NOT A SEGMENTATION]"
            save_preview(vol, mask, args.preview, points=points, box=box, title=title)
            log(f"wrote {args.preview}")
    except _Usage as e:
        print(f"fastsam3d segment: {e}", file=sys.stderr)
        return 2
    except _NoWeights as e:
        print(str(e), file=sys.stderr)
        return EXIT_NO_WEIGHTS
    except (VolumeError, SessionError, FileNotFoundError) as e:
        print(f"fastsam3d segment: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # checkpoint problems and the like: one clear line, no traceback
        if os.environ.get("FASTSAM3D_DEBUG"):
            raise
        print(f"fastsam3d segment: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0
