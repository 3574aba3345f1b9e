"""The neck-CT phantom: cervical spine anatomy, skull base, shoulders and soft tissue.

`plan_anatomy` draws one patient (size, lordosis, pose, tissue densities) from a random
generator; `render_phantom` paints it into a canvas (see shapes.py for the coordinate frames).
Distances are in mm and follow adult anatomy: C3-C7 bodies about 16 x 18 mm and 13-15 mm tall,
4-6 mm discs, a 14-16 mm deep canal, a cervical lordosis of 20-40 degrees.

Labels follow the RSNA segmentations: 1..7 = C1..C7, 8.. = T1.. (every other structure 0).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from cspine_ray.synth.shapes import (Canvas, Field, Frame, Material, Modifiers, Part, PaintResult, Shape,
                                     capsule, elliptic_cylinder, elliptic_ring, ellipsoid,
                                     halfspace, paint_part, paint_slab, rotation, round_box,
                                     swept_segment)

LEVELS = ("C1", "C2", "C3", "C4", "C5", "C6", "C7", "T1", "T2", "T3")
LABEL = {name: i + 1 for i, name in enumerate(LEVELS)}   # C1..C7 = 1..7, T1 = 8, T2 = 9, T3 = 10


@dataclass(frozen=True)
class VertebraDims:
    """Body half-width a (left-right), half-depth b (front-back), height h, disc below it,
    canal half-width ca and half-depth cb, spinous process length and downward angle (deg)."""

    a: float
    b: float
    h: float
    disc: float
    ca: float
    cb: float
    spine_len: float
    spine_deg: float
    bifid: bool

    def scaled(self, k: float) -> "VertebraDims":
        return replace(self, **{f: getattr(self, f) * k for f in
                                ("a", "b", "h", "disc", "ca", "cb", "spine_len")})


# adult averages (C1 uses a/b for its ring radii and h for the lateral-mass height)
BASE_DIMS = {
    "C1": VertebraDims(21.0, 20.0, 15.0, 0.0, 14.0, 9.0, 0.0, 0.0, False),
    "C2": VertebraDims(8.5, 8.0, 16.0, 4.5, 12.0, 8.5, 17.0, 15.0, True),
    "C3": VertebraDims(8.0, 7.5, 13.0, 5.0, 12.5, 7.4, 13.0, 22.0, True),
    "C4": VertebraDims(8.3, 7.5, 13.0, 5.0, 12.5, 7.2, 13.5, 24.0, True),
    "C5": VertebraDims(8.8, 7.8, 13.5, 5.5, 12.8, 7.2, 14.5, 26.0, True),
    "C6": VertebraDims(9.5, 8.0, 14.0, 5.5, 12.8, 7.2, 17.0, 28.0, True),
    "C7": VertebraDims(10.5, 8.3, 14.5, 5.5, 12.0, 7.2, 24.0, 30.0, False),
    "T1": VertebraDims(12.0, 9.0, 16.0, 5.0, 10.0, 7.5, 27.0, 40.0, False),
    "T2": VertebraDims(13.0, 10.5, 17.0, 5.0, 9.0, 7.5, 28.0, 48.0, False),
    "T3": VertebraDims(14.0, 11.5, 18.0, 5.0, 8.5, 7.5, 28.0, 55.0, False),
}

C1_ABOVE_C2 = 20.5   # mm from the C2 body centre up to the atlas ring centre (k = 1)
C1_BEHIND_C2 = 12.0  # the ring centre lies behind the C2 body: the dens sits in the ring's front


# ----------------------------------------------------------------------------- patient plan

@dataclass(frozen=True)
class Anatomy:
    """One patient: vertebra sizes and poses, spine curve, soft-tissue and density draws."""

    k: float                           # overall size factor
    dims: dict[str, VertebraDims]      # scaled
    frames: dict[str, Frame]           # body centre (C1: ring centre) and orientation
    s_level: dict[str, float]          # depth of each body centre below the first slice (mm)
    length_mm: float                   # depth of the last slice
    curve: tuple[float, ...]           # y0, lordosis, slope, x0, sway, x_slope, s_C2, s_T1
    soft: dict[str, float]             # soft-tissue draws
    bone: dict[str, float]             # bone density draws

    def spine_centre(self, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(y, x) of the vertebral-body column at depth s (mm, world)."""
        y0, lordosis, slope, x0, sway, x_slope, s2, s7 = self.curve
        t = (s - s2) / (s7 - s2)
        s4 = self.s_level["C4"]
        y = y0 - lordosis * np.sin(np.pi * t) + slope * (s - s4)
        x = x0 + sway * np.sin(np.pi * t) + x_slope * (s - s4)
        return y, x

    def tangent_angles(self, s: float) -> tuple[float, float]:
        y1, x1 = self.spine_centre(np.array([s - 0.5]))
        y2, x2 = self.spine_centre(np.array([s + 0.5]))
        return float(np.arctan(y2[0] - y1[0])), float(np.arctan(x2[0] - x1[0]))


