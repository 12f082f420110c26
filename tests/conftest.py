import os
import sys

import pytest
import torch

# Triton kernels run on CPU tensors through the interpreter when there is no GPU.  It must be
# set before any kernel is defined; the default backend off CUDA stays the reference.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
