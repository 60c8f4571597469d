"""Statement inspection with pglast: pure functions over SQL text, decisions cached by text."""

from __future__ import annotations

from collections.abc import Iterator


def dict_nodes(tree) -> Iterator[dict]:
    """Every dict in a parse tree as ``parse_sql_json`` gives it, depth first."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, dict):
            yield node
            stack.extend(node.values())
