"""dnnlab reproduce: the chapter's table, quick mode, resuming without retraining."""
import csv

from dnnlab.reproduce import ROWS, main


def test_every_book_preset_row_has_a_number_or_a_reason():
    names = [r.name for r in ROWS]
    assert len(names) == len(set(names)) >= 39
    for row in ROWS:
        assert row.book is not None or row.name.startswith(("schedule:", "lr-find")), row.name


def test_quick_reproduction_writes_the_table_and_resumes(data_root, tmp_path):
    args = ["--quick", "--only", "leaky", "task B", "--out", str(tmp_path), "-o", f"data.root={data_root}",
            "-o", "data.val_size=100", "-o", "data.n_per_class=null"]  # the tiny data has 60 images per class
    main(args)
    rows = list(csv.DictReader(open(tmp_path / "REPRODUCTION.csv")))
    assert [r["experiment"] for r in rows] == ["Leaky ReLU (alpha 0.2)", "task B (sandal/shirt) from scratch",
                                               "task B reusing task A"]
    assert all(r["verdict"] == "not compared (quick run)" and r["seeds"] == "1" for r in rows)
    assert "| Leaky ReLU (alpha 0.2) |" in (tmp_path / "REPRODUCTION.md").read_text()
    assert (tmp_path / "reproduction.png").read_bytes()[:4] == b"\x89PNG"
    summary = tmp_path / "leaky_relu_alpha_0_2" / "seed0" / "summary.json"
    before = summary.stat().st_mtime_ns
    main(args)  # everything finished: nothing is trained again
    assert summary.stat().st_mtime_ns == before
