#!/usr/bin/env python3
"""How many of ComfyUI's shipped workflow templates can sakuga run, at node level?

Run from the repository root, after `cargo build`:

  python3 scripts/template_coverage.py [--sakuga target/debug/sakuga] [--json out.json]

Templates: the PyPI package `comfyui-workflow-templates-json` (the JSON half of
`comfyui-workflow-templates`; the other halves are core = manifest, and media-* = previews).
It holds templates/index.json (categories -> template entries with `models`, `tags`,
`openSource`) and one UI-format (LiteGraph) workflow per entry. The script pip-installs it
with --target into target/tmp/templates once (--refresh reinstalls); no models are fetched.
Sakuga's node list comes from `sakuga nodes --json`.

What it counts, per template listed in index.json:
- node types: every node of the top-level graph and, through each active subgraph instance,
  of its definition in `definitions.subgraphs` (recursively). Skipped: muted (mode 2) and
  bypassed (mode 4) nodes, with everything inside them; the subgraph instance node itself;
  UI-only types (Reroute, PrimitiveNode, Note, MarkdownNote).
- class: "api" if it runs an API node, else "local" if it runs a model loader (a type
  containing "Loader", or Load*Model), else "model-free". There is no list of API nodes in
  the package, so an API node is a type that occurs only in templates the index marks as API
  (tag "API" or openSource false) and never in an unmarked one, is no loader, and is not a
  sakuga node. (Some core helpers used only by API templates, e.g. AudioMerge, count too;
  that only matters for templates that are marked API anyway.)
- family: the index's `models` list, vendor names dropped, the most specific name kept and
  coarsened by FAMILY_RULES (FLUX.1 Krea -> FLUX.1, Wan2.2 -> Wan2.2, LTX-2.3 -> LTX, ...).
- fully covered: sakuga has every counted node type. Missing-type rankings cover local and
  model-free templates only (API nodes call paid remote services).
"""
import argparse
import collections
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "comfyui-workflow-templates-json"
UI_ONLY = {"Reroute", "PrimitiveNode", "Note", "MarkdownNote"}
SKIP_MODES = {2, 4}  # muted, bypassed
NOT_MODEL_LOADERS = {"ConditioningLoader"}  # loads saved conditioning, not a model file
VENDORS = {"Stability", "Tencent", "Lightricks", "Nvidia", "Google", "ByteDance", "OpenAI",
           "Alibaba", "Black Forest Labs", "None"}
GENERIC = {"FLUX", "Wan", "Qwen"}  # umbrella names that come with a more specific one
FAMILY_RULES = [(r"^FLUX\.1", "FLUX.1"), (r"^FLUX\.2", "FLUX.2"), (r"^FLUX 3", "FLUX 3"),
                (r"^Wan2\.1", "Wan2.1"), (r"^Wan2\.2", "Wan2.2"), (r"^Wan2\.[5-9]", "Wan2.5+"),
                (r"^Qwen[- ]Image", "Qwen-Image"), (r"^LTX", "LTX"), (r"^Hunyuan", "Hunyuan"),
                (r"^Z-Image", "Z-Image"), (r"^Kling", "Kling"), (r"^Seedance", "Seedance"),
                (r"^Vidu", "Vidu"), (r"^(Nano Banana|Gemini)", "Gemini / Nano Banana"),
                (r"^(GPT|ChatGPT)", "OpenAI GPT"), (r"^Seedream", "Seedream")]


def install(target: Path, refresh: bool) -> Path:
    """pip-install the template package into `target` unless it is already there."""
    templates = target / "comfyui_workflow_templates_json" / "templates"
    if refresh or not (templates / "index.json").is_file():
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--upgrade",
               "--disable-pip-version-check", "--target", str(target), PACKAGE]
        print(f"installing {PACKAGE} into {target}", file=sys.stderr)
        subprocess.run(cmd, check=True, stdout=sys.stderr)
    return templates


def package_version(target: Path) -> str:
    dist = sorted(target.glob("comfyui_workflow_templates_json-*.dist-info"))
    return dist[-1].name.split("-")[1].removesuffix(".dist") if dist else "?"


def sakuga_nodes(binary: str) -> set:
    out = subprocess.run([binary, "nodes", "--json"], check=True, capture_output=True,
                         text=True).stdout
    return set(json.loads(out))


def is_loader(t: str) -> bool:
    return t not in NOT_MODEL_LOADERS and ("Loader" in t or bool(re.match(r"^Load\w*Model$", t)))


def active_types(workflow: dict) -> set:
    """Node types a UI-format workflow runs, descending into active subgraph instances."""
    subgraphs = {s["id"]: s for s in (workflow.get("definitions") or {}).get("subgraphs", [])}
    types, seen, stack = set(), set(), [workflow]
    while stack:
        graph = stack.pop()
        for node in graph.get("nodes", []):
            t = node.get("type")
            if node.get("mode", 0) in SKIP_MODES or t in UI_ONLY:
                continue
            if t in subgraphs:
                if t not in seen:
                    seen.add(t)
                    stack.append(subgraphs[t])
            else:
                types.add(t)
    return types


def family(models: list) -> str:
    names = [m for m in models if m not in VENDORS]
    names = [m for m in names if m not in GENERIC] or names
    if not names:
        return "(none)"
    for pattern, fam in FAMILY_RULES:
        if re.match(pattern, names[0]):
            return fam
    return names[0]


