"""File names of an exported model directory (shared by the exporter and the engine; no
imports, so the torch-free engine can use them)."""

FORMAT_VERSION = 2  # bump when the graphs' inputs/outputs change
ENCODER = "encoder.onnx"
ENCODER_INT8 = "encoder.int8.onnx"
CLICK = "click.onnx"
META = "fastsam3d-onnx.json"
