"""bench/robustness.py: the grid's order and what its table reads from finished cells (reports
written here by hand; nothing is trained)."""

import json
import sys
from pathlib import Path

import pytest

sys.path.append(str(Path(__file__).resolve().parents[1] / "bench"))  # after the packages: bench/export.py must not shadow export

import robustness  # noqa: E402

from fedlora_edge.coordinator.contamination import contaminated_clients  # noqa: E402


def test_the_grid_runs_clean_cells_first_then_attack_by_attack():
    cells = robustness.grid(["clair", "local"], ["sign_flip", "backdoor"], [0.0, 0.2], ["iid"], [0, 1])
    assert [(c.attack, c.seed, c.method) for c in cells[:4]] == [
        ("none", 0, "clair"), ("none", 0, "local"), ("none", 1, "clair"), ("none", 1, "local")]
    attacks = [c.attack for c in cells]
    assert attacks.index("backdoor") > max(i for i, a in enumerate(attacks) if a == "sign_flip")


def write(cell, out, extra, bad, loss, rounds=(), personal=None):
    """A finished cell's report: the global adapter at ``loss`` on every task (or ``personal``)."""
    cfg = robustness.config_of(cell, extra)
    folder = cell.folder(out)
    folder.mkdir(parents=True)
    acc = {"overall": 0.5, "per_domain": {"add": 0.5, "upper": 0.5},
           "loss": {"overall": loss, "per_domain": {"add": loss, "upper": loss}}}
    report = {"config": cfg.to_dict(), "contamination": {"clients": sorted(bad)}, "rounds": list(rounds),
              "global_adapter_accuracy": acc, "personalised": {"clients": personal} if personal else {},
              "fleet": [{"client": c, "eligible": True, "domain_mix": {"add": 1.0}} for c in "abcdefghij"]}
    (folder / "report.json").write_text(json.dumps(report))


def test_the_table_gives_intervals_over_seeds_and_reads_local_from_the_clean_cell(tmp_path):
    extra = {"model": "tiny-llama"}
    scores = dict.fromkeys("abcdefghij", {})
    for seed, loss in ((0, 1.0), (1, 1.2)):
        c = robustness.Cell("iid", 0.2, "sign_flip", seed, "clair")
        bad = contaminated_clients(robustness.config_of(c, extra), list("abcdefghij"))
        write(c, tmp_path, extra, bad, loss, [{"round": 1, "detection": {"flagged": sorted(bad), "scores": scores}}])
        per = {x: {"overall": 0.1, "own_mix": 0.1, "loss": {"overall": 2.0}, "own_mix_loss": 1.5} for x in "abcdefghij"}
        write(robustness.Cell("iid", 0.0, "none", seed, "local"), tmp_path, extra, set(), 2.0, personal=per)
    cells = robustness.grid(["clair", "local"], ["sign_flip"], [0.0, 0.2], ["iid"], [0, 1])
    rows = {line.split(" | ")[3]: line for line in robustness.table(cells, tmp_path, extra).splitlines()[2:]
            if "sign_flip" in line}
    assert "| 2 | 1.100 [" in rows["clair"] and "| 1.00 | 1.00 | 1.00 | 0.0 |" in rows["clair"]
    assert "| 2 | 2.000 [2.000, 2.000] | 1.500 [1.500, 1.500] | 10.0 [10.0, 10.0] |" in rows["local (= 0%)"]


def test_a_bad_setting_fails_before_any_cell_runs(tmp_path):
    with pytest.raises(SystemExit):
        robustness.main(["--out", str(tmp_path), "--fleets", "iid,skewed"])
