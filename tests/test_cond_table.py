import torch

from _helpers import assert_close_f32
from mmgen_pytorch import Transformer


def test_cond_table_equals_per_token_conditions():
    torch.manual_seed(0)
    model = Transformer(dim=32, depth=2, heads=2, dim_cond=16).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    table = torch.randn(3, 16)
    index = torch.tensor([[-1, 0, 0, 2, -1, 1], [1, 1, -1, -1, 2, 2]])
    per_token = table[index.clamp_min(0)]
    torch.manual_seed(0)
    x = torch.randn(2, 6, 32)
    expected = model(x, cond=per_token, cond_mask=index >= 0)
    actual = model(x, cond=table, cond_index=index)
    assert_close_f32(actual, expected)
