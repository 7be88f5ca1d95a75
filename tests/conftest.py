"""Shared pytest configuration: one torch thread per test process keeps runs predictable on
small CI machines, and tests import their helpers from this folder."""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(int(os.environ.get("GUIDED_NC_TEST_THREADS", "2")))
