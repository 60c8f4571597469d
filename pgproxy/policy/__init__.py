"""Statement inspection with pglast: pure functions over SQL text, decisions cached by text."""
