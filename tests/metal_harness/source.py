"""Kernel source as `mx.fast.metal_kernel` generates it, and its translation to C++.

`generate` reproduces MLX 0.32.4's generated Metal source byte for byte (kernel name, template
header, one `[[buffer(i)]]` parameter per input with `constant` for small arrays and `&` for
scalars, `_shape`/`_strides`/`_ndim` only where the body mentions them, outputs, then the
`[[attribute]]` parameters the body mentions, the body, and the explicit instantiation).
tests/test_metal_harness.py checks this against the text MLX itself prints with `verbose=True`.

`translate` turns that text into a C++ translation unit for g++ with as few edits as possible:
`#line` markers so diagnostics point into the kernel's header/body, and each `threadgroup`
declaration rewritten into shared per-threadgroup storage (everything else compiles as is
against msl_shim.h, where the address-space qualifiers are empty macros).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import mlx.core as mx

# MLX's type names for dtypes (get_type_string), and their sizes.
TYPE_NAMES: dict[mx.Dtype, tuple[str, int]] = {
    mx.float32: ("float", 4),
    mx.float16: ("float16_t", 2),
    mx.bfloat16: ("bfloat16_t", 2),
    mx.bool_: ("bool", 1),
    mx.int8: ("int8_t", 1),
    mx.int16: ("int16_t", 2),
    mx.int32: ("int32_t", 4),
    mx.int64: ("int64_t", 8),
    mx.uint8: ("uint8_t", 1),
    mx.uint16: ("uint16_t", 2),
    mx.uint32: ("uint32_t", 4),
    mx.uint64: ("uint64_t", 8),
}

# Arrays with fewer elements than this are passed in the constant address space.
MAX_CONSTANT_ARRAY_SIZE = 8

# Every thread attribute MLX declares when its name occurs in the body, in MLX's order.
ATTRIBUTES: tuple[tuple[str, str], ...] = (
    ("dispatch_quadgroups_per_threadgroup", "uint"),
    ("dispatch_simdgroups_per_threadgroup", "uint"),
    ("dispatch_threads_per_threadgroup", "uint3"),
    ("grid_origin", "uint3"),
    ("grid_size", "uint3"),
    ("quadgroup_index_in_threadgroup", "uint"),
    ("quadgroups_per_threadgroup", "uint"),
    ("simdgroup_index_in_threadgroup", "uint"),
    ("simdgroups_per_threadgroup", "uint"),
    ("thread_execution_width", "uint"),
    ("thread_index_in_quadgroup", "uint"),
    ("thread_index_in_simdgroup", "uint"),
    ("thread_index_in_threadgroup", "uint"),
    ("thread_position_in_grid", "uint3"),
    ("thread_position_in_threadgroup", "uint3"),
    ("threadgroup_position_in_grid", "uint3"),
    ("threadgroups_per_grid", "uint3"),
    ("threads_per_grid", "uint3"),
    ("threads_per_simdgroup", "uint"),
    ("threads_per_threadgroup", "uint3"),
)


class TranslationError(ValueError):
    """The kernel uses an MSL construct the harness cannot translate."""


def type_name(dtype: mx.Dtype) -> str:
    if dtype not in TYPE_NAMES:
        raise TranslationError(f"dtype {dtype} cannot be passed to a Metal kernel")
    return TYPE_NAMES[dtype][0]


@dataclass(frozen=True)
class ArgInfo:
    """What the signature needs to know about one input."""

    dtype: mx.Dtype
    ndim: int
    size: int


@dataclass
class Param:
    """One `[[buffer(i)]]` parameter of the generated kernel."""

    name: str
    type: str  # element type name
    role: str  # input | shape | strides | ndim | output
    scalar: bool = False  # passed by reference (`const constant T&`)
    input_index: int = -1  # for input/shape/strides/ndim: which input


@dataclass
class Generated:
    """MLX's generated source, in the pieces the translation needs."""

    kernel_name: str
    header: str
    head: str  # template line and signature, up to and including "{\n"
    body: str
    tail: str  # closing brace and explicit instantiation
    params: list[Param] = field(default_factory=list)
    attributes: list[tuple[str, str]] = field(default_factory=list)
    template_def: str = ""  # "<float, 3, 1>" or ""

    @property
    def text(self) -> str:
        """The exact text MLX compiles (after its Metal preamble)."""
        return self.header + self.head + self.body + self.tail


