"""Does fine-tuning help? The demo recipe on a minilandmarks benchmark built with extra real photos.

Runs ``retrieval-lightning finetune`` (test the untrained ImageNet GeM model, fine-tune, test again)
on minilandmarks built from scikit-image's photos plus ``--photos`` (default: ../shared/data/photos),
and prints the before/after mAP table; the test photos are disjoint from the training photos.

    .venv/bin/python benchmarks/minilandmarks_finetune.py [--photos DIR] [extra CLI overrides ...]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", default=str(REPO.parent / "shared" / "data" / "photos"))
    parser.add_argument("--output", default="outputs/minilandmarks_finetune")
    args, overrides = parser.parse_known_args()
    if not Path(args.photos).is_dir():
        print(f"photo folder not found: {args.photos}", file=sys.stderr)
        return 2
    cli = shutil.which("retrieval-lightning") or str(Path(sys.executable).with_name("retrieval-lightning"))
    command = [cli, "finetune", "--config", str(REPO / "experiments/demo.yaml"),
               f"--data.init_args.photo_dirs=[{args.photos}]", f"--trainer.default_root_dir={args.output}",
               f"--trainer.logger.init_args.save_dir={args.output}", *overrides]
    print("running:", " ".join(command), flush=True)
    return subprocess.call(command)


if __name__ == "__main__":
    sys.exit(main())
