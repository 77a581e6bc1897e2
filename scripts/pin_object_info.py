#!/usr/bin/env python3
"""Pins ComfyUI's own /object_info for the classes sakuga also has.

`nodes/tests/object_info.rs` checks every shared class against this file (inputs, types,
defaults, ranges, choices, outputs). Run a ComfyUI checkout with no custom nodes
(`python main.py --cpu --port 8191`), then:

    python3 scripts/pin_object_info.py http://127.0.0.1:8191 > nodes/tests/fixtures/comfyui_object_info.json

sakuga's classes are read from the node sources (`NodeSchema::new("Class", ...)`).
"""

import glob
import json
import re
import sys
import urllib.request

KEEP = ("input", "input_order", "output", "output_is_list", "output_name",
        "output_node", "category", "display_name")


def main() -> None:
    url = sys.argv[1].rstrip("/")
    info = json.load(urllib.request.urlopen(f"{url}/object_info"))
    version = json.load(urllib.request.urlopen(f"{url}/system_stats"))["system"]
    sources = "".join(open(f).read() for f in glob.glob("nodes/src/**/*.rs", recursive=True))
    ours = set(re.findall(r'NodeSchema::new\(\s*"([A-Za-z0-9_]+)"', sources))
    classes = {c: {k: info[c][k] for k in KEEP if k in info[c]} for c in sorted(ours & set(info))}
    pinned = {"comfyui": f"{version.get('comfyui_version', '?')} (/object_info, --cpu, no custom nodes)",
              "classes": classes}
    # Key order is kept: a dynamic combo's inputs are laid out in the order ComfyUI lists them.
    json.dump(pinned, sys.stdout, indent=1)


if __name__ == "__main__":
    main()
