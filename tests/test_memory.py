"""Activation memory of a training step (model.lean: longlora/memory.py): offloading the checkpointed block inputs to host memory changes
no number, and under torch.autocast those inputs are in the compute dtype (bf16), as under FSDP's bf16. And the
peak bytes of live tensors of a whole step, measured, against what estimate.py says."""

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import model as M
from longlora import memory
from longlora.estimate import activation_peak, estimate
from lora import apply_lora, mark_trainable
from model import KVCache, ModelArgs, Transformer

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
    model.lean = model.gradient_checkpointing = True
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
    calls, angles = [], M.rope_angles
    monkeypatch.setattr(M, "rope_angles", lambda *a, **k: calls.append(1) or angles(*a, **k))
    tokens = torch.randint(0, 256, (2, 48))
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t):
        loss = lora_model(tokens, tokens)
    loss.backward()
    assert len(calls) == 1


# ---- the peak of live tensors, measured ------------------------------------------------------------


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of the tensors created under this mode that are alive, after every operation, and their peak.

    A storage is counted once, when an operation returns it new (one that none of the operation's inputs shares:
    not a view, not an in-place result), and uncounted when it dies, which a weak reference to the storage tells
    before each operation. Tensors made before the mode (the parameters) are not counted, nor what a kernel
    allocates and frees inside itself (its scratch)."""

    def __init__(self):
        super().__init__()
        self.live = {}  # data_ptr -> (weak reference to the storage, bytes, allocation number)
        self.log = []  # (allocation number, +bytes or -bytes), and None after each operation
        self.count = 0

    def collect(self):
        for ptr, (ref, nbytes, i) in list(self.live.items()):
            if ref.expired():
                del self.live[ptr]
                self.log.append((i, -nbytes))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.collect()
        tensors = lambda tree: [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]  # noqa: E731
        inputs = {t.untyped_storage().data_ptr() for t in tensors((args, kwargs))}
        out = func(*args, **(kwargs or {}))
        for t in tensors(out):
            s = t.untyped_storage()
            if s.nbytes() and s.data_ptr() not in inputs and s.data_ptr() not in self.live:
                self.live[s.data_ptr()] = (StorageWeakRef(s), s.nbytes(), self.count)
                self.log.append((self.count, s.nbytes()))
                self.count += 1
        self.log.append(None)
        return out

    def peak(self, exclude=()):
        """The most bytes alive after any operation, not counting the storages of `exclude` (tensors alive now)."""
        self.collect()
        skip = {self.live[p][2] for p in (t.untyped_storage().data_ptr() for t in exclude) if p in self.live}
        now = most = 0
        for event in self.log:
            if event is None:
                most = max(most, now)
            elif event[0] not in skip:
                now += event[1]
        return most


def test_live_tensor_bytes_counts_storages_once_and_until_they_die():
    u8 = dict(dtype=torch.uint8)
    with LiveTensorBytes() as mem:
        a = torch.empty(1000, **u8)
        b = torch.empty(2000, **u8)
        view = b.view(2, 1000)  # no new storage
        b.add_(1)  # in place: no new storage
        del a
        c = torch.empty(3000, **u8)  # alive: b, c = 5000
        x = torch.empty(4000, **u8)  # 9000, the peak
        y = x[:10]
        del x  # y keeps x's storage alive
        del b, view  # 7000
        d = torch.zeros(500, **u8)  # 7500
    assert mem.peak() == 9000
    assert mem.peak(exclude=[c]) == 6000  # without c: a, b = 3000, then b, x = 6000
    assert sum(n for _, n, _ in mem.live.values()) == 7500 and y.numel() == 10 and d.numel() == 500


# bf16, 2 layers of dim 128 (8 heads), 1024 tokens, chunks of 64 (the loss, the feed-forward, RoPE, the norms'
# backward): shaped like LLaMA2-70B (8 query heads per key/value head, hidden_dim 3.5 x dim), a block's backward
# is the peak, at its feed-forward, with wo's backward close; with a wide feed-forward, at the feed-forward by
# far; with a large vocabulary, the loss's backward; without grouped-query attention and with a narrow
# feed-forward, attention's backward.
STEP_CASES = {"70B-like": dict(n_kv_heads=1, ffn_hidden_dim=448, vocab_size=256),
              "feed-forward": dict(n_kv_heads=1, ffn_hidden_dim=1024, vocab_size=256),
              "loss": dict(n_kv_heads=1, ffn_hidden_dim=448, vocab_size=4096),
              "attention": dict(n_kv_heads=8, ffn_hidden_dim=256, vocab_size=256)}


@pytest.mark.parametrize("case,ffn_chunks", [(c, True) for c in STEP_CASES] + [("feed-forward", False)],
                         ids=list(STEP_CASES) + ["feed-forward, no-ffn-chunks"])
def test_estimated_activation_peak_is_the_measured_peak_of_a_training_step(monkeypatch, case, ffn_chunks):
    """One LoRA training step with checkpointing, as train.py takes it, in bf16 (FSDP's compute dtype): the peak of
    live tensor bytes, less the parameters' gradients (the estimate counts those apart), against estimate.py's
    activation_peak with PyTorch's SDPA kernels (estimate() asks for FlashAttention-2's, whose backward adds its
    own scratch; both are the same formula otherwise). Within 3% (observed: the estimate 0.4-0.6% above); the final
    norm kept outside the loss chunks, or an RMSNorm that keeps an fp32 copy of its input, add a quarter.
    Without chunks the feed-forward's (T, hidden) intermediates exist whole (train.py --no-ffn-chunks)."""
    T, chunk = 1024, 64
    monkeypatch.setattr(memory, "CHUNK_SIZE", chunk)
    monkeypatch.setattr(memory, "FFN_CHUNK_SIZE", None if ffn_chunks else 0)
    m = ModelArgs(dim=128, n_layers=2, n_heads=8, max_seq_len=T, **STEP_CASES[case])
    torch.manual_seed(0)
    model = Transformer(m)
    apply_lora(model)
    mark_trainable(model)
    model.to(torch.bfloat16).train()
    model.lean = model.gradient_checkpointing = True
    tokens, targets = torch.randint(0, m.vocab_size, (1, T)), torch.randint(0, m.vocab_size, (1, T))
    with LiveTensorBytes() as mem:
        model(tokens, targets).backward()
    measured = mem.peak(exclude=[p.grad for p in model.parameters() if p.grad is not None])
    estimated = activation_peak(m, T, 1, chunk=chunk, attn="full", flash=False, ffn_chunks=ffn_chunks)
    print(f"{case}: measured {measured / 1e6:.3f} MB, estimated {estimated / 1e6:.3f} MB")
    assert abs(estimated - measured) <= 0.03 * measured
    e = estimate(m, T, "full", 1, 1, 1, chunk=chunk, ffn_chunks=ffn_chunks)
    assert e["memory"]["activations, checkpointing"] == activation_peak(m, T, 1, chunk=chunk, attn="full",
                                                                         ffn_chunks=ffn_chunks)


def test_a_lean_model_decodes_with_its_kv_cache_as_a_plain_model_does():
    """model.lean is for training: a forward with a KV cache takes the plain path, so decoding a lean model chunk by
    chunk gives the logits of one forward over the whole sequence, and the cache advances."""
    torch.manual_seed(0)
    model = Transformer(ARGS).eval()
    model.lean = model.gradient_checkpointing = True
    tokens = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        whole = model(tokens)
        cache = KVCache(ARGS, 1, 12)
        pieces = [model(tokens[:, :8], cache=cache)] + [model(tokens[:, t:t + 1], cache=cache) for t in range(8, 12)]
    assert cache.pos == 12
    torch.testing.assert_close(torch.cat(pieces, dim=1), whole, rtol=0, atol=1e-5)
