"""The JAX rows of ``python -m validation`` (validation/jax_rows.py): they run, agree, can fail,
and are skipped with a notice only when jax is missing.

The expected row labels are written out here. A provider whose per-sample products are off by
a factor 1 + 1e-6 must fail its rows (the tolerance is 1e-9); a Flax MLP mapped back with a
wrong layout would fail the Flax rows the same way (the layout map is exercised by the pass).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

jax = pytest.importorskip("jax")

from validation.cases import problems  # noqa: E402
from validation.crosscheck import QUANTITIES, compute  # noqa: E402
from validation.crosscheck import REFERENCE as REFERENCE_RUN  # noqa: E402
from validation.jax_rows import jax_rows  # noqa: E402

# JAX truncating a float64 request to float32 would be a silent loss of precision: an error here
pytestmark = pytest.mark.filterwarnings("error:Explicitly requested dtype float64")
REPO = Path(__file__).resolve().parents[3]
LABELS = ["jax[float64]", "jax[float32]", "jax[flax-mlp]", "jax[flax-mlp] vs torch[vmap]"]


def problem(name: str) -> Any:
    return next(p for p in problems() if p.name == name)


@pytest.fixture(scope="module")
def squared_error() -> tuple[Any, dict[str, Any]]:
    p = problem("mlp-squared-error")
    return p, compute(p, REFERENCE_RUN)


def test_rows_run_and_agree(squared_error: tuple[Any, dict[str, Any]]) -> None:
    p, reference = squared_error
    rows = jax_rows(p, reference)
    torch_missing = p.torch_unavailable()
    assert [r.run for r in rows] == LABELS
    for row in rows:
        if row.run.endswith("torch[vmap]") and torch_missing:
            assert row.skipped
            continue
        assert not row.skipped and not row.error, row
        assert set(row.differences) == {*QUANTITIES, "gamma_ratio"}
        assert row.ok, row
    assert [r.tolerance for r in rows] == [1e-9, 2e-3, 1e-9, 1e-9]


def test_a_wrong_per_sample_product_fails(
    squared_error: tuple[Any, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    from backends.jax import kernels

    exact = kernels.per_sample_vjp
    monkeypatch.setattr(kernels, "per_sample_vjp", lambda *a: exact(*a) * (1 + 1e-6))
    p, reference = squared_error
    rows = {r.run: r for r in jax_rows(p, reference)}
    assert not rows["jax[float64]"].ok and not rows["jax[flax-mlp]"].ok
    assert rows["jax[float64]"].differences["per_sample_grads"] > 1e-7


def test_problems_without_layer_sizes_have_no_flax_rows() -> None:
    p = problem("logistic-toy")
    rows = jax_rows(p, compute(p, REFERENCE_RUN))
    assert [r.run for r in rows] == LABELS[:2] and all(r.ok for r in rows)


def test_without_jax_the_rows_are_skipped_with_a_notice(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    code = (
        "import sys\n"
        "class Block:\n"  # a finder that makes `import jax` raise ImportError
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.partition('.')[0] in ('jax', 'jaxlib', 'optax', 'flax'):\n"
        "            raise ImportError(f'{name} is blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "from validation.__main__ import main\n"
        f"sys.exit(main(['--problem', 'mlp-squared-error', '--no-oracles', '--report', "
        f"{str(report)!r}]))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "note: jax runs are skipped (jax is not installed" in result.stdout
    (entry,) = json.loads(report.read_text())["problems"]
    rows = entry["jax_rows"]
    assert [r["run"] for r in rows] == LABELS[:3]
    assert all(r["skipped"].startswith("jax is not installed") and r["ok"] for r in rows)
