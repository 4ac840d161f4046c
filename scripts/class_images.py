"""Generate DreamBooth class images with the base model, once: what is there is reused.

    python scripts/class_images.py --ckpt v1-5-pruned-emaonly.safetensors \\
        --config configs/stable-diffusion/v1-inference.yaml \\
        --prompt "a photo of a dog" --n_images 200 --outdir data/class-dog

Writes OUTDIR/samples/00000.png ... until the folder holds at least --n_images images; run again, it
adds only what is missing (with seeds after those used), so a training config can name the
folder (`ImageCaptionFolder` with `caption:` the class prompt) and this step can run before
every training without redoing work. Every txt2img.py option applies (sampler, steps, scale,
size, precision, --lora).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts import txt2img  # noqa: E402


def get_parser():
    parser = txt2img.get_parser()
    parser.description = __doc__.split("\n")[0]
    parser.add_argument("--n_images", type=int, required=True, help="class images wanted")
    parser.set_defaults(n_samples=4, skip_grid=True, outdir="outputs/class-images")
    return parser


def without_n_images(argv: list[str]) -> list[str]:
    """The arguments for txt2img.py: ours without --n_images and its value."""
    kept, skip = [], False
    for arg in argv:
        if skip or arg.startswith("--n_images="):
            skip = False
            continue
        skip = arg == "--n_images"
        if not skip:
            kept.append(arg)
    return kept


def main(argv: list[str] | None = None) -> dict:
    opt = get_parser().parse_args(argv)
    if opt.n_images < 1:
        sys.exit(f"class_images.py: --n_images {opt.n_images}: expected at least 1")
    if opt.from_file:
        sys.exit("class_images.py: one class prompt (--prompt), not --from-file")
    folder = Path(opt.outdir) / "samples"
    have = len(list(folder.glob("*.png"))) if folder.is_dir() else 0
    missing = max(opt.n_images - have, 0)
    if missing:
        batch = min(opt.n_samples, missing)
        flags = ["--n_samples", str(batch), "--n_iter", str(math.ceil(missing / batch))]
        flags += ["--outdir", opt.outdir, "--skip_grid", "--seed", str(opt.seed + have)]
        txt2img.main([*without_n_images(argv or sys.argv[1:]), *flags])
    summary = {"folder": str(folder), "had": have, "made": missing, "prompt": opt.prompt}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
