"""Task heads and losses (each task's): pooling and masking against hand computations, loss masking, rebuild."""

import pytest
import torch
from torch import nn

from esm2lite.errors import DataError
from esm2lite.model.heads import mean_pool, residue_mask
from esm2lite.tasks import TASKS, head_from_config, task_named

REG, CLS, TOK = TASKS["regression"], TASKS["classification"], TASKS["token-classification"]

# cls=0, pad=1, eos=2, mask=32; residues 4..28
TOKENS = torch.tensor([[0, 5, 6, 7, 8, 2],
                       [0, 9, 32, 2, 1, 1],
                       [0, 4, 2, 1, 1, 1]])


def test_residue_mask_by_hand():
    assert residue_mask(TOKENS).tolist() == [
        [False, True, True, True, True, False],
        [False, True, True, False, False, False],
        [False, True, False, False, False, False]]


def test_mean_pool_by_hand_loops():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 6, 4, generator=g, dtype=torch.float64)
    hidden[1, 4:] = float("nan")  # padding rows may hold anything
    pooled = mean_pool(hidden, TOKENS)
    for b in range(3):
        rows = [hidden[b, t] for t in range(6) if int(TOKENS[b, t]) not in (0, 1, 2)]
        expected = sum(rows) / len(rows)
        assert torch.allclose(pooled[b], expected)


def test_mean_pool_bf16_in_fp32_out():
    hidden = torch.randn(3, 6, 4).bfloat16()
    out = mean_pool(hidden, TOKENS)
    assert out.dtype == torch.float32
    assert torch.equal(out, mean_pool(hidden.float(), TOKENS))  # bf16 widens exactly: the same fp32 sums


@pytest.mark.parametrize("task,n", [(REG, 2), (CLS, 3)])
def test_mlp_heads_shape_and_bioNeMo_layout(task, n):
    head = task.head(8, n, hidden=16, dropout=0.25)
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(8, 16), (16, n)]
    assert any(isinstance(m, nn.ReLU) for m in head.modules())
    assert [m.p for m in head.modules() if isinstance(m, nn.Dropout)] == [0.25]
    out = head(torch.randn(3, 6, 8).bfloat16(), TOKENS)
    assert out.shape == (3, n) and out.dtype == torch.float32


def test_default_head_sizes():
    assert REG.head(320, 1).config == {
        "kind": "regression", "d_model": 320, "hidden": 256, "dropout": 0.25, "num_outputs": 1}


def test_mlp_head_ignores_padding_rows():
    torch.manual_seed(0)
    head = REG.head(8, 1, hidden=16).eval()
    h = torch.randn(3, 6, 8)
    h2 = h.clone()
    h2[1, 3:] = 100.0  # eos + pad of sequence 1
    h2[:, 0] = -7.0  # cls
    assert torch.equal(head(h, TOKENS), head(h2, TOKENS))


def test_regression_loss_is_mse():
    out, y = torch.tensor([[1.0, 2.0], [3.0, 5.0]]), torch.tensor([[0.0, 2.0], [3.0, 1.0]])
    assert torch.isclose(REG.loss(out, y), torch.tensor((1 + 0 + 0 + 16) / 4))


def test_classification_loss_is_cross_entropy():
    out, y = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([1])
    expected = -(0.0 - torch.logsumexp(torch.tensor([2.0, 0.0, -1.0]), 0))
    assert torch.isclose(CLS.loss(out, y), expected)


def test_token_head_shape_and_layout():
    head = TOK.head(8, 3, hidden=5)
    convs = [m for m in head.modules() if isinstance(m, nn.Conv1d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in convs] == \
        [(8, 5, (7,), (3,)), (5, 3, (7,), (3,))]
    out = head(torch.randn(3, 6, 8).bfloat16(), TOKENS)
    assert out.shape == (3, 6, 3) and out.dtype == torch.float32


def test_token_head_input_at_non_residues_does_not_matter():
    torch.manual_seed(0)
    head = TOK.head(8, 3, hidden=5).eval()
    h = torch.randn(3, 6, 8)
    h2 = h.clone()
    h2[~residue_mask(TOKENS)] = 55.0
    assert torch.equal(head(h, TOKENS), head(h2, TOKENS))  # zeroed before conv1: the same values, the same sums


def test_token_loss_ignores_unlabelled_positions():
    target = torch.tensor([[-100, 0, 2, -100, 1, -100],  # residue 3 masked out (mask 0)
                           [-100, 1, 1, -100, -100, -100],
                           [-100, 2, -100, -100, -100, -100]])
    g = torch.Generator().manual_seed(1)
    out = torch.randn(3, 6, 3, generator=g)
    # hand computation over the labelled positions only
    terms = [-torch.log_softmax(out[b, t], 0)[target[b, t]]
             for b in range(3) for t in range(6) if target[b, t] != -100]
    assert torch.isclose(TOK.loss(out, target), sum(terms) / len(terms))
    out2 = out.clone()
    out2[target.eq(-100)] = torch.randn(int(target.eq(-100).sum()), 3, generator=g) * 50
    assert torch.equal(TOK.loss(out, target), TOK.loss(out2, target))


def test_token_loss_with_no_labels_is_zero_not_nan():
    out = torch.randn(1, 4, 3, requires_grad=True)
    loss = TOK.loss(out, torch.full((1, 4), -100))
    assert loss.item() == 0.0
    loss.backward()


def test_heads_compute_in_fp32_under_autocast():
    head = TOK.head(8, 3, hidden=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(torch.randn(3, 6, 8).bfloat16(), TOKENS)
        assert out.dtype == torch.float32


@pytest.mark.parametrize("task,n", [("regression", 1), ("regression", 3), ("classification", 4),
                                    ("token-classification", 3)])
def test_head_from_config_rebuilds_same_shapes(task, n):
    head = TASKS[task].head(12, n, hidden=7, dropout=0.1)
    again = head_from_config(head.config)
    assert type(again) is type(head) and again.config == head.config
    assert {k: v.shape for k, v in again.state_dict().items()} == \
        {k: v.shape for k, v in head.state_dict().items()}
    again.load_state_dict(head.state_dict())  # strict


def test_bad_head_requests():
    with pytest.raises(DataError, match="unknown task 'ranking'"):
        task_named("ranking")
    with pytest.raises(ValueError):
        head_from_config({"kind": "regression"})
