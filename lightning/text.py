"""The SD1.5 CLIP tokenizer, from the data bundled in models/ (or ComfyUI's own copy). Encoding: prompt.py."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..core.errors import UnsupportedCheckpointError
from ..core.bundled import BUNDLED_MODELS_DIR

BUNDLED_TOKENIZER = BUNDLED_MODELS_DIR / "clip_tokenizer"
CONTEXT_LENGTH = 77


def load_tokenizer(directory: Optional[str | Path] = None):
    """CLIP BPE tokenizer from vocab.json + merges.txt in `directory` (default: the bundled copy)."""
    from transformers import CLIPTokenizer

    directory = Path(directory) if directory else BUNDLED_TOKENIZER
    # from_pretrained on a local folder reads vocab.json/merges.txt/*.json there and never a hub; the
    # constructor's keyword names changed between transformers 4 and 5 (vocab_file -> vocab)
    tokenizer = CLIPTokenizer.from_pretrained(str(directory), model_max_length=CONTEXT_LENGTH, local_files_only=True)
    if len(tokenizer) < 49408:
        raise UnsupportedCheckpointError(
            f"The CLIP tokenizer in {directory} has {len(tokenizer)} tokens, not CLIP's 49408; its vocab.json or "
            "merges.txt is missing or damaged."
        )
    return tokenizer
