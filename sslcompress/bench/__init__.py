"""Stage 3: timing dense, unstructured-sparse and structured-sparse forms of one model."""
