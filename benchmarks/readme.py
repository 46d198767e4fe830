"""Write the generated parts of the docs from their one source each, or check them.

    python -m benchmarks.readme          # rewrite every generated part
    python -m benchmarks.readme --check  # exit 1, naming each stale file, when one differs

What is generated, and from what:
- result tables, between ``<!-- NAME:start ... -->`` and ``<!-- NAME:end -->`` markers in
  ``docs/results.md`` (and in ``README.md`` if it has any): copied from
  ``benchmarks/results/*.md`` (``TABLES``), which the benchmark scripts write;
- the supported-ops table (``ops-table`` markers, ``docs/how-it-works.md``): from the op
  registry (``lcpc.ops.markdown_table``);
- the manifest's field list (``manifest-fields`` markers, ``docs/manifest.md``): from the
  JSON Schema the package ships (``lcpc/schema/manifest-2.schema.json``);
- ``docs/cli.md``, the whole file: from the click commands themselves (``lcpc.cli.main``:
  each command's usage, help text and parameters), never from a hand-written list.

So every number and option the docs show is the one the scripts last printed or the code
accepts today; ``tests/test_docs.py`` runs the same check.
"""

from __future__ import annotations

import inspect
import json
import re
import sys
from pathlib import Path
from typing import Any

import click

from lcpc.cli import main as cli
from lcpc.ops import markdown_table
from lcpc.runtime.manifest import schema as manifest_schema

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
REGENERATE = "python -m benchmarks.readme"

# marker -> (results file, how many levels to push its markdown headings down)
TABLES: dict[str, tuple[str, int]] = {
    "recovery-table": ("recovery.md", 0),
    "recovery-shapes-table": ("recovery_shapes.md", 0),
    "recovery-curve-table": ("recovery_curve.md", 0),
    "recovery-synth-digits-table": ("recovery_synth_digits.md", 0),
    "recovery-synth-shapes-table": ("recovery_synth_shapes.md", 0),
    "recovery-scale-table": ("recovery_scale.md", 0),
    "recovery-gpu-table": ("recovery_gpu_cpu.md", 0),
    "pareto-table": ("pareto.md", 0),
    "pareto-refit-table": ("pareto_refit.md", 0),
    "pareto-lite0-table": ("pareto_lite0.md", 0),
    "speed-table": ("speed.md", 0),
    "narrow-table": ("narrow.md", 0),
    "channel-blocks-table": ("channel_blocks.md", 0),
    "convert-cost-table": ("convert_cost.md", 0),
    "convert-cost-k16-table": ("convert_cost_k16.md", 0),
    "ray-overhead-table": ("ray_overhead.md", 0),
    "latency-table": ("latency.md", 1),
    "compress-table": ("compress.md", 0),
    "netns-latency-table": ("netns_latency.md", 0),
    "netns-latency-compiled-table": ("netns_latency_compiled-graph.md", 0),
    "netns-degrade-table": ("netns_degrade.md", 0),
    "branch-dropout-table": ("branch_dropout.md", 0),
    "branch-dropout-shapes-table": ("branch_dropout_shapes.md", 0),
    "plan-table": ("plan.md", 0),
    "wire-coding-table": ("wire_coding.md", 0),
    "encoded-table": ("encoded.md", 0),
    "netns-encoded-table": ("netns_encoded.md", 0),
    "hls-table": ("hls.md", 0),
    "hls-from-int8-table": ("hls_from_int8.md", 0),
}

# the files with markers, and the markers each must hold
MARKED: dict[str, tuple[str, ...]] = {
    "README.md": (),
    "docs/results.md": tuple(TABLES),
    "docs/how-it-works.md": ("ops-table",),
    "docs/manifest.md": ("manifest-fields",),
}
CLI = "docs/cli.md"


# ----------------------------------------------------------------------------- marked blocks
def result_table(marker: str) -> str:
    name, demote = TABLES[marker]
    text = (RESULTS / name).read_text().strip() + "\n"
    if demote:
        text = re.sub(r"^(#+) ", lambda m: "#" * (len(m.group(1)) + demote) + " ", text, flags=re.MULTILINE)
    return text


