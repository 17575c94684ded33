import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(__file__))                      # tests/hf_oracle.py
sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))     # the repo root (configs/, launch/)
