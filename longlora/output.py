"""
Where a command writes, and how, so that nothing a user has is lost. Every command that writes follows this:

  * Before any long work, each path it will write is checked (`check_output`): it lies in no input, it can be
    written, and if something is already there, it is replaced only when the user asks (`--overwrite`), and a
    folder only if this project wrote it (STAMP). Otherwise the command stops and says what to choose.
  * A result that stands alone (a merged or exported model, an imported adapter, eval's JSON and plot) is built
    under a temporary name beside its destination and renamed into place when complete (`building`): a kill at
    any moment leaves the old result or nothing, never a mix that loads.
  * A folder that grows for hours (train.py's run: metrics, checkpoints, then the result; demo.py's stages) is
    written by one command at a time (`lock_output`); with --overwrite the old one first leaves its place
    (`set_aside`). Its result files are put in place by `install_files`, the files that make it load last.

    check_output(a.out, "--out", is_dir=True, inputs=[("--base", a.base)], overwrite=a.overwrite)
    ...                                                  # the long work
    with building(a.out, overwrite=a.overwrite) as tmp:  # tmp: a new folder beside a.out
        write_model(args, state, tmp, "hf")
"""

import contextlib
import errno
import fcntl
import glob
import os
import shutil
import socket
import sys
import tempfile

from longlora.cli import UsageError

# In every folder this project writes: its lock while a command writes there, and the stamp that says "ours".
STAMP = ".longlora.lock"


def _is_ours(folder, ours=()):
    return any(os.path.exists(os.path.join(folder, n)) for n in (STAMP, *ours))


def _holds_files(folder):
    """Anything in `folder` but our stamp (a folder that holds only the stamp has nothing to lose)."""
    return os.path.isdir(folder) and bool(set(os.listdir(folder)) - {STAMP})


def check_output(path, flag, is_dir=False, inputs=(), ours=(), overwrite=False, grows=False):
    """Raise UsageError unless `path` can be written as this command's result (a directory with is_dir).

    inputs: (flag, path) pairs the command reads; `path` must be none of them, nor lie inside one, nor (a folder)
    hold one, which replacing it would delete; compared by real path (symlinks resolved). Something already at `path` is replaced only with `overwrite`; a folder also only
    if this project wrote it (its STAMP, or one of the names in `ours`). grows: a folder the command continues
    (a training run folder with --resume), which may hold its own files without --overwrite.

    Writable: not a file where a directory goes (or the reverse), and the nearest folder that exists, `path`
    itself or a parent, accepts a new file: one is created there and removed again, the only test that also
    holds for root (who ignores permission bits) and read-only file systems."""
    real = os.path.realpath(path)
    for in_flag, p in inputs:
        if real == os.path.realpath(p) or real.startswith(os.path.join(os.path.realpath(p), "")):
            raise UsageError(f"{flag} {path} {'is' if real == os.path.realpath(p) else 'is inside'} {in_flag} {p}; "
                             "write to a new path")
        if is_dir and os.path.realpath(p).startswith(os.path.join(real, "")):
            raise UsageError(f"{flag} {path} holds {in_flag} {p}; write to a folder outside what the command reads")
    path = os.path.abspath(path)
    if os.path.exists(path) and os.path.isdir(path) != is_dir:
        raise UsageError(f"{flag} {path}: is {'a file' if is_dir else 'a directory'}; expected "
                         f"{'a directory' if is_dir else 'a file'}")
    full = _holds_files(path) if is_dir else os.path.exists(path)
    if full and is_dir and not _is_ours(path, ours):
        raise UsageError(f"{flag} {path} holds files this project did not write; choose a new or empty folder")
    if full and not (overwrite or grows):
        raise UsageError(f"{flag} {path} already exists; choose a new {'folder' if is_dir else 'file'}, "
                         "or add --overwrite to replace it")
    folder = path if is_dir else os.path.dirname(path)
    existing = folder
    while not os.path.exists(existing):  # a folder to write is created later, with its missing parents
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UsageError(f"{flag} {path}: {existing} is a file, not a directory")
    if existing != folder and not is_dir:  # a file goes into a folder that exists
        raise UsageError(f"{flag} {path}: no such folder {folder}")
    try:
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as e:
        raise UsageError(f"{flag} {path}: cannot write in {existing} ({e.strerror or e})") from None


