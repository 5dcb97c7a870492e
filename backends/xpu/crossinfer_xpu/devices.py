"""Intel GPU names without a device context: the PCI ids in sysfs, and a table of the ids
of the GPUs this backend is meant for. Anything else is named by its id."""

from __future__ import annotations

from pathlib import Path

INTEL_VENDOR = "0x8086"
DISPLAY_CLASS = "0x03"  # PCI class 03xxxx: VGA-compatible and other display controllers
KNOWN = {
    "0x0bd5": "Intel Data Center GPU Max 1550",
    "0x0bda": "Intel Data Center GPU Max 1100",
    "0x56c0": "Intel Data Center GPU Flex 170",
    "0x56c1": "Intel Data Center GPU Flex 140",
    "0x56a0": "Intel Arc A770",
    "0x56a1": "Intel Arc A750",
    "0x56a5": "Intel Arc A380",
    "0xe20b": "Intel Arc B580",
}


def intel_gpu_names(pci_root: Path = Path("/sys/bus/pci/devices")) -> list[str]:
    """Names of the Intel display devices on the PCI bus, in bus order."""
    names = []
    for device in sorted(pci_root.glob("*")):
        try:
            vendor = (device / "vendor").read_text().strip()
            kind = (device / "class").read_text().strip()
            ident = (device / "device").read_text().strip().lower()
        except OSError:
            continue
        if vendor == INTEL_VENDOR and kind.startswith(DISPLAY_CLASS):
            names.append(KNOWN.get(ident, f"Intel GPU [8086:{ident.removeprefix('0x')}]"))
    return names


def xpu_device_names(count: int, pci_root: Path = Path("/sys/bus/pci/devices")) -> tuple[str, ...]:
    """``xpu:N name`` when sysfs shows exactly the devices torch counts, else ``xpu:N`` (a
    selector such as ZE_AFFINITY_MASK hides some: do not guess which)."""
    names = intel_gpu_names(pci_root)
    if len(names) != count:
        return tuple(f"xpu:{i}" for i in range(count))
    return tuple(f"xpu:{i} {name}" for i, name in enumerate(names))
