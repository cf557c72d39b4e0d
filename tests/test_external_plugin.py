"""A head from a separate distribution (a .dist-info on sys.path) is listed and trained through the CLI
by its short name, with no change to the core."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from helpers import REPO, TINY_DATA, cli_env, run_cli, run_forked

PLUGIN_SOURCE = '''
"""A third-party global head: average pooling + linear projection, trained with plain softmax."""
import torch.nn.functional as F
from torch import nn

from retrieval_lightning.head import GlobalHead


class AvgPoolHead(GlobalHead):
    def __init__(self, dim: int = 64, stage: str = "conv5") -> None:
        super().__init__()
        self.stages = (stage,)
        self.stage = stage
        self.out_dim = dim

    def _build(self, stage_channels, num_classes):
        self.proj = nn.Linear(stage_channels[self.stage], self.out_dim)
        self.classifier = nn.Linear(self.out_dim, max(num_classes, 1))

    @property
    def dim(self):
        return self.out_dim

    def pool(self, features):
        return self.proj(features[self.stage].mean(dim=(2, 3)))

    def embed(self, features):
        return F.normalize(self.pool(features), dim=-1)

    def losses(self, features, labels):
        return {"softmax": F.cross_entropy(self.classifier(self.pool(features)), labels)}
'''


def make_plugin_distribution(root: Path) -> None:
    (root / "acme_heads.py").write_text(PLUGIN_SOURCE)
    info = root / "acme_retrieval_heads-0.3.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-retrieval-heads\nVersion: 0.3.0\n")
    (info / "entry_points.txt").write_text("[retrieval_lightning.heads]\nacme_avgpool = acme_heads:AvgPoolHead\n")


@pytest.mark.slow
def test_third_party_head_is_listed_and_trained_by_short_name(cache_root: Path, tmp_path: Path) -> None:
    plugin_dir = tmp_path / "site"
    plugin_dir.mkdir()
    make_plugin_distribution(plugin_dir)
    env = cli_env(extra_pythonpath=str(plugin_dir), threads=2)

    listing = run_cli(["plugins"], cwd=tmp_path, env=env).stdout
    row = next(line.split() for line in listing.splitlines() if " acme_avgpool " in f" {line} ")
    assert row[:5] == ["head", "acme_avgpool", "global", "acme-retrieval-heads", "0.3.0"]

    out = tmp_path / "run"  # forked from a process that imported the package before the plugin was installed
    run_forked(["fit", "--config", str(REPO / "experiments/demo.yaml"), f"--data.init_args.root={cache_root}",
                *TINY_DATA, "--model.heads.global.class_path=acme_avgpool", "--model.heads.global.init_args.dim=32",
                "--trainer.max_steps=2", "--trainer.logger=false", f"--trainer.default_root_dir={out}"],
               cwd=tmp_path, env=env)
    ckpt = sorted(out.rglob("*.ckpt"))[-1]
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert state["global_step"] == 2
    # the trained head is the plugin's, with the configured width: exactly its parameters
    head = {k.removeprefix("heads.global."): tuple(v.shape) for k, v in state["state_dict"].items()
            if k.startswith("heads.global.")}
    assert set(head) == {"proj.weight", "proj.bias", "classifier.weight", "classifier.bias"}
    assert head["proj.weight"][0] == 32 and head["classifier.weight"][1] == 32
    # and the run's recorded configuration names the plugin and its arguments
    config = yaml.safe_load((out / "config.yaml").read_text())
    recorded = config["model"]["heads"]["global"]
    assert recorded["class_path"].rsplit(".", 1)[-1] == "acme_avgpool" and recorded["init_args"]["dim"] == 32
