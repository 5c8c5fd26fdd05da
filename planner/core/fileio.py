"""Reading and writing distplan's files safely.

Reading: every loader (plan, profile, cluster, model, run reports) goes through `read_yaml` / `read_json`,
which turn every way a file can be wrong into one DistplanError naming the file: missing, a folder or
another non-file, unreadable, larger than MAX_INPUT_BYTES, not UTF-8 text, malformed, nested deeper than
MAX_NESTING, YAML aliases (a few lines of nested aliases expand to billions of nodes; distplan never
writes them: `dump_yaml` writes an object met twice in full), and values other than text, numbers,
true/false, null, lists and mappings with text keys.

Writing: `atomic_write_files` stages every file beside its target and renames them into place only once
all are written, so a reader (or a crash) never sees a half-written file and a failed write leaves
nothing behind; `check_writable` refuses an output path before any work is done.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from pathlib import Path

import yaml

from planner.core.errors import DistplanError
from planner.core.fields import short

MAX_INPUT_BYTES = 8 * 2**20  # largest file read: 160x distplan's largest profile (52 KB), parsed in seconds
MAX_NESTING = 32  # deepest nesting of lists and mappings accepted: distplan's own files nest at most 7 levels
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when installed: 10x faster, same results
# YAML events that open a nesting level (MAX_NESTING's count)
_STARTS = (yaml.MappingStartEvent, yaml.SequenceStartEvent)
_ENDS = (yaml.MappingEndEvent, yaml.SequenceEndEvent)  # ... and close one
_SCALARS = (str, int, float, bool, type(None))  # the Python types a YAML scalar loads as


def read_text(path: str | Path, what: str, hint: str = "") -> str:
    """The UTF-8 text of the file at `path`; `what` names it in errors ("plan file"), `hint` follows
    the "does not exist" one."""
    path = Path(path)
    try:
        st = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        raise DistplanError(f"{what} '{path}' does not exist{hint}") from None
    except (OSError, ValueError) as exc:
        raise DistplanError(f"cannot read {what} '{path}': {getattr(exc, 'strerror', None) or exc}") from None
    if stat.S_ISDIR(st.st_mode):
        raise DistplanError(f"{what} '{path}' is a folder; name a file")
    if not stat.S_ISREG(st.st_mode):
        raise DistplanError(f"{what} '{path}' is not a regular file")
    if st.st_size > MAX_INPUT_BYTES:
        raise DistplanError(f"{what} '{path}' is {st.st_size / 2**20:.1f} MiB; distplan reads files up to "
                            f"{MAX_INPUT_BYTES // 2**20} MiB")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_INPUT_BYTES + 1)
    except OSError as exc:
        raise DistplanError(f"cannot read {what} '{path}': {exc.strerror or exc}") from None
    if len(data) > MAX_INPUT_BYTES:
        raise DistplanError(f"{what} '{path}' is over {MAX_INPUT_BYTES // 2**20} MiB; distplan reads files up to that")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DistplanError(f"{what} '{path}' is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
                            "is it a binary file?") from None


def _yaml_problem(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else problem


def parse_yaml(text: str, source: str) -> object:
    """The document in `text` (aliases and deep nesting refused, see the module doc); `source` names it."""
    try:
        depth = 0
        for event in yaml.parse(text, Loader=_Loader):  # events first: stops at the first alias or too deep a level
            if isinstance(event, yaml.AliasEvent):
                raise DistplanError(f"{source} uses a YAML alias (*{event.anchor}) at line {event.start_mark.line + 1}; "
                                    "distplan's files never do: write the value out")
            if isinstance(event, _STARTS):
                depth += 1
                if depth > MAX_NESTING:
                    raise DistplanError(f"{source} nests lists and mappings deeper than {MAX_NESTING} levels "
                                        f"(line {event.start_mark.line + 1}); distplan's files nest at most 7")
            elif isinstance(event, _ENDS):
                depth -= 1
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        if "nesting depth" in str(exc):  # libyaml >= 0.2.6 (PyYAML 6.0.4's wheels) stops at its own limit first
            raise DistplanError(f"{source} nests lists and mappings deeper than {MAX_NESTING} levels "
                                f"({_yaml_problem(exc)}); distplan's files nest at most 7") from None
        raise DistplanError(f"{source} is malformed YAML: {_yaml_problem(exc)}") from None
    except (ValueError, RecursionError, OverflowError) as exc:  # e.g. an integer of more than 4300 digits
        raise DistplanError(f"{source} is malformed YAML: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    _check_plain(data, source)
    return data


def parse_json(text: str, source: str) -> object:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DistplanError(f"{source} is malformed JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") from None
    except RecursionError:
        raise DistplanError(f"{source} nests lists and objects deeper than {MAX_NESTING} levels") from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise DistplanError(f"{source} is malformed JSON: {str(exc).splitlines()[0]}") from None
    _check_plain(data, source)
    return data


def _check_plain(data: object, source: str) -> None:
    """Text keys, plain values, at most MAX_NESTING levels (iterative: deep input cannot overflow the stack)."""
    todo = [(data, "", 1)]
    while todo:
        value, where, depth = todo.pop()
        at = f" at '{where}'" if where else ""
        if isinstance(value, dict):
            if depth > MAX_NESTING:
                raise DistplanError(f"{source} nests deeper than {MAX_NESTING} levels{at}")
            for key, item in value.items():
                if not isinstance(key, str):
                    raise DistplanError(f"{source}: key {short(key)}{at} is not text; keys are names such as 'gpus'")
                todo.append((item, f"{where}.{key}" if where else key, depth + 1))
        elif isinstance(value, list):
            if depth > MAX_NESTING:
                raise DistplanError(f"{source} nests deeper than {MAX_NESTING} levels{at}")
            todo.extend((item, f"{where}[{i}]", depth + 1) for i, item in enumerate(value))
        elif not isinstance(value, _SCALARS):
            raise DistplanError(f"{source}: the value{at} is a YAML {type(value).__name__} ({short(value)}); distplan's "
                                "files hold text, numbers, true/false, null, lists and mappings (quote it to make it text)")


def _require_mapping(data: object, source: str) -> dict:
    if not isinstance(data, dict):
        raise DistplanError(f"{source} must hold a mapping of keys to values, got {type(data).__name__ if data is not None else 'an empty document'}")
    return data


class _PlainDumper(yaml.SafeDumper):
    """safe_dump that writes an object met twice in full (never an anchor and alias, which parse_yaml refuses)."""

    def ignore_aliases(self, data: object) -> bool:
        return True


def dump_yaml(data: object, **options) -> str:
    """yaml.safe_dump without anchors or aliases (options: sort_keys, width, ...)."""
    return yaml.dump(data, Dumper=_PlainDumper, **options)


def read_yaml(path: str | Path, what: str, hint: str = "", mapping: bool = True) -> object:
    """The YAML document in the file at `path`, a mapping unless `mapping` is False (see read_text)."""
    source = f"{what} '{path}'"
    data = parse_yaml(read_text(path, what, hint), source)
    return _require_mapping(data, source) if mapping else data


def read_json(path: str | Path, what: str, hint: str = "", mapping: bool = True) -> object:
    source = f"{what} '{path}'"
    data = parse_json(read_text(path, what, hint), source)
    return _require_mapping(data, source) if mapping else data


# ---- writing --------------------------------------------------------------------------------------------


def check_writable(path: str | Path, what: str = "output") -> Path:
    """Refuse `path` as an output file before any work: a folder, something other than a file, or a place
    that cannot be written (its nearest existing folder is not writable, or a parent is a file)."""
    path = Path(path)
    if not path.name or path.name in (".", ".."):
        raise DistplanError(f"cannot write {what} '{path}': it names a folder; name a file")
    try:
        if path.exists() or path.is_symlink():
            st = path.stat()
            if stat.S_ISDIR(st.st_mode):
                raise DistplanError(f"cannot write {what} '{path}': it is a folder; name a file")
            if not stat.S_ISREG(st.st_mode):
                raise DistplanError(f"cannot write {what} '{path}': it exists and is not a regular file")
        _check_parent(path, what)
    except OSError as exc:
        raise DistplanError(f"cannot write {what} '{path}': {exc.strerror or exc}") from None
    except ValueError as exc:  # e.g. an embedded NUL
        raise DistplanError(f"cannot write {what} '{path}': {exc}") from None
    return path


def check_writable_folder(path: str | Path, what: str = "output folder") -> Path:
    """Refuse `path` as an output folder (to be created or replaced) before any work."""
    path = Path(path)
    try:
        if path.exists() and not path.is_dir():
            raise DistplanError(f"cannot write {what} '{path}': it exists and is not a folder")
        _check_parent(path, what)
    except OSError as exc:
        raise DistplanError(f"cannot write {what} '{path}': {exc.strerror or exc}") from None
    except ValueError as exc:
        raise DistplanError(f"cannot write {what} '{path}': {exc}") from None
    return path


def _check_parent(path: Path, what: str) -> None:
    parent = path.absolute().parent
    while not parent.exists():  # created on writing: its nearest existing ancestor must take new folders
        if parent.is_symlink():
            raise DistplanError(f"cannot write {what} '{path}': '{parent}' is a broken link")
        parent = parent.parent
    if not parent.is_dir():
        raise DistplanError(f"cannot write {what} '{path}': '{parent}' is a file, not a folder")
    try:  # probed by making a file there (permission bits alone do not say: root, read-only mounts, /proc)
        fd, probe = tempfile.mkstemp(prefix=".distplan-probe.", dir=parent)
    except OSError as exc:
        raise DistplanError(f"cannot write {what} '{path}': no file can be created in '{parent}' "
                            f"({exc.strerror or exc})") from None
    os.close(fd)
    os.unlink(probe)


def atomic_write_files(files: dict[Path, str | bytes]) -> None:
    """Write every `path: text or bytes` of `files`, all or none: each goes to a temporary file in its folder and is
    fsynced; only when all are staged are they renamed over their paths, and if a rename fails the ones
    done are undone (a replaced file comes back from a hard link kept until the end)."""
    staged: list[tuple[str, Path]] = []
    kept: list[tuple[Path, Path | None]] = []  # renamed so far: (path, the link to the file it replaced)
    umask = os.umask(0)
    os.umask(umask)
    try:
        for path, data in files.items():
            path = Path(path)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            except OSError as exc:
                raise DistplanError(f"cannot write '{path}': {exc.strerror or exc}") from None
            staged.append((tmp, path))
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the mode open() would
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data.encode() if isinstance(data, str) else data)
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as exc:
                raise DistplanError(f"cannot write '{path}': {exc.strerror or exc}") from None
        for tmp, path in staged:
            try:
                old = _keep(path) if len(staged) > 1 else None
                kept.append((path, old))
                os.replace(tmp, path)
            except OSError as exc:
                kept.pop()
                _undo(kept)
                raise DistplanError(f"cannot write '{path}': {exc.strerror or exc}") from None
    finally:
        for tmp, _ in staged:
            Path(tmp).unlink(missing_ok=True)
        for _, old in kept:
            if old is not None:
                old.unlink(missing_ok=True)


def _keep(path: Path) -> Path | None:
    """A hard link to the file at `path` (None where there is none), to put it back if a later write fails."""
    if not path.is_file():
        return None
    old = path.with_name(f".{path.name}.{os.getpid()}.old")
    try:
        os.link(path, old)
    except OSError:  # a file system without hard links
        shutil.copy2(path, old)
    return old


def _undo(kept: list[tuple[Path, Path | None]]) -> None:
    for path, old in reversed(kept):
        if old is None:
            path.unlink(missing_ok=True)
        else:
            os.replace(old, path)


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over `path`."""
    atomic_write_files({Path(path): text})


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """atomic_write_text for bytes (pictures)."""
    atomic_write_files({Path(path): data})
