"""``ticketlab export``: a run's network compacted for inference (dead units out, dense
or CSR per layer), checked against the original, written as safetensors + JSON."""

from __future__ import annotations

import argparse
import sys


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "export",
        help="compact a run's network for inference: dead units out, dense/CSR per layer",
        description="Remove the units no surviving weight connects, fold the biases of "
        "removed units forward, store each layer dense or CSR (safetensors + manifest.json), "
        "check the outputs against the masked original and measure latency. Load the result "
        "with ticketlab.load_exported(OUT_DIR).",
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("-o", "--out", required=True, metavar="OUT_DIR", help="export directory")
    p.add_argument("--level", type=int, help="level to export (default: the last)")
    p.add_argument(
        "--variant",
        help="variant to export (default: ticket, or the method's own if it has no ticket)",
    )
    p.add_argument("--replicate", type=int, default=0, help="replicate (default 0)")
    p.add_argument(
        "--format",
        choices=("auto", "dense", "csr"),
        default="auto",
        help="per-layer storage: auto (default; the faster of dense and CSR, timed here "
        "at --batch-size), dense or csr",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=256,
        help="batch size for choosing formats and measuring latency (256)",
    )
    p.add_argument(
        "--onnx", action="store_true", help="also write model.onnx (needs the onnx package)"
    )
    p.add_argument("--data-dir", help="where the run's dataset is (for the check's test batch)")
    p.add_argument("--quiet", action="store_true", help="print nothing on success")
    p.set_defaults(handler=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from ..errors import UsageError
    from ..export import ExportCheckError, export_run

    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1; got {args.batch_size}")
    try:
        m = export_run(
            args.run_dir,
            args.out,
            replicate=args.replicate,
            level=args.level,
            variant=args.variant,
            format=args.format,
            batch_size=args.batch_size,
            onnx=args.onnx,
            data_dir=args.data_dir,
        )
    except ExportCheckError as exc:
        print(f"ticketlab: export check failed: {exc}", file=sys.stderr)
        return 1
    if not args.quiet:
        for line in summary(m, args.out):
            print(line)
    return 0


def summary(m: dict, out: str) -> list[str]:
    """The lines ``export`` prints about what it wrote."""
    src, c, lat, chk = m["source"], m["counts"], m["latency"], m["check"]
    lines = [
        f"exported {src['run']} replicate {src['replicate']} level {src['level']} "
        f"{src['variant']} ({src['model']}) -> {out}"
    ]
    units = ", ".join(f"{g} {k}/{n}" for g, (k, n) in m["units"].items())
    lines.append(f"units kept: {units}")
    layers = []
    for name, info in m["layers"].items():
        shape = "x".join(map(str, info["shape"]))
        layers.append(f"{name} {info['format']} {shape} ({info['nonzero']:,} nonzero)")
    lines.append("layers: " + "; ".join(layers))
    ratio = c["original_parameters"] / max(c["exported_values"], 1)
    size = c["original_bytes"] / max(c["exported_bytes"], 1)
    lines.append(
        f"parameters: {c['original_parameters']:,} ({c['original_nonzero']:,} nonzero) -> "
        f"{c['exported_values']:,} stored values ({ratio:.1f}x fewer); bytes: "
        f"{c['original_bytes']:,} -> {c['exported_bytes']:,} ({size:.1f}x smaller)"
    )
    lines.append(
        f"check: max |exported - original| = {chk['max_abs_diff']:.3g} on {chk['inputs']} "
        f"(tolerance {chk['tolerance']:g})"
    )
    lines.append(
        f"latency at batch {lat['batch_size']} ({lat['threads']} thread(s)): dense "
        f"{lat['dense_seconds'] * 1e3:.3f} ms, exported {lat['exported_seconds'] * 1e3:.3f} ms "
        f"({lat['speedup']:.2f}x)"
    )
    if "onnx" in m:
        o = m["onnx"]
        how = (
            f"checked with {o['checked_with']} (max diff {o['max_abs_diff']:.3g})"
            if o.get("checked_with")
            else "onnxruntime not installed: not run"
        )
        lines.append(f"onnx: {o['file']} ({how})")
    return lines
