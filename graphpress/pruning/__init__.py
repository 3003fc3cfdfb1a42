"""Structured channel pruning on ONNX graphs (the pieces of the `prune-channels` pass).

- `groups`: channel-dependency analysis (which tensor axes lose the same channels; frozen channels)
- `importance`: group-wise channel scores (L1/L2, BN scale, activation-based)
- `plan`: per-group counts, channel selection, MACs/params estimates, ratios for a target
- `apply`: slicing weights and fixing attributes, shapes and shape constants
- `reconstruct`: least-squares re-fit of the consumer layers on calibration activations
- `sensitivity`: per-group sensitivity scan and ratio allocation under a global budget
- `report`: the per-group report
"""
