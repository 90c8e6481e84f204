"""Row locks: while a run writes rows into a folder it holds an exclusive lock on each of them,
so two runs can never mix their files in one row. Runs on different rows of one folder (shards)
go ahead together; a run that would touch a row another live run holds refuses at once and says
which rows (waiting would only redo that run's work or stall a scheduler).

Each id is a one-byte POSIX record lock (fcntl.lockf) at a hash-of-id offset in <folder>/.rows.lock.
The kernel drops a process's locks when it ends, however it ends (kill -9 included), so a lock is
never left behind. POSIX locks belong to the process: another lock taken by the same process never
conflicts, and closing any descriptor of the file drops them all, so the file is opened once, here."""
from __future__ import annotations

import fcntl
import hashlib
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from localization_heads.dataio import InputError

LOCK_FILE = ".rows.lock"
LISTED = 5


def _offset(item_id: str) -> int:
    """A byte per id, ≥ 1 (byte 0 guards the failure list); 56 bits make collisions negligible."""
    return 1 + int.from_bytes(hashlib.sha256(item_id.encode("utf-8")).digest()[:7], "big")


class RowLocks:
    """`with RowLocks(folder, ids) as locks:` holds every id or raises InputError naming the busy ones."""

    def __init__(self, folder: str | Path, ids: Iterable[str]):
        self.folder, self.ids = Path(folder), list(ids)
        self.fd: int | None = None

    def __enter__(self) -> "RowLocks":
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / LOCK_FILE
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:   # e.g. created by another user on a shared folder, with their umask
            raise InputError(f"{path}: cannot open the rows' lock file ({e.strerror or e}); every run into this folder "
                             "needs to write it: ask its owner to make it writable (chmod a+rw), remove it while no run "
                             "is writing here, or write elsewhere (data.output_dir)") from None
        busy = []
        for item_id in self.ids:
            try:
                fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, _offset(item_id), os.SEEK_SET)
            except OSError:   # EAGAIN / EACCES: another process holds it
                busy.append(item_id)
        if busy:
            self.__exit__()
            shown = ", ".join(repr(i) for i in busy[:LISTED]) + (f" and {len(busy) - LISTED} more" if len(busy) > LISTED else "")
            raise InputError(f"{self.folder}: another run is writing {len(busy)} of these rows right now ({shown}); "
                             "wait for it to finish, or write elsewhere (data.output_dir)")
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)   # drops every lock of this file held by this process
            self.fd = None

    @contextmanager
    def shared_file(self) -> Iterator[None]:
        """Exclusive use of the folder's shared files (failures.jsonl) for a read-modify-write;
        waits, since the other holder needs only milliseconds."""
        fcntl.lockf(self.fd, fcntl.LOCK_EX, 1, 0, os.SEEK_SET)
        try:
            yield
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, 0, os.SEEK_SET)
