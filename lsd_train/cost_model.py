"""A cost model of the sharded train step: predicted step time and MFU on real accelerators.

From the compiled (SPMD-partitioned) step, per device (`step_costs`):

- FLOPs: the dot and convolution FLOPs of the optimized HLO with every while loop (`lax.scan` over
  layers) run its known trip count (`lsd_jax.flops.hlo_matmul_flops`). They include the remat
  recompute and any work the partitioner replicates. XLA's `cost_analysis()['flops']` counts a
  loop body once; it is kept as `xla_flops_loops_once`, a cross-check only.
- HBM bytes: each executed top-level instruction reads its operands and writes its result once,
  a fusion counted as one kernel (its operands and outputs, not its internals), loop bodies times
  their trip counts. A fusion operand used only through dynamic-slices counts the slices (a scan
  reading one layer of its stacked weights), an in-place dynamic-update-slice counts the update.
  This is XLA's own per-instruction "bytes accessed" rule, scaled for loops (`hbm_bytes`; with
  every loop body counted once, `hbm_bytes_loops_once`, it is comparable to XLA's
  `cost_analysis()['bytes accessed']`, kept beside it). The argument + output + temporaries
  figure of `memory_analysis()` is no measure of traffic: a loop reuses its buffers every trip.
- bf16 on the CPU: its compiler has no bf16 arithmetic, so it carries bf16 values between
  kernels as f32 (widen, compute, round back with convert pairs or reduce-precision) and
  promotes bf16 collectives to f32. A GPU or TPU compile keeps them bf16, so a value holding
  bf16 numbers (rounded to bf16 by its producer, or by every consumer) counts 2 bytes per
  element, a fusion that only widens and rounds back a bf16 value counts nothing, and a promoted
  collective counts at bf16 (`hbm_bytes_cpu` keeps the CPU's own sizes).
- Collectives, parsed from `compiled.as_text()`: for every all-gather, reduce-scatter,
  all-reduce, all-to-all and collective-permute, the buffer size `bytes` (the gathered result,
  the scattered or reduced operand, the sent buffer) and the replica group size `g` (2 for a
  collective-permute: pairs), loop trip counts applied. Bytes on the wire per device, ring
  algorithms: all-gather and reduce-scatter `(g-1)/g * bytes`, all-reduce `2 (g-1)/g * bytes`,
  all-to-all `(g-1)/g * bytes`, collective-permute `bytes`. The CPU backend has no
  reduce-scatter: it emits an all-reduce each of whose consumers reads only a `1/g` slice, which
  GPU and TPU compile as a reduce-scatter (XLA's ReduceScatterCreator); such all-reduces are
  counted as reduce-scatters.

The step is compiled on simulated CPU devices (`--xla_force_host_platform_device_count`), so the
HLO is the CPU compiler's: the partitioner's collectives and the matmul FLOPs are what a GPU or
TPU compile of the same program gets (up to how collectives are combined or decomposed, e.g.
TPU's collective matmuls), but fusion decisions differ, and with them the HBM bytes: the least
certain of the three figures, and likely high, since XLA:GPU and XLA:TPU fuse elementwise work
into their matmuls (prologues, epilogues) where the CPU compiler does not.

`predict(costs, hardware)`: compute time `flops / peak`, memory time `bytes / HBM bandwidth`,
collective time `sum(wire bytes) / link bandwidth` (per direction, no latency term). Step time:
perfect overlap `max(compute, memory, collectives)`; kernels one after another, each at its
roofline, `max(sum_k max(flops_k / peak, bytes_k / bandwidth), collectives)` (a kernel's FLOPs
are its matmuls', its bytes as above; closest to how XLA runs a step: kernels in sequence,
collectives asynchronous beside them); no overlap `max(compute, memory) + collectives`.
MFU is the analytic model FLOPs of the step (`train_step_flops`: forward + backward, the
objective's no-gradient forward passes, no remat recompute) over `step time * peak * devices`;
HFU uses the HLO FLOPs (remat and replicated work included) instead.

Hardware (`HARDWARE`), peak dense bf16 matmul rate, HBM bandwidth, and the collective link:

- H100 SXM (NVIDIA H100 Tensor Core GPU datasheet): 989 TFLOP/s dense bf16 (1979 with
  sparsity), 80 GB HBM3 at 3.35 TB/s, NVLink 4 at 900 GB/s per GPU in total = 450 GB/s per
  direction, all 8 GPUs of an HGX node one NVLink/NVSwitch domain; between nodes one 400 Gb/s
  InfiniBand NDR adapter per GPU = 50 GB/s per direction.
- TPU v5p (cloud.google.com/tpu/docs/v5p): 459 TFLOP/s bf16, 95 GB HBM2e at 2.765 TB/s,
  inter-chip interconnect 4800 Gbps per chip = 600 GB/s in total over its 6 links (3D torus),
  taken as 300 GB/s per direction available to one collective (an upper end: a collective over
  one mesh axis of a small slice may use fewer links); the ICI domain is the whole pod.

    lsd cost-model --batch-sizes 8,64    # Markdown table, 8 simulated devices
    lsd cost-model --configs lsd_base --mesh 2,4,1 --json
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence

import jax

from lsd_jax.bench import cost_analysis_flops
from lsd_jax.config import Config, MeshConfig, load_config, resolve_config
from lsd_jax.flops import (
    _TRIP_COUNT,
    _attr,
    _operand_names,
    dit_flops,
    hlo_matmul_flops,
    parse_hlo,
)
from lsd_jax.history_aug import enabled_corruptions
from lsd_jax.objectives import num_shortcut_clips
from lsd_train import sharding, trainer

# ----------------------------------------------------------------------------- hardware


@dataclasses.dataclass(frozen=True)
class Hardware:
    """One accelerator: dense bf16 matmul peak (FLOP/s), HBM bandwidth and capacity (bytes/s,
    bytes), the collective link bandwidth per direction per device (bytes/s) within a domain of
    `domain_size` devices, and beyond it (`scaleout_bw`)."""

    name: str
    peak_flops: float
    hbm_bw: float
    hbm_bytes: float
    link_bw: float
    domain_size: int
    scaleout_bw: float


HARDWARE: dict[str, Hardware] = {
    "h100_sxm": Hardware("H100 SXM", peak_flops=989e12, hbm_bw=3.35e12, hbm_bytes=80e9,
                         link_bw=450e9, domain_size=8, scaleout_bw=50e9),
    "tpu_v5p": Hardware("TPU v5p", peak_flops=459e12, hbm_bw=2.765e12, hbm_bytes=95e9,
                        link_bw=300e9, domain_size=8960, scaleout_bw=300e9),
}

# ----------------------------------------------------------------------------- HLO parsing

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")

_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2,
                "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
                "c128": 16}
_COMMENT = re.compile(r"/\*.*?\*/")
_ARRAY = re.compile(r"\b([a-z]\w*)\[([\d,]*)\]")
# Instructions that move no data themselves (or whose data is counted elsewhere).
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all",
         "partition-id", "replica-id", "opt-barrier", "add-dependency", "domain", "copy-start",
         "copy-done", "while", "conditional", "call", "async-start", "async-update", "async-done",
         "send-done", "recv-done"}


def type_bytes(type_text: str) -> float:
    """Bytes of an HLO type: an array `f32[2,3]{1,0}` or a tuple of them (`token` is 0)."""
    total = 0.0
    for dtype, dims in _ARRAY.findall(type_text):
        if dtype.startswith("f8"):
            size = 1
        else:
            size = _DTYPE_BYTES.get(dtype)
            if size is None:
                continue
        total += size * math.prod(int(d) for d in dims.split(",") if d)
    return total


@dataclasses.dataclass(frozen=True)
class _Inst:
    name: str
    type_text: str
    op: str
    op_text: str


def _parse(hlo_text: str) -> tuple[dict[str, list[_Inst]], str]:
    parsed, entry = parse_hlo(hlo_text)
    computations = {name: [_Inst(inst, type_text, op_text.split("(", 1)[0], op_text)
                           for inst, type_text, op_text in insts]
                    for name, insts in parsed.items()}
    return computations, entry


def _operands(op_text: str) -> list[str]:
    """Operand names of `op(a, b), attr=...` ([] for `op()`), `/*index=5*/` comments dropped."""
    op_text = _COMMENT.sub("", op_text)
    inner = op_text[op_text.find("(") + 1:op_text.find(")")]
    return _operand_names(op_text) if "(" in op_text and inner.strip() else []


def replica_group_size(op_text: str, n_devices: int) -> int:
    """Devices per replica group of a collective: the `mesh[...] {axes}` form (product of the
    named axes' sizes, a sub-axis `'a':(pre)size` its size), the iota form `[groups,size]<=[..]`,
    or explicit `{{0,1},{2,3}}`; no or empty groups: all `n_devices`."""
    start = op_text.find("replica_groups=")
    if start < 0:
        return n_devices
    text = op_text[start + len("replica_groups="):]
    if text.startswith("mesh["):
        close = text.index("]")
        sizes = dict(re.findall(r"'([^']+)'=(\d+)", text[5:close]))
        axes = text[close:].split("{", 1)[1].split("}", 1)[0]
        size = 1
        for name, sub in re.findall(r"'([^']+)'(?::\(\d+\)(\d+))?", axes):
            size *= int(sub) if sub else int(sizes[name])
        return size
    if text.startswith("["):
        return int(text[1:text.index("]")].split(",")[-1])
    if text.startswith("{{"):
        first = text[2:text.index("}")]
        return len([x for x in first.split(",") if x.strip()])
    return n_devices


def wire_bytes(kind: str, nbytes: float, group: int) -> float:
    """Bytes each device sends for a collective over a buffer of `nbytes` (ring algorithms)."""
    if kind == "collective-permute":
        return nbytes
    share = (group - 1) / group if group else 0.0
    return (2 if kind == "all-reduce" else 1) * share * nbytes


@dataclasses.dataclass
class _Cost:
    hbm_bytes: float = 0.0
    # (kind, group) -> [ops, bytes, wire bytes]
    collectives: dict = dataclasses.field(default_factory=dict)
    # kernel arithmetic intensity (matmul FLOPs per HBM byte, 3 digits) -> [FLOPs, bytes]
    kernels: dict = dataclasses.field(default_factory=dict)

    def add_kernel(self, flops: float, nbytes: float) -> None:
        key = float(f"{flops / nbytes:.3g}") if nbytes else _NO_BYTES
        acc = self.kernels.setdefault(key, [0.0, 0.0])
        acc[0] += flops
        acc[1] += nbytes

    def add(self, other: _Cost, times: float) -> None:
        self.hbm_bytes += times * other.hbm_bytes
        for key, (ops, nbytes, wire) in other.collectives.items():
            acc = self.collectives.setdefault(key, [0.0, 0.0, 0.0])
            acc[0] += times * ops
            acc[1] += times * nbytes
            acc[2] += times * wire
        for key, (flops, nbytes) in other.kernels.items():
            acc = self.kernels.setdefault(key, [0.0, 0.0])
            acc[0] += times * flops
            acc[1] += times * nbytes

    def total(self) -> float:
        return self.hbm_bytes + sum(v[2] for v in self.collectives.values())


_NO_BYTES = 1e30  # the intensity key of a kernel that moves no bytes


def _dot_flops(body: _Body, inst: _Inst) -> float:
    """`2 * output elements * contraction size` of a dot or convolution (as
    `lsd_jax.flops.hlo_matmul_flops` counts them)."""
    if inst.op == "dot":
        lhs = body.operand(inst, 0)
        dims = [int(d) for d in _ARRAY.search(lhs.type_text).group(2).split(",") if d]
        contracting = (_attr(inst.op_text, "lhs_contracting_dims") or "{}").strip("{}")
        return 2.0 * _elements(inst.type_text) * math.prod(
            dims[int(i)] for i in contracting.split(",") if i)
    if inst.op == "convolution":
        rhs = body.operand(inst, 1)
        dims = [int(d) for d in _ARRAY.search(rhs.type_text).group(2).split(",") if d]
        labels = _attr(inst.op_text, "dim_labels").split("_")[1].split("->")[0]
        return 2.0 * _elements(inst.type_text) * math.prod(dims) / dims[labels.index("o")]
    return 0.0


def _users(insts: list[_Inst]) -> dict[str, list[tuple[_Inst, int]]]:
    users: dict[str, list[tuple[_Inst, int]]] = {}
    for inst in insts:
        if inst.op in ("parameter", "constant"):
            continue
        for pos, operand in enumerate(_operands(inst.op_text)):
            users.setdefault(operand, []).append((inst, pos))
    return users


# Ops that only re-index their single operand inside a fusion.
_PASS = {"bitcast", "reshape", "copy", "transpose"}
_CONVERSIONS = _PASS | {"parameter", "convert", "reduce-precision", "constant"}


def _rounds_to_bf16(inst: _Inst) -> bool:
    """A convert to bf16, or the CPU's in-f32 rounding to bf16 (reduce-precision e8m7)."""
    return (inst.op == "convert" and inst.type_text.startswith("bf16")) or (
        inst.op == "reduce-precision" and "exponent_bits=8" in inst.op_text
        and "mantissa_bits=7" in inst.op_text)


def _elements(type_text: str) -> int:
    match = _ARRAY.search(type_text)
    return math.prod(int(d) for d in match.group(2).split(",") if d) if match else 0


class _Body:
    """One computation's instructions with their users (a fused computation, or a top-level one
    whose values cross kernel boundaries)."""

    def __init__(self, insts: list[_Inst]):
        self.insts = insts
        self.by_name = {i.name: i for i in insts}
        self.users = _users(insts)
        self.params = {int(re.search(r"parameter\((\d+)\)", i.op_text).group(1)): i
                       for i in insts if i.op == "parameter"}

    def operand(self, inst: _Inst, pos: int = 0) -> _Inst | None:
        names = _operands(inst.op_text)
        return self.by_name.get(names[pos]) if len(names) > pos else None

    def strip(self, inst: _Inst, *, converts: bool = False) -> _Inst:
        """Follow re-indexing ops (and converts) back to the value they start from."""
        while inst.op in _PASS or (converts and inst.op == "convert"):
            source = self.operand(inst)
            if source is None:
                break
            inst = source
        return inst

    def bf16_valued(self, inst: _Inst) -> bool:
        """The value holds bf16 numbers: a bf16 array, a rounding to bf16, or a bf16 widened."""
        inst = self.strip(inst)
        if inst.type_text.startswith("bf16") or _rounds_to_bf16(inst):
            return True
        source = self.operand(inst) if inst.op == "convert" else None
        return source is not None and source.type_text.startswith("bf16")

    def reads(self, name: str) -> tuple[float | None, bool]:
        """`(elements read when only slices of the value are read, else None; whether every use
        rounds it to bf16 first)`, through re-indexing ops and converts."""
        uses = self.users.get(name, [])
        if not uses:
            return None, False
        sliced: float | None = 0.0
        rounds = True
        for user, pos in uses:
            if user.op in ("dynamic-slice", "slice") and pos == 0:
                part: float | None = _elements(user.type_text)
                rounds = rounds and self.reads(user.name)[1]
            elif user.op in _PASS or user.op == "convert":
                part, inner = self.reads(user.name)
                rounds = rounds and (inner or _rounds_to_bf16(user))
            else:
                part = None
                rounds = rounds and _rounds_to_bf16(user)
            sliced = None if sliced is None or part is None else sliced + part
        return sliced, rounds


def _half_if_f32(nbytes: float, type_text: str, bf16: bool) -> float:
    return nbytes / 2 if bf16 and type_text.startswith("f32") else nbytes


class _Analysis:
    """HBM bytes and collectives of an HLO module (see `hlo_costs`)."""

    def __init__(self, hlo_text: str, n_devices: int, *, loops: bool, bf16: bool):
        self.computations, self.entry = _parse(hlo_text)
        self.n_devices, self.loops, self.bf16 = n_devices, loops, bf16
        self.bodies: dict[str, _Body] = {}
        self.memo: dict[str, _Cost] = {}
        self.unknown_trip_counts = 0

    def body(self, name: str) -> _Body | None:
        if name not in self.bodies and name in self.computations:
            self.bodies[name] = _Body(self.computations[name])
        return self.bodies.get(name)

    def fused(self, inst: _Inst) -> _Body | None:
        return self.body((_attr(inst.op_text, "calls") or "").lstrip("%"))

    # -- values at kernel boundaries

    def produced_bf16(self, comp: _Body, inst: _Inst) -> bool:
        """A top-level value that holds bf16 numbers (though the CPU may store it as f32)."""
        if inst.op == "fusion":
            fused = self.fused(inst)
            return fused is not None and fused.insts[-1].op != "tuple" and fused.bf16_valued(
                fused.insts[-1])
        if inst.op in ("convert", "reduce-precision") or inst.op in _PASS:
            return comp.bf16_valued(inst)
        if inst.op.replace("-start", "") in COLLECTIVES:
            source = comp.operand(inst)
            return "promoted" in (_attr(inst.op_text, "to_apply") or "") or (
                source is not None and self.produced_bf16(comp, source))
        return False

    def consumed_bf16(self, comp: _Body, name: str) -> bool:
        """A value computed in this step whose every consumer rounds it to bf16 on reading (a
        producer on GPU or TPU would write bf16). Not parameters or loop state: those are f32."""
        uses = comp.users.get(name, [])
        producer = comp.by_name.get(name)
        if not uses or producer is None or producer.op in _FREE or producer.op in (
                "parameter", "get-tuple-element"):
            return False
        for user, pos in uses:
            if user.op == "fusion":
                fused = self.fused(user)
                param = fused.params.get(pos) if fused else None
                if param is None or not fused.reads(param.name)[1]:
                    return False
            elif not _rounds_to_bf16(user):
                return False
        return True

    def is_bf16(self, comp: _Body, name: str) -> bool:
        inst = comp.by_name.get(name)
        return self.bf16 and inst is not None and (
            self.produced_bf16(comp, inst) or self.consumed_bf16(comp, name))

    def value_bytes(self, comp: _Body, name: str) -> float:
        inst = comp.by_name.get(name)
        if inst is None:
            return 0.0
        return _half_if_f32(type_bytes(inst.type_text), inst.type_text, self.is_bf16(comp, name))

    # -- kernels

    def fusion_bytes(self, comp: _Body, inst: _Inst) -> float:
        """Operands read plus results written by one fusion (see the module docstring)."""
        operands = _operands(inst.op_text)
        fused = self.fused(inst)
        if fused is None:
            return sum(self.value_bytes(comp, o) for o in operands) + self.value_bytes(
                comp, inst.name)
        root = fused.insts[-1]
        if (self.bf16 and len(operands) == 1 and all(i.op in _CONVERSIONS for i in fused.insts)
                and self.is_bf16(comp, operands[0]) and self.is_bf16(comp, inst.name)):
            return 0.0  # a bf16 value widened and rounded back: no kernel on GPU or TPU
        outputs = ([fused.by_name.get(n) for n in _operands(root.op_text)]
                   if root.op == "tuple" else [root])
        in_place, written = set(), 0.0
        for out in outputs:
            if out is None:
                continue
            core = fused.strip(out, converts=True)
            if core.op == "dynamic-update-slice":
                # Written in place: only the update, at the buffer's element size.
                target = fused.strip(fused.operand(core, 0), converts=True)
                if target.op == "parameter" and len(fused.users.get(target.name, [])) == 1:
                    in_place.add(target.name)
                size = type_bytes(out.type_text) / max(_elements(out.type_text), 1)
                written += size * _elements(fused.operand(core, 1).type_text)
            elif len(outputs) == 1:
                written += self.value_bytes(comp, inst.name)
            else:
                written += _half_if_f32(type_bytes(out.type_text), out.type_text,
                                        self.bf16 and fused.bf16_valued(out))
        read = 0.0
        for index, operand in enumerate(operands):
            param = fused.params.get(index)
            full = self.value_bytes(comp, operand)
            if param is None:
                read += full
            elif param.name not in in_place:
                elements = _elements(param.type_text)
                sliced = fused.reads(param.name)[0]
                read += full if sliced is None or not elements else min(
                    sliced, elements) * full / elements
        return read + written

    def kernel_flops(self, comp: _Body, inst: _Inst) -> float:
        """Matmul FLOPs of one kernel: its dots and convolutions, fused ones included."""
        if inst.op == "fusion" and (fused := self.fused(inst)) is not None:
            return sum(_dot_flops(fused, i) for i in fused.insts)
        return _dot_flops(comp, inst)

    def instruction_bytes(self, comp: _Body, inst: _Inst) -> float:
        if inst.op == "fusion":
            return self.fusion_bytes(comp, inst)
        if inst.op in ("dynamic-slice", "slice"):
            return 2 * self.value_bytes(comp, inst.name)
        if inst.op == "dynamic-update-slice":
            return 2 * self.value_bytes(comp, _operands(inst.op_text)[1])
        return (sum(self.value_bytes(comp, o) for o in _operands(inst.op_text))
                + self.value_bytes(comp, inst.name))

    def slice_elements(self, comp: _Body, name: str) -> float | None:
        """The most elements of a top-level value any one consumer reads when every consumer
        only slices it (through converts and conversion-only fusions); None when one reads it
        whole."""
        uses = comp.users.get(name, [])
        if not uses:
            return None
        most = 0.0
        for user, pos in uses:
            fused = self.fused(user) if user.op == "fusion" else None
            if user.op == "dynamic-slice" and pos == 0:
                part = _elements(user.type_text)
            elif user.op in _PASS or user.op == "convert" or (
                    fused is not None and all(i.op in _CONVERSIONS for i in fused.insts)
                    and len(fused.params) == 1):
                part = self.slice_elements(comp, user.name)
            elif fused is not None and (param := fused.params.get(pos)) is not None:
                part = fused.reads(param.name)[0]
            else:
                part = None
            if part is None:
                return None
            most = max(most, part)
        return most

    def scattered_bytes(self, comp: _Body, inst: _Inst, group: int) -> float:
        """Bytes of this all-reduce's result (of its tuple elements) that are only sliced to
        `1/group` of their size, directly or inside fusions: the CPU form of a reduce-scatter."""
        if group <= 1:
            return 0.0
        results = ([u for u, _ in comp.users.get(inst.name, []) if u.op == "get-tuple-element"]
                   if inst.type_text.startswith("(") else [inst])
        total = 0.0
        for result in results:
            sliced = self.slice_elements(comp, result.name)
            if sliced is not None and sliced * group <= _elements(result.type_text) * 1.0001:
                total += type_bytes(result.type_text)
        return total

    def collective(self, comp: _Body, inst: _Inst, base: str, cost: _Cost) -> None:
        operands = _operands(inst.op_text)
        in_bytes = sum(type_bytes(comp.by_name[o].type_text) for o in operands
                       if o in comp.by_name)
        group = replica_group_size(inst.op_text, self.n_devices)
        if base == "collective-permute":
            group, parts = 2, {base: type_bytes(comp.by_name[operands[0]].type_text)}
        elif base == "all-gather":
            parts = {base: in_bytes * group}
        elif base == "all-reduce":
            scattered = self.scattered_bytes(comp, inst, group)
            parts = {"reduce-scatter": scattered, base: in_bytes - scattered}
        else:
            parts = {base: in_bytes}
        half = self.bf16 and self.produced_bf16(comp, inst) and (
            inst.type_text.lstrip("(").startswith("f32"))
        for kind, nbytes in parts.items():
            if nbytes or len(parts) == 1:
                nbytes = nbytes / 2 if half else nbytes
                acc = cost.collectives.setdefault((kind, group), [0.0, 0.0, 0.0])
                acc[0] += 1
                acc[1] += nbytes
                acc[2] += wire_bytes(kind, nbytes, group)

    def cost(self, name: str) -> _Cost:
        if name in self.memo:
            return self.memo[name]
        comp = self.body(name)
        cost = _Cost()
        for inst in comp.insts:
            op = inst.op
            base = op[:-len("-start")] if op.endswith("-start") else op
            if op.endswith("-done"):
                continue
            if base in COLLECTIVES:
                self.collective(comp, inst, base, cost)
            elif op == "while":
                trip = _TRIP_COUNT.search(inst.op_text)
                if trip is None:
                    self.unknown_trip_counts += 1
                times = int(trip.group(1)) if trip and self.loops else 1
                cost.add(self.cost(_attr(inst.op_text, "body").lstrip("%")), times)
            elif op == "conditional":
                names = re.findall(r"%?([\w.\-]+)",
                                   _attr(inst.op_text, "branch_computations") or "")
                names += [_attr(inst.op_text, a).lstrip("%") for a in
                          ("true_computation", "false_computation") if _attr(inst.op_text, a)]
                if names:
                    cost.add(max((self.cost(b) for b in names), key=_Cost.total), 1)
            elif op in ("call", "async-start"):
                callee = _attr(inst.op_text, "to_apply" if op == "call" else "calls")
                if callee:
                    cost.add(self.cost(callee.lstrip("%")), 1)
            elif op not in _FREE:
                nbytes = self.instruction_bytes(comp, inst)
                cost.hbm_bytes += nbytes
                cost.add_kernel(self.kernel_flops(comp, inst), nbytes)
        self.memo[name] = cost
        return cost


def hlo_costs(hlo_text: str, n_devices: int, *, loops: bool = True, bf16: bool = True) -> dict:
    """Per-device HBM bytes and collectives of an optimized HLO module text (see the module
    docstring). `loops=False` counts every loop body once (as XLA's cost analysis does);
    `bf16=False` takes the CPU compiler's f32 stand-ins for bf16 values at their f32 size."""
    analysis = _Analysis(hlo_text, n_devices, loops=loops, bf16=bf16)
    total = analysis.cost(analysis.entry)
    collectives: dict[str, dict] = {}
    for (kind, group), (ops, nbytes, wire) in sorted(total.collectives.items()):
        entry = collectives.setdefault(kind, {"ops": 0, "bytes": 0.0, "wire_bytes": 0.0,
                                              "by_group": {}})
        entry["ops"] += int(round(ops))
        entry["bytes"] += nbytes
        entry["wire_bytes"] += wire
        entry["by_group"][group] = {"ops": int(round(ops)), "bytes": nbytes, "wire_bytes": wire}
    kernels = [[k, f, b] for k, (f, b) in sorted(total.kernels.items())]
    return {"hbm_bytes": total.hbm_bytes, "collectives": collectives, "kernels": kernels,
            "matmul_flops": sum(f for _, f, _ in kernels),
            "unknown_trip_counts": analysis.unknown_trip_counts}


# ----------------------------------------------------------------------------- step costs


def train_step_flops(cfg: Config) -> dict[str, int]:
    """Analytic matmul FLOPs of one train step, global batch (`train.batch_size` resolved).

    `train`: forward + backward of the trained network, 3x the forward (input gradient and
    weight gradient of every matmul) less the input gradients of the matmuls that read the
    network's inputs only (patch embed, the first layer of the noise-level and step-size MLPs,
    the prompt and external projections: nothing upstream wants a gradient); exact for configs
    without the pixel path. `self_prediction`: the no-gradient forward of history augmentation's
    self-prediction; `shortcut_targets`: two no-gradient forwards per shortcut clip. `total`, the
    model FLOPs of MFU, is their sum; remat recompute is not model work and is not counted.
    """
    m, d = cfg.model, cfg.model.hidden_size
    b, t = cfg.train.batch_size, cfg.data.clip_frames
    if b < 1:
        raise ValueError("train.batch_size is 0: resolve it first (trainer.resolve_batch_size)")
    parts = dit_flops(m, frames=t, keys_per_frame=t)
    forward = parts["total"]
    first_layers = (parts["patch_embed"] + parts["prompt"]
                    + 2 * m.freq_embed_dim * d * (2 if m.use_step_size else 1) * t
                    + 2 * m.external_cond_dim * d * t)
    aug = cfg.diffusion.history_aug
    self_pred = b * forward if enabled_corruptions(aug) and aug.self_prediction else 0
    shortcut = 2 * num_shortcut_clips(b, cfg.diffusion) * forward
    train = b * (3 * forward - first_layers)
    return {"forward": b * forward, "train": train, "self_prediction": self_pred,
            "shortcut_targets": shortcut, "total": train + self_pred + shortcut}


def step_costs(compiled, *, n_devices: int | None = None, cfg: Config | None = None) -> dict:
    """Per-device costs of a compiled sharded step (see the module docstring).

    `n_devices` defaults to the executable's device count; `cfg` (batch size resolved) adds the
    analytic model FLOPs of the whole step (`model_flops`, all devices together)."""
    text = compiled.as_text()
    if n_devices is None:
        match = re.search(r"num_partitions=(\d+)", text.split("\n", 1)[0])
        n_devices = int(match.group(1)) if match else 1
    flops = hlo_matmul_flops(text)
    costs = hlo_costs(text, n_devices)
    once = hlo_costs(text, n_devices, loops=False)
    cpu = hlo_costs(text, n_devices, bf16=False)
    xla = compiled.cost_analysis()
    if isinstance(xla, list | tuple):
        xla = xla[0] if xla else {}
    out = {
        "devices": n_devices,
        "flops": float(flops.flops),
        "xla_flops_loops_once": cost_analysis_flops(compiled),
        "hbm_bytes": costs["hbm_bytes"],
        "hbm_bytes_loops_once": once["hbm_bytes"],
        "hbm_bytes_cpu": cpu["hbm_bytes"],
        "xla_bytes_accessed_loops_once": float((xla or {}).get("bytes accessed", 0.0)),
        "collectives": costs["collectives"],
        "collective_bytes": sum(c["bytes"] for c in costs["collectives"].values()),
        "collective_wire_bytes": sum(c["wire_bytes"] for c in costs["collectives"].values()),
        "kernels": costs["kernels"],
        "unknown_trip_counts": flops.unknown_trip_counts,
    }
    memory = compiled.memory_analysis()
    if memory is not None:
        out["peak_memory_bytes"] = int(memory.argument_size_in_bytes
                                       + memory.output_size_in_bytes
                                       - memory.alias_size_in_bytes + memory.temp_size_in_bytes)
    if cfg is not None:
        out["model_flops"] = float(train_step_flops(cfg)["total"])
    return out


def predict(costs: dict, hardware: Hardware | str, n_devices: int | None = None) -> dict:
    """Predicted step time (seconds) and utilisation of `costs` (`step_costs`) on `hardware`.

    Three step times: `overlap`, compute, HBM traffic and collectives all overlapped
    (`max(compute, memory, collectives)`); `kernels`, kernels run one after another, each at its
    roofline (`sum over kernels of max(flops / peak, bytes / bandwidth)`), collectives overlapped
    with them; `no_overlap`, `max(compute, memory) + collectives`. Collectives whose group is
    larger than the hardware's fast domain use `scaleout_bw`."""
    hw = HARDWARE[hardware] if isinstance(hardware, str) else hardware
    n = costs["devices"] if n_devices is None else n_devices
    compute_s = costs["flops"] / hw.peak_flops
    memory_s = costs["hbm_bytes"] / hw.hbm_bw
    collective_s = 0.0
    for entry in costs["collectives"].values():
        for group, part in entry["by_group"].items():
            bw = hw.link_bw if int(group) <= hw.domain_size else hw.scaleout_bw
            collective_s += part["wire_bytes"] / bw
    ridge = hw.peak_flops / hw.hbm_bw
    kernels = costs.get("kernels") or [[0.0, costs["flops"], costs["hbm_bytes"]]]
    roofline_s = sum(flops / hw.peak_flops if intensity >= ridge else nbytes / hw.hbm_bw
                     for intensity, flops, nbytes in kernels)
    steps = {"overlap": max(compute_s, memory_s, collective_s),
             "kernels": max(roofline_s, collective_s),
             "no_overlap": max(compute_s, memory_s) + collective_s}
    bound = max((("compute", compute_s), ("memory", memory_s), ("collectives", collective_s)),
                key=lambda kv: kv[1])[0]
    out = {"hardware": hw.name, "devices": n, "compute_s": compute_s, "memory_s": memory_s,
           "collective_s": collective_s, "roofline_s": roofline_s, "bound": bound}
    for name, step_s in steps.items():
        out[f"step_s_{name}"] = step_s
        out[f"hfu_{name}"] = compute_s / step_s
        if "model_flops" in costs:
            out[f"mfu_{name}"] = costs["model_flops"] / (step_s * hw.peak_flops * n)
    if "peak_memory_bytes" in costs:
        out["fits_hbm"] = costs["peak_memory_bytes"] <= hw.hbm_bytes
    return out


# ----------------------------------------------------------------------------- the table

# Each config's training overrides: oasis_500m ships as an fp32 inference model; it trains in bf16
# with remat, as lsd_base does (SCALING.md).
TRAIN_OVERRIDES = {"oasis_500m": ("model.remat_policy=dots_no_batch", "model.dtype=bfloat16")}
# 8 x H100 SXM: one HGX node; TPU v5p-16: 8 chips (16 TensorCores), a 2x2x2 slice.
STEP_KINDS = ("overlap", "kernels", "no_overlap")
TARGETS = (("h100_sxm", "8 x H100 SXM"), ("tpu_v5p", "v5p-16 (8 chips)"))


def config_costs(name: str, *, devices: int = 8, mesh: tuple[int, int, int] = (1, 8, 1),
                 overrides: Sequence[str] = ()) -> dict:
    """Compile the train step of the config `name` (a packaged config's name or a file,
    `lsd_jax.config.resolve_config`) on `devices` local devices with the mesh `(data, fsdp,
    tensor)` and return its `step_costs` plus the config's name, batch and mesh."""
    if jax.device_count() < devices:
        raise RuntimeError(f"{devices} devices wanted, {jax.device_count()} available: run with "
                           f"XLA_FLAGS=--xla_force_host_platform_device_count={devices} or use "
                           "lsd cost-model, which sets it")
    path = resolve_config(name)
    cfg = load_config(path, [*TRAIN_OVERRIDES.get(path.stem, ()), *overrides])
    data, fsdp, tensor = mesh
    m = sharding.make_mesh(MeshConfig(data=data, fsdp=fsdp, tensor=tensor),
                           jax.devices()[:devices])
    cfg = trainer.resolve_batch_size(cfg, m)
    compiled, report = trainer.compile_step(cfg, trainer.build_step(cfg, m))
    costs = step_costs(compiled, n_devices=devices, cfg=cfg)
    return {"config": path.stem, "batch_size": cfg.train.batch_size,
            "clip_frames": cfg.data.clip_frames, "mesh": f"{data}x{fsdp}x{tensor}",
            "compile_s": report["compile_s"], "overrides": list(overrides), **costs}


def cost_table(configs: Sequence[str] = ("lsd_base", "oasis_500m"), *, devices: int = 8,
               mesh: tuple[int, int, int] = (1, 8, 1), batch_sizes: Sequence[int] = (0,),
               overrides: Sequence[str] = (), targets=TARGETS) -> tuple[str, list[dict]]:
    """`(markdown, rows)`: each config's step compiled once per global batch size (0: one clip
    per data x fsdp slice), predicted on each target."""
    rows = []
    for name in configs:
        for batch in batch_sizes:
            costs = config_costs(name, devices=devices, mesh=mesh,
                                 overrides=[f"train.batch_size={batch}", *overrides])
            for key, label in targets:
                rows.append({**costs, "target": label, "prediction": predict(costs, key)})
    return markdown_table(rows), rows


def markdown_table(rows: list[dict]) -> str:
    """The rows of `cost_table` as a Markdown table (GB = 1e9 bytes, per device and step)."""
    head = ("| config | hardware | mesh (d x f x t) | global batch | GFLOP/dev HLO (model) | "
            "HBM GB/dev | collective GB/dev on the wire | compute ms | memory ms | "
            "collective ms | step ms: overlap / kernels / no overlap | "
            "MFU: overlap / kernels / no overlap |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        p, n = r["prediction"], r["devices"]
        steps = " / ".join(f"{1e3 * p[f'step_s_{k}']:,.1f}" for k in STEP_KINDS)
        mfus = " / ".join(f"{100 * p[f'mfu_{k}']:.0f}%" for k in STEP_KINDS)
        lines.append(
            f"| {r['config']} | {r['target']} | {r['mesh'].replace('x', ' x ')} | "
            f"{r['batch_size']} x {r['clip_frames']} frames | {r['flops'] / 1e9:,.0f} "
            f"({r['model_flops'] / n / 1e9:,.0f}) | {r['hbm_bytes'] / 1e9:,.1f} | "
            f"{r['collective_wire_bytes'] / 1e9:,.2f} | {1e3 * p['compute_s']:,.1f} | "
            f"{1e3 * p['memory_s']:,.1f} | {1e3 * p['collective_s']:,.1f} | {steps} | {mfus} |")
    return "\n".join(lines)
