"""Deployment: BN folding, verified export (ONNX / TorchScript / ExportedProgram), predict and bench.

Submodules are imported on use (`from mobilenetv3.deploy.export import export_model`); this package
imports nothing heavy itself, so `predict` on a cached ONNX export does not need torch.
"""
