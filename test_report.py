"""report.py: the PNG writer, the charts, and report.html for any run folder, damaged ones too."""
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, strategies as st

import report as Rp
import train as T
from conftest import (json_values, TINY, metric_lines, one_error_line, read_png)


@pytest.mark.parametrize("C", [1, 3])
def test_png_writer_round_trips_pixels(tmp_path, C):
    img = np.random.default_rng(0).integers(0, 256, (5, 7, C), dtype=np.uint8)
    Rp.write_png(tmp_path / "x.png", img)
    np.testing.assert_array_equal(read_png(tmp_path / "x.png"), img)


# -----------------------------------------------------------------------------
# the run report: report.html

from html.parser import HTMLParser


class PageChecker(HTMLParser):
    """Well-formedness as a browser would need it: every opened element closed, in order; the
    curves' data-points counts by series name."""
    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self):
        super().__init__()
        self.stack, self.errors, self.points = [], [], {}

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "data-series" in attrs:
            self.points.setdefault(attrs["data-series"], []).append(int(attrs["data-points"]))
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        attrs = dict(attrs)
        if "data-series" in attrs:
            self.points.setdefault(attrs["data-series"], []).append(int(attrs["data-points"]))

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()


def check_page(path):
    checker = PageChecker()
    checker.feed(Path(path).read_text())
    checker.close()
    assert not checker.errors and not checker.stack, (checker.errors, checker.stack)
    return checker


def test_every_run_writes_a_well_formed_report_with_a_point_per_metric_row(tmp_path, tiny_data):
    run = tmp_path / "run"
    assert T.main(["--data", tiny_data, "--out", str(run), "--steps", "6", "--eval-every", "3", "--log-every", "2",
                   *TINY]) == 0
    page = check_page(run / "report.html")
    rows = metric_lines(run)
    train_rows, held_rows = [r for r in rows if "loss" in r], [r for r in rows if "loss" not in r]
    for key in ("loss", "recon", "vq", "commitment"):
        assert page.points[key] == [len(train_rows)], key              # one polyline, a point per row
    assert page.points["val_mse"] == [len(held_rows)] == [2]
    assert page.points["training"] == [len([r for r in metric_lines(run, "prior") if "loss" in r])]
    text = (run / "report.html").read_text()
    for name in ("recon.png", "samples.png", "samples to reconstructions", "codebook_size"):
        assert name in text, name
    assert "<script" not in text and "http" not in text                # stands alone, no JavaScript


def test_the_report_survives_nan_a_missing_stage_and_a_damaged_last_line(tmp_path, capsys):
    run = tmp_path / "old_run"                                         # as a run made before report.html existed
    run.mkdir()
    lines = [json.dumps({"stage": "vqvae", "step": s, "loss": v, "recon": v, "perplexity": 3.0, "usage": 0.5})
             for s, v in ((1, 1.0), (2, float("nan")), (3, 0.5))]
    lines.append(json.dumps({"stage": "vqvae", "step": 3, "val_mse": 0.01, "val_psnr": 20.0}))
    (run / "metrics.jsonl").write_text("\n".join(lines) + '\n{"stage": "vqvae", "step": 4, "lo')  # killed mid-write
    assert T.main(["report", "--run", str(run)]) == 0
    page = check_page(run / "report.html")
    assert page.points["loss"] == [2] and page.points["val_mse"] == [1]  # the NaN left out, the damaged line skipped
    assert "training" not in page.points                               # no prior stage: no prior curve
    (run / "metrics.jsonl").write_text("")
    (run / "config.json").write_text("{not json")
    assert T.main(["report", "--run", str(run)]) == 0                  # nothing readable yet: still a page
    check_page(run / "report.html")
    assert "stages: none yet" in (run / "report.html").read_text()
    capsys.readouterr()
    assert T.main(["report", "--run", str(tmp_path)]) == 1
    assert "not a run folder" in one_error_line(capsys)


def test_chart_scales_and_ticks():
    assert np.allclose(Rp.nice_ticks(0, 1), [0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ticks = Rp.nice_ticks(0.0031, 0.0074, 5)
    assert all(0.0031 <= t <= 0.0074 for t in ticks) and len(ticks) >= 2
    svg = Rp.svg_chart("x", [("a", [(1, 1.0), (2, -1.0), (3, float("inf"))], False)], log_y=True)
    assert 'data-points="1"' in svg                                    # log scale: the value <= 0 and inf left out
    assert "no finite values" in Rp.svg_chart("x", [("a", [(1, float("nan"))], False)])


@given(values=st.lists(st.tuples(st.sampled_from(["vqvae", "prior", "top_prior"]), st.integers(-3, 50),
                                 st.sampled_from(["loss", "recon", "val_mse", "perplexity", "bits_per_code",
                                                  "prior_val_bits_per_code", "codes_used", "usage"]),
                                 json_values), max_size=12),
       summary=json_values)
def test_any_metrics_and_summary_give_a_well_formed_page(tmp_path_factory, values, summary):
    run = tmp_path_factory.mktemp("report")
    (run / "metrics.jsonl").write_text("\n".join(json.dumps({"stage": s, "step": t, k: v}) for s, t, k, v in values))
    (run / "summary.json").write_text(json.dumps(summary))
    Rp.write_report(run)
    check_page(run / "report.html")
