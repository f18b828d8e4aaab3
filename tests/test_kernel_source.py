"""What the kernels' source must not contain because a supported Triton cannot run it: read from the source, so this
holds under every Triton, including those CI does not install.

The interpreters of triton 3.7 and 3.8 (torch 2.12's and 2.14's) pass a module constant (`tl.constexpr`) combined
with a tensor inside a call's arguments, `tl.maximum(C - t, 0)`, on as a constexpr wrapping the tensor, which
`tl.maximum` / `tl.minimum` then refuse ("cannot convert ... to tensor"); assigned first, or with the tensor on the
left, the same arithmetic runs under every Triton. Compiled kernels are unaffected; the CPU tests are not.
"""

from __future__ import annotations

import ast
from pathlib import Path

KERNELS = Path(__file__).resolve().parent.parent / "relora_kernels" / "kernels"


def _module_constants(tree: ast.Module) -> set[str]:
    """Names the module binds to `tl.constexpr(...)`."""
    return {target.id for node in tree.body if isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Call) and ast.unparse(node.value.func) == "tl.constexpr"
            for target in node.targets if isinstance(target, ast.Name)}


def _is_jit(function: ast.FunctionDef) -> bool:
    return any(ast.unparse(d.func if isinstance(d, ast.Call) else d) == "triton.jit" for d in function.decorator_list)


def constant_on_the_left_in_call_arguments(source: str) -> list[str]:
    """Every `constant <op> ...` inside a call's arguments in a @triton.jit function, as `function: expression`."""
    tree = ast.parse(source)
    constants = _module_constants(tree)
    found = {}  # by node: a nested call's arguments are also inside the outer call's
    for function in (node for node in tree.body if isinstance(node, ast.FunctionDef) and _is_jit(node)):
        for call in (node for node in ast.walk(function) if isinstance(node, ast.Call)):
            for argument in [*call.args, *(keyword.value for keyword in call.keywords)]:
                found |= {node: f"{function.name}: {ast.unparse(node)}" for node in ast.walk(argument)
                          if isinstance(node, ast.BinOp) and isinstance(node.left, ast.Name)
                          and node.left.id in constants}
    return list(found.values())


def test_no_kernel_combines_a_module_constant_with_a_tensor_inside_call_arguments():
    sources = sorted(KERNELS.glob("*.py"))
    assert len(sources) >= 5
    found = [f"{path.name}: {hit}" for path in sources
             for hit in constant_on_the_left_in_call_arguments(path.read_text())]
    assert found == []


def test_the_check_finds_what_the_fp8_rounding_once_had():
    source = '''
_MIN = tl.constexpr(-6)
_DROPPED = tl.constexpr(20)
_OTHER = 3


@triton.jit
def _round(exponent):
    shift = tl.minimum(_DROPPED + tl.maximum(_MIN - exponent, 0), 25)
    normal = tl.maximum(exponent, _MIN)
    difference = _MIN - exponent
    return tl.minimum(normal - exponent + _DROPPED, 25) + tl.maximum(_OTHER - exponent, difference)


def not_a_kernel(exponent):
    return max(_MIN - exponent, 0)
'''
    assert constant_on_the_left_in_call_arguments(source) == [
        "_round: _DROPPED + tl.maximum(_MIN - exponent, 0)", "_round: _MIN - exponent"]
