"""ONNX export (needs torch) and the ONNX Runtime engine (numpy + onnxruntime only).

``fastsam3d.onnx.export`` writes the graphs; ``fastsam3d.onnx.engine`` runs them without
PyTorch. Nothing is imported here, so importing the engine never pulls in torch.
"""
