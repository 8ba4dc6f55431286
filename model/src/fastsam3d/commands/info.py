"""``fastsam3d info``: versions, devices, model configs and the weights cache, at a glance.

Meant as the first thing to run (and to paste into bug reports), so it must stay fast and must
not fail: every probe is guarded and nothing is hashed unless ``--verify`` asks for it.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from collections.abc import Callable

from fastsam3d import hub
from fastsam3d.commands.download import format_size, state_text
from fastsam3d.weights import list_weights


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "info",
        help="show versions, devices, model configs and cached weights",
        description="Show versions, devices, model configs and the state of the weights cache.",
    )
    p.add_argument("--verify", action="store_true", help="re-hash cached weights (slower)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=run)
    return p


def _package_version() -> str:
    try:
        import fastsam3d

        return str(fastsam3d.__version__)
    except Exception:  # a half-installed package must not stop info
        pass
    try:
        from importlib.metadata import version

        return version("fastsam3d")
    except Exception:
        return "unknown"


def _devices() -> dict:
    try:
        import torch
    except Exception as e:
        return {"torch": None, "error": f"torch cannot be imported: {e}"}
    out: dict = {
        "torch": torch.__version__,
        "cpu": {
            "threads": torch.get_num_threads(),
            "capability": _guard(lambda: torch.backends.cpu.get_cpu_capability()),
        },
        "cuda": [],
        "mps": False,
    }
    try:
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                prop = torch.cuda.get_device_properties(i)
                out["cuda"].append(
                    {
                        "index": i,
                        "name": prop.name,
                        "capability": f"{prop.major}.{prop.minor}",
                        "memory_gib": round(prop.total_memory / 2**30, 1),
                    }
                )
    except Exception as e:  # a broken driver must not hide the rest
        out["cuda_error"] = str(e)
    mps = getattr(torch.backends, "mps", None)
    out["mps"] = bool(_guard(lambda: mps is not None and mps.is_available()))
    return out


def _onnxruntime() -> dict | None:
    """The ONNX Runtime engine (``fastsam3d[onnx]``: segments without PyTorch), or None."""
    try:
        import onnxruntime
    except Exception:
        return None
    providers = _guard(onnxruntime.get_available_providers)
    return {"version": str(onnxruntime.__version__), "providers": list(providers or [])}


def _guard(fn: Callable[[], object]) -> object:
    try:
        return fn()
    except Exception:
        return None


def _models() -> list[str] | str:
    try:
        from fastsam3d.configs import list_configs

        return [c.name for c in list_configs()]
    except Exception as e:
        return f"unavailable ({e})"


def collect(verify: bool = False) -> dict:
    """Everything ``info`` shows, as plain data (the Slicer module can show the same)."""
    weights = []
    for w in list_weights():
        st = hub.cache_status(w.name, verify=verify)
        weights.append(
            {
                "name": w.name,
                "config": w.config,
                "file": str(st.path),
                "present": st.present,
                "size": st.size,
                "sha256": st.recorded_sha256,
                "verified": st.verified,
                "state": state_text(st),
            }
        )
    return {
        "fastsam3d": _package_version(),
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        **_devices(),
        "onnxruntime": _onnxruntime(),
        "models": _models(),
        "cache_dir": str(hub.cache_dir(create=False)),
        "cache_env": hub.ENV_CACHE,
        "weights": weights,
    }


def run(args: argparse.Namespace) -> int:
    data = collect(verify=args.verify)
    if args.json:
        json.dump(data, sys.stdout, indent=2)
        print()
        return 0
    print(f"fastsam3d {data['fastsam3d']}  (python {data['python']}, {data['platform']})")
    if data.get("torch") is None:
        print(f"torch:    {data.get('error')} (the PyTorch engine: pip install 'fastsam3d[torch]')")
    else:
        cpu = data["cpu"]
        print(f"torch:    {data['torch']}")
        devices = [f"cpu ({cpu['threads']} threads, {cpu['capability'] or 'unknown ISA'})"]
        devices += [
            f"cuda:{d['index']} {d['name']} (sm {d['capability']}, {d['memory_gib']} GiB)"
            for d in data["cuda"]
        ]
        if data["mps"]:
            devices.append("mps")
        print(f"devices:  {'; '.join(devices)}")
        if "cuda_error" in data:
            print(f"          cuda probe failed: {data['cuda_error']}")
    ort = data["onnxruntime"]
    if ort is None:
        print("onnxruntime: not installed (to segment without PyTorch: 'fastsam3d[onnx]')")
    else:
        print(f"onnxruntime: {ort['version']} ({', '.join(ort['providers']) or 'no providers'})")
    models = data["models"]
    print(f"models:   {', '.join(models) if isinstance(models, list) else models}")
    print(f"cache:    {data['cache_dir']}  (override with ${data['cache_env']})")
    width = max((len(w["name"]) for w in data["weights"]), default=0)
    for w in data["weights"]:
        size = f", {format_size(w['size'])}" if w["present"] else ""
        print(f"  {w['name']:<{width}} {w['state']}{size}")
    return 0
