"""Backend discovery and ``--device`` resolution.

Backends are classes registered in the ``crossinfer.backends`` entry-point group; stevedore
loads them. Every discovered entry point becomes one :class:`BackendInfo` row, whatever went
wrong with it (an import error, an incompatible contract version, a constructor or probe that
raises), so one broken plugin never hides the others. Nothing here imports a vendor SDK: only
the plugins do, and only when their entry point is loaded.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass, replace
from typing import Any

from stevedore import ExtensionManager
from stevedore.extension import Extension

from crossinfer.backend import CONTRACT_VERSION, Backend, Probe

NAMESPACE = "crossinfer.backends"
"""The entry-point group backends register in."""

AUTO_ORDER: tuple[str, ...] = ("cuda", "rocm", "xpu", "tpu", "neuron", "cpu")
"""``--device auto`` takes the first available of these, then other backends by priority."""


class DeviceError(ValueError):
    """A ``--device`` value names no installed backend, or one that cannot run here."""


@dataclass(frozen=True)
class BackendInfo:
    """One discovered entry point, usable or not: a row of ``crossinfer backends``."""

    name: str
    """The entry-point name, which is what ``--device`` takes."""
    package: str
    """The distribution that registered it (what to pip install or uninstall); "" if unknown."""
    version: str
    """That distribution's version; "" if unknown."""
    api: str
    """The contract version the backend declares, "major.minor"; "" if it never loaded."""
    available: bool
    """True when the backend loaded, is compatible and its probe found a usable device."""
    reason: str
    """Why it is not available, in words a person can act on; "" when available."""
    devices: tuple[str, ...]
    """The usable devices its probe named."""
    backend: Backend | None
    """The constructed backend; None when it failed to load, is incompatible or failed to
    construct."""

    @property
    def priority(self) -> int:
        """The backend's ``--device auto`` tie-breaker; 0 when there is no backend."""
        return self.backend.priority if self.backend is not None else 0


class _InstalledExtensionManager(ExtensionManager[Any]):
    """stevedore's manager, reading the entry points from installed metadata on every call.

    Stock stevedore serves entry points from two caches: a process-wide dict on the class
    (stale for the life of the process once filled) and ``~/.cache/python-entrypoints``, keyed
    by sys.path and by file mtimes packed as 32-bit floats (128 s resolution today), so an
    entry point rewritten within the same two-minute window is served stale. Its cached
    entry points also carry no distribution, which the table needs. Reading importlib.metadata
    costs tens of milliseconds, small beside importing torch.
    """

    def list_entry_points(self) -> list[importlib.metadata.EntryPoint]:
        return list(importlib.metadata.entry_points(group=self.namespace))


def discover(manager: ExtensionManager[Any] | None = None) -> list[BackendInfo]:
    """Load every backend entry point and probe it; one row per entry point, in auto order.

    ``manager`` replaces the installed entry points, e.g. one made with stevedore's
    ``ExtensionManager.make_test_instance``. Import failures are reported only for the
    default manager, which is the one that imports.
    """
    failed: list[BackendInfo] = []

    def on_load_failure(
        _manager: ExtensionManager[Any], ep: importlib.metadata.EntryPoint, exc: BaseException
    ) -> None:
        failed.append(_import_failure(ep, exc))

    if manager is None:
        manager = _InstalledExtensionManager(
            NAMESPACE, invoke_on_load=False, on_load_failure_callback=on_load_failure
        )
    infos = [describe_extension(ext) for ext in manager.extensions] + failed
    return sorted(infos, key=_auto_rank)


def describe_extension(ext: Extension[Any]) -> BackendInfo:
    """Check one loaded entry point against the contract, construct it and probe it."""
    package, version = _distribution(ext.entry_point)
    row = BackendInfo(ext.name, package, version, "", False, "", (), None)
    cls = ext.plugin
    problem = _class_problem(cls, ext.entry_point.value)
    if problem:
        return replace(row, reason=f"{problem}; {_report_bug(package)}")
    row = replace(row, api=_format_version(cls.api_version))
    if cls.api_version[0] != CONTRACT_VERSION[0]:
        # Never construct it: a backend for another major version may not even build.
        return replace(row, reason=_incompatible_reason(cls.api_version, package))
    try:
        backend = cls()
    except Exception as exc:
        reason = f"could not be constructed: {_describe_exc(exc)}"
        return replace(row, reason=f"{reason}; {_report_bug(package)}")
    row = replace(row, backend=backend)
    probe = _safe_probe(backend)
    if isinstance(probe, str):
        return replace(row, reason=f"{probe}; {_report_bug(package)}")
    reason = "" if probe.available else probe.reason or "its probe found no usable device"
    return replace(row, available=probe.available, reason=reason, devices=probe.devices)


