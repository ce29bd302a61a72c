"""Conversions that write new checkpoint files: ZeRO shards to safetensors."""
