"""Group-level distillation: GKD-Pro and GKD-Den."""
