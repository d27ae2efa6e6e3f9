"""Export of CadMtl models for serving without the PyTorch modelling code: ONNX (`cadmtl export onnx`) and an
onnxruntime predictor that reuses the image processor's pre- and post-processing."""
