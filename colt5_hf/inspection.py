"""What the routers picked: per-router token counts and a PNG with one row per router (encoder layers' attention
query, attention key/value and feed-forward routers; each cross-attention route), one column per input token."""

import re

import torch


def router_label(name: str, route: int, routes: int) -> str:
    """'encoder.block.3.attention.kv_router' -> 'encoder 3 attention kv'; cross-attention routers get their route."""
    match = re.fullmatch(r"encoder\.block\.(\d+)\.(attention\.q_router|attention\.kv_router|feed_forward\.router)", name)
    if match:
        part = {"attention.q_router": "attention q", "attention.kv_router": "attention kv",
                "feed_forward.router": "feed-forward"}[match.group(2)]
        return f"encoder {match.group(1)} {part}"
    match = re.fullmatch(r"decoder\.block\.(\d+)\.cross_attention\.kv_router", name)
    if match:
        return f"decoder {match.group(1)} cross route {route}" if routes > 1 else f"decoder {match.group(1)} cross"
    return f"{name} route {route}" if routes > 1 else name


def routing_rows(routing, sample: int = 0):
    """{label: sorted positions picked in `sample`} from `record_routing()`'s first call of every router (the
    encoder runs once per generate; cross-attention routers once per encoder output)."""
    rows = {}
    for name, calls in routing.items():
        picked = calls[0]
        routes = picked.indices.shape[1]
        for route in range(routes):
            positions = picked.indices[sample, route][picked.valid[sample, route]]
            rows[router_label(name, route, routes)] = sorted(positions.tolist())
    return rows


def plot_routing(routing, tokens, path, title: str = "", sample: int = 0):
    """Write a PNG: a (routers x tokens) grid, dark where the router picked the token, with the count per router.
    Token strings label the x axis when they fit; otherwise positions do, and the top axis names the tokens that
    occur once in the input (where the rare, telling tokens of a long input usually are)."""
    from matplotlib.figure import Figure

    rows = routing_rows(routing, sample)
    n = len(tokens)
    grid = torch.zeros(len(rows), n)
    for row, positions in enumerate(rows.values()):
        grid[row, positions] = 1.0
    width = min(40.0, max(8.0, n / 12 if n <= 200 else n / 40))
    figure = Figure(figsize=(width, 1.8 + 0.32 * len(rows)), layout="constrained")
    axes = figure.subplots()
    axes.imshow(grid.numpy(), aspect="auto", cmap="Greys", vmin=0, vmax=1.3, interpolation="nearest")
    axes.set_yticks(range(len(rows)), [f"{label}  ({len(p)}/{n})" for label, p in rows.items()], fontsize=8)
    if n <= 200:
        axes.set_xticks(range(n), [token if token.strip() else repr(token) for token in tokens], fontsize=6,
                        rotation=90)
    else:
        axes.set_xlabel("input position")
        counts = {}
        for token in tokens:
            counts[token] = counts.get(token, 0) + 1
        rare = [i for i, token in enumerate(tokens) if counts[token] == 1][:24]
        top = axes.secondary_xaxis("top")
        top.set_xticks(rare, [f"{tokens[i]}@{i}" for i in rare], fontsize=7, rotation=90)
        for i in rare:
            axes.axvline(i, color="tab:red", linewidth=0.6, alpha=0.5)
    axes.set_title(title, fontsize=9)
    figure.savefig(path, dpi=100)
    return path


__all__ = ["routing_rows", "plot_routing"]
