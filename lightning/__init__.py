"""AnimateDiff / AnimateDiff-Lightning on SD1.5. Imports nothing from ComfyUI."""