def manifest_fields() -> str:
    """One row per field of the manifest schema: where it is, its type, whether it is required."""
    schema = manifest_schema()
    defs = schema.get("$defs", {})
    rows: list[str] = []

    def resolve(node: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
        ref = node.get("$ref")
        if ref:
            name = ref.rsplit("/", 1)[-1]
            return {**defs[name], **{k: v for k, v in node.items() if k != "$ref"}}, name
        return node, None

    def kind(node: dict[str, Any], ref: str | None) -> str:
        if "const" in node:
            return f"`{json.dumps(node['const'])}`"
        if "enum" in node:
            return " \\| ".join(f"`{v}`" for v in node["enum"])
        types = node.get("type", "any")
        text = " or ".join(types) if isinstance(types, list) else types
        if text == "array":
            item, item_ref = resolve(node.get("items", {}))
            text = f"array of {item_ref or kind(item, None)}"
        elif text == "object" and "additionalProperties" in node and isinstance(node["additionalProperties"], dict):
            value, value_ref = resolve(node["additionalProperties"])
            text = f"map to {value_ref or kind(value, None)}"
        elif ref in ("sha256", "file", "count", "device", "name", "shape"):
            text = ref
        return text

    spelled: set[str] = set()  # a shared definition (``tensor``) is spelled out once

    def walk(node: dict[str, Any], path: str, required: bool, ref: str | None) -> None:
        rows.append(f"| `{path}` | {kind(node, ref)} | {'yes' if required else ''} |")
        if node.get("type") == "array" and isinstance(node.get("items"), dict):
            node, ref = resolve(node["items"])
            path += "[]"
        if ref is not None:
            if ref in spelled:
                return
            spelled.add(ref)
        for name, child in (node.get("properties") or {}).items():
            child, child_ref = resolve(child)
            walk(child, f"{path}.{name}", name in node.get("required", ()), child_ref)

    for name, child in schema["properties"].items():
        child, ref = resolve(child)
        walk(child, name, name in schema.get("required", ()), ref)
    lines = ["| field | type | required |", "|---|---|---|", *rows]
    return "\n".join(lines) + "\n"


def block(marker: str) -> str:
    if marker in TABLES:
        return result_table(marker)
    if marker == "ops-table":
        return markdown_table()
    if marker == "manifest-fields":
        return manifest_fields()
    raise SystemExit(f"unknown generated-block marker {marker!r}")


MARKER = re.compile(r"(<!-- ([a-z0-9-]+):start[^\n]*-->\n)(.*?)(<!-- \2:end -->)", re.DOTALL)


def render(text: str, required: tuple[str, ...] = (), where: str = "the text") -> str:
    """``text`` with every marked block filled from its source; ``required`` markers must be there."""
    found = {m.group(2) for m in MARKER.finditer(text)}
    missing = [m for m in required if m not in found]
    if missing:
        raise SystemExit(f"{where} has no {', '.join(missing)} markers")
    return MARKER.sub(lambda m: m.group(1) + block(m.group(2)) + m.group(4), text)


# ----------------------------------------------------------------------------- the CLI reference
ORDER = ("convert", "run", "serve", "report", "verify", "recover", "bench", "inspect")


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _value(param: click.Parameter) -> str:
    """What the parameter takes: its choices, its metavar, or its type."""
    if isinstance(param, click.Option) and param.is_flag:
        return "flag"
    kind = param.type
    if isinstance(kind, click.Choice):
        return " \\| ".join(f"`{c}`" for c in kind.choices)
    if isinstance(kind, click.Path):
        name = "file" if not kind.dir_okay else "folder" if not kind.file_okay else "path"
    else:
        name = kind.name
    return f"`{_cell(param.metavar)}` ({name})" if param.metavar else name


def _default(param: click.Parameter, help_text: str) -> tuple[str, str]:
    """The default as click holds it (in code type), or as the help text states it (``[default: ...]``,
    for defaults decided later: plain type), and the help without that note."""
    default = param.default
    unset = default is None or type(default).__name__ == "Sentinel" or default == () \
        or (isinstance(param, click.Option) and param.is_flag and default is False)
    if not unset:
        return f"`{default}`", help_text
    note = re.search(r"\s*\[default: ([^\]]+)\]", help_text)
    if note:
        return _cell(note.group(1)), (help_text[:note.start()] + help_text[note.end():]).strip()
    return "", help_text


def _command(name: str, cmd: click.Command, parent: click.Context) -> list[str]:
    ctx = click.Context(cmd, info_name=name, parent=parent)
    usage = cmd.get_usage(ctx).removeprefix("Usage: ")
    out = [f"## lcpc {name}", "", "```", usage, "```", "", inspect.cleandoc(cmd.help or "").replace("\b\n", ""), ""]
    arguments = [p for p in cmd.params if isinstance(p, click.Argument)]
    options = [p for p in cmd.params if isinstance(p, click.Option)]
    if arguments:
        out += ["| argument | takes |", "|---|---|"]
        out += [f"| `{p.human_readable_name}` | {_value(p)} |" for p in arguments]
        out.append("")
    out += ["| option | takes | default | what it does |", "|---|---|---|---|"]
    for p in options:
        names = ", ".join(f"`{o}`" for o in sorted(p.opts, key=len) + p.secondary_opts)
        default, help_text = _default(p, p.help or "")
        notes = [t for t, on in (("Required.", p.required),
                                 ("Repeatable.", p.multiple and "repeatable" not in help_text.lower())) if on]
        out.append(f"| {names} | {_value(p)} | {default} | {_cell(' '.join([help_text, *notes]).strip())} |")
    out += ["| `--help` | flag |  | Show the command's help and exit. |", ""]
    return out


def cli_reference() -> str:
    """``docs/cli.md``: every command of ``lcpc.cli.main`` with its usage, help and parameters."""
    root = click.Context(cli, info_name="lcpc")
    names = [n for n in ORDER if n in cli.commands] + sorted(set(cli.commands) - set(ORDER))
    about = ("Global options: `--version` (print the version and exit), `--help`. Every command also "
             "takes `--help`. Any bad input ends in one line `error: ...` and a non-zero exit code "
             "(`--debug` shows the traceback). What the options mean in depth: [how it works](how-it-works.md); "
             "the folder the commands read: [the manifest](manifest.md); running on several machines: "
             "[deployment](deployment.md).")
    out = ["<!-- generated from lcpc/cli.py by `python -m benchmarks.readme`; do not edit -->", "",
           "# Command-line reference", "",
           _cell(inspect.cleandoc(cli.help or "")), "",
           "```", cli.get_usage(root).removeprefix("Usage: "), "```", "",
           about, "",
           "Commands: " + ", ".join(f"[`{n}`](#lcpc-{n})" for n in names) + ".", ""]
    for name in names:
        out += _command(name, cli.commands[name], root)
    return "\n".join(out).rstrip() + "\n"


# ----------------------------------------------------------------------------- all of it
def generated() -> dict[str, tuple[str, str]]:
    """Each generated file: (what it holds now, what it should hold)."""
    files: dict[str, tuple[str, str]] = {}
    for name, required in MARKED.items():
        path = ROOT / name
        if not path.is_file():
            raise SystemExit(f"{name} is missing")
        now = path.read_text()
        files[name] = (now, render(now, required, name))
    cli = ROOT / CLI
    files[CLI] = (cli.read_text() if cli.is_file() else "", cli_reference())
    return files


def main(argv: list[str] | None = None) -> int:
    check = "--check" in (sys.argv[1:] if argv is None else argv)
    stale = []
    for name, (now, new) in generated().items():
        if now == new:
            continue
        stale.append(name)
        if not check:
            (ROOT / name).write_text(new)
    if check and stale:
        print(f"out of date: {', '.join(stale)}; regenerate with: {REGENERATE}", file=sys.stderr)
        return 1
    if not check and stale:
        print(f"rewrote {', '.join(stale)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
