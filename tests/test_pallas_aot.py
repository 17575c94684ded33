"""Real Mosaic compilation of the TPU kernels without a TPU: libtpu (installed by `make setup` under
.aot/libtpu) compiles each kernel deviceless for v6e at every case of the kernels' AOT_CASES (Flash's and
Pro's decode and prefill shapes), and the decode cases for v5e, v5p and v7x. This is what catches tiling,
VMEM/SMEM overflow and unsupported ops, which interpret mode never sees. The prefill attention kernel's
largest-VMEM case (Pro, HCA, fp8 rows, 8 queries per program) also on v5e (the smallest default scoped VMEM)
and v7x (the smallest VMEM)."""
import os

import pytest

from pallas_kernels import aot

pytestmark = pytest.mark.skipif(not os.path.isdir(os.path.join(aot.LIBTPU, "libtpu")),
                                reason="libtpu not installed under .aot/libtpu (make setup installs it)")


@pytest.mark.parametrize("topology,only", [("v6e:2x2", ""), ("v5e:2x2", "decode_b1"), ("v5p:2x2x1", "decode_b1"),
                                           ("tpu7x:2x2x1", "decode_b1"), ("v5e:2x2", "pro_prefill"),
                                           ("tpu7x:2x2x1", "pro_prefill")])
def test_tpu_kernels_compile(topology, only):
  lines = aot.check(topology, only)
  expected = len(aot.cases(only))
  failed = [ln for ln in lines if " FAIL " in ln]
  assert not failed, "\n".join(failed)
  assert len(lines) == expected, lines
