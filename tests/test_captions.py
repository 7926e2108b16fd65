"""The report's captions: one per report entry, written from the figures' own constants,
valid reStructuredText (an error would show as a red box in the report)."""

import html
from pathlib import Path

import jinja2
import pytest
from docutils.core import publish_parts

from opdgeo import captions, figures, paper_tables, report_captions
from opdgeo.delta import columns
from opdgeo.figures import bands, delta_trajectory
from opdgeo.findings import VERDICTS

WORKFLOW_PAGE = Path(__file__).resolve().parents[1] / "workflow/report/workflow.rst"


def shown(text: str) -> str:
    """The text a reader sees: the HTML docutils writes, markup and entities resolved."""
    body = publish_parts(text, writer="html", settings_overrides={"report_level": 5})["body"]
    return html.unescape(body)


def errors(text: str) -> bool:
    """docutils' error boxes ("System Message"), which it embeds in the HTML it writes."""
    return "system-message" in publish_parts(text, writer="html")["body"]


def test_every_report_entry_has_a_caption_that_renders_without_an_error():
    texts = report_captions.captions()
    assert list(texts) == report_captions.caption_names()
    assert set(figures.FIGURES) | set(paper_tables.TABLE_NAMES) <= set(texts)
    bad = [name for name, text in texts.items() if errors(text)]
    assert bad == []
    # the check sees an error where there is one: the text the escaping guards against
    assert errors("covered |mask AND update| / |update|")
    assert not errors(captions.rst("covered |mask AND update| / |update|"))


def test_captions_name_the_interval_and_the_metrics_their_figures_draw():
    texts = report_captions.captions()
    for name in ("fig1_overview", "trajectory", "appendix_sparsity_thresholds",
                 "appendix_module_metrics"):
        assert bands.DELTA_INTERVAL in texts[name], name
    for name in ("fig3_interventions", "gain_vs_sparsity"):
        assert bands.INTERVAL in texts[name], name
    assert not [name for name, text in texts.items()
                if "s.d." in text or "standard deviation" in text]
    for name, panels in (("appendix_module_metrics", columns.module_figure()),
                         ("trajectory", delta_trajectory.TRAJECTORY_PANELS)):
        text = " ".join(shown(texts[name]).split())
        for column in panels:  # the label as the panel's axis shows it
            assert columns.axis_label(column) in text, (name, column)
    assert all(verdict in texts["findings"] for verdict in VERDICTS)


def test_write_captions_writes_one_file_per_entry(tmp_path):
    paths = report_captions.write_captions(tmp_path / "report")
    names = report_captions.caption_names()
    assert sorted(p.name for p in paths) == sorted(f"{n}.rst" for n in names)
    assert (tmp_path / "report" / "fig1_overview.rst").read_text() == \
        report_captions.captions()["fig1_overview"] + "\n"
    assert not list((tmp_path / "report").glob("*.tmp"))


@pytest.mark.parametrize("pairs", [{"addition": {}}, {"addition": {}, "squares": {}}])
def test_the_workflow_page_renders_with_a_config(pairs):
    """Snakemake renders it with Jinja (the config as snakemake.config), then docutils."""
    class Snakemake:
        config = {"pairs": pairs}

    text = jinja2.Environment(undefined=jinja2.StrictUndefined).from_string(
        WORKFLOW_PAGE.read_text()).render(snakemake=Snakemake)
    assert ", ".join(pairs) in text
    assert not errors(text)
