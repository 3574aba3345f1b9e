"""Signed-distance shapes and the painter that turns them into CT voxels.

Every anatomical part (a vertebra, a disc, the mandible...) is a set of shapes in the part's own
frame. Local coordinates are an array P of shape (3, ...) in mm, ordered (w, v, u):

    w  along the part's long axis, towards the feet
    v  towards the patient's back
    u  towards the patient's left

A shape returns an approximate signed distance in mm (negative inside). Each shape carries a
local bounding box, so `paint_part` evaluates it only on the few voxels where it can matter:
this keeps a 256 px study at about a second without any per-voxel Python loop.

World coordinates are (s, y, x) in mm: s = depth below the first (head) slice, y towards the
back, x towards the patient's left, the in-plane origin at the image centre.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
from scipy import ndimage

Field = Callable[[np.ndarray], np.ndarray]
EPS = 1e-6


# ----------------------------------------------------------------------------- distances

def _norm(*parts: np.ndarray) -> np.ndarray:
    return np.sqrt(sum(p * p for p in parts))


def ellipse_distance(x: np.ndarray, y: np.ndarray, rx: float, ry: float) -> np.ndarray:
    """Approximate signed distance to an axis-aligned ellipse (first order, good near the edge)."""
    k0 = _norm(x / rx, y / ry)
    k1 = _norm(x / (rx * rx), y / (ry * ry))
    return k0 * (k0 - 1.0) / (k1 + EPS)


def extrude(d2: np.ndarray, dz: np.ndarray) -> np.ndarray:
    """Exact signed distance of a 2D profile (distance d2) extruded to |z| <= half (dz = |z| - half)."""
    outside = _norm(np.maximum(d2, 0.0), np.maximum(dz, 0.0))
    return outside + np.minimum(np.maximum(d2, dz), 0.0)


def smooth_min(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Union that rounds the joint over about k mm (bone grows together, it is not glued)."""
    h = np.maximum(k - np.abs(a - b), 0.0) / k
    return np.minimum(a, b) - h * h * k * 0.25


# ----------------------------------------------------------------------------- shapes

@dataclass(frozen=True)
class Shape:
    """One signed-distance field with its local bounding box.

    op: "union" adds material, "blend" adds it with a rounded joint of `blend` mm,
        "cut" removes material (the canal, a foramen).
    """

    sdf: Field
    lo: np.ndarray
    hi: np.ndarray
    op: str = "union"
    blend: float = 0.0


def _box(lo: Sequence[float], hi: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)


def ellipsoid(center, radii, op: str = "union", blend: float = 0.0) -> Shape:
    c = np.asarray(center, dtype=np.float32)
    r = np.asarray(radii, dtype=np.float32)

    def sdf(P):
        q = [(P[i] - c[i]) for i in range(3)]
        k0 = _norm(q[0] / r[0], q[1] / r[1], q[2] / r[2])
        k1 = _norm(q[0] / r[0] ** 2, q[1] / r[1] ** 2, q[2] / r[2] ** 2)
        return k0 * (k0 - 1.0) / (k1 + EPS)

    return Shape(sdf, *_box(c - r, c + r), op=op, blend=blend)


def capsule(a, b, ra: float, rb: float | None = None, op: str = "union", blend: float = 0.0) -> Shape:
    """A rod from a to b whose radius tapers from ra to rb."""
    a = np.asarray(a, dtype=np.float32)
    b = np.asarray(b, dtype=np.float32)
    rb = ra if rb is None else rb
    ba = b - a
    bb = float(ba @ ba) + EPS

    def sdf(P):
        pa = [P[i] - a[i] for i in range(3)]
        t = np.clip((pa[0] * ba[0] + pa[1] * ba[1] + pa[2] * ba[2]) / bb, 0.0, 1.0)
        dist = _norm(*(pa[i] - t * ba[i] for i in range(3)))
        return dist - (ra + (rb - ra) * t)

    r = max(ra, rb)
    return Shape(sdf, *_box(np.minimum(a, b) - r, np.maximum(a, b) + r), op=op, blend=blend)


