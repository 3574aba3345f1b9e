"""What a promoted model pins: installable versions of its dependencies."""

from __future__ import annotations

from importlib.metadata import version

from cspine_ray.promote import requirements


def test_pins_are_the_installed_public_versions():
    pins = dict(r.split("==") for r in requirements())
    names = {name.split("[")[0] for name in pins}
    assert {"torch", "timm", "mlflow", "pydicom"} <= names
    for name, pinned in pins.items():
        installed = version(name.split("[")[0])
        assert "+" not in pinned                        # no local label (2.x+cpu, +cu130)
        assert pinned == installed.split("+")[0], name  # the same release, its public part
