"""dnnlab reproduce: one row per printed number, each preset citing its cell; seeds in parallel; resuming."""
import csv
import json
import re

import pytest

from dnnlab import CONF_DIR
from dnnlab.errors import DnnlabError
from dnnlab.reproduce import ROWS, main, parse_seeds, pick_rows, verdict

COLUMNS = ["id", "edition", "cell", "metric", "book", "mean", "std", "seeds", "verdict"]


def header(preset: str) -> str:
    text = (CONF_DIR / "experiment" / f"{preset}.yaml").read_text()
    return "\n".join(line for line in text.splitlines() if line.startswith("#"))


def test_every_row_is_a_printed_number_with_its_cell_in_its_preset():
    ids = [r.id for r in ROWS]
    assert len(ids) == len(set(ids)) and {r.edition for r in ROWS} == {"ed1", "ed2", "ed3"}
    for row in ROWS:
        assert re.fullmatch(r"(nan|\d\.\d+|\d+\.\d+%)", row.book), row.id  # as printed, never rounded further
        if row.skip:
            continue
        assert 0 < row.book_value < 1, row.id
        cells = re.findall(r"cells? (\d+)(?:-(\d+))?", header(row.preset))
        assert any(int(a) <= row.cell <= int(b or a) for a, b in cells), (row.id, row.cell, cells)
        assert f"{row.edition[2]}{'st' if row.edition == 'ed1' else 'nd' if row.edition == 'ed2' else 'rd'} " \
               f"edition" in header(row.preset), row.id
        if row.needs:
            assert row.needs in {r.preset for r in ROWS} and "transfer.source" in header(row.preset), row.id


def test_rows_not_rerun_say_why():
    skipped = [r for r in ROWS if r.skip]
    assert skipped and all(len(r.skip) > 20 for r in skipped)
    assert not any((CONF_DIR / "experiment" / f"{r.preset}.yaml").exists() for r in skipped)


def test_only_picks_by_id_preset_or_edition_and_refuses_typos():
    assert [r.id for r in pick_rows(["ed3/dropout"])] == ["ed3/dropout", "ed3/dropout:train", "ed3/dropout:test",
                                                          "ed3/dropout:mc"]
    assert [r.id for r in pick_rows(["ed3/adam"])] == ["ed3/adam"]  # not adamax, adamw
    assert {r.edition for r in pick_rows(["ed2"])} == {"ed2"} and len(pick_rows(None)) == len(ROWS)
    assert all(r.id.startswith("ed1/ex9_") for r in pick_rows(["ed1/ex9"]))
    with pytest.raises(DnnlabError, match="--only"):
        pick_rows(["ed3/adma"])


def test_seeds_are_a_count_or_a_list():
    assert parse_seeds("3") == [0, 1, 2] and parse_seeds("7,8,9") == [7, 8, 9]
    for bad in ("0", "x", "1,1", "-1,2"):
        with pytest.raises(DnnlabError, match="--seeds"):
            parse_seeds(bad)


def test_verdict_is_a_prediction_interval_with_a_half_point_floor():
    assert verdict([0.80], 0.80) == "one seed: not compared"
    assert verdict([0.800, 0.801, 0.802], 0.805) == "matches"  # inside the 0.5-point floor
    assert verdict([0.800, 0.801, 0.802], 0.790) == "better"
    assert verdict([0.800, 0.801, 0.802], 0.810) == "worse"
    wide = [0.70, 0.75, 0.80]  # std 0.05, n 3: t 4.303 * 0.05 * sqrt(4/3) = 0.248
    assert verdict(wide, 0.99) == "matches" and verdict(wide, 1.0) == "worse"


def test_a_reproduction_trains_each_seed_once_and_pairs_transfer_sources_by_seed(data_root, tmp_path):
    args = ["--only", "ed3/task_b_on_a", "ed3/dropout:mc", "--seeds", "3,5", "--out", str(tmp_path),
            "-o", f"data.root={data_root}", "-o", "data.val_size=100", "-o", "trainer.epochs=1",
            "-o", "trainer.limit_batches=3"]
    main(args)
    rows = list(csv.DictReader(open(tmp_path / "REPRODUCTION.csv")))
    assert [r["id"] for r in rows] == ["ed3/task_b_on_a", "ed3/dropout:mc"] and list(rows[0])[:9] == COLUMNS
    assert all(r["seeds"] == "2" and r["verdict"] in ("matches", "better", "worse") for r in rows)
    runs = tmp_path / "runs" / "ed3"
    for seed in (3, 5):
        summary = json.loads((runs / "task_b_on_a" / f"seed{seed}" / "summary.json").read_text())
        assert summary["transfer"]["checkpoint"] == str(runs / "task_a" / f"seed{seed}" / "checkpoints" / "final.pt")
        assert (runs / "dropout" / f"seed{seed}" / "eval_mc100" / "eval.json").is_file()
    assert (tmp_path / "reproduction.png").read_bytes()[:4] == b"\x89PNG"
    stamps = {p: p.stat().st_mtime_ns for p in runs.glob("*/seed*/summary.json")}
    main(args)  # everything finished: nothing is trained again
    assert {p: p.stat().st_mtime_ns for p in runs.glob("*/seed*/summary.json")} == stamps


def test_list_prints_one_line_per_row_id_first(capsys):
    main(["--list"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(ROWS)
    for line, row in zip(lines, ROWS):
        assert line.split()[:2] == [row.id, row.edition] and f"cell {row.cell} " in line and row.book in line
        assert ("not rerun: " in line) == bool(row.skip)


@pytest.mark.parametrize("preset", sorted({r.preset for r in ROWS if not r.skip}))
def test_every_preset_composes_and_passes_the_command_line_checks(make_cfg, preset, tmp_path):
    from dnnlab import validate

    needs = {r.preset: r.needs for r in ROWS}[preset]
    validate.check(make_cfg(f"experiment={preset}", *([f"transfer.source={tmp_path}"] if needs else [])))
