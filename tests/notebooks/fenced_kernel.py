"""An IPython kernel that can import only what rayms and its ``notebooks`` extra install.

``tests/test_notebooks.py`` runs the notebooks in it: the test environment holds much more (moto, kserve,
tritonclient, ...), and a notebook that needs any of it would pass here and fail after
``pip install 'rayms[notebooks]'``. The fence covers the kernel process; Ray's worker processes import
rayms's own modules, whose dependencies ``tests/test_architecture.py`` and the install itself keep honest.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.dependencies import ImportFence  # noqa: E402  (needs the repository on sys.path)

ImportFence(["notebooks"]).install()

from ipykernel import kernelapp  # noqa: E402  (imported behind the fence, like everything after it)

kernelapp.launch_new_instance()
