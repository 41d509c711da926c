"""bench.py's correctness side, on the tiny preset and without timing anything: the peer it times (HF
transformers + PEFT) computes our training loss, and HF's generate our tokens, as the bench prints."""

import torch
import torch.nn.functional as F

import bench
from sample import generate
from train import token_loss_sum

PEER_LOSS_TOL = 1e-4  # the bench's "same loss at step 1" threshold (mean cross-entropy per token, fp32)


def test_hf_peft_peer_has_our_training_loss_and_gradients_at_step_1():
    T = 256  # twice the tiny preset's context: the RoPE scaling (2) is part of the comparison
    x = torch.randint(0, 256, (1, T + 1), generator=torch.Generator().manual_seed(1))
    x, y = x[:, :-1], x[:, 1:]  # (B, T) each
    for mode in bench.MODES:
        ours = bench._ours_model("tiny", T, mode)
        peer = bench._peer_model(ours, mode)
        loss = token_loss_sum(ours, x, y, None, torch.autocast("cpu", enabled=False)) / y.numel()
        peer_loss = F.cross_entropy(peer(input_ids=x).logits.float().flatten(0, 1), y.flatten())
        assert abs(loss.item() - peer_loss.item()) <= PEER_LOSS_TOL, (mode, loss.item(), peer_loss.item())
        # the same trainable tensors get the same gradients (embeddings and a LoRA B, in both namings)
        (loss + peer_loss).backward()
        ours_grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
        peer_grads = {n: p.grad for n, p in peer.named_parameters() if p.requires_grad}
        assert len(ours_grads) == len(peer_grads)
        emb = next(g for n, g in peer_grads.items() if "embed_tokens" in n)
        assert torch.allclose(ours_grads["tok_embeddings.weight"], emb, atol=1e-5, rtol=1e-3), mode
        lora_b = next(g for n, g in peer_grads.items() if "layers.1.self_attn.v_proj.lora_B" in n)
        assert torch.allclose(ours_grads["layers.1.attention.wv.lora_b"], lora_b, atol=1e-5, rtol=1e-3), mode


def test_hf_generate_gives_our_greedy_tokens():
    hf, ours = bench._hf_and_ours("tiny")
    prompt = torch.randint(0, ours.args.vocab_size, (32,), generator=torch.Generator().manual_seed(0)).tolist()
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        theirs = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=64, do_sample=False)[0, 32:]
    assert list(generate(ours, prompt, 64)) == theirs.tolist()
