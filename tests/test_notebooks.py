"Run every notebook in `nbs/` through `nbdev-test` (slow cells included), one pytest test per notebook."
import os, subprocess, sys
from pathlib import Path
import pytest

root = Path(__file__).resolve().parents[1]
notebooks = sorted(p for p in (root/'nbs').glob('*.ipynb') if not p.name.startswith(('_', '.')))
nbdev_test = Path(sys.executable).parent/'nbdev-test'

@pytest.mark.parametrize('notebook', notebooks, ids=lambda p: p.stem)
def test_notebook(notebook):
    # pytest-xdist already runs one notebook per core: one thread each keeps the cores from being oversubscribed
    env = {**os.environ, 'OMP_NUM_THREADS': os.environ.get('OMP_NUM_THREADS', '1')}
    result = subprocess.run([str(nbdev_test), str(notebook), '--flags', 'slow', '--n-workers', '0'],
                            cwd=root, capture_output=True, text=True, env=env)
    assert result.returncode == 0, f"{notebook.name} failed:\n{result.stdout}\n{result.stderr}"
