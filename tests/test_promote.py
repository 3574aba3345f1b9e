"""What a promoted model pins: installable versions of its dependencies."""

from __future__ import annotations

from importlib.metadata import version

from cspine_ray.promote import pin, requirements


def test_pins_are_the_installed_public_versions():
    pins = dict(r.split("==") for r in requirements())
    names = {name.split("[")[0] for name in pins}
    assert {"torch", "timm", "mlflow", "pydicom"} <= names
    for name, pinned in pins.items():
        installed = version(name.split("[")[0])
        assert "+" not in pinned                        # no local label (2.x+cpu, +cu130)
        assert pinned == installed.split("+")[0], name  # the same release, its public part


def test_a_local_build_label_is_not_pinned():
    assert pin("torch", "2.14.1+cpu") == "torch==2.14.1"
    assert pin("torchvision", "0.29.1+cu130") == "torchvision==0.29.1"
    assert pin("ray[default,tune]", "2.60.0") == "ray[default,tune]==2.60.0"
