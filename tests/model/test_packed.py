"""Packed batches (issue 22, first step): the sequences end to end in one [1, N] row, positions
restarting at each, attention within each sequence, token dropout and pooling per sequence. Against the
padded layout (held to transformers and fair-esm by test_parity.py and test_esmc.py): logits, every
hidden state, pooled and per-residue head outputs, losses and every gradient (LoRA A/B, head, full),
for ESM-2 and ESM C, on mixed lengths from 1 to 1022 residues; and a sequence's outputs do not
depend on what it is packed with.

Tolerance: the two layouts run the same arithmetic per token (a linear's rows are independent, the
LayerNorms are per row); what differs is the matrix shapes the kernels see (blocking, hence summation
order) and, in attention, the masked keys' exact zeros: rounding only. 64 eps32 relative to the
largest magnitude compared leaves room for other machines' kernels (measured here: <= 8)."""

import pytest
import torch

import oracles
from esm2lite import Tokenizer
from esm2lite.data.batching import collate
from esm2lite.data.records import records_from_pairs
from esm2lite.model.batch import Batch
from esm2lite.checkpoints.modes import MODE
from esm2lite.model.lora import LoRAConfig
from esm2lite.model.task_model import TaskModel
from esm2lite.tasks import LabelSpace
from esm2lite.weights.pretrained import load_pretrained

ULPS = 64


def sequences(seed=0):
    """Mixed lengths: one residue, short, long, and the longest ESM-2 reads (1022), with <mask> inside."""
    g = torch.Generator().manual_seed(seed)
    letters = "ACDEFGHIKLMNPQRSTVWY"
    lengths = [1, 7, 33, 2, 120, 1022, 15]
    seqs = ["".join(letters[i] for i in torch.randint(0, 20, (n,), generator=g).tolist()) for n in lengths]
    seqs[2] = seqs[2][:5] + "<mask>" + seqs[2][6:]
    return seqs


def layouts(seqs):
    tok = Tokenizer()
    encoded = [tok.encode(s) for s in seqs]
    padded = Batch(torch.nn.utils.rnn.pad_sequence([torch.tensor(t) for t in encoded], batch_first=True,
                                                   padding_value=1))
    packed = Batch(torch.tensor([x for t in encoded for x in t])[None], None, torch.tensor([len(t) for t in encoded]))
    return padded, packed


@pytest.fixture(scope="module", params=["esm2", "esmc"])
def encoder(request, hf_tiny, esmc_tiny):
    return load_pretrained(hf_tiny if request.param == "esm2" else esmc_tiny)


def test_batch_properties_of_the_packed_layout():
    padded, packed = layouts(["MK", "A", "GSHM"])
    assert packed.tokens.shape == (1, 4 + 3 + 6) and not packed.padding.any()
    assert packed.lengths.tolist() == padded.lengths.tolist() == [4, 3, 6]
    assert packed.offsets.tolist() == [0, 4, 7, 13]
    assert packed.positions[0].tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4, 5]
    assert packed.segment[0].tolist() == [0] * 4 + [1] * 3 + [2] * 6
    assert torch.equal(packed.padded().tokens, padded.tokens)
    assert packed.attention_mask.lengths == (4, 3, 6)  # each sequence attends to itself (model/attention.py)


def test_encoder_outputs_equal_the_padded_layout(encoder):
    padded, packed = layouts(sequences())
    L = encoder.config.num_layers
    with torch.no_grad():
        a = encoder(padded, repr_layers=range(L + 1))
        b = encoder(packed, repr_layers=range(L + 1))
    keep = ~padded.padding
    oracles.assert_fp32_close(packed.unpack(b["logits"])[keep], a["logits"][keep], ULPS, what="logits")
    for i in range(L + 1):
        oracles.assert_fp32_close(packed.unpack(b["hidden_states"][i])[keep], a["hidden_states"][i][keep], ULPS,
                                  what=f"hidden_states[{i}]")


