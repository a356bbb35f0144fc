"""The run directory (any fsspec URL): storage access, checkpoints, records and TensorBoard, images."""
