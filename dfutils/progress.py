"""Progress bars: widgets in a notebook opened in JupyterLab, plain text everywhere else.

Inside a Jupyter kernel the bars are `tqdm.notebook` widgets (ipywidgets); elsewhere they
are `tqdm.std` text. Under the headless runner (`make run-all`) papermill's kernel is a
Jupyter kernel too, but nobody sees its widgets: the runner sets TEXT_ONLY in the
environment its kernels inherit, so their bars stay text in the log. (Not `tqdm.auto`:
its asyncio mixin calls iter() on the iterable when the bar is made, which starts an
extra pass of a DataLoader and shifts its workers' random state.)
"""

from __future__ import annotations

import os

TEXT_ONLY = "DFUTILS_TEXT_PROGRESS"


def in_jupyter_kernel() -> bool:
    """Whether this process is a Jupyter kernel (IPython's IPKernelApp)."""
    try:
        from IPython import get_ipython

        return "IPKernelApp" in get_ipython().config
    except (ImportError, AttributeError):
        return False


if in_jupyter_kernel() and not os.environ.get(TEXT_ONLY):
    from tqdm.notebook import tqdm
else:
    from tqdm.std import tqdm

__all__ = ["TEXT_ONLY", "in_jupyter_kernel", "tqdm"]
