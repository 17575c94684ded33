"""The whole model on the pod mesh sequence:4,expert:2 against one device (tests/pod_meshes.py): the prompt
runs context parallel (halos, gathered entries), decoding continues from the cache it filled, greedy ids are
the same, and a training step's loss and gradients through it equal one device's. (expert:8, data:2,expert:4
and data:2,tensor:2,expert:2: tests/test_sharded_model.py.)"""
from pod_meshes import check_meshes


def test_context_parallel_mesh_matches_one_device():
  check_meshes("sequence:4,expert:2")
