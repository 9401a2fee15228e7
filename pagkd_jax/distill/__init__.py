"""Distillation losses: group-level GKD-Pro and GKD-Den, and the losses of the paired comparison methods."""
