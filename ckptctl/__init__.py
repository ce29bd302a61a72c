"""ckptctl: administer the checkpoints of large-model training runs."""

__version__ = "0.1.0"
