"""The inference runner every caller uses: the encoder and the click, prepared once per device.

``Runner(model, device)`` picks the fastest path that keeps the masks (Dice >= 0.99 against
fp32 on the parity cases, checked by the tests and by ``model/benchmarks/gpu_checks.py``):

* CPU: where the CPU has native bf16 matmuls (AMX or AVX512-BF16; otherwise everything fp32),
  the encoder on a bf16 copy of its weights and the click under bf16 autocast, with the final
  mask product and logits in fp32 (2 cores: encoder 245 -> 84 ms, click 14 -> 10 ms).
* CUDA (``precision="bf16"``, the default there):

  - the encoder runs on a bf16 copy of its weights made once here (no per-call weight casts).
    Every matmul/conv is bf16 with fp32 accumulation; the precision-sensitive reductions stay
    fp32 inside their kernels: LayerNorm statistics (the CUDA kernel accumulates in fp32),
    the attention softmax (fused SDPA, rel-pos bias as an additive mask, fp32 online softmax),
    the padded-window log-sum-exp (computed in fp32 by the model code). The embedding is
    returned in fp32.
  - the click (prompt encoder + decoder + upsampling + paste) stays fp32: it is 1.5 GFLOP and
    bound by kernel launches, not arithmetic, so bf16 would buy nothing and cost logit accuracy.
  - both are captured as CUDA graphs with static input/output buffers: one graph per encoder
    batch size, one per click signature (number of points, mask prompt or not, multimask) and
    paste shape. Padding points to a fixed count is NOT an option: a label -1 point is the
    prompt encoder's "not a point" token and changes the logits (tested), so each point count
    up to ``max_graph_points`` gets its own graph and larger counts run eagerly. A signature
    whose capture fails runs eagerly from then on (logged once); results are the same.

``precision="fp32"`` gives the exact path (parity within 1e-4 of the public code), eager.

* CPU without native bf16: ``precision="int8"`` (what ``"auto"`` picks there when onnxruntime
  and the exporter are installed; see :mod:`fastsam3d.quantize`), the encoder dynamically
  quantised to int8 and run by ONNX Runtime, the click in fp32.
* ``backend="onnxruntime"``: encoder and click both run by ONNX Runtime
  (:class:`fastsam3d.onnx.engine.OrtEngine`; fp32 equals PyTorch within 1e-4, or int8 encoder),
  the graphs exported once per weights (``onnx_dir`` or the user cache).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .modeling import Sam3D
from .modeling.sam3d import decode

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "int8")
BACKENDS = ("torch", "onnxruntime")
CLICK_PRECISIONS = ("fp32", "tf32", "bf16")  # the click on the CUDA fast path

Tensors = tuple["torch.Tensor | None", ...]  # quoted: Slicer 5.8 runs Python 3.9


def cpu_has_fast_bf16() -> bool:
    """True where bf16 matmuls run natively on this CPU (AMX tiles or AVX512-BF16).

    The probes live in ``torch.cpu`` (private, so looked up defensively; older releases had
    them under ``torch._C._cpu``). Without them bf16 is emulated and slower than fp32.
    """
    for module in (getattr(torch, "cpu", None), getattr(torch._C, "_cpu", None)):
        for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
            fn = getattr(module, probe, None)
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


# --- graph capture ------------------------------------------------------------------------
@dataclass
class Captured:
    """A replayable computation with static buffers: copy into ``inputs``, ``replay()``, read
    ``outputs`` (overwritten by the next replay, so callers get clones)."""

    replay: Callable[[], None]
    inputs: Tensors
    outputs: tuple[torch.Tensor, ...]


def capture_cuda_graph(fn: Callable[..., Sequence[torch.Tensor]], example: Tensors,
                       warmup: int = 2) -> Captured:
    """Capture ``fn(*inputs)`` on static copies of ``example`` as one CUDA graph.

    Warm-up runs go on a side stream first (cuBLAS/cuDNN pick and allocate their workspaces
    there, which capture forbids). Each graph gets its own memory pool: graphs here are replayed
    in any order, and a shared pool would let one graph's temporaries overlay another's live
    outputs.
    """
    static = tuple(None if t is None else t.clone() for t in example)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    cudnn = torch.backends.cudnn
    # cuDNN benchmarks its convolution algorithms during the warm-up (the shapes are fixed, so
    # the search is paid once); the graph then bakes the fastest one in.
    with cudnn.flags(enabled=cudnn.enabled, benchmark=True, deterministic=cudnn.deterministic,
                     allow_tf32=cudnn.allow_tf32):
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                fn(*static)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = tuple(fn(*static))
    return Captured(graph.replay, static, out)


class GraphCache:
    """Keyed captured computations with eager fallback.

    ``run(key, fn, inputs)`` captures ``fn`` the first time a key is seen (``capture`` is
    :func:`capture_cuda_graph` on CUDA; tests inject a CPU stand-in), then replays it with the
    inputs copied into the static buffers. A key whose capture raised runs ``fn`` eagerly from
    then on. ``max_entries`` bounds the number of graphs (each holds its own memory pool).
    """

    def __init__(self, capture: Callable[[Callable, Tensors], Captured] = capture_cuda_graph,
                 max_entries: int = 32) -> None:
        self.capture = capture
        self.max_entries = max_entries
        self.entries: dict[Hashable, Captured | None] = {}
        self.capture_ms: dict[Hashable, float] = {}

    def __contains__(self, key: Hashable) -> bool:
        return key in self.entries

    def failed(self, key: Hashable) -> bool:
        return key in self.entries and self.entries[key] is None

    def prepare(self, key: Hashable, fn: Callable, inputs: Tensors) -> Captured | None:
        if key in self.entries:
            return self.entries[key]
        if len(self.entries) >= self.max_entries:
            return None  # eager; not recorded, so nothing is pinned for it
        t0 = time.perf_counter()
        try:
            entry: Captured | None = self.capture(fn, inputs)
        except Exception as exc:  # noqa: BLE001 - any capture failure means: run eagerly
            log.warning("fastsam3d: CUDA-graph capture failed for %s (%s: %s); running it "
                        "eagerly", key, type(exc).__name__, exc)
            entry = None
        self.capture_ms[key] = (time.perf_counter() - t0) * 1e3
        self.entries[key] = entry
        return entry

    def run(self, key: Hashable, fn: Callable, inputs: Tensors) -> tuple[torch.Tensor, ...]:
        entry = self.prepare(key, fn, inputs)
        if entry is None:
            return tuple(fn(*inputs))
        for static, x in zip(entry.inputs, inputs):
            if static is not None:
                static.copy_(x)
        entry.replay()
        return tuple(o.clone() for o in entry.outputs)


def click_key(coords: torch.Tensor, mask_input: torch.Tensor | None, multimask: bool,
              extra: Hashable = None) -> tuple:
    """Graph signature of a click: everything that changes shapes or the traced code."""
    return ("click", tuple(coords.shape), mask_input is None, bool(multimask), extra)


PASTE_MODES = ("nearest", "linear")


@dataclass(frozen=True)
class PastePlan:
    """Where a crop's voxels land in a region of the original grid, prepared on the host.

    ``axes[a]`` is the region axis that crop axis ``a`` runs along (the 1.5 mm lattice keeps
    every voxel axis's direction, so the map is separable); ``tensors`` holds per crop axis
    (i0, i1, w, inside) over that region axis: the two neighbouring crop voxels, the linear
    weight, and whether the voxel centre lies in the crop (+/- half a voxel). Nearest rounds
    halves up (ITK's rule), as :func:`fastsam3d.geometry.sample_field` does.
    """

    axes: tuple[int, int, int]
    shape: tuple[int, int, int]
    mode: str
    tensors: tuple[torch.Tensor, ...]


def paste_plan(maps: Sequence[tuple[int, np.ndarray]], size: int = 128, mode: str = "nearest",
               device: torch.device | str = "cpu") -> PastePlan:
    """Build a :class:`PastePlan` from per-crop-axis ``(region axis, crop coordinates of the
    region's voxels along it)`` in float64 — ``fastsam3d.geometry.axis_maps`` minus the crop
    start."""
    if mode not in PASTE_MODES:
        raise ValueError(f"paste mode must be one of {PASTE_MODES}, not {mode!r}")
    axes = tuple(int(q) for q, _ in maps)
    if sorted(axes) != [0, 1, 2]:
        raise ValueError(f"maps must name each region axis once, got {axes}")
    shape = [0, 0, 0]
    parts: list[torch.Tensor] = []
    for q, c in maps:
        c = np.asarray(c, dtype=np.float64)
        shape[q] = len(c)
        if mode == "nearest":
            i0 = np.clip(np.floor(c + 0.5), 0, size - 1)
            i1, w = i0, np.zeros_like(c)
        else:
            cc = np.clip(c, 0, size - 1)
            i0 = np.floor(cc)
            i1, w = np.minimum(i0 + 1, size - 1), cc - i0
        inside = (c >= -0.5) & (c < size - 0.5)
        parts += [torch.as_tensor(i0.astype(np.int64), device=device),
                  torch.as_tensor(i1.astype(np.int64), device=device),
                  torch.as_tensor(w, dtype=torch.float32, device=device),
                  torch.as_tensor(inside, device=device)]
    return PastePlan(axes, tuple(shape), mode, tuple(parts))  # type: ignore[arg-type]


def paste_field(field: torch.Tensor, axes: Sequence[int], mode: str,
                tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """(S, S, S) crop logits -> bool mask of the plan's region: separable gathers, threshold
    at 0, and only voxels inside the crop's footprint may be set."""
    x = field > 0 if mode == "nearest" else field.float()
    inside = None
    for a in range(3):
        i0, i1, w, ok = tensors[4 * a: 4 * a + 4]
        if mode == "nearest":
            x = x.index_select(a, i0)
        else:
            shape = [1, 1, 1]
            shape[a] = -1
            x0 = x.index_select(a, i0)
            x = x0 + (x.index_select(a, i1) - x0) * w.view(shape)
        view = [1, 1, 1]
        view[a] = -1
        inside = ok.view(view) if inside is None else inside & ok.view(view)
    if mode != "nearest":
        x = x > 0
    x = x & inside
    pos = [0, 0, 0]
    for a in range(3):
        pos[axes[a]] = a
    return x.permute(*pos).contiguous()


def upsample(low_res: torch.Tensor, size: int = 128) -> torch.Tensor:
    """(B, C, 32, 32, 32) -> first mask's (size^3) logits, trilinear in fp32 (the reference's
    ``F.interpolate``, as ``fastsam3d.geometry.upsample_logits``)."""
    return F.interpolate(low_res[:1, :1].float(), size=(size,) * 3, mode="trilinear",
                         align_corners=False)[0, 0]


@contextlib.contextmanager
def _tf32_matmuls() -> Iterator[None]:
    """TF32 for fp32 matmuls inside the block only (a captured graph keeps the kernels)."""
    m = torch.backends.cuda.matmul
    before = m.allow_tf32
    m.allow_tf32 = True
    try:
        yield
    finally:
        m.allow_tf32 = before


# --- the runner ---------------------------------------------------------------------------
class Runner:
    """Encoder + click for one model on one device, with the precision policy applied.

    ``graphs``: capture CUDA graphs (default: on for CUDA with bf16). ``max_graph_points``:
    clicks with more points run eagerly. ``compile``: ``torch.compile`` (Inductor, no cudagraph
    trees) the encoder before capturing it: faster encoder, ~13 s more warm-up per model, off by
    default. ``click_precision``: ``"auto"`` (default: bf16 autocast on a bf16 CPU, where it
    takes the click from 12 to 9 ms on 2 cores; fp32 on CUDA, where the click is launch-bound and
    bf16 buys nothing), ``"fp32"``, ``"tf32"`` (CUDA) or ``"bf16"``. The final mask product and
    the logits stay fp32 in every mode. The bf16 encoder copy is made here: rebuild the Runner
    after changing the model's weights or attention backend.
    ``backend``: ``"torch"`` or ``"onnxruntime"`` (see the module docstring); ``onnx_dir``: where
    the exported graphs are (or go; default the user cache, keyed by the weights' digest).
    """

    def __init__(
        self,
        model: Sam3D,
        device: str | torch.device | None = None,
        precision: str = "auto",
        *,
        graphs: bool | None = None,
        max_graph_points: int = 8,
        compile: bool = False,
        click_precision: str = "auto",
        backend: str = "torch",
        onnx_dir: str | None = None,
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if backend == "onnxruntime" and precision == "bf16":
            raise ValueError("bf16 is a PyTorch path; the onnxruntime backend runs fp32 or int8")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if click_precision not in (*CLICK_PRECISIONS, "auto"):
            raise ValueError(f"click_precision must be one of {CLICK_PRECISIONS}, "
                             f"got {click_precision!r}")
        self.device = resolve_device(device) if device is not None else model.device
        self.model = model.to(self.device).eval()
        chosen = precision == "auto"
        if precision == "auto":
            if backend == "onnxruntime":
                precision = "int8" if self.device.type == "cpu" else "fp32"
            elif self.device.type == "cuda":
                precision = "bf16"
            elif self.device.type == "cpu":
                from .quantize import cpu_int8_preferred

                precision = ("bf16" if cpu_has_fast_bf16() else
                             "int8" if cpu_int8_preferred() else "fp32")
            else:
                precision = "fp32"
        if precision == "int8" and self.device.type != "cpu" and backend == "torch":
            raise ValueError("int8 is the CPU path (use bf16 on CUDA, or backend='onnxruntime')")
        self.backend = backend
        self._ort = None
        if precision == "int8" or backend == "onnxruntime":
            precision = self._prepare_ort(precision, onnx_dir, chosen)
        self.precision = precision
        self.cuda_fast = self.device.type == "cuda" and precision == "bf16"
        if click_precision == "auto":
            cpu_bf16 = self.device.type == "cpu" and precision == "bf16"
            click_precision = "bf16" if cpu_bf16 else "fp32"
        self.click_precision = click_precision
        if graphs is None:
            graphs = self.cuda_fast
        if graphs and self.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.max_graph_points = int(max_graph_points)
        self.compile = bool(compile)
        self._graphs = GraphCache() if graphs else None
        self._encoder = self.model.image_encoder
        if self.precision == "bf16":
            # Weights prepared once: a bf16 copy of the encoder (the fp32 model stays intact
            # for exact-mode callers). The click keeps the fp32 modules. On CPU this also beats
            # autocast, which re-casts every weight on every call (92 vs 107 ms, 2 cores).
            self._encoder = copy.deepcopy(self.model.image_encoder).to(torch.bfloat16).eval()
            for p in self._encoder.parameters():
                p.requires_grad_(False)
        self._encode_fn = self._encode_eager
        self._click_fn = self._click_eager
        self._paste_fn = self._click_paste_eager
        if self.compile:
            # The encoder only: Inductor fuses its elementwise work (measured on an H200:
            # FastSAM3D 0.55 -> 0.42 ms, SAM-Med3D 2.8 -> 1.26 ms, ~13 s to compile each); the
            # click is bound by its GEMM/attention kernels and gained nothing (0.76 -> 0.73 ms).
            self._encode_fn = torch.compile(self._encode_eager, dynamic=False)
        with torch.inference_mode():
            self.model.prompt_encoder.get_dense_pe()  # cached outside any graph pool

    def _prepare_ort(self, precision: str, onnx_dir: str | None, chosen: bool) -> str:
        """Export (once per weights) and open the ONNX Runtime engine; an automatically chosen
        int8 path that cannot be prepared falls back to fp32 with a warning."""
        from .onnx.engine import OrtEngine
        from .quantize import prepare_onnx

        try:
            d = prepare_onnx(self.model, onnx_dir, int8=precision == "int8")
            self._ort = OrtEngine(d, precision, threads=torch.get_num_threads())
        except Exception as exc:
            if not (chosen and self.backend == "torch"):
                raise
            log.warning("fastsam3d: the int8 CPU path could not be prepared (%s: %s); "
                        "running fp32", type(exc).__name__, exc)
            self.backend, self._ort = "torch", None
            return "fp32"
        return precision

    @property
    def graphs(self) -> GraphCache | None:
        return self._graphs

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "bf16" and not self.cuda_fast:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return self._exact()

    def _exact(self) -> contextlib.AbstractContextManager:
        if self.device.type == "cuda" and self.precision == "fp32":
            # Exact means fp32: cuDNN would run the fp32 convolutions in TF32 by default.
            cudnn = torch.backends.cudnn
            return cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark,
                               deterministic=cudnn.deterministic, allow_tf32=False)
        return contextlib.nullcontext()

    # eager bodies (also what the graphs capture) -----------------------------------------
    def _encode_eager(self, crops: torch.Tensor) -> tuple[torch.Tensor]:
        if self.precision == "bf16":
            return (self._encoder(crops.to(torch.bfloat16)).float(),)
        with self._autocast():
            return (self._encoder(crops).float(),)

    def _click_eager(self, emb: torch.Tensor, coords: torch.Tensor, labels: torch.Tensor,
                     mask_input: torch.Tensor | None, multimask: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        with self._click_ctx():
            # Any model with the SAM-style parts runs here (not only Sam3D).
            low_res, iou = decode(self.model, emb, coords, labels, mask_input, multimask)
        return low_res.float(), iou.float()

    def _click_ctx(self) -> contextlib.AbstractContextManager:
        if self.click_precision == "bf16" and self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        if not self.cuda_fast or self.click_precision == "fp32":
            return self._exact()
        return _tf32_matmuls()

    def _click_paste_eager(self, emb: torch.Tensor, coords: torch.Tensor, labels: torch.Tensor,
                           mask_input: torch.Tensor | None, *plan_and_flags: object
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        *tensors, axes, mode, multimask = plan_and_flags
        low_res, iou = self._click_eager(emb, coords, labels, mask_input, bool(multimask))
        field = upsample(low_res, self.model.image_encoder.img_size)
        return low_res, iou, paste_field(field, axes, mode, tensors)

    def _use_graph(self, coords: torch.Tensor | None = None) -> bool:
        if self._graphs is None:
            return False
        return coords is None or coords.shape[1] <= self.max_graph_points

    # public API ----------------------------------------------------------------------------
    @torch.inference_mode()
    def encode(self, crops: torch.Tensor) -> torch.Tensor:
        """(B, 1, 128, 128, 128) normalised crops -> (B, 384, 8, 8, 8) fp32 embeddings."""
        if self._ort is not None:
            out = self._ort.encode(crops.detach().to("cpu", torch.float32).numpy())
            return torch.from_numpy(out).to(self.device)
        crops = crops.to(self.device, torch.float32)
        if self._use_graph():
            (emb,) = self._graphs.run(("encode", tuple(crops.shape)), self._encode_fn, (crops,))
            return emb
        return self._encode_fn(crops)[0]

    def _click_inputs(self, embedding: torch.Tensor, coords: torch.Tensor, labels: torch.Tensor,
                      mask_input: torch.Tensor | None) -> Tensors:
        return (embedding.to(self.device, torch.float32),
                coords.to(self.device, torch.float32),
                labels.to(self.device, torch.long),
                None if mask_input is None else mask_input.to(self.device, torch.float32))

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
        multi = bool(multimask_output)
        if self.backend == "onnxruntime":
            host = [None if t is None else t.detach().cpu().numpy()
                    for t in (embedding, coords, labels, mask_input)]
            low, iou = self._ort.click(*host, multi)
            return torch.from_numpy(low).to(self.device), torch.from_numpy(iou).to(self.device)
        inputs = self._click_inputs(embedding, coords, labels, mask_input)
        if self._use_graph(inputs[1]):
            key = click_key(inputs[1], inputs[3], multi, tuple(inputs[0].shape))
            return self._graphs.run(key, lambda *args: self._click_fn(*args, multi), inputs)
        return self._click_fn(*inputs, multi)

    @torch.inference_mode()
    def click_and_paste(
        self,
        embedding: torch.Tensor,
        coords: torch.Tensor,
        labels: torch.Tensor,
        mask_input: torch.Tensor | None,
        plan: PastePlan,
        multimask_output: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One click pasted into a region of the original volume, as one captured graph.

        ``plan`` (:func:`paste_plan`) says where the crop lands in the region. Returns
        (low-res logits, iou, bool mask of ``plan.shape`` on the device); the mask is the first
        output mask thresholded at 0. One graph per region shape and axis order: keep the
        region fixed per crop (e.g. the crop's whole footprint) to replay it click after click.
        """
        if self.backend == "onnxruntime":
            low, iou = self.click(embedding, coords, labels, mask_input, multimask_output)
            field = upsample(low, self.model.image_encoder.img_size)
            tensors = tuple(t.to(self.device) for t in plan.tensors)
            return low, iou, paste_field(field, plan.axes, plan.mode, tensors)
        inputs = self._click_inputs(embedding, coords, labels, mask_input)
        tensors = tuple(t.to(self.device) for t in plan.tensors)
        flags = (plan.axes, plan.mode, bool(multimask_output))

        def fn(*args: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
            return self._paste_fn(*args, *flags)

        if self._use_graph(inputs[1]):
            key = ("paste",) + click_key(inputs[1], inputs[3], flags[2],
                                         (tuple(inputs[0].shape), plan.shape, flags[:2]))
            return self._graphs.run(key, fn, (*inputs, *tensors))
        return fn(*inputs, *tensors)

    def warmup(self, steps: int = 1, progress: Callable[[str], None] | None = None,
               points: Sequence[int] = (1,), batch_sizes: Sequence[int] = (1,)) -> float:
        """Run (and on CUDA capture) each common path once so that the first real click pays
        no one-off cost. ``points``: click point counts to prepare (1 covers FastSAM3D's
        newest-click policy). Returns the seconds it took."""
        t0 = time.perf_counter()
        say = progress or (lambda msg: log.info(msg))
        if self.cuda_fast:
            say("fastsam3d: preparing the CUDA fast path (bf16 encoder, CUDA graphs)...")
        size = self.model.image_encoder.img_size
        low = size // 4
        g = torch.Generator().manual_seed(0)
        for _ in range(steps):
            for b in batch_sizes:
                emb = self.encode(torch.randn(b, 1, size, size, size, generator=g))
            emb = emb[:1]
            for n in points:
                coords = torch.rand(1, n, 3, generator=g) * (size - 1)
                labels = torch.ones(1, n, dtype=torch.long)
                out, _ = self.click(emb, coords, labels, torch.zeros(1, 1, low, low, low))
                self.click(emb, coords, labels, out)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        secs = time.perf_counter() - t0
        if self.cuda_fast:
            n = 0 if self._graphs is None else sum(
                e is not None for e in self._graphs.entries.values())
            say(f"fastsam3d: fast path ready in {secs:.1f} s ({n} CUDA graphs)")
        return secs
