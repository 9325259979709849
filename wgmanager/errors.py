"""wgmanager's exception hierarchy. Every message is one line naming the problem and the fix.

    WgmError
     ├── ConfigError           bad input from a user or a file (flag, mesh file)
     ├── EnvironmentProblem    the machine lacks something (tool, kernel feature, permission)
     │    ├── BackendUnavailable   a WireGuard backend cannot run here
     │    └── DatapathError        the eBPF program could not be built, loaded or attached
     ├── DeviceError           a WireGuard device rejected or failed an operation
     └── KeyStoreError         the key state directory cannot be used

Messages never carry key material: only public keys, shortened, may appear.
"""

from __future__ import annotations


class WgmError(Exception):
    """Base of every error wgmanager raises on purpose."""


class ConfigError(WgmError):
    pass


class EnvironmentProblem(WgmError):
    pass


class BackendUnavailable(EnvironmentProblem):
    pass


class DatapathError(EnvironmentProblem):
    pass


class DeviceError(WgmError):
    pass


class KeyStoreError(WgmError):
    pass
