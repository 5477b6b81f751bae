"""Wan 2.1 T2V 14B + style LoRAs (issue to come). Imports nothing from ComfyUI."""
