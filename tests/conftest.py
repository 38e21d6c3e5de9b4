from __future__ import annotations

import torch

# Small tensors run fastest on one thread; extra threads spin against other processes on a
# 2-core machine and slow the suite many times over.
torch.set_num_threads(1)