def plan_anatomy(rng: np.random.Generator) -> Anatomy:
    """Draw one patient's anatomy (all positions relative to the image centre)."""
    k = float(np.clip(rng.normal(1.0, 0.05), 0.88, 1.12))
    dims = {name: d.scaled(k * float(rng.uniform(0.97, 1.03))) for name, d in BASE_DIMS.items()}

    s_level = {"C1": float(rng.uniform(17.0, 25.0)) * k}
    s_level["C2"] = s_level["C1"] + C1_ABOVE_C2 * k
    for prev, name in zip(LEVELS[1:-1], LEVELS[2:]):
        s_level[name] = s_level[prev] + dims[prev].h / 2 + dims[prev].disc + dims[name].h / 2
    length = s_level["T2"] + float(rng.uniform(-2.0, 9.0)) * k

    curve = (
        0.0,                                     # y0, fixed below so C4 lands at y_c4
        float(rng.uniform(4.0, 11.0)) * k,       # lordosis depth (mm)
        float(rng.normal(0.0, 0.06)),            # flexion / extension
        float(rng.normal(0.0, 4.0)),             # x0: patient off the table centre
        float(rng.normal(0.0, 1.5)),             # lateral sway
        float(rng.normal(0.0, 0.03)),            # lateral lean
        s_level["C2"], s_level["T1"],
    )
    y_c4 = float(rng.uniform(-24.0, -10.0))
    partial = Anatomy(k, dims, {}, s_level, length, curve, {}, {})
    y_at_c4, _ = partial.spine_centre(np.array([s_level["C4"]]))
    curve = (y_c4 - float(y_at_c4[0]),) + curve[1:]
    partial = replace(partial, curve=curve)

    turn = float(rng.normal(0.0, 0.05))          # head turned (rad)
    frames = {}
    for name in LEVELS[1:]:
        s = s_level[name]
        y, x = partial.spine_centre(np.array([s]))
        sag, cor = partial.tangent_angles(s)
        R = rotation(sag + rng.normal(0, 0.03), cor + rng.normal(0, 0.02), turn + rng.normal(0, 0.025))
        frames[name] = Frame(np.array([s, y[0], x[0]]), R)
    c2 = frames["C2"]
    atlas_R = c2.R @ rotation(rng.normal(0.0, 0.06), 0.0, rng.normal(0.0, 0.04))
    frames["C1"] = Frame(c2.to_world([-C1_ABOVE_C2 * k, C1_BEHIND_C2 * k, 0.0]), atlas_R)

    soft = {
        "fat_mm": float(rng.uniform(3.0, 11.0)),
        "fat_hu": float(rng.uniform(-115.0, -85.0)),
        "muscle_hu": float(rng.uniform(40.0, 60.0)),
        "neck_width": float(rng.uniform(0.92, 1.1)),
        "neck_depth": float(rng.uniform(0.92, 1.1)),
        "airway": float(rng.uniform(0.85, 1.15)),
        "cartilage_hu": float(rng.uniform(90.0, 350.0)),
        "esophagus_air": float(rng.random() < 0.5),
        "lung_hu": float(rng.uniform(-870.0, -820.0)),
        "table_y": float(rng.uniform(3.0, 12.0)),
    }
    bone = {
        "cortex_hu": float(rng.uniform(820.0, 1150.0)),
        "cancellous_hu": float(rng.uniform(210.0, 330.0)),
        "cortex_mm": float(rng.uniform(1.0, 1.4)),
        "facet_slope": float(rng.uniform(0.75, 1.05)),
        "head_tilt": float(rng.normal(0.0, 0.05)),
    }
    return Anatomy(k, dims, frames, s_level, length, curve, soft, bone)


# ----------------------------------------------------------------------------- vertebrae

def vertebra_layout(level: str, d: VertebraDims, facet_slope: float = 0.9) -> dict[str, np.ndarray]:
    """Named landmarks of one vertebra in its local frame (w down, v back, u left).

    Both the shapes and the fractures use these, so a pedicle fracture lands on the pedicle.
    Points that come in pairs are stored for the left side (u > 0); mirror u for the right.
    """
    a, b, h, ca, cb = d.a, d.b, d.h, d.ca, d.cb
    if level == "C1":
        return {"canal_v": np.array(5.0 * d.a / 21.0), "lateral_mass": np.array([0.5, -3.5, 15.0 * a / 21])}
    canal_v = b + cb + 0.5
    lay = {
        "canal_v": np.array(canal_v),
        "pedicle_a": np.array([-0.15 * h, 0.55 * b, 0.62 * a]),
        "pedicle_b": np.array([-0.1 * h, b + 4.0, ca + 2.0]),
        "pillar": np.array([1.0, canal_v, ca + 4.2]),
        "lamina_a": np.array([1.5, canal_v + 3.0, ca + 0.5]),
        "lamina_b": np.array([3.0, b + 2 * cb + 2.5, 0.0]),
        "slope": np.array(facet_slope if level.startswith("C") else 2.2),
    }
    angle = np.deg2rad(d.spine_deg)
    base = lay["lamina_b"] + np.array([0.0, 0.5, 0.0])
    lay["spine_base"] = base
    lay["spine_tip"] = base + d.spine_len * np.array([np.sin(angle), np.cos(angle), 0.0])
    if level == "C2":
        lay["pedicle_a"] = np.array([-2.0, 0.6 * b, 0.62 * a])
        lay["pedicle_b"] = np.array([-1.0, b + 5.0, ca + 2.5])
        lay["pars_a"] = np.array([-h / 2 + 2.0, 2.0, 12.0])
        lay["pars_b"] = np.array([h / 2 - 2.0, b + cb + 1.0, ca + 3.5])
        lay["pillar"] = np.array([h / 2 - 1.5, b + cb + 1.0, ca + 4.0])
        lay["dens_base"] = np.array([-h / 2 + 3.0, 0.5, 0.0])
        lay["dens_tip"] = np.array([-h / 2 - 12.0, 2.0, 0.0])
        lay["facet"] = np.array([-h / 2 + 1.0, 0.3, 12.0])
    if level.startswith("T"):
        lay["pedicle_b"] = np.array([-0.1 * h, b + 5.0, ca + 3.0])
        lay["pillar"] = np.array([0.0, canal_v + 1.0, ca + 4.5])
        lay["tp_tip"] = np.array([-1.0, b + 2 * cb + 4.0, ca + 21.0])
    return lay