def check_distinct(*outputs):
    """(flag, path) pairs one command writes: no two may be the same file."""
    seen = {}
    for flag, p in outputs:
        if p and os.path.realpath(p) in seen:
            raise UsageError(f"{flag} {p} is also {seen[os.path.realpath(p)]}; give each output its own path")
        if p:
            seen[os.path.realpath(p)] = flag


def lock_output(path, flag):
    """An exclusive lock on the folder `path` (created if need be), held until the returned object is closed or the
    process ends, even by a kill: a second command writing the same folder at the same time is refused, instead
    of both interleaving their files. The lock file stays: it stamps the folder as one this project wrote.

    A file system without flock (Lustre mounted without -o flock, NFS without lockd) gets an owner file instead,
    with a warning (OwnerFile)."""
    os.makedirs(path, exist_ok=True)
    f = open(os.path.join(path, STAMP), "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise UsageError(f"{flag} {path}: another command is writing there now (it holds {path}/{STAMP})") from None
    except OSError as e:  # ENOLCK, EOPNOTSUPP, ENOSYS: no flock here
        f.close()
        print(f"warning: {path}: this file system does not lock files ({e.strerror or e}); using {STAMP}.owner instead",
              file=sys.stderr)
        return OwnerFile(os.path.join(path, STAMP + ".owner"), flag)
    return f


class OwnerFile:
    """The lock where flock is missing: a file created only if absent (O_EXCL, atomic on every file system),
    holding "host pid"; removed by close(). One left by a killed command is taken over when its process is gone
    from this host; one of another host is never taken over (its process cannot be seen from here)."""

    def __init__(self, path, flag):
        self.path = path
        me = f"{socket.gethostname()} {os.getpid()}"
        while True:
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                owner = open(path).read().split()
                if len(owner) == 2 and owner[0] == socket.gethostname() and not _alive(int(owner[1])):
                    os.remove(path)  # left by a killed command of this host
                    continue
                raise UsageError(f"{flag} {os.path.dirname(path)}: another command is writing there now (its owner "
                                 f"file {path} names {' pid '.join(owner)}; delete it if that command is gone)") from None
            os.write(fd, me.encode())
            os.close(fd)
            return

    def close(self):
        if os.path.exists(self.path):
            os.remove(self.path)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's
        pass
    return True


@contextlib.contextmanager
def one_writer(path, doing):
    """Hold an exclusive lock on path + ".lock" while making `path`, a file that several runs may make at once (a
    shared --token-cache): the second waits for the first (however long it takes), then finds the finished file.
    The lock file stays, and marks its folder as ours. Without flock, each makes it, into its own temporary file
    renamed into place (atomic_write): the same result, done twice."""
    with open(path + ".lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another run that is {doing} into {path}", file=sys.stderr, flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError as e:  # ENOLCK, EOPNOTSUPP, ENOSYS: no flock here
            print(f"warning: {path}: this file system does not lock files ({e.strerror or e}); not waiting for "
                  "another run that may be making it too", file=sys.stderr)
        yield  # (closing the file releases the lock, also when the process dies)


def _aside(path, kind):
    """A hidden name beside `path` for this process: .NAME.partial-PID (a result being built) or .NAME.old-PID."""
    parent, name = os.path.split(os.path.abspath(path))
    return os.path.join(parent, f".{name}.{kind}-{os.getpid()}")


def _remove_leftovers(path):
    """Folders that killed commands left beside `path` (being built, or set aside): no command holds their lock."""
    parent, name = os.path.split(os.path.abspath(path))
    for kind in ("partial", "old"):
        for d in glob.glob(os.path.join(glob.escape(parent), f".{glob.escape(name)}.{kind}-[0-9]*")):
            if not os.path.exists(os.path.join(d, STAMP)):
                continue
            with open(os.path.join(d, STAMP), "a") as f:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    continue  # a command is building it now (or no flock here: left alone)
                shutil.rmtree(d, ignore_errors=True)


def set_aside(path, flag):
    """--overwrite of a folder that grows (a training run, a demo): the old one leaves its place in one rename, then
    is deleted. A kill leaves the old folder in place, or nothing there (and a hidden .NAME.old-PID, removed by
    the next command that writes `path`)."""
    path = os.path.realpath(path)
    if not _holds_files(path):
        return
    with lock_output(path, flag):  # nobody is writing it now
        old = _aside(path, "old")
        os.rename(path, old)
    shutil.rmtree(old)


@contextlib.contextmanager
def building(path, overwrite=False, is_dir=True):
    """Yield a temporary path beside `path` (.NAME.partial-PID) to write the whole result into; when the block
    ends without error, rename it to `path`, replacing what is there only with `overwrite` (check_output has
    refused the rest before the work). On an error the temporary result is removed, and `path` is untouched.

    A folder is stamped and locked while it is built. Replacing a folder takes two renames (the old one aside,
    the new one in): a kill between them leaves nothing at `path`, never a mix."""
    path = os.path.realpath(path)  # a symlink to the destination stays one: what it points to is replaced
    _remove_leftovers(path)
    tmp = _aside(path, "partial")
    if is_dir:
        shutil.rmtree(tmp, ignore_errors=True)
        lock = lock_output(tmp, "--out")
    try:
        yield tmp
        _put_in_place(tmp, path, overwrite, is_dir)
    except BaseException:
        if is_dir:
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.exists(tmp):
            os.remove(tmp)
        raise
    finally:
        if is_dir:
            lock.close()


def _put_in_place(tmp, path, overwrite, is_dir):
    taken = f"{path} was written by another command while this one ran; run again with a new path or --overwrite"
    if not is_dir:
        if overwrite:
            os.replace(tmp, path)
            return
        try:
            os.link(tmp, path)  # fails if `path` appeared meanwhile: never replaces a file unasked
        except FileExistsError:
            raise UsageError(taken) from None
        os.remove(tmp)
        return
    if os.path.isdir(path) and os.listdir(path):
        if _holds_files(path) and not overwrite:
            raise UsageError(taken)
        old = _aside(path, "old")
        os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old)
        return
    try:
        os.rename(tmp, path)  # onto nothing or an empty folder; fails if another command filled it meanwhile
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise UsageError(taken) from None
        raise


def install_files(src_dir, dest_dir, loads_with, stale=()):
    """Move the files of a result built in src_dir into dest_dir, a folder that holds other things (a training
    run's checkpoints and metrics) and maybe an older result. The files named in `loads_with` (without which no
    loader opens the result: its configs) are removed from dest_dir first and moved in last, so a kill at any
    moment leaves the old result, or one that does not load, never a mix that loads. Files matching the glob
    patterns in `stale` that the new result lacks (an older export's extra shards) are removed too."""
    names = sorted(os.listdir(src_dir))
    for n in loads_with:
        if os.path.exists(os.path.join(dest_dir, n)):
            os.remove(os.path.join(dest_dir, n))
    for pattern in stale:
        for f in glob.glob(os.path.join(glob.escape(dest_dir), pattern)):
            if os.path.basename(f) not in names:
                os.remove(f)
    for n in sorted(names, key=lambda n: n in loads_with):
        os.replace(os.path.join(src_dir, n), os.path.join(dest_dir, n))


def atomic_write(path, write_fn):
    """Call write_fn(tmp_path), then rename over `path`: a killed run never leaves a half-written file."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        write_fn(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path, text: str):
    """Write a UTF-8 text file atomically (see atomic_write)."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)
