"""The generated metrics reference stays in step with the metric catalogue."""

from __future__ import annotations

from chatmw.metrics import REGISTRY
from chatmw.metrics.docs import DEFAULT_PATH, main, render_markdown


def test_committed_reference_is_up_to_date() -> None:
    committed = DEFAULT_PATH.read_text("utf-8")
    assert committed == render_markdown(), (
        "docs/metrics.md is stale: run python -m chatmw.metrics.docs"
    )


def test_reference_documents_every_metric_and_parameter() -> None:
    text = render_markdown()
    for name, spec in REGISTRY.items():
        assert f"\n### {name}\n" in text
        assert spec.description.strip() in text
        for param in spec.params:
            assert f"| `{param.name}` |" in text


def test_every_metric_has_a_description() -> None:
    for name, spec in REGISTRY.items():
        assert len(spec.description) >= 80, name
        assert spec.summary, name


def test_check_mode_reports_stale_file(tmp_path) -> None:
    path = tmp_path / "metrics.md"
    assert main([str(path), "--check"]) == 1
    assert main([str(path)]) == 0
    assert main([str(path), "--check"]) == 0
    path.write_text(path.read_text("utf-8") + "edited\n", "utf-8")
    assert main([str(path), "--check"]) == 1
