#!/usr/bin/env python3
"""Writes the template corpus `tests/workflows/templates/`: ComfyUI's own workflow templates
(UI format, unchanged graphs) from the current package (PyPI
`comfyui-workflow-templates-json`) and the classic SD 1.5/SD 2 ones of an earlier release
(`comfyui-workflow-templates` 0.1.30), with their model file names mapped to sakuga's demo
models and their pixel sizes cut to an eighth, so `tests/template_corpus.rs` can validate and
run each one on a CPU in seconds. SD 2.x templates are mapped to the SD 1.5-layout demo: the
graph and its nodes are what is under test, not the architecture.

    python3 scripts/template_corpus.py            # (re)writes the corpus
    python3 scripts/template_corpus.py --check    # exits 1 if the corpus is stale

Only the mapped names, the sizes (latents, upscales, prompt areas) and the template's own
`models` download list (dropped: it names files sakuga never fetches) change; everything
else is what ComfyUI ships. The packages install under target/tmp.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from template_coverage import install  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "tests" / "workflows" / "templates"

SD15 = "sakuga-demo-sd15.safetensors"
CONTROLNET = "sakuga-demo-controlnet-sd15.safetensors"
# ComfyUI's model file names -> sakuga's demo models.
MODEL_NAMES = {
    "sd_xl_base_1.0.safetensors": "sakuga-demo-sdxl.safetensors",
    "sd_xl_refiner_1.0.safetensors": "sakuga-demo-sdxl-refiner.safetensors",
    "sd_xl_turbo_1.0_fp16.safetensors": "sakuga-demo-sdxl.safetensors",
    "v1-5-pruned-emaonly-fp16.safetensors": SD15,
    "v2-1_768-ema-pruned.safetensors": SD15,
    "dreamshaper_8.safetensors": SD15,
    "clip_vision_g.safetensors": "sakuga-demo-clip-vision-g.safetensors",
    # T2I adapters add features after input blocks 2, 5, 8 and 11: SD 1.5's full layout.
    "interiordesignsuperm_v2.safetensors": "sakuga-demo-sd15-full.safetensors",
    "controlnetT2IAdapter_t2iAdapterDepth.safetensors":
        "sakuga-demo-t2i-adapter-depth-sd15.safetensors",
    "cardosAnime_v10.safetensors": SD15,
    "wd-illusion-fp16.safetensors": SD15,
    "AbyssOrangeMix2_hard.safetensors": SD15,
    "Anything-V3.0.ckpt": SD15,
    "MoXinV1.safetensors": "sakuga-demo-lora.safetensors",
    "blindbox_v1_mix.safetensors": "sakuga-demo-lora.safetensors",
    "RealESRGAN_x4plus.pth": "realesr-animevideov3-x4.param",
    "vae-ft-mse-840000-ema-pruned.safetensors": "sakuga-demo-vae.safetensors",
    "dreamCreationVirtual3DECommerce_v10.safetensors": SD15,
    "majicmixRealistic_v7.safetensors": SD15,
    "japaneseStyleRealistic_v20.safetensors": SD15,
    "architecturerealmix_v11.safetensors": SD15,
    "awpainting_v14.safetensors": SD15,
    "control_v11p_sd15_scribble_fp16.safetensors": CONTROLNET,
    "control_v11p_sd15_openpose_fp16.safetensors": CONTROLNET,
    "control_v11f1p_sd15_depth_fp16.safetensors": CONTROLNET,
    "512-inpainting-ema.safetensors": "sakuga-demo-sd15-inpainting.safetensors",
    # Input images the templates ask for -> the one the corpus test writes.
    "input.png": "example.png",
    "input (1).png": "example.png",
    "gan_input.mp4": "example.mp4",
    "image_lotus_depth_v1_1_input_image.png": "example.png",
    "lotus-depth-d-v1-1.safetensors": "sakuga-demo-lotus-depth.safetensors",
    "pray.png": "example.png",
    "white_armored_warrior.mp4": "example.mp4",
    # FILM is not ported; the demo RIFE stands in so the graph runs (as SD 2 maps to SD 1.5).
    # FILM is not supported: its template runs on the RIFE 4.25 demo from the same folder.
    "film_net_fp16.safetensors": "sakuga-demo-rife425.safetensors",
    "RealESRGAN_x4plus.safetensors": "realesr-animevideov3-x4.param",
    "scribble_input.png": "example.png",
    "input (3).png": "example.png",
    "depth_input (1).png": "example.png",
    "image (70).png": "example.png",
    "image (72).png": "example.png",
}

# Templates whose every node sakuga has, on architectures it runs.
TEMPLATES = [
    "image_sdxl_simple",
    "sdxl_simple_example",
    "sdxl_refiner_prompt_example",
    "sdxlturbo_example",
    "basic_mask_operations_and_compositing",
    "utility-gan_upscaler",
    "utility_video_frame_interpolation",
    "utility_interpolation_image_upscale",
    "basic_datatype_conversion",
    "image_lotus_depth_v1_1",
    "utility_image_stitch",
    "sdxl_revision_text_prompts",
]
CLASSIC = "comfyui-workflow-templates==0.1.30"
CLASSIC_TEMPLATES = [
    "default",
    "image2image",
    "lora",
    "lora_multiple",
    "hiresfix_latent_workflow",
    "hiresfix_esrgan_workflow",
    "esrgan_example",
    "latent_upscale_different_prompt_model",
    "area_composition",
    "area_composition_reversed",
    "area_composition_square_area_for_subject",
    "embedding_example",
    "controlnet_example",
    "2_pass_pose_worship",
    "depth_controlnet",
    "mixing_controlnets",
    "inpaint_example",
    "inpaint_model_outpainting",
    "depth_t2i_adapter",
]

SHRINK = 8
# Widget positions that hold pixel sizes or positions, per node type.
PIXEL_WIDGETS = {
    "EmptyLatentImage": (0, 1),
    "LatentUpscale": (1, 2),
    "ImageScale": (1, 2),
    "ConditioningSetArea": (0, 1, 2, 3),
}
# Widgets with a floor: (node type, position) -> minimum.
FLOORS = {("ConditioningSetArea", 0): 64, ("ConditioningSetArea", 1): 64}


# Prompt words naming model files -> the demo's.
PROMPT_WORDS = {"embedding:SDA768.pt": "embedding:sakuga-demo-embedding"}


def mapped(value):
    """`value` with any known model file name replaced, recursively."""
    if isinstance(value, str):
        for word, demo in PROMPT_WORDS.items():
            value = value.replace(word, demo)
        return MODEL_NAMES.get(value, value)
    if isinstance(value, list):
        return [mapped(v) for v in value]
    if isinstance(value, dict):
        return {k: mapped(v) for k, v in value.items()}
    return value


def shrink(nodes: list) -> None:
    """Pixel sizes and positions to an eighth, on the multiples of 8 latents need."""
    for node in nodes:
        kind = node.get("type")
        positions = PIXEL_WIDGETS.get(kind, ())
        # A dynamic combo's sizes follow its choice: only "scale dimensions" holds pixels.
        if kind == "ResizeImageMaskNode" and node["widgets_values"][0] == "scale dimensions":
            positions = (1, 2)
        for i in positions:
            value = node["widgets_values"][i]
            node["widgets_values"][i] = max(FLOORS.get((kind, i), 0), value // SHRINK // 8 * 8)
        node.get("properties", {}).pop("models", None)


def convert(template: dict) -> dict:
    workflow = mapped(template)
    workflow.pop("models", None)
    shrink(workflow["nodes"])
    for subgraph in workflow.get("definitions", {}).get("subgraphs", []):
        shrink(subgraph["nodes"])
    return workflow


def install_classic(target: Path) -> Path:
    """pip-install the classic template release into `target` unless it is there."""
    templates = target / "comfyui_workflow_templates" / "templates"
    if not (templates / "default.json").is_file():
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
               "--disable-pip-version-check", "--target", str(target), CLASSIC]
        subprocess.run(cmd, check=True, stdout=sys.stderr)
    return templates


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="fail if the corpus is stale")
    args = parser.parse_args()
    current = install(ROOT / "target" / "tmp" / "templates", refresh=False)
    classic = install_classic(ROOT / "target" / "tmp" / "templates-classic")
    sources = [(current, n) for n in TEMPLATES] + [(classic, n) for n in CLASSIC_TEMPLATES]
    CORPUS.mkdir(parents=True, exist_ok=True)
    stale = []
    for templates, name in sources:
        source = json.loads((templates / f"{name}.json").read_text())
        text = json.dumps(convert(source), indent=1, sort_keys=True) + "\n"
        path = CORPUS / f"{name}.json"
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    if stale:
        print(f"stale corpus entries: {', '.join(stale)}", file=sys.stderr)
        return 1
    print(f"{len(sources)} templates in {CORPUS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
