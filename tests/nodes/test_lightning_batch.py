"""core/variations.py and the batch variations node: seed lists x prompt lists, one clip each saved with a workflow
narrowed to that clip (it re-renders exactly it), a contact sheet of the clips' middle frames; bad lists are refused
before anything is written."""
from __future__ import annotations

import pytest
import torch

from flipbook_pack import NODE_CLASS_MAPPINGS
from flipbook_pack.core.errors import InvalidSettingError
from flipbook_pack.core.media.readers import read_mp4_metadata
from flipbook_pack.core.variations import contact_sheet, parse_prompt_list, parse_seed_list
from flipbook_pack.nodes import _comfy

SIZE = dict(frames=4, width=64, height=64, steps=4, cfg=1.0, scheduler="trailing", motion_scale=1.0)


@pytest.mark.parametrize("text,seeds", [("1, 2, 5-8", [1, 2, 5, 6, 7, 8]), ("42", [42]), ("3\n1;  2 - 3", [3, 1, 2, 3]),
                                        ("18446744073709551615", [2**64 - 1])])
def test_seed_lists_as_users_write_them(text, seeds):
    assert parse_seed_list(text) == seeds


@pytest.mark.parametrize("text,match", [("", "empty"), ("1, x", "'x' is not a seed"), ("8-5", "low to high"),
                                        ("0-300", "more than 256")])
def test_bad_seed_lists_are_named(text, match):
    with pytest.raises(InvalidSettingError, match=match):
        parse_seed_list(text)


def test_prompt_lists_are_one_per_line_and_never_empty():
    assert parse_prompt_list("a fox\n\n  a cat running  \n") == ["a fox", "a cat running"]
    with pytest.raises(InvalidSettingError, match="prompt list is empty"):
        parse_prompt_list(" \n\n")


def test_contact_sheet_places_rows_and_columns_with_gaps():
    cells = [[torch.full((2, 3, 3), float(r * 2 + c) / 4) for c in range(2)] for r in range(2)]
    sheet = contact_sheet(cells, gap=1)
    assert sheet.shape == (1, 5, 7, 3)
    assert sheet[0, 3, 4, 0] == 3 / 4 and sheet[0, 2, 0, 0] == 1.0 and sheet[0, 0, 3, 0] == 1.0


def _workflow():
    return {"nodes": [{"id": 7, "type": "FlipbookLightningBatch",
                       "widgets_values": ["a fox\na cat", "", "3, 5", 4, 64, 64, 4, 1.0, "trailing", 1.0,
                                          "flipbook/variations", "mp4", 8.0]}], "links": []}


def test_every_clip_is_saved_with_a_workflow_that_re_renders_it(lightning_model, tmp_path):
    _comfy.use_headless(_comfy.HeadlessHost(models_dir=tmp_path, output_dir=tmp_path / "out"))
    try:
        node = NODE_CLASS_MAPPINGS["FlipbookLightningBatch"]()
        api = {"7": {"class_type": "FlipbookLightningBatch", "inputs": {"prompts": "a fox\na cat", "seeds": "3, 5"}}}
        out = node.execute(model=lightning_model, prompts="a fox\na cat", negative="", seeds="3, 5", **SIZE,
                           filename_prefix="flipbook/variations", format="mp4", fps=8.0, prompt=api,
                           extra_pnginfo={"workflow": _workflow()}, unique_id="7")
    finally:
        _comfy.use_headless(None)
    (sheet,), ui = out["result"], out["ui"]
    files = sorted((tmp_path / "out" / "flipbook").glob("variations_*.mp4"))
    sheets = list((tmp_path / "out" / "flipbook").glob("variations_sheet_*.png"))
    assert len(files) == 4 and len(sheets) == 1 and len(ui["images"]) == 5 and sheet.shape == (1, 64 * 2 + 4, 64 * 2 + 4, 3)
    sampler = NODE_CLASS_MAPPINGS["FlipbookLightningSampler"]()
    for index, (text, seed) in enumerate([("a fox", 3), ("a fox", 5), ("a cat", 3), ("a cat", 5)]):
        meta = read_mp4_metadata(files[index])
        assert meta["prompt"]["7"]["inputs"] == {"prompts": text, "seeds": str(seed)}
        assert meta["workflow"]["nodes"][0]["widgets_values"][:3] == [text, "", str(seed)]
        single = sampler.execute(model=lightning_model, prompt=text, negative="", seed=seed, **SIZE)[0]
        row, column = divmod(index, 2)
        cell = sheet[0, row * 68:row * 68 + 64, column * 68:column * 68 + 64]
        torch.testing.assert_close(cell, single[2], rtol=0, atol=0)  # the middle frame of that clip
    assert ui["flipbook_notes"][0].startswith("2 prompts x 2 seeds = 4 clips")


def test_an_empty_prompt_list_writes_nothing(lightning_model, tmp_path):
    cls = NODE_CLASS_MAPPINGS["FlipbookLightningBatch"]
    assert "prompt list is empty" in cls.VALIDATE_INPUTS(prompts="\n", seeds="1")
    assert "'x' is not a seed" in cls.VALIDATE_INPUTS(prompts="a fox", seeds="x")
    _comfy.use_headless(_comfy.HeadlessHost(models_dir=tmp_path, output_dir=tmp_path / "out"))
    try:
        with pytest.raises(InvalidSettingError, match="prompt list is empty"):
            cls().execute(model=lightning_model, prompts="", negative="", seeds="1", **SIZE,
                          filename_prefix="flipbook/variations", format="mp4", fps=8.0)
    finally:
        _comfy.use_headless(None)
    assert not (tmp_path / "out").exists()


def test_a_batch_inside_a_subgraph_or_fed_by_links_is_narrowed_where_it_can_be():
    from flipbook_pack.nodes.lightning_batch import _one_clip

    inner = {"id": 7, "type": "FlipbookLightningBatch", "inputs": [],
             "widgets_values": ["a\nb", "", "1-4", 4, 64, 64, 4, 1.0, "trailing", 1.0, "p", "mp4", 8.0]}
    workflow = {"nodes": [{"id": 3, "type": "some-subgraph-uuid", "widgets_values": []}],
                "definitions": {"subgraphs": [{"id": "some-subgraph-uuid", "nodes": [inner]}]}}
    api = {"3:7": {"class_type": "FlipbookLightningBatch", "inputs": {"prompts": "a\nb", "seeds": "1-4"}}}
    one_prompt, extra, narrowed = _one_clip(api, {"workflow": workflow}, "3:7", text="b", seed=2)
    assert narrowed and one_prompt["3:7"]["inputs"] == {"prompts": "b", "seeds": "2"}
    assert extra["workflow"]["definitions"]["subgraphs"][0]["nodes"][0]["widgets_values"][:3] == ["b", "", "2"]
    inner["inputs"] = [{"name": "prompts", "type": "STRING", "link": 9, "widget": {"name": "prompts"}}]
    _, extra, narrowed = _one_clip(api, {"workflow": workflow}, "3:7", text="b", seed=2)
    assert not narrowed  # the saved UI workflow keeps the link (a note on the node says so)
    assert extra["workflow"]["definitions"]["subgraphs"][0]["nodes"][0]["widgets_values"][:3] == ["a\nb", "", "2"]