def _mirror(p: np.ndarray, side: int) -> np.ndarray:
    return np.array([p[0], p[1], side * p[2]])


def _body(d: VertebraDims, uncinate: bool) -> list:
    a, b, h = d.a, d.b, d.h
    shapes = [
        elliptic_cylinder((0, 0, 0), (b, a), h / 2, rounding=1.3),
        # the back of a cervical body is flat: a rounded box over its posterior half
        round_box((0, 0.45 * b, 0), (h / 2, 0.55 * b, 0.9 * a), radius=1.8, op="blend", blend=1.5),
    ]
    # the front-lower rim of a cervical body hangs a little over the disc below
    shapes.append(ellipsoid((h / 2 - 0.8, -b + 1.4, 0.0), (2.2, 2.0, 0.55 * a), op="blend", blend=1.5))
    if uncinate:  # lips on the lateral rims of the upper endplate (C3-C7)
        for side in (-1, 1):
            shapes.append(capsule((-h / 2 - 0.6, -0.3 * b, side * (a - 1.6)),
                                  (-h / 2 - 0.9, 0.7 * b, side * (a - 1.4)), 1.7, op="blend", blend=1.5))
    return shapes


def _posterior_arch(d: VertebraDims, lay: dict, heavy: float = 1.0) -> list:
    """Pedicles, articular pillars, laminae and the spinous process."""
    h = d.h
    slope = float(lay["slope"])
    shear = np.array([[1.0, -slope, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    pillar_h = (h + d.disc) - 2.2  # leaves a facet joint to the next level
    shapes = []
    for side in (-1, 1):
        shapes.append(capsule(_mirror(lay["pedicle_a"], side), _mirror(lay["pedicle_b"], side),
                              2.6 * heavy, op="blend", blend=1.5))
        shapes.append(round_box(_mirror(lay["pillar"], side), (pillar_h / 2, 6.0, 4.8), radius=3.4,
                                matrix=shear, op="blend", blend=1.5))
        shapes.append(swept_segment(_mirror(lay["lamina_a"], side), lay["lamina_b"], 1.6 * heavy,
                                    axis=0, half=4.5 * heavy, op="blend", blend=1.5))
    base, tip = lay["spine_base"], lay["spine_tip"]
    shapes.append(swept_segment(base, tip, 3.2 * heavy, axis=2, half=1.9 * heavy, op="blend", blend=2.0))
    if d.bifid:
        for side in (-1, 1):
            shapes.append(ellipsoid(tip + np.array([0.6, 0.0, side * 2.6 * heavy]), (2.6, 2.6, 2.2),
                                    op="blend", blend=1.5))
    else:
        shapes.append(ellipsoid(tip + np.array([0.8, 0.5, 0.0]), (3.4, 3.2, 3.6), op="blend", blend=1.5))
    return shapes


def _canal_cut(d: VertebraDims, lay: dict) -> list:
    return [elliptic_cylinder((0, float(lay["canal_v"]), 0), (d.cb, d.ca), d.h, op="cut")]


def _subaxial_transverse(level: str, d: VertebraDims, lay: dict) -> list:
    """C3-C6: anterior and posterior bars around the foramen transversarium; C7: posterior bar."""
    a, b = d.a, d.b
    shapes = []
    for side in (-1, 1):
        if level == "C7":
            shapes.append(swept_segment(_mirror(np.array([-0.5, b + 4.0, d.ca + 2.0]), side),
                                        (0.0, b + 1.0, side * (a + 14.0)), 2.2, axis=0, half=3.0,
                                        op="blend", blend=1.5))
            shapes.append(capsule((-1.0, 0.3 * b, side * (a + 3.6)), (1.0, 0.3 * b, side * (a + 3.6)),
                                  1.3, op="cut"))
            continue
        ant_tip = np.array([0.0, -0.2 * b, a + 10.0])
        post_tip = np.array([0.2, 0.45 * b + 1.0, a + 10.5])
        shapes.append(swept_segment((-0.5, -0.45 * b, side * (a - 1.0)), _mirror(ant_tip, side), 1.5,
                                    axis=0, half=2.8, op="blend", blend=1.2))
        shapes.append(swept_segment((-0.5, b + 3.0, side * (d.ca + 1.0)), _mirror(post_tip, side), 1.6,
                                    axis=0, half=2.8, op="blend", blend=1.2))
        shapes.append(capsule(_mirror(ant_tip, side), _mirror(post_tip, side), 1.8, op="blend", blend=1.0))
        shapes.append(elliptic_cylinder((0.0, 0.4 * b, side * (a + 4.6)), (2.7, 2.6), 5.0, op="cut"))
    return shapes


def vertebra_shapes(level: str, d: VertebraDims, facet_slope: float = 0.9) -> list:
    """All shapes of one vertebra in its local frame."""
    if level == "C1":
        return _atlas_shapes(d)
    lay = vertebra_layout(level, d, facet_slope)
    if level == "C2":
        return _axis_shapes(d, lay)
    if level.startswith("T"):
        return _thoracic_shapes(level, d, lay)
    return (_body(d, uncinate=True) + _posterior_arch(d, lay) + _subaxial_transverse(level, d, lay)
            + _canal_cut(d, lay))


def _atlas_shapes(d: VertebraDims) -> list:
    """C1: a ring with two lateral masses and wide transverse processes, no body."""
    s = d.a / 21.0
    rv, ru = d.b, d.a
    shapes = [
        elliptic_ring((0, 0, 0), (rv, ru), 3.0 * s, 5.0 * s, keep=halfspace((0, 1, 0), (0, -4.0 * s, 0))),
        elliptic_ring((0, 0, 0), (rv, ru), 3.4 * s, 3.9 * s, keep=halfspace((0, -1, 0), (0, 2.0 * s, 0))),
        ellipsoid((0, -rv - 1.0 * s, 0), (5.5 * s, 3.0 * s, 5.0 * s), op="blend", blend=1.5),
        ellipsoid((0.5 * s, rv + 1.5 * s, 0), (5.0 * s, 3.5 * s, 4.0 * s), op="blend", blend=1.5),
    ]
    for side in (-1, 1):
        shapes.append(round_box((0.5 * s, -3.5 * s, side * 15.0 * s), (d.h / 2, 8.5 * s, 6.0 * s),
                                radius=4.5 * s, op="blend", blend=2.5))
        shapes.append(swept_segment((0.0, -1.0 * s, side * 19.0 * s), (0.5 * s, -0.5 * s, side * 31.0 * s),
                                    4.0 * s, axis=0, half=3.0 * s, op="blend", blend=2.0))
        shapes.append(elliptic_cylinder((0.0, -1.0 * s, side * 24.5 * s), (2.6 * s, 2.6 * s), 5.0 * s, op="cut"))
    return shapes


def _axis_shapes(d: VertebraDims, lay: dict) -> list:
    """C2: a tall body, the dens rising into the atlas ring, big facets and a heavy bifid spine."""
    shapes = _body(d, uncinate=False)
    shapes.append(capsule(lay["dens_base"], lay["dens_tip"], 5.0, 4.2, op="blend", blend=2.5))
    for side in (-1, 1):
        shapes.append(round_box(_mirror(lay["facet"], side), (4.5, 7.0, 5.0), radius=1.6, op="blend", blend=2.0))
        shapes.append(swept_segment((-2.0, -1.0, side * 14.0), (-1.0, 1.5, side * 21.0), 2.3,
                                    axis=0, half=3.0, op="blend", blend=1.5))
        shapes.append(elliptic_cylinder((-1.0, 0.3, side * 17.5), (2.3, 2.3), 3.5, op="cut"))
        shapes.append(capsule(_mirror(lay["pars_a"], side), _mirror(lay["pars_b"], side), 3.2,
                              op="blend", blend=2.0))
    shapes += _posterior_arch(d, lay, heavy=1.3)
    return shapes + _canal_cut(d, lay)


def _thoracic_shapes(level: str, d: VertebraDims, lay: dict) -> list:
    shapes = _body(d, uncinate=False) + _posterior_arch(d, lay, heavy=1.15)
    for side in (-1, 1):  # transverse processes point back and out, ribs articulate with them
        shapes.append(swept_segment(_mirror(lay["pillar"] + np.array([-1.0, 0.0, 0.0]), side),
                                    _mirror(lay["tp_tip"], side), 3.6, axis=0, half=3.8,
                                    op="blend", blend=2.0))
    return shapes + _canal_cut(d, lay)


# ----------------------------------------------------------------------------- other bones

def _bone(anat: Anatomy, shell_hu: float | None = None, core_hu: float | None = None,
          shell_mm: float | None = None, texture: float = 30.0) -> Material:
    return Material(shell_hu if shell_hu is not None else anat.bone["cortex_hu"],
                    core_hu if core_hu is not None else anat.bone["cancellous_hu"],
                    shell_mm if shell_mm is not None else anat.bone["cortex_mm"], texture)


def skull_parts(anat: Anatomy) -> list[Part]:
    """Occipital bone with the foramen magnum, condyles, clivus, mastoids, jaws and hyoid."""
    k = anat.k
    c1 = anat.frames["C1"]
    # the head is held upright whatever the tilt of C1-C2; only the condyles follow the atlas
    head = Frame(c1.center, rotation(anat.bone["head_tilt"], 0.0, float(np.arctan2(c1.R[2, 1], c1.R[1, 1]))))
    canal_v = 5.0 * k
    fm = elliptic_cylinder((-14.0 * k, canal_v, 0), (17.5 * k, 15.0 * k), 12.0 * k, op="cut")
    # the posterior fossa: a bowl whose lowest point is the foramen magnum, rising behind it
    occ_centre = np.array([-12.0 * k - 55.0 * k, canal_v + 4.0 * k, 0.0])
    occipital = [
        ellipsoid(occ_centre, (55.0 * k, 70.0 * k, 64.0 * k)),
        ellipsoid(occ_centre + np.array([-7.0 * k, 0, 0]), (53.0 * k, 63.0 * k, 57.0 * k), op="cut"),
        # the clivus: a thick plate rising forwards from the front rim of the foramen magnum
        swept_segment((-12.0 * k, -11.5 * k, 0.0), (-45.0 * k, -32.0 * k, 0.0), 5.0 * k, axis=2,
                      half=11.0 * k, op="blend", blend=3.0),
        fm,
    ]
    condyles = tuple(ellipsoid((-12.5 * k, -3.0 * k, side * 15.5 * k), (4.5 * k, 9.0 * k, 5.5 * k))
                     for side in (-1, 1))
    for side in (-1, 1):
        occipital.append(ellipsoid((-20.0 * k, 6.0 * k, side * 50.0 * k), (13.0 * k, 10.0 * k, 8.5 * k),
                                   op="blend", blend=4.0))          # mastoids
    # the cut removes everything in front of the clivus plane (face bones are not modelled here)
    front = halfspace((0.62, -1.0, 0.0), (-12.0 * k, -19.5 * k, 0.0))
    occipital.append(_cut_field(front))
    parts = [Part("occiput", head, tuple(occipital), _bone(anat, 1350.0, 420.0, 2.2)),
             Part("occipital condyles", c1, condyles, _bone(anat, 1200.0, 380.0, 1.8))]

    # jaws, in the C2 frame: with the mouth closed the mandible hangs in front of C2-C3, its
    # angles level with the front of the spine, the chin about 7 cm further forward
    c2 = anat.frames["C2"]
    b2 = anat.dims["C2"].b
    jaw = Frame(c2.center, head.R)
    ry, rx = 64.0 * k, 44.0 * k
    centre_v = -b2 - 8.0 * k
    front = halfspace((0, 1, 0), (0, centre_v, 0))   # keep the front half of the ellipse
    mandible = [elliptic_ring((5.0 * k, centre_v, 0.0), (ry, rx), 4.5 * k, 14.0 * k, keep=front)]
    for side in (-1, 1):  # rami: plates rising from the angles towards the skull base
        mandible.append(swept_segment((14.0 * k, centre_v + 4.0 * k, side * 44.0 * k),
                                      (-34.0 * k, centre_v + 12.0 * k, side * 48.0 * k), 11.0 * k, axis=2,
                                      half=2.6 * k, op="blend", blend=3.0))
    parts.append(Part("mandible", jaw, tuple(mandible), _bone(anat, 1450.0, 380.0, 2.5)))
    arch = halfspace((0, 1, 0), (0, centre_v - 18.0 * k, 0))
    teeth = [elliptic_ring((-12.5 * k, centre_v - 2.0 * k, 0.0), (ry - 6.0 * k, rx - 12.0 * k), 3.8 * k, 3.5 * k,
                           keep=arch),
             elliptic_ring((-20.0 * k, centre_v - 2.0 * k, 0.0), (ry - 5.0 * k, rx - 11.0 * k), 4.0 * k, 4.0 * k,
                           keep=arch)]
    parts.append(Part("teeth", jaw, tuple(teeth), Material(2400.0, 1700.0, 1.2, 40.0)))
    maxilla = [elliptic_ring((-27.0 * k, centre_v - 2.0 * k, 0.0), (ry - 4.0 * k, rx - 10.0 * k), 5.0 * k,
                             4.0 * k, keep=arch),
               # the hard palate ends ~4 cm in front of the atlas; the soft palate is not bone
               elliptic_cylinder((-30.0 * k, centre_v - 44.0 * k, 0.0), (22.0 * k, rx - 16.0 * k), 2.0 * k,
                                 rounding=1.0 * k)]
    parts.append(Part("maxilla", jaw, tuple(maxilla), _bone(anat, 1100.0, 350.0, 1.5)))

    # hyoid: a small horseshoe at C3, open to the back
    c3 = anat.frames["C3"]
    b3 = anat.dims["C3"].b
    hy_v = -b3 - 30.0 * k
    hyoid = [elliptic_ring((0.0, hy_v, 0.0), (12.0 * k, 17.0 * k), 1.8 * k, 3.5 * k,
                           keep=halfspace((0, 1, 0), (0, hy_v + 4.0 * k, 0)))]
    parts.append(Part("hyoid", c3.moved([-2.0 * k, 0.0, 0.0]), tuple(hyoid), _bone(anat, 700.0, 250.0, 1.0)))
    return parts


def _cut_field(field: Field) -> Shape:
    """Remove everything where `field` > 0 (a half-space cut over an unbounded box)."""
    big = 1e4
    return Shape(lambda P: -field(P), np.full(3, -big), np.full(3, big), op="cut")


def shoulder_parts(anat: Anatomy) -> list[Part]:
    """Clavicles, manubrium, first two ribs and the scapular spines around T1-T2."""
    k = anat.k
    t1, t2 = anat.frames["T1"], anat.frames["T2"]
    d1, d2 = anat.dims["T1"], anat.dims["T2"]
    front = -d2.b - 42.0 * k  # the sternal notch lies ~4-5 cm in front of T2
    parts = []
    lay1, lay2 = vertebra_layout("T1", d1), vertebra_layout("T2", d2)
    ribs = []
    for side in (-1, 1):
        head1 = np.array([0.0, 0.5 * d1.b, side * (d1.a + 1.5)])
        tp1 = _mirror(lay1["tp_tip"], side) + np.array([2.0, -3.0, 0.0])
        mid1 = np.array([14.0 * k, 0.0, side * (d1.a + 50.0 * k)])
        end1 = np.array([40.0 * k, front + 8.0 * k, side * 24.0 * k])
        ribs += [capsule(head1, tp1, 3.2 * k, op="blend", blend=2.0),
                 capsule(tp1, mid1, 4.0 * k, op="blend", blend=2.0),
                 capsule(mid1, end1, 4.2 * k, 5.0 * k, op="blend", blend=2.0)]
    parts.append(Part("first ribs", t1, tuple(ribs), _bone(anat, 800.0, 220.0, 1.1)))
    ribs2 = []
    for side in (-1, 1):
        head2 = np.array([0.0, 0.5 * d2.b, side * (d2.a + 1.5)])
        tp2 = _mirror(lay2["tp_tip"], side) + np.array([2.0, -3.0, 0.0])
        mid2 = np.array([12.0 * k, -5.0 * k, side * (d2.a + 78.0 * k)])
        ribs2 += [capsule(head2, tp2, 3.2 * k, op="blend", blend=2.0),
                  capsule(tp2, mid2, 4.0 * k, op="blend", blend=2.0)]
    parts.append(Part("second ribs", t2, tuple(ribs2), _bone(anat, 800.0, 220.0, 1.1)))

    upright = Frame(t2.center, np.eye(3))
    clav = []
    for side in (-1, 1):
        sternal = np.array([6.0 * k, front - 4.0 * k, side * 22.0 * k])
        bend = np.array([-4.0 * k, front - 10.0 * k, side * 75.0 * k])
        acromial = np.array([-22.0 * k, front + 45.0 * k, side * 150.0 * k])
        clav += [capsule(sternal, bend, 7.0 * k, 6.0 * k, op="blend", blend=3.0),
                 capsule(bend, acromial, 6.0 * k, 5.5 * k, op="blend", blend=3.0)]
    parts.append(Part("clavicles", upright, tuple(clav), _bone(anat, 950.0, 260.0, 1.8)))
    manubrium = [round_box((30.0 * k, front + 4.0 * k, 0.0), (24.0 * k, 6.0 * k, 26.0 * k), radius=4.0 * k)]
    parts.append(Part("manubrium", upright, tuple(manubrium), _bone(anat, 800.0, 240.0, 1.2)))
    scap = []
    for side in (-1, 1):
        scap.append(swept_segment((-6.0 * k, d2.b + 55.0 * k, side * 60.0 * k),
                                  (-14.0 * k, d2.b + 35.0 * k, side * 125.0 * k), 3.0 * k, axis=0,
                                  half=9.0 * k))
    parts.append(Part("scapulae", upright, tuple(scap), _bone(anat, 850.0, 240.0, 1.3)))
    return parts


def disc_parts(anat: Anatomy) -> list[Part]:
    """Intervertebral discs from C2-C3 down (C1-C2 has none): soft 70-100 HU."""
    parts = []
    for upper, lower in zip(LEVELS[1:-1], LEVELS[2:]):
        fu, fl = anat.frames[upper], anat.frames[lower]
        du, dl = anat.dims[upper], anat.dims[lower]
        centre = (fu.center + fl.center) / 2
        half = float(np.linalg.norm(fl.center - fu.center)) / 2
        R = fu.R + fl.R
        u_, _, vt = np.linalg.svd(R)
        R = u_ @ vt  # the rotation halfway between the two neighbours
        shape = elliptic_cylinder((0, 0, 0), ((du.b + dl.b) / 2 * 0.98, (du.a + dl.a) / 2 * 0.96), half,
                                  rounding=1.5)
        parts.append(Part(f"disc {upper}-{lower}", Frame(centre, R), (shape,), Material(95.0, 75.0, 3.0, 6.0)))
    return parts


def lung_parts(anat: Anatomy) -> list[Part]:
    k = anat.k
    t1 = anat.frames["T1"]
    d1 = anat.dims["T1"]
    upright = Frame(t1.center, np.eye(3))
    shapes = tuple(ellipsoid((92.0 * k, 4.0 * k, side * (d1.a + 30.0 * k)), (88.0 * k, 42.0 * k, 34.0 * k))
                   for side in (-1, 1))
    hu = anat.soft["lung_hu"]
    return [Part("lung apices", upright, shapes, Material(hu + 60.0, hu, 1.0, 12.0))]


# ----------------------------------------------------------------------------- soft tissue

def _levels_interp(anat: Anatomy, s: np.ndarray, values: dict[str, float], top: float) -> np.ndarray:
    """Per-slice profile through per-level values (C1..T3), `top` at the first slice."""
    xs = [0.0] + [anat.s_level[n] for n in LEVELS] + [anat.s_level["T3"] + 200.0]  # increasing
    ys = [top] + [values[n] for n in LEVELS] + [values["T3"]]
    return np.interp(s, xs, ys).astype(np.float32)


def _profile(anat: Anatomy, s: np.ndarray, table: tuple[float, ...], scale: float = 1.0) -> np.ndarray:
    """`table` = (top, C1, C2, ..., T3) in mm for an average neck."""
    return _levels_interp(anat, s, dict(zip(LEVELS, table[1:])), table[0]) * anat.k * scale


def _paint_outline(canvas: Canvas, cy: np.ndarray, xc: np.ndarray, ry: np.ndarray, half_w: np.ndarray,
                   sd: dict[str, float], chunk: int = 8) -> None:
    """Skin, subcutaneous fat and the muscular core from one distance field to the body outline.

    Done a few slices at a time so the temporaries stay small at 512+ pixels."""
    h = canvas.spacing[1]
    y_mm = canvas.axis_mm(1, 0, canvas.shape[1])[None, :, None]
    x_mm = canvas.axis_mm(2, 0, canvas.shape[2])[None, None, :]
    for z0 in range(0, canvas.shape[0], chunk):
        sl = slice(z0, min(z0 + chunk, canvas.shape[0]))
        ys = y_mm - cy[sl, None, None]
        xs = x_mm - xc[sl, None, None]
        rx = half_w[sl, None, None]
        ryy = ry[sl, None, None]
        f = (xs / rx) ** 2 + (ys / ryy) ** 2 - 1.0
        dist = f / (2.0 * np.sqrt((xs / rx ** 2) ** 2 + (ys / ryy ** 2) ** 2) + 1e-6)   # mm, < 0 inside
        occupied = np.clip(0.5 - dist / h, 0.0, 1.0)
        # fat is thicker at the nape and under the chin
        fat_mm = sd["fat_mm"] * (1.0 + 0.5 * np.clip(ys / ryy, 0.0, 1.0)) + 2.0
        core = np.clip(0.5 - (dist + fat_mm) / h, 0.0, 1.0)
        # a fascial fat plane between the superficial and deep neck muscles, at the back
        plane = np.clip(1.0 - np.abs(dist + fat_mm + 11.0) / 1.2, 0.0, 1.0) * np.clip(ys / ryy * 3.0, 0.0, 1.0)
        core *= 1.0 - 0.7 * plane
        skin = np.clip(0.5 - (dist + 1.8) / h, 0.0, 1.0)
        tissue = sd["fat_hu"] + (sd["muscle_hu"] - sd["fat_hu"]) * core
        tissue = 35.0 + (tissue - 35.0) * skin
        canvas.hu[sl] = -1000.0 + (tissue + 1000.0) * occupied


def paint_soft_tissue(canvas: Canvas, anat: Anatomy) -> None:
    """Body outline (skin, fat, muscle), airway, vessels, glands, cartilages, canal contents."""
    nz = canvas.shape[0]
    s = canvas.axis_mm(0, 0, nz)
    yc, xc = anat.spine_centre(s)
    yc, xc = yc.astype(np.float32), xc.astype(np.float32)
    sd = anat.soft
    body = {n: anat.dims["C2" if n == "C1" else n] for n in LEVELS}  # C1 has no body
    b = _levels_interp(anat, s, {n: body[n].b for n in LEVELS}, body["C1"].b)
    front = yc - b                      # front of the vertebral bodies
    back = yc + b

    #                     top   C1   C2   C3   C4   C5   C6   C7   T1   T2   T3
    ant = _profile(anat, s, (118, 112, 92, 62, 44, 41, 41, 46, 55, 64, 68), sd["neck_depth"])
    post = _profile(anat, s, (105, 95, 86, 78, 74, 74, 77, 84, 92, 98, 100), sd["neck_depth"])
    half_w = _profile(anat, s, (74, 72, 68, 61, 56, 56, 60, 74, 112, 165, 185), sd["neck_width"])
    cy = (front - ant + back + post) / 2
    ry = (back + post - (front - ant)) / 2

    _paint_outline(canvas, cy, xc, ry, half_w, sd)

    # the scanner table: a thin curved shell below (behind) the patient
    table_y = float((back + post).max()) + sd["table_y"]
    paint_slab(canvas, 0, nz, table_y + 400.0, 0.0, 400.0, 420.0, 250.0)
    paint_slab(canvas, 0, nz, table_y + 403.0, 0.0, 398.0, 418.0, -1000.0)

    mus, fat = sd["muscle_hu"], sd["fat_hu"]
    canal_v = back + _levels_interp(anat, s, {n: body[n].cb + 0.5 for n in LEVELS}, body["C1"].cb + 0.5)
    cb = _levels_interp(anat, s, {n: anat.dims[n].cb for n in LEVELS}, anat.dims["C2"].cb + 4.0)
    ca = _levels_interp(anat, s, {n: anat.dims[n].ca for n in LEVELS}, anat.dims["C2"].ca + 3.0)
    spine_back = canal_v + cb + 14.0 * anat.k

    # posterior neck: the ligamentum nuchae, a thin fat septum from the spinous tips to the skin
    septum_len = (back + post - sd["fat_mm"] - spine_back) / 2
    paint_slab(canvas, 0, nz, spine_back + septum_len, xc, septum_len, 0.9, fat + 30.0)

    # airway: naso/oropharynx close to the spine, larynx further forward, then the trachea
    aw = sd["airway"]
    air_ry = _profile(anat, s, (8, 7, 6.5, 8, 11, 11, 8, 8, 8, 8, 8.5), aw)
    air_rx = _profile(anat, s, (15, 15, 14, 13, 9, 8.5, 8, 9, 9, 9, 9.5), aw)
    gap = _profile(anat, s, (5, 5, 4.5, 5.5, 13, 15, 15, 14, 13, 12, 11))
    air_y = front - gap - air_ry
    s_c3, s_c4, s_c6 = (anat.s_level[n] for n in ("C3", "C4", "C6"))
    z_c3 = int(s_c3 / canvas.spacing[0])
    # the visceral space: fat around larynx, trachea, thyroid and oesophagus
    paint_slab(canvas, z_c3, nz, air_y[z_c3:], xc[z_c3:], air_ry[z_c3:] + 9.0, air_rx[z_c3:] + 12.0, fat)
    # carotid sheaths and sternocleidomastoid muscles
    for side in (-1, 1):
        sheath_x = xc + side * (air_rx + 17.0 * anat.k)
        sheath_y = front - 9.0 * anat.k
        paint_slab(canvas, 0, nz, sheath_y, sheath_x, 7.0 * anat.k, 11.0 * anat.k, fat)
        paint_slab(canvas, 0, nz, sheath_y, sheath_x - side * 4.0 * anat.k, 3.4 * anat.k, 3.4 * anat.k, 42.0)
        paint_slab(canvas, 0, nz, sheath_y - 0.5, sheath_x + side * 4.5 * anat.k, 4.8 * anat.k, 5.0 * anat.k, 36.0)
        t = np.clip(s / anat.s_level["T2"], 0.0, 1.0)
        scm_x = xc + side * ((1 - t) * (half_w - 16.0) + t * 28.0 * anat.k)
        scm_y = (1 - t) * (yc + 8.0) + t * (front - ant + 14.0)
        paint_slab(canvas, 0, nz, scm_y, scm_x, 7.5 * anat.k, 11.0 * anat.k, fat)
        paint_slab(canvas, 0, nz, scm_y, scm_x, 5.8 * anat.k, 9.0 * anat.k, mus + 5.0)
    # laryngeal cartilages: thyroid cartilage (C4-C5, open behind) and cricoid ring (C6)
    z_c4, z_c6 = int(s_c4 / canvas.spacing[0]), int(s_c6 / canvas.spacing[0])
    sl = slice(z_c4 - 4, z_c6)
    shield = lambda z, y, x: np.clip((1.0 - y / 4.0), 0.0, 1.0)  # noqa: E731 - open behind
    paint_slab(canvas, sl.start, sl.stop, air_y[sl] - 2.0, xc[sl], air_ry[sl] + 8.5, air_rx[sl] + 7.0,
               sd["cartilage_hu"], keep=shield)
    paint_slab(canvas, sl.start, sl.stop, air_y[sl] - 1.4, xc[sl], air_ry[sl] + 6.6, air_rx[sl] + 5.2, mus - 10.0,
               keep=shield)
    sl = slice(z_c6, z_c6 + int(8 / canvas.spacing[0]) + 1)
    paint_slab(canvas, sl.start, sl.stop, air_y[sl], xc[sl], air_ry[sl] + 3.5, air_rx[sl] + 3.5,
               sd["cartilage_hu"] * 0.8)
    # thyroid gland lobes beside the trachea, oesophagus behind it
    sl = slice(z_c6, min(nz, int(anat.s_level["T1"] / canvas.spacing[0]) + 1))
    for side in (-1, 1):
        paint_slab(canvas, sl.start, sl.stop, air_y[sl] + 2.0, xc[sl] + side * (air_rx[sl] + 8.0),
                   11.0 * anat.k, 7.0 * anat.k, 88.0)
    sl = slice(z_c6, nz)
    oes_y = front[sl] - 6.5 * anat.k
    paint_slab(canvas, sl.start, sl.stop, oes_y, xc[sl] - 3.0, 4.5 * anat.k, 8.0 * anat.k, mus - 5.0)
    if sd["esophagus_air"]:
        paint_slab(canvas, sl.start, sl.stop, oes_y, xc[sl] - 3.0, 1.4, 2.6, -1000.0)
    paint_slab(canvas, sl.start, sl.stop, air_y[sl], xc[sl], air_ry[sl] + 1.8, air_rx[sl] + 1.8, 110.0)
    # the airway itself, with the piriform sinuses beside the larynx at C4-C5
    paint_slab(canvas, 0, nz, air_y, xc, air_ry, air_rx, -1000.0)
    sl = slice(z_c4, int(anat.s_level["C5"] / canvas.spacing[0]) + 3)
    for side in (-1, 1):
        paint_slab(canvas, sl.start, sl.stop, air_y[sl] + air_ry[sl] * 0.7, xc[sl] + side * (air_rx[sl] + 3.5),
                   3.0 * aw, 3.5 * aw, -1000.0)
    # the spinal canal: epidural fat, CSF in the thecal sac, the cord
    paint_slab(canvas, 0, nz, canal_v, xc, cb + 0.5, ca + 0.5, -70.0)
    paint_slab(canvas, 0, nz, canal_v, xc, cb - 1.2, ca - 1.6, 8.0)
    paint_slab(canvas, 0, nz, canal_v - 0.8, xc, cb * 0.52, ca * 0.45, 36.0)


# ----------------------------------------------------------------------------- whole phantom

def render_phantom(canvas: Canvas, anat: Anatomy, mods: dict[str, Modifiers],
                   result: PaintResult) -> None:
    """Paint soft tissue, lungs, discs and every bone; vertebrae last so their labels win."""
    paint_soft_tissue(canvas, anat)
    for part in lung_parts(anat) + disc_parts(anat):
        paint_part(canvas, part)
    for part in skull_parts(anat) + shoulder_parts(anat):
        paint_part(canvas, part)
    material = _bone(anat, texture=35.0)
    for level in LEVELS:
        shapes = vertebra_shapes(level, anat.dims[level], anat.bone["facet_slope"])
        part = Part(level, anat.frames[level], tuple(shapes), material, LABEL[level])
        paint_part(canvas, part, mods.get(level), result)
