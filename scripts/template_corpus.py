#!/usr/bin/env python3
"""Writes the template corpus `tests/workflows/templates/`: ComfyUI's own workflow templates
(PyPI `comfyui-workflow-templates-json`, UI format, unchanged graphs) with their model file
names mapped to sakuga's demo models and their latent sizes cut to 128 px, so
`tests/template_corpus.rs` can validate and run each one on a CPU in seconds.

    python3 scripts/template_corpus.py            # (re)writes the corpus
    python3 scripts/template_corpus.py --check    # exits 1 if the corpus is stale

Only the mapped names, the `EmptyLatentImage` size and the template's own `models` download
list (dropped: it names files sakuga never fetches) change; everything else is byte-for-byte
what ComfyUI ships. The package is installed by `scripts/template_coverage.py`'s installer
into target/tmp/templates.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from template_coverage import install  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "tests" / "workflows" / "templates"

# ComfyUI's model file names -> sakuga's demo models of the same architecture.
MODEL_NAMES = {
    "sd_xl_base_1.0.safetensors": "sakuga-demo-sdxl.safetensors",
    "sd_xl_refiner_1.0.safetensors": "sakuga-demo-sdxl-refiner.safetensors",
    "sd_xl_turbo_1.0_fp16.safetensors": "sakuga-demo-sdxl.safetensors",
}

# Templates whose every node sakuga has, on architectures it runs.
TEMPLATES = [
    "image_sdxl_simple",
    "sdxl_simple_example",
    "sdxl_refiner_prompt_example",
    "sdxlturbo_example",
    "basic_mask_operations_and_compositing",
]

SIDE = 128


def mapped(value):
    """`value` with any known model file name replaced, recursively."""
    if isinstance(value, str):
        return MODEL_NAMES.get(value, value)
    if isinstance(value, list):
        return [mapped(v) for v in value]
    if isinstance(value, dict):
        return {k: mapped(v) for k, v in value.items()}
    return value


def shrink(nodes: list) -> None:
    """Latent sizes down to SIDE x SIDE (the graphs keep their batch sizes)."""
    for node in nodes:
        if node.get("type") == "EmptyLatentImage":
            node["widgets_values"][0] = SIDE
            node["widgets_values"][1] = SIDE
        node.get("properties", {}).pop("models", None)


def convert(template: dict) -> dict:
    workflow = mapped(template)
    workflow.pop("models", None)
    shrink(workflow["nodes"])
    for subgraph in workflow.get("definitions", {}).get("subgraphs", []):
        shrink(subgraph["nodes"])
    return workflow


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="fail if the corpus is stale")
    args = parser.parse_args()
    templates = install(ROOT / "target" / "tmp" / "templates", refresh=False)
    CORPUS.mkdir(parents=True, exist_ok=True)
    stale = []
    for name in TEMPLATES:
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
    print(f"{len(TEMPLATES)} templates in {CORPUS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
