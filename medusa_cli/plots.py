"""Pictures as SVG text, written directly (no plotting dependency): a Medusa tree, each node
with its rank and the probability it is accepted, and each head's top-k accuracy curve."""

from __future__ import annotations

from collections.abc import Sequence
from xml.sax.saxutils import escape


# one colour per head, cycling (colour-blind-safe Tableau 10)
_COLOURS = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f",
            "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac")
# dash pattern per curve set: the first solid, the next dashed, ...
_DASHES = ("", "6 4", "2 3")
# a tree path: ranks from head 0 down (trees.TreePath)
TreePath = tuple[int, ...]
_FONT = 'font-family="DejaVu Sans, Helvetica, Arial, sans-serif"'


def _svg(width: float, height: float, body: list[str]) -> str:
    return "\n".join([
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
        f'viewBox="0 0 {width:.0f} {height:.0f}" {_FONT} font-size="12">',
        f'<rect width="{width:.0f}" height="{height:.0f}" fill="white"/>',
        *body,
        "</svg>",
    ]) + "\n"


def _text(x: float, y: float, text: str, anchor: str = "start", size: int = 12,
          extra: str = "") -> str:
    return (f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" font-size="{size}"{extra}>'
            f"{escape(text)}</text>")


# --------------------------------------------------------------------------- the tree

_COLUMN = 170  # px between depths
_ROW = 24  # px between leaves
_BOX_W, _BOX_H = 132, 18
_MARGIN = 20
_TITLE = 34


def _layout(paths: Sequence[TreePath]) -> tuple[dict[TreePath, float], int]:
    """Each node's row (leaves on successive rows in rank order, a parent midway between its
    first and last child), and the number of rows."""
    children: dict[TreePath, list[TreePath]] = {(): []}
    for path in sorted(paths, key=lambda p: (len(p), p)):
        children.setdefault(path, [])
        children.setdefault(path[:-1], []).append(path)
    row: dict[TreePath, float] = {}
    next_row = 0
    # depth-first without recursion: (node, children placed?)
    stack: list[tuple[TreePath, bool]] = [((), False)]
    while stack:
        node, placed = stack.pop()
        kids = sorted(children[node])
        if not kids:
            row[node] = next_row
            next_row += 1
        elif placed:
            row[node] = (row[kids[0]] + row[kids[-1]]) / 2
        else:
            stack.append((node, True))
            stack.extend((kid, False) for kid in reversed(kids))
    return row, next_row


def tree_svg(paths: Sequence[TreePath], probability: dict[TreePath, float] | None,
             title: str) -> str:
    """The tree from the root (the base model's token) at the left; a node shows its rank and,
    with `probability`, the chance it is accepted (shaded by it)."""
    row, rows = _layout(paths)
    depth = max((len(p) for p in paths), default=0)
    width = 2 * _MARGIN + depth * _COLUMN + _BOX_W
    height = _TITLE + 2 * _MARGIN + rows * _ROW

    def centre(node: TreePath) -> tuple[float, float]:
        return (_MARGIN + len(node) * _COLUMN + _BOX_W / 2,
                _TITLE + _MARGIN + row[node] * _ROW + _ROW / 2)

    body = [_text(_MARGIN, 22, title, size=14, extra=' font-weight="bold"')]
    for path in paths:  # edges first, under the boxes
        (px, py), (cx, cy) = centre(path[:-1]), centre(path)
        start, end = px + _BOX_W / 2, cx - _BOX_W / 2
        middle = (start + end) / 2
        body.append(f'<path d="M{start:.1f},{py:.1f} C{middle:.1f},{py:.1f} {middle:.1f},{cy:.1f} '
                    f'{end:.1f},{cy:.1f}" fill="none" stroke="#9aa5b1" stroke-width="1.2"/>')
    for node in [()] + list(paths):
        x, y = centre(node)
        if node == ():
            label, shade = "root (base token)", 1.0
        else:
            p = None if probability is None else probability.get(node)
            label = f"rank {node[-1]}" + ("" if p is None else f"  p={p:.3f}")
            shade = 0.0 if p is None else p
        # white to the first head colour by probability (its square root, so that the many
        # small probabilities stay apart); dark text on light boxes
        shade = shade ** 0.5
        fill = _mix("#ffffff", _COLOURS[0], shade)
        ink = "#ffffff" if shade > 0.55 else "#1f2933"
        body.append(f"<g><title>{escape(str(list(node)))}</title>")  # the path, on hover
        body.append(f'<rect x="{x - _BOX_W / 2:.1f}" y="{y - _BOX_H / 2:.1f}" width="{_BOX_W}" '
                    f'height="{_BOX_H}" rx="4" fill="{fill}" stroke="{_COLOURS[0]}"/>')
        body.append(_text(x, y + 4, label, anchor="middle", size=11, extra=f' fill="{ink}"'))
        body.append("</g>")
    return _svg(width, height, body)


