"""Hugging Face's `kernels` distribution (required by transformers 5.25+) imports under the same
name as this project's `kernels/`: importing ours with theirs installed must say so and how to
fix it, not fail later inside transformers with "cannot import name 'CUDAProperties'"."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _import_kernels(extra_path: Path | None) -> subprocess.CompletedProcess:
    path = [str(REPO)] + ([str(extra_path)] if extra_path else [])
    code = f"import sys; sys.path[:0] = {path!r}; import kernels; print(kernels.__file__)"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)


def test_hf_kernels_distribution_installed_is_a_clear_error(tmp_path):
    # only the metadata of the other distribution: its code is not needed to trigger the clash
    dist = tmp_path / "kernels-0.19.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: kernels\nVersion: 0.19.1\n")
    done = _import_kernels(tmp_path)
    assert done.returncode != 0
    assert "Hugging Face's `kernels` package (0.19.1)" in done.stderr
    assert "pip install 'transformers<5.25' && pip uninstall -y kernels" in done.stderr


def test_without_it_ours_imports():
    done = _import_kernels(None)
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()) == REPO / "kernels" / "__init__.py"
