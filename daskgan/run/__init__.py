"""The run directory (any fsspec URL): its layout, storage access, checkpoints, records and TensorBoard, images."""
