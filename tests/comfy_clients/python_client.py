"""Drives sakuga's ComfyUI API with comfy-api-simplified (PyPI), a client nobody here wrote.

Usage: python_client.py SITE_DIR URL EXAMPLES_DIR WORK_DIR; prints one JSON summary line.
"""
import asyncio
import json
import sys

sys.path.insert(0, sys.argv[1])
from comfy_api_simplified import ComfyApiWrapper, ComfyWorkflowWrapper  # noqa: E402

url, examples, work = sys.argv[2], sys.argv[3], sys.argv[4]
api = ComfyApiWrapper(url)
summary = {}

# Text to image: queue, follow the WebSocket, read /history, fetch the file through /view.
wf = ComfyWorkflowWrapper(f"{examples}/anime_txt2img.json")
wf.set_node_param("KSampler", "seed", 4242)
images = api.queue_and_wait_images(wf, "Save Image")
first = next(iter(images.values()))
summary["txt2img"] = {"names": sorted(images), "png": first[:4] == b"\x89PNG"}

# Image to image from an uploaded picture: /upload/image, then LoadImage reads it.
source = f"{work}/source.png"
with open(source, "wb") as f:
    f.write(first)
uploaded = api.upload_image(source, subfolder="clients")
wf = ComfyWorkflowWrapper(f"{examples}/img2img_lora.json")
wf["5"] = {
    "class_type": "LoadImage",
    "inputs": {"image": f"{uploaded['subfolder']}/{uploaded['name']}"},
    "_meta": {"title": "Uploaded source"},
}
images = api.queue_and_wait_images(wf, "Save Image")
summary["img2img"] = {
    "uploaded": uploaded,
    "png": all(v[:4] == b"\x89PNG" for v in images.values()),
    "count": len(images),
}

# The animation preview: frames arrive as binary WebSocket previews.
wf = ComfyWorkflowWrapper(f"{examples}/anime_preview.json")
prompt_id, frames = asyncio.run(api.queue_prompt_and_wait(wf))
summary["preview"] = {
    "frames": len(frames),
    "png": all(f[:4] == b"\x89PNG" for f in frames),
    "history": api.get_history(prompt_id)[prompt_id]["status"]["status_str"],
}
summary["queue"] = api.get_queue()
print(json.dumps(summary))