def template_value(value: object) -> tuple[str, str]:
    """(parameter kind, spelled value) of one template argument, checked like MLX does."""
    if isinstance(value, bool):
        return "bool", "1" if value else "0"
    if isinstance(value, int):
        return "int", str(value)
    if isinstance(value, mx.Dtype):
        return "typename", type_name(value)
    raise TranslationError(
        "[metal_kernel] Invalid template argument. Must be `mlx.core.Dtype`, `int` or `bool`."
    )


def generate(
    name: str,
    input_names: list[str],
    output_names: list[str],
    source: str,
    header: str,
    inputs: list[ArgInfo],
    output_dtypes: list[mx.Dtype],
    template: list[tuple[str, object]],
    atomic_outputs: bool = False,
) -> Generated:
    """The kernel source `mx.fast.metal_kernel` builds for this call (MLX 0.32.4)."""
    targs = [(tname, *template_value(v)) for tname, v in template]

    kernel_name = "custom_kernel_" + name
    template_def = ""
    if targs:
        template_def = "<" + ", ".join(spelled for _, _, spelled in targs) + ">"
        # MLX's template hash: brackets and ", " become "_", then the last character is dropped.
        kernel_name += (
            "_" + template_def.replace("<", "_").replace(">", "_").replace(", ", "_")[:-1]
        )
    for arg in inputs:
        kernel_name += "_" + type_name(arg.dtype)
        if arg.ndim == 0:
            kernel_name += "s"
        elif arg.size < MAX_CONSTANT_ARRAY_SIZE:
            kernel_name += "c"
    for dtype in output_dtypes:
        kernel_name += "_" + type_name(dtype)

    head = ""
    if targs:
        head += "template <" + ", ".join(f"{kind} {tname}" for tname, kind, _ in targs) + ">\n"
    head += f"[[kernel]] void {kernel_name}(\n"

    params: list[Param] = []
    index = 0
    for i, (iname, arg) in enumerate(zip(input_names, inputs, strict=True)):
        space = "constant" if arg.size < MAX_CONSTANT_ARRAY_SIZE else "device"
        ref = "&" if arg.ndim == 0 else "*"
        head += f"  const {space} {type_name(arg.dtype)}{ref} {iname} [[buffer({index})]],\n"
        params.append(Param(iname, type_name(arg.dtype), "input", arg.ndim == 0, i))
        index += 1
        if arg.ndim > 0:
            for suffix, decl, ptype in (
                ("_shape", "const constant int*", "int"),
                ("_strides", "const constant int64_t*", "int64_t"),
                ("_ndim", "const constant int&", "int"),
            ):
                if iname + suffix in source:
                    head += f"  {decl} {iname}{suffix} [[buffer({index})]],\n"
                    params.append(Param(iname + suffix, ptype, suffix[1:], suffix == "_ndim", i))
                    index += 1

    attributes = [(a, t) for a, t in ATTRIBUTES if a in source]
    for oname, dtype in zip(output_names, output_dtypes, strict=True):
        tname = type_name(dtype)
        if atomic_outputs:
            tname = f"atomic<{tname}>"
        head += f"  device {tname}* {oname} [[buffer({index})]]"
        # MLX compares the running buffer index (which counts _shape/_strides/_ndim buffers)
        # with the number of inputs plus outputs; reproduce that exactly.
        if index < len(inputs) + len(output_names) - 1 or attributes:
            head += ",\n"
        else:
            head += ") {\n"
        params.append(Param(oname, type_name(dtype), "output"))
        index += 1
    for i, (attr, atype) in enumerate(attributes):
        head += f"  {atype} {attr} [[{attr}]]"
        head += ",\n" if i < len(attributes) - 1 else ") {\n"

    tail = "\n}\n"
    if targs:
        full = kernel_name + template_def
        tail += f'\ntemplate [[host_name("{kernel_name}")]] [[kernel]] decltype({full}) {full};\n'
    return Generated(kernel_name, header, head, source, tail, params, attributes, template_def)


# ---------------------------------------------------------------------------------------------
# Translation to C++.
# ---------------------------------------------------------------------------------------------
_COMMENT_OR_LITERAL = re.compile(
    r'//[^\n]*|/\*.*?\*/|"(?:\\.|[^"\\\n])*"|\'(?:\\.|[^\'\\\n])*\'', re.S
)
_THREADGROUP = re.compile(r"\bthreadgroup\b")
_DECLARATION = re.compile(
    r"threadgroup\s+(?P<type>[A-Za-z_][\w:\s<>,]*?)\s*\b(?P<name>[A-Za-z_]\w*)\s*"
    r"(?P<dims>(?:\[[^\[\];]+\]\s*)*);"
)


def _blank(text: str) -> str:
    """`text` with comments and literals replaced by spaces (newlines kept), same length."""

    def spaces(m: re.Match) -> str:
        return re.sub(r"[^\n]", " ", m.group(0))

    return _COMMENT_OR_LITERAL.sub(spaces, text)


