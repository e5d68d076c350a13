"""complete's files: prompts read from .txt / .jsonl / stdin, and results written so none is lost.

Results go to `FILE.partial` a line at a time, in input order, as they finish; a finished run
renames it to FILE, so FILE appears whole or not at all. A run that is killed keeps its partial
file, and the same command run again continues after its last whole line.
"""

import errno
import fcntl
import json
import os
import sys
from pathlib import Path

from ..text.chat_template import check_dialog


def _lines(text: str) -> list:
    """Lines split on "\\n" alone (a CRLF's "\\r" dropped): str.splitlines would also split on
    U+2028, U+0085 and other characters that belong inside a prompt."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def _utf8(data: bytes, where: str) -> str:
    """`data` as text (a leading byte-order mark dropped); ValueError naming the line of a bad byte."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{where} is not UTF-8 text (byte 0x{data[e.start]:02x} on line {line}); save it as UTF-8") from None


def _looks_like_jsonl(text: str) -> bool:
    """Whether stdin's first non-empty line is a JSON object: then stdin is read as JSON lines."""
    first = next((line for line in _lines(text) if line.strip()), "")
    if not first.lstrip().startswith("{"):
        return False
    try:
        return isinstance(json.loads(first), dict)
    except ValueError:
        return False


def read_prompts(source, chat: bool = False) -> list:
    """(line number, record) for each non-empty line of a .txt (a prompt a line), a .jsonl
    ({"prompt": ...} a line, or {"messages": [...]} with chat) or "-" (stdin: JSON lines when its
    first line is a JSON object, else a prompt a line). A record is {"prompt": str, other fields} or,
    with chat, may be {"messages": [...], ...}."""
    if source == "-":
        if sys.stdin is None:
            raise ValueError("stdin is closed; pipe the prompts in, or pass a .txt or .jsonl file")
        if hasattr(sys.stdin, "buffer"):
            text = _utf8(sys.stdin.buffer.read(), "stdin")
        else:  # a text stream without bytes beneath (a notebook, a test's StringIO)
            text = sys.stdin.read().removeprefix("\ufeff")
        is_jsonl = _looks_like_jsonl(text)
        if is_jsonl:
            print('reading stdin as JSON lines ({"prompt": ...} a line), as its first line is a JSON object', file=sys.stderr)
    else:
        path = Path(str(source))
        if path.is_dir():
            raise ValueError(f"prompt file {path} is a folder; pass a .txt or .jsonl file, or - for stdin")
        if not path.exists():  # a pipe such as <(...) or /dev/stdin is read as a file
            raise FileNotFoundError(f"prompt file {path} does not exist; pass a .txt or .jsonl file, or - for stdin")
        text = _utf8(path.read_bytes(), f"prompt file {path}")
        is_jsonl = path.suffix.lower() == ".jsonl"
    shape = '{"prompt": ...} or {"messages": [...]}' if chat else '{"prompt": ...}'
    records, empty = [], 0
    for number, line in enumerate(_lines(text), 1):
        if not line.strip():
            empty += 1
            continue
        if not is_jsonl:
            records.append((number, {"prompt": line}))
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{source} line {number} is not JSON ({e.msg}); write one {shape} object a line") from None
        where = f"{source} line {number}"
        if isinstance(record, dict) and "messages" in record:
            if not chat:
                raise ValueError(f'{where} holds "messages": pass --chat to run it through the chat template')
            try:
                check_dialog(record["messages"])
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
        elif not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise ValueError(f"{where} has no \"prompt\" string; write one {shape} object a line")
        records.append((number, record))
    if empty:
        print(f"skipped {empty} empty line(s) of {source}", file=sys.stderr)
    if not records:
        raise ValueError(f"{source} holds no prompts")
    return records


def _is_source(path: Path, source) -> bool:
    """Whether writing `path` would write over the prompts (a file, or stdin redirected from it)."""
    try:
        if source == "-":
            return sys.stdin is not None and os.path.samestat(os.fstat(sys.stdin.fileno()), os.stat(path))
        return os.path.samefile(path, str(source))
    except (OSError, ValueError):  # either does not exist (yet), or stdin is no file
        return False


def _os_error(e: OSError) -> str:
    return e.strerror or str(e)


class StdoutError(ValueError):
    """stdout cannot be written (a full device): the run cannot go on."""


