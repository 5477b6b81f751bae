"""lightning/text.py: the bundled CLIP tokenizer and ComfyUI's tokenizer folder layout."""
from __future__ import annotations

import pytest

from flipbook_pack.core.prompt import tokenize_weighted
from flipbook_pack.lightning.text import load_tokenizer

TOKENIZER = load_tokenizer()


def test_tokenizer_has_clips_real_vocabulary():
    assert len(TOKENIZER) == 49408
    assert TOKENIZER("a red fox").input_ids == [49406, 320, 736, 3240, 49407]  # OpenAI CLIP BPE ids
    (chunk,) = tokenize_weighted(TOKENIZER, "a red fox")
    assert [t for t, _ in chunk][:5] == [49406, 320, 736, 3240, 49407] and chunk[-1][0] == 49407


def test_comfyuis_tokenizer_folder_layout_loads(tmp_path):
    import shutil

    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(load_tokenizer.__globals__["BUNDLED_TOKENIZER"] / name, tmp_path / name)
    assert load_tokenizer(tmp_path)("a red fox").input_ids == [49406, 320, 736, 3240, 49407]
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(Exception):
        load_tokenizer(tmp_path)