def _mix(a: str, b: str, t: float) -> str:
    t = min(max(t, 0.0), 1.0)
    ca = [int(a[i:i + 2], 16) for i in (1, 3, 5)]
    cb = [int(b[i:i + 2], 16) for i in (1, 3, 5)]
    return "#" + "".join(f"{round(x + (y - x) * t):02x}" for x, y in zip(ca, cb))


# --------------------------------------------------------------------------- accuracy curves

_PLOT_W, _PLOT_H = 560, 320
_LEFT, _RIGHT, _TOP, _BOTTOM = 60, 150, 50, 50


def accuracy_curves_svg(curves: Sequence[tuple[str, Sequence[Sequence[float]]]],
                        title: str) -> str:
    """Top-k accuracy (k = 1..K) per head: curves[i] = (label, [[top-k per k] per head]), each
    set drawn in its own dash pattern, each head in its own colour."""
    k_max = max(len(head) for _, heads in curves for head in heads)
    width = _LEFT + _PLOT_W + _RIGHT
    height = _TOP + _PLOT_H + _BOTTOM

    def x_of(k: int) -> float:
        return _LEFT + (0.5 if k_max == 1 else (k - 1) / (k_max - 1)) * _PLOT_W

    def y_of(value: float) -> float:
        return _TOP + (1 - value) * _PLOT_H

    body = [_text(_LEFT, 24, title, size=14, extra=' font-weight="bold"')]
    for tick in range(0, 11, 2):  # accuracy grid every 0.2
        y = y_of(tick / 10)
        body.append(f'<line x1="{_LEFT}" y1="{y:.1f}" x2="{_LEFT + _PLOT_W}" y2="{y:.1f}" '
                    'stroke="#e4e7eb"/>')
        body.append(_text(_LEFT - 8, y + 4, f"{tick / 10:.1f}", anchor="end"))
    for k in range(1, k_max + 1):
        body.append(_text(x_of(k), _TOP + _PLOT_H + 18, str(k), anchor="middle"))
    body.append(_text(_LEFT + _PLOT_W / 2, height - 10, "k (the right token among the top k)",
                      anchor="middle"))
    body.append(f'<text x="16" y="{_TOP + _PLOT_H / 2:.1f}" text-anchor="middle" '
                f'transform="rotate(-90 16 {_TOP + _PLOT_H / 2:.1f})">accuracy</text>')
    body.append(f'<rect x="{_LEFT}" y="{_TOP}" width="{_PLOT_W}" height="{_PLOT_H}" '
                'fill="none" stroke="#9aa5b1"/>')
    for set_index, (label, heads) in enumerate(curves):
        dash = _DASHES[set_index % len(_DASHES)]
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        for head, values in enumerate(heads):
            colour = _COLOURS[head % len(_COLOURS)]
            points = " ".join(f"{x_of(k + 1):.1f},{y_of(v):.1f}" for k, v in enumerate(values))
            body.append(f'<polyline points="{points}" fill="none" stroke="{colour}" '
                        f'stroke-width="2"{dash_attr}><title>{escape(label)} head {head}'
                        "</title></polyline>")
            if set_index == 0:
                for k, v in enumerate(values):
                    body.append(f'<circle cx="{x_of(k + 1):.1f}" cy="{y_of(v):.1f}" r="2.5" '
                                f'fill="{colour}"/>')
    legend_x = _LEFT + _PLOT_W + 20
    y = _TOP + 10
    num_heads = max(len(heads) for _, heads in curves)
    for head in range(num_heads):
        colour = _COLOURS[head % len(_COLOURS)]
        body.append(f'<line x1="{legend_x}" y1="{y - 4}" x2="{legend_x + 24}" y2="{y - 4}" '
                    f'stroke="{colour}" stroke-width="3"/>')
        body.append(_text(legend_x + 30, y, f"head {head}"))
        y += 18
    y += 8
    for set_index, (label, _) in enumerate(curves):
        dash = _DASHES[set_index % len(_DASHES)]
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        body.append(f'<line x1="{legend_x}" y1="{y - 4}" x2="{legend_x + 24}" y2="{y - 4}" '
                    f'stroke="#1f2933" stroke-width="2"{dash_attr}/>')
        body.append(_text(legend_x + 30, y, label))
        y += 18
    return _svg(width, height, body)
