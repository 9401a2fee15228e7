"""Evaluation: metrics with lesion-level bootstrap intervals; ROC, confusion and CAM figures."""
