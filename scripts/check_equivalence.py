"""Max abs difference between TL-Align targets and the full label-vector reference of the tests, per case.

    python scripts/check_equivalence.py            # transformers' families, then the timm backbones
    python scripts/check_equivalence.py --timm     # the timm backbones only (Eva, BEiT, Swin, Swin V2)

The cases and the independent reference are the tests' own: this script runs the reference tests of
tests/test_modeling.py, tests/test_new_families.py and tests/test_timm_backbones.py under pytest and prints, as Markdown tables, the row each
test records (`record_property("equivalence", row)`). A case added to those tests appears here with no change to
this file. The exit status is pytest's: nonzero when a case exceeds the tests' tolerance (1e-5) or fails otherwise.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TRANSFORMERS_TESTS = ("tests/test_modeling.py", "tests/test_new_families.py")
TIMM_TESTS = "tests/test_timm_backbones.py"
REFERENCE_TESTS = (
    "full_label_vector_reference or every_attention_path or interpolated_positions or padded_windows_and_odd"
)  # pytest -k

TRANSFORMERS_HEADER = (
    "| model | backend | path | token weights | max abs diff vs full-vector reference | max abs aligned_lam - mix_lam |\n"
    "|---|---|---|---|---|---|"
)
TIMM_HEADER = (
    "| timm backbone (tiny, sharpened) | timm attention | path | max abs diff vs full-vector reference "
    "| max abs aligned_lam - mix_lam |\n|---|---|---|---|---|"
)


class RecordedRows:
    """A pytest plugin that keeps, per test file, the `equivalence` rows the tests record, in the order they ran."""

    def __init__(self):
        self.rows: dict[str, list[tuple]] = {}

    def pytest_runtest_logreport(self, report):
        if report.when == "call":
            for name, row in report.user_properties:
                if name == "equivalence":
                    self.rows.setdefault(report.nodeid.split("::")[0], []).append(row)


def markdown_row(row: tuple) -> str:
    """(columns..., max abs difference, max abs aligned_lam - mix_lam) as a Markdown row."""
    *columns, difference, moved = row
    return "| " + " | ".join([*map(str, columns), f"{difference:.2e}", f"{moved:.3f}"]) + " |"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    files = [TIMM_TESTS] if "--timm" in argv else [*TRANSFORMERS_TESTS, TIMM_TESTS]
    recorded = RecordedRows()
    status = pytest.main(
        ["-q", "-p", "no:cacheprovider", "--rootdir", str(REPO), "-k", REFERENCE_TESTS, *(str(REPO / f) for f in files)],
        plugins=[recorded],
    )
    for test_files, header in ((TRANSFORMERS_TESTS, TRANSFORMERS_HEADER), ((TIMM_TESTS,), TIMM_HEADER)):
        if set(test_files) & set(files):
            print(f"\n{header}")
            print("\n".join(markdown_row(row) for test_file in test_files for row in recorded.rows.get(test_file, [])))
    return int(status)


if __name__ == "__main__":
    sys.exit(main())
