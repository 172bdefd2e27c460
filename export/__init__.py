"""Torch side: the reference MolmoAct, checkpoint loading, reference generation, ONNX export."""
