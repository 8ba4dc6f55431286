"""The inference runner every caller uses: the encoder and the click, prepared once per device.

``Runner(model, device)`` picks the fastest path that keeps the masks (Dice >= 0.99 against
fp32 on the parity cases, checked by the tests and by ``model/benchmarks/gpu_checks.py``):

* CPU: where the CPU has native bf16 matmuls (AMX or AVX512-BF16; otherwise everything fp32),
  the encoder on a bf16 copy of its weights; the click stays fp32 (since the decoder's exact
  rewrites, bf16 autocast made it slower, not faster: docs/benchmarks.md; ``click_precision=
  "bf16"`` still runs it so, with the final mask product and logits in fp32).
* CUDA (``precision="bf16"``, the default there):

  - the encoder runs on a bf16 copy of its weights made once here (no per-call weight casts).
    Every matmul/conv is bf16 with fp32 accumulation; the precision-sensitive reductions stay
    fp32 inside their kernels: LayerNorm statistics (the CUDA kernel accumulates in fp32),
    the attention softmax (fused SDPA, rel-pos bias as an additive mask, fp32 online softmax),
    the padded-window log-sum-exp (computed in fp32 by the model code). The embedding is
    returned in fp32.
  - the click (prompt encoder + decoder, plus what ``click_then`` adds) stays fp32: it is
    1.5 GFLOP and bound by kernel launches, not arithmetic, so bf16 would buy nothing and
    cost logit accuracy.
  - both are captured as CUDA graphs with static input/output buffers: one graph per encoder
    batch size, one per click signature (number of points, mask prompt or not, multimask) and
    ``click_then`` key. Padding points to a fixed count is NOT an option: a label -1 point is the
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

import torch

from .device import cpu_has_fast_bf16, resolve_device
from .modeling import Sam3D
from .modeling.sam3d import decode

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "int8")
BACKENDS = ("torch", "onnxruntime")
CLICK_PRECISIONS = ("fp32", "tf32", "bf16")  # the click on the CUDA fast path

Tensors = tuple["torch.Tensor | None", ...]  # quoted: Slicer 5.8 runs Python 3.9


# --- graph capture ------------------------------------------------------------------------
@dataclass
class Captured:
    """A replayable computation with static buffers: copy into ``inputs``, ``replay()``, read
    ``outputs`` (overwritten by the next replay, so callers get clones)."""

    replay: Callable[[], None]
    inputs: Tensors
    outputs: tuple[torch.Tensor, ...]


def capture_cuda_graph(
    fn: Callable[..., Sequence[torch.Tensor]], example: Tensors, warmup: int = 2
) -> Captured:
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
    with cudnn.flags(
        enabled=cudnn.enabled,
        benchmark=True,
        deterministic=cudnn.deterministic,
        allow_tf32=cudnn.allow_tf32,
    ):
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

    def __init__(
        self,
        capture: Callable[[Callable, Tensors], Captured] = capture_cuda_graph,
        max_entries: int = 32,
    ) -> None:
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
            log.warning(
                "fastsam3d: CUDA-graph capture failed for %s (%s: %s); running it eagerly",
                key,
                type(exc).__name__,
                exc,
            )
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


def click_key(
    coords: torch.Tensor, mask_input: torch.Tensor | None, multimask: bool, extra: Hashable = None
) -> tuple:
    """Graph signature of a click: everything that changes shapes or the traced code."""
    return ("click", tuple(coords.shape), mask_input is None, bool(multimask), extra)


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

    The one object every network call goes through (sessions, the server, the Slicer engine,
    benchmarks); share one Runner between sessions so the network, its bf16 copy and its CUDA
    graphs exist once. The bf16 encoder copy is made here: rebuild the Runner after changing the
    model's weights or attention backend. Timings: docs/benchmarks.md.

    Args:
        model: The network (:class:`fastsam3d.modeling.Sam3D` or anything with its SAM-style
            parts), already on ``device``.
        device: Where it runs; None = the model's device.
        precision: ``"auto"`` (bf16 encoder + CUDA graphs on CUDA; on a CPU bf16 where it is
            native, else int8 when the ONNX packages are installed, else fp32), ``"fp32"`` (exact),
            ``"bf16"`` or ``"int8"`` (forced; int8 is CPU only).
        graphs: Capture CUDA graphs (default: on for CUDA with bf16).
        max_graph_points: Clicks with more points run eagerly instead of from a graph.
        compile: ``torch.compile`` (Inductor) the encoder before capturing it: a faster encoder
            for a much longer warm-up; off by default.
        click_precision: ``"auto"`` (fp32: on CUDA the click is launch-bound, on a CPU bf16
            autocast is slower than the fp32 click), ``"fp32"``, ``"tf32"`` (CUDA) or
            ``"bf16"``. The final mask product and the logits stay fp32 in every mode.
        backend: ``"torch"`` or ``"onnxruntime"`` (see the module docstring).
        onnx_dir: Where the exported ONNX graphs are (or go); default the user cache, keyed by
            the weights' digest.

    Raises:
        ValueError: An unknown backend or precision, or a combination the backend cannot run.
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
            raise ValueError(
                f"click_precision must be one of {CLICK_PRECISIONS}, got {click_precision!r}"
            )
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

                precision = (
                    "bf16" if cpu_has_fast_bf16() else "int8" if cpu_int8_preferred() else "fp32"
                )
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
            # CPU with native bf16, 2 threads: fp32 18.0 vs bf16 autocast 21.3 ms (median, quiet
            # machine): the click is bound by small ops and weight traffic, and autocast casts
            # every weight on every call
            click_precision = "fp32"
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
            log.warning(
                "fastsam3d: the int8 CPU path could not be prepared (%s: %s); running fp32",
                type(exc).__name__,
                exc,
            )
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
            return cudnn.flags(
                enabled=cudnn.enabled,
                benchmark=cudnn.benchmark,
                deterministic=cudnn.deterministic,
                allow_tf32=False,
            )
        return contextlib.nullcontext()

    # eager bodies (also what the graphs capture) -----------------------------------------
    def _encode_eager(self, crops: torch.Tensor) -> tuple[torch.Tensor]:
        if self.precision == "bf16":
            return (self._encoder(crops.to(torch.bfloat16)).float(),)
        with self._autocast():
            return (self._encoder(crops).float(),)

    def _click_eager(
        self,
        emb: torch.Tensor,
        coords: torch.Tensor,
        labels: torch.Tensor,
        mask_input: torch.Tensor | None,
        multimask: bool = False,
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

    def _click_inputs(
        self,
        embedding: torch.Tensor,
        coords: torch.Tensor,
        labels: torch.Tensor,
        mask_input: torch.Tensor | None,
    ) -> Tensors:
        return (
            embedding.to(self.device, torch.float32),
            coords.to(self.device, torch.float32),
            labels.to(self.device, torch.long),
            None if mask_input is None else mask_input.to(self.device, torch.float32),
        )

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
            host = [
                None if t is None else t.detach().cpu().numpy()
                for t in (embedding, coords, labels, mask_input)
            ]
            low, iou = self._ort.click(*host, multi)
            return torch.from_numpy(low).to(self.device), torch.from_numpy(iou).to(self.device)
        inputs = self._click_inputs(embedding, coords, labels, mask_input)
        if self._use_graph(inputs[1]):
            key = click_key(inputs[1], inputs[3], multi, tuple(inputs[0].shape))
            return self._graphs.run(key, lambda *args: self._click_fn(*args, multi), inputs)
        return self._click_fn(*inputs, multi)

    @torch.inference_mode()
    def click_then(
        self,
        embedding: torch.Tensor,
        coords: torch.Tensor,
        labels: torch.Tensor,
        mask_input: torch.Tensor | None,
        post: Callable[..., torch.Tensor],
        extra: Sequence[torch.Tensor] = (),
        key: Hashable = None,
        multimask_output: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One click followed by ``post(low_res, *extra)``, captured together as one graph.

        Args:
            embedding, coords, labels, mask_input, multimask_output: as :meth:`click`.
            post: fp32 low-res logits (B, C, 32, 32, 32) and ``extra`` -> one tensor (e.g. the
                mask pasted into a region of the original grid, as
                :func:`fastsam3d.clickpaste.click_and_paste` does). Traced into the graph: it must
                not sync with the host.
            extra: tensors ``post`` reads, copied into the graph's static buffers per call.
            key: everything else that changes ``post``'s shapes or code (one graph per key).

        Returns:
            (low-res logits, iou, ``post``'s output), on the device.
        """
        multi = bool(multimask_output)
        extra = tuple(t.to(self.device) for t in extra)
        if self.backend == "onnxruntime":
            low, iou = self.click(embedding, coords, labels, mask_input, multi)
            return low, iou, post(low, *extra)
        inputs = self._click_inputs(embedding, coords, labels, mask_input)
        n = len(inputs)

        def fn(*args: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
            low, iou = self._click_fn(*args[:n], multi)
            return low, iou, post(low, *args[n:])

        if self._use_graph(inputs[1]):
            graph_key = ("then",) + click_key(
                inputs[1], inputs[3], multi, (tuple(inputs[0].shape), key)
            )
            return self._graphs.run(graph_key, fn, (*inputs, *extra))
        return fn(*inputs, *extra)

    def warmup(
        self,
        steps: int = 1,
        progress: Callable[[str], None] | None = None,
        points: Sequence[int] = (1,),
        batch_sizes: Sequence[int] = (1,),
    ) -> float:
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
            n = (
                0
                if self._graphs is None
                else sum(e is not None for e in self._graphs.entries.values())
            )
            say(f"fastsam3d: fast path ready in {secs:.1f} s ({n} CUDA graphs)")
        return secs