def resolve_device(device: str, infos: list[BackendInfo] | None = None) -> Backend:
    """Turn a ``--device`` value into a ready backend, or raise :class:`DeviceError`.

    ``auto`` takes the first available backend of :data:`AUTO_ORDER`, then any other available
    one by descending ``priority``. Commands call this before loading a model, so a missing
    device fails in seconds with the probe's reason. ``infos`` defaults to :func:`discover`.
    """
    if infos is None:
        infos = discover()
    wanted = device.strip().lower()
    if wanted == "auto":
        return _pick_auto(infos)
    matches = [info for info in infos if info.name == wanted]
    if not matches:
        known = ", ".join(["auto", *sorted({info.name for info in infos})])
        raise DeviceError(
            f"--device {device}: no backend of that name is installed; known: {known} "
            "(run `crossinfer backends` to see each one's status)"
        )
    usable = [info for info in matches if info.available and info.backend is not None]
    if not usable:
        reasons = "; ".join(info.reason for info in matches)
        raise DeviceError(f"--device {wanted} is not available: {reasons}")
    if len(usable) > 1:
        packages = ", ".join(info.package or "?" for info in usable)
        raise DeviceError(
            f"--device {wanted} is provided by several packages ({packages}); uninstall all but one"
        )
    assert usable[0].backend is not None  # narrowed above; mypy cannot see through the list
    return usable[0].backend


def _pick_auto(infos: list[BackendInfo]) -> Backend:
    for info in sorted(infos, key=_auto_rank):
        if info.available and info.backend is not None:
            return info.backend
    reasons = "; ".join(f"{info.name}: {info.reason}" for info in infos) or "none is installed"
    raise DeviceError(
        f"--device auto found no available backend ({reasons}); install crossinfer with its "
        "cpu backend or the package for your accelerator"
    )


def _auto_rank(info: BackendInfo) -> tuple[int, int, str]:
    # Built-in order first; the rest by descending priority, then name, so ties are stable.
    if info.name in AUTO_ORDER:
        return (AUTO_ORDER.index(info.name), 0, info.name)
    return (len(AUTO_ORDER), -info.priority, info.name)


def _import_failure(ep: importlib.metadata.EntryPoint, exc: BaseException) -> BackendInfo:
    package, version = _distribution(ep)
    reason = f"failed to import: {_describe_exc(exc)}; {_fix_install(package)}"
    return BackendInfo(ep.name, package, version, "", False, reason, (), None)


def _class_problem(cls: object, target: str) -> str:
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        return f"{target} is not a subclass of crossinfer.backend.Backend"
    api = cls.api_version
    if not (isinstance(api, tuple) and len(api) == 2 and all(isinstance(v, int) for v in api)):
        return f"api_version {api!r} is not a (major, minor) pair of ints"
    return ""


def _safe_probe(backend: Backend) -> Probe | str:
    # The contract says probe() never raises; when one does, report it as the plugin's bug
    # instead of letting it take down discovery of every other backend.
    try:
        probe = backend.probe()
    except Exception as exc:
        return f"probe() raised {_describe_exc(exc)}; it must return Probe(False, reason)"
    if not isinstance(probe, Probe):
        return f"probe() returned {type(probe).__name__}, not a Probe"
    return probe


def _distribution(ep: importlib.metadata.EntryPoint) -> tuple[str, str]:
    # Entry points built by hand (tests, stevedore's cache) have no distribution attached.
    dist = ep.dist
    if dist is None:
        return "", ""
    return dist.name, dist.version


def _incompatible_reason(api: tuple[int, int], package: str) -> str:
    ours = _format_version(CONTRACT_VERSION)
    plugin = package or "the plugin"
    if api[0] > CONTRACT_VERSION[0]:
        fix = "upgrade crossinfer"
    else:
        fix = f"upgrade {plugin}"
    return (
        f"api {_format_version(api)} is not compatible with this crossinfer (contract {ours}); "
        f"{fix}, or install a version of {plugin} built for contract {CONTRACT_VERSION[0]}.x"
    )


def _fix_install(package: str) -> str:
    if not package:
        return "install the plugin's dependencies, or uninstall the plugin"
    return f"reinstall {package} with its dependencies, or uninstall it"


def _report_bug(package: str) -> str:
    if not package:
        return "this is a bug in the plugin; fix or uninstall it"
    return f"this is a bug in {package}; report it to its maintainers, or uninstall it"


def _describe_exc(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _format_version(version: tuple[int, int]) -> str:
    return f"{version[0]}.{version[1]}"