def test_a_sequence_does_not_depend_on_its_batch_mates(encoder):
    seqs = sequences(1)
    alone = layouts([seqs[4]])[1]
    with_others = layouts([seqs[0], seqs[4], seqs[6]])[1]
    with torch.no_grad():
        a = encoder(alone, logits=False)["last_hidden_state"][0]
        b = with_others.unpack(encoder(with_others, logits=False)["last_hidden_state"])[1, : len(a)]
    oracles.assert_fp32_close(b, a, ULPS, what="the same sequence, other neighbours")


def task_model(encoder, task, mode):
    torch.manual_seed(0)
    seqs = sequences(2)
    if task == "regression":
        pairs = [(s, float(len(s) % 7)) for s in seqs]
    else:  # per residue: a label per residue
        pairs = [(s, "".join("H" if c in "AELK" else "C" for c in s.replace("<mask>", "A"))) for s in seqs]
    records = records_from_pairs(pairs, task=task)
    labels = LabelSpace.fit(task, records, "target")
    enc = load_pretrained(encoder)
    targets = ("query", "value", "fc2") if hasattr(enc.layers[0], "fc1") else ("q", "v", "down")
    MODE[mode].prepare(enc, LoRAConfig(rank=4, targets=targets, init_b="normal"))  # what training trains
    head = labels.task.head(enc.config.d_model, labels.num_outputs, 32, 0.0)
    return TaskModel(enc, head, labels, frozen_encoder=MODE[mode].frozen_encoder), records, labels


@pytest.mark.parametrize("task", ["regression", "token-classification"])
@pytest.mark.parametrize("mode", ["lora", "full", "head"])
@pytest.mark.parametrize("family", ["esm2", "esmc"])
def test_head_outputs_losses_and_gradients_equal_the_padded_layout(family, mode, task, hf_tiny, esmc_tiny):
    model, records, labels = task_model(hf_tiny if family == "esm2" else esmc_tiny, task, mode)
    model.train()  # no dropout anywhere (head 0.0, LoRA 0.0): training's graph, deterministic
    results = []
    for packed in (False, True):
        model.zero_grad(set_to_none=True)
        batch = collate(records, labels, packed=packed)
        out = model(batch)
        loss = labels.task.loss(out, batch.target)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((out.detach(), loss.detach(), grads))
    (out_a, loss_a, grads_a), (out_b, loss_b, grads_b) = results
    assert out_a.shape == out_b.shape  # heads answer in the padded layout either way
    keep = collate(records, labels).residues if out_a.dim() == 3 else None
    oracles.assert_fp32_close(out_b if keep is None else out_b[keep], out_a if keep is None else out_a[keep], ULPS,
                              what="head outputs")
    oracles.assert_fp32_close(loss_b, loss_a, ULPS, what="loss")
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        oracles.assert_fp32_close(grads_b[name], grads_a[name], 4 * ULPS, what=f"grad {name}")  # backward: 2 more GEMMs


def test_the_layout_rule_and_what_debug_prints(hf_tiny, tmp_path, forkrun):
    """runtime/device.packs: auto packs on a CPU (measured faster there), pads on a GPU (no varlen kernel
    yet); an explicit --batches wins; --debug prints the choice."""
    from pathlib import Path

    from esm2lite.runtime.device import packs

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert packs("auto", cpu) and not packs("auto", gpu) and packs("packed", gpu) and not packs("padded", cpu)
    (tmp_path / "in.fasta").write_text(">a\nMKTAYIAK\n")
    infer = str(Path(__file__).resolve().parents[2] / "infer.py")
    for flag, line in (([], "batches: packed (--batches auto on cpu)"), (["--batches", "padded"],
                                                                         "batches: padded (--batches padded)")):
        r = forkrun.run([infer, "--base", hf_tiny, "--input", str(tmp_path / "in.fasta"), "--embeddings",
                         str(tmp_path / "e.safetensors"), "--device", "cpu", "--debug", *flag])
        assert r.returncode == 0 and line in r.stdout.splitlines(), r.stdout + r.stderr[-2000:]