def round_box(center, half, radius: float = 0.0, matrix=None, op: str = "union",
              blend: float = 0.0) -> Shape:
    """A box with rounded edges; `matrix` (3x3) maps local offsets into the box's own axes
    (a rotation, or a shear that makes the sloping facet joints of the cervical pillars)."""
    c = np.asarray(center, dtype=np.float32)
    h = np.asarray(half, dtype=np.float32) - radius
    m = None if matrix is None else np.asarray(matrix, dtype=np.float32)

    def sdf(P):
        q = [P[i] - c[i] for i in range(3)]
        if m is not None:
            q = [m[j, 0] * q[0] + m[j, 1] * q[1] + m[j, 2] * q[2] for j in range(3)]
        q = [np.abs(q[i]) - h[i] for i in range(3)]
        outside = _norm(*(np.maximum(qi, 0.0) for qi in q))
        inside = np.minimum(np.maximum(np.maximum(q[0], q[1]), q[2]), 0.0)
        return outside + inside - radius

    if m is None:
        lo, hi = c - np.asarray(half), c + np.asarray(half)
    else:
        # conservative box: 1.6 x the half-diagonal in every direction (covers rotation/shear)
        reach = float(np.linalg.norm(np.asarray(half))) * 1.6
        lo, hi = c - reach, c + reach
    return Shape(sdf, *_box(lo, hi), op=op, blend=blend)


def elliptic_cylinder(center, radii_vu, half_height: float, rounding: float = 0.0,
                      op: str = "union", blend: float = 0.0) -> Shape:
    """An elliptic cylinder along w with rounded rims (a vertebral body, a disc)."""
    c = np.asarray(center, dtype=np.float32)
    rv, ru = (float(r) - rounding for r in radii_vu)

    def sdf(P):
        d2 = ellipse_distance(P[1] - c[1], P[2] - c[2], rv, ru)
        return extrude(d2, np.abs(P[0] - c[0]) - (half_height - rounding)) - rounding

    reach = np.array([half_height, radii_vu[0], radii_vu[1]])
    return Shape(sdf, *_box(c - reach, c + reach), op=op, blend=blend)


def elliptic_ring(center, radii_vu, half_thickness: float, half_height: float,
                  keep: Field | None = None, op: str = "union", blend: float = 0.0) -> Shape:
    """A ring around the w axis (the atlas, the hyoid, the mandible); `keep(P)` <= 0 where the
    ring exists (e.g. a half-space that leaves only the front half of a horseshoe)."""
    c = np.asarray(center, dtype=np.float32)
    rv, ru = (float(r) for r in radii_vu)

    def sdf(P):
        de = ellipse_distance(P[1] - c[1], P[2] - c[2], rv, ru)
        d = ellipse_distance(de, P[0] - c[0], half_thickness, half_height)
        return d if keep is None else np.maximum(d, keep(P))

    reach = np.array([half_height, rv + half_thickness, ru + half_thickness])
    return Shape(sdf, *_box(c - reach, c + reach), op=op, blend=blend)


def swept_segment(a, b, radius: float, axis: int, half: float, op: str = "union",
                  blend: float = 0.0) -> Shape:
    """A plate: the segment a->b thickened by `radius` in the two axes other than `axis`, and
    extended +-`half` along `axis` around the segment (laminae, the clivus, mandibular rami)."""
    a = np.asarray(a, dtype=np.float32)
    b = np.asarray(b, dtype=np.float32)
    plane = [i for i in range(3) if i != axis]
    ba = b - a
    bb = float(ba[plane[0]] ** 2 + ba[plane[1]] ** 2) + EPS

    def sdf(P):
        p0 = P[plane[0]] - a[plane[0]]
        p1 = P[plane[1]] - a[plane[1]]
        t = np.clip((p0 * ba[plane[0]] + p1 * ba[plane[1]]) / bb, 0.0, 1.0)
        d2 = _norm(p0 - t * ba[plane[0]], p1 - t * ba[plane[1]]) - radius
        centre = a[axis] + t * ba[axis]
        return extrude(d2, np.abs(P[axis] - centre) - half)

    ext = np.full(3, radius, dtype=np.float64)
    ext[axis] = half
    return Shape(sdf, *_box(np.minimum(a, b) - ext, np.maximum(a, b) + ext), op=op, blend=blend)


