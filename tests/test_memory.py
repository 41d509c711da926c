"""Activation memory of a training step (model.py): offloading the checkpointed block inputs to host memory changes
no number, and under torch.autocast those inputs are in the compute dtype (bf16), as under FSDP's bf16."""

import pytest
import torch

from lora import apply_lora, mark_trainable
from model import ModelArgs, Transformer

ARGS = ModelArgs(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32, max_seq_len=64)


class CountingSaveOnCpu(torch.autograd.graph.save_on_cpu):
    """torch's save_on_cpu, also recording what it packs (shape, dtype)."""
    packed = []

    def __init__(self, pin_memory=False, device_type="cuda"):
        super().__init__(pin_memory, device_type)
        pack = self.pack_hook

        def counting_pack(t):
            CountingSaveOnCpu.packed.append((tuple(t.shape), t.dtype))
            return pack(t)

        self.pack_hook = counting_pack


def step(model, tokens, targets):
    model.zero_grad(set_to_none=True)
    loss = model(tokens, targets)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture
def lora_model():
    torch.manual_seed(0)
    model = Transformer(ARGS)
    apply_lora(model)
    mark_trainable(model)
    torch.nn.init.normal_(model.layers[0].attention.wq.lora_b, std=0.02)  # nonzero B: every LoRA gradient flows
    model.gradient_checkpointing = True
    return model.train()


def test_offloaded_block_inputs_give_the_same_loss_and_gradients(lora_model, monkeypatch):
    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", CountingSaveOnCpu)
    CountingSaveOnCpu.packed = []
    tokens, targets = torch.randint(0, 256, (2, 48)), torch.randint(0, 256, (2, 48))
    loss0, grads0 = step(lora_model, tokens, targets)
    assert CountingSaveOnCpu.packed == []
    lora_model.offload_activations = True
    loss1, grads1 = step(lora_model, tokens, targets)
    # what went to the host: each block's input (B, T, dim), besides small position/length tensors
    assert [s for s in CountingSaveOnCpu.packed if s[0] == (2, 48, ARGS.dim)] == [((2, 48, ARGS.dim), torch.float32)] * ARGS.n_layers
    assert torch.equal(loss0, loss1)  # the same computation; only where the saved inputs wait differs
    for n in grads0:
        assert torch.equal(grads0[n], grads1[n]), n


def test_under_autocast_the_residual_stream_is_bf16(lora_model, monkeypatch):
    """The fp32 trainable embedding must not make the checkpointed inputs fp32 (twice the bytes of FSDP's bf16)."""
    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", CountingSaveOnCpu)
    CountingSaveOnCpu.packed = []
    lora_model.offload_activations = True
    tokens = torch.randint(0, 256, (1, 32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = lora_model(tokens, tokens)
    loss.backward()
    inputs = [s for s in CountingSaveOnCpu.packed if s[0] == (1, 32, ARGS.dim)]
    assert inputs == [((1, 32, ARGS.dim), torch.bfloat16)] * ARGS.n_layers
    assert lora_model.tok_embeddings.weight.grad.dtype == torch.float32  # the master stays fp32


def test_with_offloading_the_rope_angles_are_still_computed_once_per_forward(lora_model, monkeypatch):
    """On a GPU save_on_cpu hands back a copy of each saved tensor. rope_rotate knows the forward's own positions
    by identity, so if `positions` went through the checkpoint's saved inputs, every recomputed layer would
    rebuild its cos/sin. Hooks that copy, as save_on_cpu does for CUDA tensors, show it on the CPU."""
    import model as M

    calls, angles = [], M.rope_angles
    monkeypatch.setattr(M, "rope_angles", lambda *a, **k: calls.append(1) or angles(*a, **k))
    tokens = torch.randint(0, 256, (2, 48))
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t):
        loss = lora_model(tokens, tokens)
    loss.backward()
    assert len(calls) == 1
