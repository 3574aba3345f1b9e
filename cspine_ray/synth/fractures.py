"""Fractures and the normal findings that look like them.

A fracture changes one vertebra's shapes through `Modifiers` (see shapes.py): a crack is a thin
slab of bone replaced by blood-density tissue (~40 HU), a displaced fragment is a warp of the
local coordinates on one side of the crack, a compression fracture squeezes the front of the body
and leaves a sclerotic band under the depressed endplate. Every field is written in the
vertebra's undeformed local frame (w down, v back, u left; see shapes.py).

Patterns follow the cervical trauma literature: Jefferson and arch fractures of C1; dens
(type II/III), hangman's (bilateral pars) and body fractures of C2; body cracks, teardrop corner
fragments, wedge compression, and lamina / pillar / pedicle / spinous-process (clay-shoveler's)
fractures of C3-C7.

`subtle` cracks are ~1 mm wide with at most a 1-pixel step, wedges lose 15-25 % of the front
height; `obvious` ones open >= 3 mm (and >= 1.5 px) with clear displacement or 35-50 % wedging.
A dataset may draw the crack widths in pixels of its working resolution instead (`crack_px`,
StudySpec), so that a low-resolution benchmark sees cracks as wide in pixels as the real data's.

Distractors (never labelled as fractures): the basivertebral vein channel (a thin low-density
Y at mid-height behind the body centre), nutrient foramina, anterior osteophytes and Schmorl's
nodes with a sclerotic rim.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cspine_ray.synth.phantom import VertebraDims, vertebra_layout
from cspine_ray.synth.shapes import Field, Hole, Modifiers, capsule, halfspace

BLOOD_HU = 40.0      # a fresh fracture gap fills with haematoma
VEIN_HU = 30.0
SEVERITIES = ("subtle", "obvious")

# fracture patterns per level and their relative frequencies
PATTERNS = {
    "C1": {"arch": 0.55, "jefferson": 0.45},
    "C2": {"dens": 0.4, "hangman": 0.2, "body_crack": 0.15, "teardrop": 0.1, "coronal": 0.15},
    "sub": {"body_crack": 0.15, "sagittal": 0.12, "coronal": 0.1, "teardrop": 0.13, "wedge": 0.2,
            "lamina": 0.08, "pillar": 0.08, "spinous": 0.07, "pedicle": 0.07},
}


@dataclass(frozen=True)
class Fracture:
    id: int
    level: str
    kind: str
    gap_mm: float
    shift_mm: float


@dataclass(frozen=True)
class Distractor:
    level: str
    kind: str


@dataclass(frozen=True)
class Severity:
    gap_mm: float
    shift_mm: float          # displacement of a fragment that can move
    shift_prob: float        # chance that a movable fragment does move
    wedge: tuple[float, float]
    reach: float             # how far a crack runs into the bone (fraction of the body)
    sclerosis_hu: float      # density of the impacted band under a depressed endplate


def severity_params(name: str, pixel_mm: float, rng: np.random.Generator,
                    gap_mm: tuple[float, float] | None = None) -> Severity:
    """The study's fracture look. `gap_mm` (lo, hi): the crack width drawn from this range
    instead of the severity's own (benchmarks that work at low resolution give cracks 1-3 of
    their pixels wide, as the real data's ~1 mm cracks are at 512 px); a displaced fragment
    of an obvious fracture moves by the gap, a subtle one by a pixel."""
    if name == "subtle":
        gap = float(rng.uniform(*(gap_mm or (0.8, 1.2))))
        return Severity(gap, pixel_mm, 0.6, (0.15, 0.25), 0.7, 140.0)
    if name == "obvious":
        gap = float(rng.uniform(*gap_mm)) if gap_mm else max(3.0, 1.5 * pixel_mm)
        return Severity(gap, gap, 1.0, (0.35, 0.5), 1.6, 220.0)
    raise ValueError(f"severity must be one of {SEVERITIES}, got {name!r}")


# ----------------------------------------------------------------------------- building blocks

def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def _sphere(centre, radius: float) -> Field:
    c = np.asarray(centre, dtype=np.float32)

    def f(P):
        return np.sqrt((P[0] - c[0]) ** 2 + (P[1] - c[1]) ** 2 + (P[2] - c[2]) ** 2) - radius

    return f


def _box_region(lo, hi) -> Field:
    """<= 0 inside an axis-aligned local box."""
    lo = np.asarray(lo, dtype=np.float32)
    hi = np.asarray(hi, dtype=np.float32)

    def f(P):
        return np.maximum.reduce([np.maximum(lo[i] - P[i], P[i] - hi[i]) for i in range(3)])

    return f


def _and(*fields: Field) -> Field:
    return lambda P: np.maximum.reduce([f(P) for f in fields])


def crack(normal, point, gap: float, region: Field, fill_hu: float = BLOOD_HU) -> Hole:
    """A slab `gap` mm wide through `point`, limited to `region` (<= 0), emptied of bone."""
    plane = halfspace(normal, point)

    def removal(P, h):
        slab = np.clip(0.5 - (np.abs(plane(P)) - gap / 2) / h, 0.0, 1.0)
        return slab * np.clip(0.5 - region(P) / h, 0.0, 1.0)

    return Hole(removal, fill_hu)


def crack_region(normal, point, gap: float, region: Field, margin: float) -> Field:
    """The voxels a fracture box must cover: the crack slab plus a margin, inside `region`."""
    plane = halfspace(normal, point)
    return lambda P: (np.abs(plane(P)) <= gap / 2 + margin) & (region(P) <= 0)


def shift_warp(side: Field, region: Field, shift) -> Field:
    """Move the material where side > 0 and region <= 0 by `shift` (mm, local axes)."""
    t = np.asarray(shift, dtype=np.float32)[:, None, None, None]

    def warp(P):
        moved = ((side(P) > 0) & (region(P) <= 0))[None]
        return P - moved * t

    return warp


# ----------------------------------------------------------------------------- fractures

def _crack_fracture(fid, level, sev, normal, point, region, margin, *, side: Field | None = None,
                    fragment: Field | None = None, shift_dir=None, rng=None,
                    kind="crack") -> tuple[Modifiers, Fracture]:
    """One crack, optionally with the fragment on `side` > 0 (within `fragment`) displaced."""
    mods = Modifiers(holes=[crack(normal, point, sev.gap_mm, region)],
                     masks=[(fid, crack_region(normal, point, sev.gap_mm, region, margin))])
    shift = 0.0
    if side is not None and shift_dir is not None and rng.random() < sev.shift_prob:
        shift = sev.shift_mm
        mods.warp = shift_warp(side, fragment, shift * _unit(shift_dir))
        mods.pad_mm = shift
    return mods, Fracture(fid, level, kind, sev.gap_mm, shift)


def plan_fracture(fid: int, level: str, d: VertebraDims, sev: Severity, rng: np.random.Generator,
                  margin: float) -> tuple[Modifiers, Fracture]:
    """Draw one fracture of vertebra `level` and return what it does to the vertebra."""
    table = PATTERNS.get(level, PATTERNS["sub"])
    kinds = list(table)
    kind = kinds[int(rng.choice(len(kinds), p=np.asarray(list(table.values())) / sum(table.values())))]
    a, b, h = d.a, d.b, d.h
    lay = vertebra_layout(level, d)
    side = 1 if rng.random() < 0.5 else -1
    jitter = lambda s=0.25: rng.normal(0.0, s)  # noqa: E731 - small random tilt of a plane
    body = _box_region((-h / 2 - 1.5, -b - 1.5, -a - 1.5), (h / 2 + 1.5, b + 0.5, a + 1.5))

    if level == "C1":
        s = d.a / 21.0
        u0 = side * float(rng.uniform(2.5, 7.0)) * s
        normal = _unit((jitter(0.1), jitter(0.3), side * 1.0))
        point = (0.0, 0.0, u0)
        arches = _box_region((-12 * s, -30 * s, -40 * s), (12 * s, 30 * s, 40 * s))
        if kind == "arch":  # one break, front or back of the ring
            front = rng.random() < 0.5
            region = _and(arches, halfspace((0, 1, 0), (0, -6 * s, 0)) if front
                          else halfspace((0, -1, 0), (0, 6 * s, 0)))
            return _crack_fracture(fid, level, sev, normal, point, region, margin, kind="arch")
        # Jefferson: front and back arch broken on one side, the lateral mass pushed outwards
        return _crack_fracture(fid, level, sev, normal, point, arches, margin,
                               side=halfspace(normal, point), fragment=arches,
                               shift_dir=(0.0, 0.0, side), rng=rng, kind="jefferson")

    if kind == "dens":  # type II: across the base of the dens, the dens tilts/slides
        base = lay["dens_base"]
        w0 = -h / 2 + float(rng.uniform(-1.5, 1.0))
        normal = _unit((1.0, jitter(0.3), jitter(0.2)))
        point = (w0, float(base[1]), 0.0)
        column = lambda P: np.sqrt((P[1] - base[1]) ** 2 + P[2] ** 2) - 7.0  # noqa: E731
        region = _and(column, _box_region((-h / 2 - 25, -20, -20), (-h / 2 + 4, 20, 20)))
        above = halfspace(-normal, point)
        direction = (0.0, 1.0 if rng.random() < 0.6 else -1.0, jitter(0.3))
        return _crack_fracture(fid, level, sev, normal, point, region, margin, side=above,
                               fragment=region, shift_dir=direction, rng=rng, kind="dens")

    if kind == "hangman":  # both pars interarticularis broken, the body slips forwards
        v0 = b + float(rng.uniform(2.0, 4.5))
        normal = _unit((jitter(0.2), 1.0, jitter(0.15)))
        point = (0.0, v0, 0.0)
        lateral = lambda P: 4.0 - np.abs(P[2])  # noqa: E731 - both sides, not the midline
        region = _and(lateral, _box_region((-h, v0 - 7, -30), (h, v0 + 7, 30)))
        front = halfspace(-normal, point)
        everything = lambda P: np.full(P.shape[1:], -1.0, dtype=np.float32)  # noqa: E731
        return _crack_fracture(fid, level, sev, normal, point, region, margin, side=front,
                               fragment=everything, shift_dir=(jitter(0.3), -1.0, 0.0), rng=rng,
                               kind="hangman")

    if kind == "wedge":
        return _wedge(fid, level, d, sev, rng, margin)

    if kind == "sagittal":  # a vertical split of the body, left from right
        u0 = side * float(rng.uniform(0.0, 0.5)) * a
        normal = _unit((jitter(0.2), jitter(0.3), 1.0))
        point = (0.0, 0.0, u0)
        fragment = _and(body, lambda P: P[1] - (b - 1.0))  # the body only, not the pedicles
        return _crack_fracture(fid, level, sev, normal, point, body, margin,
                               side=halfspace(normal, point), fragment=fragment,
                               shift_dir=(1.0 if rng.random() < 0.5 else -1.0, 0.0, 0.3), rng=rng,
                               kind="sagittal")

    if kind == "coronal":  # a front fragment split off the body
        v0 = float(rng.uniform(-0.35, 0.2)) * b
        normal = _unit((jitter(0.3), -1.0, jitter(0.2)))
        point = (0.0, v0, 0.0)
        return _crack_fracture(fid, level, sev, normal, point, body, margin,
                               side=halfspace(normal, point), fragment=body,
                               shift_dir=(jitter(0.3), -1.0, 0.0), rng=rng, kind="coronal")

    if kind == "teardrop":  # the front-lower (or upper) corner breaks off
        down = 1.0 if rng.random() < 0.7 else -1.0
        corner = np.array([down * h / 2, -b, 0.0])
        normal = _unit((down * 1.0, -1.3, jitter(0.2)))
        point = corner - normal * float(rng.uniform(3.5, 5.5))
        return _crack_fracture(fid, level, sev, normal, point, body, margin,
                               side=halfspace(normal, point), fragment=body,
                               shift_dir=(down * 0.6, -1.0, 0.0), rng=rng, kind="teardrop")

    if kind == "body_crack":  # an undisplaced crack from the cortex into the body
        phi = float(rng.uniform(-1.7, 1.7))
        anchor = np.array([float(rng.uniform(-0.35, 0.35)) * h, -b * np.cos(phi), a * np.sin(phi)])
        inward = _unit(-anchor * np.array([0.0, 1.0, 1.0]) + 1e-3)
        normal = _unit(np.cross(inward, _unit(rng.normal(size=3))))
        reach = sev.reach * 2 * b
        region = _and(_sphere(anchor, reach), body)
        return _crack_fracture(fid, level, sev, normal, anchor, region, margin, kind="body_crack")

    # posterior-element fractures
    if kind == "spinous":  # clay-shoveler's: the tip of the spinous process breaks off
        base, tip = lay["spine_base"], lay["spine_tip"]
        axis = _unit(tip - base)
        point = base + (tip - base) * float(rng.uniform(0.35, 0.65))
        normal = _unit(axis + rng.normal(0.0, 0.2, 3))
        region = _and(_sphere(point, 8.0), lambda P: np.abs(P[2]) - 8.0)
        beyond = halfspace(normal, point)
        return _crack_fracture(fid, level, sev, normal, point, region, margin, side=beyond,
                               fragment=lambda P: np.abs(P[2]) - 9.0,
                               shift_dir=(1.0, 0.3, 0.0), rng=rng, kind="spinous")
    if kind == "lamina":
        a_, b_ = lay["lamina_a"] * np.array([1, 1, side]), lay["lamina_b"]
        point = a_ + (b_ - a_) * float(rng.uniform(0.3, 0.7))
        normal = _unit(_unit(b_ - a_) + rng.normal(0.0, 0.25, 3))
    elif kind == "pillar":
        point = lay["pillar"] * np.array([1, 1, side]) + rng.normal(0.0, 1.0, 3)
        normal = _unit((1.0, rng.normal(0.0, 0.6), rng.normal(0.0, 0.4)))
    else:  # pedicle
        a_, b_ = lay["pedicle_a"] * np.array([1, 1, side]), lay["pedicle_b"] * np.array([1, 1, side])
        point = a_ + (b_ - a_) * float(rng.uniform(0.45, 0.7))
        normal = _unit(_unit(b_ - a_) + rng.normal(0.0, 0.2, 3))
    region = _sphere(point, 7.0 if kind == "pillar" else 5.5)
    return _crack_fracture(fid, level, sev, normal, point, region, margin, kind=kind)


def _wedge(fid, level, d: VertebraDims, sev: Severity, rng, margin: float) -> tuple[Modifiers, Fracture]:
    """Compression: the upper endplate sinks at the front, trabeculae impact into a dense band."""
    a, b, h = d.a, d.b, d.h
    loss = float(rng.uniform(*sev.wedge))
    top, bottom = -h / 2, h / 2

    def squeeze(v):  # 0 behind the middle of the body, `loss` at its front
        return loss * np.clip((0.3 * b - v) / (1.3 * b), 0.0, 1.0)

    def warp(P):
        c = squeeze(P[1])
        w = P[0]
        w0 = np.where(w < bottom, bottom - (bottom - w) / (1.0 - c), w)
        return np.stack([w0.astype(np.float32), P[1], P[2]])

    def sclerosis(P):
        c = squeeze(P[1])
        near_top = np.clip(1.0 - (P[0] - top) / 3.0, 0.0, 1.0) * (P[0] >= top - 1.0)
        return sev.sclerosis_hu * near_top * (c > 0.02) * (np.abs(P[2]) < a)

    def region(P):
        return (squeeze(P[1]) > 0.25 * loss) & (P[0] < top + 5.0 + margin) & (np.abs(P[2]) < a + 1.0)

    mods = Modifiers(warp=warp, density=[sclerosis], masks=[(fid, region)])
    return mods, Fracture(fid, level, "wedge", 0.0, loss * h)


# ----------------------------------------------------------------------------- look-alikes

def plan_distractor(level: str, d: VertebraDims, kind: str, rng: np.random.Generator) -> Modifiers:
    """A normal finding that a naive "dark line" detector would mistake for a fracture."""
    a, b, h = d.a, d.b, d.h
    if kind == "vein":  # basivertebral venous channel: a Y opening through the back wall
        w0 = float(rng.normal(0.0, 0.06 * h))
        depth = float(rng.uniform(0.3, 0.45)) * 2 * b
        r = float(rng.uniform(0.55, 0.8))
        stem_end = np.array([w0, b - depth * 0.45, 0.0])
        pieces = [capsule((w0, b + 0.5, 0.0), stem_end, r)]
        for s in (-1, 1):
            pieces.append(capsule(stem_end, (w0, b - depth, s * depth * 0.45), r * 0.85))
        fields = [p.sdf for p in pieces]

        def removal(P, hh):
            dist = np.minimum.reduce([f(P) for f in fields])
            return np.clip(0.5 - dist / hh, 0.0, 1.0)

        return Modifiers(holes=[Hole(removal, VEIN_HU)])
    if kind == "foramen":  # nutrient foramen: a short oblique canal through the front cortex
        u0 = float(rng.uniform(-0.5, 0.5)) * a
        w0 = float(rng.uniform(-0.3, 0.3)) * h
        canal = capsule((w0, -b - 1.0, u0), (w0 + float(rng.normal(0, 1.0)), -b + 3.5, u0 * 0.7), 0.5)

        def removal(P, hh):
            return np.clip(0.5 - canal.sdf(P) / hh, 0.0, 1.0)

        return Modifiers(holes=[Hole(removal, VEIN_HU)])
    if kind == "osteophyte":  # a small anterior beak from an endplate corner
        down = 1.0 if rng.random() < 0.5 else -1.0
        start = (down * (h / 2 - 1.0), -b + 1.0, float(rng.normal(0, 0.2)) * a)
        tip = (down * (h / 2 + float(rng.uniform(1.5, 3.0))), -b - float(rng.uniform(1.5, 3.5)), start[2])
        return Modifiers(extra=[capsule(start, tip, 1.8, 0.7, op="blend", blend=1.0)])
    if kind == "schmorl":  # disc herniated into the endplate, with a sclerotic rim
        down = 1.0 if rng.random() < 0.5 else -1.0
        centre = np.array([down * (h / 2 - 1.0), float(rng.uniform(-0.4, 0.3)) * b,
                           float(rng.uniform(-0.4, 0.4)) * a])
        radius = float(rng.uniform(1.8, 3.0))
        node = _sphere(centre, radius)

        def removal(P, hh):
            return np.clip(0.5 - node(P) / hh, 0.0, 1.0)

        def rim(P):
            dist = node(P)
            return 250.0 * ((dist > 0) & (dist < 1.3))

        return Modifiers(holes=[Hole(removal, 80.0)], density=[rim])
    raise ValueError(f"unknown distractor {kind!r}")


DISTRACTOR_RATES = {"vein": 0.45, "foramen": 0.12, "osteophyte": 0.15, "schmorl": 0.07}
BODY_LEVELS = ("C2", "C3", "C4", "C5", "C6", "C7", "T1", "T2")


def plan_lesions(rng: np.random.Generator, dims: dict[str, VertebraDims], fractured: tuple[str, ...],
                 severity: str, pixel_mm: float, gap_mm: tuple[float, float] | None = None
                 ) -> tuple[dict[str, Modifiers], list[Fracture], list[Distractor]]:
    """Fractures for the `fractured` levels plus random look-alikes on the vertebral bodies."""
    sev = severity_params(severity, pixel_mm, rng, gap_mm)
    margin = 1.0 + 0.5 * pixel_mm
    mods: dict[str, Modifiers] = {}
    fractures = []
    for fid, level in enumerate(fractured):
        m, frac = plan_fracture(fid, level, dims[level], sev, rng, margin)
        mods[level] = m
        fractures.append(frac)
    distractors = []
    for level in BODY_LEVELS:
        for kind, rate in DISTRACTOR_RATES.items():
            if kind == "osteophyte" and level in ("C5", "C6"):
                rate *= 2
            if rng.random() < rate:
                distractors.append(Distractor(level, kind))
    if not fractured and not any(dd.level in BODY_LEVELS[:6] for dd in distractors):
        # a study without fractures always shows at least one look-alike in the neck
        distractors.append(Distractor(BODY_LEVELS[int(rng.integers(0, 6))], "vein"))
    for dd in distractors:
        extra = plan_distractor(dd.level, dims[dd.level], dd.kind, rng)
        mods[dd.level] = mods[dd.level].merged(extra) if dd.level in mods else extra
    return mods, fractures, distractors
