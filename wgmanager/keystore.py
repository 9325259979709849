"""The node's WireGuard private key on disk: load it, create it, write it atomically.

The private key is the node's identity: peers accept its traffic only while they hold the
matching public key, so losing or silently swapping it breaks the mesh until the new public
key has been republished. This module therefore writes key files with temp file + fsync +
rename + directory fsync (a crash leaves the old key or the new one, never half a key), keeps
them at mode 0600 in a 0700 directory, and on finding a corrupt main key moves it aside (kept
for forensics, never reused) and generates a new one, loudly. The file format is that of
``wg genkey`` (base64 and a newline), so ``wg pubkey < private.key`` works on the node.

No log line or exception message carries private key material; only public keys appear.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import stat
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from wgmanager.core.keys import KEY_LEN, InvalidKey, PrivateKey
from wgmanager.core.rotation import RotationState, StateError
from wgmanager.errors import KeyStoreError

logger = logging.getLogger(__name__)

MAIN_KEY = "private.key"
ROTATION_STATE = "rotation.json"
# The nodes this node's agent quarantined (wgmanager.core.keywatch): kept in memory by the
# agent, written here for `wgmanager status`, which runs in another process.
QUARANTINE_STATE = "quarantined.json"


def slot_key(slot: int) -> str:
    """The key file of a rotation slot (wgmanager.core.rotation): slot 0 is the main key."""
    return MAIN_KEY if slot == 0 else f"private-{slot}.key"
_MAX_FILE_BYTES = 4096  # a key file is 45 bytes; anything near this is not a key file
_FIX = "run as root or point --state-dir at a writable directory"


@dataclass(frozen=True)
class LoadResult:
    """The main key, whether it was just generated, and where a corrupt predecessor went."""

    key: PrivateKey
    created: bool
    recovered_from: Path | None  # the corrupt file's new (moved-aside) path, if there was one


class _CorruptKey(Exception):
    """A key file whose content is not a usable key; the message never quotes the content."""


class KeyStore:
    """Key files in one state directory; the main key is ``state_dir / "private.key"``."""

    def __init__(
        self, state_dir: Path, *, clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    ) -> None:
        self._dir = Path(state_dir)
        self._clock = clock

    @property
    def state_dir(self) -> Path:
        return self._dir

    @property
    def path(self) -> Path:
        return self._dir / MAIN_KEY

    def load_or_create(self, name: str = MAIN_KEY) -> LoadResult:
        """Return the key in ``name``, generating one if missing and replacing a corrupt one."""
        self._ensure_dir()
        path = self._dir / _check_name(name)
        try:
            key = self._read_key(name)
        except FileNotFoundError:
            key = PrivateKey.generate()
            self.write(key, name=name)
            logger.info(
                "generated a new private key",
                extra={"path": str(path), "public_key": key.public_key.base64()},
            )
            return LoadResult(key, created=True, recovered_from=None)
        except _CorruptKey as exc:
            aside = self._move_aside(path)
            key = PrivateKey.generate()
            self.write(key, name=name)
            logger.warning(
                "private key file was corrupt: moved it aside and generated a new key; "
                "peers need the new public key, which the agent republishes",
                extra={
                    "path": str(path),
                    "moved_to": str(aside),
                    "reason": str(exc),
                    "public_key": key.public_key.base64(),
                },
            )
            return LoadResult(key, created=True, recovered_from=aside)
        logger.debug(
            "loaded the private key",
            extra={"path": str(path), "public_key": key.public_key.base64()},
        )
        return LoadResult(key, created=False, recovered_from=None)

    def load(self, name: str = MAIN_KEY) -> PrivateKey | None:
        """Return the key in ``name``, None if there is no such file; never moves anything."""
        try:
            return self._read_key(_check_name(name))
        except FileNotFoundError:
            return None
        except _CorruptKey as exc:
            path = self._dir / name
            raise KeyStoreError(
                f"key file {path} is corrupt ({exc}); move it aside or delete it"
            ) from None

    def write(self, key: PrivateKey, *, name: str = MAIN_KEY) -> None:
        """Atomically replace ``name`` with ``key`` (mode 0600, durable once this returns)."""
        self._write_atomic(_check_name(name), (key.export_base64() + "\n").encode("ascii"))

    def exists(self, name: str) -> bool:
        return os.path.lexists(self._dir / _check_name(name))

    def mtime(self, name: str = MAIN_KEY) -> float | None:
        """When ``name`` was written (a key's age), None if there is no such file."""
        try:
            return os.stat(self._dir / _check_name(name)).st_mtime
        except OSError:
            return None

    def destroy(self, name: str) -> bool:
        """Overwrite ``name`` with zeros, then remove it; True if there was a file.

        Used for a retired key once no peer needs it. The overwrite is best effort (a
        copy-on-write or journalling filesystem may keep old blocks), the unlink is not.
        """
        path = self._dir / _check_name(name)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            return False
        except OSError:
            fd = None  # not a writable regular file: still remove it
        if fd is not None:
            try:
                size = os.fstat(fd).st_size
                os.write(fd, bytes(min(size, _MAX_FILE_BYTES)))
                os.fsync(fd)
            except OSError:
                pass
            finally:
                os.close(fd)
        try:
            os.unlink(path)
            _fsync_dir(self._dir)
        except OSError as exc:
            raise KeyStoreError(f"cannot remove key file {path}: {exc.strerror}; {_FIX}") from None
        return True

    def read_state(self, name: str) -> str | None:
        """A small state file kept beside the keys (e.g. the rotation state), or None."""
        try:
            return (self._dir / _check_name(name)).read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise KeyStoreError(f"cannot read {self._dir / name}: {exc.strerror}; {_FIX}") from None

    def write_state(self, name: str, text: str) -> None:
        """Atomically replace a state file: a crash leaves the old content or the new."""
        self._ensure_dir()
        self._write_atomic(_check_name(name), text.encode("utf-8"))

    def load_rotation(self) -> RotationState:
        """The persisted key rotation state; none means a node that never rotated."""
        text = self.read_state(ROTATION_STATE)
        if text is None:
            return RotationState(slot=self._only_slot())
        try:
            return RotationState.from_json(text)
        except StateError as e:
            slot = self._only_slot()
            logger.error("key rotation state is unreadable; continuing on the only usable key "
                         "slot (an unfinished rotation is abandoned)",
                         extra={"error": str(e), "slot": slot, "path": str(self._dir)})
            return RotationState(slot=slot)

    def save_rotation(self, state: RotationState) -> None:
        self.write_state(ROTATION_STATE, state.to_json())

    def load_quarantined(self) -> frozenset[str]:
        """The nodes the agent last said it quarantines; none when unreadable (status only)."""
        try:
            text = self.read_state(QUARANTINE_STATE)
            names = json.loads(text) if text else []
        except (KeyStoreError, ValueError):
            return frozenset()
        return frozenset(n for n in names if isinstance(n, str)) if isinstance(names, list) \
            else frozenset()

    def save_quarantined(self, names: frozenset[str]) -> None:
        self.write_state(QUARANTINE_STATE, json.dumps(sorted(names)) + "\n")

    def _only_slot(self) -> int:
        return 1 if self.exists(slot_key(1)) and not self.exists(slot_key(0)) else 0

    def _write_atomic(self, name: str, content: bytes) -> None:
        target = self._dir / name
        tmp = self._dir / f".{name}.{secrets.token_hex(6)}.tmp"
        data = memoryview(content)
        fd: int | None = None
        replaced = False
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            os.fchmod(fd, 0o600)  # independent of the umask
            while data:
                data = data[os.write(fd, data) :]
            os.fsync(fd)
            os.close(fd)
            fd = None
            os.replace(tmp, target)
            replaced = True
            _fsync_dir(self._dir)
        except OSError as exc:
            if fd is not None:
                os.close(fd)
            if not replaced:
                tmp.unlink(missing_ok=True)
            raise KeyStoreError(
                f"could not write {target}: {exc.strerror or type(exc).__name__}; {_FIX}"
            ) from None

    def _ensure_dir(self) -> None:
        d = self._dir
        if not os.path.lexists(d):
            try:
                d.mkdir(mode=0o700, parents=True)
                os.chmod(d, 0o700)  # mkdir's mode is filtered by the umask
            except FileExistsError:
                pass  # created concurrently; checked below
            except OSError as exc:
                raise KeyStoreError(
                    f"key state directory {d} cannot be created: {exc.strerror}; {_FIX}"
                ) from None
        if not d.is_dir():
            raise KeyStoreError(f"key state directory {d} is not a directory; {_FIX}")
        if not os.access(d, os.W_OK | os.X_OK):
            raise KeyStoreError(f"key state directory {d} is not writable: {_FIX}")

    def _read_key(self, name: str) -> PrivateKey:
        """Read and validate one key file; FileNotFoundError if absent, _CorruptKey if bad."""
        path = self._dir / name
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)  # no hang on a FIFO
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise KeyStoreError(f"cannot open key file {path}: {exc.strerror}; {_FIX}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise KeyStoreError(f"key file {path} is not a regular file; remove it")
            if st.st_mode & 0o077:
                os.fchmod(fd, 0o600)
                logger.warning(
                    "key file was readable by other users; restricted it to mode 0600",
                    extra={"path": str(path), "old_mode": oct(stat.S_IMODE(st.st_mode))},
                )
            content = os.read(fd, _MAX_FILE_BYTES + 1)
        except OSError as exc:
            raise KeyStoreError(f"cannot read key file {path}: {exc.strerror}; {_FIX}") from None
        finally:
            os.close(fd)
        return _parse(content)

    def _move_aside(self, path: Path) -> Path:
        stamp = self._clock().astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
        base = f"{path.name}.corrupt-{stamp}"
        aside, n = path.with_name(base), 0
        while os.path.lexists(aside):
            n += 1
            aside = path.with_name(f"{base}.{n}")
        try:
            os.rename(path, aside)
        except OSError as exc:
            raise KeyStoreError(
                f"cannot move corrupt key file {path} aside: {exc.strerror}; {_FIX}"
            ) from None
        return aside


def _parse(content: bytes) -> PrivateKey:
    if len(content) > _MAX_FILE_BYTES:
        raise _CorruptKey("far too large for a key file")
    try:
        text = content.decode("ascii")
    except UnicodeDecodeError:
        raise _CorruptKey("not ASCII text") from None
    try:
        key = PrivateKey.from_base64(text)
    except InvalidKey as exc:
        raise _CorruptKey(str(exc)) from None
    if key.export_raw() == bytes(KEY_LEN):
        raise _CorruptKey("all-zero key")
    return key


def _check_name(name: str) -> str:
    if not name or name in (".", "..") or "/" in name or name.startswith("."):
        raise ValueError(f"key file name must be a plain file name, got {name!r}")
    return name


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
