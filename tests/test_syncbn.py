"""GlobalBatchNorm without Ray: on a process group of one it is plain BatchNorm, forward,
backward and running statistics; converted models keep their state_dict."""

import pytest
import torch
import torch.distributed as dist

from raytorch.replica import syncbn


@pytest.fixture
def group_of_one(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    syncbn.use_group(dist.new_group(backend="gloo"))
    yield
    syncbn.use_group(None)
    dist.destroy_process_group()


@pytest.mark.parametrize("make, shape", [(lambda: torch.nn.BatchNorm1d(5), (7, 5)),
                                         (lambda: torch.nn.BatchNorm1d(5, momentum=None), (7, 5, 3)),
                                         (lambda: torch.nn.BatchNorm2d(4, affine=False), (6, 4, 3, 3))])
def test_on_a_group_of_one_it_is_plain_batchnorm(group_of_one, make, shape):
    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Identity(), make())
    converted = syncbn.convert(torch.nn.Sequential(torch.nn.Identity(), make()))
    converted.load_state_dict(plain.state_dict())
    assert isinstance(converted[1], syncbn.GlobalBatchNorm) and syncbn.synchronized(converted)
    for _ in range(3):
        x = (torch.randn(shape) * 3 + 1).requires_grad_()
        x2 = x.detach().clone().requires_grad_()
        weights = torch.randn(shape)
        (plain(x) * weights).sum().backward()
        (converted(x2) * weights).sum().backward()
        torch.testing.assert_close(x2.grad, x.grad, rtol=1e-5, atol=1e-6)
    for name, value in plain.state_dict().items():
        torch.testing.assert_close(converted.state_dict()[name], value, rtol=1e-5, atol=1e-6, msg=name)
    for a, b in zip(plain.parameters(), converted.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-5)
    plain.eval(), converted.eval()  # eval: the running statistics, no group
    x = torch.randn(shape)
    torch.testing.assert_close(converted(x), plain(x))
