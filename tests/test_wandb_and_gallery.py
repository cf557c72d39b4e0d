"""W&B (offline, no API key): the resolved config reaches the run, twice in one directory without the
`config.yaml` clash; the query/top-k gallery picture is saved and logged."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from PIL import Image

from helpers import REPO, TINY_DATA, run_main


@pytest.mark.slow
def test_config_and_gallery_reach_wandb_offline(cache_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save_dir = tmp_path / "wandb_runs"
    args = ["test", "--config", str(REPO / "experiments/demo.yaml"), f"--data.init_args.root={cache_root}", *TINY_DATA,
            f"--trainer.default_root_dir={tmp_path}/out", f"--trainer.logger.init_args.save_dir={save_dir}",
            "--model.heads.global.init_args.margin_m=0.123"]
    monkeypatch.setenv("WANDB_DIR", str(save_dir))
    run_main(args, cwd=tmp_path)
    run_main(args, cwd=tmp_path)  # a second run in the same save_dir must not clash

    runs = sorted(save_dir.rglob("offline-run-*"))
    assert len(runs) == 2, runs
    for run in runs:
        saved = yaml.safe_load((run / "files" / "lightning_config.yaml").read_text())
        assert saved["model"]["heads"]["global"]["init_args"]["margin_m"] == 0.123
        # the run.config update is a JSON record inside the offline run file (synced later)
        record = next(run.glob("run-*.wandb")).read_bytes()
        assert b'"margin_m":0.123' in record
        assert b'"class_path":"retrieval_lightning.backbone.Backbone"' in record
        media = list((run / "files" / "media" / "images").rglob("*.png"))
        assert media, f"no gallery image logged to {run}"

    pictures = sorted((tmp_path / "out").rglob("gallery/test_minilandmarks_step0.png"))
    assert pictures
    with Image.open(pictures[0]) as picture:
        assert picture.width > 400 and picture.height > 200
