"""A calculator tool for agents: arithmetic only, evaluated on a parsed syntax tree.

Never `eval`: the model's text is untrusted. Supported: numbers, + - * / // % **, unary
minus, parentheses, and a few functions (abs, round, min, max, sqrt). Exponents and results
are bounded so a prompt cannot make the process compute for ever.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable

_BINARY: dict[type, Callable[[float, float], float]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}
_FUNCTIONS: dict[str, Callable[..., float]] = {
    "abs": abs,
    "round": round,
    "min": min,
    "max": max,
    "sqrt": math.sqrt,
}
_LIMIT = 1e15


class CalculatorError(ValueError):
    pass


def _eval(node: ast.AST) -> float:
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if (
        isinstance(node, ast.Constant)
        and isinstance(node.value, (int, float))
        and not isinstance(node.value, bool)
    ):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > 64:
            raise CalculatorError("exponent too large")
        value = _BINARY[type(node.op)](left, right)
    elif isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        value = _UNARY[type(node.op)](_eval(node.operand))
    elif (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in _FUNCTIONS
        and not node.keywords
    ):
        value = _FUNCTIONS[node.func.id](*[_eval(arg) for arg in node.args])
    else:
        raise CalculatorError(f"unsupported expression: {ast.dump(node)[:60]}")
    if abs(value) > _LIMIT:
        raise CalculatorError("result too large")
    return value


def calculate(expression: str) -> str:
    """Evaluate an arithmetic expression, e.g. '(16 - 3 - 4) * 2'. Returns the result as text."""
    text = expression.replace(",", "").replace("^", "**").replace("×", "*").replace("÷", "/").strip()
    try:
        value = _eval(ast.parse(text, mode="eval"))
    except (SyntaxError, CalculatorError, ZeroDivisionError, TypeError, ValueError, OverflowError) as exc:
        return f"error: {exc}"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)
