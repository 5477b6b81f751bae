"""lightning/tiers.py and the tier loader node: explore / develop / final re-render the same seed and prompt with the
tier's motion module and settings (4-step Lightning, 8-step Lightning, standard AnimateDiff 25-40 steps at CFG 7-8),
and the sampler runs them whatever its own widgets say, naming them."""
from __future__ import annotations

import pytest

from flipbook_pack import NODE_CLASS_MAPPINGS
from flipbook_pack.core.errors import InvalidSettingError
from flipbook_pack.lightning import tiny_models as T
from flipbook_pack.lightning.tiers import TIERS, tier_settings
from flipbook_pack.nodes import _comfy

FILES = {"explore": "animatediff_lightning_4step_comfyui.safetensors",
         "develop": "animatediff_lightning_8step_comfyui.safetensors", "final": "mm_sd_v15_v2.safetensors"}


@pytest.fixture(scope="module")
def tier_models(tmp_path_factory, tiny_models):
    _, files = tiny_models
    root = tmp_path_factory.mktemp("tier_models")
    (root / "checkpoints").mkdir()
    (root / "checkpoints" / "tiny_sd15.safetensors").symlink_to(files["ckpt"])
    for seed, name in enumerate(FILES.values()):
        T.write_safetensors(T.tiny_motion_state_dict(seed=40 + seed), root / "animatediff_models" / name)
    _comfy.use_headless(_comfy.HeadlessHost(models_dir=root, output_dir=root / "output"))
    yield root
    _comfy.use_headless(None)


def _tier(tier, **kw):
    node = NODE_CLASS_MAPPINGS["FlipbookLightningTierLoader"]()
    inputs = dict(ckpt_name="tiny_sd15.safetensors", tier=tier, explore_motion=FILES["explore"],
                  develop_motion=FILES["develop"], final_motion=FILES["final"], final_steps=25, final_cfg=7.5)
    return node.execute(**{**inputs, **kw})


def _sample(model):
    sampler = NODE_CLASS_MAPPINGS["FlipbookLightningSampler"]()
    # the sampler's widgets as the explore workflow has them: the tier replaces them
    out = sampler.execute(model=model, prompt="a fox", negative="blurry", seed=4, frames=4, width=64, height=64,
                          steps=4, cfg=1.0, scheduler="sgm_uniform", motion_scale=1.0)
    return out["result"][0], out["ui"]["flipbook_notes"]


def test_the_table_follows_the_guide_and_the_variant_presets():
    assert [t.id for t in TIERS.values()] == ["explore", "develop", "final"]
    assert (tier_settings("explore", final_steps=30, final_cfg=7.5).steps,
            tier_settings("develop", final_steps=30, final_cfg=7.5).steps) == (4, 8)
    final = tier_settings("final", final_steps=30, final_cfg=7.5)
    assert (final.steps, final.cfg, final.scheduler) == (30, 7.5, "leading")
    for steps, cfg in ((24, 7.5), (41, 7.5), (30, 6.9), (30, 8.5)):
        with pytest.raises(InvalidSettingError, match="25-40 steps and CFG 7-8"):
            tier_settings("final", final_steps=steps, final_cfg=cfg)


@pytest.mark.parametrize("tier,steps,variant", [("explore", 4, "lightning_4step"), ("develop", 8, "lightning_8step"),
                                                ("final", 25, "animatediff_v2")])
def test_one_change_of_tier_re_renders_with_its_module_and_settings(tier_models, tier, steps, variant):
    loaded = _tier(tier)
    model = loaded["result"][0]
    assert model.variant.id == variant and model.motion_name == FILES[tier]
    frames, notes = _sample(model)
    assert frames.shape == (4, 64, 64, 3)
    assert any(n.startswith(f"tier {tier}: {steps} steps") and "widgets are not used" in n for n in notes)


def test_a_module_of_the_wrong_kind_for_the_tier_is_refused(tier_models):
    with pytest.raises(InvalidSettingError, match="final .* tier needs a animatediff_v2 or animatediff_v3"):
        _tier("final", final_motion=FILES["explore"])
    with pytest.raises(InvalidSettingError, match="explore"):
        _tier("explore", explore_motion=FILES["develop"])
