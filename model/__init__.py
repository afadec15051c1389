"""OmniPose network, configurations, checkpoints and the top-down keypoint codec.

This package is pure library code: it depends on torch, numpy and OpenCV only, never on the
service or training packages.
"""
