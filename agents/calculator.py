"""A safe calculator: arithmetic expressions evaluated by walking their syntax
tree over a whitelist of nodes, never `eval`.

Numbers (int, float), + - * / // % **, unary + -, parentheses, and a few
functions and constants from `math`. Exponents and integer sizes are bounded
(agents.limits) so `9 ** 9 ** 9` is refused instead of hanging the server.
"""

from __future__ import annotations

import ast
import math
import operator

from agents import limits


class CalculatorError(ValueError):
    """An expression the calculator refuses; the message says why."""


_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCTIONS = {
    "abs": abs,
    "round": round,
    "min": min,
    "max": max,
    "sqrt": math.sqrt,
    "log": math.log,
    "log10": math.log10,
    "exp": math.exp,
    "sin": math.sin,
    "cos": math.cos,
    "tan": math.tan,
    "floor": math.floor,
    "ceil": math.ceil,
}
_CONSTANTS = {"pi": math.pi, "e": math.e}


def evaluate(expression: str) -> int | float:
    """The value of `expression`. Raises CalculatorError with a reason."""
    if len(expression) > limits.CALC_MAX_EXPRESSION_CHARS:
        raise CalculatorError(
            f"The expression is longer than {limits.CALC_MAX_EXPRESSION_CHARS} characters."
        )
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError):
        raise CalculatorError("This is not an arithmetic expression.") from None
    try:
        return _value(tree.body)
    except CalculatorError:
        raise
    except ZeroDivisionError:
        raise CalculatorError("Division by zero.") from None
    except (OverflowError, ValueError, TypeError) as exc:
        raise CalculatorError(f"Cannot compute this: {exc}.") from None
    except RecursionError:
        raise CalculatorError("The expression is nested too deeply.") from None


def _checked(value: int | float) -> int | float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise CalculatorError("Only numbers are allowed.")
    if isinstance(value, int) and value.bit_length() > limits.CALC_MAX_DIGITS * 3.33:
        raise CalculatorError(f"A number has more than {limits.CALC_MAX_DIGITS} digits.")
    return value


def _value(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant):
        return _checked(node.value)
    if isinstance(node, ast.Name):
        if node.id in _CONSTANTS:
            return _CONSTANTS[node.id]
        raise CalculatorError(f"Unknown name {node.id!r}.")
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _checked(_UNARY[type(node.op)](_value(node.operand)))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _value(node.left), _value(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > limits.CALC_MAX_EXPONENT:
            raise CalculatorError(f"Exponents are limited to ±{limits.CALC_MAX_EXPONENT}.")
        # The digits of |left| ** right: refuse before computing a huge integer.
        if (
            isinstance(node.op, ast.Pow)
            and isinstance(left, int)
            and isinstance(right, int)
            and right > 0
            and abs(left) > 1
            and right * math.log10(abs(left)) > limits.CALC_MAX_DIGITS
        ):
            raise CalculatorError(
                f"The result would have more than {limits.CALC_MAX_DIGITS} digits."
            )
        return _checked(_BINARY[type(node.op)](left, right))
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in _FUNCTIONS
        and not node.keywords
        and 0 < len(node.args) <= 8
    ):
        args = [_value(a) for a in node.args]
        return _checked(_FUNCTIONS[node.func.id](*args))
    raise CalculatorError(f"{type(node).__name__} is not allowed in an expression.")


def format_number(value: int | float) -> str:
    """The result as the model reads it (floats to 12 significant digits)."""
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return f"{value:.12g}"
    return str(value)
