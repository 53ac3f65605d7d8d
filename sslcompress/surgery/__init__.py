"""Stage 2: export to ONNX, exact graph surgery on structured zeros, and verification in ONNX Runtime."""