def halfspace(normal, point) -> Field:
    """Signed distance to a plane, positive on the side `normal` points to."""
    n = np.asarray(normal, dtype=np.float32)
    n = n / np.linalg.norm(n)
    p = np.asarray(point, dtype=np.float32)
    off = float(n @ p)

    def f(P):
        return n[0] * P[0] + n[1] * P[1] + n[2] * P[2] - off

    return f


# ----------------------------------------------------------------------------- frames

@dataclass(frozen=True)
class Frame:
    """A part's pose: world = center + R @ local (both (s, y, x) / (w, v, u) in mm)."""

    center: np.ndarray
    R: np.ndarray

    def to_world(self, local) -> np.ndarray:
        return self.center + self.R @ np.asarray(local, dtype=np.float64)

    def moved(self, local_offset) -> "Frame":
        return Frame(self.to_world(local_offset), self.R)


def rotation(sagittal: float = 0.0, coronal: float = 0.0, axial: float = 0.0) -> np.ndarray:
    """Local -> world rotation from three small angles in radians.

    sagittal tips the w axis towards +y (the cervical lordosis), coronal towards +x (a lateral
    tilt), axial turns v towards u (the head turned)."""
    cs, ss = np.cos(sagittal), np.sin(sagittal)
    cc, sc = np.cos(coronal), np.sin(coronal)
    ca, sa = np.cos(axial), np.sin(axial)
    r_sag = np.array([[cs, -ss, 0.0], [ss, cs, 0.0], [0.0, 0.0, 1.0]])
    r_cor = np.array([[cc, 0.0, -sc], [0.0, 1.0, 0.0], [sc, 0.0, cc]])
    r_ax = np.array([[1.0, 0.0, 0.0], [0.0, ca, -sa], [0.0, sa, ca]])
    return r_sag @ r_cor @ r_ax


# ----------------------------------------------------------------------------- the painter

@dataclass(frozen=True)
class Material:
    """CT numbers of a part: a dense shell (cortex) around a softer core (cancellous bone)."""

    shell_hu: float
    core_hu: float
    shell_mm: float = 0.0
    texture_hu: float = 0.0   # amplitude of the trabecular grain in the core


@dataclass(frozen=True)
class Hole:
    """Material removed from a part and filled with `fill_hu` (a crack, a vein channel).

    removal(P, h) gives 0..1 per voxel, h = voxel size in mm (for soft edges)."""

    removal: Callable[[np.ndarray, float], np.ndarray]
    fill_hu: float


@dataclass
class Modifiers:
    """What fractures and look-alikes change in one part (see fractures.py)."""

    warp: Field | None = None                              # P -> P' (displaced fragment, compression)
    extra: list[Shape] = field(default_factory=list)       # added bone (osteophytes)
    holes: list[Hole] = field(default_factory=list)        # removed bone
    density: list[Field] = field(default_factory=list)     # HU added inside the bone (sclerosis)
    masks: list[tuple[int, Field]] = field(default_factory=list)  # (fracture id, P -> bool region)
    pad_mm: float = 0.0                                    # how far a warp may move material

    def merged(self, other: "Modifiers") -> "Modifiers":
        if self.warp is not None and other.warp is not None:
            first, second = self.warp, other.warp
            warp = lambda P: second(first(P))  # noqa: E731 - compose two warps
        else:
            warp = self.warp or other.warp
        return Modifiers(warp, self.extra + other.extra, self.holes + other.holes,
                         self.density + other.density, self.masks + other.masks,
                         self.pad_mm + other.pad_mm)


