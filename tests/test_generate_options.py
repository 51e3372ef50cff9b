"""The SPELL and final-check options of ``generate`` on the command line: bad values are one line
on stderr with exit code 2 and nothing written; good ones reach the run (run.json, sample rows)."""

import json

import pandas as pd
import pytest

from spellshield.jobs.cli import main


@pytest.mark.parametrize("flag, value, message", [
    ("--batch-radius", "0", "--batch-radius must be > 0"),
    ("--history-radius", "-1", "--history-radius must be > 0"),
    ("--history-size", "0", "--history-size must be >= 1"),
    ("--max-attempts", "0", "--max-attempts must be >= 1"),
    ("--correction-iterations", "0", "--correction-iterations must be >= 1"),
    ("--max-neighbours", "0", "--max-neighbours must be >= 1"),
    ("--overcompensation", "0", "--overcompensation must be > 0"),
    # every number is checked for finiteness and range at the edge, before Ray starts
    ("--overcompensation", "inf", "--overcompensation must be a finite number, got inf"),
    ("--radius", "inf", "--radius must be a finite number, got inf"),
    ("--radius", "nan", "--radius must be a finite number, got nan"),
    ("--guidance-scale", "nan", "--guidance-scale must be a finite number"),
    ("--seed", "18446744073709551615", "--seed must be in 0..9223372036854775792 for 16 image(s)"),
    ("--seed", "-1", "--seed must be in 0.."),
    ("--num-images", "1000000000000", "--num-images 1000000000000 is over the limit of 1000000 per run"),
    ("--worker-resources", "{bad", "--worker-resources is not JSON"),
    ("--worker-resources", '{"a": -1}', "--worker-resources must be a JSON object of positive amounts"),
    ("--index-servers", "-1", "--index-servers must be >= 0"),
    ("--max-unit-attempts", "0", "--max-unit-attempts must be >= 1"),
])
def test_bad_option_values(capsys, memorizer_model, tmp_path, flag, value, message):
    code = main(["generate", "--model", memorizer_model, "--out", str(tmp_path / "run"), flag, value])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "run").exists()


def test_unknown_policy_is_refused(capsys, memorizer_model, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--model", memorizer_model, "--out", str(tmp_path / "run"), "--on-breach", "ignore"])
    assert exit_info.value.code == 2 and "invalid choice: 'ignore'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_options_reach_the_run(capsys, ray_session, memorizer_model, protected_index, tmp_path):
    run_dir = tmp_path / "run"
    code = main(["generate", "--model", memorizer_model, "--index", protected_index, "--out", str(run_dir),
                 "--num-images", "6", "--steps", "8", "--overcompensation", "1e-9", "--correction-iterations", "2",
                 "--max-neighbours", "3", "--batch-radius", "100", "--on-breach", "drop"])
    assert code == 0
    config = json.loads((run_dir / "run.json").read_text())["config"]
    assert config["spell"] == {"overcompensation": 1e-9, "max_neighbours": 3, "correction_iterations": 2, "min_noise_radii": 1.0}
    assert (config["breach"]["on_breach"], config["shield"]["batch_radius"], config["breach"]["max_attempts"]) == ("drop", 100.0, 4)
    rows = pd.read_parquet(run_dir / "audit" / "samples")
    hits = pd.read_parquet(run_dir / "audit" / "hits")
    assert len(rows) == 6 and (rows["attempt"] == 1).all()  # drop: one attempt each
    breach = rows["inside_shield"] | rows["perceptual_copy"] | rows["off_manifold"]  # pipeline.breach.is_breach
    assert (rows["action"] == breach.map({True: "dropped", False: "kept"})).all()
    assert set(hits["source"]) == {"index", "batch"}
    # at most 3 neighbours per source, step and iteration entered the sum; the rest are logged unused
    used = hits[hits["used"]].groupby(["sample", "step", "iteration", "source"]).size()
    assert used.max() <= 3
    assert (~hits["used"]).any() and (hits.loc[~hits["used"], "weight"] == 0).all()
