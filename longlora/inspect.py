"""
Load a LLaMA2 checkpoint (or build a preset with random weights) and run one forward pass: a quick look at what
a folder holds and whether it loads.

    python -m longlora.inspect --preset tiny
    python -m longlora.inspect --model /path/to/llama-2-7b-hf --prompt "The capital of France is"
"""

import sys

import torch

from longlora.cli import Parser, entry, integer
from model import PRESETS, Transformer, preset


@entry
def main(argv=None):
    p = Parser(description="Load a LLaMA2 checkpoint (or build a preset) and run one forward pass.", examples=[
        "python -m longlora.inspect --preset tiny", "python -m longlora.inspect --model /path/to/llama-2-7b-hf --prompt 'The capital of France is'"])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="checkpoint directory: Meta, HF or this project's layout")
    src.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="random-weight model of a named shape")
    p.add_argument("--prompt", default="Hello", help="text to run through the model (needs a tokenizer next to --model)")
    p.add_argument("--seed", type=integer(0, 2**63 - 1), default=0, help="seed for the random preset weights and tokens")
    a = p.parse_args(argv)
    torch.manual_seed(a.seed)
    # A preset of billions of parameters is only described: built on the meta device, it holds no memory.
    big = not a.model and PRESETS[a.preset]["dim"] >= 4096
    with torch.device("meta" if big else "cpu"):
        model = Transformer.from_pretrained(a.model) if a.model else Transformer(preset(a.preset))
    args = model.args
    print(f"model: {a.model or a.preset}: {model.num_params() / 1e6:.2f}M parameters, dim {args.dim}, "
          f"{args.n_layers} layers, {args.n_heads} heads ({args.n_kv_heads} kv), ffn {args.hidden_dim}, "
          f"vocab {args.vocab_size}, rope theta {args.rope_theta:g} scaling {args.rope_scaling:g}, context {args.max_seq_len} "
          f"(pre-training {args.original_max_seq_len})" + ("; built on the meta device: no weights, no forward pass" if big else ""))
    if big:
        return 0
    if model.tokenizer is not None:
        ids = model.tokenizer.encode(a.prompt)
    else:  # no tokenizer: random token ids stand in for the prompt
        ids = torch.randint(0, args.vocab_size, (8,)).tolist()
    with torch.no_grad():
        logits = model(torch.tensor([ids]))
    top = logits[0, -1].float().softmax(-1).topk(5)
    show = (lambda i: repr(model.tokenizer.decode([i]))) if model.tokenizer else str
    print(f"{len(ids)} prompt tokens -> logits {tuple(logits.shape)}; next-token top 5: " +
          ", ".join(f"{show(i)} {p:.3f}" for p, i in zip(top.values.tolist(), top.indices.tolist())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