def write_stdout(text: str, fix: str = "free the device or send the output elsewhere") -> None:
    """`text` to stdout, flushed; a failure (other than the reader going away) as one StdoutError."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        raise
    except OSError as e:
        raise StdoutError(f"cannot write to stdout ({_os_error(e)}); {fix}") from None


class StdoutResults:
    """Result lines to stdout as they come, flushed, so a pipe sees each at once."""

    def __init__(self):
        if sys.stdout is None:
            raise ValueError("stdout is closed; pass --out FILE")
        self.done = 0

    def resume(self, records) -> int:
        return 0

    def write(self, line: str) -> None:
        write_stdout(line, fix="pass --out FILE or free the device")
        self.done += 1

    def finish(self) -> None:
        pass

    def close(self) -> None:
        pass


class FileResults:
    """Result lines to FILE.partial, then renamed to FILE. Checked before any work: FILE must not be
    a folder nor the prompt file, and its folder must take a new file."""

    def __init__(self, out, source):
        if not str(out):
            raise ValueError("--out is empty; name a file to write, or leave --out out for stdout")
        # Through symlinks: the link's target is replaced, never the link by a file.
        self.path = Path(str(out)).resolve()
        self.partial = self.path.with_name(self.path.name + ".partial")
        if self.path.is_dir():
            raise ValueError(f"--out {out} is a folder; name a file to write, such as {Path(str(out)) / 'out.jsonl'}")
        if self.path.exists() and not self.path.is_file():
            raise ValueError(f"--out {out} is not a regular file (a device or a pipe); name a file, or leave --out out "
                             "for stdout")
        if not self.path.parent.is_dir():
            raise FileNotFoundError(f"the folder of --out {out} does not exist; create it or write elsewhere")
        for name in (self.path, self.partial):
            if _is_source(name, source):
                raise ValueError(f"--out {out} would write over the prompt file ({name}); write the results elsewhere")
        self.existed = self.partial.exists()
        try:  # unbuffered: a failed write leaves nothing behind to be flushed later
            self.file = open(self.partial, "ab+", buffering=0)  # the umask's permissions, as any new file
        except OSError as e:
            raise ValueError(f"cannot write --out {out} ({_os_error(e)}); choose a writable place") from None
        try:  # one run at a time per --out: two would both append every result
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.close()
            raise ValueError(f"another run is writing --out {out} ({self.partial} is locked); wait for it to end, "
                             "or choose another --out") from None
        self.done = 0

    def resume(self, records) -> int:
        """How many records the partial file already holds (their lines must match these prompts);
        a last line cut short by a kill is dropped."""
        self.file.seek(0)
        data = self.file.read()
        whole = data[: data.rfind(b"\n") + 1]
        for number, line in enumerate(whole.decode("utf-8", errors="replace").split("\n")[:-1], 1):
            try:
                done = json.loads(line)
            except json.JSONDecodeError:
                done = None
            if (number > len(records) or not isinstance(done, dict) or not isinstance(done.get("generation"), str)
                    or done != {**records[number - 1][1], "generation": done["generation"]}):
                raise ValueError(f"{self.partial} (left by an earlier run) does not match these prompts at its line "
                                 f"{number}; delete it to start over")
            self.done = number
        if len(whole) < len(data):
            self.file.truncate(len(whole))
        return self.done

    def write(self, line: str) -> None:
        data, size = line.encode("utf-8"), self.file.seek(0, os.SEEK_END)
        try:
            written = 0
            while written < len(data):  # a raw write may take part of the bytes
                written += self.file.write(data[written:])
        except OSError as e:
            try:  # no half line: cut back to the last whole one
                self.file.truncate(size)
            except OSError:
                pass
            kept = f"{self.done} finished result(s) are kept in {self.partial}; " if self.done else ""
            fix = "free some space" if e.errno == errno.ENOSPC else "fix it"
            raise ValueError(f"cannot write --out {self.path} ({_os_error(e)}); {kept}{fix} and rerun the same command "
                             "to continue") from None
        self.done += 1

    def finish(self) -> None:
        """Every result is in: FILE.partial becomes FILE."""
        try:
            os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self.partial, self.path)
        except OSError as e:
            raise ValueError(f"cannot write --out {self.path} ({_os_error(e)}); the results are kept in {self.partial}") from None

    def close(self) -> None:
        """After a failure: keep finished results; a partial file this run made and never wrote to goes."""
        if not self.file.closed:
            self.file.close()
        if not self.existed and self.done == 0:
            self.partial.unlink(missing_ok=True)
