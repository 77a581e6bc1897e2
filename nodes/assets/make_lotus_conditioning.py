#!/usr/bin/env python3
"""Writes lotus_conditioning.safetensors: the fixed prompt embedding ComfyUI's
`LotusConditioning` node returns (Lotus was trained with a frozen text encoder on an empty
prompt; ComfyUI inlines the result, [1, 2, 1024], in comfy_extras/nodes_lotus.py).

    /work/comfyui-bench/venv/bin/python nodes/assets/make_lotus_conditioning.py \
        /work/comfyui-bench/src/comfy_extras/nodes_lotus.py

The values are read from that file's tensor literal (they are float16 values) and stored as
float16, exactly.
"""
import ast
import pathlib
import sys

import torch
from safetensors.torch import save_file


def main():
    source = pathlib.Path(sys.argv[1]).read_text()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "tensor":
            values = ast.literal_eval(node.args[0])
            break
    else:
        raise SystemExit("no torch.tensor literal found")
    t = torch.tensor(values, dtype=torch.float32)
    assert t.dim() == 3 and t.shape[0] == 1 and t.shape[2] == 1024, t.shape
    half = t.half()
    assert torch.equal(half.float(), t), "the literal is not exactly float16"
    out = pathlib.Path(__file__).with_name("lotus_conditioning.safetensors")
    save_file({"prompt_embeds": half.contiguous()}, str(out))
    print(out, tuple(t.shape))


if __name__ == "__main__":
    main()
