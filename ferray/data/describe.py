"""Human-readable summaries of a prepared dataset's manifest (Ray-free; `ferray prepare`, `info`,
`synth`, the demo and the report print them)."""

from __future__ import annotations

from ferray.data.contract import EMOTIONS


def format_manifest(m: dict, root) -> str:
    h, w = m["image_size"]
    src = m.get("source", {})
    lines = [f"{root}: {m['rows']:,} faces, {h}x{w} grayscale ({m['format']})", "source: " + describe_source(src)]
    names = ["split", *EMOTIONS, "total"]
    width = [max(11, len(n) + 1) if i == 0 else max(8, len(n) + 1) for i, n in enumerate(names)]
    lines.append("".join(n.ljust(width[0]) if i == 0 else n.rjust(width[i]) for i, n in enumerate(names)))
    for split, info in m["splits"].items():
        cells = [split.ljust(width[0])]
        cells += [f"{info['classes'][e]:,}".rjust(width[i + 1]) for i, e in enumerate(EMOTIONS)]
        cells.append(f"{info['rows']:,}".rjust(width[-1]))
        lines.append("".join(cells))
    skipped = m.get("skipped", {})
    if skipped.get("total"):
        kinds = ", ".join(f"{k} {n}" for k, n in skipped["by_kind"].items())
        lines.append(f"skipped: {skipped['total']} bad records ({kinds}); listed in {skipped.get('records_file')}")
    else:
        lines.append("skipped: none")
    for key, value in m.get("notes", {}).items():
        lines.append(f"note: {key}: {value}")
    lines.append(f"checksum: {m['checksum']}")
    return "\n".join(lines)


def describe_source(src: dict) -> str:
    if src.get("kind") == "upscaled":
        how = src["method"] + (f" ({src['generator_checkpoint']})" if src.get("generator_checkpoint") else "")
        return f"{src['from']} upscaled x{src['scale']} by {how}"
    if "path" in src:
        return f"{src['path']} [{src['kind']}]"
    return ", ".join(f"{k} {v}" for k, v in src.items())