def load_templates(templates: Path) -> list:
    index = json.loads((templates / "index.json").read_text())
    out = []
    for category in index:
        for entry in category["templates"]:
            wf = json.loads((templates / f"{entry['name']}.json").read_text())
            out.append({
                "name": entry["name"],
                "category": category.get("title", ""),
                "family": family(entry.get("models", [])),
                "models": entry.get("models", []),
                "marked_api": "API" in entry.get("tags", []) or entry.get("openSource") is False,
                "node_types": sorted(active_types(wf)),
            })
    return out


def classify(rows: list, have: set) -> set:
    marked, unmarked = set(), set()
    for r in rows:
        (marked if r["marked_api"] else unmarked).update(r["node_types"])
    api_types = {t for t in marked - unmarked - have if not is_loader(t)}
    for r in rows:
        types = set(r["node_types"])
        r["api_types"] = sorted(types & api_types)
        r["loaders"] = sorted(t for t in types if is_loader(t))
        r["class"] = "api" if r["api_types"] else "local" if r["loaders"] else "model-free"
        r["missing_types"] = sorted(types - have)
        r["covered"] = not r["missing_types"]
    return api_types


def report(rows: list, have: set, api_types: set, version: str, min_family: int) -> str:
    cls = collections.Counter(r["class"] for r in rows)
    runnable = [r for r in rows if r["class"] != "api"]
    lines = [f"## Template coverage: {PACKAGE} {version} vs sakuga ({len(have)} node types)", "",
             f"- templates: {len(rows)} (local {cls['local']}, API {cls['api']}, "
             f"model-free {cls['model-free']})",
             f"- index marks {sum(r['marked_api'] for r in rows)} as API; "
             f"{len(api_types)} node types count as API nodes",
             f"- fully covered: {sum(r['covered'] for r in rows)} "
             f"(local {sum(r['covered'] for r in rows if r['class'] == 'local')}, "
             f"model-free {sum(r['covered'] for r in rows if r['class'] == 'model-free')})"]
    used = set().union(*(r["node_types"] for r in runnable))
    lines.append(f"- distinct node types in local + model-free templates: {len(used)}; "
                 f"sakuga has {len(used & have)}")
    unused = sorted(have - set().union(*(r["node_types"] for r in rows)))
    lines += [f"- sakuga node types used by no template: {', '.join(unused) or 'none'}", ""]

    fams = collections.defaultdict(list)
    for r in rows:
        fams[r["family"]].append(r)
    api_only = {f for f in fams if all(r["class"] == "api" for r in fams[f])}
    big = sorted((f for f in fams if len(fams[f]) >= min_family and f not in api_only),
                 key=lambda f: (-len(fams[f]), f))
    rest = [f for f in fams if f not in big and f not in api_only]
    lines += [f"### Per model family (from index.json `models`; rows for families with >= "
              f"{min_family} templates, not all API)", "",
              "| family | templates | local | API | model-free | fully covered |",
              "|---|---:|---:|---:|---:|---:|"]
    groups = [(f, fams[f]) for f in big]
    groups.append((f"other ({len(rest)} families)", [r for f in rest for r in fams[f]]))
    groups.append((f"API-only ({len(api_only)} families)", [r for f in api_only for r in fams[f]]))
    for name, rs in groups:
        c = collections.Counter(r["class"] for r in rs)
        lines.append(f"| {name} | {len(rs)} | {c['local']} | {c['api']} | {c['model-free']} "
                     f"| {sum(r['covered'] for r in rs)} |")

    need, only = collections.Counter(), collections.Counter()
    for r in runnable:
        need.update(r["missing_types"])
        if len(r["missing_types"]) == 1:
            only[r["missing_types"][0]] += 1
    lines += ["", f"### Top 40 missing node types (of {len(need)}; local + model-free "
              f"templates, {len(runnable)} in all)", "",
              "| # | node type | templates needing it | templates missing only this |",
              "|---:|---|---:|---:|"]
    for i, (t, n) in enumerate(sorted(need.items(), key=lambda kv: (-kv[1], kv[0]))[:40], 1):
        lines.append(f"| {i} | {t} | {n} | {only[t]} |")
    near = collections.Counter(len(r["missing_types"]) for r in runnable)
    lines += ["", "Local + model-free templates by number of missing types: " + ", ".join(
        f"{k}: {near[k]}" for k in sorted(near) if k <= 5)
        + f", >5: {sum(v for k, v in near.items() if k > 5)}", "",
        "Fully covered or missing at most 2 types:", ""]
    for r in sorted(runnable, key=lambda r: (len(r["missing_types"]), r["name"])):
        if len(r["missing_types"]) <= 2:
            lines.append(f"- {r['name']} ({r['family']}, {r['class']}): "
                         + (", ".join(r["missing_types"]) or "covered"))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sakuga", default=str(ROOT / "target/debug/sakuga"))
    ap.add_argument("--cache", default=str(ROOT / "target/tmp/templates"),
                    help="pip --target folder for the template package")
    ap.add_argument("--refresh", action="store_true", help="reinstall the package (newest)")
    ap.add_argument("--json", metavar="PATH", help="write per-template data here")
    ap.add_argument("--min-family", type=int, default=3,
                    help="families with fewer templates are lumped together")
    args = ap.parse_args()

    cache = Path(args.cache)
    templates = install(cache, args.refresh)
    have = sakuga_nodes(args.sakuga)
    rows = load_templates(templates)
    api_types = classify(rows, have)
    print(report(rows, have, api_types, package_version(cache), args.min_family))
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"package": PACKAGE, "version": package_version(cache),
             "sakuga_nodes": sorted(have), "api_node_types": sorted(api_types),
             "templates": rows}, indent=1) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