@dataclass(frozen=True)
class Part:
    name: str
    frame: Frame
    shapes: tuple[Shape, ...]
    material: Material
    label: int = 0          # segmentation label (0: not segmented)


@dataclass
class Canvas:
    """The volume being painted: float HU, labels and the grid geometry."""

    hu: np.ndarray           # float32 (z, y, x)
    labels: np.ndarray       # uint8 (z, y, x)
    spacing: tuple[float, float, float]   # (dz, dy, dx) mm
    rng: np.random.Generator

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.hu.shape

    def axis_mm(self, axis: int, start: int, stop: int) -> np.ndarray:
        """World mm of voxel centres along one axis (s from the first slice, y/x from the centre)."""
        idx = np.arange(start, stop, dtype=np.float32)
        if axis == 0:
            return idx * self.spacing[0]
        return (idx - (self.shape[axis] - 1) / 2.0) * self.spacing[axis]

    def index_range(self, axis: int, lo_mm: float, hi_mm: float) -> tuple[int, int]:
        n = self.shape[axis]
        centre = 0.0 if axis == 0 else (n - 1) / 2.0
        a = int(np.floor(lo_mm / self.spacing[axis] + centre))
        b = int(np.ceil(hi_mm / self.spacing[axis] + centre)) + 1
        return max(a, 0), min(b, n)


def _world_box(frame: Frame, lo, hi, pad: float) -> tuple[np.ndarray, np.ndarray]:
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1])
                        for z in (lo[2], hi[2])])
    world = frame.center + corners @ frame.R.T
    return world.min(axis=0) - pad, world.max(axis=0) + pad


def _index_box(canvas: Canvas, wlo, whi) -> tuple[slice, slice, slice] | None:
    ranges = [canvas.index_range(ax, wlo[ax], whi[ax]) for ax in range(3)]
    if any(a >= b for a, b in ranges):
        return None
    return tuple(slice(a, b) for a, b in ranges)


@dataclass
class PaintResult:
    """Fracture regions found while painting: id -> (block slices, bool mask of the block)."""

    masks: dict[int, tuple[tuple[slice, slice, slice], np.ndarray]] = field(default_factory=dict)


