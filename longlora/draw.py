"""
Which keys each query sees under full attention, S²-Attn and SF-Attn, drawn as text: attention.py's picture
for any T, g and number of sinks, from the dense specification (attention.attention_pattern).

    python attention.py                                   # (hands over to this file)
    python attention.py --T 32 --group-size 8 --sink-tokens 4
"""

import sys

from attention import attention_pattern
from longlora.cli import Parser, entry, integer


def draw_patterns(T=16, group_size=8, sink_tokens=2):
    """The patterns of full, s2, s2 wrap and sf side by side, one text row per query ('#' visible)."""
    columns = [("full", "full", False, 0)]  # (title, mode, wrap, which half of the heads)
    for title, mode, wrap in (("s2", "s2", False), ("s2 wrap", "s2", True), ("sf", "sf", False)):
        if not wrap:  # the plain heads ignore wrap: draw them once
            columns.append((f"{title} h<H/2", mode, wrap, 0))
        columns.append((f"{title} h>=H/2", mode, wrap, 1))
    width = max(T, *(len(c[0]) for c in columns)) + 2
    digits = len(str(T - 1))
    lines = [(" " * (digits + 1) + "".join(title.ljust(width) for title, *_ in columns)).rstrip()]
    patterns = [attention_pattern(mode, T, 2, group_size=group_size, sink_tokens=sink_tokens, wrap=wrap)[half]
                for _, mode, wrap, half in columns]
    for i in range(T):
        row = "".join("".join("#" if x else "." for x in p[i].tolist()).ljust(width) for p in patterns)
        lines.append(f"{i:>{digits}} {row}".rstrip())
    return "\n".join(lines)


@entry
def main(argv=None):
    parser = Parser(description="Draw which keys each query sees under full, S²-Attn and SF-Attn.",
                    examples=["python attention.py", "python attention.py --T 32 --group-size 8 --sink-tokens 4"])
    parser.add_argument("--T", type=integer(2, 200), default=16, help="sequence length to draw, 2 to 200 to fit a terminal (default 16)")
    parser.add_argument("--group-size", type=integer(2, 200), default=None,
                        help="group size g, even, 2 <= g <= T (default T/2 rounded to even: two groups, the clearest picture)")
    parser.add_argument("--sink-tokens", type=integer(0, 200), default=2,
                        help="sink tokens of SF-Attn (default 2 here, to keep the sinks apart from the first group in "
                             "a small picture; attention() defaults to 4)")
    args = parser.parse_args(argv)
    g = args.group_size if args.group_size is not None else max(2, 2 * (args.T // 4))
    print(draw_patterns(args.T, g, args.sink_tokens))  # a group size that does not tile T: one error line (entry)
    return 0


if __name__ == "__main__":
    sys.exit(main())
