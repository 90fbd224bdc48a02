"""A scan's gradient addresses (what the Triton backend's table needs each step) are those of the
gradients it hands out, in both implementations: a gradient laid out otherwise than its parameter is
the scan's copy, and a parameter without a gradient has address 0. After release() there are none."""

import pytest
import torch

from fsam_fused import scan as scans

IMPLEMENTATIONS = {"python": scans.PythonScan}
try:
    from fsam_fused import _C

    IMPLEMENTATIONS["native"] = _C.ParamScan
except ImportError:
    pass


@pytest.mark.parametrize("implementation", sorted(IMPLEMENTATIONS))
def test_grad_addresses_are_those_of_the_gradients_the_scan_hands_out(implementation):
    params = [torch.randn(3, 4), torch.randn(5), torch.randn(2, 2), torch.randn(4, 3)]
    params[0].grad = torch.randn(3, 4)
    params[1].grad = torch.randn(5)
    params[3].grad = torch.randn(3, 4).t()  # other strides than its parameter: the scan copies it
    scan = IMPLEMENTATIONS[implementation]([params])
    scan.scan([params])
    positions = [3, 0, 2, 1]
    grads = scan.grads(positions)
    assert scan.grad_addresses(positions) == [g.data_ptr() if g is not None else 0 for g in grads]
    assert grads[1].data_ptr() == params[0].grad.data_ptr()
    assert grads[0].data_ptr() != params[3].grad.data_ptr() and grads[0].is_contiguous()
    assert grads[2] is None
    scan.release()
    with pytest.raises((RuntimeError, IndexError)):  # no stale addresses once released
        scan.grad_addresses(positions)
