"""
A model too large for one GPU, split over several for sample.py and longlora.eval (`--devices cuda:0,cuda:1`): the
layers in consecutive stages, one stage per device, as transformers' device_map="auto" places a model. The
embedding sits with the first stage, the final norm and the output head with the last:

    tokens -> [tok_embeddings, layers 0-39] -> h -> [layers 40-79, norm, output] -> logits
               cuda:0                          ^     cuda:1
                                               the activations (B, T, dim) move to the next device

    python sample.py --model /ckpt/llama-2-70b --devices cuda:0,cuda:1 --prompt paper.txt
    layers 0-39 on cuda:0, 40-79 on cuda:1              <- the split, printed once to stderr before loading

A forward runs the stages one after the other, so one device computes at a time: the split buys memory, not speed.
The tokens and logits are one device's: the same operations in the same order, only where they run differs.

Where each piece lives:
  * weights: each tensor goes straight from the memory-mapped checkpoint onto its stage's device (`load_into` reads
    one block at a time), so no device and no host ever holds the whole model; an adapter's LoRA matrices are created
    beside their base weight, so they follow;
  * activations: a block moves its input to its own device (one line of model.TransformerBlock.forward, free when
    it is already there), and RoPE's cos/sin are copied once per forward to each further device (model.rope_rotate);
  * KV caches: each layer's keys and values on that layer's device (sample.make_cache gives KVCache one device per
    layer; the H₂O and sink caches of longlora/caches.py keep what they compute from the layer's keys, beside them).

Stage rule, by parameter count (the embedding counted in the first stage, the norm and the head in the last): the
largest stage is as small as it can be, and among the splits that achieve it each stage in turn takes as many
layers as fit. LLaMA2-70B (80 layers): 40+40 on 2 devices, 20 each on 4, 10 each on 8, 27+27+26 on 3. The first and
last stages hold one embedding-sized matrix more (262M parameters at 70B, under a third of a layer), so where the
layers do not divide evenly they get no more layers than the middle ones (LLaMA2-13B on 3: 13+14+13).
"""

import bisect
import sys


def layer_of(name: str, n_layers: int) -> int:
    """The layer a tensor belongs to for the split: layers.i.* to layer i, tok_embeddings to the first layer,
    the final norm and the output head to the last."""
    parts = name.split(".")
    if parts[0] == "layers":
        return int(parts[1])
    return 0 if parts[0] == "tok_embeddings" else n_layers - 1


def split_layers(sizes, n: int) -> list:
    """The first layer of each of n stages of consecutive layers; sizes[i]: the parameters counted with layer i.

    The smallest cap on a stage's parameters that n stages can meet (a binary search over the caps: a greedy
    fill, each stage as full as the cap allows, needs the fewest stages under a cap), then that greedy fill,
    leaving at least one layer to each later stage."""
    if not 1 <= n <= len(sizes):
        raise ValueError(f"cannot split {len(sizes)} layers into {n} stages")

    def stages_needed(cap):
        count, load = 1, 0
        for s in sizes:
            if load + s > cap:
                count, load = count + 1, 0
            load += s
        return count

    lo, hi = max(sizes), sum(sizes)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if stages_needed(mid) <= n else (mid + 1, hi)
    starts, load = [0], 0
    for i, s in enumerate(sizes):
        if i > 0 and (load + s > lo or len(sizes) - i == n - len(starts)):
            starts.append(i)
            load = 0
        load += s
    return starts


def describe(starts, n_layers, devices) -> str:
    """"layers 0-39 on cuda:0, 40-79 on cuda:1"."""
    spans = [f"{a}-{b - 1}" if b - 1 > a else f"{a}" for a, b in zip(starts, starts[1:] + [n_layers])]
    return "layers " + ", ".join(f"{span} on {d}" for span, d in zip(spans, devices))


def pipeline(checkpoint, devices):
    """Where each tensor of the checkpoint (read_checkpoint's (args, weights)) goes: a function of its name, the
    device of its stage (longlora.weights.load_into takes it as its device). Prints the split to stderr."""
    args, weights = checkpoint
    if len(devices) > args.n_layers:
        raise ValueError(f"{len(devices)} devices for a model of {args.n_layers} layers: give at most {args.n_layers}")
    if args.tie_embeddings:  # one tensor cannot sit on the first device and the last
        raise ValueError("a model whose output head is its embedding (tied) cannot be split over devices: use --device")
    sizes = [0] * args.n_layers
    for name, spec in weights.specs.items():
        sizes[layer_of(name, args.n_layers)] += spec.numel()
    starts = split_layers(sizes, len(devices))
    print(describe(starts, args.n_layers, devices), file=sys.stderr, flush=True)
    return lambda name: devices[bisect.bisect_right(starts, layer_of(name, args.n_layers)) - 1]
