"""Flipbook's shared inference core. Imports nothing from ComfyUI."""
