"""PaGKD in JAX: pairing-free group-level knowledge distillation from NBI to WLI endoscopy."""

__version__ = "0.1.0"
