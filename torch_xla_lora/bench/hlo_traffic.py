"""HBM bytes of a program libtpu compiled, counted from its optimized HLO text.

libtpu's ``cost_analysis()`` counts the bytes every op touches wherever they live, VMEM-resident buffers too;
:func:`hbm_bytes` counts only the HBM traffic, from the memory space libtpu placed each array in (the layout's
``S(n)``, n > 0 on-chip): each entry op's operands read and results written in HBM, a fusion's operand at the
bytes of the slices it reads of it, an in-place update at the update's bytes, copies between HBM and VMEM once.
A Pallas kernel's custom call counts at its whole operands and results, each read or written once (a kernel that
reads only part of an operand, as the slot kernels read the visited slots' tiles, is counted at the whole).
"""

from __future__ import annotations

import re

_ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
             "f64": 8, "s64": 8, "u64": 8}  # fmt: skip
_ARRAY = re.compile(r"(\w+)\[([\d,]*)\](\{[^}]*\})?")
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "copy-done", "slice-done", "after-all"}


def _arrays(shape: str) -> list[tuple[int, bool]]:
    """(bytes, in HBM) of each array of an HLO shape string (a tuple's elements in order). A layout's memory
    space ``S(n)``, n > 0, is on-chip (VMEM, SMEM, semaphores)."""
    out = []
    for dtype, dims, layout in _ARRAY.findall(shape):
        if dtype not in _ITEMSIZE:
            continue
        count = 1
        for d in filter(None, dims.split(",")):
            count *= int(d)
        space = re.search(r"S\((\d+)\)", layout or "")
        out.append((count * _ITEMSIZE[dtype], space is None or space.group(1) == "0"))
    return out


def _closing(text: str, start: int) -> int:
    """The index of the parenthesis closing the one at ``start``."""
    depth = 0
    for index in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[index], 0)
        if depth == 0:
            return index
    raise ValueError(f"unbalanced parentheses in {text!r}")


def _parse(hlo: str) -> dict[str, list[dict]]:
    """Computation name -> its instructions (name, shape, opcode, operand names, called computation, root)."""
    computations: dict[str, list[dict]] = {}
    current = None
    for line in hlo.splitlines():
        header = re.match(r"(ENTRY )?%([\w.\-]+) \(.*\) -> .* \{$", line)
        if header:
            current = "ENTRY" if header.group(1) else header.group(2)
            computations[current] = []
            continue
        match = re.match(r"\s*(ROOT )?%([\w.\-]+) = (.*)$", line)
        if current is None or match is None:
            continue
        rest = match.group(3)
        end = rest.index(" ") if not rest.startswith("(") else _closing(rest, 0) + 1  # the shape
        shape, tail = rest[:end], rest[end + 1 :]
        start = tail.index("(")
        opcode, stop = tail[:start], _closing(tail, start)
        arguments = tail[start + 1 : stop]
        called = re.search(r"calls=%([\w.\-]+)", tail)
        target = re.search(r'custom_call_target="([^"]+)"', tail)
        computations[current].append({"name": match.group(2), "shape": shape, "opcode": opcode,
                                      "operands": re.findall(r"%([\w.\-]+)", arguments),
                                      "parameter": int(arguments) if opcode == "parameter" else None,
                                      "calls": called and called.group(1), "root": bool(match.group(1)),
                                      "target": target and target.group(1)})  # fmt: skip
    return computations


def _fused_reads(body: list[dict], index: int, size: int) -> int:
    """Bytes a fusion reads of its ``index``-th operand (``size`` bytes): the slices it takes where every use
    is a slice (through bitcasts), nothing where it is the buffer an in-place update writes into."""
    param = next(i["name"] for i in body if i["parameter"] == index)
    frontier, total = [param], 0
    while frontier:
        name = frontier.pop()
        for user in (i for i in body if name in i["operands"]):
            if user["opcode"] == "bitcast":
                frontier.append(user["name"])
            elif user["opcode"] in ("slice", "dynamic-slice"):
                total += sum(b for b, _ in _arrays(user["shape"]))
            elif user["opcode"] == "dynamic-update-slice" and user["operands"][0] == name:
                continue
            else:
                return size
    return total


def hbm_bytes(hlo: str) -> int:
    """HBM bytes the compiled program's ops move (see the module doc): a model of its traffic from libtpu's
    placement, for programs of copies, converts, slices and in-place updates like these."""
    computations = _parse(hlo)
    shapes = {i["name"]: i["shape"] for i in computations["ENTRY"]}
    total = 0
    for op in computations["ENTRY"]:
        if op["opcode"] in _FREE:
            continue
        if op["opcode"] in ("copy-start", "slice-start"):  # (destination, source, context): one side in HBM
            destination = _arrays(op["shape"])[1 if op["opcode"] == "slice-start" else 0]
            sides = [destination[1]] + [hbm for _, hbm in _arrays(shapes[op["operands"][0]])[:1]]
            total += destination[0] * sum(sides)
            continue
        body = computations.get(op["calls"] or "", [])
        for index, operand in enumerate(op["operands"]):
            for size, hbm in _arrays(shapes[operand])[:1]:
                if hbm:
                    total += _fused_reads(body, index, size) if body else size
        fused = {i["name"]: i for i in body}
        root = next((i for i in body if i["root"]), None)
        elements = [] if root is None else root["operands"] if root["opcode"] == "tuple" else [root["name"]]
        for k, (size, hbm) in enumerate(_arrays(op["shape"])):
            element = fused.get(elements[k]) if k < len(elements) else None
            if element is not None and element["opcode"] == "dynamic-update-slice":  # in place: the update
                size = sum(b for b, _ in _arrays(fused[element["operands"][1]]["shape"]))
            total += size if hbm else 0
    return total


#: Ops that pass an array on without computing on it (views, layout and memory-space copies, slices).
_PASS_ON = {"bitcast", "get-tuple-element", "copy", "copy-start", "copy-done", "slice", "reshape"}


def after_kernels(hlo: str) -> set[str]:
    """The opcodes the compiled program runs on a Pallas (Mosaic) kernel's results: those of every entry op
    that reads one (through views, copies and slices), a fusion's by the ops of its computation. Another
    kernel reading the result counts as "custom-call"; a result returned as it is adds nothing."""
    computations = _parse(hlo)
    entry = computations["ENTRY"]
    reached = {op["name"] for op in entry if op["target"] == "tpu_custom_call"}
    opcodes: set[str] = set()
    for op in entry:  # instructions are in order: operands before their users
        if not reached.intersection(op["operands"]):
            continue
        if op["opcode"] in _PASS_ON:
            reached.add(op["name"])
        elif op["calls"] in computations:
            opcodes.update(i["opcode"] for i in computations[op["calls"]] if i["opcode"] not in _FREE)
        else:
            opcodes.add(op["opcode"])
    return opcodes