def _first_stop(blank: str, pos: int) -> tuple[str, int]:
    """The first of * & ; [ = ( ) { } , after `pos` outside template angle brackets."""
    depth = 0
    for i in range(pos, len(blank)):
        c = blank[i]
        if c == "<":
            depth += 1
        elif c == ">":
            depth -= 1
        elif depth == 0 and c in "*&;[=(){},":
            return c, i
    return "", len(blank)


def rewrite_threadgroup(
    text: str, where: str, declarations_allowed: bool, first_id: int = 0
) -> str:
    """Rewrite `threadgroup T name[dims];` into shared per-threadgroup storage.

    Pointer and reference uses (`threadgroup T*`) are left alone; any other use of the
    qualifier is refused rather than compiled into thread-private memory.
    """
    blank = _blank(text)
    out: list[str] = []
    done = 0
    site = first_id
    for m in _THREADGROUP.finditer(blank):
        if m.start() < done:
            continue
        line = blank.count("\n", 0, m.start()) + 1
        stop, _ = _first_stop(blank, m.end())
        if stop in "*&" and stop:
            continue
        if stop not in ";[":
            raise TranslationError(
                f"{where}:{line}: unsupported use of 'threadgroup' (the harness handles "
                "`threadgroup T name[N]...;` declarations and threadgroup pointers/references)"
            )
        if not declarations_allowed:
            raise TranslationError(
                f"{where}:{line}: threadgroup variables can only be declared in the kernel body"
            )
        d = _DECLARATION.match(blank, m.start())
        if not d:
            raise TranslationError(
                f"{where}:{line}: cannot parse this threadgroup declaration; write one "
                "`threadgroup T name[N]...;` per statement, without initializer"
            )
        type_ = " ".join(d.group("type").split())
        dims = "".join(d.group("dims").split())
        name = d.group("name")
        newlines = blank.count("\n", d.start(), d.end())
        out.append(text[done : d.start()])
        out.append(
            f'auto& {name} = ::mslh::threadgroup_array<{type_}{dims}>({site}, "{name}", '
            f'"threadgroup {type_}");' + "\n" * newlines
        )
        site += 1
        done = d.end()
    out.append(text[done:])
    return "".join(out)


def _quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def translate(gen: Generated, name: str) -> str:
    """The C++ translation unit: shim, MLX's kernel text (annotated), and the thread entry."""
    header = rewrite_threadgroup(gen.header, f"{name}:header", declarations_allowed=False)
    body = rewrite_threadgroup(gen.body, f"{name}:source", declarations_allowed=True)
    parts = [
        '#include "msl_shim.h"\n',
        f'#line 1 "{name}:header"\n',
        header,
        "" if header.endswith("\n") or not header else "\n",
        f'#line 1 "{name}:signature"\n',
        gen.head,
        f'#line 1 "{name}:source"\n',
        body,
        gen.tail,
        '#line 1 "harness-glue"\n',
    ]

    args = []
    specs = []
    for i, p in enumerate(gen.params):
        if p.role == "output":
            args.append(f"({p.type}*)mslh_glue::bufs[{i}]")
        elif p.scalar:
            args.append(f"*(const {p.type}*)mslh_glue::bufs[{i}]")
        else:
            args.append(f"(const {p.type}*)mslh_glue::bufs[{i}]")
        size = f"sizeof({p.type})"
        specs.append(
            f"{{{_quote(p.name)}, {_quote(p.type)}, {size}, {str(p.role == 'output').lower()}}}"
        )
    for attr, atype in gen.attributes:
        args.append(f"mslh::to_uint3(a.{attr})" if atype == "uint3" else f"a.{attr}")
    call = gen.kernel_name + gen.template_def
    nbuf = len(gen.params)
    parts.append(
        "namespace mslh_glue {\n"
        f"void* bufs[{max(nbuf, 1)}];\n"
        f"const mslh::BufferSpec specs[{max(nbuf, 1)}] = {{{', '.join(specs)}}};\n"
        "void invoke(const mslh::ThreadAttrs& a) {\n"
        f"  (void)a;\n  {call}({', '.join(args)});\n"
        "}\n"
        "}  // namespace mslh_glue\n"
        "int main(int argc, char** argv) {\n"
        f"  return mslh::run_main(argc, argv, {_quote(gen.kernel_name)}, mslh_glue::specs, {nbuf}, "
        "mslh_glue::bufs, mslh_glue::invoke);\n"
        "}\n"
    )
    return "".join(parts)
