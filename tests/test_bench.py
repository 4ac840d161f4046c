"""bench/recipes.py end to end on two training steps per recipe."""

from __future__ import annotations

import pytest
from conftest import ROOT

import main
from bench import recipes


@pytest.mark.slow
def test_recipes_train_score_and_tabulate(tmp_path, capsys):
    main.main([
        "--base", str(ROOT / "configs" / "tiny" / "autoencoder.yaml"), "-t", "--max_steps", "1",
        "--no-test", "-l", str(tmp_path / "ae"), "data.params.batch_size=4",
        "data.params.num_workers=0", "lightning.trainer.limit_val_batches=1",
    ])  # fmt: skip
    (ae_run,) = (tmp_path / "ae").iterdir()
    results = recipes.main([
        "--ae_ckpt", str(ae_run / "checkpoints" / "last.ckpt"), "--steps", "2",
        "--recipes", "sd,all", "--logdir", str(tmp_path / "runs"), "--n_per_prompt", "1",
    ])  # fmt: skip
    assert [r["recipe"] for r in results] == ["sd", "all"]
    for result in results:
        assert result["steps"] == 2 and result["final_loss_simple"] > 0
        assert set(result["eta0"]) == {"color", "shape", "background"}
    (run,) = (tmp_path / "runs").glob("*_recipe-all")
    project = next((run / "configs").glob("*-project.yaml")).read_text()
    assert "immiscible: true" in project and "offset_noise_strength: 0.1" in project
    assert "| sd |" in capsys.readouterr().out


def test_unknown_recipe_is_named(capsys):
    with pytest.raises(SystemExit, match="nope"):
        recipes.main(["--ae_ckpt", "x.ckpt", "--recipes", "sd,nope"])
