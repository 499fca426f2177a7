"""The file mechanics every part of minimoe shares, each written once.

    atomic_write(path, data)        a file is whole or absent: temp file, fsync, rename
    remove_stale_tmp(folder)        delete the temp files an interrupted atomic_write left behind
    read_log(folder)                the rows of a run's log.jsonl (a line cut short by a crash is skipped)
    cached_run(root, label, ident)  the run cache: config -> folder -> result.json (the study, the notebooks)
    writable_folder(path)           make a folder and check that files can be created in it (one line if not)
    one_line(e)                     'Type: message' of an exception on one line (torch's errors run to pages)

Temp files are named `.NAME.tmpPID` next to NAME, so a crash leaves something recognizable, and the
pid says whether the writer is still alive. Nothing here imports torch or any other part of minimoe.
"""

from dataclasses import dataclass
import hashlib
import json
import os
from pathlib import Path
import re
import stat
import sys
import tempfile

TMP_NAME = re.compile(r"\..+\.tmp(\d+)")    # .NAME.tmpPID: the temp files of atomic_write
RESULT = "result.json"                      # a cached run is finished once this is written


def one_line(e: BaseException, limit: int = 200) -> str:
    """'Type: message' on one line, cut to `limit` characters (torch's errors run to pages)."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def atomic_write(path, data) -> None:
    """Write `data` to `path` through a temp file in the same folder, fsync it, then rename it over
    `path`: a crash never leaves a half-written file there, and a failed write (a full disk, Ctrl-C)
    keeps the previous file and leaves no temp file behind (a kill -9 still can: remove_stale_tmp).
    data: bytes, str (UTF-8), a list of bytes chunks, or a function that writes to the open binary
    file (e.g. `lambda f: torch.save(state, f)`)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                for chunk in [data] if isinstance(data, (bytes, str)) else data:
                    f.write(chunk.encode() if isinstance(chunk, str) else chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise


def writable_folder(path, flag: str = "--out_dir") -> Path:
    """Make `path` (and its parents) if needed and check that this process can create files in it: one line
    naming it otherwise (a file in its place, a symlink loop, no permission)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):            # can this process create files here?
            pass
    except OSError as e:
        raise ValueError(f"{flag}={path} is not a writable folder ({one_line(e, 120)}); use another {flag}") from None
    return path


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this machine (signal 0 only asks)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError) as e:
        return isinstance(e, PermissionError)      # another user's process is alive; a bad pid is not
    return True


def remove_stale_tmp(folder, locked: bool = False) -> list[Path]:
    """Delete the temp files (`.NAME.tmpPID`, regular files only) that an interrupted write left in
    `folder`: those whose process no longer runs on this machine, or all of them when the caller
    holds the folder's lock (locked=True: train's out_dir; no other process writes there). Returns
    the removed paths. (A folder shared by several machines could hold another host's live temp
    file: don't share one cache or prepare folder between machines that write it at the same time.)"""
    folder, removed = Path(folder), []
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        m = TMP_NAME.fullmatch(p.name)
        if m and stat.S_ISREG(p.lstat().st_mode) and (
                locked or (int(m[1]) != os.getpid() and not pid_alive(int(m[1])))):
            p.unlink(missing_ok=True)
            removed.append(p)
    if removed:
        print(f"removed {len(removed)} temporary file(s) left in {folder} by an interrupted run: "
              f"{', '.join(p.name for p in sorted(removed)[:3])}{' ...' if len(removed) > 3 else ''}",
              file=sys.stderr)
    return removed


def read_log(folder, upto_iter: int | None = None) -> list[dict]:
    """The rows of folder/log.jsonl (one JSON object per evaluation), in order. A line that is not a
    whole row (cut short by a crash) is skipped; upto_iter keeps only rows with iter <= upto_iter
    (a resume keeps the rows up to its checkpoint)."""
    rows = []
    for line in (Path(folder) / "log.jsonl").read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("iter"), int) and (upto_iter is None or row["iter"] <= upto_iter):
            rows.append(row)
    return rows


@dataclass(frozen=True)
class CachedRun:
    """One run of the run cache: its folder and the key of the config that defines it."""
    folder: Path
    key: str                         # sha1 of the identifying config (config_key)

    def result(self) -> dict | None:
        """The finished run's result.json, or None: not finished, or written by another config. A damaged
        one is a one-line ValueError naming it (deleting it trains the run again)."""
        path = self.folder / RESULT
        if not path.exists():
            return None
        try:
            r = json.loads(path.read_text())
            assert isinstance(r, dict)
        except (ValueError, AssertionError):
            raise ValueError(f"{path} is not a study result (damaged or edited JSON); delete it to train that run "
                             f"again") from None
        return r if r.get("key") == self.key else None

    def finish(self, result: dict) -> dict:
        """Write result.json (atomically: a run is finished or not) with the key first; returns it."""
        result = {"key": self.key, **result}
        atomic_write(self.folder / RESULT, json.dumps(result, indent=1, default=str))
        return result

    def init_from(self) -> str:
        """'resume' when an earlier attempt left a checkpoint (it continues exactly), else 'scratch'."""
        return "resume" if (self.folder / "ckpt.pt").exists() else "scratch"


def config_key(ident: dict) -> str:
    """The run cache's key: sha1 of the config as sorted JSON (equal configs, equal keys)."""
    return hashlib.sha1(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()


def cached_run(root, label: str, ident: dict) -> CachedRun:
    """The run of config `ident` in root/runs/<label>-<first 10 hex digits of its key>/. Train into
    cached.folder (init_from=cached.init_from()) unless cached.result() is there, then cached.finish(r)."""
    key = config_key(ident)
    return CachedRun(Path(root) / "runs" / f"{label}-{key[:10]}", key)