def paint_part(canvas: Canvas, part: Part, mods: Modifiers | None = None,
               result: PaintResult | None = None) -> None:
    """Voxelise one part into the canvas with partial-volume edges, cortex and lesions."""
    mods = mods or Modifiers()
    shapes = list(part.shapes) + list(mods.extra)
    pad = 1.5 * max(canvas.spacing) + mods.pad_mm
    boxes = [_world_box(part.frame, s.lo, s.hi, pad) for s in shapes]
    solid = [box for s, box in zip(shapes, boxes) if s.op != "cut"]
    block = _index_box(canvas, np.min([lo for lo, _ in solid], axis=0), np.max([hi for _, hi in solid], axis=0))
    if block is None:
        return
    starts = [sl.start for sl in block]
    s_mm, y_mm, x_mm = (canvas.axis_mm(ax, block[ax].start, block[ax].stop) for ax in range(3))
    c, R = part.frame.center.astype(np.float32), part.frame.R.astype(np.float32)
    ds, dy, dx = s_mm - c[0], y_mm - c[1], x_mm - c[2]
    # local = R^T (world - c), one broadcast per local axis
    P = np.stack([R[0, i] * ds[:, None, None] + R[1, i] * dy[None, :, None] + R[2, i] * dx[None, None, :]
                  for i in range(3)])
    if mods.warp is not None:
        P = mods.warp(P)

    d = np.full(P.shape[1:], np.inf, dtype=np.float32)
    for shape, (wlo, whi) in zip(shapes, boxes):
        sub = _index_box(canvas, wlo, whi)
        if sub is None:
            continue
        rel = tuple(slice(max(s.start - o, 0), min(s.stop - o, n))
                    for s, o, n in zip(sub, starts, d.shape))
        if any(r.start >= r.stop for r in rel):
            continue
        val = shape.sdf(P[(slice(None),) + rel])
        if shape.op == "cut":
            d[rel] = np.maximum(d[rel], -val)
        elif shape.op == "blend":
            d[rel] = smooth_min(d[rel], val, shape.blend)
        else:
            d[rel] = np.minimum(d[rel], val)

    h = float(canvas.spacing[1])
    occ = np.clip(0.5 - d / h, 0.0, 1.0)
    inside = occ > 0
    if not inside.any():
        return
    mat = part.material
    value = np.full(d.shape, mat.core_hu, dtype=np.float32)
    if mat.shell_mm > 0 and mat.shell_hu != mat.core_hu:
        shell = np.clip((d + mat.shell_mm) / h + 0.5, 0.0, 1.0)
        value += (mat.shell_hu - mat.core_hu) * shell
    if mat.texture_hu > 0:
        # trabecular grain: noise smoothed to ~0.6 mm blobs, rescaled to the requested amplitude
        grain = canvas.rng.standard_normal(d.shape, dtype=np.float32)
        sigma = [max(0.6 / sp, 0.3) for sp in canvas.spacing]
        grain = ndimage.gaussian_filter(grain, sigma, mode="nearest")
        value += (mat.texture_hu / max(float(grain.std()), 1e-3)) * grain
    for dens in mods.density:
        value += dens(P)
    for hole in mods.holes:
        r = hole.removal(P, h)
        value = value * (1.0 - r) + hole.fill_hu * r

    target = canvas.hu[block]
    canvas.hu[block] = np.where(inside, target * (1.0 - occ) + value * occ, target)
    if part.label:
        canvas.labels[block][occ >= 0.5] = part.label
    if result is not None:
        for fid, region in mods.masks:
            m = region(P) & (occ >= 0.5)
            if m.any():
                result.masks[fid] = (block, m)


def paint_slab(canvas: Canvas, z0: int, z1: int, cy, cx, ry, rx, value: float,
               keep: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray] | None = None) -> None:
    """Paint a tube of per-slice ellipses (centre cy, cx and radii ry, rx in mm, one per slice of
    [z0, z1)) with soft edges: soft tissue, airway, vessels. `keep(z, y, x)` (mm grids relative to
    each slice's centre) returns 0..1 to leave part of the ellipse out."""
    z0, z1 = max(z0, 0), min(z1, canvas.shape[0])
    if z0 >= z1:
        return
    cy, cx, ry, rx = (np.broadcast_to(np.asarray(a, dtype=np.float32), (z1 - z0,)) for a in (cy, cx, ry, rx))
    ry = np.maximum(ry, 0.1)
    rx = np.maximum(rx, 0.1)
    y0, y1 = canvas.index_range(1, float((cy - ry).min()) - 2, float((cy + ry).max()) + 2)
    x0, x1 = canvas.index_range(2, float((cx - rx).min()) - 2, float((cx + rx).max()) + 2)
    if y0 >= y1 or x0 >= x1:
        return
    ys = canvas.axis_mm(1, y0, y1)[None, :, None] - cy[:, None, None]
    xs = canvas.axis_mm(2, x0, x1)[None, None, :] - cx[:, None, None]
    d = ellipse_distance(xs, ys, rx[:, None, None], ry[:, None, None])
    occ = np.clip(0.5 - d / canvas.spacing[1], 0.0, 1.0)
    if keep is not None:
        occ = occ * keep(np.arange(z0, z1)[:, None, None], ys, xs)
    block = (slice(z0, z1), slice(y0, y1), slice(x0, x1))
    target = canvas.hu[block]
    canvas.hu[block] = target * (1.0 - occ) + value * occ
