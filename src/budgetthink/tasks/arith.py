"""Safe exact arithmetic for answers: an AST walker over integers, + - * /, unary +/-, and parentheses.

    value = evaluate("(3 * 5) + 7")      # Fraction(22, 1)
    evaluate("1 / (2 - 2)")              # raises DivisionByZero
    evaluate("2 ** 3")                   # raises ArithError: operator ** is not allowed

The text is parsed with `ast.parse(mode="eval")` and walked node by node; nothing is ever `eval`-ed.
Values are `fractions.Fraction`, so `7 / 3 * 3 == 7` exactly. Input length, node count, nesting depth,
literal size and the size of every intermediate value are bounded, so no input can hang or exhaust memory.
Floats (`2.5`), `**`, `//`, `%`, names, calls and everything else are rejected with an ArithError.
"""

import ast
from fractions import Fraction

MAX_CHARS = 512  # longest expression text accepted
MAX_NODES = 256  # most AST nodes (numbers, operators, ...)
MAX_DEPTH = 64  # deepest nesting of operations
MAX_BITS = 2048  # largest numerator/denominator of any value, in bits (~616 decimal digits)


class ArithError(ValueError):
    """The expression is not plain integer arithmetic, or is too large."""


class DivisionByZero(ArithError):
    """The expression divides by zero (reported apart from other errors)."""


_BINOPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}
_REJECTED = {ast.Pow: "**", ast.FloorDiv: "//", ast.Mod: "%", ast.MatMult: "@", ast.LShift: "<<",
             ast.RShift: ">>", ast.BitAnd: "&", ast.BitOr: "|", ast.BitXor: "^"}


def evaluate(text: str) -> Fraction:
    """The exact value of `text`; ArithError (or its subclass DivisionByZero) if it is not allowed."""
    if len(text) > MAX_CHARS:
        raise ArithError(f"expression longer than {MAX_CHARS} characters")
    # eval-mode parsing rejects statements; newlines/tabs are plain whitespace in an expression
    source = " ".join(text.split())
    if not source:
        raise ArithError("empty expression")
    try:
        tree = ast.parse(source, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise ArithError(f"not an expression: {type(e).__name__}") from None
    for nodes, _ in enumerate(ast.walk(tree), 1):
        if nodes > MAX_NODES:
            raise ArithError(f"expression has more than {MAX_NODES} nodes")
    return _walk(tree.body, 0)


def _walk(node: ast.AST, depth: int) -> Fraction:
    if depth > MAX_DEPTH:
        raise ArithError(f"expression nested deeper than {MAX_DEPTH}")
    if isinstance(node, ast.Constant):
        # bool is a subclass of int, but `True` is a name in the source, never a number literal
        if type(node.value) is not int:
            raise ArithError(f"only integer literals are allowed, not {node.value!r}")
        return _bounded(Fraction(node.value))
    if isinstance(node, ast.UnaryOp):
        if isinstance(node.op, ast.USub):
            return -_walk(node.operand, depth + 1)
        if isinstance(node.op, ast.UAdd):
            return _walk(node.operand, depth + 1)
        raise ArithError(f"unary operator {type(node.op).__name__} is not allowed")
    if isinstance(node, ast.BinOp):
        op = type(node.op)
        if op not in _BINOPS:
            raise ArithError(f"operator {_REJECTED.get(op, op.__name__)} is not allowed")
        left = _walk(node.left, depth + 1)
        right = _walk(node.right, depth + 1)
        if op is ast.Add:
            return _bounded(left + right)
        if op is ast.Sub:
            return _bounded(left - right)
        if op is ast.Mult:
            return _bounded(left * right)
        if right == 0:
            raise DivisionByZero("division by zero")
        return _bounded(left / right)
    raise ArithError(f"{type(node).__name__} is not allowed in an arithmetic expression")


def _bounded(x: Fraction) -> Fraction:
    if x.numerator.bit_length() > MAX_BITS or x.denominator.bit_length() > MAX_BITS:
        raise ArithError(f"a value in the expression exceeds {MAX_BITS} bits")
    return x
